//! Wall-clock boundaries for the reference's cron expressions (node-schedule, server local time).
//!
//! Every cron line the reference uses fires when the local time of day is a whole multiple of a
//! period: `* * * * *` (60 s), `*/5 * * * *` (300 s), `0 * * * *` (3600 s), `0 */4 * * *` (4 h),
//! `0 0 * * *` (one day), `*/5 * * * * *` (5 s). So one rule covers them all: the next instant after
//! `now` whose seconds-since-local-midnight is a multiple of the period, never later than the next
//! local midnight. Tests use short periods (one second) with the same rule.
//! This module owns only the arithmetic and the sleeping; what runs on a tick is the caller's.

use std::time::Duration;

use chrono::{DateTime, Local, NaiveDateTime, TimeZone, Utc};
use tokio_util::sync::CancellationToken;

/// `* * * * *`: every minute at second 0.
pub const EVERY_MINUTE: Duration = Duration::from_secs(60);
/// `0 * * * *`: every hour at minute 0.
pub const EVERY_HOUR: Duration = Duration::from_secs(3600);
/// `0 0 * * *`: every day at local midnight.
pub const EVERY_DAY: Duration = Duration::from_secs(86_400);

/// The first boundary strictly after `after` (see the module doc).
pub fn next_boundary(after: DateTime<Local>, period: Duration) -> DateTime<Local> {
    let period_ms = (period.as_millis() as i64).max(1);
    let naive = after.naive_local();
    let midnight = naive.date().and_hms_opt(0, 0, 0).unwrap_or(naive);
    let elapsed_ms = (naive - midnight).num_milliseconds();
    let next_naive = midnight + chrono::Duration::milliseconds((elapsed_ms / period_ms + 1) * period_ms);
    let next_midnight = midnight + chrono::Duration::days(1);
    to_local(next_naive.min(next_midnight), after)
}

/// A local wall-clock time as an instant. Times skipped by a DST change fall back to `fallback`
/// plus a second (the tick simply happens right away); repeated times take the earlier one.
fn to_local(naive: NaiveDateTime, fallback: DateTime<Local>) -> DateTime<Local> {
    Local.from_local_datetime(&naive).earliest().unwrap_or_else(|| fallback + chrono::Duration::seconds(1))
}

/// How long until `at` from the current wall clock (zero when already past).
pub fn until(at: DateTime<Local>) -> Duration {
    (at.with_timezone(&Utc) - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

/// Calls `tick` on every boundary of `period` until `shutdown`. A tick never fires twice for the
/// same boundary, even when the wall clock steps back; `tick` is awaited, so callers that must not
/// be delayed by their own work spawn it.
pub async fn run_on_boundaries<F, Fut>(period: Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut last_fired = Local::now();
    loop {
        let next = next_boundary(last_fired.max(Local::now()), period);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(until(next)) => {}
        }
        // The monotonic timer may wake a hair before the wall clock reaches `next`.
        let remaining = until(next);
        if !remaining.is_zero() {
            tokio::time::sleep(remaining).await;
        }
        last_fired = next;
        tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;

    fn local(h: u32, m: u32, s: u32, ms: u32) -> DateTime<Local> {
        let naive = chrono::NaiveDate::from_ymd_opt(2021, 3, 10).unwrap().and_hms_milli_opt(h, m, s, ms).unwrap();
        Local.from_local_datetime(&naive).earliest().unwrap()
    }

    #[test]
    fn minute_boundaries_are_second_zero() {
        let next = next_boundary(local(10, 15, 30, 500), EVERY_MINUTE);
        assert_eq!((next.hour(), next.minute(), next.second()), (10, 16, 0));
        let exact = next_boundary(local(10, 16, 0, 0), EVERY_MINUTE);
        assert_eq!((exact.hour(), exact.minute(), exact.second()), (10, 17, 0));
    }

    #[test]
    fn hour_day_and_four_hour_boundaries() {
        let hour = next_boundary(local(10, 15, 30, 0), EVERY_HOUR);
        assert_eq!((hour.hour(), hour.minute()), (11, 0));
        let four = next_boundary(local(10, 15, 30, 0), Duration::from_secs(4 * 3600));
        assert_eq!((four.hour(), four.minute()), (12, 0));
        let day = next_boundary(local(10, 15, 30, 0), EVERY_DAY);
        assert_eq!((day.hour(), day.minute(), day.second()), (0, 0, 0));
        assert_eq!(day.date_naive(), chrono::NaiveDate::from_ymd_opt(2021, 3, 11).unwrap());
    }

    #[test]
    fn periods_not_dividing_a_day_restart_at_midnight() {
        let next = next_boundary(local(23, 59, 59, 0), Duration::from_secs(7));
        assert_eq!((next.hour(), next.minute(), next.second()), (0, 0, 0));
    }
}
