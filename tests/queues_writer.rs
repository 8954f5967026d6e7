//! The ClickHouse pipeline's `EventWriter`: each write becomes the reference's Kafka records, in
//! the reference's order (recorded by a sender standing in for the broker; the bytes themselves are
//! checked in queues_messages.rs, delivery to a real broker in queues_producer.rs).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use plugin_server::ingestion::elements::Element;
use plugin_server::ingestion::persons::{Person, PersonDistinctId};
use plugin_server::sinks::kafka_producer::{BatchSender, FlushSettings};
use plugin_server::sinks::messages::EventProto;
use plugin_server::sinks::writer::{EventPayload, EventWriter, GroupPayload, SessionRecordingPayload};
use plugin_server::sinks::{KafkaEventWriter, KafkaProducerWrapper, KafkaRecord, ProduceError};
use prost::Message;
use serde_json::{json, Value};

struct Recorder(Arc<Mutex<Vec<KafkaRecord>>>);

#[async_trait]
impl BatchSender for Recorder {
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        self.0.lock().unwrap().extend(records);
        Ok(())
    }
}

/// A writer whose producer sends every record at once (the test default `KAFKA_PRODUCER_MAX_QUEUE_SIZE=0`).
fn writer() -> (KafkaEventWriter, Arc<Mutex<Vec<KafkaRecord>>>) {
    let records = Arc::new(Mutex::new(Vec::new()));
    let settings = FlushSettings {
        max_queue_size: 0,
        max_batch_bytes: 900_000,
        flush_frequency: std::time::Duration::from_millis(500),
    };
    let producer = Arc::new(KafkaProducerWrapper::new(Box::new(Recorder(records.clone())), settings));
    (KafkaEventWriter::new(producer), records)
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

fn json_of(record: &KafkaRecord, index: usize) -> Value {
    serde_json::from_slice(record.messages[index].value.as_deref().unwrap()).unwrap()
}

fn person(id: i32, uuid: &str, identified: bool) -> Person {
    Person {
        id,
        created_at: time("2021-10-28T11:59:57.792Z"),
        properties: json!({"userProp": "propValue"}).as_object().unwrap().clone(),
        properties_last_updated_at: None,
        properties_last_operation: None,
        team_id: 2,
        is_user_id: None,
        is_identified: identified,
        uuid: uuid::Uuid::parse_str(uuid).unwrap(),
    }
}

const TARGET: &str = "00000000-0000-0000-0000-00000000000a";
const SOURCE: &str = "00000000-0000-0000-0000-00000000000b";

#[tokio::test]
async fn persons_and_distinct_ids_in_the_reference_order() {
    let (writer, records) = writer();
    assert!(writer.is_clickhouse_pipeline());
    let target = person(1, TARGET, true);
    let rows = [
        PersonDistinctId { id: 10, team_id: 2, person_id: 1, distinct_id: "distinct1".into() },
        PersonDistinctId { id: 11, team_id: 2, person_id: 1, distinct_id: "distinct2".into() },
    ];
    writer.person_created(&target, &rows).await.unwrap();
    let source = person(2, SOURCE, false);
    let moved = [PersonDistinctId { id: 12, team_id: 2, person_id: 2, distinct_id: "anon".into() }];
    writer.people_merged(&target, &moved, &source).await.unwrap();
    writer.person_updated(&target).await.unwrap();

    let records = records.lock().unwrap();
    let topics: Vec<&str> = records.iter().map(|record| record.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "clickhouse_person",
            "clickhouse_person_unique_id",
            "clickhouse_person_unique_id",
            "clickhouse_person",
            "clickhouse_person_unique_id",
            "clickhouse_person",
            "clickhouse_person"
        ]
    );
    assert_eq!(
        json_of(&records[0], 0),
        json!({"id": TARGET, "created_at": "2021-10-28 11:59:57", "properties": "{\"userProp\":\"propValue\"}", "team_id": 2, "is_identified": true, "is_deleted": 0})
    );
    assert_eq!(
        json_of(&records[1], 0),
        json!({"id": 10, "distinct_id": "distinct1", "person_id": TARGET, "team_id": 2, "is_deleted": 0})
    );
    assert_eq!(json_of(&records[2], 0)["distinct_id"], json!("distinct2"));
    assert_eq!(records[4].messages.len(), 2);
    assert_eq!(
        json_of(&records[4], 0),
        json!({"distinct_id": "anon", "person_id": TARGET, "team_id": 2, "is_deleted": 0})
    );
    assert_eq!(
        json_of(&records[4], 1),
        json!({"distinct_id": "anon", "person_id": SOURCE, "team_id": 2, "is_deleted": 1})
    );
    assert_eq!(json_of(&records[5], 0)["id"], json!(SOURCE));
    assert_eq!(json_of(&records[5], 0)["is_deleted"], json!(1));
}

