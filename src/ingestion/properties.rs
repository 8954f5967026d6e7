//! Property rules of the capture path that need no database: event name sanitizing, illegal
//! distinct ids, the UTM / `$initial_*` augmentation, `$set` / `$set_once` application, and the
//! JavaScript value semantics (truthiness, `String(x)`, `!==`) those rules are written in.

use serde_json::{Map, Value};

use crate::event::Properties;
use crate::ingestion::elements::truncate_utf16;
use crate::js::to_js_string;

/// Longest event name kept, in UTF-16 code units (JavaScript `substr(0, 200)`).
pub const MAX_EVENT_NAME_LENGTH: usize = 200;

const CAMPAIGN_PARAMS: [&str; 6] = ["utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term", "gclid"];
const INITIAL_PARAMS: [&str; 7] =
    ["$browser", "$browser_version", "$device_type", "$current_url", "$os", "$referring_domain", "$referrer"];

const CASE_INSENSITIVE_ILLEGAL_IDS: [&str; 10] = [
    "anonymous",
    "guest",
    "distinctid",
    "distinct_id",
    "id",
    "not_authenticated",
    "email",
    "undefined",
    "true",
    "false",
];
const CASE_SENSITIVE_ILLEGAL_IDS: [&str; 6] = ["[object Object]", "NaN", "None", "none", "null", "0"];

/// An event name as stored: non-strings JSON-encoded, cut to 200 UTF-16 code units.
pub fn sanitize_event_name_value(name: &Value) -> String {
    match name {
        Value::String(text) => sanitize_event_name(text),
        other => sanitize_event_name(&other.to_string()),
    }
}

/// A string event name cut to 200 UTF-16 code units (never splitting a character: a surrogate pair
/// that would straddle the limit is dropped, where JavaScript would keep a lone surrogate).
pub fn sanitize_event_name(name: &str) -> String {
    truncate_utf16(name, MAX_EVENT_NAME_LENGTH)
}

/// Distinct ids that stem from client bugs; identify/alias is skipped for them (spec 20 §4).
pub fn is_distinct_id_illegal(id: &str) -> bool {
    if id.trim().is_empty() || CASE_SENSITIVE_ILLEGAL_IDS.contains(&id) {
        return true;
    }
    let lower = id.to_lowercase();
    CASE_INSENSITIVE_ILLEGAL_IDS.contains(&lower.as_str())
}

/// A value as node-postgres sends it as a text parameter: objects and arrays as JSON, everything
/// else as JavaScript's `String(x)`.
pub fn parameter_text(value: &Value) -> String {
    match value {
        Value::Array(_) | Value::Object(_) => value.to_string(),
        other => to_js_string(Some(other)),
    }
}

/// JavaScript `a !== b` for JSON values: objects and arrays are never identical to anything.
pub fn js_strictly_differs(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => false,
        (Value::Bool(x), Value::Bool(y)) => x != y,
        (Value::String(x), Value::String(y)) => x != y,
        (Value::Number(x), Value::Number(y)) => x.as_f64() != y.as_f64(),
        _ => true,
    }
}

/// `{...base, ...overlay}` where either side may be absent or not an object (ignored then).
pub fn merge_objects(base: Option<&Value>, overlay: &Properties) -> Value {
    let mut merged = match base {
        Some(Value::Object(object)) => object.clone(),
        _ => Map::new(),
    };
    for (key, value) in overlay {
        merged.insert(key.clone(), value.clone());
    }
    Value::Object(merged)
}

/// The entries the reference's `personInitialAndUTMProperties` sets on its copy of `properties`,
/// in order: `$set` with the campaign params added (overriding an explicit `$set`), `$set_once`
/// with campaign + initial params added as `$initial_<name without its first $>`. Presence means
/// the key exists, whatever its value.
pub fn initial_and_utm_entries(properties: &Properties) -> Vec<(String, Value)> {
    let mut campaign = Map::new();
    let mut initial = Map::new();
    for (key, value) in properties {
        let is_campaign = CAMPAIGN_PARAMS.contains(&key.as_str());
        if is_campaign {
            campaign.insert(key.clone(), value.clone());
        }
        if is_campaign || INITIAL_PARAMS.contains(&key.as_str()) {
            initial.insert(format!("$initial_{}", key.replacen('$', "", 1)), value.clone());
        }
    }
    let mut entries = Vec::new();
    if !campaign.is_empty() {
        entries.push(("$set".to_string(), merge_objects(properties.get("$set"), &campaign)));
    }
    if !initial.is_empty() {
        entries.push(("$set_once".to_string(), merge_objects(properties.get("$set_once"), &initial)));
    }
    entries
}

/// The reference's `personInitialAndUTMProperties`: a copy of `properties` with
/// [`initial_and_utm_entries`] set.
pub fn person_initial_and_utm_properties(properties: &Properties) -> Properties {
    let mut copy = properties.clone();
    copy.extend(initial_and_utm_entries(properties));
    copy
}

/// Entries set on a property map for a while, then undone: the map is the stored row's
/// properties while the row is written, and the event's again afterwards, where the reference
/// works on a copy of the event's properties (no copy of the whole map here).
#[derive(Debug, Default)]
pub struct Replaced(Vec<(String, Option<Value>)>);

