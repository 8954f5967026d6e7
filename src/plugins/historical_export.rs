//! The historical export upgrade of plugins with `exportEvents` (reference 30 §10): the public
//! job `Export historical events` walks the team's stored events in 10-minute intervals, 100 at
//! a time, through the job `exportEventsFromTheBeginning`, handing each chunk to the plugin's
//! `exportEvents`, with progress in storage (`timestamp_cursor`, `min_timestamp`,
//! `max_timestamp`, `is_export_running`) so every thread and server shares one export.
//!
//! Events are read through `past_events`: `posthog_event` in the Postgres pipeline, ClickHouse's
//! `events` table in the Kafka pipeline.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use tracing::warn;

use super::extensions::{MetricOperation, PluginContext, RunAt};
use super::log_entries::LogType;
use super::past_events::PastEventsError;
use super::vm_boundary::{CallError, JsError, Method, PluginVm};
use crate::db;
use crate::js::{is_truthy, iso};

pub const INTERFACE_JOB: &str = "Export historical events";
pub const CHUNK_JOB: &str = "exportEventsFromTheBeginning";
const EVENTS_TIME_INTERVAL_MS: i64 = 10 * 60 * 1000;
const EVENTS_PER_RUN: i64 = 100;
const MAXIMUM_RETRIES: u64 = 15;
const TIMESTAMP_CURSOR_KEY: &str = "timestamp_cursor";
const MAX_UNIX_TIMESTAMP_KEY: &str = "max_timestamp";
const MIN_UNIX_TIMESTAMP_KEY: &str = "min_timestamp";
const EXPORT_RUNNING_KEY: &str = "is_export_running";

/// The team's first and last event time when the plugin was set up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimestampBoundaries {
    pub min: Option<DateTime<Utc>>,
    pub max: Option<DateTime<Utc>>,
}

/// Makes the job visible in PostHog's interface (once per plugin).
pub async fn add_public_job(pool: &PgPool, plugin_id: i32) {
    if let Err(err) = crate::metrics::catalog::postgres(
        "addPublicJobIfNotExists",
        db::plugins::add_public_job(pool, plugin_id, INTERFACE_JOB),
    )
    .await
    {
        warn!(plugin_id, error = %err, "could not add the historical export public job");
    }
}

/// One config's historical export.
pub struct HistoricalExport {
    vm: Arc<dyn PluginVm>,
    context: Arc<PluginContext>,
    /// Read at set-up; `None` when that read failed (read again when an export starts).
    boundaries: Option<TimestampBoundaries>,
    /// `min_timestamp` / `max_timestamp` as last read from storage.
    limits: Mutex<(Option<f64>, Option<f64>)>,
}

fn storage_error(error: JsError) -> CallError {
    error.into()
}

/// `new Date(value).getTime()` for a job payload's `dateFrom`/`dateTo`.
fn date_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_f64().filter(|n| n.is_finite()).map(|n| n as i64),
        Value::String(text) => {
            DateTime::parse_from_rfc3339(text).ok().map(|time| time.timestamp_millis()).or_else(|| {
                chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok().map(|date| {
                    date.and_hms_opt(0, 0, 0).map(|time| time.and_utc().timestamp_millis()).unwrap_or_default()
                })
            })
        }
        _ => None,
    }
}

fn iso_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms).single().map(|time| iso(&time)).unwrap_or_default()
}

impl HistoricalExport {
    pub fn new(
        vm: Arc<dyn PluginVm>,
        context: Arc<PluginContext>,
        boundaries: Option<TimestampBoundaries>,
    ) -> HistoricalExport {
        HistoricalExport { vm, context, boundaries, limits: Mutex::new((None, None)) }
    }

    async fn log(&self, message: String) {
        let instance = self.context.services.hub.instance_id;
        super::errors::system_log(
            &self.context.services,
            &self.context.config,
            LogType::Log,
            format!("({instance}) {message}"),
        )
        .await;
    }