#[tokio::test]
async fn events_recordings_groups_and_dead_letters() {
    let (writer, records) = writer();
    let uuid = uuid::Uuid::parse_str("0179fb6c-0000-0000-0000-000000000001").unwrap();
    let event = EventPayload {
        uuid,
        event: "$autocapture".into(),
        properties: json!({"a": 1}).as_object().unwrap().clone(),
        timestamp: time("2021-10-28T11:59:57.792Z"),
        team_id: 2,
        distinct_id: "d".into(),
        created_at: time("2021-10-28T12:00:00.010Z"),
        elements: vec![Element {
            tag_name: Some("button".into()),
            text: Some("Sign up!".into()),
            ..Element::default()
        }],
    };
    assert_eq!(writer.write_event(&event).await.unwrap(), None);
    writer
        .write_session_recording(&SessionRecordingPayload {
            uuid,
            team_id: 2,
            distinct_id: "d".into(),
            session_id: Some("1234abc".into()),
            snapshot_data: Some(json!("yes way")),
            timestamp: time("2021-10-28T11:59:57.792Z"),
        })
        .await
        .unwrap();
    writer
        .group_identified(&GroupPayload {
            team_id: 2,
            group_type_index: 0,
            group_key: "org:5".into(),
            group_properties: json!({"name": "PostHog"}).as_object().unwrap().clone(),
            created_at: time("2021-10-28T12:00:00Z"),
        })
        .await
        .unwrap();
    writer.register_action_matches(1, &[69]).await.unwrap();
    let plugin_event: plugin_server::event::PluginEvent = serde_json::from_value(json!({
        "distinct_id": "d", "ip": "127.0.0.1", "site_url": "", "team_id": 2, "now": "2021-10-28T12:00:00Z",
        "event": "default event", "properties": {"key": "value"}, "uuid": uuid.to_string()}))
    .unwrap();
    assert!(writer.dead_letter(&plugin_event, "database unavailable").await.unwrap());

    let records = records.lock().unwrap();
    let topics: Vec<&str> = records.iter().map(|record| record.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "clickhouse_events_proto",
            "clickhouse_session_recording_events",
            "clickhouse_groups",
            "events_dead_letter_queue"
        ]
    );
    let proto = EventProto::decode_length_delimited(records[0].messages[0].value.as_deref().unwrap()).unwrap();
    assert_eq!(records[0].messages[0].key.as_deref(), Some(uuid.to_string().as_str()));
    assert_eq!(proto.timestamp.as_deref(), Some("2021-10-28 11:59:57.792"));
    assert_eq!(proto.created_at.as_deref(), Some("2021-10-28T12:00:00.010Z"));
    assert_eq!(proto.team_id, Some(2));
    assert_eq!(proto.elements_chain, Some(plugin_server::ingestion::elements::elements_to_chain(&event.elements)));
    assert!(proto.elements_chain.as_deref().unwrap().starts_with("button"));
    let recording = json_of(&records[1], 0);
    assert_eq!(recording["session_id"], json!("1234abc"));
    assert_eq!(recording["snapshot_data"], json!("\"yes way\""));
    assert_eq!(json_of(&records[2], 0)["group_properties"], json!("{\"name\":\"PostHog\"}"));
    let dead_letter = json_of(&records[3], 0);
    assert_eq!(dead_letter["error"], json!("ingestEvent failed. Error: database unavailable"));
    assert_eq!(dead_letter["event_uuid"], json!(uuid.to_string()));
}
