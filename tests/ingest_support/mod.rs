//! Shared helpers of the ingestion tests: an `EventsProcessor` on a fresh fixture database and
//! the reference's `hub.db.fetch*` test queries.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use plugin_server::event::PluginEvent;
use plugin_server::ingestion::persons::{self, Person};
use plugin_server::ingestion::process_event::ProcessedEvent;
use plugin_server::ingestion::uuidt::new_uuidt;
use plugin_server::ingestion::{EventsProcessor, IngestError};
use plugin_server::sinks::PostgresEventWriter;
use serde_json::{json, Map, Value};
use sqlx::{PgPool, Row};

use crate::common::{TestDb, TEAM_ID};

pub struct Harness {
    pub db: TestDb,
    pub processor: EventsProcessor,
}

impl Harness {
    pub async fn new() -> Harness {
        let db = TestDb::with_fixture(None).await;
        let processor = processor_for(&db.pool);
        Harness { db, processor }
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// The reference's `eventsProcessor.processEvent(distinctId, ip, siteUrl, data, teamId, now,
    /// sentAt, uuid)`; `data` holds the event's own fields (`event`, `properties`, `timestamp`, …).
    #[allow(clippy::too_many_arguments)] // The reference's signature, kept for side-by-side reading.
    pub async fn process(
        &self,
        distinct_id: &str,
        ip: Option<&str>,
        data: Value,
        team_id: i64,
        now: DateTime<Utc>,
        sent_at: Option<DateTime<Utc>>,
        uuid: Option<String>,
    ) -> Result<Option<ProcessedEvent>, IngestError> {
        let mut event = plugin_event(distinct_id, ip, data, team_id, now, sent_at, uuid);
        self.processor.process_event(&mut event).await
    }

    /// `process` with the usual values: team 2, now, sent_at now, a fresh uuid, no ip.
    pub async fn process_simple(&self, distinct_id: &str, data: Value) -> Result<Option<ProcessedEvent>, IngestError> {
        let now = Utc::now();
        self.process(distinct_id, None, data, TEAM_ID.into(), now, Some(now), Some(new_uuidt().to_string())).await
    }

    /// The reference's test `capture(hub, name, properties)`: the worker's `ingestEvent`.
    pub async fn capture(&self, distinct_id: &str, event: &str, properties: Value) {
        let now = Utc::now();
        let data = json!({"event": event, "properties": properties});
        let event = plugin_event(
            distinct_id,
            Some("127.0.0.1"),
            data,
            TEAM_ID.into(),
            now,
            Some(now),
            Some(new_uuidt().to_string()),
        );
        self.processor.ingest_event(event).await.expect("ingest event");
    }

    /// posthog-js `identify`: `$identify` from `new_id` with `$anon_distinct_id` = `previous_id`.
    pub async fn identify(&self, previous_id: &str, new_id: &str) {
        self.capture(new_id, "$identify", json!({"$anon_distinct_id": previous_id, "distinct_id": new_id})).await
    }

    /// posthog-js `alias`: `$create_alias` sent by `current_id`.
    pub async fn alias(&self, current_id: &str, alias: &str) {
        self.capture(current_id, "$create_alias", json!({"alias": alias, "disinct_id": current_id})).await
    }

    /// The reference's test helper `createPerson(hub, team, distinctIds, properties)`.
    pub async fn create_person(&self, team_id: i32, distinct_ids: &[&str], properties: Value) -> Person {
        let properties = properties.as_object().cloned().unwrap_or_default();
        let (person, _) =
            persons::create_person(self.pool(), Utc::now(), &properties, team_id, false, new_uuidt(), distinct_ids)
                .await
                .expect("create person");
        person
    }

    pub async fn persons(&self) -> Vec<Person> {
        persons::fetch_persons(self.pool()).await.expect("fetch persons")
    }

    pub async fn distinct_ids(&self, person: &Person) -> Vec<String> {
        persons::fetch_distinct_ids(self.pool(), person).await.expect("fetch distinct ids")
    }

    pub async fn events(&self) -> Vec<EventRow> {
        fetch_events(self.pool()).await
    }

    /// The reference's `getEventsByPerson`: each person's distinct ids with the names of their
    /// events in time order.
    pub async fn events_by_person(&self) -> Vec<(Vec<String>, Vec<String>)> {
        let events = self.events().await;
        let mut result = Vec::new();
        for person in self.persons().await {
            let distinct_ids = self.distinct_ids(&person).await;
            let names = events
                .iter()
                .filter(|event| distinct_ids.contains(&event.distinct_id))
                .map(|event| event.event.clone())
                .collect();
            result.push((distinct_ids, names));
        }
        result
    }

    pub async fn property_definitions(&self) -> Vec<(String, bool)> {
        sqlx::query_as("SELECT name, is_numerical FROM posthog_propertydefinition")
            .fetch_all(self.pool())
            .await
            .expect("property definitions")
    }

    pub async fn event_definitions(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT name FROM posthog_eventdefinition")
            .fetch_all(self.pool())
            .await
            .expect("event definitions")
    }
}

pub fn processor_for(pool: &PgPool) -> EventsProcessor {
    EventsProcessor::from_parts(
        pool.clone(),
        Arc::new(PostgresEventWriter::new(pool.clone())),
        10_000,
        Duration::from_secs(30),
    )
}

pub fn iso(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn plugin_event(
    distinct_id: &str,
    ip: Option<&str>,
    data: Value,
    team_id: i64,
    now: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    uuid: Option<String>,
) -> PluginEvent {
    let mut object: Map<String, Value> = data.as_object().cloned().unwrap_or_default();
    object.insert("distinct_id".into(), json!(distinct_id));
    object.insert("ip".into(), json!(ip));
    object.insert("site_url".into(), json!(""));
    object.insert("team_id".into(), json!(team_id));
    object.insert("now".into(), json!(iso(now)));
    if let Some(sent_at) = sent_at {
        object.insert("sent_at".into(), json!(iso(sent_at)));
    }
    if let Some(uuid) = uuid {
        object.insert("uuid".into(), json!(uuid));
    }
    serde_json::from_value(Value::Object(object)).expect("valid PluginEvent")
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: i64,
    pub event: String,
    pub distinct_id: String,
    pub properties: Value,
    pub timestamp: DateTime<Utc>,
    pub elements: Value,
    pub elements_hash: String,
}

pub async fn fetch_events(pool: &PgPool) -> Vec<EventRow> {
    let rows = sqlx::query(
        "SELECT id::int8 AS id, event, distinct_id, properties, timestamp, elements, elements_hash FROM posthog_event \
         ORDER BY timestamp, id",
    )
    .fetch_all(pool)
    .await
    .expect("fetch events");
    rows.iter()
        .map(|row| EventRow {
            id: row.get("id"),
            event: row.get("event"),
            distinct_id: row.get("distinct_id"),
            properties: row.get("properties"),
            timestamp: row.get("timestamp"),
            elements: row.get::<Option<Value>, _>("elements").unwrap_or(Value::Null),
            elements_hash: row.get::<Option<String>, _>("elements_hash").unwrap_or_default(),
        })
        .collect()
}
