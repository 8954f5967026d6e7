//! Outgoing notifications for matched actions: the team's Slack / Discord / Teams incoming webhook
//! (for actions with `post_to_slack`) and Zapier REST hooks (`ee_hook`, organizations with the
//! `zapier` feature), with the reference's message templates and payloads byte for byte.
//!
//! Owns the message formatting (tokens such as `[user.name]`, Node's `util.format`), the payloads
//! and the HTTP calls. Firing runs on its own task with a per-request timeout, so ingestion never
//! waits for a slow endpoint; failures are logged and otherwise ignored, as in the reference.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::Action;
use crate::event::PluginEvent;
use crate::js;
use crate::model::{Organization, Person, Team};

/// How long one webhook or REST hook request may take.
pub const HOOK_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const DEFAULT_MESSAGE_FORMAT: &str = "[action.name] was triggered by [user.name]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookType {
    Slack,
    Discord,
    Teams,
}

/// Slack and Discord are recognised by host; everything else is treated as Microsoft Teams.
pub fn determine_webhook_type(url: &str) -> WebhookType {
    let url = url.to_lowercase();
    if url.contains("slack.com") {
        WebhookType::Slack
    } else if url.contains("discord.com") {
        WebhookType::Discord
    } else {
        WebhookType::Teams
    }
}

fn link(webhook_type: WebhookType, url: &str, label: &str) -> String {
    match webhook_type {
        WebhookType::Slack => format!("<{url}|{label}>"),
        _ => format!("[{label}]({url})"),
    }
}

/// `[text, markdown]` for `[user.name]`: the person's email, else the distinct id.
pub fn user_details(
    event: &PluginEvent,
    person: Option<&Person>,
    site_url: &str,
    webhook_type: WebhookType,
) -> (String, String) {
    let Some(person) = person else {
        return ("undefined".into(), "undefined".into());
    };
    let email = person.properties.get("email").filter(|email| js::is_truthy(email));
    let name = match email {
        Some(email) => js::stringify(Some(email)),
        None => event.distinct_id.clone(),
    };
    let markdown = link(webhook_type, &format!("{site_url}/person/{}", event.distinct_id), &name);
    (name, markdown)
}

/// `[text, markdown]` for `[action.name]`.
pub fn action_details(action: &Action, site_url: &str, webhook_type: WebhookType) -> (String, String) {
    let name = match &action.name {
        Some(name) => name.clone(),
        None => "null".into(),
    };
    let markdown = link(webhook_type, &format!("{site_url}/action/{}", action.id), &name);
    (name, markdown)
}

fn is_line_terminator(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{2028}' | '\u{2029}')
}

/// The end (index of `]`) of a bracket token whose text starts at `start`, if no line terminator
/// comes first (JavaScript's `.` does not cross lines).
fn token_end(message: &str, start: usize) -> Option<usize> {
    for (offset, c) in message[start..].char_indices() {
        if c == ']' {
            return Some(start + offset);
        }
        if is_line_terminator(c) {
            return None;
        }
    }
    None
}

/// The texts between `[` and the next `]`, and the message with every `[...]` replaced by `%s`
/// (the reference's two regular expressions, emulated without look-around).
pub fn tokens(message_format: &str) -> (Vec<String>, String) {
    let mut tokens = Vec::new();
    // Where the next `[` may start: JavaScript's lastIndex, less one for the look-behind.
    let mut bracket_from = 0;
    while let Some(open) = message_format.get(bracket_from..).and_then(|rest| rest.find('[')).map(|i| i + bracket_from)
    {
        let start = open + 1;
        match token_end(message_format, start) {
            Some(end) if end > start => {
                tokens.push(message_format[start..end].to_owned());
                bracket_from = if message_format[..end].ends_with('[') { end - 1 } else { end };
            }
            // An empty match advances one position, as JavaScript's global matching does.
            Some(end) => {
                tokens.push(String::new());
                bracket_from = end;
            }
            None => bracket_from = start,
        }
    }
    if tokens.is_empty() {
        return (tokens, message_format.to_owned());
    }
    let mut tokenized = String::new();
    let mut rest = 0;
    let mut search = 0;
    while let Some(open) = message_format[search..].find('[').map(|i| i + search) {
        match token_end(message_format, open + 1) {
            Some(end) => {
                tokenized.push_str(&message_format[rest..open]);
                tokenized.push_str("%s");
                rest = end + 1;
                search = end + 1;
            }
            None => search = open + 1,
        }
    }
    tokenized.push_str(&message_format[rest..]);
    (tokens, tokenized)
}

