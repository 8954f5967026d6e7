//! Where events come from: the Celery consumer over Redis and the Kafka consumer, the decoding of
//! what they receive (`celery`, `decode`), redelivery and poison detection (`celery_dedupe`,
//! `kafka_deliveries`), retries, and the dead-lettering of what cannot be handled on the way in.
//! Where events go (the writers, the Kafka producer and the message formats) is `sinks`'.
//!
//! What happens to an event once it has been received is not decided here: the consumers hand every
//! event and plugin job to an [`EventHandler`] (the pipeline that runs plugins and ingests), and
//! act on its answer:
//! * `Ok` → the message is done (Celery: removed from Redis; Kafka: its offset may be committed,
//!   after the producer has delivered everything queued so far);
//! * [`HandleError::Retryable`] → retried with back-off ([`retry::RetryPolicy`]); when the attempts
//!   run out it is treated as rejected;
//! * [`HandleError::Rejected`] (or a message that cannot be decoded) → logged with its reason and
//!   set aside in the dead-letter queue (Celery: a Redis list; Kafka: `events_dead_letter_queue`),
//!   never retried forever, never stopping the consumer.
//!
//! Every outcome is counted in [`QueueStats`] so tests and metrics can assert that nothing is lost.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use thiserror::Error;

use crate::event::PluginEvent;
use crate::infra::BoxError;

pub mod celery;
pub mod celery_consumer;
pub mod celery_dedupe;
pub mod decode;
pub mod kafka_consumer;
pub mod kafka_deliveries;
pub mod retry;
pub mod window;

pub use celery::{CeleryTask, DecodeError};
pub use celery_consumer::{CeleryConsumer, CeleryConsumerOptions};
pub use kafka_consumer::{KafkaConsumerOptions, KafkaQueue};

/// Why the handler could not handle an event or a job.
#[derive(Debug, Error)]
pub enum HandleError {
    /// It can never be handled (for example ingestion failed on this event's data). The consumer
    /// dead-letters it with this reason and goes on (Kafka: the reference's
    /// `events_dead_letter_queue` row with `error_location = plugin_server_ingest_event`; Celery:
    /// the queue's dead-letter list). When the pipeline already dead-lettered the event itself
    /// (`EventWriter::dead_letter` returned `true`), it should return `Ok` instead, or the event
    /// would be dead-lettered twice.
    #[error("{0}")]
    Rejected(#[source] BoxError),
    /// It could not be handled now (Postgres or a broker unavailable): the consumer retries it with
    /// back-off and keeps the message meanwhile.
    #[error("{0}")]
    Retryable(#[source] BoxError),
}

/// Where the consumers deliver what they receive. Implemented by the ingestion pipeline; the
/// consumers call it concurrently (up to their window's `in_flight` at once, see [`window`]).
#[async_trait]
pub trait EventHandler: Send + Sync {
    /// An event from Celery (`process_event_with_plugins`) or Kafka, already merged the reference's
    /// way (envelope fields overlaid by `data`, `distinct_id` a string). Runs the whole pipeline
    /// (processEvent, ingestion, onEvent/onSnapshot) and returns when it is done.
    async fn handle_event(&self, event: PluginEvent) -> Result<(), HandleError>;

    /// A plugin job triggered from PostHog (`posthog.tasks.plugins.plugin_job`), in the reference's
    /// shape: `{type, payload: {..., $operation}, pluginConfigId, pluginConfigTeam, timestamp}`.
    /// The reference hands it to the job queue (`enqueueJob`).
    async fn handle_plugin_job(&self, job: serde_json::Value) -> Result<(), HandleError>;
}

/// Counters of what a consumer did. Lost messages would show as `received` exceeding the sum of
/// the outcomes once the consumer is idle.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Messages taken from the queue (a redelivery counts again).
    pub received: AtomicU64,
    /// Events and jobs the handler finished successfully.
    pub handled: AtomicU64,
    /// Messages set aside in the dead-letter queue (undecodable, rejected, or out of retries).
    pub dead_lettered: AtomicU64,
    /// Handler attempts that failed with a retryable error and were tried again.
    pub retries: AtomicU64,
    /// Messages put back on the queue at shutdown before they were handled.
    pub requeued: AtomicU64,
    /// Events held back because their team had its share of the window in flight
    /// ([`window`]).
    pub held_back: AtomicU64,
    /// Times the consumer stopped taking messages because the held-back events filled their bound.
    pub intake_stalled: AtomicU64,
}

/// A point-in-time copy of [`QueueStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    pub received: u64,
    pub handled: u64,
    pub dead_lettered: u64,
    pub retries: u64,
    pub requeued: u64,
    pub held_back: u64,
    pub intake_stalled: u64,
}

impl QueueStats {
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        QueueStatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            held_back: self.held_back.load(Ordering::Relaxed),
            intake_stalled: self.intake_stalled.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Events kept in flight per plugin task slot. In the reference a task is a whole event's
/// handling on a worker thread, so `WORKER_CONCURRENCY × TASKS_PER_WORKER` events run at once. Here
/// a task slot is only held while the event's plugin code runs (the pool bounds that to
/// `WORKER_CONCURRENCY × TASKS_PER_WORKER` calls); most of an event's time is spent waiting on
/// Postgres, Redis or Kafka, holding no slot. Feeding each slot a few events keeps the JS threads
/// and the database busy at once (measured on 2 cores with `cargo bench --bench e2e_server`: 2,344
/// events/s end to end at 20 in flight, over 4,000 at 100; 400 gives the Kafka path room to
/// overlap its deliveries) while memory stays bounded by this small, fixed number.
pub const EVENTS_IN_FLIGHT_PER_TASK: usize = 20;

/// How many events of one team the consumers handle at once: `WORKER_CONCURRENCY ×
/// TASKS_PER_WORKER ×` [`EVENTS_IN_FLIGHT_PER_TASK`], never zero (the reference loops forever on
/// `WORKER_CONCURRENCY=0`; here 0 means one per core). All teams together: twice that, see
/// [`consumer_window`].
pub fn consumer_concurrency(config: &crate::config::Config) -> usize {
    (config.worker_threads() * config.tasks_per_worker() * EVENTS_IN_FLIGHT_PER_TASK).max(1)
}

/// The consumers' window: a team's share is [`consumer_concurrency`] (what all teams shared
/// before the fair share), see [`window::WindowLimits::from_team_share`].
pub fn consumer_window(config: &crate::config::Config) -> window::WindowLimits {
    window::WindowLimits::from_team_share(consumer_concurrency(config))
}
