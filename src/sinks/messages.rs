//! The exact messages the server writes to Kafka for ClickHouse, with the reference's field names,
//! key order and timestamp formats (10 §3.3–3.10), and the timestamp formatters they use:
//! * events → `clickhouse_events_proto`, length-delimited protobuf `Event` of `events.proto`;
//! * persons, distinct ids, groups, session recordings, plugin log entries, dead letters and raw
//!   events (plugins' `posthog.capture` in the Kafka pipeline) → JSON.
//!
//! Pure functions from typed values to [`KafkaRecord`]s; sending is `kafka_producer`, deciding
//! what to write is the ingestion's.

use chrono::{DateTime, Utc};
use prost::Message;
use serde_json::{json, Map, Value};

use super::kafka_producer::{KafkaMessage, KafkaRecord};
use super::topics;
use crate::event::{PluginEvent, Properties};
use crate::ingestion::timestamp::{format_clickhouse, format_clickhouse_seconds, format_iso, parse_timestamp};
use crate::ingestion::uuidt::new_uuidt;

/// `google.protobuf.Timestamp` (never set by the reference; declared so the schema matches).
#[derive(Clone, PartialEq, Message)]
pub struct ProtoTimestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `message Event` of the reference's `src/config/idl/events.proto`. Fields are `optional` so that,
/// like protobufjs, set fields are written even when empty: the bytes match the reference's.
#[derive(Clone, PartialEq, Message)]
pub struct EventProto {
    #[prost(string, optional, tag = "1")]
    pub uuid: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub event: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub properties: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub timestamp: Option<String>,
    #[prost(uint64, optional, tag = "5")]
    pub team_id: Option<u64>,
    #[prost(string, optional, tag = "6")]
    pub distinct_id: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub created_at: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub elements_chain: Option<String>,
    #[prost(message, optional, tag = "9")]
    pub proto_created_at: Option<ProtoTimestamp>,
    #[prost(message, optional, tag = "10")]
    pub proto_timestamp: Option<ProtoTimestamp>,
}

/// An event as ingestion writes it for ClickHouse.
#[derive(Debug, Clone, PartialEq)]
pub struct ClickHouseEvent {
    pub uuid: String,
    /// Already sanitized event name.
    pub event: String,
    pub properties: Properties,
    /// When the event happened.
    pub timestamp: DateTime<Utc>,
    pub team_id: i64,
    pub distinct_id: String,
    /// Processing time (the reference's `castTimestampOrNow()`).
    pub created_at: DateTime<Utc>,
    /// Empty when the event has no elements.
    pub elements_chain: String,
}

impl ClickHouseEvent {
    pub fn to_proto(&self) -> EventProto {
        EventProto {
            uuid: Some(self.uuid.clone()),
            event: Some(self.event.clone()),
            properties: Some(Value::Object(self.properties.clone()).to_string()),
            timestamp: Some(format_clickhouse(&self.timestamp)),
            team_id: Some(self.team_id.max(0) as u64),
            distinct_id: Some(self.distinct_id.clone()),
            created_at: Some(format_iso(&self.created_at)),
            elements_chain: Some(self.elements_chain.clone()),
            proto_created_at: None,
            proto_timestamp: None,
        }
    }
}

/// The event for `clickhouse_events_proto`: key = uuid, value = varint length + protobuf bytes
/// (protobufjs `encodeDelimited`, what ClickHouse's `Protobuf` format reads).
pub fn event_record(event: &ClickHouseEvent) -> KafkaRecord {
    KafkaRecord::single(
        topics::KAFKA_EVENTS,
        Some(event.uuid.clone()),
        event.to_proto().encode_length_delimited_to_vec(),
    )
}

