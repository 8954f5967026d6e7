//! Several Kafka-mode servers (the real binary, as an operator runs them) in one consumer group on
//! a topic of several partitions, while events stream in:
//! * a clean rebalance — a third server joins, then one leaves with SIGTERM — loses nothing and
//!   duplicates nothing (a revoke drains, flushes and commits before the partition moves);
//! * a crash — `kill -9` of one server, started again, then a third added once the broker has
//!   dropped the killed one — loses nothing; the duplicates (events the killed server had handled
//!   but not committed) are reported and bounded by what that one server can have had in hand.
//!
//! Every input event is looked for on `clickhouse_events_proto` by its uuid. When some are missing,
//! the test prints where they were on the input topic, what the group committed there, whether
//! they were dead-lettered, and what each server logged about the group.

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
/// The servers' consumer session timeout (the reference's 30 s): how long the broker keeps a
/// killed server in the group.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
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

/// An event produced: its uuid and where it went on the input topic.
struct Sent {
    uuid: String,
    partition: i32,
    offset: i64,
}

/// Produces `EVENTS` raw events at `EVENTS_PER_SECOND`, keyed by uuid (spread over the partitions);
/// `sent` counts those acknowledged. Returns them.
async fn stream_events(topic: String, marker: String, sent: Arc<AtomicUsize>) -> Vec<Sent> {
    let producer = producer();
    let mut uuids: Vec<Sent> = Vec::with_capacity(EVENTS);
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
        let delivered = futures::future::join_all(sends).await;
        for ((uuid, _), result) in batch.into_iter().zip(delivered) {
            let delivery = result.map_err(|(error, _)| error).expect("produce");
            uuids.push(Sent { uuid, partition: delivery.partition, offset: delivery.offset });
        }
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

/// How many times each event of `sent` is on `clickhouse_events_proto` from `start`, waiting (up to
/// 3 minutes) until every one is there.
async fn output_counts(start: rdkafka::Offset, sent: &[Sent]) -> BTreeMap<String, usize> {
    let uuids: Vec<String> = sent.iter().map(|event| event.uuid.clone()).collect();
    output_counts_within(start, &uuids, Duration::from_secs(180)).await
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

fn tally(sent: &[Sent], counts: &BTreeMap<String, usize>) -> Tally {
    let lost = sent.iter().filter(|event| !counts.contains_key(&event.uuid)).count();
    let duplicates = counts.values().map(|count| count - 1).sum();
    Tally { lost, duplicates }
}

/// What a failure needs to be understood without a rerun: where the lost events were on the input
/// topic, what the group has committed there, whether the servers dead-lettered them, and what the
/// servers logged about the group.
async fn report_losses(
    topic: &str,
    sent: &[Sent],
    counts: &BTreeMap<String, usize>,
    dead_letters_start: rdkafka::Offset,
    logs: &[(&str, String)],
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let lost: Vec<&Sent> = sent.iter().filter(|event| !counts.contains_key(&event.uuid)).collect();
    fn offsets_on<'a>(partition: i32, events: impl IntoIterator<Item = &'a Sent>) -> Vec<i64> {
        events.into_iter().filter(|event| event.partition == partition).map(|event| event.offset).collect()
    }
    for partition in 0..PARTITIONS {
        let sent_here = offsets_on(partition, sent);
        let lost_here = offsets_on(partition, lost.iter().copied());
        println!(
            "  partition {partition}: {} sent at offsets {:?}..={:?}, {} lost (offsets {:?}..={:?})",
            sent_here.len(),
            sent_here.iter().min(),
            sent_here.iter().max(),
            lost_here.len(),
            lost_here.iter().min(),
            lost_here.iter().max()
        );
    }
    let topic_name = topic.to_owned();
    let committed = tokio::task::spawn_blocking(move || {
        let group: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_hosts())
            .set("group.id", plugin_server::sources::kafka_consumer::CONSUMER_GROUP)
            .create()
            .expect("group reader");
        let mut partitions = rdkafka::TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            partitions.add_partition(&topic_name, partition);
        }
        group.committed_offsets(partitions, Duration::from_secs(10))
    })
    .await
    .expect("committed offsets");
    match committed {
        Ok(committed) => {
            for element in committed.elements() {
                println!("  committed for partition {}: {:?}", element.partition(), element.offset());
            }
        }
        Err(error) => println!("  committed offsets: {error}"),
    }
    let lost: HashSet<&str> = lost.iter().map(|event| event.uuid.as_str()).collect();
    let dead_lettered = consume_topic_to_end("events_dead_letter_queue", dead_letters_start)
        .await
        .into_iter()
        .filter_map(|(_, value)| value)
        .filter(|value| lost.iter().any(|uuid| kafka_mode_support::contains(value, uuid)))
        .count();
    println!("  lost events on events_dead_letter_queue: {dead_lettered}");
    for (name, log) in logs {
        println!("  --- server {name}:");
        let relevant = log.lines().filter(|line| {
            ["Kafka", "WARN", "ERROR", "Revoke", "revoke", "ead-letter"].iter().any(|word| line.contains(word))
        });
        for line in relevant.take(200) {
            println!("    {line}");
        }
    }
}

