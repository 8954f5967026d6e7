//! The exact bytes of what the server writes to Kafka for ClickHouse (10 §3.3–3.10), the raw event
//! decoding (merge order), and the dead letter of tests/clickhouse/dead-letter-queue.test.ts.

use chrono::{DateTime, Utc};
use plugin_server::event::PluginEvent;
use plugin_server::sinks::messages::*;
use plugin_server::sinks::topics;
use plugin_server::sources::decode::{decode_raw_event, RawEventError};
use prost::Message;
use serde_json::{json, Map, Value};

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

fn properties(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

fn value_text(record: &plugin_server::sinks::KafkaRecord, index: usize) -> String {
    String::from_utf8(record.messages[index].value.clone().unwrap()).unwrap()
}

fn length_delimited(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

#[test]
fn events_are_length_delimited_protobuf_with_every_field_written() {
    let event = ClickHouseEvent {
        uuid: "u".into(),
        event: "$pageview".into(),
        properties: properties(json!({"a": 1})),
        timestamp: time("2021-10-28T11:59:57.792Z"),
        team_id: 2,
        distinct_id: "d".into(),
        created_at: time("2021-10-28T12:00:00.010Z"),
        elements_chain: String::new(),
    };
    let record = event_record(&event);
    assert_eq!(record.topic, topics::KAFKA_EVENTS);
    assert_eq!(record.messages[0].key.as_deref(), Some("u"));
    let mut message = Vec::new();
    message.extend(length_delimited(0x0a, b"u"));
    message.extend(length_delimited(0x12, b"$pageview"));
    message.extend(length_delimited(0x1a, br#"{"a":1}"#));
    message.extend(length_delimited(0x22, b"2021-10-28 11:59:57.792"));
    message.extend([0x28, 2]);
    message.extend(length_delimited(0x32, b"d"));
    message.extend(length_delimited(0x3a, b"2021-10-28T12:00:00.010Z"));
    // An empty elements chain is still written (as protobufjs does).
    message.extend([0x42, 0]);
    let mut expected = vec![message.len() as u8];
    expected.extend(message);
    assert_eq!(record.messages[0].value.as_deref(), Some(expected.as_slice()));
    let decoded = EventProto::decode_length_delimited(expected.as_slice()).unwrap();
    assert_eq!(decoded.team_id, Some(2));
    assert_eq!(decoded.proto_timestamp, None);
}

#[test]
fn session_recordings_persons_distinct_ids_groups() {
    let at = time("2021-10-28T11:59:57.792Z");
    let record = session_recording_record("u1", 2, "d1", Some("s1"), Some(&json!({"type": 3})), &at);
    assert_eq!(record.topic, "clickhouse_session_recording_events");
    assert_eq!(record.messages[0].key.as_deref(), Some("u1"));
    assert_eq!(
        value_text(&record, 0),
        r#"{"uuid":"u1","team_id":2,"distinct_id":"d1","session_id":"s1","snapshot_data":"{\"type\":3}","timestamp":"2021-10-28 11:59:57.792","created_at":"2021-10-28 11:59:57.792"}"#
    );

    let without = session_recording_record("u1", 2, "d1", None, None, &at);
    assert_eq!(
        value_text(&without, 0),
        r#"{"uuid":"u1","team_id":2,"distinct_id":"d1","timestamp":"2021-10-28 11:59:57.792","created_at":"2021-10-28 11:59:57.792"}"#
    );

    let record = person_record("p-uuid", &at, &properties(json!({"userProp": "propValue"})), 2, true, false);
    assert_eq!(record.topic, "clickhouse_person");
    assert_eq!(record.messages[0].key, None);
    assert_eq!(
        value_text(&record, 0),
        r#"{"id":"p-uuid","created_at":"2021-10-28 11:59:57","properties":"{\"userProp\":\"propValue\"}","team_id":2,"is_identified":true,"is_deleted":0}"#
    );
    let deleted = person_record("p-uuid", &at, &Map::new(), 2, false, true);
    assert!(value_text(&deleted, 0).ends_with(r#""is_identified":false,"is_deleted":1}"#));

    let record = person_distinct_id_added_record(7, "distinct1", "p-uuid", 2);
    assert_eq!(record.topic, "clickhouse_person_unique_id");
    assert_eq!(
        value_text(&record, 0),
        r#"{"id":7,"distinct_id":"distinct1","person_id":"p-uuid","team_id":2,"is_deleted":0}"#
    );

    let record = person_distinct_id_moved_record("distinct1", 2, "source-uuid", "target-uuid");
    assert_eq!(record.messages.len(), 2);
    assert_eq!(
        value_text(&record, 0),
        r#"{"distinct_id":"distinct1","person_id":"target-uuid","team_id":2,"is_deleted":0}"#
    );
    assert_eq!(
        value_text(&record, 1),
        r#"{"distinct_id":"distinct1","person_id":"source-uuid","team_id":2,"is_deleted":1}"#
    );

    let record = group_record(0, "org:5", 2, &properties(json!({"name": "PostHog"})), &at);
    assert_eq!(record.topic, "clickhouse_groups");
    assert_eq!(
        value_text(&record, 0),
        r#"{"group_type_index":0,"group_key":"org:5","team_id":2,"group_properties":"{\"name\":\"PostHog\"}","created_at":"2021-10-28 11:59:57"}"#
    );
}

#[test]
fn plugin_log_entries() {
    let instance = uuid::Uuid::parse_str("017cc6c5-6e00-0000-1111-222233334444").unwrap();
    let entry =
        PluginLogEntryMessage::new(2, 60, 39, Some("2021-10-28T11:59:57.792Z"), "CONSOLE", "INFO", "amogus", &instance);
    assert_eq!(entry.timestamp, "2021-10-28 11:59:57.792");
    let record = plugin_log_entry_record(&entry);
    assert_eq!(record.topic, "plugin_log_entries");
    assert_eq!(record.messages[0].key.as_deref(), Some(entry.id.as_str()));
    assert_eq!(
        value_text(&record, 0),
        format!(
            r#"{{"id":"{}","team_id":2,"plugin_id":60,"plugin_config_id":39,"timestamp":"2021-10-28 11:59:57.792","source":"CONSOLE","type":"INFO","message":"amogus","instance_id":"017cc6c5-6e00-0000-1111-222233334444"}}"#,
            entry.id
        )
    );
    let now_entry = PluginLogEntryMessage::new(2, 60, 39, None, "SYSTEM", "LOG", "x", &instance);
    assert!(!now_entry.timestamp.contains('T') && !now_entry.timestamp.ends_with('Z'));
}

/// tests/clickhouse/dead-letter-queue.test.ts: ingestion throws `database unavailable`.
#[test]
fn dead_letter_of_a_failed_ingestion() {
    let event: PluginEvent = serde_json::from_value(json!({
        "distinct_id": "my_id", "ip": "127.0.0.1", "site_url": "http://localhost", "team_id": 2,
        "now": "2020-02-23T02:15:00Z", "timestamp": "2020-02-23T02:15:00Z", "sent_at": "2020-02-23T02:15:00Z",
        "event": "default event", "properties": {"key": "value"}, "uuid": "0179fb6c-0000-0000-0000-000000000001",
    }))
    .unwrap();
    let record = dead_letter_record(
        &event,
        "database unavailable",
        INGEST_EVENT_ERROR_LOCATION,
        &time("2021-10-28T12:00:01.5Z"),
    );
    assert_eq!(record.topic, "events_dead_letter_queue");
    let row: Map<String, Value> = serde_json::from_str(&value_text(&record, 0)).unwrap();
    assert_eq!(row["event"], json!("default event"));
    assert_eq!(row["ip"], json!("127.0.0.1"));
    assert_eq!(row["team_id"], json!(2));
    assert_eq!(row["distinct_id"], json!("my_id"));
    assert_eq!(row["site_url"], json!("http://localhost"));
    assert_eq!(row["error_location"], json!("plugin_server_ingest_event"));
    assert_eq!(row["error"], json!("ingestEvent failed. Error: database unavailable"));
    assert_eq!(row["properties"], json!(r#"{"key":"value"}"#));
    assert_eq!(row["event_uuid"], json!("0179fb6c-0000-0000-0000-000000000001"));
    assert_eq!(row["now"], json!("2020-02-23 02:15:00"));
    assert_eq!(row["error_timestamp"], json!("2021-10-28 12:00:01"));
    assert!(uuid::Uuid::parse_str(row["id"].as_str().unwrap()).is_ok());
    assert!(!row.contains_key("sent_at") && !row.contains_key("timestamp"));
    let raw: Value = serde_json::from_str(row["raw_payload"].as_str().unwrap()).unwrap();
    assert_eq!(raw["sent_at"], json!("2020-02-23T02:15:00Z"));
    assert_eq!(raw["properties"], json!({"key": "value"}));
}

#[test]
fn raw_events_decode_with_data_winning() {
    let data =
        json!({"event": "$pageview", "distinct_id": 123, "uuid": "data-uuid", "team_id": 3, "properties": {"a": 1}});
    let value = json!({"distinct_id": "outer", "ip": "", "site_url": "", "team_id": 2, "uuid": "outer-uuid",
        "data": data.to_string(), "now": "2021-10-28T12:00:00Z", "sent_at": "", "kafka_offset": "5"});
    let event = decode_raw_event(Some(value.to_string().as_bytes())).unwrap();
    assert_eq!(event.distinct_id, "123");
    assert_eq!(event.uuid.as_deref(), Some("data-uuid"));
    assert_eq!(event.team_id, 3);
    assert_eq!(event.ip, None);
    assert_eq!(event.site_url, "");
    // Only `ip` and `site_url` are cleared when empty; an empty `sent_at` stays (as the reference).
    assert_eq!(event.sent_at.as_deref(), Some(""));
    assert_eq!(event.now, "2021-10-28T12:00:00Z");
    assert_eq!(event.extra["kafka_offset"], json!("5"));
    assert!(!event.extra.contains_key("data"));

    for bad in [
        &b""[..],
        b"not json",
        br#"{"data": 5}"#,
        br#"{"data": "{"}"#,
        br#"{"team_id": 2}"#,
        br#"{"data": "{}", "team_id": 2}"#,
    ] {
        assert!(decode_raw_event(Some(bad)).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    assert!(matches!(decode_raw_event(None), Err(RawEventError::Empty)));
}

/// Values JavaScript accepts where the reference reads a field without a type check decode as
/// JavaScript reads them (the strict decoding dead-lettered these: "invalid type: integer
/// `1635760798000`, expected a string").
#[test]
fn raw_events_decode_fields_as_javascript_reads_them() {
    let data = json!({"event": "e", "distinct_id": 1.0, "timestamp": 1635760798000_i64, "offset": "2000",
        "properties": null, "$set": "ab", "$set_once": 0, "team_id": 2.0, "ip": 3232235777_i64});
    let value = json!({"site_url": 7, "uuid": "0178b5a2-5ad8-0000-21a1-6b4b9a5c8d3f", "data": data.to_string(),
        "now": "2021-11-01T10:00:00.000Z"});
    let event = decode_raw_event(Some(value.to_string().as_bytes())).unwrap();
    assert_eq!(event.distinct_id, "1");
    assert_eq!(event.timestamp, Some(json!(1635760798000_i64)));
    assert_eq!(event.offset, Some(json!("2000")));
    assert_eq!(event.properties, None);
    assert_eq!(event.set, Some(json!({"0": "a", "1": "b"}).as_object().unwrap().clone()));
    assert_eq!(event.set_once, None);
    assert_eq!(event.team_id, 2);
    assert_eq!(event.ip, Some(json!(3232235777_i64)));
    assert_eq!(event.site_url, "7");
    // As plugins get it: the values as sent.
    let round_trip = serde_json::to_value(&event).unwrap();
    assert_eq!(round_trip["timestamp"], json!(1635760798000_i64));
    assert_eq!(round_trip["offset"], json!("2000"));

    // Where the reference fails too: no team, no event name.
    for data in [json!({"event": "e", "team_id": null}), json!({"event": "e", "team_id": 2.5}), json!({"team_id": 2})] {
        let value = json!({"data": data.to_string(), "now": "2021-11-01T10:00:00.000Z"});
        assert!(decode_raw_event(Some(value.to_string().as_bytes())).is_err(), "{data}");
    }
}

#[test]
fn plugin_captures_become_raw_event_messages_that_decode_back() {
    let data =
        properties(json!({"distinct_id": "plugin-x", "event": "custom event", "timestamp": "2021-10-28T12:00:00.000Z",
        "properties": {"name": "haha"}, "team_id": 2, "uuid": "u-1"}));
    let record = raw_event_record("events_plugin_ingestion", &data, 2);
    assert_eq!(record.messages[0].key.as_deref(), Some("u-1"));
    assert_eq!(
        value_text(&record, 0),
        format!(
            r#"{{"distinct_id":"plugin-x","ip":"","site_url":"","data":{},"team_id":2,"now":"2021-10-28T12:00:00.000Z","sent_at":"2021-10-28T12:00:00.000Z","uuid":"u-1"}}"#,
            Value::String(Value::Object(data.clone()).to_string())
        )
    );
    let event = decode_raw_event(record.messages[0].value.as_deref()).unwrap();
    assert_eq!((event.event.as_str(), event.distinct_id.as_str(), event.team_id), ("custom event", "plugin-x", 2));
    assert_eq!(event.ip, None);
}

#[test]
fn malformed_messages_become_dead_letters_with_what_could_be_read() {
    let record = malformed_message_dead_letter_record(
        br#"{"uuid": "u", "team_id": 2, "data": 7}"#,
        "bad data",
        &time("2021-10-28T12:00:00Z"),
    );
    let row: Map<String, Value> = serde_json::from_str(&value_text(&record, 0)).unwrap();
    assert_eq!(row["event_uuid"], json!("u"));
    assert_eq!(row["team_id"], json!(2));
    assert_eq!(row["error_location"], json!("plugin_server_kafka_consumer"));
    assert_eq!(row["error"], json!("Invalid Kafka message. Error: bad data"));
    assert_eq!(row["raw_payload"], json!(r#"{"uuid": "u", "team_id": 2, "data": 7}"#));
    let binary = malformed_message_dead_letter_record(&[0xff, 0xfe], "not utf-8", &time("2021-10-28T12:00:00Z"));
    assert!(value_text(&binary, 0).contains("raw_payload"));
}
