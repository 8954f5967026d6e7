//! Decoding the raw event messages consumed from Kafka (`KAFKA_CONSUMPTION_TOPIC`) and the fields
//! of a Celery task into a [`PluginEvent`], the reference's way.

use serde_json::{Map, Value};

use crate::event::PluginEvent;

/// Why a consumed Kafka value is not an event.
#[derive(Debug, thiserror::Error)]
pub enum RawEventError {
    #[error("message value is empty")]
    Empty,
    #[error("message value is not a JSON object: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("`data` is not a JSON-encoded object: {0}")]
    BadData(#[source] serde_json::Error),
    #[error("`data` is not a JSON-encoded object: expected a string, got {0}")]
    DataNotString(Value),
    #[error("`data` is not a JSON-encoded object: missing")]
    NoData,
    #[error("not a valid event: {0}")]
    BadEvent(#[source] serde_json::Error),
}

/// Decodes a consumed raw event message the reference's way: every field but `data`, overlaid by
/// the keys of the JSON-decoded `data` (data wins), then empty `site_url`/`ip` become absent and
/// `distinct_id` a string.
pub fn decode_raw_event(value: Option<&[u8]>) -> Result<PluginEvent, RawEventError> {
    let bytes = value.filter(|bytes| !bytes.is_empty()).ok_or(RawEventError::Empty)?;
    let mut outer: Map<String, Value> = serde_json::from_slice(bytes).map_err(RawEventError::NotJson)?;
    let data = match outer.shift_remove("data") {
        Some(Value::String(text)) => {
            serde_json::from_str::<Map<String, Value>>(&text).map_err(RawEventError::BadData)?
        }
        Some(other) => return Err(RawEventError::DataNotString(other)),
        None => return Err(RawEventError::NoData),
    };
    outer.extend(data);
    for key in ["site_url", "ip"] {
        if outer.get(key).is_some_and(is_js_falsy) {
            outer.insert(key.into(), Value::Null);
        }
    }
    plugin_event_from_fields(outer).map_err(RawEventError::BadEvent)
}

fn is_js_falsy(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(flag) => !flag,
        Value::String(text) => text.is_empty(),
        Value::Number(number) => number.as_f64() == Some(0.0),
        _ => false,
    }
}

/// Builds a `PluginEvent` from merged fields. `PluginEvent.site_url` is a plain string, so a null
/// `site_url` (the reference keeps `null`) becomes empty.
pub(crate) fn plugin_event_from_fields(mut fields: Map<String, Value>) -> Result<PluginEvent, serde_json::Error> {
    if fields.get("site_url").is_some_and(Value::is_null) {
        fields.insert("site_url".into(), Value::String(String::new()));
    }
    if fields.get("sent_at").is_some_and(|value| !value.is_string()) {
        // `sent_at` is only ever an ISO string; anything else is dropped rather than failing the event.
        fields.shift_remove("sent_at");
    }
    PluginEvent::from_fields(fields)
}
