//! Recognising the copies of a redelivered Celery message (a server killed after writing an event
//! but before acknowledging its message delivers it again):
//! * the **message id** ([`message_key`]): the Celery task id, else kombu's delivery tag, else a
//!   hash of the message bytes; the same for every delivery of one message;
//! * the **event uuid** ([`message_event_uuid`]): a UUID v5 of that id, given to an event whose
//!   data carries no `uuid` (the reference gives each delivery a fresh UUIDT), so every copy of a
//!   message has the same uuid (ClickHouse's `ReplacingMergeTree`, or a query, can drop them);
//! * the **write marker** ([`written_marker_key`], set to `written` by [`MarkingWriter`] right
//!   after the event's row is written, deleted when its message is acknowledged, expiring after
//!   `PLUGINS_CELERY_DEDUPE_TTL_SECONDS`): a redelivered message whose marker says `written` is
//!   skipped;
//! * the **redelivered events in flight** ([`Redelivered`], in this process): a redelivered
//!   message whose marker does not say `written` may have died while its row was being written
//!   (the INSERT may have committed without the process learning it), so the writer first looks
//!   for that very row (same team, timestamp, distinct id, event name and properties) and inserts
//!   only if it is not there. A first delivery costs no Redis round trip before its write (an
//!   earlier version marked every event `pending` first; such a marker is read as absent).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use serde_json::Value;
use sha2::Digest;
use uuid::Uuid;

use super::celery::TaskMessage;
use crate::db::persons::{Person, PersonDistinctId};
use crate::event::PluginEvent;
use crate::infra::pipelined_redis::PipelinedRedis;
use crate::sinks::writer::{EventPayload, EventWriter, GroupPayload, SessionRecordingPayload, WriteError};
use sqlx::PgPool;

/// The UUID v5 namespace of event uuids derived from Celery message ids.
const MESSAGE_UUID_NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_6d3e_8a47_4b1e_9c2d_7e61_a0b3_c4d5);
/// Longest message id used as is in a Redis key; longer or odd ones are hashed.
const MAX_PLAIN_ID: usize = 100;

