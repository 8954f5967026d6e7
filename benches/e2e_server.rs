//! The whole server, end to end: the reference's benchmarks/postgres/e2e.celery.benchmark.ts
//! (`BENCH_QUEUE=celery`, the default: N `process_event_with_plugins` Celery tasks in Redis, events
//! written to Postgres) and benchmarks/clickhouse/e2e.kafka.benchmark.ts (`BENCH_QUEUE=kafka`: N raw
//! event messages on a fresh `KAFKA_CONSUMPTION_TOPIC`, events out as protobuf on
//! `clickhouse_events_proto`, persons in Postgres). The queue is filled first; then the server (in
//! process, a real plugin on its JavaScript threads) is started and timed until every event has
//! landed: a `posthog_event` row, or for Kafka its message on `clickhouse_events_proto` (read back
//! and matched by uuid, so other writers to that topic are not counted; duplicates are reported).
//! Prints events/s and the peak RSS sampled while the server runs (the filling is not counted).
//!
//! With `BENCH_SERVERS=N`: N server processes (the `plugin-server` binary, as an operator runs
//! them) share the Celery queue, or in Kafka mode the consumer group on an input topic of
//! `BENCH_PARTITIONS` partitions (default 6); prints events/s in total and per server, each
//! server's peak RSS and CPU time (CPU per event: the figure that compares runs on a busy machine),
//! the broker's CPU time and how busy the machine's cores were (where the limit is).
//!
//! Run: `cargo bench --bench e2e_server` (env: BENCH_QUEUE; BENCH_EVENTS, default 10000; BENCH_USERS,
//! distinct users, default 1000; BENCH_SECONDS, stop after this long and report what was ingested
//! by then, e.g. with 1,000,000 events waiting; BENCH_SERVERS, BENCH_PARTITIONS; BENCH_PLUGIN=heavy,
//! a regex-and-loops plugin instead of the reference's; BENCH_RATE=N (Celery), the events queued at N
//! per second while the server runs instead of all before it starts; WORKER_CONCURRENCY /
//! TASKS_PER_WORKER / JS_ENGINE as for the server; BENCH_PROGRESS=1 prints the count every second; LOG_LEVEL,
//! default warn, for the server's log;
//! BENCH_LOG_STATEMENTS=1 has PostgreSQL log every statement on the bench's database (its name is
//! printed). The bench prints the Redis commands and Postgres transactions, rows and scans per event,
//! and in Celery mode the latency from LPUSH to the row (p50, p99, max).
//! BENCH_METRICS=1 turns the metrics on: statsd to a local UDP socket drained by the bench, and
//! `/metrics` on a free `HTTP_SERVER_PORT` scraped every 5 s; off by default, `HTTP_SERVER_PORT=0`). Needs PostgreSQL and Redis on 127.0.0.1 (`scripts/services`)
//! and for Kafka a broker (`scripts/kafka`; KAFKA_HOSTS to override 127.0.0.1:9092).

mod e2e_support;

/// The server binary's allocator (src/main.rs), so the in-process server runs as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_support::*;
use plugin_server::config::Config;
use plugin_server::sinks::messages::raw_event_record;
use plugin_server::sinks::topics::{ALL_TOPICS, KAFKA_EVENTS};
use plugin_server::sinks::KafkaProducerWrapper;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

/// The reference benchmark's plugin (`BENCH_PLUGIN=simple`, the default).
const PLUGIN: &str = "export function processEvent(event) { event.properties.processed = 'yes'; return event }";

