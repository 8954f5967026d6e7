//! The batching Kafka producer (the reference's `KafkaProducerWrapper`): records are buffered and
//! sent together, with the reference's flush rules (10 §3.1):
//! * a record that would take the buffer over `KAFKA_MAX_MESSAGE_BATCH_SIZE` bytes first flushes
//!   the buffer, then starts the new buffer (it is not part of the flushed batch);
//! * otherwise it is appended, and the buffer is flushed when more than `KAFKA_FLUSH_FREQUENCY_MS`
//!   passed since the last flush or it holds `KAFKA_PRODUCER_MAX_QUEUE_SIZE` records;
//! * a timer flushes every `KAFKA_FLUSH_FREQUENCY_MS`.
//!
//! Deliberate differences: a single record larger than the byte limit arriving on an empty buffer
//! is sent on its own (the reference silently drops it); and a failed send is remembered, so
//! [`KafkaProducerWrapper::flush`] (which the Kafka consumer awaits before committing offsets)
//! reports it even when the failure happened in a timer flush — the consumer then does not commit,
//! and the events are consumed again instead of lost (reference issue #511).
//!
//! Messages that can never be delivered do not fail anything (in the reference one such message
//! fails the whole `sendBatch`, and with it the consumer): a message over
//! [`KAFKA_MESSAGE_MAX_BYTES`] (key + value) is never sent, and a message the broker or librdkafka
//! refuses for good ([`is_permanent`]: too large, invalid, unauthorized topic, …) is not retried;
//! each is replaced by a row on `events_dead_letter_queue` (`messages::undeliverable_dead_letter_record`,
//! with the reason) and counted in [`ProducerStats`]. Transient failures are retried by librdkafka
//! (up to `message.timeout.ms`) and then fail the send: never dropped.
//!
//! This module owns buffering and sending; what the records contain is `messages`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use thiserror::Error;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, warn};

use super::messages::undeliverable_dead_letter_record;
use crate::config::Config;
use crate::infra::kafka_settings::{self, KafkaSetupError};

/// One message of a record. A `None` value is a tombstone (counted as 4 bytes, as the reference).
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaMessage {
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
}

/// A record: messages for one topic (the reference's kafkajs `ProducerRecord`).
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaRecord {
    pub topic: String,
    pub messages: Vec<KafkaMessage>,
}

impl KafkaRecord {
    /// A record of one message.
    pub fn single(topic: &str, key: Option<String>, value: Vec<u8>) -> KafkaRecord {
        KafkaRecord { topic: topic.to_string(), messages: vec![KafkaMessage { key, value: Some(value) }] }
    }

    /// Bytes the record counts for against `KAFKA_MAX_MESSAGE_BATCH_SIZE`.
    pub fn size(&self) -> usize {
        self.messages.iter().map(|message| message.value.as_ref().map_or(4, Vec::len)).sum()
    }
}

#[derive(Debug, Clone, Error, PartialEq)]
pub enum ProduceError {
    #[error("Kafka send failed: {0}")]
    Send(String),
    #[error("{count} earlier Kafka send(s) failed, last: {last}")]
    EarlierSendFailed { count: usize, last: String },
}

/// The largest message (key + value bytes) the producer sends: librdkafka's `message.max.bytes`
/// default, set explicitly in `kafka_settings::producer_config` (a Kafka broker's own default limit,
/// 1,048,588 bytes for a whole record batch, leaves room for the batch overhead). The reference has
/// no check: kafkajs sends and the broker refuses.
pub const KAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// A message refused for good (it would be refused again however often it is sent).
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedMessage {
    pub topic: String,
    pub message: KafkaMessage,
    pub reason: String,
}

/// Where flushed batches go: the broker in production, a recorder in the buffering unit tests.
#[async_trait]
pub trait BatchSender: Send + Sync + 'static {
    /// Sends all records and returns once every message is acknowledged (acks = all) or failed.
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError>;

    /// As [`Self::send_batch`], but a message refused for good is returned instead of failing the
    /// batch: `Ok` means every other message was acknowledged. `Err` is a transient failure.
    async fn send_batch_reporting(&self, records: Vec<KafkaRecord>) -> Result<Vec<RejectedMessage>, ProduceError> {
        self.send_batch(records).await.map(|()| Vec::new())
    }
}

/// Errors that sending the same message again cannot cure.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::UnsupportedForMessageFormat
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// What the producer set aside, for tests and metrics.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// Messages replaced by a row on `events_dead_letter_queue` (too large, or refused for good).
    pub dead_lettered: AtomicU64,
    /// Messages refused for good whose dead-letter row was refused too (logged as errors).
    pub lost: AtomicU64,
}

