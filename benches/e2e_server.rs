//! The whole server, end to end: the reference's benchmarks/postgres/e2e.celery.benchmark.ts
//! (`BENCH_QUEUE=celery`, the default: N `process_event_with_plugins` Celery tasks in Redis, events
//! written to Postgres) and benchmarks/clickhouse/e2e.kafka.benchmark.ts (`BENCH_QUEUE=kafka`: N raw
//! event messages on a fresh `KAFKA_CONSUMPTION_TOPIC`, events out as protobuf on
//! `clickhouse_events_proto`, persons in Postgres). The queue is filled first; then the server (in
//! process, a real plugin on its JavaScript threads) is started and timed until every event has
//! landed (a `posthog_event` row; for Kafka, committed by the consumer group, which happens once
//! the event's messages, protobuf on `clickhouse_events_proto` among them, are delivered). Prints events/s and
//! the peak RSS sampled while the server runs (the filling is not counted).
//!
//! Run: `cargo bench --bench e2e_server` (env: BENCH_QUEUE; BENCH_EVENTS, default 10000; BENCH_USERS,
//! distinct users, default 1000; BENCH_SECONDS, stop after this long and report what was ingested
//! by then, e.g. with 1,000,000 events waiting; WORKER_CONCURRENCY / TASKS_PER_WORKER as for the
//! server; BENCH_PROGRESS=1 prints the count every second; LOG_LEVEL, default warn, for the server's log;
//! BENCH_METRICS=1 turns the metrics on: statsd to a local UDP socket drained by the bench, and
//! `/metrics` on a free `HTTP_SERVER_PORT` scraped every 5 s; off by default, `HTTP_SERVER_PORT=0`). Needs PostgreSQL and Redis on 127.0.0.1 (`scripts/services`) and for Kafka a broker
//! (`scripts/kafka`; KAFKA_HOSTS to override 127.0.0.1:9092).

mod e2e_support;

/// The server binary's allocator (src/main.rs), so the in-process server runs as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use e2e_support::*;
use plugin_server::config::Config;
use plugin_server::sinks::messages::raw_event_record;
use plugin_server::sinks::topics::{ALL_TOPICS, KAFKA_EVENTS};
use plugin_server::sinks::KafkaProducerWrapper;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

/// The reference benchmark's plugin.
const PLUGIN: &str = "export function processEvent(event) { event.properties.processed = 'yes'; return event }";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// The `index`th event's payload: one of `users` distinct ids, a fresh uuid.
fn event_data(index: usize, users: usize) -> Map<String, Value> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let data = json!({"event": "$pageview", "distinct_id": format!("user-{}", index % users), "timestamp": now,
        "uuid": uuid::Uuid::new_v4().to_string(),
        "properties": {"$current_url": "https://example.com/", "$browser": "Chrome", "index": index}});
    match data {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

/// Queues `events` Celery tasks on `queue`, as PostHog's Django app does.
async fn fill_celery(redis_url: &str, queue: &str, events: usize, users: usize) {
    let messages: Vec<String> =
        (0..events).map(|index| celery_event_task(queue, event_data(index, users), 2)).collect();
    push_celery(redis_url, queue, &messages).await;
}

/// Produces `events` raw event messages to the fresh topic `topic` and commits offset 0 for the
/// server's consumer group there (it starts from the latest offset otherwise, as the reference's).
async fn fill_kafka(config: &Config, topic: &str, events: usize, users: usize) {
    let hosts = config.KAFKA_HOSTS.clone().unwrap_or_default();
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &hosts).create().expect("admin");
    let mut topics: Vec<NewTopic> =
        ALL_TOPICS.iter().map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1))).collect();
    topics.push(NewTopic::new(topic, 1, TopicReplication::Fixed(1)));
    let _ = admin.create_topics(&topics, &AdminOptions::new()).await.expect("create topics");
    let producer = KafkaProducerWrapper::connect(config, "bench").expect("producer");
    for index in 0..events {
        producer.queue_message(raw_event_record(topic, &event_data(index, users), 2)).await.expect("queue");
    }
    producer.flush().await.expect("produce");
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &hosts)
        .set("group.id", plugin_server::sources::kafka_consumer::CONSUMER_GROUP)
        .create()
        .expect("group client");
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(topic, 0, Offset::Offset(0)).expect("offset");
    group.commit(&offsets, rdkafka::consumer::CommitMode::Sync).expect("commit offset 0");
}