    /// The `Export historical events` job.
    pub async fn start(&self, payload: Option<Value>) -> Result<Value, CallError> {
        let storage = self.context.storage();
        if is_truthy(&storage.get(EXPORT_RUNNING_KEY, Value::Bool(false)).await?) {
            return Ok(Value::Null);
        }
        storage.set(EXPORT_RUNNING_KEY, Some(&Value::Bool(true))).await?;
        for key in [TIMESTAMP_CURSOR_KEY, MAX_UNIX_TIMESTAMP_KEY, MIN_UNIX_TIMESTAMP_KEY] {
            storage.del(key).await?;
        }
        if let Ok(mut limits) = self.limits.lock() {
            *limits = (None, None);
        }
        if let Err(error) = self.init_timestamps_and_cursor(payload.as_ref()).await {
            // The reference leaves the running flag set here, which blocks every later export.
            storage.del(EXPORT_RUNNING_KEY).await?;
            return Err(error);
        }
        let next = json!({"retriesPerformedSoFar": 0, "incrementTimestampCursor": true});
        self.context.enqueue_job(CHUNK_JOB, next, RunAt::Now).await?;
        Ok(Value::Null)
    }

    async fn init_timestamps_and_cursor(&self, payload: Option<&Value>) -> Result<(), CallError> {
        let storage = self.context.storage();
        let boundaries = match self.boundaries {
            Some(boundaries) => boundaries,
            None => {
                let team_id = self.context.config.team();
                self.context.services.past_events.timestamp_boundaries(team_id).await.map_err(|error| {
                    CallError::from(JsError::new("Error", format!("Could not read the team's events: {error}")))
                })?
            }
        };
        let date_from = self.bound(payload, "dateFrom", "lower", boundaries.min).await?;
        let cursor_start = Value::from(date_from - EVENTS_TIME_INTERVAL_MS);
        storage.cursor_init(TIMESTAMP_CURSOR_KEY, Some(&cursor_start)).await?;
        storage.set(MIN_UNIX_TIMESTAMP_KEY, Some(&Value::from(date_from))).await?;
        let date_to = self.bound(payload, "dateTo", "upper", boundaries.max).await?;
        storage.set(MAX_UNIX_TIMESTAMP_KEY, Some(&Value::from(date_to))).await?;
        Ok(())
    }

    /// One end of the export in epoch ms: the payload's `field`, else the team's boundary.
    async fn bound(
        &self,
        payload: Option<&Value>,
        field: &str,
        which: &str,
        fallback: Option<DateTime<Utc>>,
    ) -> Result<i64, CallError> {
        match payload.and_then(|payload| payload.get(field)).filter(|value| is_truthy(value)) {
            Some(value) => match date_ms(value) {
                Some(ms) => Ok(ms),
                None => {
                    self.log(format!("'{field}' should be an timestamp in ISO string format.")).await;
                    Err(JsError::new("RangeError", "Invalid time value").into())
                }
            },
            None => fallback.map(|time| time.timestamp_millis()).ok_or_else(|| {
                JsError::new(
                    "Error",
                    format!(
                        "Unable to determine the {which} timestamp bound for the export automatically. Please specify a '{field}' value."
                    ),
                )
                .into()
            }),
        }
    }

    /// `(min, max)` export limits, read from storage once per config.
    async fn limits(&self) -> Result<(f64, f64), CallError> {
        let cached = self.limits.lock().map(|limits| *limits).unwrap_or((None, None));
        let storage = self.context.storage();
        let number = |value: Value| value.as_f64().unwrap_or(0.0);
        let min = match cached.0.filter(|min| *min != 0.0) {
            Some(min) => min,
            None => number(storage.get(MIN_UNIX_TIMESTAMP_KEY, Value::Null).await.map_err(storage_error)?),
        };
        let max = match cached.1.filter(|max| *max != 0.0) {
            Some(max) => max,
            None => number(storage.get(MAX_UNIX_TIMESTAMP_KEY, Value::Null).await.map_err(storage_error)?),
        };
        if let Ok(mut limits) = self.limits.lock() {
            *limits = (Some(min), Some(max));
        }
        Ok((min, max))
    }

