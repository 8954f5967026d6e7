//! The historical export in the ClickHouse pipeline (`KAFKA_ENABLED`) reads ClickHouse's `events`
//! table, as the reference's `fetchTimestampBoundariesForTeam` / `fetchEventsForInterval` do: the
//! team's first and last `_timestamp`, then 10-minute intervals of `_timestamp` in `_offset` order,
//! 100 at a time. Against a real ClickHouse server (Debian's `clickhouse-server`), each test on a
//! loopback address of its own.

mod clickhouse_support;
mod common;
mod kafka_mode_support;
mod plugins_support;
mod queues_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use clickhouse_support::ClickHouseServer;
use common::{TestDb, PLUGIN_CONFIG_ID, TEAM_ID};
use kafka_mode_support::KafkaModeServer;
use plugin_server::clickhouse::ClickHouse;
use plugin_server::plugins::extensions::EnqueuedJob;
use plugin_server::plugins::past_events::{ClickHousePastEvents, PastEvents};
use plugin_server::sinks::CeleryProducer;
use plugin_server::sources::celery::PLUGIN_JOB_TASK;
use plugins_support::{exporter, fake_setup_with};
use serde_json::{json, Map, Value};

/// An `events` row of team `team_id` received by Kafka at `10:MM:SS` on 2021-10-01 (`second` seconds
/// after 10:00:00), at Kafka offset `offset`.
fn row(team_id: i64, distinct_id: &str, second: i64, offset: u64, properties: &str) -> Value {
    let at = |second: i64| Utc.with_ymd_and_hms(2021, 10, 1, 10, 0, 0).unwrap() + chrono::Duration::seconds(second);
    let text = |second: i64| at(second).format("%Y-%m-%d %H:%M:%S").to_string();
    json!({
        "uuid": uuid::Uuid::new_v4().to_string(),
        "event": "$pageview",
        "properties": properties,
        "timestamp": text(second - 5),
        "team_id": team_id,
        "distinct_id": distinct_id,
        "elements_chain": "",
        "created_at": text(second - 1),
        "_timestamp": text(second),
        "_offset": offset,
    })
}

fn clickhouse(db: &TestDb, server: &ClickHouseServer, database: &str) -> ClickHouse {
    ClickHouse::from_config(&db.config(&[("CLICKHOUSE_HOST", &server.host), ("CLICKHOUSE_DATABASE", database)]))
        .expect("ClickHouse client")
}

