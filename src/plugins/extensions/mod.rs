//! The meta API as plain async Rust: `meta.cache`, `meta.storage`, `meta.utils.cursor`,
//! `meta.metrics`, `meta.jobs`, `meta.geoip`, `console`, `posthog.capture` and `posthog.api`.
//! Values go in and out as `serde_json::Value`; errors come back as [`JsError`]s the runtime
//! throws into JavaScript with the same name and message the reference uses.
//!
//! [`PluginServices`] holds what the extensions need from the rest of the server (Postgres,
//! Redis, the log sink, and three small traits other modules implement: [`CaptureSink`] for
//! `posthog.capture`, [`JobEnqueuer`] for `meta.jobs`, [`GeoIpLocator`] for `meta.geoip`).
//! [`PluginContext`] binds them to one plugin config; [`PluginContext::call`] dispatches by name so
//! the runtime can bind the whole API through one host function. The host side of the facade
//! modules (`runtime/modules`) is here too, one file per facade (`pg.rs`), reached through
//! [`PluginContext::call_from`], which knows the calling VM.

pub mod aws;
pub mod cache;
pub mod google;
pub mod jobs;
pub mod metrics;
pub mod pg;
pub mod posthog;
pub mod retry;
pub mod snowflake;
pub mod storage;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use thiserror::Error;

use super::log_entries::{LogSource, LogType, PluginLogEntry, PluginLogSink};
use super::rows::{PluginConfig, PluginRecords};
use super::vm_boundary::JsError;
use crate::hub::Hub;
use crate::infra::BoxError;
use crate::js::string_of;
use crate::plugins::runtime::VmId;

pub use cache::{Cache, CacheBackend, CacheRedis};
pub use jobs::{duration_to_ms, EnqueuedJob, RunAt};
pub use metrics::{MetricOperation, PluginMetrics};
pub use posthog::{api_request, build_capture, ApiKeyManager, ApiRequest, CapturedEvent, CAPTURE_CELERY_TASK};
pub use storage::{Storage, StorageBackend};

/// A delivery failure of a sink implemented elsewhere (Celery/Kafka producer, job queue).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct SinkError(#[source] pub BoxError);

/// Sends `posthog.capture` events back into the pipeline (Celery task in the Postgres pipeline,
/// `KAFKA_CONSUMPTION_TOPIC` in the Kafka one).
#[async_trait]
pub trait CaptureSink: Send + Sync {
    async fn capture(&self, event: CapturedEvent) -> Result<(), SinkError>;
}

/// Queues plugin jobs (`meta.jobs`, exportEvents retries) in the job queue. The error message is
/// what the plugin's promise rejects with (`No JobQueue available` when every queue failed).
#[async_trait]
pub trait JobEnqueuer: Send + Sync {
    async fn enqueue(&self, job: EnqueuedJob) -> Result<(), SinkError>;
}

/// `meta.geoip.locate(ip)`: the GeoIP City record or `null`.
#[async_trait]
pub trait GeoIpLocator: Send + Sync {
    async fn locate(&self, ip: &str) -> Result<Value, JsError>;
}

/// One finished plugin call, for statsd and the status report (the reference's
/// `plugin.process_event` / `plugin.<name>.on_event` timings, `….ERROR` counters,
/// `plugin.export_events.success` and `$plugin_running_duration` buckets).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRun<'a> {
    pub team_id: i64,
    pub plugin_config_id: i32,
    pub plugin_name: &'a str,
    /// `processEvent`, `onEvent`, `onSnapshot`, `exportEvents` or `pluginTask`.
    pub function: &'static str,
    pub elapsed: std::time::Duration,
    pub failed: bool,
    /// For `pluginTask`: the kind (`schedule` / `job`) and the task's name.
    pub task: Option<(&'static str, &'a str)>,
}