/// `BENCH_PLUGIN=heavy`: regular expressions and loops over the event, a plugin that spends its
/// time in the JS engine (URL parsing 200 times, a word count of the properties, a hash loop).
const HEAVY_PLUGIN: &str = r#"
const URL_PARTS = /^(https?):\/\/([^/:?#]+)(?::(\d+))?(\/[^?#]*)?(\?[^#]*)?(#.*)?$/
export function processEvent(event) {
    const url = event.properties.$current_url || ''
    let score = 0
    for (let i = 0; i < 200; i++) {
        const m = URL_PARTS.exec(url + 'page/' + i + '?q=' + (i * 7) + '#top')
        if (m) score = (score * 31 + m[2].length + m[4].length + m[5].length) % 1000003
    }
    const words = JSON.stringify(event.properties).split(/[^a-z0-9]+/i).filter((w) => /^[a-z]/i.test(w))
    let hash = 0
    for (const word of words) for (let i = 0; i < word.length; i++) hash = (hash * 33 + word.charCodeAt(i)) | 0
    event.properties.processed = 'yes'
    event.properties.score = score
    event.properties.words = words.length
    event.properties.hash = hash
    return event
}
"#;

/// The `index`th event's payload: one of `users` distinct ids, a fresh uuid.
fn event_data(index: usize, users: usize) -> Map<String, Value> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // `bench_pushed_at_ms`: when it goes onto the queue (now, give or take the filling), for the
    // latency from LPUSH to the row.
    let pushed_at_ms = chrono::Utc::now().timestamp_micros() as f64 / 1000.0;
    let data = json!({"event": "$pageview", "distinct_id": format!("user-{}", index % users), "timestamp": now,
        "uuid": uuid::Uuid::new_v4().to_string(),
        "properties": {"$current_url": "https://example.com/", "$browser": "Chrome", "index": index,
            "bench_pushed_at_ms": pushed_at_ms}});
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

/// `BENCH_RATE`: queues `events` Celery tasks at `rate` per second while the server runs, a
/// hundredth of a second's worth at a time.
async fn pace_celery(redis_url: String, queue: String, events: usize, users: usize, rate: usize) {
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    while sent < events {
        interval.tick().await;
        let count = per_tick.min(events - sent);
        let messages: Vec<String> =
            (sent..sent + count).map(|index| celery_event_task(&queue, event_data(index, users), 2)).collect();
        push_celery(&redis_url, &queue, &messages).await;
        sent += count;
    }
}

/// The latency from LPUSH to the row (`bench_landed_at`, the insert's clock, against the event's
/// `bench_pushed_at_ms`) of the events from the `from`th on: p50, p99 and the largest, in
/// milliseconds.
async fn latency_ms(rows: &sqlx::PgPool, from: usize) -> Option<(f64, f64, f64)> {
    sqlx::query_as(
        "WITH latency AS (SELECT extract(epoch FROM bench_landed_at) * 1000 - (properties->>'bench_pushed_at_ms')::float8 \
             AS ms FROM posthog_event WHERE properties ? 'bench_pushed_at_ms' AND (properties->>'index')::int8 >= $1) \
         SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), \
             max(ms) FROM latency",
    )
    .bind(from as i64)
    .fetch_one(rows)
    .await
    .ok()
}

/// Creates the reference's topics and the fresh input topic `topic` of `partitions` partitions.
async fn create_kafka_topics(hosts: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", hosts).create().expect("admin");
    let mut topics: Vec<NewTopic> =
        ALL_TOPICS.iter().map(|name| NewTopic::new(name, 1, TopicReplication::Fixed(1))).collect();
    topics.push(NewTopic::new(topic, partitions, TopicReplication::Fixed(1)));
    let _ = admin.create_topics(&topics, &AdminOptions::new()).await.expect("create topics");
}

/// Waits until the servers consume every partition of `topic`: they start at the latest offset
/// (as the reference's), so an event produced before a partition is assigned is never read. One
/// event to each partition, again every 2 s, until one of each has come out.
async fn warm_up(hosts: &str, topic: &str, partitions: i32, output: &OutputCounter) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", hosts).create().expect("producer");
    let mut waiting: Vec<i32> = (0..partitions).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut offered: Vec<(i32, String)> = Vec::new();
    while !waiting.is_empty() {
        assert!(Instant::now() < deadline, "partitions {waiting:?} of {topic} never consumed");
        for partition in &waiting {
            let data = event_data(0, 1);
            let uuid = data["uuid"].as_str().unwrap_or_default().to_owned();
            output.watch_warm_up(&uuid);
            let record = raw_event_record(topic, &data, 2);
            let value = record.messages.into_iter().next().and_then(|message| message.value).unwrap_or_default();
            let sent = producer
                .send(
                    FutureRecord::<(), [u8]>::to(topic).partition(*partition).payload(&value),
                    Duration::from_secs(10),
                )
                .await;
            sent.map_err(|(error, _)| error).expect("produce a warm-up event");
            offered.push((*partition, uuid));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        waiting.retain(|partition| !offered.iter().any(|(p, uuid)| p == partition && output.has_seen(uuid)));
    }
}

/// Produces `events` raw event messages to `topic`, each watched for on the output first.
async fn produce_events(config: &Config, topic: &str, events: usize, users: usize, output: &OutputCounter) {
    let producer = KafkaProducerWrapper::connect(config, "bench").expect("producer");
    for index in 0..events {
        let data = event_data(index, users);
        output.watch(data["uuid"].as_str().unwrap_or_default());
        producer.queue_message(raw_event_record(topic, &data, 2)).await.expect("queue");
    }
    producer.flush().await.expect("produce");
}

/// Only the uuid of an `Event` on `clickhouse_events_proto` (prost skips the other fields).
#[derive(Clone, PartialEq, prost::Message)]
struct EventUuid {
    #[prost(string, optional, tag = "1")]
    uuid: Option<String>,
}

/// What [`OutputCounter`] looks for and has found.
#[derive(Default)]
struct Watched {
    events: HashSet<String>,
    warm_ups: HashSet<String>,
    seen: HashSet<String>,
    landed: usize,
    duplicates: usize,
}

/// Reads `clickhouse_events_proto` from its end at creation, on a thread of its own, and counts
/// the messages of the bench's events (by uuid): what ClickHouse would ingest.
struct OutputCounter {
    watched: Arc<Mutex<Watched>>,
    stop: Arc<AtomicBool>,
}

impl OutputCounter {
    fn start(hosts: &str) -> OutputCounter {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", hosts)
            .set("group.id", format!("bench-output-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("output reader");
        let metadata = reader.fetch_metadata(Some(KAFKA_EVENTS), Duration::from_secs(10)).expect("metadata");
        let partitions = metadata.topics().first().map_or(0, |topic| topic.partitions().len()) as i32;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            let (_, end) =
                reader.fetch_watermarks(KAFKA_EVENTS, partition, Duration::from_secs(10)).expect("watermarks");
            assignment.add_partition_offset(KAFKA_EVENTS, partition, Offset::Offset(end)).expect("offset");
        }
        reader.assign(&assignment).expect("assign");
        let (watched, stop) = (Arc::new(Mutex::new(Watched::default())), Arc::new(AtomicBool::new(false)));
        let counter = OutputCounter { watched: watched.clone(), stop: stop.clone() };
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) else { continue };
                let Some(value) = rdkafka::Message::payload(&message) else { continue };
                let Ok(event) = <EventUuid as prost::Message>::decode_length_delimited(value) else { continue };
                let Some(uuid) = event.uuid else { continue };
                let Ok(mut watched) = watched.lock() else { return };
                let is_event = watched.events.contains(&uuid);
                if !is_event && !watched.warm_ups.contains(&uuid) {
                    continue;
                }
                match (watched.seen.insert(uuid), is_event) {
                    (true, true) => watched.landed += 1,
                    (false, true) => watched.duplicates += 1,
                    _ => {}
                }
            }
        });
        counter
    }

    fn watch(&self, uuid: &str) {
        if let Ok(mut watched) = self.watched.lock() {
            watched.events.insert(uuid.to_owned());
        }
    }

    fn watch_warm_up(&self, uuid: &str) {
        if let Ok(mut watched) = self.watched.lock() {
            watched.warm_ups.insert(uuid.to_owned());
        }
    }

    fn has_seen(&self, uuid: &str) -> bool {
        self.watched.lock().is_ok_and(|watched| watched.seen.contains(uuid))
    }

    fn landed(&self) -> i64 {
        self.watched.lock().map_or(0, |watched| watched.landed as i64)
    }

    fn duplicates(&self) -> usize {
        self.watched.lock().map_or(0, |watched| watched.duplicates)
    }
}

