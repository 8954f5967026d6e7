//! Where processed data goes: the [`EventWriter`] trait, with one method per thing the reference
//! writes or emits differently per pipeline, and its Postgres implementation
//! ([`PostgresEventWriter`], `KAFKA_ENABLED=false`).
//!
//! Processing (`process_event`) decides *what* happens and *when*; a writer only stores or
//! encodes. Person and distinct-id rows are written to Postgres by `persons` in both pipelines;
//! the writer is told afterwards so the ClickHouse implementation (in `queues`) can produce its
//! `clickhouse_person` / `clickhouse_person_unique_id` messages. Timestamps are handed over as
//! values; each writer formats them for its sink (`timestamp::format_*`).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lru::LruCache;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};
use thiserror::Error;
use uuid::Uuid;

use crate::event::{PluginEvent, Properties};
use crate::infra::batch::Batcher;
use crate::ingestion::elements::{elements_hash, Element};
use crate::ingestion::persons::{is_unique_violation, Person, PersonDistinctId};

#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A sink other than Postgres failed (Kafka producer, encoder); the text says why.
    #[error("{0}")]
    Sink(String),
}

/// A standard event ready to be written (the reference's `IEvent` before formatting).
#[derive(Debug, Clone, PartialEq)]
pub struct EventPayload {
    pub uuid: Uuid,
    /// Sanitized name (≤ 200 UTF-16 code units).
    pub event: String,
    /// Final properties (with `$ip`, `$set`/`$set_once` augmentation and `$group_N`).
    pub properties: Properties,
    /// Event time (Postgres: ISO; ClickHouse: `YYYY-MM-DD HH:mm:ss.SSS`).
    pub timestamp: DateTime<Utc>,
    pub team_id: i32,
    pub distinct_id: String,
    /// Processing time (ISO in both pipelines).
    pub created_at: DateTime<Utc>,
    /// Elements extracted from `$elements` (ClickHouse: encode as `elements_chain`).
    pub elements: Vec<Element>,
}

/// A `$snapshot` event (session recording).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecordingPayload {
    pub uuid: Uuid,
    pub team_id: i32,
    pub distinct_id: String,
    /// `properties.$session_id` (as a string; absent → `None`).
    pub session_id: Option<String>,
    /// `properties.$snapshot_data` (absent → `None`).
    pub snapshot_data: Option<Value>,
    /// Event time; used for both `timestamp` and `created_at`.
    pub timestamp: DateTime<Utc>,
}

/// A `$groupidentify` (ClickHouse only; nothing goes to Postgres).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPayload {
    pub team_id: i32,
    pub group_type_index: i32,
    pub group_key: String,
    /// `$group_set` or `{}`.
    pub group_properties: Properties,
    /// Now (seconds precision in ClickHouse).
    pub created_at: DateTime<Utc>,
}

/// The per-pipeline writes of event processing. Every method is called at the moment the
/// reference writes or produces the corresponding record.
#[async_trait]
pub trait EventWriter: Send + Sync {
    /// ClickHouse pipeline: `true`. The reference then updates the person (and emits a person
    /// message) after `$set`/`$set_once` even when nothing changed, and dead-letters failures.
    fn is_clickhouse_pipeline(&self) -> bool;

    /// Writes a standard event; returns the Postgres event id when there is one (action matches
    /// are only stored for events with an id).
    async fn write_event(&self, event: &EventPayload) -> Result<Option<i64>, WriteError>;

    /// Writes a session recording event.
    async fn write_session_recording(&self, recording: &SessionRecordingPayload) -> Result<(), WriteError>;

    /// Stores action matches of a written event (`posthog_action_events`); ClickHouse computes
    /// them itself.
    async fn register_action_matches(&self, event_id: i64, action_ids: &[i32]) -> Result<(), WriteError>;

    /// A person and its distinct ids were committed (ClickHouse: person message, then one
    /// distinct-id message per row).
    async fn person_created(&self, _person: &Person, _distinct_ids: &[PersonDistinctId]) -> Result<(), WriteError> {
        Ok(())
    }

    /// A person was updated; `person` holds the values after the update.
    async fn person_updated(&self, _person: &Person) -> Result<(), WriteError> {
        Ok(())
    }

    /// A distinct id was added to an existing person.
    async fn distinct_id_added(&self, _person: &Person, _distinct_id: &PersonDistinctId) -> Result<(), WriteError> {
        Ok(())
    }

    /// A merge committed: `merged` is the surviving person after the update, `moved` the distinct
    /// id rows moved from `deleted` (ClickHouse, in order: person update, one record per moved
    /// row with the add + delete messages, person delete with `is_deleted = 1`).
    async fn people_merged(
        &self,
        _merged: &Person,
        _moved: &[PersonDistinctId],
        _deleted: &Person,
    ) -> Result<(), WriteError> {
        Ok(())
    }