/// `[text, markdown]` of one token split into word parts (`["user", "name"]`); `None` when the
/// first part is unknown, which makes the whole template a formatting error.
pub fn value_of_token(
    action: &Action,
    event: &PluginEvent,
    person: Option<&Person>,
    site_url: &str,
    webhook_type: WebhookType,
    parts: &[&str],
) -> Option<(String, String)> {
    let property = |name: &str| js::stringify(event.properties.as_ref().and_then(|properties| properties.get(name)));
    match parts.first().copied() {
        Some("user") => match parts.get(1).copied() {
            Some("name") => Some(user_details(event, person, site_url, webhook_type)),
            other => {
                let text = property(&format!("${}", other.unwrap_or("undefined")));
                Some((text.clone(), text))
            }
        },
        Some("action") => match parts.get(1).copied() {
            Some("name") => Some(action_details(action, site_url, webhook_type)),
            _ => Some((String::new(), String::new())),
        },
        Some("event") => {
            let text = match (parts.get(1).copied(), parts.get(2).copied()) {
                (Some("name"), _) => event.event.clone(),
                (Some("properties"), Some(name)) => property(name),
                _ => String::new(),
            };
            Some((text.clone(), text))
        }
        _ => None,
    }
}

/// `[text, markdown]` of the action's message (its `slack_message_format` or the default).
pub fn formatted_message(
    action: &Action,
    event: &PluginEvent,
    person: Option<&Person>,
    site_url: &str,
    webhook_type: WebhookType,
) -> (String, String) {
    let message_format = action.slack_message_format.as_deref().filter(|format| !format.is_empty());
    let (tokens, tokenized) = tokens(message_format.unwrap_or(DEFAULT_MESSAGE_FORMAT));
    let mut values = Vec::new();
    let mut markdown_values = Vec::new();
    for token in &tokens {
        let parts = word_parts(token);
        match value_of_token(action, event, person, site_url, webhook_type, &parts) {
            Some((value, markdown)) => {
                values.push(value);
                markdown_values.push(markdown);
            }
            None => {
                let (name, markdown) = action_details(action, site_url, webhook_type);
                return (
                    format!("⚠ Error: There are one or more formatting errors in the message template for action \"{name}\"."),
                    format!("*⚠ Error: There are one or more formatting errors in the message template for action \"{markdown}\".*"),
                );
            }
        }
    }
    (node_format(&tokenized, &values), node_format(&tokenized, &markdown_values))
}

/// Runs of `[A-Za-z0-9_]` (JavaScript's `\w` without the `u` flag).
fn word_parts(token: &str) -> Vec<&str> {
    token.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|part| !part.is_empty()).collect()
}

/// Node's `util.format(format, ...args)` for string arguments. With no arguments Node returns
/// the format untouched (even `%%`).
fn node_format(format: &str, args: &[String]) -> String {
    if args.is_empty() {
        return format.to_owned();
    }
    let mut out = String::new();
    let mut next = 0;
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(&specifier) = chars.peek() else {
            out.push('%');
            break;
        };
        if specifier == '%' {
            chars.next();
            out.push('%');
            continue;
        }
        if !matches!(specifier, 's' | 'd' | 'i' | 'f' | 'j' | 'o' | 'O' | 'c') || next >= args.len() {
            out.push('%');
            continue;
        }
        chars.next();
        let arg = &args[next];
        next += 1;
        let argument = Value::String(arg.clone());
        match specifier {
            's' => out.push_str(arg),
            'd' => out.push_str(&js::number_to_string(js::to_number(Some(&argument)))),
            'i' => out.push_str(&parse_int_text(arg)),
            'f' => out.push_str(&parse_float_text(arg)),
            'j' => out.push_str(&js::quote(arg)),
            'o' | 'O' => out.push_str(&inspect_string(arg)),
            _ => {}
        }
    }
    for arg in &args[next..] {
        out.push(' ');
        out.push_str(arg);
    }
    out
}

fn parse_int_text(text: &str) -> String {
    let trimmed = text.trim_start();
    let (sign, unsigned) = match trimmed.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", trimmed.strip_prefix('+').unwrap_or(trimmed)),
    };
    let digits: String = unsigned.chars().take_while(char::is_ascii_digit).collect();
    match digits.trim_start_matches('0') {
        _ if digits.is_empty() => "NaN".into(),
        "" => "0".into(),
        significant => format!("{sign}{significant}"),
    }
}

fn parse_float_text(text: &str) -> String {
    let trimmed = text.trim_start();
    // The longest prefix that parses as a decimal literal (or Infinity).
    let candidates = (1..=trimmed.len()).rev().filter(|end| trimmed.is_char_boundary(*end));
    for end in candidates {
        let prefix = &trimmed[..end];
        let number = js::string_to_number(prefix);
        if !number.is_nan() && !prefix.starts_with("0x") && !prefix.starts_with("0X") && !prefix.trim().is_empty() {
            return js::number_to_string(number);
        }
    }
    "NaN".into()
}

