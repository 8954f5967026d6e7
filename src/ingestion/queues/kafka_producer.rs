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
//! This module owns buffering and sending; what the records contain is `messages`.

use std::collections::BTreeSet;
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

use super::kafka_settings::{self, KafkaSetupError};
use crate::config::Config;

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

/// Where flushed batches go: the broker in production, a recorder in the buffering unit tests.
#[async_trait]
pub trait BatchSender: Send + Sync + 'static {
    /// Sends all records and returns once every message is acknowledged (acks = all) or failed.
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError>;
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
    buffer: Mutex<Buffer>,
    sends_done: Notify,
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
    pub async fn queue_message(&self, record: KafkaRecord) -> Result<(), ProduceError> {
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
        let result = self.sender.send_batch(batch).await;
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
        let producer = config.create().map_err(|error| KafkaSetupError::Client(error.to_string()))?;
        Ok(RdKafkaSender { producer })
    }
}

#[async_trait]
impl BatchSender for RdKafkaSender {
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        let mut deliveries = Vec::new();
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
                            deliveries.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                            // librdkafka's local queue is full: wait for deliveries to drain it.
                            future_record = returned;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((failure, _)) => return Err(ProduceError::Send(failure.to_string())),
                    }
                }
            }
        }
        let mut first_failure = None;
        for delivery in deliveries {
            let failure = match delivery.await {
                Ok(Ok(_)) => None,
                Ok(Err((failure, _))) => Some(failure.to_string()),
                Err(_) => Some("producer dropped before delivery".to_string()),
            };
            if let (Some(failure), None) = (failure, &first_failure) {
                warn!("Kafka delivery failed: {failure}");
                first_failure = Some(failure);
            }
        }
        first_failure.map_or(Ok(()), |failure| Err(ProduceError::Send(failure)))
    }
}