/// Told about every plugin call; the default does nothing.
pub trait RunObserver: Send + Sync {
    fn plugin_ran(&self, run: &PluginRun<'_>);
}

/// The observer that ignores everything.
pub struct NoObserver;

impl RunObserver for NoObserver {
    fn plugin_ran(&self, _run: &PluginRun<'_>) {}
}

/// What the extensions share across all plugin configs. [`PluginServices::new`] wires the server's
/// Postgres and Redis behind `storage`, `cache` and `records`; the plugin dev loop puts in-memory
/// ones in their place (`plugins::memory`).
pub struct PluginServices {
    pub hub: Hub,
    pub logs: Arc<dyn PluginLogSink>,
    pub capture: Arc<dyn CaptureSink>,
    pub jobs: Arc<dyn JobEnqueuer>,
    /// `None` when MMDB is disabled: `locate` then throws the reference's message.
    pub geoip: Option<Arc<dyn GeoIpLocator>>,
    pub metrics: PluginMetrics,
    pub api_keys: ApiKeyManager,
    /// Where every config's `meta.cache` lives (Redis: one shared multiplexed connection).
    pub cache: Arc<dyn CacheBackend>,
    /// Where every config's `meta.storage` and `meta.utils.cursor` live (`posthog_pluginstorage`).
    pub storage: Arc<dyn StorageBackend>,
    /// Capabilities, metrics, config errors and the rest the orchestration records (Postgres).
    pub records: Arc<dyn PluginRecords>,
    /// The stored events the historical export reads: `posthog_event` by default, ClickHouse in
    /// the Kafka pipeline (set by the server), none in the dev loop.
    pub past_events: Arc<dyn crate::plugins::past_events::PastEvents>,
    /// Echo `console.*` calls to the server log (the reference does so in development; set
    /// from `NODE_ENV`/`DEBUG` by [`PluginServices::new`]).
    pub echo_console: bool,
    /// Timings and error counts (statsd, status report); [`NoObserver`] by default.
    pub observer: Arc<dyn RunObserver>,
}

impl PluginServices {
    /// Reports a finished call of `config`'s plugin to the observer.
    pub fn observe(&self, config: &PluginConfig, function: &'static str, started: std::time::Instant, failed: bool) {
        self.report_run(config, function, started, failed, None);
    }

    /// Reports a finished scheduled task or job (`kind` is `schedule` or `job`).
    pub fn observe_task(
        &self,
        config: &PluginConfig,
        kind: &'static str,
        name: &str,
        started: std::time::Instant,
        failed: bool,
    ) {
        self.report_run(config, "pluginTask", started, failed, Some((kind, name)));
    }

