//! Event time: lenient parsing of the timestamps clients send, the clock-skew correction
//! (`now + (timestamp − sent_at)`), `offset`, and the output formats each sink expects
//! (spec 20 §3). Everything is UTC with millisecond precision, as the reference's luxon values are.
//!
//! Owns no I/O; writers call the `format_*` functions.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, SubsecRound, Utc};
use serde_json::Value;

use crate::js::{self, is_truthy, string_of};

/// Parses a timestamp the way JavaScript's `Date` accepts ISO-like text: with or without an offset
/// (`Z`, `+02:00`, `+0200`), `T` or a space between date and time, optional seconds and fraction,
/// or a bare date. Text without an offset is server-local time, and the server runs in UTC.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(parsed) = DateTime::parse_from_rfc3339(text) {
        return Some(truncate(parsed.with_timezone(&Utc)));
    }
    let normalized = text.replacen(' ', "T", 1);
    const ZONED: [&str; 3] = ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z", "%Y-%m-%dT%H:%M:%S%.fZ"];
    for format in ZONED {
        if let Ok(parsed) = DateTime::parse_from_str(&normalized, format) {
            return Some(truncate(parsed.with_timezone(&Utc)));
        }
    }
    let without_zulu = normalized.strip_suffix('Z').unwrap_or(&normalized);
    const NAIVE: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"];
    for format in NAIVE {
        if let Ok(parsed) = NaiveDateTime::parse_from_str(without_zulu, format) {
            return Some(truncate(parsed.and_utc()));
        }
    }
    NaiveDate::parse_from_str(without_zulu, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|naive| naive.and_utc())
}

/// Millisecond precision, like every time value of the reference.
pub fn truncate(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(3)
}

/// The current time at millisecond precision.
pub fn now_ms() -> DateTime<Utc> {
    truncate(Utc::now())
}

/// `new Date(value)` of JavaScript for a JSON value: numbers are epoch milliseconds (`true` is 1),
/// strings are parsed (ISO forms, then RFC 2822), arrays as their `String(value)`; `None` for an
/// invalid date (objects, unparseable text, out of range).
pub fn js_date(value: &Value) -> Option<DateTime<Utc>> {
    let millis = match value {
        Value::Number(number) => number.as_f64()?,
        Value::Bool(flag) => f64::from(u8::from(*flag)),
        Value::String(text) => return parse_date_text(text),
        Value::Array(_) => return parse_date_text(&string_of(value)),
        Value::Null | Value::Object(_) => return None,
    };
    // TimeClip: at most 8.64e15 ms either side of the epoch, fractions dropped.
    if !millis.is_finite() || millis.abs() > 8.64e15 {
        return None;
    }
    DateTime::from_timestamp_millis(millis.trunc() as i64)
}

/// [`parse_timestamp`], then the other forms JavaScript's `Date` reads from clients: a bare year
/// or year-month (UTC), and RFC 2822 (`Mon, 01 Nov 2021 09:00:00 GMT`).
fn parse_date_text(text: &str) -> Option<DateTime<Utc>> {
    if let Some(parsed) = parse_timestamp(text) {
        return Some(parsed);
    }
    let text = text.trim();
    let date_only = match text.len() {
        4 => NaiveDate::parse_from_str(&format!("{text}-01-01"), "%Y-%m-%d").ok(),
        7 => NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").ok(),
        _ => None,
    };
    if let Some(date) = date_only {
        return date.and_hms_opt(0, 0, 0).map(|naive| naive.and_utc());
    }
    DateTime::parse_from_rfc2822(text).ok().map(|parsed| truncate(parsed.with_timezone(&Utc)))
}

/// The event's time (spec 20 §3), from the event's `timestamp` and `offset` as sent. A is_truthy
/// `timestamp` is read as `new Date(timestamp)` (so epoch milliseconds work); `offset` as
/// `Number(offset)` milliseconds (so `"2000"` works). Where the reference produces an invalid
/// date (an unparseable timestamp, a number timestamp without `sent_at`: luxon's `fromISO` of a
/// number; an offset `Duration.fromMillis` rejects) and then fails the insert, this gives the
/// time the client meant when there is one, else `now` (the spec's recommendation).
pub fn handle_timestamp(
    timestamp: Option<&Value>,
    offset: Option<&Value>,
    now: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    if let Some(value) = timestamp.filter(|value| is_truthy(value)) {
        let Some(parsed) = js_date(value) else {
            tracing::warn!(timestamp = %value, "⚠️ Unparseable event timestamp, using now");
            return now;
        };
        return match sent_at {
            // The client's `sent_at` is taken to be the server's `now`: shift by the same skew.
            Some(sent_at) => now.checked_add_signed(parsed - sent_at).unwrap_or(now),
            None => parsed,
        };
    }
    let Some(value) = offset.filter(|value| is_truthy(value)) else {
        return now;
    };
    let offset = match value {
        // luxon's `Duration.fromMillis` refuses booleans and whatever `Number()` makes NaN of.
        Value::Bool(_) | Value::Object(_) | Value::Null => f64::NAN,
        other => js::to_number(Some(other)),
    };
    if !offset.is_finite() {
        tracing::warn!(offset = %value, "⚠️ Invalid event offset, using now");
        return now;
    }
    let micros = (offset * 1000.0).round();
    if micros.abs() > i64::MAX as f64 {
        return now;
    }
    truncate(now.checked_sub_signed(Duration::microseconds(micros as i64)).unwrap_or(now))
}

