//! Shared by the queue benchmarks: a counting handler with an optional simulated pipeline latency,
//! peak RSS, and the reference's summary line.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::event::PluginEvent;
use plugin_server::sources::{EventHandler, HandleError};

/// `BENCH_EVENTS` (default 3000, the reference benchmark's count).
pub fn event_count() -> usize {
    std::env::var("BENCH_EVENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(3000)
}

/// `BENCH_HANDLER_MS`: simulated time the pipeline takes per event (default 0).
pub fn handler_latency() -> Duration {
    Duration::from_millis(std::env::var("BENCH_HANDLER_MS").ok().and_then(|value| value.parse().ok()).unwrap_or(0))
}

/// `BENCH_CONCURRENCY`: events in flight (default 40 = 4 workers × 10 tasks, the reference's).
pub fn concurrency() -> usize {
    std::env::var("BENCH_CONCURRENCY").ok().and_then(|value| value.parse().ok()).unwrap_or(40)
}

#[derive(Default)]
pub struct CountingHandler {
    pub events: AtomicUsize,
    pub latency: Duration,
}

#[async_trait]
impl EventHandler for CountingHandler {
    async fn handle_event(&self, event: PluginEvent) -> Result<(), HandleError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        std::hint::black_box(event);
        self.events.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn handle_plugin_job(&self, _job: serde_json::Value) -> Result<(), HandleError> {
        Ok(())
    }
}

impl CountingHandler {
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.events.load(Ordering::Relaxed) < count {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

/// Peak resident set size of this process in MiB (`VmHWM`).
/// A numeric benchmark setting from the environment, or its default.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The reference benchmark's line, plus peak RSS.
pub fn report(label: &str, events: usize, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "[{label}] Ingested {events} events in {seconds:.2}s ({:.0} events/sec, {:.3} ms per event); peak RSS {:.1} MiB",
        events as f64 / seconds,
        seconds * 1000.0 / events as f64,
        peak_rss_mib()
    );
}

/// A fresh database `name` on the local PostgreSQL: PostHog's schema and the demo seed (team 2,
/// plugin 1 with `plugin_source`, its config 1). Returns its URL.
pub async fn fresh_database(name: &str, plugin_source: &str) -> String {
    use sqlx::{Connection, Executor, PgConnection};
    let server = "postgres://postgres@127.0.0.1:5432";
    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await.expect("postgres");
    admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create database");
    let url = format!("{server}/{name}");
    let mut connection = PgConnection::connect(&url).await.expect("bench database");
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files: Vec<_> = std::fs::read_dir(format!("{root}/migrations/posthog"))
        .expect("migrations")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    files.sort();
    files.push(format!("{root}/scripts/demo-data/seed.sql").into());
    for file in files {
        let sql = std::fs::read_to_string(&file).expect("read sql");
        sqlx::raw_sql(&sql).execute(&mut connection).await.expect("apply sql");
    }
    sqlx::query("UPDATE posthog_plugin SET source = $1 WHERE id = 1")
        .bind(plugin_source)
        .execute(&mut connection)
        .await
        .expect("set the plugin source");
    url
}

pub async fn drop_database(name: &str) {
    use sqlx::{Connection, Executor, PgConnection};
    if let Ok(mut admin) = PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await {
        let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
    }
}

/// A `process_event_with_plugins` task for `team` carrying `data`, as PostHog's Django app sends it.
pub fn celery_event_task(queue: &str, data: serde_json::Map<String, serde_json::Value>, team: i64) -> String {
    use plugin_server::sinks::celery_producer::encode_task_message;
    use plugin_server::sources::celery::PROCESS_EVENT_TASK;
    use serde_json::{json, Value};
    let now = data.get("timestamp").cloned().unwrap_or(Value::Null);
    let args = [
        data.get("distinct_id").cloned().unwrap_or(Value::Null),
        json!("127.0.0.1"),
        json!("http://localhost"),
        Value::Object(data),
        json!(team),
        now.clone(),
        now,
    ];
    encode_task_message(queue, PROCESS_EVENT_TASK, &uuid::Uuid::new_v4().to_string(), &args, &serde_json::Map::new())
}

/// Pushes Celery messages on `queue` (the first is popped first).
pub async fn push_celery(redis_url: &str, queue: &str, messages: &[String]) {
    let pool = deadpool_redis::Config::from_url(redis_url).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    let mut connection = pool.get().await.expect("redis");
    for chunk in messages.chunks(1000) {
        let mut pipe = redis::pipe();
        for message in chunk {
            pipe.cmd("LPUSH").arg(queue).arg(message).ignore();
        }
        pipe.query_async::<()>(&mut connection).await.expect("push");
    }
}

pub async fn delete_key(redis_url: &str, key: &str) {
    let pool = deadpool_redis::Config::from_url(redis_url).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    if let Ok(mut connection) = pool.get().await {
        let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut connection).await;
    }
}

/// What the databases did, read before and after a run to count the work each event causes
/// there: Redis commands by name (`INFO commandstats`, the whole instance: run with a Redis of
/// the bench's own for exact figures) and the bench database's Postgres transactions, rows read
/// and written, and table scans (`pg_stat_database`, `pg_stat_user_tables`; Postgres publishes
/// them up to a second late, so read the second snapshot after the server stopped and a pause).
#[derive(Debug, Clone, Default)]
pub struct WorkCounts {
    pub redis: std::collections::BTreeMap<String, u64>,
    /// (name, value) in a fixed order.
    pub postgres: Vec<(&'static str, i64)>,
    /// Per table: (sequential scans, rows they read, index scans, rows they fetched, inserts, updates).
    pub tables: std::collections::BTreeMap<String, [i64; 6]>,
}

impl WorkCounts {
    pub async fn read(redis_url: &str, database_url: &str) -> WorkCounts {
        let mut counts = WorkCounts::default();
        let pool =
            deadpool_redis::Config::from_url(redis_url).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
        if let Ok(mut connection) = pool.get().await {
            let info: String =
                redis::cmd("INFO").arg("commandstats").query_async(&mut connection).await.unwrap_or_default();
            // cmdstat_lpush:calls=3,usec=...
            for line in info.lines() {
                let Some((name, stats)) = line.strip_prefix("cmdstat_").and_then(|line| line.split_once(':')) else {
                    continue;
                };
                let calls =
                    stats.split(',').find_map(|field| field.strip_prefix("calls=")).and_then(|n| n.parse().ok());
                counts.redis.insert(name.to_string(), calls.unwrap_or(0));
            }
        }
        if let Ok(pool) = sqlx::PgPool::connect(database_url).await {
            let database: Option<(i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
                "SELECT xact_commit + xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted \
                 FROM pg_stat_database WHERE datname = current_database()",
            )
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten();
            let tables: Option<(Option<i64>, Option<i64>)> =
                sqlx::query_as("SELECT sum(seq_scan)::int8, sum(idx_scan)::int8 FROM pg_stat_user_tables")
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten();
            let per_table: Vec<(String, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
                "SELECT relname::text, seq_scan, seq_tup_read, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0), \
                 n_tup_ins, n_tup_upd FROM pg_stat_user_tables",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            for (name, a, b, c, d, e, f) in per_table {
                counts.tables.insert(name, [a, b, c, d, e, f]);
            }
            if let (Some(db), Some(tables)) = (database, tables) {
                counts.postgres = vec![
                    ("transactions", db.0),
                    ("rows returned", db.1),
                    ("rows fetched", db.2),
                    ("rows inserted", db.3),
                    ("rows updated", db.4),
                    ("rows deleted", db.5),
                    ("sequential scans", tables.0.unwrap_or(0)),
                    ("index scans", tables.1.unwrap_or(0)),
                ];
            }
            pool.close().await;
        }
        counts
    }

    /// Per-event differences from `before` to `self`, as lines; `own_transactions` are the
    /// bench's own (its polling) and are left out.
    pub fn per_event(&self, before: &WorkCounts, events: usize, own_transactions: i64) -> Vec<String> {
        let events = events.max(1) as f64;
        let mut redis: Vec<(String, u64)> = self
            .redis
            .iter()
            .map(|(name, calls)| (name.clone(), calls.saturating_sub(before.redis.get(name).copied().unwrap_or(0))))
            .filter(|(_, calls)| *calls > 0)
            .collect();
        redis.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
        let total: u64 = redis.iter().map(|(_, calls)| calls).sum();
        let by_name: Vec<String> =
            redis.iter().map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / events)).collect();
        let mut lines =
            vec![format!("Redis commands per event: {:.2} ({})", total as f64 / events, by_name.join(", "))];
        let postgres: Vec<String> = self
            .postgres
            .iter()
            .zip(&before.postgres)
            .map(|((name, after), (_, before))| {
                let own = if *name == "transactions" { own_transactions } else { 0 };
                format!("{name} {:.2}", (after - before - own) as f64 / events)
            })
            .collect();
        lines.push(format!("Postgres per event: {}", postgres.join(", ")));
        for (table, after) in &self.tables {
            let before = before.tables.get(table).copied().unwrap_or_default();
            let delta: Vec<f64> = after.iter().zip(before).map(|(a, b)| (a - b) as f64 / events).collect();
            if delta.iter().any(|value| *value >= 0.005) {
                lines.push(format!(
                    "  {table}: seq scans {:.2} reading {:.1} rows, index scans {:.2} fetching {:.1} rows, inserts {:.2}, updates {:.2}",
                    delta[0], delta[1], delta[2], delta[3], delta[4], delta[5]
                ));
            }
        }
        lines
    }
}
