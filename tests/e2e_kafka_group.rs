//! Several Kafka-mode servers (the real binary, as an operator runs them) in one consumer group on
//! a topic of several partitions, while events stream in:
//! * a clean rebalance — a third server joins, then one leaves with SIGTERM — loses nothing and
//!   duplicates nothing (a revoke drains, flushes and commits before the partition moves);
//! * a crash — `kill -9` of one server, started again, then a third added — loses nothing; the
//!   duplicates (events the killed server had handled but not committed) are reported and bounded
//!   by what that one server can have had in hand.
//!
//! Every input event is looked for on `clickhouse_events_proto` by its uuid.

mod common;
mod kafka_mode_support;
mod queues_support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server_process::Server;
use common::TestDb;
use kafka_mode_support::raw_event;
use queues_support::{consume_topic_to_end, create_topics, ensure_kafka, kafka_hosts, topic_end, unique};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const PARTITIONS: i32 = 4;
/// Events produced, and how fast.
const EVENTS: usize = 1500;
const EVENTS_PER_SECOND: usize = 100;
/// `WORKER_CONCURRENCY` of each server.
const WORKER_CONCURRENCY: &str = "2";

/// Only the uuid of an `Event` on `clickhouse_events_proto` (prost skips the other fields).
#[derive(Clone, PartialEq, prost::Message)]
struct EventUuid {
    #[prost(string, optional, tag = "1")]
    uuid: Option<String>,
}

struct Fleet {
    env: Vec<(String, String)>,
}

