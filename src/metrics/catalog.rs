//! Every metric the server sends, in one place: the statsd names (the reference's, spec 40 §6.4;
//! grep the reference's `statsd?.` calls for the list) and the Prometheus names, each behind one
//! function that call sites use. No other module spells a metric name.
//!
//! Statsd goes through the process-wide [`super::global`] client (a no-op without
//! `STATSD_HOST`); Prometheus goes through the `metrics` facade, recorded only once
//! [`super::prometheus::install`] ran (`HTTP_SERVER_PORT` ≠ 0), so with both off a call costs a
//! couple of loads.
//!
//! Cheap on the event path, with both on: nothing is formatted or allocated per call. Statsd keys
//! of fixed metrics are [`StatsdKey`] statics, the others are rendered into a per-thread buffer
//! (numbers with `itoa`) and found in the client's registry (`super::statsd`); Prometheus handles
//! are kept once resolved (`OnceLock`s, and [`Handles`] per team, plugin config or query).
//!
//! Instrumentation by rule: every stage ([`Stage`]) counts what it received, what it handled, and
//! what it dropped or dead-lettered with the reason ([`received`], [`handled`], [`dropped`]).
//! Drops also go to statsd (`events_dropped`, tagged `stage` and `reason`), so that nothing is
//! dropped without a counter an operator sees on either side.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};

use super::handles::Handles;
use super::prometheus::enabled as prometheus_enabled;
use super::statsd::{KeyCache, Value};
use super::{global, millis, StatsdKey};

/// A `&'static str`'s address and length: a cache key that costs no hashing of the text (two
/// literals with one text may have two addresses: then two entries with the same key number).
type Address = (usize, usize);

fn address(text: &'static str) -> Address {
    (text.as_ptr() as usize, text.len())
}

/// A name's hash, for caches keyed by a name that is not `'static` (a plugin's).
fn name_hash(name: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = rustc_hash::FxBuildHasher.build_hasher();
    hasher.write(name.as_bytes());
    hasher.finish()
}

/// The reference's statsd names (fixed ones; templated ones are built by the functions below).
pub mod statsd {
    pub const EACH_EVENT: &str = "kafka_queue.each_event";
    pub const SINGLE_EVENT: &str = "kafka_queue.single_event";
    pub const SINGLE_INGESTION: &str = "kafka_queue.single_ingestion";
    pub const SINGLE_ON_EVENT: &str = "kafka_queue.single_on_event";
    pub const SINGLE_ON_SNAPSHOT: &str = "kafka_queue.single_on_snapshot";
    pub const EACH_BATCH: &str = "kafka_queue.each_batch";
    pub const SINGLE_SAVE_STANDARD: &str = "kafka_queue.single_save.standard";
    pub const SINGLE_SAVE_SNAPSHOT: &str = "kafka_queue.single_save.snapshot";
    pub const ILLEGAL_DISTINCT_IDS: &str = "illegal_distinct_ids.total";
    pub const DEAD_LETTER_QUEUE: &str = "events_added_to_dead_letter_queue";
    pub const ACTION_MATCHING: &str = "action_matching_for_event";
    pub const ACTION_MATCHES_FOUND: &str = "action_matches_found";
    pub const WEBHOOK_FIRINGS: &str = "webhook_firings";
    pub const REST_HOOK_FIRINGS: &str = "rest_hook_firings";
    pub const LOG_ENTRIES_CREATED: &str = "logs.entries_created";
    pub const KAFKA_SEND: &str = "query.kafka_send";
    pub const KAFKA_SEND_FAILURE: &str = "query.kafka_send.failure";
    pub const POSTGRES: &str = "query.postgres";
    /// Sic: the reference's spelling.
    pub const POSTGRES_TRANSACTION: &str = "query.postgres_transation";
    pub const CLICKHOUSE: &str = "query.clickhouse";
    /// Sic: the reference's spelling.
    pub const REDIS_GET: &str = "query.regisGet";
    pub const REDIS_SET: &str = "query.redisSet";
    pub const REDIS_INCR: &str = "query.redisIncr";
    pub const REDIS_EXPIRE: &str = "query.redisExpire";
    pub const REDIS_LPUSH: &str = "query.redisLPush";
    pub const REDIS_LRANGE: &str = "query.redisLRange";
    pub const REDIS_LLEN: &str = "query.redisLLen";
    pub const REDIS_BRPOP: &str = "query.redisBRPop";
    pub const REDIS_LREM: &str = "query.redisLRem";
    pub const REDIS_LPOP: &str = "query.redisLPop";
    pub const PLUGIN_PROCESS_EVENT: &str = "plugin.process_event";
    pub const EXPORT_EVENTS_SUCCESS: &str = "plugin.export_events.success";
    pub const EXPORT_EVENTS_RETRY_ENQUEUED: &str = "plugin.export_events.retry_enqueued";
    pub const EXPORT_EVENTS_RETRY_DROPPED: &str = "plugin.export_events.retry_dropped";
    pub const STALE_RESTART: &str = "alerts.stale_plugin_server_restarted";
    pub const EVENT_LOOP_LAG: &str = "event_loop_lag";
    pub const MMDB_REQUEST: &str = "mmdb.internal_request";
    /// Ours: one line per dropped or dead-lettered item, tagged `stage` and `reason`.
    pub const EVENTS_DROPPED: &str = "events_dropped";
    /// Ours: an event held back for its team's share of the consumer's window.
    pub const HELD_BACK: &str = "consumer.held_back";
    /// Ours: the consumer took no more messages, its held-back events at their bound.
    pub const INTAKE_STALLED: &str = "consumer.intake_stalled";
}

