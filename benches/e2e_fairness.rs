//! Fair share of the consumer's window, end to end through the real server (issue 14), Celery
//! mode: team B's events/s with and without team A's load, where team A's plugin spins until
//! `TASK_TIMEOUT` on every event and team B's is the reference benchmark's simple plugin.
//! Target: team B keeps at least 70% of its unloaded rate.
//!
//! Four runs, each in a process of its own, on a fresh database and queue with the server in
//! process: team B's events
//! alone, then twice the same number of team B's events with team A's events interleaved (one in
//! every `BENCH_A_EVERY`, from the front of the queue), then alone again; the means are compared. Team B's rate is measured from its first
//! event landed to its last (start-up excluded, as in `e2e_server`).
//!
//! Run: `cargo bench --bench e2e_fairness` (env: BENCH_EVENTS, team B's events, default 10000;
//! BENCH_A_EVERY, default 10; TASK_TIMEOUT, default 1; WORKER_CONCURRENCY / TASKS_PER_WORKER as
//! for the server; LOG_LEVEL, default warn). Needs PostgreSQL and Redis on 127.0.0.1.

mod e2e_support;

/// The server binary's allocator (src/main.rs), so the in-process server runs as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use e2e_support::*;
use plugin_server::config::Config;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

/// Team B: the reference benchmark's plugin (the seed's plugin 1, team 2).
const SIMPLE: &str = "export function processEvent(event) { event.properties.processed = 'yes'; return event }";
const TEAM_B: i64 = 2;
/// Team A: a plugin that spins until `TASK_TIMEOUT` on every event (team 3).
const SPIN: &str = "export function processEvent(event) { for (;;) {} }";
const TEAM_A: i64 = 3;

fn event_data(index: usize) -> Map<String, Value> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let data = json!({"event": "$pageview", "distinct_id": format!("user-{}", index % 1000), "timestamp": now,
        "uuid": uuid::Uuid::new_v4().to_string(), "properties": {"index": index}});
    match data {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Team A: team 3 of the seed's organization, with the spinning plugin.
async fn add_team_a(database: &str) {
    let pool = sqlx::PgPool::connect(database).await.expect("bench database");
    sqlx::raw_sql(
        "INSERT INTO posthog_team (id, organization_id, name, api_token, uuid, anonymize_ips, ingested_event)
         VALUES (3, '018c0000-0000-7000-8000-000000000001', 'Team A', 'team-a-token',
                 '018c0000-0000-7000-8000-0000000000a3', false, false);
         INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, source, config_schema)
         VALUES (2, '018c0000-0000-7000-8000-000000000001', 'source', 'spinner', 'spins', '', '[]');
         INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config)
         VALUES (2, 3, 2, true, 0, '{}');",
    )
    .execute(&pool)
    .await
    .expect("team A");
    sqlx::query("UPDATE posthog_plugin SET source = $1 WHERE id = 2").bind(SPIN).execute(&pool).await.expect("spin");
    pool.close().await;
}

