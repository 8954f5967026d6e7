//! The server process in Celery mode against what used to stall or skip it (issue 14):
//! * the fair share of the consumer's window: two teams, team A's plugin spins until
//!   `TASK_TIMEOUT` on every event, team B's is a simple one. Team A's events beyond its share of
//!   the window are held back, and team B's events, queued behind them, land anyway;
//! * a pool-level failure (the plugin's JS worker thread stalls, is replaced, the call retried
//!   there and lost again): the event is retried by the consumer, then dead-lettered with the
//!   reason, never written without the plugin.

mod common;

use std::time::{Duration, Instant};

use common::server_process::Server;
use common::TestDb;
use serde_json::json;

/// Team A (the fixture's team 2, plugin 60): every event spins until `TASK_TIMEOUT`.
const SPIN: &str = "export function processEvent (event) { for (;;) {} }";
/// Team B (team 3, plugin 61).
const SIMPLE: &str = "export function processEvent (event) { event.properties.simple = 'ran'; return event }";
const TEAM_B: i32 = 3;

fn task(queue: &str, index: usize, team: i32) -> String {
    common::process_event_task(queue, &format!("task-{team}-{index}"), index, team, &format!("team {team} event"))
}

fn redis() -> redis::Connection {
    redis::Client::open(common::redis_url()).unwrap().get_connection().unwrap()
}

