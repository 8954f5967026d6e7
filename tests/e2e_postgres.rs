//! The whole server in the Postgres pipeline, in process: Celery tasks pushed to Redis come out as
//! rows, after running through a real plugin (the reference's tests/postgres/e2e.test.ts and
//! errors.test.ts, with the plugin's test-only console replaced by its log entries).

mod common;

use std::time::Duration;

use common::in_process::InProcessServer;
use common::{wait_for, TestDb};
use plugin_server::config::Config;
use serde_json::{json, Value};

const PLUGIN: &str = r#"
    export async function processEvent (event) {
        console.log('processEvent')
        console.info('amogus')
        event.properties.processed = 'hell yes'
        event.properties.upperUuid = event.properties.uuid?.toUpperCase()
        event.properties['$snapshot_data'] = 'no way'
        // `meta` is not defined here: this throws after the mutations, which are kept.
        const counter = await meta.cache.get('events_seen')
        return event
    }

    export function onEvent (event, { global }) {
        console.log('onEvent', event.event)
    }

    export function onSnapshot (event) {
        console.log('onSnapshot', event.event)
    }
"#;

struct RunningServer {
    server: InProcessServer,
    pool: sqlx::PgPool,
}

impl RunningServer {
    async fn start(db: &TestDb, config: Config) -> RunningServer {
        RunningServer { server: InProcessServer::start(config), pool: db.pool.clone() }
    }

