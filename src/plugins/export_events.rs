//! The exportEvents upgrade: a plugin exporting `exportEvents` gets a buffer that `onEvent`
//! feeds (bounded by `exportEventsBufferBytes` and `exportEventsBufferSeconds`, skipping
//! `exportEventsToIgnore`), flushes into `exportEvents(batch)`, and retries `RetryError`s through
//! the job queue (job `exportEventsWithRetry`, after 2^(n+1)·3 s, at most 15 times), counting the
//! five default metrics. The buffer follows `createBuffer` of `@posthog/plugin-contrib` 0.0.5.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tracing::info;

use super::errors::{process_error, PluginFailure};
use super::extensions::{MetricOperation, PluginContext, RunAt};
use super::js::string_of;
use super::vm_boundary::{CallError, JsError, Method, PluginVm};

pub const EXPORT_EVENTS_RETRY_JOB: &str = "exportEventsWithRetry";
pub const MAXIMUM_RETRIES: u64 = 15;
const BUFFER_BYTES_DEFAULT: i64 = 1024 * 1024;
const BUFFER_BYTES_MIN: i64 = 1;
const BUFFER_BYTES_MAX: i64 = 100 * 1024 * 1024;
const BUFFER_SECONDS_MIN: i64 = 1;
const BUFFER_SECONDS_MAX: i64 = 600;

/// `exportEventsBufferSeconds` default: 10 s, or 600 s in the test environment (as the
/// reference).
pub fn default_buffer_seconds(test_env: bool) -> i64 {
    if test_env {
        BUFFER_SECONDS_MAX
    } else {
        10
    }
}

/// The reference's `stringClamp`: `parseInt` of the config value (default when not a number),
/// clamped.
fn string_clamp(value: Option<&Value>, default: i64, min: i64, max: i64) -> i64 {
    let parsed = value.and_then(|value| {
        let text = string_of(value);
        let trimmed = text.trim_start();
        let (sign, digits) = match trimmed.strip_prefix('-') {
            Some(rest) => (-1, rest),
            None => (1, trimmed.strip_prefix('+').unwrap_or(trimmed)),
        };
        let digits: String = digits.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse::<i64>().ok().map(|n| sign * n)
    });
    parsed.unwrap_or(default).clamp(min, max)
}

/// Buffer limits and the ignore list, read from `meta.config`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    pub limit_bytes: usize,
    pub timeout: Duration,
    pub ignore: HashSet<String>,
}

impl ExportSettings {
    pub fn from_config(config: &Map<String, Value>, test_env: bool) -> ExportSettings {
        let bytes = string_clamp(
            config.get("exportEventsBufferBytes"),
            BUFFER_BYTES_DEFAULT,
            BUFFER_BYTES_MIN,
            BUFFER_BYTES_MAX,
        );
        let seconds = string_clamp(
            config.get("exportEventsBufferSeconds"),
            default_buffer_seconds(test_env),
            BUFFER_SECONDS_MIN,
            BUFFER_SECONDS_MAX,
        );
        let ignore = match config.get("exportEventsToIgnore").filter(|value| super::js::truthy(value)) {
            Some(value) => string_of(value).split(',').map(|name| name.trim().to_string()).collect(),
            None => HashSet::new(),
        };
        ExportSettings { limit_bytes: bytes as usize, timeout: Duration::from_secs(seconds as u64), ignore }
    }
}

#[derive(Default)]
struct BufferState {
    items: Vec<Value>,
    points: usize,
    timer: Option<JoinHandle<()>>,
}

/// The buffer and retry logic of one plugin config's VM.
pub struct ExportEvents {
    settings: ExportSettings,
    vm: Arc<dyn PluginVm>,
    context: Arc<PluginContext>,
    state: Mutex<BufferState>,
    me: Weak<ExportEvents>,
}

/// What a flush or a retry job carries.
fn payload(batch: Vec<Value>, batch_id: u64, retries: u64) -> Value {
    json!({"batch": batch, "batchId": batch_id, "retriesPerformedSoFar": retries})
}

/// `JSON.stringify(value).length` (UTF-16 code units).
pub fn json_length(value: &Value) -> usize {
    value.to_string().encode_utf16().count()
}

impl ExportEvents {
    pub fn new(settings: ExportSettings, vm: Arc<dyn PluginVm>, context: Arc<PluginContext>) -> Arc<ExportEvents> {
        Arc::new_cyclic(|me| ExportEvents {
            settings,
            vm,
            context,
            state: Mutex::new(BufferState::default()),
            me: me.clone(),
        })
    }

    /// The wrapped `onEvent`'s buffering half: adds the event unless its name is ignored.
    pub fn on_event(&self, event: &Value) {
        let name = event.get("event").map(string_of).unwrap_or_default();
        if !self.settings.ignore.contains(&name) {
            self.add(event.clone(), json_length(event));
        }
    }

