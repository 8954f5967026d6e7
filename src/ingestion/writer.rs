//! Where processed data goes: the [`EventWriter`] trait, with one method per thing the reference
//! writes or emits differently per pipeline, and its Postgres implementation
//! ([`PostgresEventWriter`], `KAFKA_ENABLED=false`).
//!
//! Processing (`process_event`) decides *what* happens and *when*; a writer only stores or
//! encodes. Person and distinct-id rows are written to Postgres by `persons` in both pipelines;
//! the writer is told afterwards so the ClickHouse implementation (in `queues`) can produce its
//! `clickhouse_person` / `clickhouse_person_unique_id` messages. Timestamps are handed over as
//! values; each writer formats them for its sink (`timestamp::format_*`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};
use thiserror::Error;
use uuid::Uuid;

use super::elements::{elements_hash, Element};
use super::persons::{is_unique_violation, Person, PersonDistinctId};
use crate::event::{PluginEvent, Properties};

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
    /// The Postgres pipeline has no dead-letter queue (the reference only reports to Sentry).
    async fn dead_letter(&self, _event: &PluginEvent, _error: &str) -> Result<bool, WriteError> {
        Ok(false)
    }
}

/// The Postgres pipeline (`KAFKA_ENABLED=false`).
pub struct PostgresEventWriter {
    pool: PgPool,
}

impl PostgresEventWriter {
    pub fn new(pool: PgPool) -> Self {
        PostgresEventWriter { pool }
    }

    /// `posthog_elementgroup` + `posthog_element` rows for the elements (only when the group is
    /// new for the team); returns the hash. A unique violation means another event stored the
    /// same group concurrently, which is fine.
    pub async fn create_element_group(&self, elements: &[Element], team_id: i32) -> Result<String, sqlx::Error> {
        let hash = elements_hash(elements);
        match self.insert_element_group(elements, team_id, &hash).await {
            Err(error) if is_unique_violation(&error) => Ok(hash),
            Err(error) => Err(error),
            Ok(()) => Ok(hash),
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
        let elements_json = serde_json::to_value(&event.elements).unwrap_or(Value::Array(Vec::new()));
        let event_id: i64 = sqlx::query_scalar(
            "INSERT INTO posthog_event (created_at, event, distinct_id, properties, team_id, timestamp, elements, \
             elements_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id::int8",
        )
        .bind(event.created_at)
        .bind(&event.event)
        .bind(&event.distinct_id)
        .bind(Value::Object(event.properties.clone()))
        .bind(event.team_id)
        .bind(event.timestamp)
        .bind(elements_json)
        .bind(elements_hash)
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(event_id))
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
