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
use super::rows::{self, PluginConfig};
use super::vm::JsError;

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

/// The JSON stored in `posthog_pluginconfig.error`. `event`: `None` leaves the key out (the
/// reference's `undefined`), `Some(Value::Null)` stores `null`.
pub fn error_json(failure: &PluginFailure, time: DateTime<Utc>, event: Option<&Value>) -> Value {
    let mut json = Map::new();
    json.insert("message".into(), Value::String(failure.message().to_string()));
    json.insert("time".into(), Value::String(iso(time)));
    if let PluginFailure::Error(error) = failure {
        json.insert("name".into(), Value::String(error.name.clone()));
        json.insert("stack".into(), error.stack.clone().map(Value::String).unwrap_or(Value::Null));
        if let Some(event) = event {
            json.insert("event".into(), event.clone());
        }
    }
    Value::Object(json)
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
    if let Err(err) = rows::set_config_error(&services.hub.postgres, config.id, Some(&json)).await {
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
    if let Err(err) = rows::clear_config_error(&services.hub.postgres, config.id).await {
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
        error.stack = Some("stack".into());
        let json = error_json(&PluginFailure::Error(error), time, Some(&json!({"event": "$test"})));
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["message", "time", "name", "stack", "event"]);
        assert_eq!(json["name"], "IllegalOperationError");
        let without_event = error_json(&PluginFailure::named("Error", "x"), time, None);
        assert!(without_event.get("event").is_none());
    }
}
