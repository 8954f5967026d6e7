//! The Kafka consumer (`KAFKA_ENABLED=true`): a consumer group on `KAFKA_CONSUMPTION_TOPIC` that
//! decodes raw event messages and hands each event to the [`EventHandler`].
//!
//! Delivery is at least once. Messages are taken in sub-batches of up to
//! [`super::consumer_concurrency`] (the reference's `WORKER_CONCURRENCY × TASKS_PER_WORKER`, times
//! [`super::EVENTS_IN_FLIGHT_PER_TASK`]), handled concurrently; only when every event of the
//! sub-batch is done *and* the producer has delivered everything queued so far (so the events'
//! own writes are in Kafka) are the sub-batch's offsets stored, to be committed by the auto-commit
//! (every 1000 ms, as the reference) and at shutdown. A crash loses no event: what was not stored
//! is consumed again.
//!
//! Differences from the reference: a message that is not a valid event goes to
//! `events_dead_letter_queue` and consumption goes on (the reference's poison pill); the batch size
//! is never zero; a failed Kafka delivery stops the consumer without committing (the server then
//! exits and the events are re-consumed) instead of being lost.
//!
//! Settings as the reference's kafkajs consumer: group `clickhouse-ingestion`, read committed,
//! new groups start at the latest offset, session timeout 30 s, heartbeat 3 s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::kafka_producer::KafkaProducerWrapper;
use super::kafka_settings::{self, KafkaSetupError};
use super::messages::{
    dead_letter_record, decode_raw_event, malformed_message_dead_letter_record, INGEST_EVENT_ERROR_LOCATION,
};
use super::retry::{Outcome, RetryPolicy};
use super::{EventHandler, QueueStats};
use crate::config::Config;

/// The reference's consumer group.
pub const CONSUMER_GROUP: &str = "clickhouse-ingestion";

/// How a [`KafkaQueue`] runs.
#[derive(Debug, Clone)]
pub struct KafkaConsumerOptions {
    /// `KAFKA_CONSUMPTION_TOPIC`.
    pub topic: String,
    pub group_id: String,
    /// Events handled at once (sub-batch size).
    pub concurrency: usize,
    /// Where a group without committed offsets starts: `latest` (the reference) or `earliest`.
    pub offset_reset: String,
    pub session_timeout: Duration,
    /// How long `start` waits for the first partition assignment.
    pub join_timeout: Duration,
    pub retry: RetryPolicy,
    pub client_id: String,
}

impl KafkaConsumerOptions {
    pub fn from_config(config: &Config, instance_id: &uuid::Uuid) -> KafkaConsumerOptions {
        KafkaConsumerOptions {
            topic: config
                .KAFKA_CONSUMPTION_TOPIC
                .clone()
                .unwrap_or_else(|| super::topics::KAFKA_EVENTS_PLUGIN_INGESTION.to_string()),
            group_id: CONSUMER_GROUP.to_string(),
            concurrency: super::consumer_concurrency(config),
            offset_reset: "latest".into(),
            session_timeout: Duration::from_secs(30),
            join_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            client_id: kafka_settings::client_id(instance_id),
        }
    }
}

/// Re-applies a pause to partitions assigned while paused, and announces joining the group.
struct QueueContext {
    paused: Arc<AtomicBool>,
    joined: watch::Sender<bool>,
    group_id: String,
}

impl ClientContext for QueueContext {}

impl ConsumerContext for QueueContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                if !*self.joined.borrow() {
                    info!("✅ Kafka consumer joined group {}!", self.group_id);
                }
                if self.paused.load(Ordering::SeqCst) && partitions.count() > 0 {
                    if let Err(error) = consumer.pause(partitions) {
                        warn!("⚠️ Could not pause newly assigned partitions: {error}");
                    }
                }
                self.joined.send_replace(true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => warn!("⚠️ Kafka consumer rebalance error: {error}"),
        }
    }
}

type QueueConsumer = StreamConsumer<QueueContext>;

struct Shared {
    consumer: QueueConsumer,
    options: KafkaConsumerOptions,
    handler: Arc<dyn EventHandler>,
    producer: Arc<KafkaProducerWrapper>,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
    stats: Arc<QueueStats>,
}

/// A running Kafka ingestion consumer.
pub struct KafkaQueue {
    shared: Arc<Shared>,
    finished: watch::Receiver<Option<Result<(), String>>>,
}

enum MessageOutcome {
    Done,
    Interrupted,
}