    /// A `$groupidentify` with a known group type index.
    async fn group_identified(&self, _group: &GroupPayload) -> Result<(), WriteError> {
        Ok(())
    }

    /// Dead-letters an event whose ingestion failed; returns whether it was stored anywhere.
    /// `event` is the event as ingestion left it (properties mutated as in the reference);
    /// `error` is the plain message (the record's `error` field is `ingestEvent failed. Error: <error>`).
    /// The Postgres pipeline has no dead-letter queue (the reference only reports to Sentry).
    async fn dead_letter(&self, _event: &PluginEvent, _error: &str) -> Result<bool, WriteError> {
        Ok(false)
    }
}

/// Most events written in one `posthog_event` INSERT.
const MAX_EVENT_BATCH: usize = 500;
/// Element groups remembered as stored (per team and hash) so repeated autocaptures skip the
/// group transaction.
const KNOWN_ELEMENT_GROUPS: usize = 10_000;

/// The Postgres pipeline (`KAFKA_ENABLED=false`).
///
/// Event rows from concurrent tasks are written together: each `write_event` hands its row to a
/// batching task and waits until the batch holding it is committed, so a returned id is as
/// durable as with one INSERT per event, but one commit (one WAL flush) serves many events.
/// A failing batch is retried row by row, so one bad event fails alone.
pub struct PostgresEventWriter {
    pool: PgPool,
    events: Batcher<EventRow, Result<i64, sqlx::Error>>,
    known_element_groups: Mutex<LruCache<(i32, String), ()>>,
}

/// Column values of one `posthog_event` row.
#[derive(Debug, Clone)]
struct EventRow {
    created_at: DateTime<Utc>,
    event: String,
    distinct_id: String,
    properties: Value,
    team_id: i32,
    timestamp: DateTime<Utc>,
    elements: Value,
    elements_hash: String,
}

impl PostgresEventWriter {
    pub fn new(pool: PgPool) -> Self {
        let capacity = NonZeroUsize::new(KNOWN_ELEMENT_GROUPS).unwrap_or(NonZeroUsize::MIN);
        PostgresEventWriter {
            events: Batcher::new(MAX_EVENT_BATCH, {
                let pool = pool.clone();
                move |rows| write_event_batch(pool.clone(), rows)
            }),
            pool,
            known_element_groups: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// `posthog_elementgroup` + `posthog_element` rows for the elements (only when the group is
    /// new for the team); returns the hash. A unique violation means another event stored the
    /// same group concurrently, which is fine.
    pub async fn create_element_group(&self, elements: &[Element], team_id: i32) -> Result<String, sqlx::Error> {
        let hash = elements_hash(elements);
        let key = (team_id, hash.clone());
        if self.known_element_groups.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&key).is_some() {
            return Ok(hash);
        }
        match self.insert_element_group(elements, team_id, &hash).await {
            Err(error) if !is_unique_violation(&error) => return Err(error),
            _ => {}
        }
        self.known_element_groups.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).put(key, ());
        Ok(hash)
    }

    async fn insert_event(&self, row: EventRow) -> Result<i64, sqlx::Error> {
        match self.events.submit(row.clone()).await {
            Some(result) => result,
            None => insert_event_row(&self.pool, &row).await,
        }
    }

    async fn insert_element_group(&self, elements: &[Element], team_id: i32, hash: &str) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let group_id: Option<i32> = sqlx::query_scalar(
            "INSERT INTO posthog_elementgroup (hash, team_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(hash)
        .bind(team_id)
        .fetch_optional(&mut *transaction)
        .await?;
        if let Some(group_id) = group_id {
            let mut insert: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO posthog_element (text, tag_name, href, attr_id, nth_child, nth_of_type, attributes, \
                 \"order\", event_id, attr_class, group_id) ",
            );
            insert.push_values(elements.iter().enumerate(), |mut row, (order, element)| {
                row.push_bind(element.text.clone())
                    .push_bind(element.tag_name.clone())
                    .push_bind(element.href.clone())
                    .push_bind(element.attr_id.clone())
                    .push_bind(element.nth_child.and_then(|value| i32::try_from(value).ok()))
                    .push_bind(element.nth_of_type.and_then(|value| i32::try_from(value).ok()))
                    .push_bind(Value::Object(element.attributes.clone().unwrap_or_default()))
                    .push_bind(order as i32)
                    .push_bind(element.event_id.and_then(|value| i32::try_from(value).ok()))
                    .push_bind(element.attr_class.clone())
                    .push_bind(group_id);
            });
            insert.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await
    }
}

#[async_trait]
impl EventWriter for PostgresEventWriter {
    fn is_clickhouse_pipeline(&self) -> bool {
        false
    }