/// `util.inspect` of a string: single quotes unless the text contains them.
fn inspect_string(text: &str) -> String {
    let quote = if !text.contains('\'') {
        '\''
    } else if !text.contains('"') {
        '"'
    } else if !text.contains('`') {
        '`'
    } else {
        '\''
    };
    let mut out = String::from(quote);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The JSON body posted to the team's webhook (4-space indented, as the reference sends it).
pub fn webhook_message(
    webhook_type: WebhookType,
    action: &Action,
    event: &PluginEvent,
    person: Option<&Person>,
    site_url: &str,
) -> String {
    let (text, markdown) = formatted_message(action, event, person, site_url, webhook_type);
    let message = match webhook_type {
        WebhookType::Slack => json!({
            "text": text,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": markdown}}],
        }),
        _ => json!({ "text": markdown }),
    };
    js::json_stringify(&message, Some(4))
}

/// An `ee_hook` row (the columns the server uses).
#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    pub id: String,
    pub team_id: i64,
    pub user_id: i64,
    pub resource_id: Option<i64>,
    pub event: String,
    pub target: String,
}

/// The person as the reference's `fetchPerson` row (ISO `created_at`, the distinct-id columns).
fn person_payload(person: &Person, distinct_id: &str) -> Value {
    let mut row = Map::new();
    row.insert("id".into(), json!(person.id));
    row.insert("created_at".into(), json!(person.created_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()));
    row.insert("team_id".into(), json!(person.team_id));
    row.insert("properties".into(), Value::Object(person.properties.clone()));
    row.insert("properties_last_updated_at".into(), person.properties_last_updated_at.clone().unwrap_or(Value::Null));
    row.insert("properties_last_operation".into(), person.properties_last_operation.clone().unwrap_or(Value::Null));
    row.insert("is_user_id".into(), json!(person.is_user_id));
    row.insert("is_identified".into(), json!(person.is_identified));
    row.insert("uuid".into(), json!(person.uuid.to_string()));
    row.insert("persondistinctid__team_id".into(), json!(person.team_id));
    row.insert("persondistinctid__distinct_id".into(), json!(distinct_id));
    Value::Object(row)
}

/// The JSON body posted to a REST hook: `{hook: {id, event, target}, data: {...event, person}}`.
pub fn rest_hook_payload(hook: &Hook, event: &PluginEvent, person: Option<&Person>) -> String {
    let mut data = match serde_json::to_value(event) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    if let Some(person) = person {
        data.insert("person".into(), person_payload(person, &event.distinct_id));
    }
    let payload = json!({
        "hook": {"id": hook.id, "event": hook.event, "target": hook.target},
        "data": Value::Object(data),
    });
    js::json_stringify(&payload, Some(4))
}

/// Fires webhooks and REST hooks for matched actions.
pub struct HookCommander {
    postgres: PgPool,
    client: reqwest::Client,
}

impl HookCommander {
    pub fn new(postgres: PgPool) -> HookCommander {
        let client = reqwest::Client::builder().timeout(HOOK_REQUEST_TIMEOUT).build().unwrap_or_else(|error| {
            warn!(%error, "could not build the hooks HTTP client with a timeout; using the default client");
            reqwest::Client::new()
        });
        HookCommander { postgres, client }
    }

    /// Starts firing the hooks for `matches` on a separate task and returns at once (`None` when
    /// there is nothing to fire). `team` is the event's team; `organization` its organization
    /// (REST hooks need its `zapier` feature; without it only webhooks fire). Await the handle
    /// only in tests.
    pub fn find_and_fire_hooks(
        self: &Arc<Self>,
        event: &PluginEvent,
        person: Option<&Person>,
        site_url: &str,
        team: &Team,
        organization: Option<&Organization>,
        matches: &[Arc<Action>],
    ) -> Option<JoinHandle<()>> {
        if matches.is_empty() {
            return None;
        }
        let webhook_url = team.slack_incoming_webhook.clone().filter(|url| !url.is_empty());
        let zapier =
            organization.is_some_and(|organization| organization.available_features.iter().any(|f| f == "zapier"));
        if organization.is_none() {
            warn!(team_id = team.id, "organization of the team not found; REST hooks skipped");
        }
        let slack_actions: Vec<Arc<Action>> = matches.iter().filter(|action| action.post_to_slack).cloned().collect();
        if (webhook_url.is_none() || slack_actions.is_empty()) && !zapier {
            return None;
        }
        let commander = Arc::clone(self);
        let event = event.clone();
        let person = person.cloned();
        let site_url = site_url.to_owned();
        let team_id = i64::from(team.id);
        let matches = matches.to_vec();
        Some(tokio::spawn(async move {
            if let Some(webhook_url) = webhook_url {
                let posts = slack_actions
                    .iter()
                    .map(|action| commander.post_webhook(&webhook_url, action, &event, person.as_ref(), &site_url));
                futures::future::join_all(posts).await;
            }
            if zapier {
                commander.fire_rest_hooks(team_id, &matches, &event, person.as_ref()).await;
            }
        }))
    }