    /// The `exportEventsFromTheBeginning` job: one chunk of at most 100 events.
    pub async fn export_chunk(&self, payload: Value) -> Result<Value, CallError> {
        let retries = payload.get("retriesPerformedSoFar").and_then(Value::as_u64).unwrap_or(0);
        if retries >= MAXIMUM_RETRIES {
            return Ok(Value::Null);
        }
        let mut cursor = payload.get("timestampCursor").and_then(Value::as_f64).filter(|c| *c != 0.0);
        let mut offset = payload.get("intraIntervalOffset").and_then(Value::as_i64).unwrap_or(0);
        let (min, max) = self.limits().await?;
        if payload.get("incrementTimestampCursor").is_some_and(is_truthy) || cursor.is_none() {
            offset = 0;
            let incremented = self
                .context
                .storage()
                .cursor_increment(TIMESTAMP_CURSOR_KEY, Some(&Value::from(EVENTS_TIME_INTERVAL_MS)))
                .await?;
            let incremented = incremented.as_f64().unwrap_or(f64::NAN);
            self.log(progress_bar(incremented, min, max)).await;
            cursor = Some(incremented);
        }
        let cursor = cursor.unwrap_or(f64::NAN) as i64;
        if cursor as f64 > max {
            self.context.storage().del(EXPORT_RUNNING_KEY).await?;
            self.log("Done exporting all events".into()).await;
            return Ok(Value::Null);
        }
        let fetched = self.fetch_events(cursor, offset).await;
        let events = fetched.as_ref().map(Vec::len).unwrap_or(0);
        let next = json!({
            "timestampCursor": cursor,
            "incrementTimestampCursor": events == 0,
            "retriesPerformedSoFar": 0,
            "intraIntervalOffset": offset + EVENTS_PER_RUN,
        });
        self.context.enqueue_job(CHUNK_JOB, next, RunAt::Now).await?;
        let retry = match &fetched {
            Err(err) => {
                warn!(plugin_config_id = self.context.config.id, error = %err, "historical export could not read events");
                true
            }
            Ok(events) => match self.vm.call(Method::ExportEvents, vec![Value::Array(events.clone())]).await {
                Ok(_) => false,
                // Other errors are the plugin's: the chunk is not retried (as the reference).
                Err(failure) => failure.error.retry,
            },
        };
        let range = format!(
            "{offset}-{} from {} to {}",
            offset + EVENTS_PER_RUN,
            iso_ms(cursor),
            iso_ms(cursor + EVENTS_TIME_INTERVAL_MS)
        );
        if retry {
            let next_retry_seconds = 2_u64.saturating_pow(retries as u32) * 3;
            self.log(format!("Failed processing events {range}. Retrying in {next_retry_seconds}s")).await;
            let again = json!({
                "intraIntervalOffset": offset,
                "timestampCursor": cursor,
                "retriesPerformedSoFar": retries + 1,
            });
            self.context.enqueue_job(CHUNK_JOB, again, RunAt::In(next_retry_seconds as f64, "seconds".into())).await?;
        }
        // Logged after a failure too, as the reference does (REF-BUG 16, text kept).
        self.log(format!("Successfully processed events {range}.")).await;
        self.context.services.metrics.update(
            &self.context.config,
            MetricOperation::Increment,
            "events_exported",
            events as f64,
        );
        Ok(Value::Null)
    }

    async fn fetch_events(&self, cursor: i64, offset: i64) -> Result<Vec<Value>, PastEventsError> {
        let lower = Utc.timestamp_millis_opt(cursor).single().unwrap_or_default();
        let upper = Utc.timestamp_millis_opt(cursor + EVENTS_TIME_INTERVAL_MS).single().unwrap_or_default();
        let team_id = self.context.config.team();
        self.context.services.past_events.fetch_interval(team_id, lower, upper, EVENTS_PER_RUN, offset).await
    }
}

/// `Export progress: ■■■□□…` (20 squares). REF-BUG 16 fixed: the reference rounded before
/// scaling, so its bar was all empty or all full.
fn progress_bar(cursor: f64, min: f64, max: f64) -> String {
    let span = max - min;
    let done = if span == 0.0 { 20.0 } else { ((cursor - min) / span * 20.0).round() };
    let done = if done.is_finite() { done.clamp(0.0, 20.0) as usize } else { 0 };
    format!("Export progress: {}{}", "■".repeat(done), "□".repeat(20 - done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_scales() {
        assert_eq!(progress_bar(5.0, 0.0, 10.0), format!("Export progress: {}{}", "■".repeat(10), "□".repeat(10)));
        assert_eq!(progress_bar(0.0, 0.0, 0.0), format!("Export progress: {}", "■".repeat(20)));
        assert_eq!(progress_bar(-5.0, 0.0, 10.0), format!("Export progress: {}", "□".repeat(20)));
    }

    #[test]
    fn payload_dates() {
        assert_eq!(date_ms(&json!("2021-01-01T00:00:00.000Z")), Some(1_609_459_200_000));
        assert_eq!(date_ms(&json!(5)), Some(5));
        assert_eq!(date_ms(&json!("nope")), None);
    }
}
