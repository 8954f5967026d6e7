//! The batching Kafka producer: port of the reference's tests/shared/kafka-producer-wrapper.test.ts
//! (flush rules, with a recording sender and virtual time), plus sending to a real broker.

mod queues_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::ingestion::queues::kafka_producer::{BatchSender, FlushSettings};
use plugin_server::ingestion::queues::{KafkaMessage, KafkaProducerWrapper, KafkaRecord, ProduceError};
use queues_support::*;

#[derive(Default)]
struct RecordingSender {
    batches: Mutex<Vec<Vec<KafkaRecord>>>,
    fail: Mutex<bool>,
}

struct SharedSender(Arc<RecordingSender>);

#[async_trait]
impl BatchSender for SharedSender {
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        self.0.batches.lock().unwrap().push(records);
        if *self.0.fail.lock().unwrap() {
            return Err(ProduceError::Send("broker down".into()));
        }
        Ok(())
    }
}

fn record(bytes: usize) -> KafkaRecord {
    KafkaRecord { topic: "a".into(), messages: vec![KafkaMessage { key: None, value: Some(vec![b'x'; bytes]) }] }
}

/// The reference test's settings (4 records, 500 bytes), with real time scaled down: the flush
/// frequency is 2 s instead of 20 s.
fn wrapper() -> (KafkaProducerWrapper, Arc<RecordingSender>) {
    let sender = Arc::new(RecordingSender::default());
    let settings = FlushSettings { max_queue_size: 4, max_batch_bytes: 500, flush_frequency: Duration::from_secs(2) };
    (KafkaProducerWrapper::new(Box::new(SharedSender(sender.clone())), settings), sender)
}

fn sizes(batch: &[KafkaRecord]) -> Vec<usize> {
    batch.iter().map(KafkaRecord::size).collect()
}

#[tokio::test]
async fn flushes_when_the_queue_is_full() {
    let (producer, sender) = wrapper();
    for _ in 0..3 {
        producer.queue_message(record(10)).await.unwrap();
    }
    assert!(sender.batches.lock().unwrap().is_empty());
    assert_eq!(producer.buffered(), (3, 30));
    producer.queue_message(record(10)).await.unwrap();
    assert_eq!(sender.batches.lock().unwrap().len(), 1);
    assert_eq!(sizes(&sender.batches.lock().unwrap()[0]), [10, 10, 10, 10]);
    assert_eq!(producer.buffered(), (0, 0));
}

#[tokio::test]
async fn flushes_before_the_batch_would_get_too_big() {
    let (producer, sender) = wrapper();
    producer.queue_message(record(450)).await.unwrap();
    producer.queue_message(record(40)).await.unwrap();
    assert!(sender.batches.lock().unwrap().is_empty());
    producer.queue_message(record(40)).await.unwrap();
    // The first two are flushed; the new record starts the next buffer.
    assert_eq!(sizes(&sender.batches.lock().unwrap()[0]), [450, 40]);
    assert_eq!(producer.buffered(), (1, 40));
}

