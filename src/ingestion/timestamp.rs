//! Event time: lenient parsing of the timestamps clients send, the clock-skew correction
//! (`now + (timestamp − sent_at)`), `offset`, and the output formats each sink expects
//! (spec 20 §3). Everything is UTC with millisecond precision, as the reference's luxon values are.
//!
//! Owns no I/O; writers call the `format_*` functions.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, SubsecRound, Utc};

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

/// The event's time (spec 20 §3). An unparseable `timestamp` falls back to `now` (the reference
/// writes an invalid date and usually fails the insert; the spec recommends `now`).
pub fn handle_timestamp(
    timestamp: Option<&str>,
    offset_ms: Option<f64>,
    now: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    if let Some(text) = timestamp.filter(|text| !text.is_empty()) {
        let Some(parsed) = parse_timestamp(text) else {
            tracing::warn!(timestamp = text, "⚠️ Unparseable event timestamp, using now");
            return now;
        };
        return match sent_at {
            // The client's `sent_at` is taken to be the server's `now`: shift by the same skew.
            Some(sent_at) => now.checked_add_signed(parsed - sent_at).unwrap_or(now),
            None => parsed,
        };
    }
    match offset_ms {
        Some(offset) if offset != 0.0 && offset.is_finite() => {
            let micros = (offset * 1000.0).round();
            if micros.abs() > i64::MAX as f64 {
                return now;
            }
            truncate(now.checked_sub_signed(Duration::microseconds(micros as i64)).unwrap_or(now))
        }
        _ => now,
    }
}

/// `2020-01-01T12:00:05.050Z`: Postgres event rows, session recordings, Kafka `created_at`.
pub fn format_iso(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
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
        assert_eq!(format_iso(&at("2020-01-01T12:00:05.2Z")), "2020-01-01T12:00:05.200Z");
        assert_eq!(format_iso(&at("2020-01-01T14:00:05.200+02:00")), "2020-01-01T12:00:05.200Z");
        assert_eq!(format_iso(&at("2020-01-01T14:00:05+0200")), "2020-01-01T12:00:05.000Z");
        assert_eq!(format_iso(&at("2020-01-01T12:00:05.123456")), "2020-01-01T12:00:05.123Z");
        assert_eq!(format_iso(&at("2020-01-01 12:00:05")), "2020-01-01T12:00:05.000Z");
        assert_eq!(format_iso(&at("2020-01-01")), "2020-01-01T00:00:00.000Z");
        assert!(parse_timestamp("not a date").is_none());
        assert!(parse_timestamp("").is_none());
    }

    #[test]
    fn offset_and_skew_correction() {
        let now = at("2020-01-01T12:00:05.200Z");
        let with_offset = handle_timestamp(None, Some(150.0), now, None);
        assert_eq!(format_iso(&with_offset), "2020-01-01T12:00:05.050Z");
        assert_eq!(handle_timestamp(None, Some(150.0), now, Some(now)), with_offset);
        let skewed =
            handle_timestamp(Some("2020-01-02T14:00:05.200Z"), None, now, Some(at("2020-01-02T14:10:05.200Z")));
        assert_eq!(format_iso(&skewed), "2020-01-01T11:50:05.200Z");
        assert_eq!(
            format_iso(&handle_timestamp(Some("2020-01-02T14:00:05.200Z"), None, now, None)),
            "2020-01-02T14:00:05.200Z"
        );
        assert_eq!(handle_timestamp(Some("garbage"), Some(5.0), now, None), now);
        assert_eq!(handle_timestamp(None, None, now, None), now);
        assert_eq!(handle_timestamp(None, Some(f64::MAX), now, None), now);
    }

    #[test]
    fn output_formats() {
        let time = at("2020-01-01T12:00:05.050Z");
        assert_eq!(format_clickhouse(&time), "2020-01-01 12:00:05.050");
        assert_eq!(format_clickhouse_seconds(&time), "2020-01-01 12:00:05");
    }
}