impl Fleet {
    fn new(db: &TestDb, topic: &str) -> Fleet {
        let env = [
            ("NODE_ENV", "test"),
            ("DATABASE_URL", db.url.as_str()),
            ("REDIS_URL", common::redis_url().as_str()),
            ("LOG_LEVEL", "info"),
            ("KAFKA_ENABLED", "true"),
            ("KAFKA_HOSTS", kafka_hosts()),
            ("KAFKA_CONSUMPTION_TOPIC", topic),
            ("PLUGINS_CELERY_QUEUE", common::unique_prefix("group-celery").as_str()),
            ("WORKER_CONCURRENCY", WORKER_CONCURRENCY),
            ("KAFKA_FLUSH_FREQUENCY_MS", "100"),
            // Nothing listens there: the start-up check fails fast (the server starts anyway).
            ("CLICKHOUSE_HOST", "127.77.0.3"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
        Fleet { env }
    }

    /// Starts a server and waits until its consumer has joined the group.
    fn start(&self, name: &str) -> Server {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
        let mut server = Server::start(&[], &env);
        assert!(
            server.wait_for_line("Kafka consumer joined group", Duration::from_secs(120)),
            "server {name} did not join:\n{}",
            server.output()
        );
        server
    }
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// A raw event of one of 50 users of `marker`, with a new uuid (returned with its bytes).
fn streamed_event(marker: &str, n: usize) -> (String, Vec<u8>) {
    let uuid = uuid::Uuid::now_v7().to_string();
    let value = raw_event(&format!("{marker}-{}", n % 50), &uuid, "streamed", json!({ "n": n }));
    (uuid, value)
}

/// Waits until the group reads every partition: one event produced to each must come out.
///
/// A new group starts at the latest offset (`auto.offset.reset`, as the reference's kafkajs
/// consumer without `fromBeginning`), and "joined group" is logged at the assignment, before each
/// partition's start offset is known. An event produced in between is behind the group's start
/// and never read: on a broker that answers offsets slowly (the SQLite Tansu), the first ~200 ms of
/// a stream started right at the join. An operator's group has committed offsets and does not see
/// this; the test's fresh group must wait for it.
/// A partition whose probe is not read within a round gets a new probe (the first may have gone
/// in before the partition's start offset was known), up to a few rounds.
async fn wait_until_every_partition_is_read(topic: &str, start: rdkafka::Offset) {
    let producer = producer();
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let mut unread: Vec<i32> = (0..PARTITIONS).collect();
    for round in 0..6 {
        let mut probes: Vec<(i32, String)> = Vec::new();
        for &partition in &unread {
            let (uuid, value) = streamed_event(&marker, round * PARTITIONS as usize + partition as usize);
            let record = FutureRecord::to(topic).key(uuid.as_str()).payload(value.as_slice()).partition(partition);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error).expect("produce");
            probes.push((partition, uuid));
        }
        let uuids: Vec<String> = probes.iter().map(|(_, uuid)| uuid.clone()).collect();
        let counts = output_counts_within(start, &uuids, Duration::from_secs(30)).await;
        unread.retain(|partition| !probes.iter().any(|(read, uuid)| read == partition && counts.contains_key(uuid)));
        if unread.is_empty() {
            return;
        }
    }
    panic!("the group does not read partitions {unread:?} of {topic}");
}

/// Produces `EVENTS` raw events at `EVENTS_PER_SECOND`, keyed by uuid (spread over the partitions);
/// `sent` counts those acknowledged. Returns their uuids.
async fn stream_events(topic: String, marker: String, sent: Arc<AtomicUsize>) -> Vec<String> {
    let producer = producer();
    let mut uuids = Vec::with_capacity(EVENTS);
    let tick = Duration::from_millis(100);
    let per_tick = EVENTS_PER_SECOND / 10;
    let mut next = tokio::time::Instant::now();
    while uuids.len() < EVENTS {
        let batch: Vec<(String, Vec<u8>)> =
            (0..per_tick.min(EVENTS - uuids.len())).map(|i| streamed_event(&marker, uuids.len() + i)).collect();
        let sends = batch.iter().map(|(uuid, value)| {
            producer
                .send(FutureRecord::to(&topic).key(uuid.as_str()).payload(value.as_slice()), Duration::from_secs(30))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(error, _)| error).expect("produce");
        }
        uuids.extend(batch.into_iter().map(|(uuid, _)| uuid));
        sent.store(uuids.len(), Ordering::Relaxed);
        next += tick;
        tokio::time::sleep_until(next).await;
    }
    uuids
}

async fn wait_until_sent(sent: &AtomicUsize, count: usize) {
    while sent.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many times each of `uuids` is on `clickhouse_events_proto` from `start`, waiting (up to
/// 3 minutes) until every one is there.
async fn output_counts(start: rdkafka::Offset, uuids: &[String]) -> BTreeMap<String, usize> {
    output_counts_within(start, uuids, Duration::from_secs(180)).await
}

/// [`output_counts`], waiting at most `within` for all of them.
async fn output_counts_within(start: rdkafka::Offset, uuids: &[String], within: Duration) -> BTreeMap<String, usize> {
    let wanted: HashSet<&str> = uuids.iter().map(String::as_str).collect();
    let deadline = Instant::now() + within;
    loop {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, value) in consume_topic_to_end("clickhouse_events_proto", start).await {
            let Some(value) = value else { continue };
            let Ok(event) = <EventUuid as prost::Message>::decode_length_delimited(value.as_slice()) else { continue };
            if let Some(uuid) = event.uuid.filter(|uuid| wanted.contains(uuid.as_str())) {
                *counts.entry(uuid).or_default() += 1;
            }
        }
        if counts.len() == wanted.len() || Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

struct Tally {
    lost: usize,
    duplicates: usize,
}

fn tally(uuids: &[String], counts: &BTreeMap<String, usize>) -> Tally {
    let lost = uuids.iter().filter(|uuid| !counts.contains_key(*uuid)).count();
    let duplicates = counts.values().map(|count| count - 1).sum();
    Tally { lost, duplicates }
}

async fn setup() -> (TestDb, String, rdkafka::Offset) {
    ensure_kafka();
    let db = TestDb::with_fixture(None).await;
    let topic = unique("group-in");
    create_topics(&[&topic], PARTITIONS).await;
    (db, topic, topic_end("clickhouse_events_proto"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn a_clean_rebalance_loses_and_duplicates_nothing() {
    let (db, topic, start) = setup().await;
    let fleet = Fleet::new(&db, &topic);
    let a = fleet.start("A");
    let mut b = fleet.start("B");
    wait_until_every_partition_is_read(&topic, start).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let stream = tokio::spawn(stream_events(topic.clone(), marker, sent.clone()));
    wait_until_sent(&sent, EVENTS / 3).await;
    let c = tokio::task::spawn_blocking(move || Fleet { env: fleet.env.clone() }.start("C")).await.unwrap();
    wait_until_sent(&sent, 2 * EVENTS / 3).await;
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let b_exit = tokio::task::spawn_blocking(move || (b.wait_exit(Duration::from_secs(60)), b.output())).await.unwrap();
    assert_eq!(b_exit.0, Some(0), "B left cleanly:\n{}", b_exit.1);
    let uuids = stream.await.unwrap();

    let counts = output_counts(start, &uuids).await;
    let Tally { lost, duplicates } = tally(&uuids, &counts);
    println!(
        "clean rebalance (A+B, C joins, B leaves): {} events in, {lost} lost, {duplicates} duplicates",
        uuids.len()
    );
    assert_eq!(lost, 0, "every event came out");
    assert_eq!(duplicates, 0, "a clean rebalance hands partitions over without reprocessing");
    drop((a, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn a_killed_server_loses_nothing_and_its_duplicates_are_bounded() {
    let (db, topic, start) = setup().await;
    let fleet = Arc::new(Fleet::new(&db, &topic));
    let a = fleet.start("A");
    let b = fleet.start("B");
    wait_until_every_partition_is_read(&topic, start).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let stream = tokio::spawn(stream_events(topic.clone(), marker, sent.clone()));
    wait_until_sent(&sent, EVENTS / 4).await;
    a.signal(nix::sys::signal::Signal::SIGKILL);
    drop(a);
    wait_until_sent(&sent, EVENTS / 2).await;
    let restarted = {
        let fleet = fleet.clone();
        tokio::task::spawn_blocking(move || fleet.start("A again")).await.unwrap()
    };
    wait_until_sent(&sent, 3 * EVENTS / 4).await;
    let c = {
        let fleet = fleet.clone();
        tokio::task::spawn_blocking(move || fleet.start("C")).await.unwrap()
    };
    let uuids = stream.await.unwrap();

    let counts = output_counts(start, &uuids).await;
    let Tally { lost, duplicates } = tally(&uuids, &counts);
    println!(
        "kill -9 (A+B, A killed, A restarted, C joins): {} events in, {lost} lost, {duplicates} duplicates",
        uuids.len()
    );
    assert_eq!(lost, 0, "every event came out");
    // What the killed server can have handled without committing: its window of events in hand
    // (WORKER_CONCURRENCY × TASKS_PER_WORKER × 20, and 16 polled ahead) and up to two auto-commit
    // intervals (1 s each) of the stream.
    let in_hand = 2 * 10 * 20 + 16;
    let bound = in_hand + 2 * EVENTS_PER_SECOND;
    assert!(duplicates <= bound, "{duplicates} duplicates, more than the killed server can have had in hand ({bound})");
    drop((b, restarted, c));
}