/// The Prometheus names (`/metrics`). Counters end in `_total`, durations are histograms in
/// seconds.
pub mod prom {
    pub const EVENTS_RECEIVED: &str = "plugin_server_events_received_total";
    pub const EVENTS_HANDLED: &str = "plugin_server_events_handled_total";
    pub const EVENTS_DROPPED: &str = "plugin_server_events_dropped_total";
    pub const STAGE_DURATION: &str = "plugin_server_stage_duration_seconds";
    pub const TASK_DURATION: &str = "plugin_server_task_duration_seconds";
    pub const PLUGIN_CALL_DURATION: &str = "plugin_server_plugin_call_duration_seconds";
    pub const PLUGIN_CALL_ERRORS: &str = "plugin_server_plugin_call_errors_total";
    pub const PLUGIN_VM_MEMORY: &str = "plugin_server_plugin_vm_memory_bytes";
    pub const EXPORT_RETRIES: &str = "plugin_server_export_events_retries_total";
    pub const LOG_ENTRIES: &str = "plugin_server_plugin_log_entries_total";
    pub const QUERY_DURATION: &str = "plugin_server_query_duration_seconds";
    pub const QUERY_FAILURES: &str = "plugin_server_query_failures_total";
    pub const ACTION_MATCHING_DURATION: &str = "plugin_server_action_matching_duration_seconds";
    pub const ACTION_MATCHES: &str = "plugin_server_action_matches_total";
    pub const HOOK_FIRINGS: &str = "plugin_server_hook_firings_total";
    pub const ILLEGAL_DISTINCT_IDS: &str = "plugin_server_illegal_distinct_ids_total";
    pub const QUEUE_DEPTH: &str = "plugin_server_queue_depth";
    pub const IN_FLIGHT: &str = "plugin_server_in_flight";
    pub const POOL: &str = "plugin_server_worker_pool";
    pub const JOB_RUNS: &str = "plugin_server_job_runs_total";
    pub const SCHEDULE_RUNS: &str = "plugin_server_schedule_runs_total";
    pub const EVENT_LOOP_LAG: &str = "plugin_server_event_loop_lag_seconds";
    pub const MMDB_REQUEST: &str = "plugin_server_mmdb_request_duration_seconds";
    pub const STALE_RESTARTS: &str = "plugin_server_stale_restarts_total";
}