/// The flush thresholds (`KAFKA_*` settings).
#[derive(Debug, Clone, Copy)]
pub struct FlushSettings {
    pub max_queue_size: usize,
    pub max_batch_bytes: usize,
    pub flush_frequency: Duration,
}

impl FlushSettings {
    pub fn from_config(config: &Config) -> FlushSettings {
        FlushSettings {
            max_queue_size: config.KAFKA_PRODUCER_MAX_QUEUE_SIZE,
            max_batch_bytes: config.KAFKA_MAX_MESSAGE_BATCH_SIZE,
            flush_frequency: Duration::from_millis(config.KAFKA_FLUSH_FREQUENCY_MS),
        }
    }
}

struct Buffer {
    records: Vec<KafkaRecord>,
    bytes: usize,
    last_flush: Instant,
    /// Batches taken out of the buffer whose send has not finished, by send number.
    sends_in_flight: BTreeSet<u64>,
    /// The number the next batch taken out of the buffer gets.
    next_send: u64,
    failed_sends: usize,
    last_failure: Option<String>,
}

/// The batching producer. Cheap to share (`Arc`); every method takes `&self`.
pub struct KafkaProducerWrapper {
    sender: Box<dyn BatchSender>,
    settings: FlushSettings,
    max_message_bytes: usize,
    buffer: Mutex<Buffer>,
    sends_done: Notify,
    stats: ProducerStats,
}

impl KafkaProducerWrapper {
    /// Connects a producer to `KAFKA_HOSTS` (with the TLS settings) and starts the flush timer.
    pub fn connect(config: &Config, client_id: &str) -> Result<Arc<KafkaProducerWrapper>, KafkaSetupError> {
        let sender = RdKafkaSender::new(&kafka_settings::producer_config(config, client_id)?)?;
        let wrapper = Arc::new(KafkaProducerWrapper::new(Box::new(sender), FlushSettings::from_config(config)));
        wrapper.spawn_flush_timer();
        Ok(wrapper)
    }

    /// A wrapper over any sender, without the timer (see [`Self::spawn_flush_timer`]).
    pub fn new(sender: Box<dyn BatchSender>, settings: FlushSettings) -> KafkaProducerWrapper {
        KafkaProducerWrapper {
            sender,
            settings,
            max_message_bytes: KAFKA_MESSAGE_MAX_BYTES,
            stats: ProducerStats::default(),
            buffer: Mutex::new(Buffer {
                records: Vec::new(),
                bytes: 0,
                last_flush: Instant::now(),
                sends_in_flight: BTreeSet::new(),
                next_send: 0,
                failed_sends: 0,
                last_failure: None,
            }),
            sends_done: Notify::new(),
        }
    }

