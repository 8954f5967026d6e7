//! The server process in the Postgres pipeline under Celery faults (issue 14): `kill -9` in the
//! middle of a backlog then a restart (nothing lost, duplicates rare and carrying one uuid, the
//! dead run's messages back at once), and a message that kills the server every time it is
//! handled (dead-lettered after `PLUGINS_CELERY_MAX_DELIVERIES` deliveries, the rest flowing).

mod common;

use std::time::{Duration, Instant};

use common::server_process::Server;
use common::TestDb;
use plugin_server::sources::celery::{decode_task, TaskSet};
use plugin_server::sources::celery_consumer::{dead_letter_key, processing_key};
use plugin_server::sources::CeleryTask;
use serde_json::{json, Value};

/// Copies the uuid the plugin sees into the stored properties (`posthog_event` has no uuid
/// column); the event named `poison` never finishes (it spins until TASK_TIMEOUT, 600 s here:
/// the test kills the server long before).
const PLUGIN: &str = r#"
    export async function processEvent (event) {
        if (event.event === 'poison') {
            for (;;) {}
        }
        event.properties.seen_uuid = event.uuid
        return event
    }
"#;

fn task(queue: &str, index: usize, event: &str) -> String {
    common::process_event_task(queue, &format!("task-{index}"), index, common::TEAM_ID, event)
}

fn redis() -> redis::Connection {
    redis::Client::open(common::redis_url()).unwrap().get_connection().unwrap()
}

fn push(queue: &str, messages: &[String]) {
    let mut connection = redis();
    for chunk in messages.chunks(500) {
        let _: i64 = redis::cmd("LPUSH").arg(queue).arg(chunk).query(&mut connection).unwrap();
    }
}

fn server_env<'a>(db: &'a TestDb, queue: &'a str, consumer: &'a str, redis_url: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis_url),
        ("LOG_LEVEL", "info"),
        ("WORKER_CONCURRENCY", "2"),
        ("TASK_TIMEOUT", "600"),
        ("PLUGINS_CELERY_QUEUE", queue),
        ("CELERY_DEFAULT_QUEUE", "e2e-celery-faults-default"),
        ("PLUGINS_CELERY_CONSUMER_ID", consumer),
        ("PLUGINS_CELERY_MAX_DELIVERIES", "3"),
    ]
}

/// (rows, distinct distinct ids, distinct uuids seen by the plugin) in `posthog_event`.
async fn counts(pool: &sqlx::PgPool, event: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT distinct_id), count(DISTINCT properties->>'seen_uuid') FROM posthog_event \
         WHERE event = $1",
    )
    .bind(event)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn kill_9(server: &mut Server) {
    server.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some(), "killed");
}

