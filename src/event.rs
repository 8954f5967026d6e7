//! The event as it travels between the queues, the plugins and the ingestion: the reference's
//! `PluginEvent` (from `@posthog/plugin-scaffold`). Plugins may add fields of their own; those are
//! kept in `extra` and survive every hop. Key order is preserved (serde_json `preserve_order`), so
//! JSON written out keeps the order JavaScript would give it.
//!
//! Decoding is JavaScript's: the reference reads most fields without a type check, so any JSON
//! type is accepted where its code accepts it (Celery args and `data`, Kafka messages, and what a
//! plugin's `processEvent` returns all decode here). A value is refused only where the reference
//! fails on it too; such messages are dead-lettered with the reason. Per field, what the reference
//! does with each JSON type (`"…"` string, `1` number, `null`/absent, `{}` object, `[]` array):
//!
//! | Field | string | number | null / absent | object | array |
//! |---|---|---|---|---|---|
//! | `distinct_id` | kept | `String(n)` (`42.0` → `"42"`) | `String(undefined)`: stored under `"undefined"` | `"[object Object]"` | `String(array)` (`"1,2"`) |
//! | `ip` | `$ip` when is_truthy | `$ip` as the number when non-zero | no `$ip` | `$ip` as sent | `$ip` as sent |
//! | `site_url` | kept (hook links) | `String(n)` | empty (*the reference renders `null`*) | `"[object Object]"` | `String(array)` |
//! | `team_id` | digits → that team (*the reference then runs no plugins*) | integer (`2.0` is 2); else refused: no such team | refused: no team | refused | refused |
//! | `now` | `DateTime.fromISO` | `String(n)`, unparseable → server time | unparseable → server time | `"[object Object]"` → server time | `String(array)` |
//! | `sent_at` | ISO time for the skew correction | ignored (*the reference: invalid time*) | none | ignored | ignored |
//! | `event` | kept | JSON text (`sanitizeEventName`) | `"null"` / absent refused (*`undefined.substr` throws*) | JSON text | JSON text |
//! | `uuid` | must be a UUID (`Not a valid UUID`) | refused (the reference fails the same) | a fresh UUIDT in Celery; absent → `Not a valid UUID: "undefined"` | refused | refused |
//! | `properties` | spread by index (`{"0": "a"}`) | `{}` | `{}` (`?? {}`) | kept | spread by index |
//! | `timestamp` | `new Date(text)` with `sent_at`, ISO without (`ingestion::timestamp`) | epoch ms (`new Date(n)`); 0 falls to `offset` | falls to `offset` | invalid → `now` | `new Date(String(array))` |
//! | `offset` | `Number(text)` ms (`"2000"`); not numeric → `now` | ms before `now`; 0 ignored | ignored | `now` (*luxon throws*) | `Number(String(array))` |
//! | `$set`, `$set_once` | spread by index | is_truthy → `{}`; 0 ignored | ignored | merged into `properties` | spread by index |
//!
//! Where the reference produces an invalid time and then fails the insert (a number timestamp
//! without `sent_at`, an unparseable timestamp, a non-numeric offset) the event is kept with the
//! time the client meant, else `now`; the README lists these differences.
//!
//! This module owns the shape and its decoding; what each field means is up to `ingestion`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::js::{is_truthy, string_of};