/// The id of a Celery message: task id, else delivery tag, else a hash of the bytes.
pub fn message_key(message: &TaskMessage, raw: &str) -> String {
    let usable = |id: &str| {
        !id.is_empty()
            && id.len() <= MAX_PLAIN_ID
            && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    };
    if let Some(id) = message.id.as_deref().filter(|id| usable(id)) {
        return id.to_string();
    }
    let tag = serde_json::from_str::<Value>(raw)
        .ok()
        .and_then(|envelope| envelope.get("properties")?.get("delivery_tag")?.as_str().map(str::to_string));
    match tag {
        Some(tag) if usable(&tag) => format!("tag:{tag}"),
        _ => {
            let digest = sha2::Sha256::digest(raw.as_bytes());
            format!("sha256:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest))
        }
    }
}

/// The uuid of the event of the message with this id (UUID v5, RFC 9562).
pub fn message_event_uuid(message_key: &str) -> Uuid {
    use sha1::Digest as _;
    let mut hasher = sha1::Sha1::new();
    hasher.update(MESSAGE_UUID_NAMESPACE.as_bytes());
    hasher.update(message_key.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// The marker saying the event with this uuid was written from `queue`.
pub fn written_marker_key(queue: &str, uuid: &str) -> String {
    format!("{queue}:written:{uuid}")
}

/// The marker's value once the event's row is written.
pub const WRITTEN: &str = "written";

/// The uuids of the events of redelivered messages in flight whose write marker does not say
/// `written`: shared by a server's Celery consumer (which adds and removes them) and its
/// [`MarkingWriter`] (which looks for an earlier copy of those events before writing them).
#[derive(Debug, Default)]
pub struct Redelivered {
    events: Mutex<HashSet<Uuid>>,
}

impl Redelivered {
    fn events(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn insert(&self, uuid: Uuid) {
        self.events().insert(uuid);
    }

    pub fn contains(&self, uuid: &Uuid) -> bool {
        self.events().contains(uuid)
    }

    pub fn remove(&self, uuid: &Uuid) {
        self.events().remove(uuid);
    }
}

/// An [`EventWriter`] (Postgres pipeline) that keeps the write marker of each event and writes
/// the events of [`Redelivered`] messages at most once (see the module documentation). When the
/// marker cannot be set, the event is written as usual: it may then be duplicated if its message
/// is redelivered, never lost.
pub struct MarkingWriter {
    inner: Arc<dyn EventWriter>,
    postgres: PgPool,
    redis: PipelinedRedis,
    queue: String,
    ttl: Duration,
    redelivered: Arc<Redelivered>,
}

impl MarkingWriter {
    pub fn new(
        inner: Arc<dyn EventWriter>,
        postgres: PgPool,
        redis: PipelinedRedis,
        queue: &str,
        ttl: Duration,
        redelivered: Arc<Redelivered>,
    ) -> MarkingWriter {
        MarkingWriter { inner, postgres, redis, queue: queue.to_string(), ttl, redelivered }
    }

    fn key(&self, uuid: &Uuid) -> String {
        written_marker_key(&self.queue, &uuid.to_string())
    }

    async fn mark_written(&self, uuid: &Uuid) {
        let set = redis::cmd("SET").arg(self.key(uuid)).arg(WRITTEN).arg("EX").arg(self.ttl.as_secs().max(1)).clone();
        if let Err(reason) = self.redis.run(vec![set]).await {
            tracing::warn!("⚠️ Could not set the write marker of event {uuid}: {reason}");
        }
    }

    /// The id of a stored row identical to `event`, if there is one.
    async fn stored_copy(&self, event: &EventPayload) -> Option<i64> {
        let properties = Value::Object(event.properties.clone());
        let found = crate::db::events::find_stored_copy(
            &self.postgres,
            event.team_id,
            event.timestamp,
            &event.distinct_id,
            &event.event,
            &properties,
        )
        .await;
        match found {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!("⚠️ Could not look for an earlier copy of event {}: {error}", event.uuid);
                None
            }
        }
    }
}

#[async_trait]
impl EventWriter for MarkingWriter {
    fn is_clickhouse_pipeline(&self) -> bool {
        self.inner.is_clickhouse_pipeline()
    }

    async fn write_event(&self, event: &EventPayload) -> Result<Option<i64>, WriteError> {
        // An earlier delivery of this very event may have died while writing it.
        // The awaits besides the inner write are boxed: this future lives as long as the write, and
        // unboxed it was sized for the largest of them (4.4 KB per event in flight).
        if self.redelivered.contains(&event.uuid) {
            if let Some(id) = Box::pin(self.stored_copy(event)).await {
                tracing::info!("♻️ Event {} was already stored (row {id}): not writing it again", event.uuid);
                Box::pin(self.mark_written(&event.uuid)).await;
                return Ok(Some(id));
            }
        }
        let written = self.inner.write_event(event).await?;
        Box::pin(self.mark_written(&event.uuid)).await;
        Ok(written)
    }

    async fn write_session_recording(&self, recording: &SessionRecordingPayload) -> Result<(), WriteError> {
        self.inner.write_session_recording(recording).await?;
        self.mark_written(&recording.uuid).await;
        Ok(())
    }

    async fn register_action_matches(&self, event_id: i64, action_ids: &[i32]) -> Result<(), WriteError> {
        self.inner.register_action_matches(event_id, action_ids).await
    }

    async fn person_created(&self, person: &Person, distinct_ids: &[PersonDistinctId]) -> Result<(), WriteError> {
        self.inner.person_created(person, distinct_ids).await
    }

    async fn person_updated(&self, person: &Person) -> Result<(), WriteError> {
        self.inner.person_updated(person).await
    }

    async fn distinct_id_added(&self, person: &Person, distinct_id: &PersonDistinctId) -> Result<(), WriteError> {
        self.inner.distinct_id_added(person, distinct_id).await
    }

    async fn people_merged(
        &self,
        merged: &Person,
        moved: &[PersonDistinctId],
        deleted: &Person,
    ) -> Result<(), WriteError> {
        self.inner.people_merged(merged, moved, deleted).await
    }

    async fn group_identified(&self, group: &GroupPayload) -> Result<(), WriteError> {
        self.inner.group_identified(group).await
    }

    async fn dead_letter(&self, event: &PluginEvent, error: &str) -> Result<bool, WriteError> {
        self.inner.dead_letter(event, error).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: Option<&str>) -> TaskMessage {
        TaskMessage { task: "t".into(), id: id.map(str::to_string), args: vec![], kwargs: Default::default() }
    }

    #[test]
    fn message_ids_and_uuids_are_stable() {
        assert_eq!(
            message_key(&message(Some("2462d6a2-518e-4dac-8e08-118f93b76af7")), "{}"),
            "2462d6a2-518e-4dac-8e08-118f93b76af7"
        );
        let raw = r#"{"properties": {"delivery_tag": "abc-1"}}"#;
        assert_eq!(message_key(&message(None), raw), "tag:abc-1");
        let hashed = message_key(&message(Some("bad id with spaces")), "not json");
        assert!(hashed.starts_with("sha256:") && hashed == message_key(&message(None), "not json"));
        assert_ne!(hashed, message_key(&message(None), "other bytes"));
        let uuid = message_event_uuid("2462d6a2-518e-4dac-8e08-118f93b76af7");
        assert_eq!(uuid, message_event_uuid("2462d6a2-518e-4dac-8e08-118f93b76af7"));
        assert_eq!(uuid.get_version_num(), 5);
        assert_ne!(uuid, message_event_uuid("2462d6a2-518e-4dac-8e08-118f93b76af8"));
    }
}
