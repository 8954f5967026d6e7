//! The batching Kafka producer: port of the reference's tests/shared/kafka-producer-wrapper.test.ts
//! (flush rules, with a recording sender and virtual time), plus sending to a real broker.

mod queues_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::sinks::kafka_producer::{BatchSender, FlushSettings};
use plugin_server::sinks::{KafkaMessage, KafkaProducerWrapper, KafkaRecord, ProduceError};
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

/// A sender that refuses for good every message whose value starts with `refuse`.
struct RefusingSender(Arc<RecordingSender>);

#[async_trait]
impl BatchSender for RefusingSender {
    async fn send_batch(&self, records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
        self.send_batch_reporting(records).await.map(|_| ())
    }

    async fn send_batch_reporting(
        &self,
        records: Vec<KafkaRecord>,
    ) -> Result<Vec<plugin_server::sinks::kafka_producer::RejectedMessage>, ProduceError> {
        let mut rejected = Vec::new();
        let mut delivered = Vec::new();
        for record in records {
            for message in record.messages {
                if message.value.as_deref().is_some_and(|value| value.starts_with(b"refuse")) {
                    rejected.push(plugin_server::sinks::kafka_producer::RejectedMessage {
                        topic: record.topic.clone(),
                        message,
                        reason: "Broker: Message size too large".into(),
                    });
                } else {
                    delivered.push(KafkaRecord { topic: record.topic.clone(), messages: vec![message] });
                }
            }
        }
        self.0.batches.lock().unwrap().push(delivered);
        Ok(rejected)
    }
}

fn dead_letter_rows(sender: &RecordingSender) -> Vec<serde_json::Value> {
    sender
        .batches
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .filter(|record| record.topic == "events_dead_letter_queue")
        .flat_map(|record| record.messages.iter())
        .map(|message| serde_json::from_slice(message.value.as_deref().unwrap()).unwrap())
        .collect()
}

