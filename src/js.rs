//! JavaScript value semantics over JSON values, the one place the server renders, compares and
//! converts values the way Node did: `String(x)`, `Number(x)` (and `Number.prototype.toString`),
//! truthiness, loose equality `==`, relational `<`/`>`, `JSON.stringify` (number formatting and
//! key order included), the reference's `stringify` helper, `Date.prototype.toISOString`,
//! `Date.now()`, `URLSearchParams` encoding and the reference's random tokens. Action matching,
//! hook messages, element hashing, timestamps and the plugin API must give byte-for-byte the same
//! strings and the same comparison results as Node did, so they all go through here.
//!
//! This module owns only value semantics over `serde_json::Value`; it knows nothing of events, and
//! anything needing a live JS object belongs to the runtime. `None` stands for JavaScript
//! `undefined` (a key that is absent).

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::{Map, Value};

/// The JavaScript `typeof` of a JSON value (`None` is `undefined`).
pub fn type_of(value: Option<&Value>) -> &'static str {
    match value {
        None => "undefined",
        Some(Value::Null) | Some(Value::Array(_)) | Some(Value::Object(_)) => "object",
        Some(Value::Bool(_)) => "boolean",
        Some(Value::Number(_)) => "number",
        Some(Value::String(_)) => "string",
    }
}

/// A JSON number as the f64 JavaScript would hold.
pub fn number_value(number: &serde_json::Number) -> f64 {
    number.as_f64().unwrap_or(f64::NAN)
}

/// `Number.prototype.toString()`: shortest round-trip digits, decimal notation for exponents in
/// [-7, 21), otherwise `1e+21` / `1.5e-7` style.
pub fn number_to_string(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if value == 0.0 {
        return "0".into();
    }
    let sign = if value < 0.0 { "-" } else { "" };
    // `{:e}` gives the shortest round-trip digits: "d.ddddde<exp>".
    let scientific = format!("{:e}", value.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let k = digits.len() as i32;
    // JavaScript's n: the position of the decimal point relative to the digits.
    let n = exponent + 1;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let exponent_sign = if n > 0 { "+" } else { "-" };
        let tail = if k == 1 { String::new() } else { format!(".{}", &digits[1..]) };
        format!("{}{tail}e{exponent_sign}{}", &digits[..1], (n - 1).abs())
    };
    format!("{sign}{body}")
}

/// How JavaScript prints a parsed JSON number (integers beyond 2^53 lose precision as in Node).
pub fn json_number_to_string(number: &serde_json::Number) -> String {
    const SAFE: u64 = 1 << 53;
    if let Some(integer) = number.as_i64() {
        if integer.unsigned_abs() <= SAFE {
            return integer.to_string();
        }
    } else if let Some(integer) = number.as_u64() {
        if integer <= SAFE {
            return integer.to_string();
        }
    }
    number_to_string(number_value(number))
}

/// `String(x)`.
pub fn to_js_string(value: Option<&Value>) -> String {
    match value {
        None => "undefined".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::Bool(flag)) => flag.to_string(),
        Some(Value::Number(number)) => json_number_to_string(number),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Null => String::new(),
                other => to_js_string(Some(other)),
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(_)) => "[object Object]".into(),
    }
}

/// `String(x)` of a present value.
pub fn string_of(value: &Value) -> String {
    to_js_string(Some(value))
}

/// JavaScript truthiness (`if (x)`).
pub fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(flag) => *flag,
        Value::Number(number) => {
            let number = number_value(number);
            number != 0.0 && !number.is_nan()
        }
        Value::String(text) => !text.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// `Number(x)`.
pub fn to_number(value: Option<&Value>) -> f64 {
    match value {
        None => f64::NAN,
        Some(Value::Null) => 0.0,
        Some(Value::Bool(flag)) => f64::from(u8::from(*flag)),
        Some(Value::Number(number)) => number_value(number),
        Some(Value::String(text)) => string_to_number(text),
        Some(array @ Value::Array(_)) => string_to_number(&to_js_string(Some(array))),
        Some(Value::Object(_)) => f64::NAN,
    }
}

