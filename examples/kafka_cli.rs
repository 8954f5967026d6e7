//! A minimal Kafka command line for `scripts/demo` (Debian's kcat is built on a librdkafka too old
//! for the loopback broker's API-version handshake; this one uses the server's own rdkafka).
//!
//! Usage (broker from KAFKA_HOSTS, default 127.0.0.1:9092; `last`, `count` and `dump` read
//! partition 0, which is all of the demo's single-partition topics):
//!   kafka_cli end TOPIC       prints the sum of the partitions' end offsets (messages ever written)
//!   kafka_cli produce TOPIC   produces each line of stdin as one message
//!   kafka_cli last TOPIC      prints the latest message's payload (lossy UTF-8)
//!   kafka_cli count TOPIC     reads the whole partition and prints how many messages it holds
//!   kafka_cli dump TOPIC      prints every message as "offset payload"
//! Any `RDKAFKA_<NAME>` variable sets librdkafka's `<name>` (underscores become dots), e.g.
//! `RDKAFKA_BATCH_NUM_MESSAGES=1`.

use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use rdkafka::{Message, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

fn client_config() -> ClientConfig {
    let hosts = std::env::var("KAFKA_HOSTS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", hosts);
    for (key, value) in std::env::vars() {
        if let Some(setting) = key.strip_prefix("RDKAFKA_") {
            config.set(setting.to_lowercase().replace('_', "."), value);
        }
    }
    config
}

fn consumer() -> Result<BaseConsumer> {
    let group = format!("kafka-cli-{}", std::process::id());
    client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a Kafka consumer")
}

/// The topic's partitions (an auto-created topic may have several).
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).with_context(|| format!("metadata of {topic}"))?;
    Ok(metadata.topics().iter().flat_map(|topic| topic.partitions().iter().map(|partition| partition.id())).collect())
}

/// The sum of the partitions' end offsets (the number of messages ever written).
fn end_offset(topic: &str) -> Result<i64> {
    let consumer = consumer()?;
    let mut total = 0;
    for partition in partitions(&consumer, topic)? {
        let (_, high) =
            consumer.fetch_watermarks(topic, partition, TIMEOUT).with_context(|| format!("offsets of {topic}"))?;
        total += high;
    }
    Ok(total)
}

/// Counts failed deliveries, so `produce` can say how many messages did not arrive.
#[derive(Default)]
struct DeliveryCounter {
    failed: AtomicUsize,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("kafka_cli: delivery failed: {error}");
            }
        }
    }
}

fn produce(topic: &str) -> Result<usize> {
    // The server's own producer settings (src/ingestion/queues/kafka_settings.rs).
    let producer: ThreadedProducer<DeliveryCounter> = client_config()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(DeliveryCounter::default())
        .context("creating a Kafka producer")?;
    let mut sent = 0;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        if line.is_empty() {
            continue;
        }
        let mut record = BaseRecord::<(), str>::to(topic).payload(line.as_str());
        // A full local queue only means the broker is behind: wait and try the same record again.
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((error, returned)) => {
                    if !matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)) {
                        bail!("producing to {topic}: {error}");
                    }
                    record = returned;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(60)).context("flushing the producer")?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {sent} messages to {topic} were not delivered");
    }
    Ok(sent)
}

fn partition_end(topic: &str) -> Result<i64> {
    Ok(consumer()?.fetch_watermarks(topic, 0, TIMEOUT).with_context(|| format!("offsets of {topic}"))?.1)
}

fn last_message(topic: &str) -> Result<Option<String>> {
    let end = partition_end(topic)?;
    if end == 0 {
        return Ok(None);
    }
    let consumer = consumer()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(end - 1))?;
    consumer.assign(&assignment)?;
    match consumer.poll(TIMEOUT) {
        Some(message) => Ok(Some(String::from_utf8_lossy(message?.payload().unwrap_or_default()).into_owned())),
        None => Ok(None),
    }
}

fn count_messages(topic: &str) -> Result<u64> {
    let end = partition_end(topic)?;
    let consumer = consumer()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let mut count = 0;
    while let Some(message) = consumer.poll(TIMEOUT) {
        let message = message?;
        count += 1;
        if message.offset() + 1 >= end {
            break;
        }
    }
    Ok(count)
}

fn dump(topic: &str) -> Result<()> {
    let end = partition_end(topic)?;
    let consumer = consumer()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    while let Some(message) = consumer.poll(TIMEOUT) {
        let message = message?;
        println!("{} {}", message.offset(), String::from_utf8_lossy(message.payload().unwrap_or_default()));
        if message.offset() + 1 >= end {
            break;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["end", topic] => println!("{}", end_offset(topic)?),
        ["produce", topic] => eprintln!("kafka_cli: produced {} messages to {topic}", produce(topic)?),
        ["last", topic] => println!("{}", last_message(topic)?.unwrap_or_default()),
        ["count", topic] => println!("{}", count_messages(topic)?),
        ["dump", topic] => dump(topic)?,
        _ => bail!("usage: kafka_cli end|produce|last|count|dump TOPIC"),
    }
    Ok(())
}