/// JSON object of properties.
pub type Properties = Map<String, Value>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginEvent {
    /// Always a string here: the reference's `sanitizeEvent` (`distinct_id?.toString()`) and
    /// `String(event.distinct_id)` at ingestion, so `42` → `"42"`, an absent or null id →
    /// `"undefined"` (the reference stores such events under that id; so do we).
    #[serde(default = "undefined_text", deserialize_with = "js_string")]
    pub distinct_id: String,
    /// Kept as sent: only a is_truthy value becomes `$ip` (any JSON type, as the reference).
    #[serde(default)]
    pub ip: Option<Value>,
    /// `String(site_url)` for non-strings (the reference's template strings); null is empty.
    #[serde(default, deserialize_with = "js_string_or_empty")]
    pub site_url: String,
    #[serde(deserialize_with = "team_id")]
    pub team_id: i64,
    /// ISO timestamp of when PostHog received the event (non-strings as `String(value)`).
    #[serde(default, deserialize_with = "js_string_or_empty")]
    pub now: String,
    /// Non-string names (clients have sent objects and arrays) arrive as their JSON text, which is
    /// what the reference stores for them.
    #[serde(deserialize_with = "string_or_json_text")]
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    /// `data.properties ?? {}` spread as the reference's code does: a non-object becomes the
    /// object JavaScript's spread makes of it (strings and arrays by index, numbers `{}`).
    #[serde(default, deserialize_with = "spread_object", skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
    /// As sent (string, epoch-milliseconds number, …): `ingestion::timestamp` reads it as the
    /// reference's `new Date(timestamp)` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Value>,
    /// Milliseconds before `now` the event happened (used when there is no timestamp), as sent:
    /// a number or a numeric string (`Duration.fromMillis` takes `Number(offset)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<Value>,
    /// Falsy values are absent (the reference's `if (data['$set'])`); other non-objects are
    /// spread like objects.
    #[serde(
        rename = "$set",
        default,
        deserialize_with = "truthy_spread_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub set: Option<Properties>,
    #[serde(
        rename = "$set_once",
        default,
        deserialize_with = "truthy_spread_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub set_once: Option<Properties>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Fields outside the reference's type (plugins may set them).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn undefined_text() -> String {
    "undefined".to_string()
}

impl PluginEvent {
    /// The event an event's JSON object holds: the same result (and the same refusals) as
    /// deserialising it with serde, field by field with the same rules, but moving each value
    /// out of the object. Serde's `#[serde(flatten)]` (for `extra`) first buffers every value of
    /// the object into a copy of its own and then builds each field from that copy: two copies of
    /// every property of every event, on the way in and again on the way back from each plugin.
    pub fn from_fields(fields: Map<String, Value>) -> Result<PluginEvent, serde_json::Error> {
        use serde::de::Error as _;
        let mut event = PluginEvent {
            distinct_id: undefined_text(),
            ip: None,
            site_url: String::new(),
            team_id: 0,
            now: String::new(),
            event: String::new(),
            sent_at: None,
            properties: None,
            timestamp: None,
            offset: None,
            set: None,
            set_once: None,
            uuid: None,
            extra: Map::new(),
        };
        let (mut team, mut name) = (None, None);
        for (key, value) in fields {
            match key.as_str() {
                "distinct_id" => event.distinct_id = js_string_value(value),
                "ip" => event.ip = non_null(value),
                "site_url" => event.site_url = js_string_or_empty_value(value),
                "team_id" => team = Some(team_id_value(value).map_err(serde_json::Error::custom)?),
                "now" => event.now = js_string_or_empty_value(value),
                "event" => name = Some(string_or_json_text_value(value)),
                "sent_at" => event.sent_at = optional_string(value)?,
                "properties" => event.properties = spread_object_value(value),
                "timestamp" => event.timestamp = non_null(value),
                "offset" => event.offset = non_null(value),
                "$set" => event.set = truthy_spread_object_value(value),
                "$set_once" => event.set_once = truthy_spread_object_value(value),
                "uuid" => event.uuid = optional_string(value)?,
                _ => {
                    event.extra.insert(key, value);
                }
            }
        }
        event.team_id = team.ok_or_else(|| serde_json::Error::missing_field("team_id"))?;
        event.event = name.ok_or_else(|| serde_json::Error::missing_field("event"))?;
        Ok(event)
    }

    /// [`PluginEvent::from_fields`] for any JSON value (a non-object is refused as serde refuses it).
    pub fn from_value(value: Value) -> Result<PluginEvent, serde_json::Error> {
        match value {
            Value::Object(fields) => PluginEvent::from_fields(fields),
            other => serde_json::from_value(other),
        }
    }
}

/// `Option<Value>` as serde reads it: null is absent.
fn non_null(value: Value) -> Option<Value> {
    (!value.is_null()).then_some(value)
}

/// `Option<String>` as serde reads it: null is absent, a string is kept, anything else refused.
fn optional_string(value: Value) -> Result<Option<String>, serde_json::Error> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(text)),
        other => serde_json::from_value(other),
    }
}

/// `String(value)`, with null as `"undefined"` (`null?.toString()` is `undefined`).
fn js_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(js_string_value(Value::deserialize(deserializer)?))
}