/// Buckets of every duration histogram, in seconds (1 ms to 60 s).
pub const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The stages an event (or a job, or a scheduled run) goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The Celery or Kafka consumer: messages taken from the queue.
    Consumer,
    /// The `processEvent` chain.
    Plugins,
    /// Person processing and the event write.
    Ingestion,
    /// The Kafka producer (events, persons, log entries, captures for ClickHouse).
    Producer,
    /// Records added to a dead-letter queue.
    DeadLetters,
    /// The job queue (graphile): jobs enqueued and run.
    Jobs,
    /// Scheduled tasks (`runEveryMinute/Hour/Day`).
    Schedule,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Consumer => "consumer",
            Stage::Plugins => "plugins",
            Stage::Ingestion => "ingestion",
            Stage::Producer => "producer",
            Stage::DeadLetters => "dead_letters",
            Stage::Jobs => "jobs",
            Stage::Schedule => "schedule",
        }
    }
}

/// Which count of a stage ([`received`], [`handled`], [`dropped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Flow {
    Received,
    Handled,
    Dropped,
}

/// The stage counters, per (flow, stage, source or reason).
static STAGE_COUNTERS: Handles<(Flow, Stage, Address), Counter> = Handles::new();

fn stage_counter(flow: Flow, stage: Stage, label: &'static str, count: u64) {
    let make = || match flow {
        Flow::Received => metrics::counter!(prom::EVENTS_RECEIVED, "stage" => stage.as_str(), "source" => label),
        Flow::Handled => metrics::counter!(prom::EVENTS_HANDLED, "stage" => stage.as_str(), "source" => label),
        Flow::Dropped => metrics::counter!(prom::EVENTS_DROPPED, "stage" => stage.as_str(), "reason" => label),
    };
    STAGE_COUNTERS.with((flow, stage, address(label)), make, |counter| counter.increment(count));
}

/// `count` items entered `stage` (`source` says which queue or kind: `celery`, `kafka`, ...).
pub fn received(stage: Stage, source: &'static str, count: u64) {
    if prometheus_enabled() {
        stage_counter(Flow::Received, stage, source, count);
    }
}

/// `count` items left `stage` done.
pub fn handled(stage: Stage, source: &'static str, count: u64) {
    if prometheus_enabled() {
        stage_counter(Flow::Handled, stage, source, count);
    }
}

/// `count` items left `stage` without being handled: dropped by a plugin, dead-lettered, refused,
/// given up on. `reason` is a short fixed word (`plugin_dropped`, `undecodable`, `rejected`,
/// `out_of_retries`, `too_large`, ...), never an error message.
pub fn dropped(stage: Stage, reason: &'static str, count: u64) {
    static KEYS: KeyCache<(Stage, Address)> = KeyCache::new();
    global().record_cached(
        &KEYS,
        (stage, address(reason)),
        &[statsd::EVENTS_DROPPED],
        &[("stage", stage.as_str()), ("reason", reason)],
        Value::Count(count as i64),
    );
    if prometheus_enabled() {
        stage_counter(Flow::Dropped, stage, reason, count);
    }
}

/// An event of `consumer` was held back for its team's share of the window.
pub fn held_back(consumer: &'static str) {
    global().increment(statsd::HELD_BACK, &[("consumer", consumer), ("reason", "team_share")]);
}

/// `consumer` stopped taking messages: its held-back events are at their bound.
pub fn intake_stalled(consumer: &'static str) {
    global().increment(statsd::INTAKE_STALLED, &[("consumer", consumer)]);
}

/// A fixed histogram, resolved at its first use.
fn record_fixed(histogram: &OnceLock<Histogram>, make: impl FnOnce() -> Histogram, elapsed: Duration) {
    histogram.get_or_init(make).record(elapsed.as_secs_f64());
}

// --- The event path (the reference's main-thread `ingestEvent` and worker tasks) -------------