impl Replaced {
    /// Sets `key` (in place when it exists, else at the end, as on a JavaScript object) and
    /// remembers what was there.
    pub fn set(&mut self, properties: &mut Properties, key: String, value: Value) {
        let previous = properties.insert(key.clone(), value);
        self.0.push((key, previous));
    }

    /// Puts back what [`Replaced::set`] replaced, in reverse order: the same entries in the same
    /// order as before.
    pub fn restore(self, properties: &mut Properties) {
        for (key, previous) in self.0.into_iter().rev() {
            match previous {
                Some(value) => {
                    properties.insert(key, value);
                }
                None => {
                    properties.shift_remove(&key);
                }
            }
        }
    }
}

/// The person's properties after `$set_once` (only absent keys) then `$set` (keys whose value is
/// not strictly equal). Returns `None` when nothing changed.
pub fn apply_person_property_updates(
    current: &Properties,
    set: &Properties,
    set_once: &Properties,
) -> Option<Properties> {
    let mut updated = current.clone();
    for (key, value) in set_once {
        if !current.contains_key(key) {
            updated.insert(key.clone(), value.clone());
        }
    }
    for (key, value) in set {
        let differs = current.get(key).is_none_or(|existing| js_strictly_differs(existing, value));
        if differs {
            updated.insert(key.clone(), value.clone());
        }
    }
    // Deep equality, as the reference's `fast-deep-equal` (key order does not matter).
    if &updated == current {
        None
    } else {
        Some(updated)
    }
}

/// An object-valued property as a map; anything else counts as empty.
pub fn object_or_empty(value: Option<&Value>) -> Properties {
    match value {
        Some(Value::Object(object)) => object.clone(),
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Properties {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn event_names() {
        assert_eq!(sanitize_event_name_value(&json!({"event name": "as object"})), r#"{"event name":"as object"}"#);
        assert_eq!(sanitize_event_name_value(&json!(["event name", "a list"])), r#"["event name","a list"]"#);
        assert_eq!(sanitize_event_name(&"E".repeat(300)).len(), 200);
        assert_eq!(sanitize_event_name(&"💻".repeat(150)).chars().count(), 100);
    }

    #[test]
    fn illegal_ids() {
        for id in ["distinctId", "  ", "NaN", "undefined", "None", "0", "[object Object]", "GUEST", ""] {
            assert!(is_distinct_id_illegal(id), "{id}");
        }
        for id in ["Nan", "NONE", "1", "user@example.com"] {
            assert!(!is_distinct_id_illegal(id), "{id}");
        }
    }

    #[test]
    fn utm_and_initial() {
        let input = object(json!({
            "$browser": "Chrome", "$browser_version": false, "utm_medium": "twitter",
            "$set": {"utm_medium": "explicit", "a": 1}, "$initial_referrer_url": "x"
        }));
        let output = person_initial_and_utm_properties(&input);
        assert_eq!(output["$set"], json!({"utm_medium": "twitter", "a": 1}));
        assert_eq!(
            output["$set_once"],
            json!({"$initial_browser": "Chrome", "$initial_browser_version": false, "$initial_utm_medium": "twitter"})
        );
        assert!(!input.contains_key("$set_once"));
    }

    #[test]
    fn replaced_entries_are_put_back_in_place() {
        let original = object(json!({"a": 1, "$set": {"x": 1}, "utm_source": "s", "z": true}));
        let mut properties = original.clone();
        let mut replaced = Replaced::default();
        for (key, value) in initial_and_utm_entries(&properties) {
            replaced.set(&mut properties, key, value);
        }
        replaced.set(&mut properties, "$group_0".to_string(), json!("PostHog"));
        replaced.set(&mut properties, "$set".to_string(), json!("again"));
        // While set: the row's properties, as the reference's copy has them (new keys at the end).
        let keys: Vec<&str> = properties.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "$set", "utm_source", "z", "$set_once", "$group_0"]);
        replaced.restore(&mut properties);
        assert_eq!(properties, original);
        let keys: Vec<&str> = properties.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "$set", "utm_source", "z"]);
        assert_eq!(properties["$set"], json!({"x": 1}));
    }

    #[test]
    fn set_and_set_once() {
        let current = object(json!({"a": 1, "c": 1, "o": {"x": 1}}));
        let updated = apply_person_property_updates(
            &current,
            &object(json!({"a": 2, "b": "2b"})),
            &object(json!({"a": 9, "d": 4})),
        );
        assert_eq!(updated, Some(object(json!({"a": 2, "c": 1, "o": {"x": 1}, "b": "2b", "d": 4}))));
        assert_eq!(apply_person_property_updates(&current, &object(json!({"a": 1})), &object(json!({"c": 5}))), None);
        // Objects are never `===`, but an identical object leaves the properties deep-equal.
        assert_eq!(apply_person_property_updates(&current, &object(json!({"o": {"x": 1}})), &Map::new()), None);
    }

    #[test]
    fn parameter_texts() {
        assert_eq!(parameter_text(&json!(5.0)), "5");
        assert_eq!(parameter_text(&json!(2)), "2");
        assert_eq!(parameter_text(&json!(1.5)), "1.5");
        assert_eq!(parameter_text(&json!(true)), "true");
        assert_eq!(parameter_text(&json!({"a": 1})), r#"{"a":1}"#);
    }
}
