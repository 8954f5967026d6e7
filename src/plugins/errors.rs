//! Recording plugin errors the way the reference's `processError` does: the error JSON
//! (`{message, time}` for plain messages, `{message, time, name, stack, event}` for error objects)
//! goes to `posthog_pluginconfig.error`, and a PLUGIN/ERROR log entry carries the message with the
//! same time. Also the errors this module's callers return (`PluginsError`).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use thiserror::Error;
use tracing::warn;

use super::extensions::PluginServices;
use super::js::iso;
use super::log_entries::{LogSource, LogType, PluginLogEntry};
use super::rows::PluginConfig;
use super::vm_boundary::{JsError, Thrown};

/// Errors of the plugin orchestration itself (not of plugin code).
#[derive(Debug, Error)]
pub enum PluginsError {
    #[error("could not read plugins from Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// What went wrong with a plugin: a bare message (loading problems) or a JavaScript error.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginFailure {
    Message(String),
    Error(JsError),
}

impl PluginFailure {
    pub fn message(&self) -> &str {
        match self {
            PluginFailure::Message(message) => message,
            PluginFailure::Error(error) => &error.message,
        }
    }

    /// A JavaScript-like error with the given name (`Error`, `IllegalOperationError`, …).
    pub fn named(name: &str, message: impl Into<String>) -> PluginFailure {
        PluginFailure::Error(JsError::new(name, message))
    }
}

impl From<JsError> for PluginFailure {
    fn from(error: JsError) -> Self {
        PluginFailure::Error(error)
    }
}

/// The JSON stored in `posthog_pluginconfig.error`, as the reference's `processError` builds it:
/// a message (or a thrown string) gives `{message, time}`; a thrown object gives
/// `{message, time, name, stack, event}` with what JSON.stringify drops (an `undefined` name,
/// stack or event) left out. `event`: `None` leaves the key out (the reference's `undefined`: tasks,
/// jobs, teardown), `Some(Value::Null)` stores `null`.
///
/// The stack starts with V8's `Name: message` line, which QuickJS leaves out of `error.stack`; the
/// frames below it are QuickJS's (see the README's differences). A thrown number or boolean keeps
/// its `String()` as the message (the reference stores none, and its log entry then fails).
pub fn error_json(failure: &PluginFailure, time: DateTime<Utc>, event: Option<&Value>) -> Value {
    let mut json = Map::new();
    json.insert("message".into(), Value::String(failure.message().to_string()));
    json.insert("time".into(), Value::String(iso(time)));
    if let PluginFailure::Error(error) = failure {
        if error.thrown == Thrown::String {
            return Value::Object(json);
        }
        if !error.name.is_empty() {
            json.insert("name".into(), Value::String(error.name.clone()));
        }
        if let Some(stack) = &error.stack {
            json.insert("stack".into(), Value::String(v8_stack(error, stack)));
        }
        if let Some(event) = event {
            json.insert("event".into(), event.clone());
        }
    }
    Value::Object(json)
}

/// V8's `error.stack`: the `String(error)` line, then the frames.
fn v8_stack(error: &JsError, frames: &str) -> String {
    let header = match (error.name.is_empty(), error.message.is_empty()) {
        (true, _) => error.message.clone(),
        (false, true) => error.name.clone(),
        (false, false) => format!("{}: {}", error.name, error.message),
    };
    // Already headed (errors built by the sandbox in V8's form, e.g. ERR_INVALID_URL).
    if !frames.is_empty() && !frames.starts_with(char::is_whitespace) {
        return frames.to_string();
    }
    format!("{header}\n{}", frames.trim_end_matches('\n'))
}

/// Records `failure` for `config`: stores the error JSON and queues the PLUGIN/ERROR log entry.
/// Database problems are logged, never returned: error recording must not fail the caller.
pub async fn process_error(
    services: &PluginServices,
    config: &PluginConfig,
    failure: &PluginFailure,
    event: Option<&Value>,
) {
    let time = Utc::now();
    let json = error_json(failure, time, event);
    if let Err(err) = services.records.set_config_error(config.id, Some(&json)).await {
        warn!(plugin_config_id = config.id, error = %err, "could not store plugin config error");
    }
    services
        .logs
        .queue(PluginLogEntry::new(
            config,
            LogSource::Plugin,
            LogType::Error,
            failure.message().to_string(),
            services.hub.instance_id,
            Some(time),
        ))
        .await;
}

/// Clears a stored error after a successful load. The reference only clears an error the row
/// had when it was read; the conditional update also clears one recorded since (an earlier
/// attempt, or the previous VM's teardown) and writes nothing when there is none.
pub async fn clear_error(services: &PluginServices, config: &PluginConfig) {
    if let Err(err) = services.records.clear_config_error(config.id).await {
        warn!(plugin_config_id = config.id, error = %err, "could not clear plugin config error");
    }
}

/// Queues a SYSTEM log entry for `config`.
pub async fn system_log(services: &PluginServices, config: &PluginConfig, log_type: LogType, message: String) {
    services
        .logs
        .queue(PluginLogEntry::new(config, LogSource::System, log_type, message, services.hub.instance_id, None))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn string_errors_have_message_and_time_only() {
        let time = DateTime::parse_from_rfc3339("2021-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let json = error_json(&PluginFailure::Message("boom".into()), time, Some(&json!({"a": 1})));
        assert_eq!(json, json!({"message": "boom", "time": "2021-01-01T00:00:00.000Z"}));
    }

    #[test]
    fn error_objects_keep_name_stack_and_event() {
        let time = Utc::now();
        let mut error = JsError::new("IllegalOperationError", "Plugin tried to change event.team_id");
        error.stack = Some("    at f (index.ts:1:1)\n".into());
        let json = error_json(&PluginFailure::Error(error), time, Some(&json!({"event": "$test"})));
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["message", "time", "name", "stack", "event"]);
        assert_eq!(json["name"], "IllegalOperationError");
        assert_eq!(
            json["stack"],
            "IllegalOperationError: Plugin tried to change event.team_id\n    at f (index.ts:1:1)"
        );
        let without_event = error_json(&PluginFailure::named("Error", "x"), time, None);
        assert!(without_event.get("event").is_none());
        // No stack (a thrown plain object): none stored, as JSON.stringify drops `undefined`.
        assert!(without_event.get("stack").is_none());
        let mut thrown = JsError::new("", "just text");
        thrown.thrown = Thrown::String;
        let json = error_json(&PluginFailure::Error(thrown), time, Some(&json!({"event": "$test"})));
        assert_eq!(json.as_object().unwrap().keys().collect::<Vec<_>>(), ["message", "time"]);
    }
}
