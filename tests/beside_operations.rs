//! Operations, from the outside: a running server (in process, Postgres pipeline, real Postgres,
//! Redis, a real plugin) sends the reference's statsd metrics as UDP datagrams read here from a
//! local socket, and answers `/_health`, `/_ready` and `/metrics` on `HTTP_SERVER_PORT`. Each
//! metric is asserted by name from what the server sent: removing the call that sends it fails
//! the test.

mod actions_support;
mod common;
mod kafka_mode_support;
mod queues_support;

use std::collections::BTreeSet;
use std::time::Duration;

use common::in_process::{self, InProcessServer};
use common::statsd::StatsdListener;
use common::{wait_for, TestDb, COMMON_USER_ID, TEAM_ID};
use plugin_server::config::Config;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const PLUGIN: &str = r#"
    export async function processEvent(event, { cache, storage }) {
        if (event.event === 'drop me') {
            return null
        }
        if (event.event === 'boom') {
            throw new Error('processEvent failed on purpose')
        }
        console.log('processing', event.event)
        await cache.set('seen', 1)
        await cache.get('seen')
        await cache.incr('count')
        await cache.expire('count', 60)
        await cache.lpush('list', ['a'])
        await cache.lrange('list', 0, 1)
        await cache.llen('list')
        await cache.lrem('list', 1, 'a')
        await cache.lpop('list', 1)
        await storage.set('key', 1)
        await storage.get('key')
        await storage.del('key')
        return event
    }

    export function onEvent(event) {
        if (event.event === 'boom on event') {
            throw new Error('onEvent failed on purpose')
        }
    }

    export function onSnapshot(event) {}
"#;

const PREFIX: &str = "plugin-server.";

struct RunningServer(InProcessServer);

