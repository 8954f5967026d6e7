//! The whole server in the Kafka + ClickHouse pipeline, in process, against the loopback broker:
//! a raw event on the consumption topic comes out as a protobuf event on `clickhouse_events_proto`
//! after a real plugin ran, persons stay in Postgres and get `clickhouse_person_unique_id` messages, and
//! plugin log entries go to `plugin_log_entries` (the reference's tests/clickhouse/e2e.test.ts).

mod common;
mod kafka_mode_support;
mod queues_support;

use std::time::{Duration, Instant};

use common::TestDb;
use kafka_mode_support::{contains, raw_event, KafkaModeServer};
use queues_support::{consume_topic_to_end, produce, topic_end, unique};
use serde_json::json;

const PLUGIN: &str = r#"
    export function processEvent (event) {
        event.properties.processed = 'by the plugin'
        console.info('saw ' + event.event)
        return event
    }
"#;

async fn wait_for_message(topic: &str, start: rdkafka::Offset, needle: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = consume_topic_to_end(topic, start)
            .await
            .into_iter()
            .filter_map(|(_, value)| value)
            .find(|value| contains(value, needle));
        if let Some(value) = found {
            return value;
        }
        assert!(Instant::now() < deadline, "no message containing {needle} on {topic}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn raw_event_in_protobuf_event_out() {
    // The server's log goes to the test's output: shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("plugin_server=debug,info"))
        .with_test_writer()
        .try_init();
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    // These output topics are shared with every other Kafka-mode test: read only what comes after now.
    let events_start = topic_end("clickhouse_events_proto");
    let persons_start = topic_end("clickhouse_person_unique_id");
    let logs_start = topic_end("plugin_log_entries");
    let server = KafkaModeServer::start(&db, "e2e-kafka", &[]).await;

    let distinct_id = unique("kafka-person");
    let uuid = uuid::Uuid::now_v7().to_string();
    let message = raw_event(&distinct_id, &uuid, "kafka event", json!({"key": "value"}));
    // The consumer starts from the latest offset, as the reference's does: keep offering the event
    // (same uuid) until the server has joined its group and the event comes out.
    let event = {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            produce(&server.topic, std::slice::from_ref(&message)).await;
            let found = consume_topic_to_end("clickhouse_events_proto", events_start)
                .await
                .into_iter()
                .filter_map(|(_, value)| value)
                .find(|value| contains(value, &uuid));
            if let Some(event) = found {
                break event;
            }
            assert!(Instant::now() < deadline, "the event never reached clickhouse_events_proto");
        }
    };
    assert!(contains(&event, "by the plugin"), "processEvent ran before the write");
    assert!(contains(&event, "kafka event"));
    let person = wait_for_message("clickhouse_person_unique_id", persons_start, &distinct_id).await;
    assert!(!person.is_empty());
    wait_for_message("plugin_log_entries", logs_start, "saw kafka event").await;

    // Persons stay in Postgres in this pipeline, as in the reference.
    let persons: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_persondistinctid WHERE distinct_id = $1")
        .bind(&distinct_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(persons, 1);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM posthog_event").fetch_one(&db.pool).await.unwrap();
    assert_eq!(events, 0, "events go to Kafka, not to posthog_event");

    server.stop().await;
}

const ENLARGING_PLUGIN: &str = r#"
    export function processEvent (event) {
        if (event.properties.enlarge) {
            event.properties.big = 'x'.repeat(1100000)
        }
        if (event.properties.shout) {
            console.log('y'.repeat(1100000))
        }
        return event
    }
"#;

/// A plugin that makes an event bigger than the broker's message limit, and one `console.log` of
/// more than 1 MB (a plugin log entry over the limit): each used to fail the producer's batch, then
/// the consumer's flush, and the consumer stopped for good while the server ran on (after a
/// restart, the same event stopped it again). Now each goes to `events_dead_letter_queue` with
/// the reason, and the events after them land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn oversized_records_are_dead_lettered_and_consumption_goes_on() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("plugin_server=info,warn"))
        .with_test_writer()
        .try_init();
    let db = TestDb::with_fixture(Some(ENLARGING_PLUGIN)).await;
    let events_start = topic_end("clickhouse_events_proto");
    let dead_letters_start = topic_end("events_dead_letter_queue");
    let server = KafkaModeServer::start(&db, "e2e-kafka-big", &[]).await;
    let topic = &server.topic;

    let marker = unique("big");
    let (enlarged, shouting, after) =
        (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let messages = [
        raw_event(&format!("{marker}-enlarged"), &enlarged, "kafka event", json!({"enlarge": true})),
        raw_event(&format!("{marker}-shouting"), &shouting, "kafka event", json!({"shout": true})),
        raw_event(&format!("{marker}-after"), &after, "kafka event", json!({})),
    ];
    // Offered until the server joined its group (it starts at the latest offset) and the event
    // after the oversized ones comes out.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        produce(topic, &messages).await;
        let found = consume_topic_to_end("clickhouse_events_proto", events_start)
            .await
            .into_iter()
            .filter_map(|(_, value)| value)
            .any(|value| contains(&value, &after));
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "the event after the oversized ones never landed");
    }
    let rows = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows: Vec<serde_json::Value> = consume_topic_to_end("events_dead_letter_queue", dead_letters_start)
                .await
                .into_iter()
                .filter_map(|(_, value)| serde_json::from_slice::<serde_json::Value>(&value?).ok())
                .filter(|row| {
                    row.to_string().contains(&marker)
                        || row["raw_payload"].as_str().is_some_and(|payload| payload.contains("yyyyyyyyyyyyyyyy"))
                })
                .collect();
            let enlarged_row = rows.iter().any(|row| row["event_uuid"] == json!(enlarged));
            let log_row =
                rows.iter().any(|row| row["error"].as_str().is_some_and(|e| e.contains("plugin_log_entries")));
            if enlarged_row && log_row {
                break rows;
            }
            assert!(Instant::now() < deadline, "dead letters missing: {rows:?}");
        }
    };
    let enlarged_row = rows.iter().find(|row| row["event_uuid"] == json!(enlarged)).unwrap();
    assert_eq!(enlarged_row["error_location"], json!("plugin_server_kafka_producer"));
    assert!(enlarged_row["error"].as_str().unwrap().contains("clickhouse_events_proto"), "{enlarged_row}");
    assert!(enlarged_row["error"].as_str().unwrap().contains("byte limit"), "{enlarged_row}");
    assert_eq!(enlarged_row["team_id"], json!(common::TEAM_ID));
    assert!(enlarged_row["raw_payload"].as_str().unwrap().len() <= 64 * 1024);

    // Still consuming: a later event lands too.
    let later = uuid::Uuid::now_v7().to_string();
    produce(topic, &[raw_event(&format!("{marker}-later"), &later, "kafka event", json!({}))]).await;
    wait_for_message("clickhouse_events_proto", events_start, &later).await;
    assert!(server.is_running(), "the server is still running");

    server.stop().await;
}
