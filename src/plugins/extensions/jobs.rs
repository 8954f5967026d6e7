//! `meta.jobs.<name>(payload).runNow() / runIn(duration, unit) / runAt(date)`: the job payload
//! (the reference's `EnqueuedJob`) and its run time. Enqueuing is the job queue's business, behind
//! the [`JobEnqueuer`](super::JobEnqueuer) trait.

use super::super::js::now_ms;
use super::super::vm_boundary::JsError;

/// A plugin job as queued: the job queue's own type (one shape for every queue and producer).
pub use crate::jobs::job::EnqueuedJob;

/// When to run a job.
#[derive(Debug, Clone, PartialEq)]
pub enum RunAt {
    Now,
    /// `runIn(duration, unit)`.
    In(f64, String),
    /// `runAt(date)`: epoch milliseconds (`date.valueOf()`).
    At(f64),
}

impl RunAt {
    /// The due time in epoch milliseconds.
    pub fn timestamp(&self) -> Result<i64, JsError> {
        Ok(match self {
            RunAt::Now => now_ms(),
            RunAt::In(duration, unit) => now_ms() + finite(duration_to_ms(*duration, unit)?)?,
            RunAt::At(ms) => finite(*ms)?,
        })
    }
}

/// A time the job queue can store (the reference would enqueue `NaN` and never run it).
fn finite(ms: f64) -> Result<i64, JsError> {
    if ms.is_finite() {
        Ok(ms.round() as i64)
    } else {
        Err(JsError::new("Error", "Invalid job time: the duration or date is not a number"))
    }
}

/// The reference's `durationToMs`: a missing trailing `s` is added; **a month is 30 weeks**
/// (REF-BUG 15, kept: jobs already scheduled by plugins rely on it).
pub fn duration_to_ms(duration: f64, unit: &str) -> Result<f64, JsError> {
    let unit = if unit.ends_with('s') { unit.to_string() } else { format!("{unit}s") };
    const SECOND: f64 = 1000.0;
    const MINUTE: f64 = 60.0 * SECOND;
    const HOUR: f64 = 60.0 * MINUTE;
    const DAY: f64 = 24.0 * HOUR;
    const WEEK: f64 = 7.0 * DAY;
    let size = match unit.as_str() {
        "milliseconds" => 1.0,
        "seconds" => SECOND,
        "minutes" => MINUTE,
        "hours" => HOUR,
        "days" => DAY,
        "weeks" => WEEK,
        "months" => 30.0 * WEEK,
        "quarters" => 13.0 * WEEK,
        "years" => 365.0 * DAY,
        _ => return Err(JsError::new("Error", format!("Unknown time unit: {unit}"))),
    };
    Ok(size * duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_their_quirks() {
        assert_eq!(duration_to_ms(2.0, "second").unwrap(), 2000.0);
        assert_eq!(duration_to_ms(1.0, "months").unwrap(), 30.0 * 7.0 * 86_400_000.0);
        assert_eq!(duration_to_ms(1.0, "fortnight").unwrap_err().message, "Unknown time unit: fortnights");
    }

    #[test]
    fn serializes_like_the_reference() {
        let job = EnqueuedJob {
            job_type: "x".into(),
            payload: serde_json::json!({"a": 1}),
            timestamp: 1000,
            plugin_config_id: 39,
            plugin_config_team: 2,
        };
        assert_eq!(
            serde_json::to_string(&job).unwrap(),
            r#"{"type":"x","payload":{"a":1},"timestamp":1000,"pluginConfigId":39,"pluginConfigTeam":2}"#
        );
    }
}