fn is_js_whitespace(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{b}' | '\u{c}' | '\u{d}' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2028}' | '\u{2029}')
        | matches!(c, '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}' | '\u{feff}')
}

/// JavaScript's StringToNumber: trimmed; empty → 0; decimal literals, `Infinity`, and unsigned
/// `0x`/`0o`/`0b` integers; anything else is NaN.
pub fn string_to_number(text: &str) -> f64 {
    let trimmed = text.trim_matches(is_js_whitespace);
    if trimmed.is_empty() {
        return 0.0;
    }
    for (prefix, radix) in [("0x", 16), ("0X", 16), ("0o", 8), ("0O", 8), ("0b", 2), ("0B", 2)] {
        if let Some(digits) = trimmed.strip_prefix(prefix) {
            if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                return f64::NAN;
            }
            return digits
                .chars()
                .fold(0.0, |total, c| total * f64::from(radix) + f64::from(c.to_digit(radix).unwrap_or(0)));
        }
    }
    let (sign, unsigned) = match trimmed.as_bytes()[0] {
        b'-' => (-1.0, &trimmed[1..]),
        b'+' => (1.0, &trimmed[1..]),
        _ => (1.0, trimmed),
    };
    if unsigned == "Infinity" {
        return sign * f64::INFINITY;
    }
    if !is_decimal_literal(unsigned) {
        return f64::NAN;
    }
    unsigned.parse::<f64>().map(|parsed| sign * parsed).unwrap_or(f64::NAN)
}

/// `digits [. digits?] | . digits`, then an optional exponent (Rust's parser alone would also take
/// `inf`, `nan` and friends, which JavaScript rejects).
fn is_decimal_literal(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut index = 0;
    let integer_start = index;
    while index < bytes.len() && bytes[index].is_ascii_digit() {
        index += 1;
    }
    let mut has_digits = index > integer_start;
    if index < bytes.len() && bytes[index] == b'.' {
        index += 1;
        let fraction_start = index;
        while index < bytes.len() && bytes[index].is_ascii_digit() {
            index += 1;
        }
        has_digits |= index > fraction_start;
    }
    if !has_digits {
        return false;
    }
    if index < bytes.len() && (bytes[index] == b'e' || bytes[index] == b'E') {
        index += 1;
        if index < bytes.len() && (bytes[index] == b'+' || bytes[index] == b'-') {
            index += 1;
        }
        let exponent_start = index;
        while index < bytes.len() && bytes[index].is_ascii_digit() {
            index += 1;
        }
        if index == exponent_start {
            return false;
        }
    }
    index == bytes.len()
}

/// A primitive after JavaScript's ToPrimitive (arrays and objects become strings).
#[derive(Debug, Clone, PartialEq)]
enum Primitive {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    String(String),
}

fn to_primitive(value: Option<&Value>) -> Primitive {
    match value {
        None => Primitive::Undefined,
        Some(Value::Null) => Primitive::Null,
        Some(Value::Bool(flag)) => Primitive::Bool(*flag),
        Some(Value::Number(number)) => Primitive::Number(number_value(number)),
        Some(Value::String(text)) => Primitive::String(text.clone()),
        Some(other) => Primitive::String(to_js_string(Some(other))),
    }
}

fn primitive_to_number(primitive: &Primitive) -> f64 {
    match primitive {
        Primitive::Undefined => f64::NAN,
        Primitive::Null => 0.0,
        Primitive::Bool(flag) => f64::from(u8::from(*flag)),
        Primitive::Number(number) => *number,
        Primitive::String(text) => string_to_number(text),
    }
}

/// Loose equality `a == b`. Two arrays/objects are never equal: in JavaScript they would be two
/// distinct objects.
pub fn loose_equals(a: Option<&Value>, b: Option<&Value>) -> bool {
    let a_is_object = matches!(a, Some(Value::Array(_)) | Some(Value::Object(_)));
    let b_is_object = matches!(b, Some(Value::Array(_)) | Some(Value::Object(_)));
    if a_is_object && b_is_object {
        return false;
    }
    loose_equals_primitives(&to_primitive(a), &to_primitive(b))
}