fn json_bytes(value: &Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// A `$snapshot` event for `clickhouse_session_recording_events`; both `timestamp` and
/// `created_at` are the event's time in ClickHouse format, as in the reference. An absent
/// `$session_id` or `$snapshot_data` leaves the key out (JavaScript's `JSON.stringify` drops
/// `undefined`).
pub fn session_recording_record(
    uuid: &str,
    team_id: i64,
    distinct_id: &str,
    session_id: Option<&str>,
    snapshot_data: Option<&Value>,
    timestamp: &DateTime<Utc>,
) -> KafkaRecord {
    let time = format_clickhouse(timestamp);
    let mut fields = Map::new();
    fields.insert("uuid".into(), json!(uuid));
    fields.insert("team_id".into(), json!(team_id));
    fields.insert("distinct_id".into(), json!(distinct_id));
    if let Some(session_id) = session_id {
        fields.insert("session_id".into(), json!(session_id));
    }
    if let Some(snapshot_data) = snapshot_data {
        fields.insert("snapshot_data".into(), Value::String(snapshot_data.to_string()));
    }
    fields.insert("timestamp".into(), Value::String(time.clone()));
    fields.insert("created_at".into(), Value::String(time));
    KafkaRecord::single(
        topics::KAFKA_SESSION_RECORDING_EVENTS,
        Some(uuid.to_string()),
        json_bytes(&Value::Object(fields)),
    )
}

/// A person create/update (`is_deleted = false`) or delete (`true`) for `clickhouse_person`.
pub fn person_record(
    person_uuid: &str,
    created_at: &DateTime<Utc>,
    properties: &Properties,
    team_id: i64,
    is_identified: bool,
    is_deleted: bool,
) -> KafkaRecord {
    let value = json!({
        "id": person_uuid,
        "created_at": format_clickhouse_seconds(created_at),
        "properties": Value::Object(properties.clone()).to_string(),
        "team_id": team_id,
        "is_identified": is_identified,
        "is_deleted": u8::from(is_deleted),
    });
    KafkaRecord {
        topic: topics::KAFKA_PERSON.into(),
        messages: vec![KafkaMessage { key: None, value: Some(json_bytes(&value)) }],
    }
}

/// A distinct id added to a person (`posthog_persondistinctid` row `id`), for
/// `clickhouse_person_unique_id`.
pub fn person_distinct_id_added_record(row_id: i64, distinct_id: &str, person_uuid: &str, team_id: i64) -> KafkaRecord {
    let value = json!({
        "id": row_id,
        "distinct_id": distinct_id,
        "person_id": person_uuid,
        "team_id": team_id,
        "is_deleted": 0,
    });
    KafkaRecord {
        topic: topics::KAFKA_PERSON_UNIQUE_ID.into(),
        messages: vec![KafkaMessage { key: None, value: Some(json_bytes(&value)) }],
    }
}

/// A distinct id moved from one person to another (merge): one record with two messages, the new
/// owner (`is_deleted 0`) then the old one (`is_deleted 1`).
pub fn person_distinct_id_moved_record(
    distinct_id: &str,
    team_id: i64,
    source_uuid: &str,
    target_uuid: &str,
) -> KafkaRecord {
    let message = |person_uuid: &str, is_deleted: u8| KafkaMessage {
        key: None,
        value: Some(json_bytes(&json!({
            "distinct_id": distinct_id,
            "person_id": person_uuid,
            "team_id": team_id,
            "is_deleted": is_deleted,
        }))),
    };
    KafkaRecord {
        topic: topics::KAFKA_PERSON_UNIQUE_ID.into(),
        messages: vec![message(target_uuid, 0), message(source_uuid, 1)],
    }
}

/// A group upsert (`$groupidentify`) for `clickhouse_groups`; `created_at` is the current time.
pub fn group_record(
    group_type_index: i64,
    group_key: &str,
    team_id: i64,
    properties: &Properties,
    created_at: &DateTime<Utc>,
) -> KafkaRecord {
    let value = json!({
        "group_type_index": group_type_index,
        "group_key": group_key,
        "team_id": team_id,
        "group_properties": Value::Object(properties.clone()).to_string(),
        "created_at": format_clickhouse_seconds(created_at),
    });
    KafkaRecord {
        topic: topics::KAFKA_GROUPS.into(),
        messages: vec![KafkaMessage { key: None, value: Some(json_bytes(&value)) }],
    }
}

/// A plugin log entry as the reference's `queuePluginLogEntry` builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginLogEntryMessage {
    pub id: String,
    pub team_id: i64,
    pub plugin_id: i64,
    pub plugin_config_id: i64,
    /// ISO timestamp; written with `T` → space and `Z` removed.
    pub timestamp: String,
    /// `SYSTEM`, `PLUGIN` or `CONSOLE`.
    pub source: String,
    /// `DEBUG`, `LOG`, `INFO`, `WARN` or `ERROR`.
    pub log_type: String,
    pub message: String,
    pub instance_id: String,
}

