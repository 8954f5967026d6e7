//! Every metric the server sends, in one place: the statsd names (the reference's, spec 40 §6.4;
//! grep the reference's `statsd?.` calls for the list) and the Prometheus names, each behind one
//! function that call sites use. No other module spells a metric name.
//!
//! Statsd goes through the process-wide [`super::global`] client (a no-op without
//! `STATSD_HOST`); Prometheus goes through the `metrics` facade, recorded only once
//! [`super::prometheus::install`] ran (`HTTP_SERVER_PORT` ≠ 0), so with both off a call costs a
//! couple of loads.
//!
//! Instrumentation by rule: every stage ([`Stage`]) counts what it received, what it handled, and
//! what it dropped or dead-lettered with the reason ([`received`], [`handled`], [`dropped`]).
//! Drops also go to statsd (`events_dropped`, tagged `stage` and `reason`), so that nothing is
//! dropped without a counter an operator sees on either side.

use std::time::{Duration, Instant};

use super::global;
use super::prometheus::enabled as prometheus_enabled;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// `count` items entered `stage` (`source` says which queue or kind: `celery`, `kafka`, ...).
pub fn received(stage: Stage, source: &'static str, count: u64) {
    if prometheus_enabled() {
        metrics::counter!(prom::EVENTS_RECEIVED, "stage" => stage.as_str(), "source" => source).increment(count);
    }
}

/// `count` items left `stage` done.
pub fn handled(stage: Stage, source: &'static str, count: u64) {
    if prometheus_enabled() {
        metrics::counter!(prom::EVENTS_HANDLED, "stage" => stage.as_str(), "source" => source).increment(count);
    }
}

/// `count` items left `stage` without being handled: dropped by a plugin, dead-lettered, refused,
/// given up on. `reason` is a short fixed word (`plugin_dropped`, `undecodable`, `rejected`,
/// `out_of_retries`, `too_large`, ...), never an error message.
pub fn dropped(stage: Stage, reason: &'static str, count: u64) {
    let client = global();
    if client.is_enabled() {
        client.count(statsd::EVENTS_DROPPED, count as i64, &[("stage", stage.as_str()), ("reason", reason)]);
    }
    if prometheus_enabled() {
        metrics::counter!(prom::EVENTS_DROPPED, "stage" => stage.as_str(), "reason" => reason).increment(count);
    }
}

fn histogram(name: &'static str, elapsed: Duration, labels: &[(&'static str, String)]) {
    let labels: Vec<metrics::Label> =
        labels.iter().map(|(key, value)| metrics::Label::new(*key, value.clone())).collect();
    metrics::histogram!(name, labels).record(elapsed.as_secs_f64());
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

impl EventStep {
    fn statsd_name(self) -> &'static str {
        match self {
            EventStep::ProcessEvent => statsd::SINGLE_EVENT,
            EventStep::Ingestion => statsd::SINGLE_INGESTION,
            EventStep::OnEvent => statsd::SINGLE_ON_EVENT,
            EventStep::OnSnapshot => statsd::SINGLE_ON_SNAPSHOT,
        }
    }

    /// The reference's worker task name (`piscina_task.<task>`).
    fn task(self) -> &'static str {
        match self {
            EventStep::ProcessEvent => "processEvent",
            EventStep::Ingestion => "ingestEvent",
            EventStep::OnEvent => "onEvent",
            EventStep::OnSnapshot => "onSnapshot",
        }
    }
}

/// One step of one event finished: `kafka_queue.single_<step>` and `piscina_task.<task>` (the
/// reference times both, on the main thread and in the worker; here they are one call).
pub fn event_step(step: EventStep, elapsed: Duration) {
    let client = global();
    if client.is_enabled() {
        client.timing(step.statsd_name(), elapsed, &[]);
        client.timing(&format!("piscina_task.{}", step.task()), elapsed, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::STAGE_DURATION, "step" => step.task()).record(elapsed.as_secs_f64());
    }
}

/// One event went through the whole pipeline (`kafka_queue.each_event`).
pub fn each_event(elapsed: Duration) {
    let client = global();
    if client.is_enabled() {
        client.timing(statsd::EACH_EVENT, elapsed, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::STAGE_DURATION, "step" => "each_event").record(elapsed.as_secs_f64());
    }
}