/// The steps of one event that the reference times as `kafka_queue.single_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStep {
    /// `processEvent` (the plugin chain).
    ProcessEvent,
    /// The ingestion (`ingestEvent`).
    Ingestion,
    OnEvent,
    OnSnapshot,
}

/// Per step: `kafka_queue.single_<step>`, `piscina_task.<task>`, and the Prometheus histogram.
struct StepMetrics {
    single: StatsdKey,
    task: StatsdKey,
    task_name: &'static str,
    histogram: OnceLock<Histogram>,
}

impl StepMetrics {
    const fn new(single: &'static str, task: &'static str, task_name: &'static str) -> StepMetrics {
        StepMetrics {
            single: StatsdKey::new(single),
            task: StatsdKey::new(task),
            task_name,
            histogram: OnceLock::new(),
        }
    }
}

static STEPS: [StepMetrics; 4] = [
    StepMetrics::new(statsd::SINGLE_EVENT, "piscina_task.processEvent", "processEvent"),
    StepMetrics::new(statsd::SINGLE_INGESTION, "piscina_task.ingestEvent", "ingestEvent"),
    StepMetrics::new(statsd::SINGLE_ON_EVENT, "piscina_task.onEvent", "onEvent"),
    StepMetrics::new(statsd::SINGLE_ON_SNAPSHOT, "piscina_task.onSnapshot", "onSnapshot"),
];

impl EventStep {
    fn metrics(self) -> &'static StepMetrics {
        match self {
            EventStep::ProcessEvent => &STEPS[0],
            EventStep::Ingestion => &STEPS[1],
            EventStep::OnEvent => &STEPS[2],
            EventStep::OnSnapshot => &STEPS[3],
        }
    }
}

/// One step of one event finished: `kafka_queue.single_<step>` and `piscina_task.<task>` (the
/// reference times both, on the main thread and in the worker; here they are one call).
pub fn event_step(step: EventStep, elapsed: Duration) {
    let step = step.metrics();
    let client = global();
    client.record_key(&step.single, millis(elapsed));
    client.record_key(&step.task, millis(elapsed));
    if prometheus_enabled() {
        record_fixed(&step.histogram, || metrics::histogram!(prom::STAGE_DURATION, "step" => step.task_name), elapsed);
    }
}

/// One event went through the whole pipeline (`kafka_queue.each_event`).
pub fn each_event(elapsed: Duration) {
    static KEY: StatsdKey = StatsdKey::new(statsd::EACH_EVENT);
    static HISTOGRAM: OnceLock<Histogram> = OnceLock::new();
    global().record_key(&KEY, millis(elapsed));
    if prometheus_enabled() {
        record_fixed(&HISTOGRAM, || metrics::histogram!(prom::STAGE_DURATION, "step" => "each_event"), elapsed);
    }
}

/// One batch of consumed messages was handled (`kafka_queue.each_batch`).
pub fn each_batch(elapsed: Duration) {
    static KEY: StatsdKey = StatsdKey::new(statsd::EACH_BATCH);
    static HISTOGRAM: OnceLock<Histogram> = OnceLock::new();
    global().record_key(&KEY, millis(elapsed));
    if prometheus_enabled() {
        record_fixed(&HISTOGRAM, || metrics::histogram!(prom::STAGE_DURATION, "step" => "each_batch"), elapsed);
    }
}

/// A worker task beside the event path ran (`piscina_task.<task>`: `runEveryMinute`, `runJob`,
/// `reloadPlugins`, ...).
pub fn task(task: &'static str, elapsed: Duration) {
    static HISTOGRAMS: Handles<Address, Histogram> = Handles::new();
    static KEYS: KeyCache<Address> = KeyCache::new();
    global().record_cached(&KEYS, address(task), &["piscina_task.", task], &[], millis(elapsed));
    if prometheus_enabled() {
        HISTOGRAMS.with(
            address(task),
            || metrics::histogram!(prom::TASK_DURATION, "task" => task),
            |histogram| histogram.record(elapsed.as_secs_f64()),
        );
    }
}