    /// Sets the largest message sent (default [`KAFKA_MESSAGE_MAX_BYTES`]); larger ones are
    /// dead-lettered.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> KafkaProducerWrapper {
        self.max_message_bytes = bytes;
        self
    }

    pub fn stats(&self) -> &ProducerStats {
        &self.stats
    }

    /// Flushes every `KAFKA_FLUSH_FREQUENCY_MS` until the wrapper is dropped.
    pub fn spawn_flush_timer(self: &Arc<Self>) -> JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = self.settings.flush_frequency.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.tick().await;
            loop {
                interval.tick().await;
                let Some(wrapper) = weak.upgrade() else { return };
                // The failure is remembered for the next `flush()` caller; nothing else to do here.
                let _ = wrapper.send_pending().await;
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // Nothing panics while holding the lock; recover the data if something ever did.
        self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Buffers a record, flushing by the reference's rules. Errors are those of a flush it caused.
    /// A message over the size limit is not buffered: its dead-letter row is, instead.
    pub async fn queue_message(&self, mut record: KafkaRecord) -> Result<(), ProduceError> {
        let limit = self.max_message_bytes;
        if record.messages.iter().all(|message| message_bytes(message) <= limit) {
            return self.buffer_record(record).await;
        }
        let (fitting, oversized): (Vec<KafkaMessage>, Vec<KafkaMessage>) =
            std::mem::take(&mut record.messages).into_iter().partition(|message| message_bytes(message) <= limit);
        let topic = record.topic.clone();
        record.messages = fitting;
        let mut result = Ok(());
        if !record.messages.is_empty() {
            result = self.buffer_record(record).await;
        }
        for message in oversized {
            let reason = format!(
                "message of {} bytes to {topic} is over the {limit}-byte limit (message.max.bytes)",
                message_bytes(&message)
            );
            let rejected = RejectedMessage { topic: topic.clone(), message, reason };
            if let Some(dead_letter) = self.dead_letter_for(&rejected) {
                let buffered = self.buffer_record(dead_letter).await;
                result = result.and(buffered);
            }
        }
        result
    }

    /// The dead-letter row replacing a rejected message, counted; `None` (counted as lost) when the
    /// row itself would not fit.
    fn dead_letter_for(&self, rejected: &RejectedMessage) -> Option<KafkaRecord> {
        warn!("🪦 Dead-lettering a Kafka message to {}: {}", rejected.topic, rejected.reason);
        let record = undeliverable_dead_letter_record(
            &rejected.topic,
            rejected.message.value.as_deref(),
            &rejected.reason,
            // Room for the other columns, and for JSON escapes, within the size limit.
            self.max_message_bytes / 4,
            &chrono::Utc::now(),
        );
        if record.messages.iter().any(|message| message_bytes(message) > self.max_message_bytes) {
            error!("🔴 The dead-letter row of a message to {} does not fit either; it is lost", rejected.topic);
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            crate::metrics::catalog::dropped(crate::metrics::catalog::Stage::DeadLetters, "lost", 1);
            return None;
        }
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        crate::metrics::catalog::dropped(crate::metrics::catalog::Stage::DeadLetters, "undeliverable", 1);
        Some(record)
    }

    async fn buffer_record(&self, record: KafkaRecord) -> Result<(), ProduceError> {
        let size = record.size();
        let batch = {
            let mut buffer = self.lock();
            if buffer.bytes + size > self.settings.max_batch_bytes && !buffer.records.is_empty() {
                let batch = take_batch(&mut buffer);
                buffer.records.push(record);
                buffer.bytes = size;
                Some(batch)
            } else {
                buffer.records.push(record);
                buffer.bytes += size;
                let overdue = buffer.last_flush.elapsed() > self.settings.flush_frequency;
                let oversized = buffer.bytes > self.settings.max_batch_bytes;
                if overdue || oversized || buffer.records.len() >= self.settings.max_queue_size {
                    Some(take_batch(&mut buffer))
                } else {
                    None
                }
            }
        };
        match batch {
            Some((number, batch)) => self.send(number, batch).await,
            None => Ok(()),
        }
    }

    /// Sends whatever is buffered, waits for every send started before (including ones started by
    /// other callers or the timer; sends started meanwhile are not waited for, so a flush under
    /// continuous load ends), and reports any send failure since the previous `flush`.
    pub async fn flush(&self) -> Result<(), ProduceError> {
        // Every send numbered below `last_send` is waited for: those in flight and the buffer's.
        let (pending, last_send) = {
            let mut buffer = self.lock();
            let pending = (!buffer.records.is_empty()).then(|| take_batch(&mut buffer));
            (pending, buffer.next_send)
        };
        if let Some((number, batch)) = pending {
            let _ = self.send(number, batch).await;
        }
        loop {
            let notified = self.sends_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut buffer = self.lock();
                if buffer.sends_in_flight.first().is_none_or(|&oldest| oldest >= last_send) {
                    if buffer.failed_sends > 0 {
                        let count = std::mem::take(&mut buffer.failed_sends);
                        let last = buffer.last_failure.take().unwrap_or_default();
                        return Err(ProduceError::EarlierSendFailed { count, last });
                    }
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Records currently buffered (not yet sent).
    pub fn buffered(&self) -> (usize, usize) {
        let buffer = self.lock();
        (buffer.records.len(), buffer.bytes)
    }

    async fn send_pending(&self) -> Result<(), ProduceError> {
        let batch = {
            let mut buffer = self.lock();
            if buffer.records.is_empty() {
                return Ok(());
            }
            take_batch(&mut buffer)
        };
        self.send(batch.0, batch.1).await
    }

    async fn send(&self, number: u64, batch: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        use crate::metrics::catalog::{self, Stage};
        let messages: u64 = batch.iter().map(|record| record.messages.len() as u64).sum();
        catalog::received(Stage::Producer, "kafka", messages);
        let sent = catalog::instrument_query(catalog::statsd::KAFKA_SEND, None, async {
            let sent = self.sender.send_batch_reporting(batch).await;
            if sent.is_err() {
                catalog::kafka_send_failed();
            }
            sent
        })
        .await;
        let result = match sent {
            Ok(rejected) if rejected.is_empty() => {
                catalog::handled(Stage::Producer, "kafka", messages);
                Ok(())
            }
            Ok(rejected) => {
                catalog::handled(Stage::Producer, "kafka", messages - rejected.len() as u64);
                catalog::dropped(Stage::Producer, "refused", rejected.len() as u64);
                self.send_dead_letters(&rejected).await
            }
            Err(failure) => {
                catalog::dropped(Stage::Producer, "send_failed", messages);
                Err(failure)
            }
        };
        {
            let mut buffer = self.lock();
            buffer.sends_in_flight.remove(&number);
            if let Err(failure) = &result {
                buffer.failed_sends += 1;
                buffer.last_failure = Some(failure.to_string());
            }
        }
        self.sends_done.notify_waiters();
        if let Err(failure) = &result {
            error!("⚠️ {failure}");
        }
        result
    }
}

impl KafkaProducerWrapper {
    /// Sends the dead-letter rows of messages refused for good, within the same send (a flush that
    /// waits for the send waits for them). A row refused in turn is lost, and logged.
    async fn send_dead_letters(&self, rejected: &[RejectedMessage]) -> Result<(), ProduceError> {
        let rows: Vec<KafkaRecord> = rejected.iter().filter_map(|message| self.dead_letter_for(message)).collect();
        if rows.is_empty() {
            return Ok(());
        }
        for refused in self.sender.send_batch_reporting(rows).await? {
            error!("🔴 A dead-letter row was refused ({}); the message to {} is lost", refused.reason, refused.topic);
            self.stats.dead_lettered.fetch_sub(1, Ordering::Relaxed);
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            crate::metrics::catalog::dropped(crate::metrics::catalog::Stage::DeadLetters, "lost", 1);
        }
        Ok(())
    }
}

/// Bytes a message counts for against the size limit: key and value, as librdkafka counts them.
pub fn message_bytes(message: &KafkaMessage) -> usize {
    message.key.as_ref().map_or(0, String::len) + message.value.as_ref().map_or(0, Vec::len)
}

/// Takes the buffer's records as a batch to send, with its send number (in flight until `send`
/// finishes).
fn take_batch(buffer: &mut Buffer) -> (u64, Vec<KafkaRecord>) {
    buffer.last_flush = Instant::now();
    buffer.bytes = 0;
    let number = buffer.next_send;
    buffer.next_send += 1;
    buffer.sends_in_flight.insert(number);
    (number, std::mem::take(&mut buffer.records))
}

/// Sends batches through librdkafka (acks = all).
pub struct RdKafkaSender {
    producer: FutureProducer,
}

impl RdKafkaSender {
    pub fn new(config: &ClientConfig) -> Result<RdKafkaSender, KafkaSetupError> {
        let producer = config.create()?;
        Ok(RdKafkaSender { producer })
    }
}

#[async_trait]
impl BatchSender for RdKafkaSender {
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        match self.send_batch_reporting(records).await? {
            rejected if rejected.is_empty() => Ok(()),
            rejected => Err(ProduceError::Send(rejected[0].reason.clone())),
        }
    }

    async fn send_batch_reporting(&self, records: Vec<KafkaRecord>) -> Result<Vec<RejectedMessage>, ProduceError> {
        let mut deliveries = Vec::new();
        let mut rejected = Vec::new();
        for record in &records {
            for message in &record.messages {
                let mut future_record = FutureRecord::<str, [u8]>::to(&record.topic);
                if let Some(key) = &message.key {
                    future_record = future_record.key(key.as_str());
                }
                if let Some(value) = &message.value {
                    future_record = future_record.payload(value.as_slice());
                }
                loop {
                    match self.producer.send_result(future_record) {
                        Ok(delivery) => {
                            deliveries.push((record, message, delivery));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                            // librdkafka's local queue is full: wait for deliveries to drain it.
                            future_record = returned;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((failure, _)) if failure.rdkafka_error_code().is_some_and(is_permanent) => {
                            rejected.push(RejectedMessage {
                                topic: record.topic.clone(),
                                message: message.clone(),
                                reason: failure.to_string(),
                            });
                            break;
                        }
                        Err((failure, _)) => return Err(ProduceError::Send(failure.to_string())),
                    }
                }
            }
        }
        let mut first_failure = None;
        for (record, message, delivery) in deliveries {
            let failure = match delivery.await {
                Ok(Ok(_)) => None,
                Ok(Err((failure, _))) if failure.rdkafka_error_code().is_some_and(is_permanent) => {
                    rejected.push(RejectedMessage {
                        topic: record.topic.clone(),
                        message: message.clone(),
                        reason: failure.to_string(),
                    });
                    None
                }
                Ok(Err((failure, _))) => Some(failure.to_string()),
                Err(_) => Some("producer dropped before delivery".to_string()),
            };
            if let (Some(failure), None) = (failure, &first_failure) {
                warn!("Kafka delivery failed: {failure}");
                first_failure = Some(failure);
            }
        }
        first_failure.map_or(Ok(rejected), |failure| Err(ProduceError::Send(failure)))
    }
}