/// Every Kafka-mode server joins the one group `clickhouse-ingestion`, and an earlier test's
/// servers killed at its end (a `Server` is killed when dropped) stay members until the broker
/// expires their sessions. Joined with them, this test's servers could be given partitions beside a
/// dead member that Tansu 0.6 later drops without a rebalance (see the kill test). So every test
/// waits out one session before its first server joins, which then drops them all. (Asking the
/// broker whether the group has members is no help: Tansu 0.6's SQLite engine fails DescribeGroups
/// — it cannot read back the group it stored — and closes the connection.)
async fn wait_for_earlier_members_to_expire() {
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(5)).await;
}

/// Where a test starts reading the shared output topics.
struct Starts {
    events: rdkafka::Offset,
    dead_letters: rdkafka::Offset,
}

async fn setup() -> (TestDb, String, Starts) {
    ensure_kafka();
    wait_for_earlier_members_to_expire().await;
    let db = TestDb::with_fixture(None).await;
    let topic = unique("group-in");
    create_topics(&[&topic], PARTITIONS).await;
    let starts =
        Starts { events: topic_end("clickhouse_events_proto"), dead_letters: topic_end("events_dead_letter_queue") };
    (db, topic, starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn a_clean_rebalance_loses_and_duplicates_nothing() {
    let (db, topic, start) = setup().await;
    let fleet = Fleet::new(&db, &topic);
    let mut a = fleet.start("A");
    let mut b = fleet.start("B");
    wait_until_every_partition_is_read(&topic, start.events).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let stream = tokio::spawn(stream_events(topic.clone(), marker, sent.clone()));
    wait_until_sent(&sent, EVENTS / 3).await;
    let mut c = tokio::task::spawn_blocking(move || Fleet { env: fleet.env.clone() }.start("C")).await.unwrap();
    wait_until_sent(&sent, 2 * EVENTS / 3).await;
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let b_exit = tokio::task::spawn_blocking(move || (b.wait_exit(Duration::from_secs(60)), b.output())).await.unwrap();
    assert_eq!(b_exit.0, Some(0), "B left cleanly:\n{}", b_exit.1);
    let sent = stream.await.unwrap();

    let counts = output_counts(start.events, &sent).await;
    let Tally { lost, duplicates } = tally(&sent, &counts);
    println!(
        "clean rebalance (A+B, C joins, B leaves): {} events in, {lost} lost, {duplicates} duplicates",
        sent.len()
    );
    if lost > 0 {
        let logs = vec![("A", a.output()), ("B", b_exit.1), ("C", c.output())];
        report_losses(&topic, &sent, &counts, start.dead_letters, &logs).await;
    }
    assert_eq!(lost, 0, "every event came out");
    assert_eq!(duplicates, 0, "a clean rebalance hands partitions over without reprocessing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial_test::serial(kafka_mode_server)]
async fn a_killed_server_loses_nothing_and_its_duplicates_are_bounded() {
    let (db, topic, start) = setup().await;
    let fleet = Arc::new(Fleet::new(&db, &topic));
    let mut a = fleet.start("A");
    let mut b = fleet.start("B");
    wait_until_every_partition_is_read(&topic, start.events).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let stream = tokio::spawn(stream_events(topic.clone(), marker, sent.clone()));
    wait_until_sent(&sent, EVENTS / 4).await;
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let killed_at = tokio::time::Instant::now();
    let a_log = a.output();
    drop(a);
    wait_until_sent(&sent, EVENTS / 2).await;
    let mut restarted = {
        let fleet = fleet.clone();
        tokio::task::spawn_blocking(move || fleet.start("A again")).await.unwrap()
    };
    wait_until_sent(&sent, 3 * EVENTS / 4).await;
    // C joins once the broker has dropped the killed A from the group. Tansu 0.6 drops a member
    // whose session expired while the group is formed without rebalancing: the partitions the
    // leader had given the dead A stay with it, read by nobody, until the next member joins (a
    // Kafka broker rebalances at once). Joining earlier, C would be that next member too soon, and
    // A's partitions would stay unread after the test's last join (seen in CI: one partition
    // stopped at A's last commit). What this test is about — what A handled but did not commit is
    // handled again, nothing committed is lost — does not depend on when C joins.
    tokio::time::sleep_until(killed_at + SESSION_TIMEOUT + Duration::from_secs(5)).await;
    let mut c = {
        let fleet = fleet.clone();
        tokio::task::spawn_blocking(move || fleet.start("C")).await.unwrap()
    };
    let sent = stream.await.unwrap();

    let counts = output_counts(start.events, &sent).await;
    let Tally { lost, duplicates } = tally(&sent, &counts);
    println!(
        "kill -9 (A+B, A killed, A restarted, C joins): {} events in, {lost} lost, {duplicates} duplicates",
        sent.len()
    );
    if lost > 0 {
        let logs = vec![("A", a_log), ("B", b.output()), ("A again", restarted.output()), ("C", c.output())];
        report_losses(&topic, &sent, &counts, start.dead_letters, &logs).await;
    }
    assert_eq!(lost, 0, "every event came out");
    // What the killed server can have handled without committing: its window of events in hand
    // (WORKER_CONCURRENCY × TASKS_PER_WORKER × 20, and 16 polled ahead) and up to two auto-commit
    // intervals (1 s each) of the stream.
    let in_hand = 2 * 10 * 20 + 16;
    let bound = in_hand + 2 * EVENTS_PER_SECOND;
    assert!(duplicates <= bound, "{duplicates} duplicates, more than the killed server can have had in hand ({bound})");
}