fn stop(server: &mut Server) {
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0), "{}", server.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backlog_then_restart_loses_nothing_and_duplicates_are_rare() {
    const BACKLOG: usize = 3_000;
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let queue = common::unique_prefix("e2e-kill9");
    let consumer = format!("kill9-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::redis_url();
    push(&queue, &(0..BACKLOG).map(|index| task(&queue, index, "backlog")).collect::<Vec<_>>());
    let env = server_env(&db, &queue, &consumer, &redis_url);

    let mut server = Server::start(&[], &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts(&db.pool, "backlog").await.0 < BACKLOG as i64 / 3 {
        assert!(Instant::now() < deadline, "no progress: {}", server.output());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // At an arbitrary instant, not right after seeing a commit (0–50 ms later).
    tokio::time::sleep(Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 50)).await;
    kill_9(&mut server);
    let written_at_kill = counts(&db.pool, "backlog").await.0;
    assert!(written_at_kill < BACKLOG as i64, "killed before the end of the backlog");
    let in_flight: Vec<String> =
        redis::cmd("LRANGE").arg(processing_key(&queue, &consumer)).arg(0).arg(-1).query(&mut redis()).unwrap();
    let in_flight_users: Vec<String> = in_flight
        .iter()
        .filter_map(|raw| match decode_task(&queue, raw, TaskSet { process_events: true }) {
            Ok(CeleryTask::ProcessEvent(event)) => Some(event.distinct_id),
            _ => None,
        })
        .collect();

    let restarted = Instant::now();
    let mut server = Server::start(&[], &env);
    // The dead run's unfinished messages are back (stored) soon after the restart: taken back at
    // once, not after the dead consumer's heartbeat expired (30 s). 15 s leaves room for a loaded
    // machine, where storing the few hundred in flight alone took 5 s.
    let deadline = restarted + Duration::from_secs(15);
    loop {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(DISTINCT distinct_id) FROM posthog_event WHERE distinct_id = ANY($1)")
                .bind(&in_flight_users)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if stored == in_flight_users.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} of the {} messages in flight at the kill stored 15 s after the restart: {}",
            in_flight_users.len(),
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts(&db.pool, "backlog").await.1 < BACKLOG as i64 {
        assert!(Instant::now() < deadline, "backlog not drained: {:?}", counts(&db.pool, "backlog").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(&mut server);
    let output = server.output();
    let skipped = output.matches("Skipping redelivered").count();
    let (rows, users, uuids) = counts(&db.pool, "backlog").await;
    let duplicates = rows - users;
    println!(
        "kill -9 after {written_at_kill} of {BACKLOG} rows, {} in flight: {rows} rows, {users} distinct, {duplicates} \
         duplicates, {skipped} redeliveries skipped as already written",
        in_flight_users.len()
    );
    assert_eq!(users, BACKLOG as i64, "nothing lost");
    assert_eq!(uuids, BACKLOG as i64, "every copy of a message carries the same uuid");
    assert!(duplicates <= 10, "{duplicates} duplicates");
    let mut connection = redis();
    let left: i64 = redis::cmd("LLEN").arg(&queue).query(&mut connection).unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_server_is_dead_lettered_and_the_rest_flows() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let queue = common::unique_prefix("e2e-poison");
    let consumer = format!("poison-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::redis_url();
    let env = server_env(&db, &queue, &consumer, &redis_url);
    let processing = processing_key(&queue, &consumer);
    let mut messages = vec![task(&queue, 0, "poison")];
    messages.extend((1..=5).map(|index| task(&queue, index, "fine")));
    push(&queue, &messages);

    // Three times (PLUGINS_CELERY_MAX_DELIVERIES=3): the server takes the poison, spins on it and
    // is killed. Fine messages stuck behind it in a run are delivered again, never set aside: from
    // the third delivery on the poison runs alone, so the later crashes count against it only.
    for delivery in 1..=3 {
        let mut server = Server::start(&[], &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut connection = redis();
            let held: Vec<String> =
                redis::cmd("LRANGE").arg(&processing).arg(0).arg(-1).query(&mut connection).unwrap();
            let count: Option<i64> =
                redis::cmd("GET").arg(format!("{queue}:deliveries:task-0")).query(&mut connection).unwrap();
            if held.contains(&messages[0]) && count == Some(delivery) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "delivery {delivery}: {} held, {count:?} {}",
                held.len(),
                server.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the fine messages that can go through go through.
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill_9(&mut server);
    }

    // The fourth delivery is not handled: the message is set aside with the reason.
    let mut server = Server::start(&[], &env);
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead: Vec<String> = loop {
        let dead: Vec<String> =
            redis::cmd("LRANGE").arg(dead_letter_key(&queue)).arg(0).arg(-1).query(&mut redis()).unwrap();
        if !dead.is_empty() {
            break dead;
        }
        assert!(Instant::now() < deadline, "not dead-lettered: {}", server.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let entry: Value = serde_json::from_str(&dead[0]).unwrap();
    assert!(entry["reason"].as_str().unwrap().starts_with("delivered 4 times"), "{entry}");
    assert_eq!(entry["message"], json!(messages[0]));
    push(&queue, &(6..=10).map(|index| task(&queue, index, "fine")).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(30);
    while counts(&db.pool, "fine").await.0 < 10 {
        assert!(Instant::now() < deadline, "the rest does not flow: {}", server.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(&mut server);
    let (rows, users, uuids) = counts(&db.pool, "fine").await;
    println!("poison: {rows} rows of fine events, {users} distinct");
    assert_eq!((users, uuids), (10, 10), "nothing lost, one uuid per message");
    assert!(rows - users <= 1, "{} duplicates", rows - users);
    assert_eq!(counts(&db.pool, "poison").await.0, 0);
    let dead: i64 = redis::cmd("LLEN").arg(dead_letter_key(&queue)).query(&mut redis()).unwrap();
    assert_eq!(dead, 1, "only the poison is set aside");
}

/// A server that died after writing an event's row but before marking it written (and before
/// acknowledging its message) delivers the message again: the event is found stored and is not
/// written a second time; a redelivered message whose event was never written is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_stored_before_a_crash_is_not_stored_again() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let queue = common::unique_prefix("e2e-stored-once");
    let consumer = format!("stored-once-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::redis_url();
    let env = server_env(&db, &queue, &consumer, &redis_url);
    let stored = task(&queue, 0, "stored");
    push(&queue, std::slice::from_ref(&stored));
    let mut server = Server::start(&[], &env);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counts(&db.pool, "stored").await.0 < 1 {
        assert!(Instant::now() < deadline, "not stored: {}", server.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&mut server);

    // As after a crash between the INSERT and the marker: no marker, one delivery counted, the
    // message back on the queue; and a redelivered message whose first delivery wrote nothing.
    let mut connection = redis();
    let fresh = task(&queue, 1, "unstored");
    for id in ["task-0", "task-1"] {
        let _: () = redis::cmd("SET").arg(format!("{queue}:deliveries:{id}")).arg(1).query(&mut connection).unwrap();
    }
    push(&queue, &[stored, fresh]);
    let mut server = Server::start(&[], &env);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: i64 = redis::cmd("LLEN").arg(&queue).query(&mut connection).unwrap();
        let in_flight: i64 = redis::cmd("LLEN").arg(processing_key(&queue, &consumer)).query(&mut connection).unwrap();
        if counts(&db.pool, "unstored").await.0 == 1 && pending == 0 && in_flight == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "redeliveries not handled: {}", server.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&mut server);
    assert_eq!(counts(&db.pool, "stored").await, (1, 1, 1), "stored once: {}", server.output());
    assert!(server.output().contains("was already stored"), "{}", server.output());
}
