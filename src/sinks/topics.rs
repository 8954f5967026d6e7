//! Kafka topic names, exactly the reference's `src/config/kafka-topics.ts`. Only names live here;
//! what goes into each topic is in `messages`.

/// Events for ClickHouse, as length-delimited protobuf (`messages::event_record`).
pub const KAFKA_EVENTS: &str = "clickhouse_events_proto";
/// Person rows (`messages::person_record`).
pub const KAFKA_PERSON: &str = "clickhouse_person";
/// Person distinct id rows (`messages::person_distinct_id_*`).
pub const KAFKA_PERSON_UNIQUE_ID: &str = "clickhouse_person_unique_id";
/// `$snapshot` events (`messages::session_recording_record`).
pub const KAFKA_SESSION_RECORDING_EVENTS: &str = "clickhouse_session_recording_events";
/// Raw events to ingest: the default `KAFKA_CONSUMPTION_TOPIC`.
pub const KAFKA_EVENTS_PLUGIN_INGESTION: &str = "events_plugin_ingestion";
/// Plugin log entries (`messages::plugin_log_entry_record`).
pub const KAFKA_PLUGIN_LOG_ENTRIES: &str = "plugin_log_entries";
/// Events that could not be ingested (`messages::dead_letter_record`).
pub const KAFKA_EVENTS_DEAD_LETTER_QUEUE: &str = "events_dead_letter_queue";
/// Groups (`messages::group_record`).
pub const KAFKA_GROUPS: &str = "clickhouse_groups";

/// All eight, in the order the reference's test helper creates them.
pub const ALL_TOPICS: [&str; 8] = [
    KAFKA_EVENTS,
    KAFKA_PERSON,
    KAFKA_PERSON_UNIQUE_ID,
    KAFKA_SESSION_RECORDING_EVENTS,
    KAFKA_EVENTS_PLUGIN_INGESTION,
    KAFKA_PLUGIN_LOG_ENTRIES,
    KAFKA_EVENTS_DEAD_LETTER_QUEUE,
    KAFKA_GROUPS,
];