impl RunningServer {
    async fn capture(&self, event: &str, distinct_id: &str, properties: Value) {
        let data = json!({
            "distinct_id": distinct_id,
            "event": event,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "properties": properties,
            "team_id": TEAM_ID,
            "uuid": uuid::Uuid::now_v7().to_string(),
        });
        self.0.producer.send_capture(data.as_object().unwrap(), i64::from(TEAM_ID)).await.unwrap();
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The reference's metric names this server sends from the Postgres pipeline, each caused below.
const EXPECTED: &[&str] = &[
    "kafka_queue.each_event",
    "kafka_queue.single_event",
    "kafka_queue.single_ingestion",
    "kafka_queue.single_on_event",
    "kafka_queue.single_on_snapshot",
    "kafka_queue.single_save.standard",
    "kafka_queue.single_save.snapshot",
    "piscina_task.processEvent",
    "piscina_task.ingestEvent",
    "piscina_task.onEvent",
    "piscina_task.onSnapshot",
    "piscina.threads",
    "piscina.queue_size",
    "plugin.process_event",
    "action_matching_for_event",
    "action_matches_found",
    "webhook_firings",
    "rest_hook_firings",
    "illegal_distinct_ids.total",
    "logs.entries_created",
    "event_loop_lag",
    "events_dropped",
    "query.postgres",
    "query.postgres.total",
    "query.postgres_transation",
    "query.postgres_transation.total",
    "query.redisBRPop",
    "query.redisBRPop.total",
    "query.redisLPush",
    "query.redisLPush.total",
    "query.regisGet",
    "query.regisGet.total",
    "query.redisSet",
    "query.redisSet.total",
    "query.redisIncr",
    "query.redisExpire",
    "query.redisLRange",
    "query.redisLLen",
    "query.redisLRem",
    "query.redisLPop",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_sends_the_reference_statsd_metrics_and_serves_health_readiness_and_prometheus() {
    let statsd = StatsdListener::start();
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let (hooks_base, mut hooks) = actions_support::listener(200, "").await;
    sqlx::query("UPDATE posthog_team SET slack_incoming_webhook = $1")
        .bind(format!("{hooks_base}/webhook"))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE posthog_organization SET available_features = '{\"zapier\"}'").execute(&db.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO ee_hook (id, team_id, user_id, resource_id, event, target, created, updated)
         VALUES ('hook', $1, $2, 69, 'action_performed', $3, now(), now())",
    )
    .bind(TEAM_ID)
    .bind(COMMON_USER_ID)
    .bind(format!("{hooks_base}/rest-hook"))
    .execute(&db.pool)
    .await
    .unwrap();
    let plugin_name: String = sqlx::query_scalar("SELECT name FROM posthog_plugin").fetch_one(&db.pool).await.unwrap();
    let config_id: i32 = sqlx::query_scalar("SELECT id FROM posthog_pluginconfig").fetch_one(&db.pool).await.unwrap();

    let (statsd_port, http_port) = (statsd.port.to_string(), free_port());
    let http = http_port.to_string();
    let server = RunningServer(InProcessServer::start(in_process::celery_config(
        &db,
        "ops-metrics",
        &[
            ("JOB_QUEUES", "graphile"),
            ("STATSD_HOST", "127.0.0.1"),
            ("STATSD_PORT", &statsd_port),
            ("STATSD_PREFIX", PREFIX),
            ("HTTP_SERVER_PORT", &http),
        ],
    )));
    let base = format!("http://127.0.0.1:{http_port}");
    wait_for("the server to be ready", || async {
        match reqwest::get(format!("{base}/_ready")).await {
            Ok(response) if response.status() == 200 => Some(()),
            _ => None,
        }
    })
    .await;
    assert_eq!(get(&format!("{base}/_health")).await, (200, r#"{"status":"ok"}"#.to_string()));

    // An action match (fixture action 69: foo = bar) fires the webhook and the REST hook.
    server.capture("xyz", "abc", json!({"foo": "bar"})).await;
    server.capture("$snapshot", "abc", json!({"$session_id": "s1", "$snapshot_data": {"x": 1}})).await;
    server.capture("$identify", "anonymous", json!({"$anon_distinct_id": "someone"})).await;
    server.capture("drop me", "abc", json!({})).await;
    server.capture("boom", "abc", json!({})).await;
    server.capture("boom on event", "abc", json!({})).await;

    wait_for("the events and the recording", || async {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_event").fetch_one(&db.pool).await.ok()?;
        let recordings: i64 =
            sqlx::query_scalar("SELECT count(*) FROM posthog_sessionrecordingevent").fetch_one(&db.pool).await.ok()?;
        (events >= 4 && recordings >= 1).then_some(())
    })
    .await;
    let mut paths = BTreeSet::new();
    for _ in 0..2 {
        paths.insert(actions_support::next(&mut hooks).await.path);
    }
    assert_eq!(paths, BTreeSet::from(["/webhook".to_string(), "/rest-hook".to_string()]));

    // The templated names, and the gauges reported every 10 s, arrive within ~12 s.
    let mut expected: BTreeSet<String> = EXPECTED.iter().map(|name| name.to_string()).collect();
    expected.insert(format!("plugin.{plugin_name}.on_event"));
    expected.insert(format!("plugin.{plugin_name}.on_event.ERROR"));
    expected.insert(format!("plugin.{plugin_name}.process_event.ERROR"));
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    loop {
        let missing: Vec<String> = expected.difference(&statsd.names(PREFIX)).cloned().collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "statsd metrics never sent: {missing:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Tags as the reference sends them (telegraf form).
    let lines = statsd.lines();
    let has = |start: &str| lines.iter().any(|line| line.starts_with(start));
    assert!(has(&format!("{PREFIX}kafka_queue.single_save.standard,team_id={TEAM_ID}:")), "{lines:?}");
    assert!(has(&format!("{PREFIX}illegal_distinct_ids.total,distinctId=anonymous:1|c")));
    assert!(has(&format!("{PREFIX}plugin.process_event,plugin={plugin_name},teamId={TEAM_ID}:")));
    // Counters of one key are summed per flush (storageGet runs for several events).
    assert!(statsd.total(&format!("{PREFIX}query.postgres.total,queryTag=fetchTeam")) >= 1, "{lines:?}");
    assert!(statsd.total(&format!("{PREFIX}query.postgres.total,queryTag=storageGet")) >= 1, "{lines:?}");
    assert!(has(&format!("{PREFIX}logs.entries_created,source=CONSOLE,team_id={TEAM_ID},plugin_id=")));
    assert!(has(&format!("{PREFIX}events_dropped,stage=plugins,reason=plugin_dropped:1|c")));
    assert!(has(&format!("{PREFIX}action_matches_found:1|c")));

    // /metrics: the same things, labelled per team and plugin config.
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for needle in [
        r#"plugin_server_events_received_total{stage="consumer",source="celery"} 6"#.to_string(),
        r#"plugin_server_events_dropped_total{stage="plugins",reason="plugin_dropped"} 1"#.to_string(),
        r#"plugin_server_events_handled_total{stage="ingestion",source="event"}"#.to_string(),
        format!(
            r#"plugin_server_plugin_call_duration_seconds_bucket{{team_id="{TEAM_ID}",plugin_config_id="{config_id}",plugin="{plugin_name}",method="processEvent",le="#
        ),
        format!(
            r#"plugin_server_plugin_call_errors_total{{team_id="{TEAM_ID}",plugin_config_id="{config_id}",plugin="{plugin_name}",method="processEvent"}} 1"#
        ),
        format!(
            r#"plugin_server_plugin_vm_memory_bytes{{team_id="{TEAM_ID}",plugin_config_id="{config_id}",plugin="{plugin_name}"}}"#
        ),
        r#"plugin_server_queue_depth{queue="celery"} 0"#.to_string(),
        r#"plugin_server_in_flight{part="celery"} 0"#.to_string(),
        r#"plugin_server_in_flight{part="plugin_calls"}"#.to_string(),
        r#"plugin_server_hook_firings_total{kind="webhook"} 1"#.to_string(),
        r#"plugin_server_stage_duration_seconds_bucket{step="each_event",le="#.to_string(),
        r#"plugin_server_query_duration_seconds_bucket{query="query.postgres",tag="fetchPerson",le="#.to_string(),
    ] {
        assert!(text.contains(&needle), "/metrics lacks {needle}:\n{text}");
    }
    let (status, _) = get(&format!("{base}/nothing-here")).await;
    assert_eq!(status, 404);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_the_dead_component_and_readiness_follows() {
    use plugin_server::lifecycle::Lifecycle;
    use plugin_server::metrics::http::{bind, serve, HttpState};

    let mut lifecycle = Lifecycle::default();
    let (dies, dead) = (CancellationToken::new(), CancellationToken::new());
    let trigger = dies.clone();
    lifecycle.spawn("doomed consumer", Duration::from_secs(1), move |_token| async move {
        trigger.cancelled().await;
    });
    let liveness = lifecycle.liveness();
    let listener = bind(0).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = HttpState {
        liveness: liveness.clone(),
        prometheus: plugin_server::metrics::prometheus::install().unwrap(),
        gauges: None,
    };
    tokio::spawn(serve(listener, state, dead.clone()));
    let base = format!("http://127.0.0.1:{port}");

    assert_eq!(get(&format!("{base}/_health")).await.0, 200);
    assert_eq!(get(&format!("{base}/_ready")).await.0, 503, "not ready before every component started");
    liveness.set_ready(true);
    assert_eq!(get(&format!("{base}/_ready")).await.0, 200);

    dies.cancel();
    wait_for("the component to be marked dead", || async { (!liveness.is_alive()).then_some(()) }).await;
    let (status, body) = get(&format!("{base}/_health")).await;
    assert_eq!(status, 503);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"status": "error", "dead": ["doomed consumer"]}));
    assert_eq!(get(&format!("{base}/_ready")).await.0, 503);
    dead.cancel();
    lifecycle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_port_zero_turns_the_endpoints_off() {
    let config = Config::from_pairs(&[("NODE_ENV", "production")]).unwrap();
    assert_eq!(config.HTTP_SERVER_PORT, 6738);
    let test_config = Config::from_pairs(&[("NODE_ENV", "test")]).unwrap();
    assert_eq!(test_config.HTTP_SERVER_PORT, 0);
    let off = plugin_server::metrics::http::HttpServer::bind(0, Default::default(), None).await.unwrap();
    assert!(off.is_none());
    assert!(!plugin_server::metrics::prometheus::enabled());
}

/// The Kafka pipeline's own metrics: the producer's sends (`query.kafka_send`), the consumer's
/// batches (`kafka_queue.each_batch`) and an event whose ingestion failed going to
/// `events_dead_letter_queue` (`events_added_to_dead_letter_queue`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn kafka_mode_sends_the_producer_batch_and_dead_letter_metrics() {
    use kafka_mode_support::KafkaModeServer;
    use queues_support::produce;

    let statsd = StatsdListener::start();
    let db = TestDb::with_fixture(None).await;
    let statsd_port = statsd.port.to_string();
    let server = KafkaModeServer::start(
        &db,
        "ops-kafka",
        &[("STATSD_HOST", "127.0.0.1"), ("STATSD_PORT", &statsd_port), ("STATSD_PREFIX", PREFIX)],
    )
    .await;

    // A uuid that is not one: ingestion fails for good and the event is dead-lettered.
    let data =
        json!({"event": "bad uuid", "properties": {}, "distinct_id": "d", "timestamp": "2021-10-28T11:59:57.792Z"});
    let message = json!({"distinct_id": "d", "ip": "127.0.0.1", "site_url": "", "team_id": TEAM_ID,
        "uuid": "not-a-uuid", "data": data.to_string(), "now": "2021-10-28T12:00:00Z"});
    let expected: BTreeSet<String> = [
        "query.kafka_send",
        "query.kafka_send.total",
        "kafka_queue.each_batch",
        "events_added_to_dead_letter_queue",
        "kafka_queue.each_event",
    ]
    .iter()
    .map(|name| name.to_string())
    .collect();
    // The consumer starts from the latest offset: keep offering until the metrics arrive.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        produce(&server.topic, &[message.to_string().into_bytes()]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let missing: Vec<String> = expected.difference(&statsd.names(PREFIX)).cloned().collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "statsd metrics never sent: {missing:?}");
    }
    server.stop().await;
}
