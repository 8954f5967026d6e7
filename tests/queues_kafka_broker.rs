//! The test broker can be trusted: what it acknowledges is all there, at once. Every count the
//! tests, `scripts/demo` and the benchmarks make relies on this.
//!
//! N messages produced the way the server produces (idempotent, acks=all, batches of many records
//! over several partitions): the acknowledged offsets of each partition are 0..n with no gap, the
//! watermarks (ListOffsets, what `kafka_cli end` and lag monitors read) say n at once, a fresh
//! consumer group reads all N back (each once, at its acknowledged offset), and after it commits
//! its lag is 0. The memory-only Tansu that `scripts/kafka` used to run failed the watermark
//! check: its ListOffsets answered "base offset of the newest batch + 1", so 200 messages
//! produced in one batch showed as 1.

mod queues_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use queues_support::{create_topics, ensure_kafka, kafka_hosts, unique};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset};

const MESSAGES: usize = 2000;
const PARTITIONS: i32 = 3;
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_is_counted_and_read_back_by_a_fresh_group() {
    ensure_kafka();
    let topic = unique("broker-counts");
    create_topics(&[&topic], PARTITIONS).await;

    // The server's producer settings (src/ingestion/queues/kafka_settings.rs): many records a batch.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let keys: Vec<String> = (0..MESSAGES).map(|i| format!("key-{i}")).collect();
    let payloads: Vec<String> = (0..MESSAGES).map(|i| format!("message-{i}")).collect();
    let sends = keys.iter().zip(&payloads).map(|(key, payload)| {
        producer.send(FutureRecord::to(&topic).key(key.as_str()).payload(payload.as_str()), TIMEOUT)
    });
    let mut acknowledged: BTreeMap<i32, BTreeMap<i64, String>> = BTreeMap::new();
    for (result, payload) in futures::future::join_all(sends).await.into_iter().zip(&payloads) {
        let delivery = result.map_err(|(error, _)| error).expect("delivered");
        let previous = acknowledged.entry(delivery.partition).or_default().insert(delivery.offset, payload.clone());
        assert_eq!(previous, None, "offset {} of partition {} acknowledged twice", delivery.offset, delivery.partition);
    }
    assert!(acknowledged.len() > 1, "the keys spread over several partitions: {:?}", acknowledged.keys());
    for (partition, offsets) in &acknowledged {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(
            offsets.keys().copied().collect::<Vec<_>>(),
            expected,
            "partition {partition}: offsets 0..n, no gap"
        );
    }

    // Watermarks, asked right after the acknowledgements.
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", unique("watermarks"))
        .create()
        .expect("watermark reader");
    let mut total = 0;
    for partition in 0..PARTITIONS {
        let (low, high) = watermarks.fetch_watermarks(&topic, partition, TIMEOUT).expect("watermarks");
        let acknowledged_here = acknowledged.get(&partition).map_or(0, BTreeMap::len) as i64;
        assert_eq!((low, high), (0, acknowledged_here), "partition {partition}: watermarks count every message");
        total += high - low;
    }
    assert_eq!(total, MESSAGES as i64);

    // A fresh group, from the earliest offset, reads every message once.
    let group = unique("fresh-group");
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("reader");
    reader.subscribe(&[&topic]).expect("subscribe");
    let mut read: BTreeMap<(i32, i64), String> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while read.len() < MESSAGES {
        match tokio::time::timeout_at(deadline, reader.recv()).await {
            Ok(Ok(message)) => {
                let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
                let previous = read.insert((message.partition(), message.offset()), payload);
                assert_eq!(
                    previous,
                    None,
                    "offset {} of partition {} read twice",
                    message.offset(),
                    message.partition()
                );
            }
            Ok(Err(error)) => panic!("reading {topic}: {error}"),
            Err(_) => panic!("read {} of {MESSAGES} messages in 90 s", read.len()),
        }
    }
    for ((partition, offset), payload) in &read {
        assert_eq!(acknowledged[partition].get(offset), Some(payload), "partition {partition} offset {offset}");
    }
    let distinct: BTreeSet<&String> = read.values().collect();
    assert_eq!(distinct.len(), MESSAGES, "every message, once");

    // Committed, the group's lag is 0: its committed offsets are the high watermarks.
    reader.commit_consumer_state(CommitMode::Sync).expect("commit");
    let committed = reader.committed(TIMEOUT).expect("committed offsets");
    for partition in 0..PARTITIONS {
        let (_, high) = watermarks.fetch_watermarks(&topic, partition, TIMEOUT).expect("watermarks");
        let offset = committed.find_partition(&topic, partition).map(|element| element.offset());
        let expected = if high == 0 { None } else { Some(Offset::Offset(high)) };
        if let Some(expected) = expected {
            assert_eq!(offset, Some(expected), "partition {partition}: committed = high watermark");
        }
    }
}
