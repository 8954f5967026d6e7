//! The event as it travels between the queues, the plugins and the ingestion: the reference's
//! `PluginEvent` (from `@posthog/plugin-scaffold`). Plugins may add fields of their own; those are
//! kept in `extra` and survive every hop. Key order is preserved (serde_json `preserve_order`), so
//! JSON written out keeps the order JavaScript would give it.
//!
//! This module owns the shape only; what each field means is up to `ingestion`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// JSON object of properties.
pub type Properties = Map<String, Value>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginEvent {
    /// Always a string here; numbers from clients are converted (the reference's `String(id)`).
    #[serde(deserialize_with = "string_from_scalar")]
    pub distinct_id: String,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub site_url: String,
    pub team_id: i64,
    /// ISO timestamp of when PostHog received the event.
    pub now: String,
    /// Non-string names (clients have sent objects and arrays) arrive as their JSON text, which is
    /// what the reference stores for them.
    #[serde(deserialize_with = "string_or_json_text")]
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Milliseconds before `now` the event happened (used when there is no timestamp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
    #[serde(rename = "$set", default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Properties>,
    #[serde(rename = "$set_once", default, skip_serializing_if = "Option::is_none")]
    pub set_once: Option<Properties>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Fields outside the reference's type (plugins may set them).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn string_from_scalar<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(text) => Ok(text),
        Value::Number(number) => Ok(number.to_string()),
        Value::Bool(flag) => Ok(flag.to_string()),
        other => Err(serde::de::Error::custom(format!("distinct_id must be a string or number, got {other}"))),
    }
}

fn string_or_json_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(text) => text,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_distinct_ids_become_strings_and_unknown_fields_survive() {
        let event: PluginEvent = serde_json::from_str(
            r#"{"distinct_id": 42, "team_id": 2, "now": "2020-01-01T00:00:00.000Z", "event": "x", "custom": [1]}"#,
        )
        .unwrap();
        assert_eq!(event.distinct_id, "42");
        assert_eq!(event.extra["custom"], serde_json::json!([1]));
        let round_trip = serde_json::to_value(&event).unwrap();
        assert_eq!(round_trip["custom"], serde_json::json!([1]));
        assert!(round_trip.get("sent_at").is_none());
    }

    #[test]
    fn non_string_event_names_become_their_json_text() {
        let event: PluginEvent = serde_json::from_str(
            r#"{"distinct_id": "a", "team_id": 2, "now": "2020-01-01T00:00:00.000Z", "event": {"nested": [1]}}"#,
        )
        .unwrap();
        assert_eq!(event.event, r#"{"nested":[1]}"#);
    }
}