#[tokio::test]
async fn past_events_are_read_from_clickhouse_as_the_reference_reads_them() {
    let server = ClickHouseServer::start("127.77.2.1").await;
    server.create_events_table("past").await;
    // Team 2: 150 events in 10:00:00–10:09:59, inserted in the reverse of their Kafka order; one
    // at 10:10:00 (the next interval); team 3's event in the same interval.
    let mut rows: Vec<Value> = (0..150)
        .rev()
        .map(|index| row(2, &format!("d{index:03}"), index * 4, 1000 + index as u64, r#"{"$ip":"1.2.3.4","n":1}"#))
        .collect();
    rows.push(row(2, "next", 600, 5000, "{}"));
    rows.push(row(3, "other-team", 30, 5001, "{}"));
    // Properties that are empty or not JSON (the reference's parse throws for the second).
    rows.push(row(2, "empty", 599, 4000, ""));
    rows.push(row(2, "broken", 599, 4001, "{nope"));
    server.insert_events("past", &rows).await;

    let db = TestDb::empty().await;
    let events = ClickHousePastEvents(clickhouse(&db, &server, "past"));

    let boundaries = events.timestamp_boundaries(2).await.unwrap();
    assert_eq!(boundaries.min, Some(Utc.with_ymd_and_hms(2021, 10, 1, 10, 0, 0).unwrap()));
    assert_eq!(boundaries.max, Some(Utc.with_ymd_and_hms(2021, 10, 1, 10, 10, 0).unwrap()));
    let none = events.timestamp_boundaries(99).await.unwrap();
    assert_eq!((none.min, none.max), (None, None), "a team without events has no boundaries");

    let lower = Utc.with_ymd_and_hms(2021, 10, 1, 10, 0, 0).unwrap();
    let upper = Utc.with_ymd_and_hms(2021, 10, 1, 10, 10, 0).unwrap();
    let first = events.fetch_interval(2, lower, upper, 100, 0).await.unwrap();
    let second = events.fetch_interval(2, lower, upper, 100, 100).await.unwrap();
    let third = events.fetch_interval(2, lower, upper, 100, 200).await.unwrap();
    assert_eq!((first.len(), second.len(), third.len()), (100, 52, 0));
    let ids: Vec<&str> =
        first.iter().chain(&second).map(|event| event["distinct_id"].as_str().unwrap_or_default()).collect();
    let mut expected: Vec<String> = (0..150).map(|index| format!("d{index:03}")).collect();
    expected.extend(["empty".to_string(), "broken".to_string()]);
    assert_eq!(ids, expected, "in _offset order, the next interval and other teams left out");

    // The reference's convertDatabaseEventToPluginEvent: ClickHouse's text for the times.
    let event = first[0].as_object().unwrap();
    let keys: Vec<&str> = event.keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["distinct_id", "event", "ip", "now", "properties", "sent_at", "site_url", "team_id", "timestamp"]
    );
    assert_eq!(event["event"], "$pageview");
    assert_eq!(event["team_id"], json!(2));
    assert_eq!(event["properties"], json!({"$ip": "1.2.3.4", "n": 1}));
    assert_eq!(event["ip"], "1.2.3.4");
    assert_eq!(event["site_url"], "");
    assert_eq!(event["timestamp"], "2021-10-01 09:59:55");
    assert_eq!(event["sent_at"], "2021-10-01 09:59:59");
    assert!(event["now"].as_str().is_some_and(|now| now.ends_with('Z')));
    let empty = &second[50];
    assert_eq!((&empty["properties"], &empty["ip"]), (&json!({}), &json!("")));
    assert_eq!(second[51]["properties"], json!({}), "properties that are not JSON are left out, not the event");
}

#[tokio::test]
async fn the_historical_export_walks_the_clickhouse_events_in_chunks() {
    let server = ClickHouseServer::start("127.77.2.2").await;
    server.create_events_table("walk").await;
    // 250 events in one interval and 3 in the next but one (an empty interval in between).
    let mut rows: Vec<Value> = (0..250).map(|index| row(2, &format!("w{index}"), index, index as u64, "{}")).collect();
    rows.extend((0..3).map(|index| row(2, &format!("later{index}"), 1300 + index, 300 + index as u64, "{}")));
    server.insert_events("walk", &rows).await;

    let batches = Arc::new(Mutex::new(Vec::new()));
    let probe = TestDb::empty().await;
    let client = clickhouse(&probe, &server, "walk");
    let (_fakes, setup) = fake_setup_with(exporter(batches.clone(), false), Duration::from_secs(3), |services| {
        services.past_events = Arc::new(ClickHousePastEvents(client));
    })
    .await;
    setup.plugins.reload().await.unwrap();
    setup.plugins.capabilities(PLUGIN_CONFIG_ID).await.unwrap();
    let job = EnqueuedJob {
        job_type: "Export historical events".into(),
        payload: json!({}),
        timestamp: 0,
        plugin_config_id: i64::from(PLUGIN_CONFIG_ID),
        plugin_config_team: i64::from(TEAM_ID),
    };
    setup.plugins.run_job(job).await;
    setup.drain_jobs().await;

    let sizes: Vec<usize> = batches.lock().unwrap().iter().map(Vec::len).filter(|size| *size > 0).collect();
    assert_eq!(sizes, [100, 100, 50, 3], "chunks of 100 per interval");
    let exported: Vec<String> = batches
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|event| event["distinct_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut expected: Vec<String> = (0..250).map(|index| format!("w{index}")).collect();
    expected.extend((0..3).map(|index| format!("later{index}")));
    assert_eq!(exported, expected, "every event once, in order");
    let logs: Vec<String> =
        setup.log_entries(PLUGIN_CONFIG_ID).await.into_iter().map(|(_, _, message)| message).collect();
    assert!(logs.iter().any(|message| message.ends_with(") Done exporting all events")), "{logs:?}");
    assert!(logs.iter().any(|message| message.contains(") Successfully processed events 200-300 from ")), "{logs:?}");
    assert_eq!(setup.config_error(PLUGIN_CONFIG_ID).await, None);
}

/// A real plugin's exportEvents stores what it receives in `meta.storage`.
const STORING_EXPORTER: &str = r#"
export async function exportEvents(events, { storage }) {
    for (const event of events) {
        await storage.set(`exported-${event.distinct_id}`, event)
    }
}
"#;

#[tokio::test]
async fn a_kafka_mode_server_exports_past_events_from_clickhouse() {
    let clickhouse = ClickHouseServer::start("127.77.2.3").await;
    clickhouse.create_events_table("served").await;
    let rows: Vec<Value> =
        (0..30).map(|index| row(2, &format!("s{index}"), index * 30, index as u64, r#"{"plan":"pro"}"#)).collect();
    clickhouse.insert_events("served", &rows).await;
    // Another team's events are not exported.
    clickhouse.insert_events("served", &[row(3, "not-mine", 10, 99, "{}")]).await;

    let db = TestDb::with_fixture(Some(STORING_EXPORTER)).await;
    let celery_queue = common::unique_prefix("ch-export-jobs");
    let server = KafkaModeServer::start(
        &db,
        "ch-export",
        &[
            ("CLICKHOUSE_HOST", &clickhouse.host),
            ("CLICKHOUSE_DATABASE", "served"),
            ("PLUGINS_CELERY_QUEUE", &celery_queue),
        ],
    )
    .await;
    let stored = || async {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key LIKE 'exported-%'",
        )
        .bind(PLUGIN_CONFIG_ID)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        count
    };
    // The job as PostHog's interface sends it, through Celery (which carries plugin jobs in Kafka mode).
    let redis = deadpool_redis::Config::from_url(common::redis_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("redis pool");
    let producer = CeleryProducer::new(redis, celery_queue.clone());
    // The server may still be loading the plugin or joining Kafka: send until the export runs.
    common::wait_for_up_to("the historical export from ClickHouse", Duration::from_secs(150), || async {
        if stored().await == 30 {
            return Some(());
        }
        let args =
            [json!(TEAM_ID), json!(PLUGIN_CONFIG_ID), json!("Export historical events"), json!("start"), json!({})];
        producer.send_task(PLUGIN_JOB_TASK, &args, &Map::new()).await.ok();
        tokio::time::sleep(Duration::from_secs(2)).await;
        None
    })
    .await;
    let event: Value = sqlx::query_scalar(
        "SELECT value::jsonb FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = 'exported-s7'",
    )
    .bind(PLUGIN_CONFIG_ID)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(event["properties"], json!({"plan": "pro"}));
    assert_eq!(event["timestamp"], "2021-10-01 10:03:25");
    assert_eq!(event["team_id"], json!(2));
    let other: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_pluginstorage WHERE key = 'exported-not-mine'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(other, 0);
    server.stop().await;
}