    fn report_run(
        &self,
        config: &PluginConfig,
        function: &'static str,
        started: std::time::Instant,
        failed: bool,
        task: Option<(&'static str, &str)>,
    ) {
        let name = config.plugin.name();
        self.observer.plugin_ran(&PluginRun {
            team_id: config.team(),
            plugin_config_id: config.id,
            plugin_name: &name,
            function,
            elapsed: started.elapsed(),
            failed,
            task,
        });
    }

    pub fn new(
        hub: Hub,
        logs: Arc<dyn PluginLogSink>,
        capture: Arc<dyn CaptureSink>,
        jobs: Arc<dyn JobEnqueuer>,
        geoip: Option<Arc<dyn GeoIpLocator>>,
    ) -> PluginServices {
        let cache = Arc::new(CacheRedis::new(crate::hub::redis_url(&hub.config)));
        let storage = Arc::new(hub.postgres.clone());
        let records = Arc::new(hub.postgres.clone());
        let past_events = Arc::new(crate::plugins::past_events::PostgresPastEvents(hub.postgres.clone()));
        let echo_console = hub.config.is_dev();
        PluginServices {
            hub,
            logs,
            capture,
            jobs,
            geoip,
            metrics: PluginMetrics::default(),
            api_keys: ApiKeyManager::default(),
            cache,
            storage,
            records,
            past_events,
            echo_console,
            observer: Arc::new(NoObserver),
        }
    }
}

/// The meta API of one plugin config.
pub struct PluginContext {
    pub services: Arc<PluginServices>,
    pub config: Arc<PluginConfig>,
    cache: Cache,
    storage: Storage,
    /// The `pg` facade's connections, per VM of this config.
    pub pg: pg::PgConnections,
    /// The `aws-sdk` facade's clients (requests in flight).
    aws: aws::Aws,
    /// The Google Cloud facades' client (tokens, requests in flight).
    google: google::Google,
    /// The `snowflake-sdk` facade's client (requests in flight).
    snowflake: snowflake::Snowflake,
}

/// How `console.*` renders its arguments: joined by spaces; arrays and objects as JSON, the rest
/// as `String(arg)`. (Values that only exist in JavaScript, such as `Error`s, must be rendered by
/// the runtime before they get here: `String(new Error('x'))` is `Error: x`.)
pub fn format_console_args(args: &[Value]) -> String {
    args.iter()
        .map(|arg| match arg {
            Value::Array(_) | Value::Object(_) => arg.to_string(),
            other => string_of(other),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn arg(args: &[Value], index: usize) -> &Value {
    args.get(index).unwrap_or(&Value::Null)
}

fn string_arg(args: &[Value], index: usize) -> String {
    string_of(arg(args, index))
}

impl PluginContext {
    pub fn new(services: Arc<PluginServices>, config: Arc<PluginConfig>) -> PluginContext {
        let cache = Cache::new(services.cache.clone(), config.plugin_id, Some(config.team()));
        let storage = Storage::new(services.storage.clone(), config.id);
        let pg = pg::PgConnections::new(services.hub.config.task_timeout());
        PluginContext {
            services,
            config,
            cache,
            storage,
            pg,
            aws: aws::Aws::default(),
            google: google::Google::default(),
            snowflake: snowflake::Snowflake::default(),
        }
    }

    /// `meta.config`.
    pub fn config_json(&self) -> Value {
        Value::Object(self.config.config.clone())
    }

    /// `meta.attachments` as JSON, with contents as byte arrays (the runtime turns them into
    /// buffers).
    pub fn attachments_json(&self) -> Value {
        let mut map = Map::new();
        for (key, attachment) in &self.config.attachments {
            let mut entry = Map::new();
            entry.insert("content_type".into(), attachment.content_type.clone().into());
            entry.insert("file_name".into(), attachment.file_name.clone().into());
            entry.insert("contents".into(), Value::from(attachment.contents.clone()));
            map.insert(key.clone(), Value::Object(entry));
        }
        Value::Object(map)
    }

    /// The declared metrics (name → `sum`/`max`/`min`), for building `meta.metrics.<name>`.
    pub fn metric_types(&self) -> Map<String, Value> {
        self.config.plugin.declared_metrics()
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// `console.<method>(...)` with an already rendered message.
    pub async fn console(&self, log_type: LogType, message: String) {
        if self.services.echo_console {
            tracing::info!(
                "👉 {} in {}: {}",
                log_type.as_str(),
                self.config.plugin.digest(self.config.team_id),
                message
            );
        }
        let entry = PluginLogEntry::new(
            &self.config,
            LogSource::Console,
            log_type,
            message,
            self.services.hub.instance_id,
            None,
        );
        self.services.logs.queue(entry).await;
    }

    /// `meta.metrics.<name>.<method>(value)`.
    pub fn metric(&self, name: &str, method: &str, value: &Value) -> Result<(), JsError> {
        self.services.metrics.apply(&self.config, name, method, value)
    }

    /// `meta.jobs.<job_type>(payload).run…()`.
    pub async fn enqueue_job(&self, job_type: &str, payload: Value, when: RunAt) -> Result<(), JsError> {
        let job = EnqueuedJob {
            job_type: job_type.to_string(),
            payload,
            timestamp: when.timestamp()?,
            plugin_config_id: i64::from(self.config.id),
            plugin_config_team: self.config.team(),
        };
        self.services.jobs.enqueue(job).await.map_err(|err| JsError::new("Error", err.to_string()))
    }

    /// `posthog.capture(event, properties)`.
    pub async fn capture(&self, event: &str, properties: Option<&Value>) -> Result<(), JsError> {
        let captured = build_capture(&self.config, event, properties, crate::VERSION);
        self.services.capture.capture(captured).await.map_err(|err| JsError::new("Error", err.to_string()))
    }

    /// `posthog.api.<method>(path, options)`: the request to `fetch`.
    pub async fn api_request(&self, method: &str, path: &str, options: Option<&Value>) -> Result<ApiRequest, JsError> {
        api_request(&self.services.hub.postgres, &self.services.api_keys, self.config.team_id, method, path, options)
            .await
    }

    /// `meta.geoip.locate(ip)`.
    pub async fn geoip_locate(&self, ip: &str) -> Result<Value, JsError> {
        match &self.services.geoip {
            Some(locator) => locator.locate(ip).await,
            None => Err(JsError::new("Error", "IP location capabilities are not available in this PostHog instance!")),
        }
    }

    /// Calls an extension by name with the plugin's arguments as JSON (trailing `undefined`
    /// arguments omitted), the convention of `runtime::MetaBindings::call`:
    /// `cache.<set|get|incr|expire|lpush|lrange|llen|lrem|lpop>`, `storage.<get|set|del>`,
    /// `utils.cursor.<init|increment>`, `geoip.locate [ip]`, `jobs.runNow [type, payload]`,
    /// `jobs.runIn [type, payload, duration, unit]`, `jobs.runAt [type, payload, date]` (ISO
    /// string or epoch ms), `metrics.<increment|max|min> [name, value]`,
    /// `console.<debug|log|info|warn|error> [...]` (usually one already rendered message),
    /// `posthog.capture [event, properties?]`, `posthog.api [METHOD, path, options?]` (returns
    /// `{url, method, headers, body}` for the runtime's fetch).
    /// [`PluginContext::call`] made by VM `vm`: the facades' operations (`pg.*`) keep state per
    /// VM; everything else is the same for every VM.
    pub async fn call_from(&self, vm: VmId, function: &str, args: Vec<Value>) -> Result<Value, JsError> {
        match function.strip_prefix("pg.") {
            Some(op) => self.pg.call(vm, op, args).await,
            None => self.call(function, args).await,
        }
    }

    /// VM `vm` is gone: what its facade calls left open, to be closed on the async runtime
    /// ([`LeftOpen::close`]).
    pub fn left_open_by(&self, vm: VmId) -> LeftOpen {
        LeftOpen { pg: self.pg.close_vm(vm) }
    }

    pub async fn call(&self, function: &str, args: Vec<Value>) -> Result<Value, JsError> {
        let key = string_arg(&args, 0);
        let unknown = || JsError::new("TypeError", format!("{function} is not a function"));
        match function {
            "cache.set" => self.cache.set(&key, arg(&args, 1), args.get(2), args.get(3)).await,
            "cache.get" => self.cache.get(&key, args.get(2)).await,
            "cache.incr" => self.cache.incr(&key).await,
            "cache.expire" => self.cache.expire(&key, arg(&args, 1)).await,
            "cache.lpush" => self.cache.lpush(&key, arg(&args, 1)).await,
            "cache.lrange" => self.cache.lrange(&key, arg(&args, 1), arg(&args, 2)).await,
            "cache.llen" => self.cache.llen(&key).await,
            "cache.lrem" => self.cache.lrem(&key, arg(&args, 1), arg(&args, 2)).await,
            "cache.lpop" => self.cache.lpop(&key, arg(&args, 1)).await,
            "storage.get" => self.storage.get(&key, arg(&args, 1).clone()).await,
            "storage.set" => self.storage.set(&key, args.get(1)).await,
            "storage.del" => self.storage.del(&key).await,
            "utils.cursor.init" => self.storage.cursor_init(&key, args.get(1)).await,
            "utils.cursor.increment" => self.storage.cursor_increment(&key, args.get(1)).await,
            "posthog.capture" => self.capture(&key, args.get(1)).await.map(|()| Value::Null),
            "geoip.locate" => self.geoip_locate(&key).await,
            "jobs.runNow" | "jobs.runIn" | "jobs.runAt" => {
                let when = match function {
                    "jobs.runNow" => RunAt::Now,
                    "jobs.runIn" => RunAt::In(arg(&args, 2).as_f64().unwrap_or(f64::NAN), string_arg(&args, 3)),
                    _ => RunAt::At(epoch_ms(arg(&args, 2))),
                };
                self.enqueue_job(&key, arg(&args, 1).clone(), when).await.map(|()| Value::Null)
            }
            "posthog.api" => {
                let path = string_arg(&args, 1);
                let request = self.api_request(&key, &path, args.get(2)).await?;
                let headers: Map<String, Value> =
                    request.headers.into_iter().map(|(name, value)| (name, Value::String(value))).collect();
                Ok(serde_json::json!({
                    "url": request.url, "method": request.method, "headers": headers, "body": request.body,
                }))
            }
            "aws.s3" | "aws.kinesis" => {
                // Within the host call's deadline (TASK_TIMEOUT), leaving time for the answer.
                let timeout = self.services.hub.config.task_timeout();
                let budget = timeout.saturating_sub((timeout / 10).min(std::time::Duration::from_secs(1)));
                self.aws.call(function, &args, budget).await
            }
            "google.request" => {
                let timeout = self.services.hub.config.task_timeout();
                let budget = timeout.saturating_sub((timeout / 10).min(std::time::Duration::from_secs(1)));
                self.google.call(function, &args, budget).await
            }
            "snowflake.request" => {
                let timeout = self.services.hub.config.task_timeout();
                let budget = timeout.saturating_sub((timeout / 10).min(std::time::Duration::from_secs(1)));
                self.snowflake.call(function, &args, budget).await
            }
            _ => {
                if let Some(level) = function.strip_prefix("console.") {
                    let log_type = LogType::from_console_method(level).ok_or_else(unknown)?;
                    self.console(log_type, format_console_args(&args)).await;
                    return Ok(Value::Null);
                }
                if let Some(method) = function.strip_prefix("metrics.") {
                    self.metric(&key, method, arg(&args, 1))?;
                    return Ok(Value::Null);
                }
                Err(unknown())
            }
        }
    }
}

/// What a gone VM left open ([`PluginContext::left_open_by`]).
pub struct LeftOpen {
    pg: Vec<Arc<tokio::sync::Mutex<pg::wire::Connection>>>,
}

impl LeftOpen {
    pub fn is_empty(&self) -> bool {
        self.pg.is_empty()
    }

    /// Closes it all (each connection once no query holds it).
    pub async fn close(self) {
        pg::close_all(self.pg).await;
    }
}

/// `date.valueOf()` of a `runAt` argument: epoch ms, or an ISO string (how a `Date` crosses over).
fn epoch_ms(value: &Value) -> f64 {
    match value {
        Value::Number(number) => number.as_f64().unwrap_or(f64::NAN),
        Value::String(text) => {
            chrono::DateTime::parse_from_rfc3339(text).map(|time| time.timestamp_millis() as f64).unwrap_or(f64::NAN)
        }
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn console_formatting_matches_the_reference() {
        assert_eq!(format_console_args(&[]), "");
        assert_eq!(format_console_args(&[json!("number ="), json!(987)]), "number = 987");
        assert_eq!(format_console_args(&[json!({"1": "ein", "2": "zwei"})]), r#"{"1":"ein","2":"zwei"}"#);
        assert_eq!(format_console_args(&[json!([99, 79])]), "[99,79]");
    }
}