/// Messages on `clickhouse_events_proto` (all partitions' high watermarks).
fn produced_events(watcher: &BaseConsumer) -> i64 {
    let metadata = watcher.fetch_metadata(Some(KAFKA_EVENTS), Duration::from_secs(5)).expect("metadata");
    let partitions = metadata.topics().first().map(|topic| topic.partitions().len()).unwrap_or(0);
    (0..partitions as i32)
        .map(|partition| {
            watcher.fetch_watermarks(KAFKA_EVENTS, partition, Duration::from_secs(5)).expect("watermarks").1
        })
        .sum()
}

/// Events of the input topic (one partition) the server's consumer group has committed: each one
/// fully handled and its output delivered. This, not the output topic's growth, is what the Kafka
/// bench counts, because the loopback broker (Tansu 0.6, in-memory storage) does not always show
/// acknowledged messages in its watermarks and fetches at once: a large produce was seen showing
/// half its messages for minutes, the rest appearing with a later write to the topic, or not at
/// all (`examples/kafka_cli.rs` `end`/`dump` show it).
fn committed_events(group: &BaseConsumer, topic: &str) -> i64 {
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(topic, 0);
    match group.committed_offsets(partitions, Duration::from_secs(5)) {
        Ok(committed) => committed
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            })
            .sum(),
        Err(_) => 0,
    }
}