    async fn post_webhook(
        &self,
        webhook_url: &str,
        action: &Action,
        event: &PluginEvent,
        person: Option<&Person>,
        site_url: &str,
    ) {
        let body = webhook_message(determine_webhook_type(webhook_url), action, event, person, site_url);
        match self.post_json(webhook_url, body).await {
            Ok(_) => {
                crate::metrics::catalog::hook_fired(false);
                debug!(action_id = action.id, "webhook fired");
            }
            Err(error) => warn!(%error, action_id = action.id, "webhook request failed"),
        }
    }

    async fn fire_rest_hooks(
        &self,
        team_id: i64,
        matches: &[Arc<Action>],
        event: &PluginEvent,
        person: Option<&Person>,
    ) {
        let lookups =
            matches.iter().map(|action| self.fetch_relevant_rest_hooks(team_id, "action_performed", action.id));
        let mut hooks = Vec::new();
        for result in futures::future::join_all(lookups).await {
            match result {
                Ok(found) => hooks.extend(found),
                Err(error) => warn!(%error, team_id, "fetching REST hooks failed"),
            }
        }
        let posts = hooks.iter().map(|hook| self.post_rest_hook(hook, event, person));
        futures::future::join_all(posts).await;
    }

    async fn fetch_relevant_rest_hooks(
        &self,
        team_id: i64,
        event: &str,
        resource_id: i64,
    ) -> Result<Vec<Hook>, sqlx::Error> {
        crate::metrics::catalog::postgres(
            "fetchRelevantRestHooks",
            crate::db::actions::fetch_rest_hooks(&self.postgres, team_id, event, resource_id),
        )
        .await
    }

    async fn post_rest_hook(&self, hook: &Hook, event: &PluginEvent, person: Option<&Person>) {
        let body = rest_hook_payload(hook, event, person);
        match self.post_json(&hook.target, body).await {
            Ok(status) if status == reqwest::StatusCode::GONE => {
                // The subscriber is gone on Zapier's side: forget the hook on ours.
                if let Err(error) = crate::metrics::catalog::postgres(
                    "deleteRestHook",
                    crate::db::actions::delete_rest_hook(&self.postgres, &hook.id),
                )
                .await
                {
                    warn!(%error, hook_id = hook.id, "deleting a gone REST hook failed");
                } else {
                    crate::metrics::catalog::hook_fired(true);
                }
            }
            Ok(_) => {
                crate::metrics::catalog::hook_fired(true);
                debug!(hook_id = hook.id, "REST hook fired");
            }
            Err(error) => warn!(%error, hook_id = hook.id, "REST hook request failed"),
        }
    }

    async fn post_json(&self, url: &str, body: String) -> Result<reqwest::StatusCode, reqwest::Error> {
        let response = self.client.post(url).header("Content-Type", "application/json").body(body).send().await?;
        Ok(response.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_javascript_global_matching() {
        assert_eq!(tokens("[a[b] and []"), (vec!["a[b".to_string(), String::new()], "%s and %s".to_string()));
        assert_eq!(tokens("[a[]"), (vec!["a[".to_string(), String::new()], "%s".to_string()));
        assert_eq!(tokens("x [a\nb] [c]"), (vec!["c".to_string()], "x [a\nb] %s".to_string()));
        assert_eq!(tokens("no tokens"), (vec![], "no tokens".to_string()));
    }

    #[test]
    fn node_format_specifiers() {
        let args = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        assert_eq!(node_format("%s and %s", &args(&["a"])), "a and %s");
        assert_eq!(node_format("%s", &args(&["a", "b"])), "a b");
        assert_eq!(node_format("100%% %d %i %j", &args(&["2.5", "7px", "q"])), "100% 2.5 7 \"q\"");
        assert_eq!(node_format("50% off %s", &args(&["now"])), "50% off now");
        assert_eq!(node_format("%o", &args(&["it's"])), "\"it's\"");
        assert_eq!(node_format("100%% %s", &[]), "100%% %s");
    }
}