/// One run: team B's steady events/s, and how many of team A's events landed meanwhile.
async fn run(b_events: usize, a_every: Option<usize>) -> (f64, i64) {
    let name = format!("pst_bench_{}", uuid::Uuid::new_v4().simple());
    let database = fresh_database(&name, SIMPLE).await;
    add_team_a(&database).await;
    let queue = format!("bench-fair-{}", uuid::Uuid::new_v4().simple());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut messages = Vec::new();
    for index in 0..b_events {
        if a_every.is_some_and(|every| index % every.max(1) == 0) {
            messages.push(celery_event_task(&queue, event_data(index), TEAM_A));
        }
        messages.push(celery_event_task(&queue, event_data(index), TEAM_B));
    }
    push_celery(&redis_url, &queue, &messages).await;
    let mut pairs = vec![
        ("DATABASE_URL".to_string(), database.clone()),
        ("REDIS_URL".to_string(), redis_url.clone()),
        ("LOG_LEVEL".to_string(), std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into())),
        ("DISABLE_MMDB".to_string(), "true".to_string()),
        ("PLUGINS_CELERY_QUEUE".to_string(), queue.clone()),
        ("TASK_TIMEOUT".to_string(), std::env::var("TASK_TIMEOUT").unwrap_or_else(|_| "1".into())),
    ];
    for key in ["WORKER_CONCURRENCY", "TASKS_PER_WORKER"] {
        if let Ok(value) = std::env::var(key) {
            pairs.push((key.to_string(), value));
        }
    }
    let config =
        Config::from_lookup(&|key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())).expect("config");
    plugin_server::logging::init(config.LOG_LEVEL, "MAIN");
    let rows = sqlx::PgPool::connect(&database).await.expect("bench database");
    let count = async |team: i64| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM posthog_event WHERE team_id = $1")
            .bind(team)
            .fetch_one(&rows)
            .await
            .unwrap_or(0)
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let server = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
    let deadline = started + Duration::from_secs(600);
    let mut first: Option<(Instant, i64)> = None;
    let mut landed = 0;
    while landed < b_events as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        landed = count(TEAM_B).await;
        if landed > 0 && first.is_none() {
            first = Some((Instant::now(), landed));
        }
    }
    let finished = Instant::now();
    let a_landed = count(TEAM_A).await;
    let rate = match first {
        Some((at, count)) if finished > at => (landed - count) as f64 / (finished - at).as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "  ({landed} of team B's {b_events} events in {:.1}s, first at {:.1}s; {a_landed} of team A's landed; peak RSS \
         {:.1} MiB)",
        (finished - started).as_secs_f64(),
        first.map_or(0.0, |(at, _)| (at - started).as_secs_f64()),
        peak_rss_mib()
    );
    // Team A's events still in hand wait for the JS threads: no graceful stop (the process ends).
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    rows.close().await;
    drop_database(&name).await;
    delete_key(&redis_url, &queue).await;
    (rate, a_landed)
}

/// Runs one phase in a process of its own (`BENCH_PHASE` set), so that no thread of a previous
/// server (team A's calls still queued on the JS threads) competes with the next run.
fn run_phase(loaded: bool) -> f64 {
    let exe = std::env::current_exe().expect("bench binary");
    let output = std::process::Command::new(exe)
        .env("BENCH_PHASE", if loaded { "loaded" } else { "alone" })
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run a phase");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut rate = 0.0;
    for line in stdout.lines() {
        match line.strip_prefix("RATE ") {
            Some(value) => rate = value.trim().parse().unwrap_or(0.0),
            None if line.starts_with("  (") => println!("{line}"),
            None => {}
        }
    }
    rate
}

fn main() {
    let b_events = env_number("BENCH_EVENTS", 10_000);
    let a_every = env_number("BENCH_A_EVERY", 10);
    if let Ok(phase) = std::env::var("BENCH_PHASE") {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (rate, _) = runtime.block_on(run(b_events, (phase == "loaded").then_some(a_every)));
        println!("RATE {rate}");
        // Team A's calls may still be queued on the JS threads: exit without waiting for them.
        std::process::exit(0);
    }
    // Alone, loaded, loaded, alone: a machine whose load drifts during the runs biases neither.
    let (mut alone, mut loaded) = (Vec::new(), Vec::new());
    for a_load in [false, true, true, false] {
        if a_load {
            println!("Team B with team A's spinning events (one in every {a_every}), {b_events} of team B's events:");
            loaded.push(run_phase(true));
        } else {
            println!("Team B alone, {b_events} events:");
            alone.push(run_phase(false));
        }
    }
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    println!("(team B's events/s: alone {alone:.0?}, with team A's load {loaded:.0?})");
    let (alone, loaded) = (mean(&alone), mean(&loaded));
    println!(
        "[Fair window, Celery + Postgres] team B: {alone:.0} events/s alone, {loaded:.0} events/s with team A's load \
         ({:.0}%; target at least 70%; means of two runs each)",
        loaded * 100.0 / alone.max(f64::MIN_POSITIVE),
    );
}