    async fn write_event(&self, event: &EventPayload) -> Result<Option<i64>, WriteError> {
        let elements_hash = if event.elements.is_empty() {
            String::new()
        } else {
            self.create_element_group(&event.elements, event.team_id).await?
        };
        let row = EventRow {
            created_at: event.created_at,
            event: event.event.clone(),
            distinct_id: event.distinct_id.clone(),
            properties: Value::Object(event.properties.clone()),
            team_id: event.team_id,
            timestamp: event.timestamp,
            elements: serde_json::to_value(&event.elements).unwrap_or(Value::Array(Vec::new())),
            elements_hash,
        };
        Ok(Some(self.insert_event(row).await?))
    }

    async fn write_session_recording(&self, recording: &SessionRecordingPayload) -> Result<(), WriteError> {
        sqlx::query(
            "INSERT INTO posthog_sessionrecordingevent (created_at, team_id, distinct_id, session_id, timestamp, \
             snapshot_data) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(recording.timestamp)
        .bind(recording.team_id)
        .bind(&recording.distinct_id)
        .bind(&recording.session_id)
        .bind(recording.timestamp)
        .bind(&recording.snapshot_data)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn register_action_matches(&self, event_id: i64, action_ids: &[i32]) -> Result<(), WriteError> {
        if action_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO posthog_action_events (event_id, action_id) \
             SELECT $1, action_id FROM UNNEST($2::int4[]) WITH ORDINALITY AS matched(action_id, position) ORDER BY position",
        )
        .bind(event_id)
        .bind(action_ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Writes a batch of event rows in one statement; when that fails (one bad row fails it all),
/// writes them one by one so only the bad ones fail.
async fn write_event_batch(pool: PgPool, rows: Vec<EventRow>) -> Vec<Result<i64, sqlx::Error>> {
    if rows.len() > 1 {
        let references: Vec<&EventRow> = rows.iter().collect();
        if let Ok(ids) = insert_event_rows(&pool, &references).await {
            if ids.len() == rows.len() {
                return ids.into_iter().map(Ok).collect();
            }
        }
    }
    let mut results = Vec::with_capacity(rows.len());
    for row in &rows {
        results.push(insert_event_row(&pool, row).await);
    }
    results
}

async fn insert_event_row(pool: &PgPool, row: &EventRow) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO posthog_event (created_at, event, distinct_id, properties, team_id, timestamp, elements, \
         elements_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id::int8",
    )
    .bind(row.created_at)
    .bind(&row.event)
    .bind(&row.distinct_id)
    .bind(&row.properties)
    .bind(row.team_id)
    .bind(row.timestamp)
    .bind(&row.elements)
    .bind(&row.elements_hash)
    .fetch_one(pool)
    .await
}

/// Inserts the rows in one statement; returns their ids in input order (ids are drawn from the
/// table's sequence first, so the mapping does not depend on RETURNING order).
async fn insert_event_rows(pool: &PgPool, rows: &[&EventRow]) -> Result<Vec<i64>, sqlx::Error> {
    let created_at: Vec<DateTime<Utc>> = rows.iter().map(|row| row.created_at).collect();
    let event: Vec<&str> = rows.iter().map(|row| row.event.as_str()).collect();
    let distinct_id: Vec<&str> = rows.iter().map(|row| row.distinct_id.as_str()).collect();
    let properties: Vec<&Value> = rows.iter().map(|row| &row.properties).collect();
    let team_id: Vec<i32> = rows.iter().map(|row| row.team_id).collect();
    let timestamp: Vec<DateTime<Utc>> = rows.iter().map(|row| row.timestamp).collect();
    let elements: Vec<&Value> = rows.iter().map(|row| &row.elements).collect();
    let elements_hash: Vec<&str> = rows.iter().map(|row| row.elements_hash.as_str()).collect();
    let ids: Vec<(i64, i64)> = sqlx::query_as(
        "WITH input AS ( \
            SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::jsonb[], $5::int4[], $6::timestamptz[], \
                $7::jsonb[], $8::text[]) WITH ORDINALITY \
                AS row(created_at, event, distinct_id, properties, team_id, timestamp, elements, elements_hash, position) \
         ), numbered AS MATERIALIZED ( \
            SELECT position, nextval(pg_get_serial_sequence('posthog_event', 'id')) AS id FROM input ORDER BY position \
         ), inserted AS ( \
            INSERT INTO posthog_event (id, created_at, event, distinct_id, properties, team_id, timestamp, elements, \
                elements_hash) \
            SELECT numbered.id, input.created_at, input.event, input.distinct_id, input.properties, input.team_id, \
                input.timestamp, input.elements, input.elements_hash \
            FROM input JOIN numbered USING (position) ORDER BY position \
            RETURNING id \
         ) \
         SELECT position::int8, id::int8 FROM numbered ORDER BY position",
    )
    .bind(&created_at)
    .bind(&event)
    .bind(&distinct_id)
    .bind(&properties)
    .bind(&team_id)
    .bind(&timestamp)
    .bind(&elements)
    .bind(&elements_hash)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(|(_, id)| id).collect())
}
