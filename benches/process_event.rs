//! Ingestion throughput on the Postgres pipeline (port of the reference's
//! benchmarks/postgres/ingestion.benchmark.ts, plus identify/$set traffic and the
//! update-person-properties case). Each scenario runs on a fresh database with the standard
//! fixture; warm-up events fill the caches first, like the reference's five warm-up calls.
//!
//! Run: `cargo bench --bench process_event` (env `BENCH_EVENTS`, default 3000). Prints events/s
//! and, per event, the Postgres transactions (≈ statements: every autocommit statement is one)
//! and rows inserted, read from `pg_stat_database` after the run's connections closed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::stream::{self, StreamExt};
use plugin_server::event::PluginEvent;
use plugin_server::ingestion::uuidt::new_uuidt;
use plugin_server::ingestion::EventsProcessor;
use plugin_server::sinks::PostgresEventWriter;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};

use common::{TestDb, TEAM_ID};

/// Connections of the bench pool (`BENCH_POOL`, default 10 like the hub's pool).
fn pool_size() -> u32 {
    std::env::var("BENCH_POOL").ok().and_then(|value| value.parse().ok()).unwrap_or(10)
}

fn event(distinct_id: &str, name: &str, properties: Value, extra: Value) -> PluginEvent {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut object = json!({
        "distinct_id": distinct_id, "ip": "127.0.0.1", "site_url": "http://localhost", "team_id": TEAM_ID,
        "now": now, "sent_at": now, "timestamp": now, "event": name, "properties": properties,
        "uuid": new_uuidt().to_string(),
    });
    if let (Some(object), Some(extra)) = (object.as_object_mut(), extra.as_object()) {
        object.extend(extra.clone());
    }
    serde_json::from_value(object).expect("valid event")
}

/// The reference benchmark's event: `default event` from `my_id` with a token.
fn anonymous(_index: usize) -> PluginEvent {
    event("my_id", "default event", json!({"token": "THIS IS NOT A TOKEN FOR TEAM 2"}), json!({}))
}

/// A pageview with the usual browser properties: its `$initial_*` `$set_once` makes every event
/// update the person (a no-op once the values are there).
fn pageview(index: usize) -> PluginEvent {
    let properties = json!({
        "token": "THIS IS NOT A TOKEN FOR TEAM 2", "$current_url": "http://localhost/", "$browser": "Firefox",
        "$os": "Linux", "$lib": "web", "$screen_width": 1920, "page": index % 10
    });
    event(&format!("visitor-{}", index % 1000), "$pageview", properties, json!({}))
}

/// Users taking turns, so events of one user are far apart even with many in flight (the queue
/// keeps one distinct id's events in order; this bench does not model that).
const USERS: usize = 500;

/// Per user: an anonymous pageview, `$identify` with `$set`, then three events that `$set` a
/// changing counter (so every one updates the person).
fn identify_and_set(index: usize) -> PluginEvent {
    let user = index % USERS;
    let (anonymous_id, user_id) = (format!("anon-{user}"), format!("user-{user}"));
    match (index / USERS) % 5 {
        0 => event(&anonymous_id, "$pageview", json!({"$browser": "Firefox"}), json!({})),
        1 => event(
            &user_id,
            "$identify",
            json!({"$anon_distinct_id": anonymous_id, "$set": {"email": format!("{user}@example.com")}}),
            json!({}),
        ),
        step => event(
            &user_id,
            "purchase",
            json!({"$set": {"purchases": step - 1, "plan": "pro"}, "price": 9.5}),
            json!({}),
        ),
    }
}

/// The reference's update-person-properties benchmark (stale there): one person, `$set` /
/// `$set_once` of changing values on every event.
fn update_person_properties(index: usize) -> PluginEvent {
    event(
        "person-being-updated",
        "$pageview",
        json!({}),
        json!({"$set": {"counter": index, "last_seen": index % 7}, "$set_once": {"first": index}}),
    )
}

struct Stats {
    transactions: i64,
    inserted: i64,
}

async fn database_stats(name: &str) -> Stats {
    let url = common::database_url("postgres");
    let mut admin = PgConnection::connect(&url).await.expect("admin connection");
    // Backends report their counters when they exit; give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (transactions, inserted): (i64, i64) =
        sqlx::query_as("SELECT xact_commit + xact_rollback, tup_inserted FROM pg_stat_database WHERE datname = $1")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("pg_stat_database");
    let _ = admin.close().await;
    Stats { transactions, inserted }
}

async fn scenario(label: &str, events: usize, in_flight: usize, make: fn(usize) -> PluginEvent) {
    let db = TestDb::with_fixture(None).await;
    db.pool.close().await;
    let pool = PgPoolOptions::new().max_connections(pool_size()).connect(&db.url).await.expect("bench pool");
    let processor = EventsProcessor::from_parts(
        pool.clone(),
        Arc::new(PostgresEventWriter::new(pool.clone())),
        10_000,
        Duration::from_secs(30),
    );
    // Warm-up (caches, the first person); not measured.
    for index in 0..5 {
        processor.ingest_event(make(index)).await.expect("warm-up event");
    }
    let before = database_stats(&db.name).await;

    let started = Instant::now();
    let failures = stream::iter(5..events + 5)
        .map(|index| {
            let processor = &processor;
            async move { processor.ingest_event(make(index)).await.is_err() }
        })
        .buffer_unordered(in_flight)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    let elapsed = started.elapsed();
    pool.close().await;
    let after = database_stats(&db.name).await;

    let per_event = |value: i64| value as f64 / events as f64;
    println!(
        "{label:<44} {in_flight:>3} in flight  {events:>6} events  {:>9.0} events/s  {:>6.3} ms/event  \
         {:>5.2} transactions/event  {:>5.2} rows inserted/event  {failures} failed",
        events as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / events as f64,
        per_event(after.transactions - before.transactions),
        per_event(after.inserted - before.inserted),
    );
    let mut admin = PgConnection::connect(&common::database_url("postgres")).await.expect("admin connection");
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name)).execute(&mut admin).await;
}

fn main() {
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(3000);
    // `cargo bench` passes `--bench`; a filter argument selects scenarios by substring.
    let filter = std::env::args().skip(1).find(|argument| !argument.starts_with('-')).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    type Scenario = (&'static str, fn(usize) -> PluginEvent);
    let scenarios: [Scenario; 4] = [
        ("anonymous events (reference ingestion bench)", anonymous),
        ("pageviews of 1000 visitors", pageview),
        ("identify + $set heavy traffic", identify_and_set),
        ("update person properties", update_person_properties),
    ];
    runtime.block_on(async {
        for (label, make) in scenarios {
            if !label.contains(filter.as_str()) {
                continue;
            }
            for in_flight in [1, 16, 64] {
                scenario(label, events, in_flight, make).await;
            }
        }
    });
}