/// One batch of consumed messages was handled (`kafka_queue.each_batch`).
pub fn each_batch(elapsed: Duration) {
    let client = global();
    if client.is_enabled() {
        client.timing(statsd::EACH_BATCH, elapsed, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::STAGE_DURATION, "step" => "each_batch").record(elapsed.as_secs_f64());
    }
}

/// A worker task beside the event path ran (`piscina_task.<task>`: `runEveryMinute`, `runJob`,
/// `reloadPlugins`, ...).
pub fn task(task: &'static str, elapsed: Duration) {
    let client = global();
    if client.is_enabled() {
        client.timing(&format!("piscina_task.{task}"), elapsed, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::TASK_DURATION, "task" => task).record(elapsed.as_secs_f64());
    }
}

/// The event (standard or `$snapshot`) was saved (`kafka_queue.single_save.*`, from the start of
/// its processing).
pub fn single_save(snapshot: bool, team_id: i64, started: Instant) {
    let elapsed = started.elapsed();
    let client = global();
    let team = team_id.to_string();
    if client.is_enabled() {
        let name = if snapshot { statsd::SINGLE_SAVE_SNAPSHOT } else { statsd::SINGLE_SAVE_STANDARD };
        client.timing(name, elapsed, &[("team_id", &team)]);
    }
    if prometheus_enabled() {
        let kind = if snapshot { "save_snapshot" } else { "save_standard" };
        histogram(prom::STAGE_DURATION, elapsed, &[("step", kind.to_string()), ("team_id", team)]);
    }
}

/// `$identify` / `$create_alias` with an illegal distinct id was ignored.
pub fn illegal_distinct_id(distinct_id: &str) {
    let client = global();
    if client.is_enabled() {
        client.increment(statsd::ILLEGAL_DISTINCT_IDS, &[("distinctId", distinct_id)]);
    }
    if prometheus_enabled() {
        metrics::counter!(prom::ILLEGAL_DISTINCT_IDS).increment(1);
    }
}

/// An event whose ingestion failed went to `events_dead_letter_queue`.
pub fn event_dead_lettered() {
    let client = global();
    if client.is_enabled() {
        client.increment(statsd::DEAD_LETTER_QUEUE, &[]);
    }
    dropped(Stage::DeadLetters, "ingestion_failed", 1);
}

// --- Actions and hooks ------------------------------------------------------------------------

/// Action matching ran for one event and found `matches` actions.
pub fn action_matching(elapsed: Duration, matches: usize) {
    let client = global();
    if client.is_enabled() {
        client.timing(statsd::ACTION_MATCHING, elapsed, &[]);
        client.count(statsd::ACTION_MATCHES_FOUND, matches as i64, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::ACTION_MATCHING_DURATION).record(elapsed.as_secs_f64());
        metrics::counter!(prom::ACTION_MATCHES).increment(matches as u64);
    }
}