impl KafkaQueue {
    /// Subscribes and returns once the consumer has joined its group (its first assignment), as the
    /// reference's `start()` does. Events go to `handler`; dead letters and every write the handler
    /// queues go through `producer`, which is flushed before offsets are stored.
    pub async fn start(
        config: &Config,
        options: KafkaConsumerOptions,
        handler: Arc<dyn EventHandler>,
        producer: Arc<KafkaProducerWrapper>,
    ) -> Result<KafkaQueue, KafkaSetupError> {
        let mut client = kafka_settings::base_config(config, &options.client_id)?;
        client
            .set("group.id", &options.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", &options.offset_reset)
            .set("session.timeout.ms", options.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (options.session_timeout.as_millis() / 10).clamp(100, 3000).to_string())
            .set("max.partition.fetch.bytes", "1048576");
        let paused = Arc::new(AtomicBool::new(false));
        let (joined_sender, mut joined) = watch::channel(false);
        let context =
            QueueContext { paused: Arc::clone(&paused), joined: joined_sender, group_id: options.group_id.clone() };
        info!("⏬ Connecting Kafka consumer to {}...", config.KAFKA_HOSTS.as_deref().unwrap_or_default());
        let consumer: QueueConsumer =
            client.create_with_context(context).map_err(|error| KafkaSetupError::Client(error.to_string()))?;
        consumer.subscribe(&[options.topic.as_str()]).map_err(|error| KafkaSetupError::Client(error.to_string()))?;
        let join_timeout = options.join_timeout;
        let shared = Arc::new(Shared {
            consumer,
            options,
            handler,
            producer,
            paused,
            stop: CancellationToken::new(),
            stats: Arc::new(QueueStats::default()),
        });
        let (finished_sender, finished) = watch::channel(None);
        let looping = Arc::clone(&shared);
        tokio::spawn(async move {
            let result = looping.consume_loop().await;
            if let Err(reason) = &result {
                error!("💥 Kafka consumer stopped: {reason}");
            }
            finished_sender.send_replace(Some(result));
        });
        let queue = KafkaQueue { shared, finished };
        let joined_in_time =
            tokio::time::timeout(join_timeout, joined.wait_for(|joined| *joined)).await.is_ok_and(|r| r.is_ok());
        match joined_in_time {
            true => Ok(queue),
            false => {
                queue.stop().await;
                Err(KafkaSetupError::JoinTimeout(join_timeout))
            }
        }
    }

    pub fn stats(&self) -> Arc<QueueStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Stops fetching from the consumption topic (events already fetched are still handled).
    pub fn pause(&self) {
        if !self.shared.paused.swap(true, Ordering::SeqCst) {
            info!("⏳ Pausing Kafka consumer...");
            self.shared.set_paused(true);
            info!("⏸ Kafka consumer paused!");
        }
    }

    pub fn resume(&self) {
        if self.shared.paused.swap(false, Ordering::SeqCst) {
            info!("⏳ Resuming Kafka consumer...");
            self.shared.set_paused(false);
            info!("▶️ Kafka consumer resumed!");
        }
    }

    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Resolves when the consumer stopped: `Ok` after [`Self::stop`], `Err` when it had to stop on
    /// its own (the server should then shut down; nothing unhandled was committed).
    pub async fn finished(&self) -> Result<(), String> {
        let mut finished = self.finished.clone();
        let result = match finished.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Ok(())),
            Err(_) => Err("Kafka consumer task ended".into()),
        };
        result
    }

    /// For a server component: consumes until `shutdown` is cancelled (then stops gracefully and
    /// returns `Ok`) or the consumer fails on its own (`Err`: the server should shut down; nothing
    /// unhandled was committed, so a restart re-consumes it).
    pub async fn run_until(&self, shutdown: CancellationToken) -> Result<(), String> {
        tokio::select! {
            _ = shutdown.cancelled() => {
                self.stop().await;
                Ok(())
            }
            result = self.finished() => result,
        }
    }

    /// Finishes the sub-batch in hand (waiting retries are abandoned, their batch not committed),
    /// commits what was handled, and leaves the group.
    pub async fn stop(&self) {
        info!("⏳ Stopping Kafka queue...");
        self.shared.stop.cancel();
        let _ = self.finished().await;
        match self.shared.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => warn!("⚠️ Committing Kafka offsets at shutdown failed: {error}"),
        }
        self.shared.consumer.unsubscribe();
        info!("⏹ Kafka consumer stopped!");
    }
}