/// The event (standard or `$snapshot`) was saved (`kafka_queue.single_save.*`, from the start of
/// its processing).
pub fn single_save(snapshot: bool, team_id: i64, started: Instant) {
    static HISTOGRAMS: Handles<(bool, i64), Histogram> = Handles::new();
    static KEYS: KeyCache<(bool, i64)> = KeyCache::new();
    let elapsed = started.elapsed();
    let client = global();
    if client.is_enabled() {
        let name = if snapshot { statsd::SINGLE_SAVE_SNAPSHOT } else { statsd::SINGLE_SAVE_STANDARD };
        let mut team = itoa::Buffer::new();
        let tags = [("team_id", team.format(team_id))];
        client.record_cached(&KEYS, (snapshot, team_id), &[name], &tags, millis(elapsed));
    }
    if prometheus_enabled() {
        let make = || {
            let kind = if snapshot { "save_snapshot" } else { "save_standard" };
            metrics::histogram!(prom::STAGE_DURATION, "step" => kind, "team_id" => team_id.to_string())
        };
        HISTOGRAMS.with((snapshot, team_id), make, |histogram| histogram.record(elapsed.as_secs_f64()));
    }
}

/// `$identify` / `$create_alias` with an illegal distinct id was ignored.
pub fn illegal_distinct_id(distinct_id: &str) {
    global().increment(statsd::ILLEGAL_DISTINCT_IDS, &[("distinctId", distinct_id)]);
    if prometheus_enabled() {
        metrics::counter!(prom::ILLEGAL_DISTINCT_IDS).increment(1);
    }
}

/// An event whose ingestion failed went to `events_dead_letter_queue`.
pub fn event_dead_lettered() {
    global().increment(statsd::DEAD_LETTER_QUEUE, &[]);
    dropped(Stage::DeadLetters, "ingestion_failed", 1);
}

// --- Actions and hooks ------------------------------------------------------------------------

/// Action matching ran for one event and found `matches` actions.
pub fn action_matching(elapsed: Duration, matches: usize) {
    static MATCHING: StatsdKey = StatsdKey::new(statsd::ACTION_MATCHING);
    static FOUND: StatsdKey = StatsdKey::new(statsd::ACTION_MATCHES_FOUND);
    static HISTOGRAM: OnceLock<Histogram> = OnceLock::new();
    static COUNTER: OnceLock<Counter> = OnceLock::new();
    let client = global();
    client.record_key(&MATCHING, millis(elapsed));
    client.record_key(&FOUND, Value::Count(matches as i64));
    if prometheus_enabled() {
        record_fixed(&HISTOGRAM, || metrics::histogram!(prom::ACTION_MATCHING_DURATION), elapsed);
        COUNTER.get_or_init(|| metrics::counter!(prom::ACTION_MATCHES)).increment(matches as u64);
    }
}

/// A Slack/Teams webhook was posted (`rest == false`) or a REST hook (Zapier) was.
pub fn hook_fired(rest: bool) {
    global().increment(if rest { statsd::REST_HOOK_FIRINGS } else { statsd::WEBHOOK_FIRINGS }, &[]);
    if prometheus_enabled() {
        metrics::counter!(prom::HOOK_FIRINGS, "kind" => if rest { "rest_hook" } else { "webhook" }).increment(1);
    }
}

// --- Plugins ----------------------------------------------------------------------------------

/// One finished plugin call, as [`crate::plugins::extensions::PluginRun`] describes it.
pub struct PluginCall<'a> {
    pub team_id: i64,
    pub plugin_config_id: i32,
    pub plugin_name: &'a str,
    pub function: &'static str,
    pub elapsed: Duration,
    pub failed: bool,
    pub task: Option<(&'static str, &'a str)>,
}

/// A plugin config's Prometheus handles for one method.
struct PluginCallHandles {
    plugin: Box<str>,
    duration: Histogram,
    errors: Counter,
}