fn loose_equals_primitives(a: &Primitive, b: &Primitive) -> bool {
    use Primitive::*;
    match (a, b) {
        (Undefined | Null, Undefined | Null) => true,
        (Undefined | Null, _) | (_, Undefined | Null) => false,
        (String(x), String(y)) => x == y,
        (Bool(x), Bool(y)) => x == y,
        (Number(x), Number(y)) => x == y,
        (Bool(_), _) => loose_equals_primitives(&Number(primitive_to_number(a)), b),
        (_, Bool(_)) => loose_equals_primitives(a, &Number(primitive_to_number(b))),
        (Number(x), String(_)) => *x == primitive_to_number(b),
        (String(_), Number(y)) => primitive_to_number(a) == *y,
    }
}

/// Relational comparison `a < b` (`Some(Less)`), as JavaScript evaluates it; `None` when the
/// comparison is undefined (NaN involved), which makes both `<` and `>` false.
pub fn compare(a: Option<&Value>, b: Option<&Value>) -> Option<Ordering> {
    let (a, b) = (to_primitive(a), to_primitive(b));
    if let (Primitive::String(x), Primitive::String(y)) = (&a, &b) {
        return Some(x.encode_utf16().cmp(y.encode_utf16()));
    }
    primitive_to_number(&a).partial_cmp(&primitive_to_number(&b))
}

/// The reference's `stringToBoolean(value, strict = true)`: `Some(true)` for y/yes/t/true/on/1,
/// `Some(false)` for n/no/f/false/off/0 (case-insensitive, on `String(value)`), else `None`.
pub fn string_to_boolean_strict(value: Option<&Value>) -> Option<bool> {
    let text = to_js_string(value).to_lowercase();
    match text.as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Some(true),
        "n" | "no" | "f" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// The reference's `stringify`: strings unchanged, `undefined` → `"undefined"`, else JSON.
pub fn stringify(value: Option<&Value>) -> String {
    match value {
        None => "undefined".into(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => json_stringify(other, None),
    }
}

/// `JSON.stringify(value, undefined, indent)`: JavaScript number formatting, integer-like keys
/// first (ascending, as JavaScript objects order them), then the others in insertion order.
pub fn json_stringify(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_json(&mut out, value, indent, 0);
    out
}

fn write_json(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
        Value::Number(number) => {
            let value = number_value(number);
            // JSON.stringify prints non-finite numbers as null.
            if value.is_finite() {
                out.push_str(&json_number_to_string(number))
            } else {
                out.push_str("null")
            }
        }
        Value::String(text) => out.push_str(&quote(text)),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                newline(out, indent, depth + 1);
                write_json(out, item, indent, depth + 1);
            }
            newline(out, indent, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (index, (key, item)) in js_key_order(map).into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                newline(out, indent, depth + 1);
                out.push_str(&quote(key));
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_json(out, item, indent, depth + 1);
            }
            newline(out, indent, depth);
            out.push('}');
        }
    }
}

fn newline(out: &mut String, indent: Option<usize>, depth: usize) {
    if let Some(width) = indent {
        out.push('\n');
        out.push_str(&" ".repeat(width * depth));
    }
}

/// A JSON string literal with JSON.stringify's escapes (serde_json escapes the same set).
pub fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

/// Keys in the order a JavaScript object enumerates them.
pub fn js_key_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut indexed: Vec<(u32, (&String, &Value))> = Vec::new();
    let mut named = Vec::new();
    for entry in map {
        match array_index(entry.0) {
            Some(index) => indexed.push((index, entry)),
            None => named.push(entry),
        }
    }
    indexed.sort_by_key(|(index, _)| *index);
    indexed.into_iter().map(|(_, entry)| entry).chain(named).collect()
}

/// Canonical array-index keys ("0", "17", not "017" nor "4294967295").
fn array_index(key: &str) -> Option<u32> {
    if key.is_empty() || (key.len() > 1 && key.starts_with('0')) || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse::<u32>().ok().filter(|index| *index != u32::MAX)
}