    fn add(&self, item: Value, points: usize) {
        let Ok(mut state) = self.state.lock() else { return };
        if state.points > 0 && state.points + points > self.settings.limit_bytes {
            self.spawn_flush(&mut state);
        }
        state.items.push(item);
        state.points += points;
        if state.points > self.settings.limit_bytes {
            self.spawn_flush(&mut state);
        } else if state.timer.is_none() {
            let me = self.me.clone();
            let timeout = self.settings.timeout;
            state.timer = Some(tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Some(me) = me.upgrade() {
                    me.flush_from_timer().await;
                }
            }));
        }
    }

    /// Takes the buffered items (clearing the timer) and exports them in the background, as the
    /// reference's un-awaited `flush()` does.
    fn spawn_flush(&self, state: &mut BufferState) {
        if let Some(timer) = state.timer.take() {
            timer.abort();
        }
        let items = std::mem::take(&mut state.items);
        state.points = 0;
        if items.is_empty() {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            tokio::spawn(async move { me.export_batch(items).await });
        }
    }

    async fn flush_from_timer(&self) {
        let items = match self.state.lock() {
            Ok(mut state) => {
                // This task is the timer: forget it rather than abort ourselves.
                state.timer = None;
                state.points = 0;
                std::mem::take(&mut state.items)
            }
            Err(_) => return,
        };
        if !items.is_empty() {
            self.export_batch(items).await;
        }
    }

    /// Flushes and waits for the export (teardown).
    pub async fn flush(&self) {
        let items = match self.state.lock() {
            Ok(mut state) => {
                if let Some(timer) = state.timer.take() {
                    timer.abort();
                }
                state.points = 0;
                std::mem::take(&mut state.items)
            }
            Err(_) => return,
        };
        if !items.is_empty() {
            self.export_batch(items).await;
        }
    }

    /// A flushed batch. Errors other than `RetryError` become the config's error (the
    /// reference's unhandled rejection, attributed to the plugin).
    async fn export_batch(&self, batch: Vec<Value>) {
        let batch_id = rand::rng().random_range(0..1_000_000);
        if let Err(error) = self.export_with_retry(payload(batch, batch_id, 0)).await {
            process_error(&self.context.services, &self.context.config, &PluginFailure::Error(error.error), None).await;
        }
    }

    fn metric(&self, name: &str, count: usize) {
        self.context.services.metrics.update(&self.context.config, MetricOperation::Increment, name, count as f64);
    }

    /// `exportEventsWithRetry(payload)`: the first export and the retry job.
    pub async fn export_with_retry(&self, payload: Value) -> Result<Value, CallError> {
        let batch = match payload.get("batch") {
            Some(Value::Array(batch)) => batch.clone(),
            _ => return Err(JsError::new("TypeError", "exportEventsWithRetry expects a payload with a batch").into()),
        };
        let retries = payload.get("retriesPerformedSoFar").and_then(Value::as_u64).unwrap_or(0);
        let batch_id = payload.get("batchId").cloned().unwrap_or(Value::Null);
        let count = batch.len();
        if retries == 0 {
            self.metric("events_seen", count);
        }
        let config = &self.context.config;
        let started = std::time::Instant::now();
        let result = self.vm.call(Method::ExportEvents, vec![Value::Array(batch.clone())]).await;
        self.context.services.observe(config, "exportEvents", started, result.is_err());
        match result {
            Ok(_) => {
                self.metric("events_delivered_successfully", count);
                Ok(Value::Null)
            }
            Err(failure) if failure.error.retry => {
                self.metric("retry_errors", count);
                if retries < MAXIMUM_RETRIES {
                    let next_retry_seconds = 2_f64.powi(retries as i32 + 1) * 3.0;
                    let mut next = payload.clone();
                    next["retriesPerformedSoFar"] = Value::from(retries + 1);
                    self.context
                        .enqueue_job(EXPORT_EVENTS_RETRY_JOB, next, RunAt::In(next_retry_seconds, "seconds".into()))
                        .await?;
                    info!(
                        "🚃 Enqueued PluginConfig {} batch {} for retry #{} in {}s",
                        config.id,
                        string_of(&batch_id),
                        retries + 1,
                        next_retry_seconds.round()
                    );
                } else {
                    self.metric("undelivered_events", count);
                    info!(
                        "☠️ Dropped PluginConfig {} batch {} after retrying {} times",
                        config.id,
                        string_of(&batch_id),
                        retries
                    );
                }
                Ok(Value::Null)
            }
            Err(failure) => {
                self.metric("other_errors", count);
                self.metric("undelivered_events", count);
                Err(failure)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_clamp_and_default() {
        let config = json!({"exportEventsBufferBytes": "1000", "exportEventsBufferSeconds": "0", "exportEventsToIgnore": "a, b"});
        let settings = ExportSettings::from_config(config.as_object().unwrap(), false);
        assert_eq!(settings.limit_bytes, 1000);
        assert_eq!(settings.timeout, Duration::from_secs(1));
        assert!(settings.ignore.contains("b"));
        let settings = ExportSettings::from_config(&Map::new(), false);
        assert_eq!(settings.limit_bytes, 1024 * 1024);
        assert_eq!(settings.timeout, Duration::from_secs(10));
        let huge = json!({"exportEventsBufferBytes": "999999999999abc"});
        assert_eq!(ExportSettings::from_config(huge.as_object().unwrap(), true).limit_bytes, 100 * 1024 * 1024);
        assert_eq!(ExportSettings::from_config(&Map::new(), true).timeout, Duration::from_secs(600));
    }
}
