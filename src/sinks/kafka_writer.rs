//! The ClickHouse pipeline's [`EventWriter`] (`KAFKA_ENABLED=true`): every write of event
//! processing becomes the reference's Kafka message(s), queued on the batching producer in the
//! order the reference queues them. Postgres rows (persons, distinct ids) are written by
//! `persons` in both pipelines; this writer only announces them to ClickHouse.
//!
//! Delivery: `queue_message` may return before the broker acknowledged (the buffer flushes by the
//! reference's rules); the Kafka consumer flushes the producer before committing offsets, so a
//! consumed event's writes are in Kafka before its offset is.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;

use super::kafka_producer::{KafkaProducerWrapper, KafkaRecord};
use super::messages::{
    dead_letter_record, event_record, group_record, person_distinct_id_added_record, person_distinct_id_moved_record,
    person_record, session_recording_record, ClickHouseEvent, INGEST_EVENT_ERROR_LOCATION,
};
use crate::event::PluginEvent;
use crate::ingestion::elements::elements_to_chain;
use crate::ingestion::persons::{Person, PersonDistinctId};
use crate::sinks::writer::{EventPayload, EventWriter, GroupPayload, SessionRecordingPayload, WriteError};

/// Writes for ClickHouse through Kafka.
pub struct KafkaEventWriter {
    producer: Arc<KafkaProducerWrapper>,
}

impl KafkaEventWriter {
    pub fn new(producer: Arc<KafkaProducerWrapper>) -> KafkaEventWriter {
        KafkaEventWriter { producer }
    }

    async fn queue(&self, record: KafkaRecord) -> Result<(), WriteError> {
        self.producer.queue_message(record).await.map_err(|error| WriteError::Sink(error.to_string()))
    }

    fn person(person: &Person, is_deleted: bool) -> KafkaRecord {
        person_record(
            &person.uuid.to_string(),
            &person.created_at,
            &person.properties,
            i64::from(person.team_id),
            person.is_identified,
            is_deleted,
        )
    }
}

#[async_trait]
impl EventWriter for KafkaEventWriter {
    fn is_clickhouse_pipeline(&self) -> bool {
        true
    }

    async fn write_event(&self, event: &EventPayload) -> Result<Option<i64>, WriteError> {
        let elements_chain = if event.elements.is_empty() { String::new() } else { elements_to_chain(&event.elements) };
        let row = ClickHouseEvent {
            uuid: event.uuid.to_string(),
            event: event.event.clone(),
            properties: event.properties.clone(),
            timestamp: event.timestamp,
            team_id: i64::from(event.team_id),
            distinct_id: event.distinct_id.clone(),
            created_at: event.created_at,
            elements_chain,
        };
        self.queue(event_record(&row)).await?;
        Ok(None)
    }

    async fn write_session_recording(&self, recording: &SessionRecordingPayload) -> Result<(), WriteError> {
        self.queue(session_recording_record(
            &recording.uuid.to_string(),
            i64::from(recording.team_id),
            &recording.distinct_id,
            recording.session_id.as_deref(),
            recording.snapshot_data.as_ref(),
            &recording.timestamp,
        ))
        .await
    }

    /// ClickHouse computes action matches itself.
    async fn register_action_matches(&self, _event_id: i64, _action_ids: &[i32]) -> Result<(), WriteError> {
        Ok(())
    }

    async fn person_created(&self, person: &Person, distinct_ids: &[PersonDistinctId]) -> Result<(), WriteError> {
        self.queue(Self::person(person, false)).await?;
        for row in distinct_ids {
            self.distinct_id_added(person, row).await?;
        }
        Ok(())
    }

    async fn person_updated(&self, person: &Person) -> Result<(), WriteError> {
        self.queue(Self::person(person, false)).await
    }

    async fn distinct_id_added(&self, person: &Person, distinct_id: &PersonDistinctId) -> Result<(), WriteError> {
        self.queue(person_distinct_id_added_record(
            distinct_id.id,
            &distinct_id.distinct_id,
            &person.uuid.to_string(),
            i64::from(distinct_id.team_id),
        ))
        .await
    }

    async fn people_merged(
        &self,
        merged: &Person,
        moved: &[PersonDistinctId],
        deleted: &Person,
    ) -> Result<(), WriteError> {
        self.queue(Self::person(merged, false)).await?;
        let (source, target) = (deleted.uuid.to_string(), merged.uuid.to_string());
        for row in moved {
            self.queue(person_distinct_id_moved_record(&row.distinct_id, i64::from(row.team_id), &source, &target))
                .await?;
        }
        self.queue(Self::person(deleted, true)).await
    }

    async fn group_identified(&self, group: &GroupPayload) -> Result<(), WriteError> {
        self.queue(group_record(
            i64::from(group.group_type_index),
            &group.group_key,
            i64::from(group.team_id),
            &group.group_properties,
            &group.created_at,
        ))
        .await
    }

    /// The reference's `events_dead_letter_queue` row for an event whose ingestion failed.
    async fn dead_letter(&self, event: &PluginEvent, error: &str) -> Result<bool, WriteError> {
        self.queue(dead_letter_record(event, error, INGEST_EVENT_ERROR_LOCATION, &Utc::now())).await?;
        Ok(true)
    }
}