impl Drop for OutputCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A server process's peak RSS (`VmHWM`, MiB) and CPU time (user + system, seconds).
fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let peak = line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0;
    Some((peak, cpu_seconds(pid)?))
}

/// User + system CPU seconds of a process (`/proc/<pid>/stat`, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Busy and total jiffies of all cores (`/proc/stat`).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .map(|line| line.split_whitespace().skip(1).filter_map(|value| value.parse().ok()).collect())
        .unwrap_or_default();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The loopback broker's process, from `scripts/kafka`'s pid file.
fn broker_pid(hosts: &str) -> Option<u32> {
    let port = hosts.rsplit(':').next()?;
    let home = std::env::var("KAFKA_HOME")
        .unwrap_or_else(|_| format!("{}/.cache/plugin-server/kafka", std::env::var("HOME").unwrap_or_default()));
    std::fs::read_to_string(format!("{home}/tansu-{port}.pid")).ok()?.trim().parse().ok()
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

/// The servers under test: in this process, or `BENCH_SERVERS` processes of the binary.
enum Servers {
    InProcess {
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<Result<(), plugin_server::server::ServerError>>,
    },
    Processes(Vec<std::process::Child>),
}

impl Servers {
    fn start(config: Config, pairs: &[(String, String)], processes: usize) -> Servers {
        if processes == 0 {
            let shutdown = CancellationToken::new();
            let server = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
            return Servers::InProcess { shutdown, server };
        }
        let children = (0..processes)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_plugin-server"))
                    .env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .envs(pairs.iter().map(|(key, value)| (key.as_str(), value.as_str())))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("start plugin-server")
            })
            .collect();
        Servers::Processes(children)
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Servers::InProcess { .. } => vec![std::process::id()],
            Servers::Processes(children) => children.iter().map(std::process::Child::id).collect(),
        }
    }

    async fn stop(self) {
        match self {
            Servers::InProcess { shutdown, server } => {
                shutdown.cancel();
                let _ = server.await;
            }
            Servers::Processes(mut children) => {
                for child in &children {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                for child in &mut children {
                    let _ = child.wait();
                }
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let kafka = std::env::var("BENCH_QUEUE").is_ok_and(|queue| queue == "kafka");
    let events = env_number("BENCH_EVENTS", 10_000);
    let users = env_number("BENCH_USERS", 1000);
    let limit = Duration::from_secs(env_number("BENCH_SECONDS", 900) as u64);
    let processes = env_number("BENCH_SERVERS", 0);
    let partitions = env_number("BENCH_PARTITIONS", 6) as i32;
    let name = format!("pst_bench_{}", uuid::Uuid::new_v4().simple());
    let heavy = std::env::var("BENCH_PLUGIN").is_ok_and(|plugin| plugin == "heavy");
    let database = fresh_database(&name, if heavy { HEAVY_PLUGIN } else { PLUGIN }).await;
    if std::env::var("BENCH_LOG_STATEMENTS").is_ok_and(|value| value == "1") {
        // Every statement of the server's connections to this database goes to PostgreSQL's log
        // (its lines carry the database name), to see which statements an event causes.
        let admin = sqlx::PgPool::connect(&database).await.expect("bench database");
        sqlx::query(&format!("ALTER DATABASE {name} SET log_statement = 'all'")).execute(&admin).await.expect("log");
        admin.close().await;
        println!("(statements of database {name} are logged by PostgreSQL)");
    }
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
        "JS_ENGINE",
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

    // `BENCH_RATE=N` (Celery): the events are queued at N per second while the server runs, not
    // before it starts.
    let rate = std::env::var("BENCH_RATE").ok().and_then(|rate| rate.parse::<usize>().ok()).filter(|rate| *rate > 0);
    let rows = sqlx::PgPool::connect(&database).await.unwrap();
    let output = if kafka {
        create_kafka_topics(&kafka_hosts, &queue, partitions).await;
        Some(OutputCounter::start(&kafka_hosts))
    } else {
        // When each row is written (the bench's database only; the server names its columns).
        sqlx::query("ALTER TABLE posthog_event ADD COLUMN bench_landed_at timestamptz DEFAULT clock_timestamp()")
            .execute(&rows)
            .await
            .expect("landing time column");
        if rate.is_none() {
            let filling = Instant::now();
            fill_celery(&redis_url, &queue, events, users).await;
            println!("(queued {events} events in {:.1}s)", filling.elapsed().as_secs_f64());
        }
        None
    };
    let polls = std::sync::atomic::AtomicI64::new(0);
    let ingested_so_far = async || -> i64 {
        match &output {
            Some(output) => output.landed(),
            None => {
                polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sqlx::query_scalar("SELECT count(*) FROM posthog_event").fetch_one(&rows).await.unwrap()
            }
        }
    };
    let work_before = WorkCounts::read(&redis_url, &database).await;

    let rss_before = rss_mib();
    let own_cpu_before = cpu_seconds(std::process::id());
    let broker = if kafka { broker_pid(&kafka_hosts) } else { None };
    let broker_cpu_before = broker.and_then(cpu_seconds);
    let machine_before = machine_jiffies();
    let mut started = Instant::now();
    let producer_config = config.clone();
    let servers = Servers::start(config, &pairs, processes);
    if let Some(output) = &output {
        // Kafka: the servers join first (they start at the latest offset), then the events are
        // produced, the clock started as the first goes out.
        warm_up(&kafka_hosts, &queue, partitions, output).await;
        println!(
            "(servers up and consuming all {partitions} partitions after {:.1}s)",
            started.elapsed().as_secs_f64()
        );
        started = Instant::now();
        produce_events(&producer_config, &queue, events, users, output).await;
        println!("(produced {events} events in {:.1}s, the clock running)", started.elapsed().as_secs_f64());
    }
    if let (Some(rate), false) = (rate, kafka) {
        println!("(queueing {events} events at {rate} per second while the server runs)");
        tokio::spawn(pace_celery(redis_url.clone(), queue.clone(), events, users, rate));
    }
    let shutdown = CancellationToken::new();
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
    let mut usage: Vec<(f64, f64)> = Vec::new();
    while ingested < events as i64 && Instant::now() < deadline {
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
        if processes > 0 {
            usage = servers.pids().into_iter().filter_map(process_usage).collect();
        }
    }
    let finished = Instant::now();
    let elapsed = finished - started;
    let machine_after = machine_jiffies();
    let broker_cpu = broker_cpu_before.zip(broker.and_then(cpu_seconds)).map(|(before, after)| after - before);
    if let Some(output) = &output {
        println!("({} of {events} events on {KAFKA_EVENTS}, {} duplicates)", output.landed(), output.duplicates());
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
    servers.stop().await;
    // Postgres publishes its counters up to a second late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let work_after = WorkCounts::read(&redis_url, &database).await;
    // The bench's own: each poll and the two snapshots' statements are transactions of their own.
    let own = polls.load(std::sync::atomic::Ordering::Relaxed) + 3;
    for line in work_after.per_event(&work_before, ingested.max(1) as usize, own) {
        println!("({line})");
    }
    if !kafka {
        // At a steady rate, from the third second on: the first events wait for the start-up.
        let from = rate.map_or(0, |rate| (rate * 2).min(events / 2));
        if let Some((p50, p99, max)) = latency_ms(&rows, from).await {
            let load = rate.map_or("the whole backlog queued first".to_string(), |rate| {
                format!("{rate} events/s, the events after the first {from}")
            });
            println!("(latency from LPUSH to the row, {load}: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms)");
        }
    }
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
    if !kafka {
        println!("(start-up included: loading the plugin and joining the queue)");
    }
    if processes > 0 {
        let seconds = elapsed.as_secs_f64();
        for (index, (peak, cpu)) in usage.iter().enumerate() {
            println!("(server {}: peak RSS {peak:.1} MiB, CPU {cpu:.1} s = {:.2} cores)", index + 1, cpu / seconds);
        }
        let cpu: f64 = usage.iter().map(|(_, cpu)| cpu).sum();
        let shape = if kafka {
            format!("{processes} servers, {partitions} partitions")
        } else {
            format!("{processes} servers")
        };
        println!(
            "({shape}: {:.0} events/sec in total, {:.0} per server; {:.0} events per CPU-second of the servers = {:.3} ms of CPU per event)",
            ingested as f64 / seconds,
            ingested as f64 / seconds / processes as f64,
            ingested as f64 / cpu.max(0.001),
            1000.0 * cpu / (ingested.max(1) as f64)
        );
    } else {
        println!("(RSS {rss_before:.1} MiB before the server started, {peak_rss:.1} MiB at most while it ran)");
        // The in-process server's CPU (this process: the bench's own polling is a few queries a
        // second), start-up included.
        if let Some(cpu) = own_cpu_before.zip(cpu_seconds(std::process::id())).map(|(before, after)| after - before) {
            println!(
                "(CPU {cpu:.1} s = {:.2} cores; {:.3} ms of CPU per event)",
                cpu / elapsed.as_secs_f64(),
                1000.0 * cpu / (ingested.max(1) as f64)
            );
        }
    }
    if let Some(broker_cpu) = broker_cpu {
        println!("(broker: CPU {broker_cpu:.1} s = {:.2} cores)", broker_cpu / elapsed.as_secs_f64());
    }
    let (busy, total) = (machine_after.0 - machine_before.0, machine_after.1 - machine_before.1);
    println!("(machine: {:.0}% of its cores busy, every process counted)", 100.0 * busy as f64 / total.max(1) as f64);
    // Unset: the server's default engine.
    let engine = pairs.iter().find(|(k, _)| k == "JS_ENGINE").map_or("v8", |(_, v)| v.as_str());
    let plugin = if heavy { "heavy plugin" } else { "simple plugin" };
    report(
        &format!("Server e2e, {pipeline}, {engine}, {plugin}, {users} users, {ingested} of {events} events ingested"),
        ingested as usize,
        elapsed,
    );
    drop(output);
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