/// Current RSS of this process in MiB (`VmRSS`).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() {
    let kafka = std::env::var("BENCH_QUEUE").is_ok_and(|queue| queue == "kafka");
    let events = env_number("BENCH_EVENTS", 10_000);
    let users = env_number("BENCH_USERS", 1000);
    let limit = Duration::from_secs(env_number("BENCH_SECONDS", 900) as u64);
    let name = format!("pst_bench_{}", uuid::Uuid::new_v4().simple());
    let database = fresh_database(&name, PLUGIN).await;
    let queue = format!("bench-e2e-{}", uuid::Uuid::new_v4().simple());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let kafka_hosts = std::env::var("KAFKA_HOSTS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let mut pairs = vec![
        ("DATABASE_URL".to_string(), database.clone()),
        ("REDIS_URL".to_string(), redis_url.clone()),
        ("LOG_LEVEL".to_string(), std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into())),
        ("DISABLE_MMDB".to_string(), "true".to_string()),
    ];
    if kafka {
        pairs.push(("KAFKA_ENABLED".to_string(), "true".to_string()));
        pairs.push(("KAFKA_HOSTS".to_string(), kafka_hosts.clone()));
        pairs.push(("KAFKA_CONSUMPTION_TOPIC".to_string(), queue.clone()));
    } else {
        pairs.push(("PLUGINS_CELERY_QUEUE".to_string(), queue.clone()));
    }
    for key in [
        "WORKER_CONCURRENCY",
        "TASKS_PER_WORKER",
        "KAFKA_PRODUCER_MAX_QUEUE_SIZE",
        "KAFKA_FLUSH_FREQUENCY_MS",
        "KAFKA_MAX_MESSAGE_BATCH_SIZE",
    ] {
        if let Ok(value) = std::env::var(key) {
            pairs.push((key.to_string(), value));
        }
    }
    let metrics_on = std::env::var("BENCH_METRICS").is_ok_and(|value| value == "1");
    let statsd_lines = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let http_port = if metrics_on {
        let (statsd_port, http_port) = metrics_sinks(statsd_lines.clone());
        pairs.push(("STATSD_HOST".to_string(), "127.0.0.1".to_string()));
        pairs.push(("STATSD_PORT".to_string(), statsd_port.to_string()));
        pairs.push(("HTTP_SERVER_PORT".to_string(), http_port.to_string()));
        Some(http_port)
    } else {
        pairs.push(("HTTP_SERVER_PORT".to_string(), "0".to_string()));
        None
    };
    let config = Config::from_lookup(&|key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())).unwrap();
    plugin_server::logging::init(config.LOG_LEVEL, "MAIN");

    let filling = Instant::now();
    let watcher: Option<BaseConsumer> = if kafka {
        fill_kafka(&config, &queue, events, users).await;
        Some(
            ClientConfig::new()
                .set("bootstrap.servers", &kafka_hosts)
                .set("group.id", plugin_server::sources::kafka_consumer::CONSUMER_GROUP)
                .create()
                .expect("offsets client"),
        )
    } else {
        fill_celery(&redis_url, &queue, events, users).await;
        None
    };
    println!("(queued {events} events in {:.1}s)", filling.elapsed().as_secs_f64());
    let rows = sqlx::PgPool::connect(&database).await.unwrap();
    let before = watcher.as_ref().map_or(0, produced_events);
    let ingested_so_far = async || -> i64 {
        match &watcher {
            Some(watcher) => committed_events(watcher, &queue),
            None => sqlx::query_scalar("SELECT count(*) FROM posthog_event").fetch_one(&rows).await.unwrap(),
        }
    };

    let rss_before = rss_mib();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let server = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(port) = http_port {
        let (scrapes, shutdown) = (scrapes.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = interval.tick() => {
                        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                            if response.text().await.is_ok() {
                                scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        });
    }
    let deadline = started + limit;
    let (mut ingested, mut peak_rss) = (0, rss_before);
    let progress = std::env::var("BENCH_PROGRESS").is_ok();
    let mut last_report = Instant::now();
    // When the first events landed (the server is up and its consumer joined): the steady rate is
    // measured from there, as the reference's benchmark starts its clock on a running server.
    let mut first_landed: Option<(Instant, i64)> = None;
    // The broker may keep fewer messages than were produced (see `committed_events`): for Kafka
    // the run also ends when everything on the input topic is committed and stays so for 2 s.
    let input_end = || {
        watcher
            .as_ref()
            .map(|watcher| watcher.fetch_watermarks(&queue, 0, Duration::from_secs(5)).map_or(i64::MAX, |(_, end)| end))
    };
    let mut caught_up_since: Option<Instant> = None;
    let mut finished: Option<Instant> = None;
    while ingested < events as i64 && Instant::now() < deadline {
        if let Some(end) = input_end() {
            let caught_up = ingested > 0 && ingested >= end;
            caught_up_since = if caught_up { caught_up_since.or(Some(Instant::now())) } else { None };
            if caught_up_since.is_some_and(|since| since.elapsed() >= Duration::from_secs(2)) {
                println!("(the broker kept {end} of the {events} messages produced to the input topic)");
                finished = caught_up_since;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak_rss = peak_rss.max(rss_mib());
        ingested = ingested_so_far().await;
        if ingested > 0 && first_landed.is_none() {
            first_landed = Some((Instant::now(), ingested));
        }
        if progress && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!("({:.1}s: {ingested} ingested, RSS {:.1} MiB)", started.elapsed().as_secs_f64(), rss_mib());
        }
    }
    let finished = finished.unwrap_or_else(Instant::now);
    let elapsed = finished - started;
    if let Some(watcher) = &watcher {
        println!("({} messages went out on {KAFKA_EVENTS})", produced_events(watcher) - before);
    }
    if let Some((at, count)) = first_landed.filter(|(at, _)| (finished - *at).as_secs_f64() > 0.5) {
        let seconds = (finished - at).as_secs_f64();
        println!(
            "(steady rate after the first {count} landed at {:.1}s: {:.0} events/sec)",
            (at - started).as_secs_f64(),
            (ingested - count) as f64 / seconds
        );
    }
    shutdown.cancel();
    let _ = server.await;
    let pipeline = if kafka { "Kafka in + Kafka out, persons in Postgres" } else { "Celery + Postgres" };
    if metrics_on {
        println!(
            "(metrics on: {} statsd lines received, /metrics scraped {} times)",
            statsd_lines.load(std::sync::atomic::Ordering::Relaxed),
            scrapes.load(std::sync::atomic::Ordering::Relaxed)
        );
    } else {
        println!("(metrics off: no STATSD_HOST, HTTP_SERVER_PORT=0)");
    }
    println!("(start-up included: loading the plugin and joining the queue)");
    println!("(RSS {rss_before:.1} MiB before the server started, {peak_rss:.1} MiB at most while it ran)");
    report(
        &format!("Server e2e, {pipeline}, {users} users, {ingested} of {events} events ingested"),
        ingested as usize,
        elapsed,
    );
    rows.close().await;
    drop_database(&name).await;
    if !kafka {
        delete_key(&redis_url, &queue).await;
    }
}

/// A UDP socket drained in a thread (counting statsd lines) and a free TCP port for `/metrics`.
fn metrics_sinks(lines: std::sync::Arc<std::sync::atomic::AtomicU64>) -> (u16, u16) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("statsd socket");
    let statsd_port = socket.local_addr().expect("statsd address").port();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 65536];
        while let Ok((length, _)) = socket.recv_from(&mut buffer) {
            let count = buffer[..length].iter().filter(|byte| **byte == b'\n').count() as u64 + 1;
            lines.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let http_port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("port").port();
    (statsd_port, http_port)
}