/// A message over the size limit is never sent (it would fail its whole batch, and the consumer
/// with it): its dead-letter row goes instead, with the reason, and the rest of the record flows.
#[tokio::test]
async fn an_oversized_message_is_dead_lettered_and_the_rest_flows() {
    let sender = Arc::new(RecordingSender::default());
    let settings =
        FlushSettings { max_queue_size: 100, max_batch_bytes: 900_000, flush_frequency: Duration::from_secs(60) };
    let producer =
        KafkaProducerWrapper::new(Box::new(SharedSender(sender.clone())), settings).with_max_message_bytes(1000);
    let big =
        serde_json::json!({"team_id": 2, "distinct_id": "huge person", "uuid": "0178", "properties": "x".repeat(5000)});
    let record = KafkaRecord {
        topic: "clickhouse_person".into(),
        messages: vec![
            KafkaMessage { key: None, value: Some(b"small".to_vec()) },
            KafkaMessage { key: None, value: Some(big.to_string().into_bytes()) },
        ],
    };
    producer.queue_message(record).await.unwrap();
    producer.flush().await.unwrap();
    let batches = sender.batches.lock().unwrap().clone();
    let sent: Vec<&KafkaRecord> = batches.iter().flatten().collect();
    assert_eq!(sent[0].topic, "clickhouse_person");
    assert_eq!(sent[0].messages, vec![KafkaMessage { key: None, value: Some(b"small".to_vec()) }]);
    let rows = dead_letter_rows(&sender);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["error_location"], "plugin_server_kafka_producer");
    assert!(row["error"].as_str().unwrap().contains("is over the 1000-byte limit"), "{row}");
    assert!(row["error"].as_str().unwrap().contains("clickhouse_person"), "{row}");
    assert_eq!(row["team_id"], 2);
    assert_eq!(row["distinct_id"], "huge person");
    assert_eq!(row["event_uuid"], "0178");
    assert!(row["raw_payload"].as_str().unwrap().len() <= 64 * 1024);
    assert_eq!(producer.stats().dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// A message the broker refuses for good does not fail the flush (the consumer would stop on it,
/// and again after every restart): it is dead-lettered, counted, and the other messages count as
/// delivered.
#[tokio::test]
async fn a_message_refused_for_good_is_dead_lettered_not_a_failed_flush() {
    let sender = Arc::new(RecordingSender::default());
    let settings =
        FlushSettings { max_queue_size: 100, max_batch_bytes: 900_000, flush_frequency: Duration::from_secs(60) };
    let producer = KafkaProducerWrapper::new(Box::new(RefusingSender(sender.clone())), settings);
    producer.queue_message(KafkaRecord::single("plugin_log_entries", None, b"fine".to_vec())).await.unwrap();
    producer
        .queue_message(KafkaRecord::single("plugin_log_entries", None, b"refuse {\"team_id\": 7}".to_vec()))
        .await
        .unwrap();
    producer.flush().await.unwrap();
    let rows = dead_letter_rows(&sender);
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["error"].as_str().unwrap().contains("Message size too large"));
    assert_eq!(rows[0]["raw_payload"], "refuse {\"team_id\": 7}");
    assert_eq!(producer.stats().dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Against the broker: a 1.2 MB message is dead-lettered before sending; with the wrapper's limit
/// raised, librdkafka itself refuses it (`message.max.bytes`), per message, and it is dead-lettered
/// too. The small messages beside it are delivered and the flushes succeed.
#[tokio::test]
async fn oversized_messages_to_a_real_broker_go_to_the_dead_letter_queue() {
    use plugin_server::infra::kafka_settings::producer_config;
    use plugin_server::sinks::kafka_producer::RdKafkaSender;
    let topic = unique("producer-big");
    create_topics(&[&topic, "events_dead_letter_queue"], 1).await;
    let dead_letters_start = topic_end("events_dead_letter_queue");
    let config = test_config(&[("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "1000"), ("KAFKA_FLUSH_FREQUENCY_MS", "10000")]);
    let settings = FlushSettings::from_config(&config);
    let checked = KafkaProducerWrapper::new(
        Box::new(RdKafkaSender::new(&producer_config(&config, "big-checked").unwrap()).unwrap()),
        settings,
    );
    let unchecked = KafkaProducerWrapper::new(
        Box::new(RdKafkaSender::new(&producer_config(&config, "big-unchecked").unwrap()).unwrap()),
        settings,
    )
    .with_max_message_bytes(usize::MAX);
    let marker = unique("big");
    for (index, producer) in [&checked, &unchecked].into_iter().enumerate() {
        let huge =
            serde_json::json!({"team_id": 2, "distinct_id": format!("{marker}-{index}"), "big": "x".repeat(1_200_000)});
        producer
            .queue_message(KafkaRecord::single(&topic, None, format!("before-{index}").into_bytes()))
            .await
            .unwrap();
        producer.queue_message(KafkaRecord::single(&topic, None, huge.to_string().into_bytes())).await.unwrap();
        producer.queue_message(KafkaRecord::single(&topic, None, format!("after-{index}").into_bytes())).await.unwrap();
        producer.flush().await.unwrap();
        assert_eq!(producer.stats().dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
    let values: Vec<String> = consume_topic(&topic, 4, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|(_, value)| String::from_utf8(value.unwrap()).unwrap())
        .collect();
    assert_eq!(values, ["before-0", "after-0", "before-1", "after-1"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows: Vec<serde_json::Value> = consume_topic_to_end("events_dead_letter_queue", dead_letters_start)
            .await
            .into_iter()
            .filter_map(|(_, value)| serde_json::from_slice::<serde_json::Value>(&value?).ok())
            .filter(|row| row["distinct_id"].as_str().is_some_and(|id| id.starts_with(&marker)))
            .collect();
        if rows.len() >= 2 || tokio::time::Instant::now() > deadline {
            break rows;
        }
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row["error_location"], "plugin_server_kafka_producer");
        assert_eq!(row["team_id"], 2);
    }
    let errors: Vec<&str> = rows.iter().map(|row| row["error"].as_str().unwrap()).collect();
    assert!(errors.iter().any(|error| error.contains("over the 1000000-byte limit")), "{errors:?}");
    assert!(errors.iter().any(|error| error.contains("too large")), "{errors:?}");
}
