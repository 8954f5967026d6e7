//! Where processed data goes: the [`EventWriter`] trait, with one method per thing the reference
//! writes or emits differently per pipeline, and its Postgres implementation
//! ([`PostgresEventWriter`], `KAFKA_ENABLED=false`).
//!
//! Processing (`process_event`) decides *what* happens and *when*; a writer only stores or
//! encodes. Person and distinct-id rows are written to Postgres by `db::persons` in both pipelines;
//! the writer is told afterwards so the ClickHouse implementation (`kafka_writer`) can produce its
//! `clickhouse_person` / `clickhouse_person_unique_id` messages. Timestamps are handed over as
//! values; each writer formats them for its sink (`js::iso`, `timestamp::format_clickhouse*`).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lru::LruCache;
use serde_json::Value;
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use crate::db::events::EventRow;
use crate::db::persons::{Person, PersonDistinctId};
use crate::db::{self, is_unique_violation};
use crate::event::{PluginEvent, Properties};
use crate::infra::batch::{lost_in_batch, Batcher, Unanswered};
use crate::ingestion::elements::{elements_hash, Element};

#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A sink other than Postgres failed (the Kafka producer).
    #[error(transparent)]
    Sink(#[from] crate::sinks::ProduceError),
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
        match self.events.submit(row).await {
            Ok(result) => result,
            // The batching task is gone (shutting down): on its own.
            Err(Unanswered::NotTaken(row)) => {
                crate::metrics::catalog::postgres("createEventInsert", db::events::insert_event_row(&self.pool, &row))
                    .await
            }
            Err(Unanswered::Lost) => Err(lost_in_batch()),
        }
    }

    async fn insert_element_group(&self, elements: &[Element], team_id: i32, hash: &str) -> Result<(), sqlx::Error> {
        // The reference's createElementGroup: one timed transaction.
        crate::metrics::catalog::postgres_transaction(db::events::insert_element_group(
            &self.pool, elements, team_id, hash,
        ))
        .await
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
            // Boxed: only autocapture events take it, and unboxed every event's write was sized for it.
            Box::pin(self.create_element_group(&event.elements, event.team_id)).await?
        };
        let json = |value: Result<Box<serde_json::value::RawValue>, serde_json::Error>| {
            value.map_err(|error| WriteError::Database(sqlx::Error::Encode(Box::new(error))))
        };
        let row = EventRow {
            created_at: event.created_at,
            event: event.event.clone(),
            distinct_id: event.distinct_id.clone(),
            properties: json(serde_json::value::to_raw_value(&event.properties))?,
            team_id: event.team_id,
            timestamp: event.timestamp,
            elements: json(serde_json::value::to_raw_value(&event.elements))?,
            elements_hash,
        };
        Ok(Some(self.insert_event(row).await?))
    }

    async fn write_session_recording(&self, recording: &SessionRecordingPayload) -> Result<(), WriteError> {
        crate::metrics::catalog::postgres(
            "insertSessionRecording",
            db::events::insert_session_recording_event(
                &self.pool,
                recording.team_id,
                &recording.distinct_id,
                recording.session_id.as_deref(),
                recording.timestamp,
                recording.snapshot_data.as_ref(),
            ),
        )
        .await?;
        Ok(())
    }

    async fn register_action_matches(&self, event_id: i64, action_ids: &[i32]) -> Result<(), WriteError> {
        if action_ids.is_empty() {
            return Ok(());
        }
        crate::metrics::catalog::postgres(
            "registerActionMatch",
            db::events::insert_action_matches(&self.pool, event_id, action_ids),
        )
        .await?;
        Ok(())
    }
}

/// Writes a batch of event rows in one statement; when that fails (one bad row fails it all),
/// writes them one by one so only the bad ones fail.
async fn write_event_batch(pool: PgPool, rows: Vec<EventRow>) -> Vec<Result<i64, sqlx::Error>> {
    if rows.len() > 1 {
        let references: Vec<&EventRow> = rows.iter().collect();
        if let Ok(ids) =
            crate::metrics::catalog::postgres("createEventInsert", db::events::insert_event_rows(&pool, &references))
                .await
        {
            if ids.len() == rows.len() {
                return ids.into_iter().map(Ok).collect();
            }
        }
    }
    let mut results = Vec::with_capacity(rows.len());
    for row in &rows {
        results.push(
            crate::metrics::catalog::postgres("createEventInsert", db::events::insert_event_row(&pool, row)).await,
        );
    }
    results
}