impl Shared {
    fn set_paused(&self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else { return };
        let mut partitions = TopicPartitionList::new();
        for element in assignment.elements_for_topic(&self.options.topic) {
            partitions.add_partition(element.topic(), element.partition());
        }
        let result = if paused { self.consumer.pause(&partitions) } else { self.consumer.resume(&partitions) };
        if let Err(error) = result {
            warn!("⚠️ Could not {} Kafka consumer: {error}", if paused { "pause" } else { "resume" });
        }
    }

    async fn consume_loop(self: &Arc<Self>) -> Result<(), String> {
        let batch_size = self.options.concurrency.max(1);
        loop {
            let first = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                message = self.consumer.recv() => message,
            };
            let mut batch = match first {
                Ok(message) => vec![message.detach()],
                Err(error) => {
                    warn!("⚠️ Kafka consumer error: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            while batch.len() < batch_size {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(message)) => batch.push(message.detach()),
                    Some(Err(error)) => {
                        warn!("⚠️ Kafka consumer error: {error}");
                        break;
                    }
                    None => break,
                }
            }
            if !self.process_batch(batch).await? {
                return Ok(());
            }
        }
    }

    /// Handles a sub-batch; stores its offsets once everything is handled and delivered. `false`
    /// when shutdown interrupted it (nothing stored).
    async fn process_batch(self: &Arc<Self>, batch: Vec<OwnedMessage>) -> Result<bool, String> {
        let started = Instant::now();
        let outcomes = futures::future::join_all(batch.iter().map(|message| self.process_message(message))).await;
        if outcomes.iter().any(|outcome| matches!(outcome, MessageOutcome::Interrupted)) {
            info!("🚪 Bailing out of a batch of {} events", batch.len());
            return Ok(false);
        }
        self.producer.flush().await.map_err(|error| format!("Kafka production failed, not committing: {error}"))?;
        let mut last: HashMap<(&str, i32), i64> = HashMap::new();
        for message in &batch {
            let entry = last.entry((message.topic(), message.partition())).or_insert(message.offset());
            *entry = (*entry).max(message.offset());
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in last {
            if let Err(error) = offsets.add_partition_offset(topic, partition, Offset::Offset(offset + 1)) {
                warn!("⚠️ Bad offset {offset} for {topic}/{partition}: {error}");
            }
        }
        if let Err(error) = self.consumer.store_offsets(&offsets) {
            // Typically the partition was revoked meanwhile: its new owner consumes these again.
            warn!("⚠️ Could not store Kafka offsets: {error}");
        }
        // Debug, not info as in the reference: it logs once per kafkajs fetch, this runs per
        // sub-batch (hundreds of times a second under load).
        debug!("🧩 Kafka batch of {} events completed in {}ms", batch.len(), started.elapsed().as_millis());
        Ok(true)
    }

    async fn process_message(self: &Arc<Self>, message: &OwnedMessage) -> MessageOutcome {
        QueueStats::bump(&self.stats.received);
        let event = match decode_raw_event(message.payload()) {
            Ok(event) => event,
            Err(reason) => {
                warn!(
                    "⚠️ Dead-lettering Kafka message {}/{}@{}: {reason}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                );
                let record = malformed_message_dead_letter_record(
                    message.payload().unwrap_or_default(),
                    &reason.to_string(),
                    &Utc::now(),
                );
                return self.dead_letter(record).await;
            }
        };
        let what = format!("event {:?} of team {}", event.event, event.team_id);
        let outcome = self
            .options
            .retry
            .run(&what, &self.stop, &self.stats, || {
                let (handler, event) = (Arc::clone(&self.handler), event.clone());
                async move { handler.handle_event(event).await }
            })
            .await;
        match outcome {
            Outcome::Handled => {
                QueueStats::bump(&self.stats.handled);
                MessageOutcome::Done
            }
            Outcome::Failed(reason) => {
                warn!("⚠️ Dead-lettering {what}: {reason}");
                self.dead_letter(dead_letter_record(&event, &reason, INGEST_EVENT_ERROR_LOCATION, &Utc::now())).await
            }
            Outcome::Interrupted => MessageOutcome::Interrupted,
        }
    }

    async fn dead_letter(&self, record: super::KafkaRecord) -> MessageOutcome {
        // A failed send is remembered by the producer and fails the batch's flush: not committed.
        if self.producer.queue_message(record).await.is_ok() {
            QueueStats::bump(&self.stats.dead_lettered);
        }
        MessageOutcome::Done
    }
}