/// A Slack/Teams webhook was posted (`rest == false`) or a REST hook (Zapier) was.
pub fn hook_fired(rest: bool) {
    let client = global();
    if client.is_enabled() {
        client.increment(if rest { statsd::REST_HOOK_FIRINGS } else { statsd::WEBHOOK_FIRINGS }, &[]);
    }
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

/// The reference's keys for one plugin call (`plugin.process_event`, `plugin.<name>.on_event`,
/// `….ERROR`, `plugin.export_events.success`, `plugin.task.<kind>.<task>.<id>.ERROR`), and the
/// Prometheus duration histogram and error counter per plugin config.
pub fn plugin_call(client: &super::Metrics, call: &PluginCall<'_>) {
    if client.is_enabled() {
        let team_id = call.team_id.to_string();
        let plugin_and_team = [("plugin", call.plugin_name), ("teamId", team_id.as_str())];
        let name = call.plugin_name;
        match call.function {
            "processEvent" => {
                client.timing(statsd::PLUGIN_PROCESS_EVENT, call.elapsed, &plugin_and_team);
                if call.failed {
                    client.increment(&format!("plugin.{name}.process_event.ERROR"), &[]);
                }
            }
            // onSnapshot shares onEvent's keys in the reference.
            "onEvent" | "onSnapshot" => {
                client.timing(&format!("plugin.{name}.on_event"), call.elapsed, &[]);
                if call.failed {
                    client.increment(&format!("plugin.{name}.on_event.ERROR"), &[]);
                }
            }
            "exportEvents" if !call.failed => {
                client.timing(statsd::EXPORT_EVENTS_SUCCESS, call.elapsed, &plugin_and_team);
            }
            "pluginTask" => {
                if let (true, Some((kind, task))) = (call.failed, call.task) {
                    let config_id = call.plugin_config_id;
                    client.increment(&format!("plugin.task.{kind}.{task}.{config_id}.ERROR"), &[]);
                }
            }
            _ => {}
        }
    }
    if prometheus_enabled() {
        let method = match call.task {
            Some((_, task)) => task.to_string(),
            None => call.function.to_string(),
        };
        let labels = [
            ("team_id", call.team_id.to_string()),
            ("plugin_config_id", call.plugin_config_id.to_string()),
            ("plugin", call.plugin_name.to_string()),
            ("method", method),
        ];
        histogram(prom::PLUGIN_CALL_DURATION, call.elapsed, &labels);
        if call.failed {
            let labels: Vec<metrics::Label> =
                labels.iter().map(|(key, value)| metrics::Label::new(*key, value.clone())).collect();
            metrics::counter!(prom::PLUGIN_CALL_ERRORS, labels).increment(1);
        }
    }
}

/// An `exportEvents` batch failed with a RetryError: enqueued for retry number `retry`
/// (`dropped == false`) or given up after `retry` retries.
pub fn export_retry(dropped_batch: bool, retry: u32, plugin: &str, team_id: i64, batch_len: usize) {
    let client = global();
    let (retry, team) = (retry.to_string(), team_id.to_string());
    if client.is_enabled() {
        let name =
            if dropped_batch { statsd::EXPORT_EVENTS_RETRY_DROPPED } else { statsd::EXPORT_EVENTS_RETRY_ENQUEUED };
        client.increment(name, &[("retry", &retry), ("plugin", plugin), ("teamId", &team)]);
    }
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
pub fn log_entry_created(source: &str, team_id: i64, plugin_id: i64) {
    let client = global();
    let (team, plugin) = (team_id.to_string(), plugin_id.to_string());
    if client.is_enabled() {
        client
            .increment(statsd::LOG_ENTRIES_CREATED, &[("source", source), ("team_id", &team), ("plugin_id", &plugin)]);
    }
    if prometheus_enabled() {
        metrics::counter!(prom::LOG_ENTRIES, "source" => source.to_string(), "team_id" => team, "plugin_id" => plugin)
            .increment(1);
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
    if client.is_enabled() {
        client.increment(&format!("{name}.total"), tags);
    }
    let start = Instant::now();
    let result = query.await;
    if client.is_enabled() {
        client.timing_since(name, start, tags);
    }
    if prometheus {
        let tag = tag.unwrap_or("");
        metrics::histogram!(prom::QUERY_DURATION, "query" => name, "tag" => tag).record(start.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!(prom::QUERY_FAILURES, "query" => name, "tag" => tag).increment(1);
        }
    }
    result
}

/// A Kafka batch send failed (`query.kafka_send.failure`).
pub fn kafka_send_failed() {
    let client = global();
    if client.is_enabled() {
        client.increment(statsd::KAFKA_SEND_FAILURE, &[]);
    }
}

// --- Beside the stream ------------------------------------------------------------------------

/// How late a freshly spawned task started (`event_loop_lag`).
pub fn event_loop_lag(client: &super::Metrics, lag: Duration) {
    if client.is_enabled() {
        client.timing(statsd::EVENT_LOOP_LAG, lag, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::EVENT_LOOP_LAG).record(lag.as_secs_f64());
    }
}

/// One MMDB lookup (`mmdb.internal_request`).
pub fn mmdb_request(started: Instant) {
    let elapsed = started.elapsed();
    let client = global();
    if client.is_enabled() {
        client.timing(statsd::MMDB_REQUEST, elapsed, &[]);
    }
    if prometheus_enabled() {
        metrics::histogram!(prom::MMDB_REQUEST).record(elapsed.as_secs_f64());
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
    client.gauge(&format!("piscina.{name}"), value, &[]);
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