impl PluginLogEntryMessage {
    /// An entry with a fresh UUIDT id; `timestamp` defaults to now.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        team_id: i64,
        plugin_id: i64,
        plugin_config_id: i64,
        timestamp: Option<&str>,
        source: &str,
        log_type: &str,
        message: &str,
        instance_id: &uuid::Uuid,
    ) -> PluginLogEntryMessage {
        let iso = timestamp.map_or_else(|| format_iso(&Utc::now()), str::to_string);
        PluginLogEntryMessage {
            id: new_uuidt().to_string(),
            team_id,
            plugin_id,
            plugin_config_id,
            // JavaScript's `replace` with a string pattern replaces the first occurrence only.
            timestamp: iso.replacen('T', " ", 1).replacen('Z', "", 1),
            source: source.to_string(),
            log_type: log_type.to_string(),
            message: message.to_string(),
            instance_id: instance_id.to_string(),
        }
    }
}

/// The entry for `plugin_log_entries`, keyed by its id.
pub fn plugin_log_entry_record(entry: &PluginLogEntryMessage) -> KafkaRecord {
    let value = json!({
        "id": entry.id,
        "team_id": entry.team_id,
        "plugin_id": entry.plugin_id,
        "plugin_config_id": entry.plugin_config_id,
        "timestamp": entry.timestamp,
        "source": entry.source,
        "type": entry.log_type,
        "message": entry.message,
        "instance_id": entry.instance_id,
    });
    KafkaRecord::single(topics::KAFKA_PLUGIN_LOG_ENTRIES, Some(entry.id.clone()), json_bytes(&value))
}

/// Where the reference's worker-side `ingestEvent` puts its dead letters.
pub const INGEST_EVENT_ERROR_LOCATION: &str = "plugin_server_ingest_event";
/// Where this server puts Kafka messages it cannot decode (the reference crashes on them).
pub const KAFKA_CONSUMER_ERROR_LOCATION: &str = "plugin_server_kafka_consumer";