/// `Date.prototype.toISOString` of a UTC time: `2020-01-01T12:00:05.050Z` (Postgres event rows,
/// session recordings, Kafka `created_at`, the health ping, plugin events).
pub fn iso(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// `new Date().toISOString()`.
pub fn iso_now() -> String {
    iso(&Utc::now())
}

/// Epoch milliseconds now (`Date.now()`).
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A JS number as JSON: whole numbers as integers (so `3` stays `3`), NaN/Infinity as `null`
/// (what `JSON.stringify` gives).
pub fn number_to_json(number: f64) -> Value {
    if number.fract() == 0.0 && number.abs() < 9.007_199_254_740_992e15 {
        Value::from(number as i64)
    } else {
        serde_json::Number::from_f64(number).map(Value::Number).unwrap_or(Value::Null)
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
    fn numbers_print_like_javascript() {
        for (value, expected) in [
            (1.0, "1"),
            (-1.2, "-1.2"),
            (445.3, "445.3"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (1.5e-7, "1.5e-7"),
            (0.000001, "0.000001"),
            (123456789.125, "123456789.125"),
            (-0.0, "0"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(number_to_string(value), expected, "{value}");
        }
        assert_eq!(
            json_stringify(&json!({"b": 1.0, "2": [], "1": {}, "a": null}), None),
            r#"{"1":{},"2":[],"b":1,"a":null}"#
        );
    }

    #[test]
    fn string_to_number_follows_javascript() {
        assert_eq!(string_to_number(" 12 "), 12.0);
        assert_eq!(string_to_number(""), 0.0);
        assert_eq!(string_to_number("0x1A"), 26.0);
        assert_eq!(string_to_number("-Infinity"), f64::NEG_INFINITY);
        assert_eq!(string_to_number(".5e1"), 5.0);
        assert!(string_to_number("inf").is_nan());
        assert!(string_to_number("12px").is_nan());
        assert!(string_to_number("-0x1").is_nan());
    }

    #[test]
    fn loose_equality_follows_javascript() {
        let eq = |a: Value, b: Value| loose_equals(Some(&a), Some(&b));
        assert!(eq(json!(2), json!("2")));
        assert!(eq(json!("1"), json!(true)));
        assert!(!eq(json!(true), json!("true")));
        assert!(!eq(json!(null), json!(0)));
        assert!(eq(json!(["a"]), json!("a")));
        assert!(!eq(json!([1]), json!([1])));
        assert!(loose_equals(Some(&Value::Null), None));
    }

    #[test]
    fn pretty_printing_matches_json_stringify_with_four_spaces() {
        let value = json!({"text": "x", "blocks": [{"a": []}]});
        assert_eq!(
            json_stringify(&value, Some(4)),
            "{\n    \"text\": \"x\",\n    \"blocks\": [\n        {\n            \"a\": []\n        }\n    ]\n}"
        );
    }

    #[test]
    fn plugin_api_renderings() {
        assert_eq!(to_js_string(Some(&json!(987))), "987");
        assert_eq!(to_js_string(Some(&json!(1.5))), "1.5");
        assert_eq!(to_js_string(Some(&json!([1, null, "a"]))), "1,,a");
        assert_eq!(to_js_string(Some(&json!({"a": 1}))), "[object Object]");
        assert_eq!(number_to_string(100.0), "100");
        assert_eq!(number_to_string(1.5e-7), "1.5e-7");
        let pairs = vec![("token".to_string(), "THIS IS NOT A TOKEN FOR TEAM 2".to_string())];
        assert_eq!(form_urlencode(&pairs), "token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2");
        assert_eq!(form_urlencode(&[("a/b".into(), "é&".into())]), "a%2Fb=%C3%A9%26");
        let token = random_token();
        assert_eq!(token.len(), 43);
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
        let time = DateTime::parse_from_rfc3339("2020-01-01T12:00:05.05Z").map(|time| time.with_timezone(&Utc));
        assert_eq!(time.as_ref().map(iso).ok().as_deref(), Some("2020-01-01T12:00:05.050Z"));
    }
}
