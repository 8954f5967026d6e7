//! The whole server, end to end, in the Postgres pipeline (the reference's
//! benchmarks/postgres/e2e.celery.benchmark.ts): N `process_event_with_plugins` Celery tasks are
//! queued in Redis, then the server (in process, a real plugin on its JavaScript threads) is started
//! and timed until every event is a `posthog_event` row. Prints events/s and peak RSS.
//!
//! Run: `cargo bench --bench e2e_server` (env: BENCH_EVENTS, default 10000; BENCH_USERS, distinct
//! users, default 1000; WORKER_CONCURRENCY / TASKS_PER_WORKER as for the server). Needs PostgreSQL
//! and Redis on 127.0.0.1 (`scripts/services`).

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::*;
use plugin_server::config::Config;
use plugin_server::ingestion::queues::celery::{encode_task_message, PROCESS_EVENT_TASK};
use serde_json::{json, Map};
use sqlx::{Connection, Executor, PgConnection};
use tokio_util::sync::CancellationToken;

/// The reference benchmark's plugin.
const PLUGIN: &str = "export function processEvent(event) { event.properties.processed = 'yes'; return event }";

async fn fresh_database(name: &str) -> String {
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
        .bind(PLUGIN)
        .execute(&mut connection)
        .await
        .unwrap();
    url
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let users: usize = std::env::var("BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let name = format!("pst_bench_{}", uuid::Uuid::new_v4().simple());
    let database = fresh_database(&name).await;
    let queue = format!("bench-e2e-{}", uuid::Uuid::new_v4().simple());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut pairs = vec![
        ("DATABASE_URL".to_string(), database.clone()),
        ("REDIS_URL".to_string(), redis_url.clone()),
        ("PLUGINS_CELERY_QUEUE".to_string(), queue.clone()),
        ("LOG_LEVEL".to_string(), "warn".to_string()),
        ("DISABLE_MMDB".to_string(), "true".to_string()),
    ];
    for key in ["WORKER_CONCURRENCY", "TASKS_PER_WORKER"] {
        if let Ok(value) = std::env::var(key) {
            pairs.push((key.to_string(), value));
        }
    }
    let config = Config::from_lookup(&|key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())).unwrap();

    let pool = deadpool_redis::Config::from_url(&redis_url).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    let mut connection = pool.get().await.expect("redis");
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for index in chunk {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let distinct_id = format!("user-{}", index % users);
            let data = json!({"event": "$pageview", "distinct_id": distinct_id, "timestamp": now,
                "properties": {"$current_url": "https://example.com/", "$browser": "Chrome", "index": index}});
            let args = [
                json!(distinct_id),
                json!("127.0.0.1"),
                json!("http://localhost"),
                data,
                json!(2),
                json!(now),
                json!(now),
            ];
            let message =
                encode_task_message(&queue, PROCESS_EVENT_TASK, &uuid::Uuid::new_v4().to_string(), &args, &Map::new());
            pipe.cmd("LPUSH").arg(&queue).arg(message).ignore();
        }
        pipe.query_async::<()>(&mut connection).await.expect("push");
    }
    drop(connection);

    let rows = sqlx::PgPool::connect(&database).await.unwrap();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let server = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
    let deadline = started + Duration::from_secs(900);
    let mut ingested = 0;
    while ingested < events as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ingested = sqlx::query_scalar("SELECT count(*) FROM posthog_event").fetch_one(&rows).await.unwrap();
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    let _ = server.await;
    println!("(start-up included: loading the plugin and joining the queue)");
    report(
        &format!("Server e2e, Celery + Postgres, {users} users, {ingested} of {events} events ingested"),
        events,
        elapsed,
    );
    rows.close().await;
    let mut admin = PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await.unwrap();
    let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
}