fn js_string_value(value: Value) -> String {
    match value {
        Value::Null => undefined_text(),
        Value::String(text) => text,
        other => string_of(&other),
    }
}

fn js_string_or_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(js_string_or_empty_value(Value::deserialize(deserializer)?))
}

fn js_string_or_empty_value(value: Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text,
        other => string_of(&other),
    }
}

/// A team id: an integer, also written `2.0` or `"2"` (JSON and JavaScript do not tell `2.0` from
/// `2`; for a numeric string see the README's differences table).
fn team_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    team_id_value(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
}

/// The team id in `value`, else the refusal's text.
fn team_id_value(value: Value) -> Result<i64, String> {
    let number = match &value {
        Value::Number(number) => number.as_i64().or_else(|| number.as_f64().and_then(whole)),
        Value::String(text) => text.trim().parse::<f64>().ok().and_then(whole),
        _ => None,
    };
    number.ok_or_else(|| format!("No team found with ID {}", string_of(&value)))
}

fn whole(number: f64) -> Option<i64> {
    (number.fract() == 0.0 && number.abs() < 9.007_199_254_740_992e15).then_some(number as i64)
}

fn string_or_json_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(string_or_json_text_value(Value::deserialize(deserializer)?))
}

fn string_or_json_text_value(value: Value) -> String {
    match value {
        Value::String(text) => text,
        other => other.to_string(),
    }
}

/// What JavaScript's `{...value}` makes of a JSON value: objects as they are, strings and arrays
/// keyed by index, anything else `{}`.
pub fn js_spread(value: Value) -> Properties {
    match value {
        Value::Object(object) => object,
        Value::Array(items) => items.into_iter().enumerate().map(|(index, item)| (index.to_string(), item)).collect(),
        Value::String(text) => text
            .chars()
            .enumerate()
            .map(|(index, character)| (index.to_string(), Value::String(character.into())))
            .collect(),
        _ => Map::new(),
    }
}

fn spread_object<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Properties>, D::Error> {
    Ok(spread_object_value(Value::deserialize(deserializer)?))
}

fn spread_object_value(value: Value) -> Option<Properties> {
    match value {
        Value::Null => None,
        other => Some(js_spread(other)),
    }
}

fn truthy_spread_object<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Properties>, D::Error> {
    Ok(truthy_spread_object_value(Value::deserialize(deserializer)?))
}

fn truthy_spread_object_value(value: Value) -> Option<Properties> {
    is_truthy(&value).then(|| js_spread(value))
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

    #[test]
    fn from_fields_reads_every_object_as_serde_does() {
        let values = [
            serde_json::json!(null),
            serde_json::json!(0),
            serde_json::json!(2),
            serde_json::json!(2.0),
            serde_json::json!(-1.5),
            serde_json::json!(""),
            serde_json::json!("2"),
            serde_json::json!("text"),
            serde_json::json!(true),
            serde_json::json!([]),
            serde_json::json!(["a", 1]),
            serde_json::json!({}),
            serde_json::json!({"k": {"deep": [1, null]}}),
        ];
        let fields = [
            "distinct_id",
            "ip",
            "site_url",
            "team_id",
            "now",
            "event",
            "sent_at",
            "properties",
            "timestamp",
            "offset",
            "$set",
            "$set_once",
            "uuid",
            "set",
            "custom",
        ];
        let base = serde_json::json!({"team_id": 2, "event": "e", "distinct_id": "d", "extra_first": 1});
        let mut compared = 0;
        for field in fields {
            for value in &values {
                for present in [true, false] {
                    let mut object = base.as_object().cloned().unwrap_or_default();
                    if present {
                        object.insert(field.to_string(), value.clone());
                    } else {
                        object.shift_remove(field);
                    }
                    let by_serde = serde_json::from_value::<PluginEvent>(Value::Object(object.clone()));
                    let by_fields = PluginEvent::from_fields(object.clone());
                    match (by_serde, by_fields) {
                        (Ok(expected), Ok(found)) => assert_eq!(expected, found, "{object:?}"),
                        (Err(_), Err(_)) => {}
                        (expected, found) => panic!("{object:?}: serde {expected:?}, from_fields {found:?}"),
                    }
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, fields.len() * values.len() * 2);
        assert!(PluginEvent::from_value(serde_json::json!([1])).is_err());
    }
}