    /// The reference's `posthog.capture` from a plugin of team 2.
    async fn capture(&self, event: &str, properties: Value) {
        let data = json!({
            "distinct_id": "plugin-id-60",
            "event": event,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "properties": properties,
            "team_id": common::TEAM_ID,
            "uuid": uuid::Uuid::now_v7().to_string(),
        });
        self.server.producer.send_capture(data.as_object().unwrap(), i64::from(common::TEAM_ID)).await.unwrap();
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

fn server_config(db: &TestDb, queue: &str) -> Config {
    db.config(&[
        ("WORKER_CONCURRENCY", "2"),
        ("PLUGINS_CELERY_QUEUE", queue),
        ("CELERY_DEFAULT_QUEUE", &format!("{queue}-default")),
        ("LOG_LEVEL", "warn"),
        ("JOB_QUEUES", "graphile"),
    ])
}

async fn log_messages(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT type, message FROM posthog_pluginlogentry WHERE source = 'CONSOLE' ORDER BY timestamp")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_captured_processed_ingested() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let queue = common::unique_prefix("e2e-event");
    let server = RunningServer::start(&db, server_config(&db, &queue)).await;

    let uuid = uuid::Uuid::now_v7().to_string();
    server.capture("custom event", json!({"name": "haha", "uuid": uuid})).await;

    let properties: Value = wait_for("the event row", || async {
        sqlx::query_scalar("SELECT properties FROM posthog_event WHERE event = 'custom event'")
            .fetch_optional(&server.pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(properties["processed"], "hell yes");
    assert_eq!(properties["upperUuid"], uuid.to_uppercase());
    assert_eq!(properties["name"], "haha");

    let logs = wait_for("processEvent and onEvent logs", || async {
        let logs = log_messages(&server.pool).await;
        (logs.iter().any(|(_, m)| m == "onEvent custom event")).then_some(logs)
    })
    .await;
    assert!(logs.iter().any(|(t, m)| t == "LOG" && m == "processEvent"), "{logs:?}");
    assert_eq!(logs.iter().filter(|(t, m)| t == "INFO" && m.contains("amogus")).count(), 1, "{logs:?}");

    // The failure after the mutations is recorded on the plugin config.
    let error: Option<Value> = wait_for("the plugin config error", || async {
        let error: Option<Value> = sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = 39")
            .fetch_one(&server.pool)
            .await
            .unwrap();
        error.map(Some)
    })
    .await;
    assert!(error.unwrap()["message"].as_str().unwrap_or_default().contains("meta"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_captured_ingested_without_process_event() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let queue = common::unique_prefix("e2e-snapshot");
    let server = RunningServer::start(&db, server_config(&db, &queue)).await;

    server.capture("$snapshot", json!({"$session_id": "1234abc", "$snapshot_data": "yes way"})).await;
    let snapshot: Value = wait_for("the session recording row", || async {
        sqlx::query_scalar("SELECT snapshot_data FROM posthog_sessionrecordingevent")
            .fetch_optional(&server.pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(snapshot, json!("yes way"), "processEvent did not run on the snapshot");
    let logs = wait_for("onSnapshot log", || async {
        let logs = log_messages(&server.pool).await;
        (logs.iter().any(|(_, m)| m == "onSnapshot $snapshot")).then_some(logs)
    })
    .await;
    assert!(!logs.iter().any(|(_, m)| m == "processEvent"), "{logs:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_matches_are_stored() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let queue = common::unique_prefix("e2e-actions");
    let server = RunningServer::start(&db, server_config(&db, &queue)).await;

    server.capture("xyz", json!({"foo": "bar"})).await;
    let action_id: i32 = wait_for("the action match", || async {
        sqlx::query_scalar("SELECT action_id FROM posthog_action_events").fetch_optional(&server.pool).await.unwrap()
    })
    .await;
    assert_eq!(action_id, 69);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_errors_do_not_lose_events() {
    const CRASHING: &str = r#"
        export function processEvent (event) {
            if (event.properties.crash === 'throw') {
                throw new Error('error thrown in plugin')
            } else if (event.properties.crash === 'throw in promise') {
                void new Promise(() => { throw new Error('error thrown in plugin') })
            } else if (event.properties.crash === 'reject in promise') {
                void new Promise((_, rejects) => { rejects(new Error('error thrown in plugin')) })
            }
            return event
        }
    "#;
    for crash in ["throw", "throw in promise", "reject in promise"] {
        let db = TestDb::with_fixture(Some(CRASHING)).await;
        let queue = common::unique_prefix("e2e-errors");
        let server = RunningServer::start(&db, server_config(&db, &queue)).await;
        for _ in 0..4 {
            server.capture("broken event", json!({"crash": crash})).await;
        }
        wait_for("4 events", || async {
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_event WHERE event = 'broken event'")
                .fetch_one(&server.pool)
                .await
                .unwrap();
            (count == 4).then_some(())
        })
        .await;
        let error: Value = wait_for("the recorded error", || async {
            sqlx::query_scalar::<_, Option<Value>>("SELECT error FROM posthog_pluginconfig WHERE id = 39")
                .fetch_one(&server.pool)
                .await
                .unwrap()
        })
        .await;
        assert_eq!(error["message"], "error thrown in plugin", "{crash}");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_of_new_users_are_all_ingested() {
    // Many events of the same few new users in flight at once: person creation must not race (the
    // reference loses some of these; we order ingestion per distinct id).
    let db = TestDb::with_fixture(None).await;
    let queue = common::unique_prefix("e2e-race");
    let server = RunningServer::start(&db, server_config(&db, &queue)).await;
    for index in 0..200 {
        let distinct_id = format!("racer-{}", index % 5);
        let data = json!({
            "distinct_id": distinct_id,
            "event": "race",
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "properties": {"$set": {"last_index": index}, "$set_once": {"first_seen": index}},
            "team_id": common::TEAM_ID,
            "uuid": uuid::Uuid::now_v7().to_string(),
        });
        server.server.producer.send_capture(data.as_object().unwrap(), i64::from(common::TEAM_ID)).await.unwrap();
    }
    wait_for("200 events", || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_event WHERE event = 'race'")
            .fetch_one(&server.pool)
            .await
            .unwrap();
        (count == 200).then_some(())
    })
    .await;
    let persons: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_person").fetch_one(&server.pool).await.unwrap();
    assert_eq!(persons, 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_reload_swaps_the_plugin_code_between_two_events() {
    let version =
        |n: u32| format!("export function processEvent(event) {{ event.properties.version = {n}; return event }}");
    let db = TestDb::with_fixture(Some(&version(1))).await;
    let queue = common::unique_prefix("e2e-reload");
    let channel = common::unique_prefix("reload-plugins");
    let mut config = server_config(&db, &queue);
    config.PLUGINS_RELOAD_PUBSUB_CHANNEL = channel.clone();
    let server = RunningServer::start(&db, config).await;

    let version_of = |name: &'static str| {
        let pool = server.pool.clone();
        async move {
            sqlx::query_scalar::<_, Value>("SELECT properties->'version' FROM posthog_event WHERE event = $1")
                .bind(name)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    server.capture("before", json!({})).await;
    assert_eq!(wait_for("the first event", || version_of("before")).await, json!(1));

    let plugin_json = json!({"name": "posthog-maxmind-plugin", "main": "index.js", "config": {}});
    sqlx::query("UPDATE posthog_plugin SET archive = $1, updated_at = now() + interval '1 second' WHERE id = 60")
        .bind(common::plugin_zip(Some(&version(2)), &plugin_json))
        .execute(&server.pool)
        .await
        .unwrap();
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    // The subscriber may still be connecting: publish until someone listens.
    wait_for("a subscriber on the reload channel", || {
        let mut connection = connection.clone();
        let channel = channel.clone();
        async move {
            let receivers: i64 =
                redis::cmd("PUBLISH").arg(&channel).arg("").query_async(&mut connection).await.unwrap();
            (receivers > 0).then_some(())
        }
    })
    .await;
    let _ = &mut connection;

    // Events captured after the reload run the new code.
    let new_version = wait_for("an event processed by the reloaded code", || async {
        server.capture("after", json!({})).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let versions: Vec<Value> =
            sqlx::query_scalar("SELECT properties->'version' FROM posthog_event WHERE event = 'after'")
                .fetch_all(&server.pool)
                .await
                .unwrap();
        versions.into_iter().find(|version| version == &json!(2))
    })
    .await;
    assert_eq!(new_version, json!(2));
    server.stop().await;
}