/// `2020-01-01 12:00:05.050`: ClickHouse event and session recording timestamps.
pub fn format_clickhouse(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// `2020-01-01 12:00:05`: ClickHouse person and group `created_at`, dead-letter times.
pub fn format_clickhouse_seconds(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_timestamp(text).unwrap()
    }

    #[test]
    fn parses_the_shapes_clients_send() {
        assert_eq!(js::iso(&at("2020-01-01T12:00:05.2Z")), "2020-01-01T12:00:05.200Z");
        assert_eq!(js::iso(&at("2020-01-01T14:00:05.200+02:00")), "2020-01-01T12:00:05.200Z");
        assert_eq!(js::iso(&at("2020-01-01T14:00:05+0200")), "2020-01-01T12:00:05.000Z");
        assert_eq!(js::iso(&at("2020-01-01T12:00:05.123456")), "2020-01-01T12:00:05.123Z");
        assert_eq!(js::iso(&at("2020-01-01 12:00:05")), "2020-01-01T12:00:05.000Z");
        assert_eq!(js::iso(&at("2020-01-01")), "2020-01-01T00:00:00.000Z");
        assert!(parse_timestamp("not a date").is_none());
        assert!(parse_timestamp("").is_none());
    }

    #[test]
    fn offset_and_skew_correction() {
        let now = at("2020-01-01T12:00:05.200Z");
        let ms = |n: f64| Value::from(n);
        let text = |t: &str| Value::from(t);
        let with_offset = handle_timestamp(None, Some(&ms(150.0)), now, None);
        assert_eq!(js::iso(&with_offset), "2020-01-01T12:00:05.050Z");
        assert_eq!(handle_timestamp(None, Some(&ms(150.0)), now, Some(now)), with_offset);
        let skewed =
            handle_timestamp(Some(&text("2020-01-02T14:00:05.200Z")), None, now, Some(at("2020-01-02T14:10:05.200Z")));
        assert_eq!(js::iso(&skewed), "2020-01-01T11:50:05.200Z");
        assert_eq!(
            js::iso(&handle_timestamp(Some(&text("2020-01-02T14:00:05.200Z")), None, now, None)),
            "2020-01-02T14:00:05.200Z"
        );
        assert_eq!(handle_timestamp(Some(&text("garbage")), Some(&ms(5.0)), now, None), now);
        assert_eq!(handle_timestamp(None, None, now, None), now);
        assert_eq!(handle_timestamp(None, Some(&ms(f64::MAX)), now, None), now);
    }

    /// Each value checked against Node 20 + luxon 1.27 running the reference's `handleTimestamp`
    /// (now = sent_at = 2021-11-01T10:00:00.000Z).
    #[test]
    fn timestamp_and_offset_read_as_javascript_does() {
        let now = at("2021-11-01T10:00:00.000Z");
        let iso = |timestamp: Option<Value>, offset: Option<Value>, sent_at: Option<DateTime<Utc>>| {
            js::iso(&handle_timestamp(timestamp.as_ref(), offset.as_ref(), now, sent_at))
        };
        use serde_json::json;
        // `new Date(1635760798000)`, skew-corrected against sent_at.
        assert_eq!(iso(Some(json!(1635760798000_i64)), None, Some(now)), "2021-11-01T09:59:58.000Z");
        assert_eq!(iso(Some(json!(1635760798000_i64)), None, None), "2021-11-01T09:59:58.000Z");
        assert_eq!(iso(Some(json!(true)), None, Some(now)), "1970-01-01T00:00:00.001Z");
        assert_eq!(iso(Some(json!([2021])), None, Some(now)), "2021-01-01T00:00:00.000Z");
        assert_eq!(iso(Some(json!("2021-11-01 09:00:00")), None, Some(now)), "2021-11-01T09:00:00.000Z");
        assert_eq!(iso(Some(json!("Mon, 01 Nov 2021 09:00:00 GMT")), None, Some(now)), "2021-11-01T09:00:00.000Z");
        // Falsy timestamps fall through to the offset.
        assert_eq!(iso(Some(json!(0)), Some(json!("2000")), None), "2021-11-01T09:59:58.000Z");
        assert_eq!(iso(Some(json!("")), Some(json!([5])), None), "2021-11-01T09:59:59.995Z");
        assert_eq!(iso(None, Some(json!(" 20 ")), None), "2021-11-01T09:59:59.980Z");
        assert_eq!(iso(None, Some(json!(150.7)), None), "2021-11-01T09:59:59.849Z");
        assert_eq!(iso(None, Some(json!("1e3")), None), "2021-11-01T09:59:59.000Z");
        assert_eq!(iso(None, Some(json!("")), None), "2021-11-01T10:00:00.000Z");
        assert_eq!(iso(None, Some(json!(-5)), None), "2021-11-01T10:00:00.005Z");
        // The reference throws on these (the event is lost); here they mean `now`.
        for bad in [json!("abc"), json!(true), json!({})] {
            assert_eq!(iso(None, Some(bad), None), "2021-11-01T10:00:00.000Z");
        }
        assert_eq!(iso(Some(json!({})), None, Some(now)), "2021-11-01T10:00:00.000Z");
    }

    #[test]
    fn output_formats() {
        let time = at("2020-01-01T12:00:05.050Z");
        assert_eq!(format_clickhouse(&time), "2020-01-01 12:00:05.050");
        assert_eq!(format_clickhouse_seconds(&time), "2020-01-01 12:00:05");
    }
}
