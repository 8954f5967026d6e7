//! Differential check of webhook message formatting against the reference's
//! `getFormattedMessage` run in Node: 300 recorded cases of random templates (known and unknown
//! tokens, brackets across lines, `util.format` specifiers in the literal text), events with
//! properties of every JSON type, persons with and without (odd) emails, Slack/Teams/Discord.

use plugin_server::event::PluginEvent;
use plugin_server::ingestion::actions::{formatted_message, Action, WebhookType};
use plugin_server::model::Person;
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Deserialize)]
struct RecordedAction {
    id: i64,
    name: Option<String>,
    slack_message_format: String,
}

#[derive(Deserialize)]
struct Case {
    action: RecordedAction,
    event: Value,
    person: Option<Value>,
    #[serde(rename = "siteUrl")]
    site_url: String,
    #[serde(rename = "webhookType")]
    webhook_type: String,
    text: String,
    markdown: String,
}

fn action(recorded: &RecordedAction) -> Action {
    Action {
        id: recorded.id,
        team_id: 2,
        name: recorded.name.clone(),
        post_to_slack: true,
        slack_message_format: Some(recorded.slack_message_format.clone()),
        ..Action::default()
    }
}

fn person(properties: Map<String, Value>) -> Person {
    Person {
        id: 1,
        created_at: chrono::DateTime::from_timestamp(0, 0).expect("time"),
        properties,
        properties_last_updated_at: None,
        properties_last_operation: None,
        team_id: 2,
        is_user_id: None,
        is_identified: false,
        uuid: uuid::Uuid::nil(),
    }
}

#[test]
fn formatted_messages_agree_with_the_reference() {
    let cases: Vec<Case> =
        serde_json::from_str(include_str!("actions_support/message_cases.json")).expect("recorded cases");
    assert_eq!(cases.len(), 300);
    let mut mismatches = Vec::new();
    for case in &cases {
        let mut event = case.event.clone();
        for (key, value) in [("team_id", json!(2)), ("now", json!("2021-10-01T00:00:00.000Z"))] {
            event[key] = value;
        }
        let event: PluginEvent = serde_json::from_value(event).expect("event");
        let person = case
            .person
            .as_ref()
            .map(|recorded| person(recorded.get("properties").and_then(Value::as_object).cloned().unwrap_or_default()));
        let webhook_type = match case.webhook_type.as_str() {
            "slack" => WebhookType::Slack,
            "discord" => WebhookType::Discord,
            _ => WebhookType::Teams,
        };
        let got = formatted_message(&action(&case.action), &event, person.as_ref(), &case.site_url, webhook_type);
        if got != (case.text.clone(), case.markdown.clone()) {
            mismatches.push(format!(
                "{:?} ({}): got {got:?}, expected {:?}",
                case.action.slack_message_format,
                case.webhook_type,
                (&case.text, &case.markdown)
            ));
        }
    }
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}