/// The properties of the event named `event` once it is written (within 30 s).
async fn landed(pool: &sqlx::PgPool, event: &str, server: &mut Server) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT properties FROM posthog_event WHERE event = $1")
                .bind(event)
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some(properties) = found {
            return properties;
        }
        assert!(Instant::now() < deadline, "event {event} did not land: {}", server.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events_of(pool: &sqlx::PgPool, team: i32) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM posthog_event WHERE team_id = $1")
        .bind(team)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_b_lands_while_team_a_holds_its_whole_share_of_the_window() {
    // WORKER_CONCURRENCY=2 × TASKS_PER_WORKER=1 × 20: a team's share is 40 events in flight, 80
    // for all teams, 320 held back at most. Before the fair share, the whole window was 40: team
    // A's first 40 events filled it, each waiting for its turn on the JS threads (the pool gives a
    // spinning config one thread, 25% of its time, 3 s per call), and team B's events were not
    // even taken for minutes. (Team A's first calls hold both threads for 3 s: it was alone.)
    const A_EVENTS: usize = 150;
    const B_EVENTS: usize = 30;
    let db = TestDb::with_fixture(Some(SPIN)).await;
    common::create_team(&db.pool, TEAM_B, common::COMMON_ORGANIZATION_ID).await;
    common::add_plugin_config(&db.pool, 61, 41, TEAM_B, 0, SIMPLE).await;
    let queue = common::unique_prefix("e2e-fair-window");
    let consumer = format!("fair-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::redis_url();
    // Team A's events first: they are taken first (producers LPUSH, the consumer pops the right).
    let mut messages: Vec<String> = (0..A_EVENTS).map(|index| task(&queue, index, common::TEAM_ID)).collect();
    messages.extend((0..B_EVENTS).map(|index| task(&queue, index, TEAM_B)));
    let _: i64 = redis::cmd("LPUSH").arg(&queue).arg(&messages).query(&mut redis()).unwrap();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("LOG_LEVEL", "info"),
        ("WORKER_CONCURRENCY", "2"),
        ("TASKS_PER_WORKER", "1"),
        ("TASK_TIMEOUT", "3"),
        ("PLUGINS_CELERY_QUEUE", queue.as_str()),
        ("CELERY_DEFAULT_QUEUE", "e2e-fair-window-default"),
        ("PLUGINS_CELERY_CONSUMER_ID", consumer.as_str()),
    ];
    let started = Instant::now();
    let mut server = Server::start(&[], &env);
    let deadline = started + Duration::from_secs(25);
    while events_of(&db.pool, TEAM_B).await < B_EVENTS as i64 {
        assert!(
            Instant::now() < deadline,
            "{} of team B's {B_EVENTS} events landed: {}",
            events_of(&db.pool, TEAM_B).await,
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("team B's {B_EVENTS} events landed {:.1}s after the start", started.elapsed().as_secs_f64());
    // Team A's events were all taken (40 in flight, the rest held back), none lost or skipped.
    let output = server.output();
    assert!(output.contains("team 2 has 40 events in flight, its share of the window (40)"), "{output}");
    let left: i64 = redis::cmd("LLEN").arg(&queue).query(&mut redis()).unwrap();
    assert_eq!(left, 0, "everything was taken from the queue");
    let processing = plugin_server::sources::celery_consumer::processing_key(&queue, &consumer);
    // Read until the two reads agree: an event of team A may land between them (its row is
    // written before its message leaves the list).
    let read_until = Instant::now() + Duration::from_secs(5);
    loop {
        let unfinished: i64 = redis::cmd("LLEN").arg(&processing).query(&mut redis()).unwrap();
        let landed = events_of(&db.pool, common::TEAM_ID).await as usize;
        if unfinished as usize == A_EVENTS - landed || Instant::now() > read_until {
            assert_eq!(unfinished as usize, A_EVENTS - landed);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A stop puts team A's held-back events back on the queue (the ones in flight wait for their
    // turn on the JS threads, too long for a test): kill it, its messages stay in its list.
    server.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = server.wait_exit(Duration::from_secs(10));
    let _: i64 = redis::cmd("DEL").arg(&queue).arg(&processing).query(&mut redis()).unwrap();
}

/// A native operation the CPU deadline cannot interrupt (one BigInt-to-decimal conversion takes
/// seconds): the thread's heartbeat goes silent and the pool declares it stalled.
const STALLING: &str = r#"
    export function processEvent (event) {
        if (event.event === 'stall') {
            event.properties.digits = String(7n ** 350000n).length
        }
        event.properties.ran = true
        return event
    }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_plugin_thread_stalls_is_retried_then_dead_lettered_never_written_without_it() {
    let db = TestDb::with_fixture(Some(STALLING)).await;
    let queue = common::unique_prefix("e2e-stall");
    let consumer = format!("stall-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::redis_url();
    let task_of = |index: usize, event: &str| {
        common::process_event_task(&queue, &format!("task-{index}"), index, common::TEAM_ID, event)
    };
    let stall = task_of(0, "stall");
    let _: i64 = redis::cmd("LPUSH").arg(&queue).arg(&stall).query(&mut redis()).unwrap();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("LOG_LEVEL", "info"),
        ("WORKER_CONCURRENCY", "1"),
        ("TASK_TIMEOUT", "1"),
        ("PLUGIN_WORKER_STALL_MS", "300"),
        ("INGESTION_RETRY_ATTEMPTS", "3"),
        ("INGESTION_RETRY_BACKOFF_MS", "100"),
        ("PLUGINS_CELERY_QUEUE", queue.as_str()),
        ("CELERY_DEFAULT_QUEUE", "e2e-stall-default"),
        ("PLUGINS_CELERY_CONSUMER_ID", consumer.as_str()),
    ];
    let mut server = Server::start(&[], &env);
    if plugin_server::config::JsEngine::from_process_env() == plugin_server::config::JsEngine::V8 {
        // V8 converts the BigInt in well under a second (its conversion is interruptible too):
        // nothing stalls, and the event lands with its plugin's work.
        let properties = landed(&db.pool, "stall", &mut server).await;
        assert_eq!((&properties["digits"], &properties["ran"]), (&json!(295785), &json!(true)));
        server.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0), "{}", server.output());
        return;
    }
    let dead_letters = plugin_server::sources::celery_consumer::dead_letter_key(&queue);
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead: Vec<String> = loop {
        let dead: Vec<String> = redis::cmd("LRANGE").arg(&dead_letters).arg(0).arg(-1).query(&mut redis()).unwrap();
        if !dead.is_empty() {
            break dead;
        }
        assert!(Instant::now() < deadline, "not dead-lettered: {}", server.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let entry: serde_json::Value = serde_json::from_str(&dead[0]).unwrap();
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("could not run processEvent"), "{entry}");
    assert!(reason.contains("stalled"), "{entry}");
    assert!(reason.ends_with("(gave up after 3 attempts)"), "{entry}");
    assert_eq!(entry["message"], json!(stall));
    let output = server.output();
    assert_eq!(output.matches("retrying in").count(), 2, "two retries by the consumer: {output}");
    // Never written without its plugin.
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_event WHERE event = 'stall'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(written, 0);
    // The server goes on: the next event runs through the plugin (on a fresh thread) and lands.
    let _: i64 = redis::cmd("LPUSH").arg(&queue).arg(task_of(1, "fine")).query(&mut redis()).unwrap();
    let properties = landed(&db.pool, "fine", &mut server).await;
    assert_eq!(properties["ran"], json!(true));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0), "{}", server.output());
    let _: i64 = redis::cmd("DEL").arg(&queue).arg(&dead_letters).query(&mut redis()).unwrap();
}
