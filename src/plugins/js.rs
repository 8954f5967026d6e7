//! JavaScript-compatible renderings the plugin API needs on the Rust side: `String(value)`,
//! `new Date().toISOString()`, truthiness, and the reference's random tokens. Only conversions of
//! plain JSON values live here; anything needing a live JS object belongs to the runtime.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde_json::Value;

/// `new Date().toISOString()`: milliseconds and a `Z`.
pub fn iso_now() -> String {
    iso(Utc::now())
}

/// `Date.prototype.toISOString` of a UTC time.
pub fn iso(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Epoch milliseconds now (`Date.now()`).
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// JavaScript's `Number.prototype.toString` for the common cases (integers print without a
/// fraction; other values use the shortest round-trip form, as JS does below 1e21).
pub fn number_string(number: f64) -> String {
    if number.is_nan() {
        "NaN".into()
    } else if number.is_infinite() {
        if number > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if number.fract() == 0.0 && number.abs() < 1e21 {
        format!("{}", number as i128)
    } else {
        format!("{number}")
    }
}

/// `String(value)` for a JSON value: objects render as `[object Object]`, arrays as their
/// comma-joined elements (nulls empty), as JavaScript does.
pub fn string_of(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.as_f64().map(number_string).unwrap_or_else(|| number.to_string()),
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .map(|item| if item.is_null() { String::new() } else { string_of(item) })
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(_) => "[object Object]".into(),
    }
}

/// JavaScript's `Number(value)` for a JSON value: strings as numeric literals after trimming
/// (empty is 0; `0x`/`0o`/`0b` prefixes; `Infinity`), arrays through their `String(value)`,
/// objects NaN, `null` 0.
pub fn to_number(value: &Value) -> f64 {
    match value {
        Value::Null => 0.0,
        Value::Bool(flag) => f64::from(u8::from(*flag)),
        Value::Number(number) => number.as_f64().unwrap_or(f64::NAN),
        Value::String(text) => string_to_number(text),
        Value::Array(_) => string_to_number(&string_of(value)),
        Value::Object(_) => f64::NAN,
    }
}

fn string_to_number(text: &str) -> f64 {
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if text.is_empty() {
        return 0.0;
    }
    for (prefix, radix) in [("0x", 16), ("0X", 16), ("0o", 8), ("0O", 8), ("0b", 2), ("0B", 2)] {
        if let Some(digits) = text.strip_prefix(prefix) {
            return u128::from_str_radix(digits, radix).map_or(f64::NAN, |n| n as f64);
        }
    }
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    if unsigned == "Infinity" {
        return if text.starts_with('-') { f64::NEG_INFINITY } else { f64::INFINITY };
    }
    // Rust also reads `inf`/`nan`; JavaScript's numeric literals are digits, `.` and an exponent.
    if !unsigned.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) {
        return f64::NAN;
    }
    text.parse::<f64>().unwrap_or(f64::NAN)
}

/// A JS number as JSON: whole numbers as integers (so `3` stays `3`), NaN/Infinity as `null`
/// (what `JSON.stringify` gives).
pub fn number_value(number: f64) -> Value {
    if number.fract() == 0.0 && number.abs() < 9.007_199_254_740_992e15 {
        Value::from(number as i64)
    } else {
        serde_json::Number::from_f64(number).map(Value::Number).unwrap_or(Value::Null)
    }
}

/// JavaScript truthiness of a JSON value.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(flag) => *flag,
        Value::Number(number) => number.as_f64().is_some_and(|n| n != 0.0 && !n.is_nan()),
        Value::String(text) => !text.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// A JSON number as an integer when it is one (Redis and SQL arguments).
pub fn as_integer(value: &Value) -> Option<i64> {
    let number = value.as_f64()?;
    (number.fract() == 0.0 && number.abs() < 9.007_199_254_740_992e15).then_some(number as i64)
}

const BASE62: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The reference's `generateRandomToken(32)`: a random base-62 string (32 random bytes give 43
/// base-62 digits).
pub fn random_token() -> String {
    let mut rng = rand::rng();
    (0..43).map(|_| BASE62[rng.random_range(0..BASE62.len())] as char).collect()
}

/// `application/x-www-form-urlencoded` encoding as `URLSearchParams.toString()` does it
/// (space → `+`; `*-._` and alphanumerics kept).
pub fn form_urlencode(pairs: &[(String, String)]) -> String {
    fn encode(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for byte in text.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(byte as char),
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{byte:02X}")),
            }
        }
        out
    }
    pairs.iter().map(|(key, value)| format!("{}={}", encode(key), encode(value))).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_like_javascript() {
        assert_eq!(string_of(&json!(987)), "987");
        assert_eq!(string_of(&json!(1.5)), "1.5");
        assert_eq!(string_of(&json!([1, null, "a"])), "1,,a");
        assert_eq!(string_of(&json!({"a": 1})), "[object Object]");
        assert_eq!(number_string(100.0), "100");
    }

    #[test]
    fn url_search_params_encoding() {
        let pairs = vec![("token".to_string(), "THIS IS NOT A TOKEN FOR TEAM 2".to_string())];
        assert_eq!(form_urlencode(&pairs), "token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2");
        assert_eq!(form_urlencode(&[("a/b".into(), "é&".into())]), "a%2Fb=%C3%A9%26");
    }

    #[test]
    fn tokens_are_base62() {
        let token = random_token();
        assert_eq!(token.len(), 43);
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