/// The labels of a plugin call's Prometheus metrics.
fn plugin_call_labels(call: &PluginCall<'_>, method: &str) -> [metrics::Label; 4] {
    [
        metrics::Label::new("team_id", call.team_id.to_string()),
        metrics::Label::new("plugin_config_id", call.plugin_config_id.to_string()),
        metrics::Label::new("plugin", call.plugin_name.to_string()),
        metrics::Label::new("method", method.to_string()),
    ]
}

/// The reference's keys for one plugin call (`plugin.process_event`, `plugin.<name>.on_event`,
/// `….ERROR`, `plugin.export_events.success`, `plugin.task.<kind>.<task>.<id>.ERROR`), and the
/// Prometheus duration histogram and error counter per plugin config.
pub fn plugin_call(client: &super::Metrics, call: &PluginCall<'_>) {
    if client.is_enabled() {
        /// Per (team, plugin name's hash, which key): the keys of the calls that come per event.
        static KEYS: KeyCache<(i64, u64, u8)> = KeyCache::new();
        let mut team_id = itoa::Buffer::new();
        let plugin_and_team = [("plugin", call.plugin_name), ("teamId", team_id.format(call.team_id))];
        let name = call.plugin_name;
        let hash = name_hash(name);
        let error = Value::Count(1);
        let elapsed = millis(call.elapsed);
        match call.function {
            "processEvent" => {
                let key = (call.team_id, hash, 0);
                client.record_cached(&KEYS, key, &[statsd::PLUGIN_PROCESS_EVENT], &plugin_and_team, elapsed);
                if call.failed {
                    client.record(&["plugin.", name, ".process_event.ERROR"], &[], error);
                }
            }
            // onSnapshot shares onEvent's keys in the reference.
            "onEvent" | "onSnapshot" => {
                client.record_cached(&KEYS, (0, hash, 1), &["plugin.", name, ".on_event"], &[], elapsed);
                if call.failed {
                    client.record(&["plugin.", name, ".on_event.ERROR"], &[], error);
                }
            }
            "exportEvents" if !call.failed => {
                let key = (call.team_id, hash, 2);
                client.record_cached(&KEYS, key, &[statsd::EXPORT_EVENTS_SUCCESS], &plugin_and_team, elapsed);
            }
            "pluginTask" => {
                if let (true, Some((kind, task))) = (call.failed, call.task) {
                    let mut config_id = itoa::Buffer::new();
                    let config_id = config_id.format(call.plugin_config_id);
                    client.record(&["plugin.task.", kind, ".", task, ".", config_id, ".ERROR"], &[], error);
                }
            }
            _ => {}
        }
    }
    if prometheus_enabled() {
        static HANDLES: Handles<(i64, i32, &'static str), PluginCallHandles> = Handles::new();
        let seconds = call.elapsed.as_secs_f64();
        match call.task {
            // Tasks are named by the plugin: not kept.
            Some((_, task)) => {
                let labels = plugin_call_labels(call, task);
                metrics::histogram!(prom::PLUGIN_CALL_DURATION, labels.iter()).record(seconds);
                if call.failed {
                    metrics::counter!(prom::PLUGIN_CALL_ERRORS, labels.iter()).increment(1);
                }
            }
            None => {
                let make = || {
                    let labels = plugin_call_labels(call, call.function);
                    PluginCallHandles {
                        plugin: call.plugin_name.into(),
                        duration: metrics::histogram!(prom::PLUGIN_CALL_DURATION, labels.iter()),
                        errors: metrics::counter!(prom::PLUGIN_CALL_ERRORS, labels.iter()),
                    }
                };
                HANDLES.with_valid(
                    (call.team_id, call.plugin_config_id, call.function),
                    |handles| &*handles.plugin == call.plugin_name,
                    make,
                    |handles| {
                        handles.duration.record(seconds);
                        if call.failed {
                            handles.errors.increment(1);
                        }
                    },
                );
            }
        }
    }
}

/// An `exportEvents` batch failed with a RetryError: enqueued for retry number `retry`
/// (`dropped == false`) or given up after `retry` retries.
pub fn export_retry(dropped_batch: bool, retry: u32, plugin: &str, team_id: i64, batch_len: usize) {
    let (retry, team) = (retry.to_string(), team_id.to_string());
    let name = if dropped_batch { statsd::EXPORT_EVENTS_RETRY_DROPPED } else { statsd::EXPORT_EVENTS_RETRY_ENQUEUED };
    global().increment(name, &[("retry", &retry), ("plugin", plugin), ("teamId", &team)]);
    if prometheus_enabled() {
        let outcome = if dropped_batch { "dropped" } else { "enqueued" };
        metrics::counter!(prom::EXPORT_RETRIES, "outcome" => outcome, "plugin" => plugin.to_string(), "team_id" => team)
            .increment(1);
    }
    if dropped_batch {
        dropped(Stage::Plugins, "export_retries_exhausted", batch_len as u64);
    }
}

/// A plugin log entry was created (`logs.entries_created`).
pub fn log_entry_created(source: &'static str, team_id: i64, plugin_id: i64) {
    static COUNTERS: Handles<(Address, i64, i64), Counter> = Handles::new();
    static KEYS: KeyCache<(Address, i64, i64)> = KeyCache::new();
    let client = global();
    if client.is_enabled() {
        let (mut team, mut plugin) = (itoa::Buffer::new(), itoa::Buffer::new());
        let tags = [("source", source), ("team_id", team.format(team_id)), ("plugin_id", plugin.format(plugin_id))];
        let key = (address(source), team_id, plugin_id);
        client.record_cached(&KEYS, key, &[statsd::LOG_ENTRIES_CREATED], &tags, Value::Count(1));
    }
    if prometheus_enabled() {
        let make = || {
            metrics::counter!(prom::LOG_ENTRIES, "source" => source, "team_id" => team_id.to_string(),
                "plugin_id" => plugin_id.to_string())
        };
        COUNTERS.with((address(source), team_id, plugin_id), make, |counter| counter.increment(1));
    }
}

/// Heap bytes of one plugin config's VMs (all threads together), set at each scrape.
pub fn plugin_vm_memory(team_id: i64, plugin_config_id: i32, plugin: &str, bytes: i64) {
    if prometheus_enabled() {
        metrics::gauge!(
            prom::PLUGIN_VM_MEMORY,
            "team_id" => team_id.to_string(),
            "plugin_config_id" => plugin_config_id.to_string(),
            "plugin" => plugin.to_string()
        )
        .set(bytes as f64);
    }
}

// --- Jobs and schedule -------------------------------------------------------------------------

/// A job of the job queue ran (`outcome`: `ok` or `failed`).
pub fn job_run(job_type: &str, outcome: &'static str, elapsed: Duration) {
    if prometheus_enabled() {
        metrics::counter!(prom::JOB_RUNS, "type" => job_type.to_string(), "outcome" => outcome).increment(1);
    }
    task("runJob", elapsed);
}

/// A scheduled task (`runEveryMinute` ...) ran for one plugin config.
pub fn schedule_run(task_name: &'static str, plugin_config_id: i32, elapsed: Duration) {
    if prometheus_enabled() {
        metrics::counter!(prom::SCHEDULE_RUNS, "task" => task_name, "plugin_config_id" => plugin_config_id.to_string())
            .increment(1);
    }
    task(task_name, elapsed);
}

// --- Queries (the reference's `instrumentQuery`) ----------------------------------------------

/// Counts `<name>.total` (tagged `queryTag` when given), runs `query`, times it as `<name>`, and
/// in Prometheus records the duration per query and counts failures.
pub async fn instrument_query<T, E, F>(name: &'static str, tag: Option<&'static str>, query: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    static DURATIONS: Handles<(Address, Address), Histogram> = Handles::new();
    /// Per (name, tag, `.total` or the timing).
    static KEYS: KeyCache<(Address, Address, bool)> = KeyCache::new();
    let client = global();
    let prometheus = prometheus_enabled();
    if !client.is_enabled() && !prometheus {
        return query.await;
    }
    let tagged;
    let tags: &[(&str, &str)] = match tag {
        Some(tag) => {
            tagged = [("queryTag", tag)];
            &tagged
        }
        None => &[],
    };
    let key = |total| (address(name), tag.map_or((0, 0), address), total);
    client.record_cached(&KEYS, key(true), &[name, ".total"], tags, Value::Count(1));
    let start = Instant::now();
    let result = query.await;
    let elapsed = start.elapsed();
    client.record_cached(&KEYS, key(false), &[name], tags, millis(elapsed));
    if prometheus {
        let tag = tag.unwrap_or("");
        let make = || metrics::histogram!(prom::QUERY_DURATION, "query" => name, "tag" => tag);
        DURATIONS.with((address(name), address(tag)), make, |histogram| histogram.record(elapsed.as_secs_f64()));
        if result.is_err() {
            metrics::counter!(prom::QUERY_FAILURES, "query" => name, "tag" => tag).increment(1);
        }
    }
    result
}

/// A Kafka batch send failed (`query.kafka_send.failure`).
pub fn kafka_send_failed() {
    global().increment(statsd::KAFKA_SEND_FAILURE, &[]);
}

// --- Beside the stream ------------------------------------------------------------------------

/// How late a freshly spawned task started (`event_loop_lag`).
pub fn event_loop_lag(client: &super::Metrics, lag: Duration) {
    client.timing(statsd::EVENT_LOOP_LAG, lag, &[]);
    if prometheus_enabled() {
        metrics::histogram!(prom::EVENT_LOOP_LAG).record(lag.as_secs_f64());
    }
}

/// One MMDB lookup (`mmdb.internal_request`).
pub fn mmdb_request(started: Instant) {
    static KEY: StatsdKey = StatsdKey::new(statsd::MMDB_REQUEST);
    static HISTOGRAM: OnceLock<Histogram> = OnceLock::new();
    let elapsed = started.elapsed();
    global().record_key(&KEY, millis(elapsed));
    if prometheus_enabled() {
        record_fixed(&HISTOGRAM, || metrics::histogram!(prom::MMDB_REQUEST), elapsed);
    }
}

/// The staleness check restarts the server (`alerts.stale_plugin_server_restarted`).
pub fn stale_restart(client: &super::Metrics) {
    client.increment(statsd::STALE_RESTART, &[]);
    if prometheus_enabled() {
        metrics::counter!(prom::STALE_RESTARTS).increment(1);
    }
}

/// A worker pool statistic (`piscina.<name>`), also a Prometheus gauge labelled `stat`.
pub fn pool_stat(client: &super::Metrics, name: &str, value: f64) {
    client.record(&["piscina.", name], &[], Value::Gauge(value));
    if prometheus_enabled() {
        metrics::gauge!(prom::POOL, "stat" => name.to_string()).set(value);
    }
}

/// Messages waiting in a queue (`queue`: the Celery list, ...), set at each scrape.
pub fn queue_depth(queue: &'static str, depth: f64) {
    if prometheus_enabled() {
        metrics::gauge!(prom::QUEUE_DEPTH, "queue" => queue).set(depth);
    }
}

/// Items in flight in a part of the server (`consumer`, `plugin_calls`, ...), set at each scrape.
pub fn in_flight(part: &'static str, count: f64) {
    if prometheus_enabled() {
        metrics::gauge!(prom::IN_FLIGHT, "part" => part).set(count);
    }
}

/// A Postgres query (`query.postgres`, tagged with the reference's query tag).
pub async fn postgres<T, E, F>(tag: &'static str, query: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    instrument_query(statsd::POSTGRES, Some(tag), query).await
}

/// A Postgres transaction (`query.postgres_transation`, the reference's spelling).
pub async fn postgres_transaction<T, E, F>(transaction: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    instrument_query(statsd::POSTGRES_TRANSACTION, None, transaction).await
}