#[tokio::test]
async fn flushes_when_too_much_time_passed() {
    let (producer, sender) = wrapper();
    producer.queue_message(record(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    producer.queue_message(record(10)).await.unwrap();
    assert!(sender.batches.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(1700)).await;
    producer.queue_message(record(10)).await.unwrap();
    assert_eq!(sizes(&sender.batches.lock().unwrap()[0]), [10, 10, 10]);
    assert_eq!(producer.buffered(), (0, 0));
}

#[tokio::test]
async fn flush_sends_everything_and_an_empty_flush_does_nothing() {
    let (producer, sender) = wrapper();
    producer.queue_message(record(10)).await.unwrap();
    producer.flush().await.unwrap();
    assert_eq!(*sender.batches.lock().unwrap(), vec![vec![record(10)]]);
    assert_eq!(producer.buffered(), (0, 0));
    producer.flush().await.unwrap();
    assert_eq!(sender.batches.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_oversized_record_on_an_empty_buffer_is_sent_not_dropped() {
    let (producer, sender) = wrapper();
    producer.queue_message(record(600)).await.unwrap();
    assert_eq!(sizes(&sender.batches.lock().unwrap()[0]), [600]);
    // A null value counts 4 bytes.
    let tombstone =
        KafkaRecord { topic: "a".into(), messages: vec![KafkaMessage { key: Some("k".into()), value: None }] };
    assert_eq!(tombstone.size(), 4);
}

#[tokio::test]
async fn a_failed_background_send_is_reported_by_the_next_flush() {
    let (producer, sender) = wrapper();
    let producer = Arc::new(producer);
    let timer = producer.spawn_flush_timer();
    *sender.fail.lock().unwrap() = true;
    producer.queue_message(record(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(sender.batches.lock().unwrap().len(), 1);
    *sender.fail.lock().unwrap() = false;
    assert!(matches!(producer.flush().await, Err(ProduceError::EarlierSendFailed { count: 1, .. })));
    // Reported once.
    producer.flush().await.unwrap();
    timer.abort();
}

/// A sender whose sends each wait for a permit.
struct HeldSender(Arc<tokio::sync::Semaphore>);

#[async_trait]
impl BatchSender for HeldSender {
    async fn send_batch(&self, _records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        self.0.acquire().await.map_err(|error| ProduceError::Send(error.to_string()))?.forget();
        Ok(())
    }
}

/// `flush` waits for the sends started before it, not for ones started while it waits: under a
/// steady inflow (the Kafka consumer flushes while events keep producing) it still returns.
#[tokio::test]
async fn flush_waits_for_earlier_sends_only() {
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let settings = FlushSettings { max_queue_size: 1, max_batch_bytes: 500, flush_frequency: Duration::from_secs(60) };
    let producer = Arc::new(KafkaProducerWrapper::new(Box::new(HeldSender(permits.clone())), settings));
    let queue = |producer: &Arc<KafkaProducerWrapper>| {
        let producer = Arc::clone(producer);
        tokio::spawn(async move { producer.queue_message(record(10)).await })
    };
    let earlier = queue(&producer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let flushing = {
        let producer = Arc::clone(&producer);
        tokio::spawn(async move { producer.flush().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = queue(&producer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!flushing.is_finished(), "the flush waits for the earlier send");
    // One permit, which the earlier send gets (the semaphore is first come, first served): the
    // later send is still held, and the flush returns without it.
    permits.add_permits(1);
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), flushing).await.unwrap().unwrap(), Ok(()));
    assert!(!later.is_finished());
    permits.add_permits(1);
    earlier.await.unwrap().unwrap();
    later.await.unwrap().unwrap();
}

#[tokio::test]
async fn sends_to_a_real_broker() {
    let topic = unique("producer");
    create_topics(&[&topic], 1).await;
    let config = test_config(&[("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "1000"), ("KAFKA_FLUSH_FREQUENCY_MS", "10000")]);
    let producer = KafkaProducerWrapper::connect(&config, "test-producer").unwrap();
    for index in 0..5 {
        let record = KafkaRecord::single(&topic, Some(format!("key-{index}")), format!("value-{index}").into_bytes());
        producer.queue_message(record).await.unwrap();
    }
    assert_eq!(producer.buffered().0, 5);
    producer.flush().await.unwrap();
    let messages = consume_topic(&topic, 5, Duration::from_secs(30)).await;
    let got: Vec<(String, String)> = messages
        .into_iter()
        .map(|(key, value)| (String::from_utf8(key.unwrap()).unwrap(), String::from_utf8(value.unwrap()).unwrap()))
        .collect();
    let expected: Vec<(String, String)> =
        (0..5).map(|index| (format!("key-{index}"), format!("value-{index}"))).collect();
    assert_eq!(got, expected);
}