/// The dead letter for an event whose ingestion failed (`generateEventDeadLetterQueueMessage`):
/// the event's fields except `now`, `sent_at`, `timestamp`, then `id`, `event_uuid`, `properties`
/// (JSON string), `now` (second precision or null), `error_timestamp`, `raw_payload`,
/// `error_location` and `error` = `ingestEvent failed. Error: <message>`.
pub fn dead_letter_record(
    event: &PluginEvent,
    error_message: &str,
    error_location: &str,
    now: &DateTime<Utc>,
) -> KafkaRecord {
    let raw = serde_json::to_value(event).unwrap_or(Value::Null);
    let mut fields = match raw.clone() {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    for key in ["now", "sent_at", "timestamp"] {
        fields.shift_remove(key);
    }
    let event_now = parse_timestamp(&event.now).map(|time| format_clickhouse_seconds(&time));
    fields.insert("id".into(), Value::String(new_uuidt().to_string()));
    fields.insert("event_uuid".into(), event.uuid.clone().map_or(Value::Null, Value::String));
    fields.insert(
        "properties".into(),
        Value::String(Value::Object(event.properties.clone().unwrap_or_default()).to_string()),
    );
    fields.insert("now".into(), event_now.map_or(Value::Null, Value::String));
    fields.insert("error_timestamp".into(), Value::String(format_clickhouse_seconds(now)));
    fields.insert("raw_payload".into(), Value::String(raw.to_string()));
    fields.insert("error_location".into(), Value::String(error_location.to_string()));
    fields.insert("error".into(), Value::String(format!("ingestEvent failed. Error: {error_message}")));
    KafkaRecord {
        topic: topics::KAFKA_EVENTS_DEAD_LETTER_QUEUE.into(),
        messages: vec![KafkaMessage { key: None, value: Some(json_bytes(&Value::Object(fields))) }],
    }
}

/// The dead letter for a consumed message that is not a valid event: whatever event fields could
/// be read, the raw value as `raw_payload`, and the reason.
pub fn malformed_message_dead_letter_record(raw: &[u8], reason: &str, now: &DateTime<Utc>) -> KafkaRecord {
    let text = String::from_utf8_lossy(raw).into_owned();
    let parsed = serde_json::from_str::<Map<String, Value>>(&text).unwrap_or_default();
    let mut fields = Map::new();
    fields.insert("id".into(), Value::String(new_uuidt().to_string()));
    if let Some(Value::String(uuid)) = parsed.get("uuid") {
        fields.insert("event_uuid".into(), Value::String(uuid.clone()));
    }
    for key in ["distinct_id", "team_id", "ip", "site_url"] {
        if let Some(value) = parsed.get(key).filter(|value| !value.is_null()) {
            fields.insert(key.into(), value.clone());
        }
    }
    if let Some(now_text) = parsed.get("now").and_then(Value::as_str).and_then(parse_timestamp) {
        fields.insert("now".into(), Value::String(format_clickhouse_seconds(&now_text)));
    }
    fields.insert("error_timestamp".into(), Value::String(format_clickhouse_seconds(now)));
    fields.insert("raw_payload".into(), Value::String(text));
    fields.insert("error_location".into(), Value::String(KAFKA_CONSUMER_ERROR_LOCATION.into()));
    fields.insert("error".into(), Value::String(format!("Invalid Kafka message. Error: {reason}")));
    KafkaRecord {
        topic: topics::KAFKA_EVENTS_DEAD_LETTER_QUEUE.into(),
        messages: vec![KafkaMessage { key: None, value: Some(json_bytes(&Value::Object(fields))) }],
    }
}

/// Where this server puts messages the Kafka producer could not deliver (too large, or refused
/// for good by the broker); the reference has none (its whole batch fails).
pub const KAFKA_PRODUCER_ERROR_LOCATION: &str = "plugin_server_kafka_producer";
/// How much of an undeliverable message `raw_payload` keeps, so that its dead letter always fits.
pub const DEAD_LETTER_RAW_PAYLOAD_BYTES: usize = 64 * 1024;
/// How much of each copied field (distinct id, event name, …) an undeliverable message's dead
/// letter keeps.
const DEAD_LETTER_FIELD_BYTES: usize = 1024;

/// The dead letter for a message the producer could not deliver (to any topic): the columns of
/// `events_dead_letter_queue` that can be read from it (an event's protobuf on
/// `clickhouse_events_proto`, the JSON fields of the others), `raw_payload` = the first
/// `raw_payload_bytes` (at most [`DEAD_LETTER_RAW_PAYLOAD_BYTES`]) of the value (protobuf decoded to
/// JSON first), and the reason. Small, whatever the message's size.
pub fn undeliverable_dead_letter_record(
    topic: &str,
    value: Option<&[u8]>,
    reason: &str,
    raw_payload_bytes: usize,
    now: &DateTime<Utc>,
) -> KafkaRecord {
    let value = value.unwrap_or_default();
    let (parsed, text) = if topic == topics::KAFKA_EVENTS {
        match EventProto::decode_length_delimited(value) {
            Ok(event) => {
                let mut fields = Map::new();
                fields.insert("event_uuid".into(), event.uuid.clone().map_or(Value::Null, Value::String));
                fields.insert("event".into(), event.event.clone().map_or(Value::Null, Value::String));
                fields.insert("distinct_id".into(), event.distinct_id.clone().map_or(Value::Null, Value::String));
                fields.insert("team_id".into(), event.team_id.map_or(Value::Null, Value::from));
                let text = json!({"uuid": event.uuid, "event": event.event, "properties": event.properties,
                    "timestamp": event.timestamp, "team_id": event.team_id, "distinct_id": event.distinct_id,
                    "created_at": event.created_at, "elements_chain": event.elements_chain})
                .to_string();
                (fields, text)
            }
            Err(_) => (Map::new(), String::from_utf8_lossy(value).into_owned()),
        }
    } else {
        let text = String::from_utf8_lossy(value).into_owned();
        let mut parsed = serde_json::from_str::<Map<String, Value>>(&text).unwrap_or_default();
        if let Some(uuid) = parsed.shift_remove("uuid") {
            parsed.entry("event_uuid").or_insert(uuid);
        }
        (parsed, text)
    };
    let mut fields = Map::new();
    fields.insert("id".into(), Value::String(new_uuidt().to_string()));
    for key in ["event_uuid", "event", "distinct_id", "team_id", "ip", "site_url", "now"] {
        match parsed.get(key) {
            Some(Value::String(text)) => {
                fields.insert(key.into(), Value::String(truncate_utf8(text, DEAD_LETTER_FIELD_BYTES).to_string()));
            }
            Some(number @ Value::Number(_)) => {
                fields.insert(key.into(), number.clone());
            }
            _ => {}
        }
    }
    fields.insert("error_timestamp".into(), Value::String(format_clickhouse_seconds(now)));
    fields.insert(
        "raw_payload".into(),
        Value::String(truncate_utf8(&text, raw_payload_bytes.min(DEAD_LETTER_RAW_PAYLOAD_BYTES)).to_string()),
    );
    fields.insert("error_location".into(), Value::String(KAFKA_PRODUCER_ERROR_LOCATION.into()));
    fields.insert(
        "error".into(),
        Value::String(format!("Kafka production failed. Error: {}", truncate_utf8(reason, DEAD_LETTER_FIELD_BYTES))),
    );
    KafkaRecord {
        topic: topics::KAFKA_EVENTS_DEAD_LETTER_QUEUE.into(),
        messages: vec![KafkaMessage { key: None, value: Some(json_bytes(&Value::Object(fields))) }],
    }
}

/// The longest prefix of `text` of at most `bytes` bytes that ends on a character boundary.
fn truncate_utf8(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let mut end = bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// An event captured by a plugin (`posthog.capture`) in the Kafka pipeline: a raw event message to
/// `KAFKA_CONSUMPTION_TOPIC`, keyed by the event uuid. `data` is the capture payload
/// `{distinct_id, event, timestamp, properties, team_id, uuid}`; its `distinct_id`, `timestamp`
/// and `uuid` fill the envelope, `team_id` is the plugin config's team.
pub fn raw_event_record(topic: &str, data: &Map<String, Value>, team_id: i64) -> KafkaRecord {
    let field = |key: &str| data.get(key).cloned().unwrap_or(Value::Null);
    let uuid = field("uuid");
    let value = json!({
        "distinct_id": field("distinct_id"),
        "ip": "",
        "site_url": "",
        "data": Value::Object(data.clone()).to_string(),
        "team_id": team_id,
        "now": field("timestamp"),
        "sent_at": field("timestamp"),
        "uuid": uuid,
    });
    KafkaRecord::single(topic, uuid.as_str().map(str::to_string), json_bytes(&value))
}
