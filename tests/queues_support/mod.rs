//! Helpers for the queue tests: a recording `EventHandler` (the consumers' boundary), Redis and
//! Kafka connections on loopback, unique names, polling until a condition holds.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::event::PluginEvent;
use plugin_server::sources::{EventHandler, HandleError};
use serde_json::Value;
use tokio::sync::Semaphore;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The test broker's port: `KAFKA_PORT` (as for `scripts/kafka`), default 9092.
pub fn kafka_port() -> u16 {
    std::env::var("KAFKA_PORT").ok().and_then(|port| port.parse().ok()).unwrap_or(9092)
}

/// The test broker: `127.0.0.1:<kafka_port()>`.
pub fn kafka_hosts() -> &'static str {
    static HOSTS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOSTS.get_or_init(|| format!("127.0.0.1:{}", kafka_port()))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn redis_pool() -> deadpool_redis::Pool {
    deadpool_redis::Config::from_url(REDIS_URL).create_pool(Some(deadpool_redis::Runtime::Tokio1)).expect("redis pool")
}

pub async fn redis_conn(pool: &deadpool_redis::Pool) -> deadpool_redis::Connection {
    pool.get().await.expect("redis connection")
}

pub async fn llen(pool: &deadpool_redis::Pool, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query_async(&mut redis_conn(pool).await).await.expect("LLEN")
}

pub async fn lrange(pool: &deadpool_redis::Pool, key: &str) -> Vec<String> {
    redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut redis_conn(pool).await).await.expect("LRANGE")
}

pub async fn lpush(pool: &deadpool_redis::Pool, key: &str, value: &str) {
    let _: i64 = redis::cmd("LPUSH").arg(key).arg(value).query_async(&mut redis_conn(pool).await).await.expect("LPUSH");
}

/// Deletes every key of a test queue (queue, processing lists, heartbeats, dead letters).
pub async fn cleanup_queue(pool: &deadpool_redis::Pool, queue: &str) {
    let mut connection = redis_conn(pool).await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{queue}*")).query_async(&mut connection).await.unwrap_or_default();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut connection).await.unwrap_or_default();
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the recording handler answers, in order; once empty it answers `Ok`.
#[derive(Default)]
pub struct Script {
    pub answers: VecDeque<Result<(), HandleError>>,
}

/// Records every event and job it is given. Optionally holds each call until a permit of `gate`
/// is available (to keep messages in flight), and answers from `script`.
#[derive(Default)]
pub struct RecordingHandler {
    pub events: Mutex<Vec<PluginEvent>>,
    pub jobs: Mutex<Vec<Value>>,
    pub started: Mutex<Vec<String>>,
    pub gate: Option<Arc<Semaphore>>,
    pub script: Mutex<Script>,
}

impl RecordingHandler {
    pub fn new() -> Arc<RecordingHandler> {
        Arc::new(RecordingHandler::default())
    }

    pub fn gated(gate: Arc<Semaphore>) -> Arc<RecordingHandler> {
        Arc::new(RecordingHandler { gate: Some(gate), ..RecordingHandler::default() })
    }

    pub fn answering(answers: Vec<Result<(), HandleError>>) -> Arc<RecordingHandler> {
        Arc::new(RecordingHandler {
            script: Mutex::new(Script { answers: answers.into() }),
            ..RecordingHandler::default()
        })
    }

    pub fn events(&self) -> Vec<PluginEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn event_count(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    pub fn jobs(&self) -> Vec<Value> {
        self.jobs.lock().unwrap().clone()
    }

    async fn pass_gate(&self) {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate").forget();
        }
    }

    fn answer(&self) -> Result<(), HandleError> {
        self.script.lock().unwrap().answers.pop_front().unwrap_or(Ok(()))
    }
}

#[async_trait]
impl EventHandler for RecordingHandler {
    async fn handle_event(&self, event: PluginEvent) -> Result<(), HandleError> {
        self.started.lock().unwrap().push(event.distinct_id.clone());
        self.pass_gate().await;
        let answer = self.answer();
        if answer.is_ok() {
            self.events.lock().unwrap().push(event);
        }
        answer
    }

    async fn handle_plugin_job(&self, job: Value) -> Result<(), HandleError> {
        self.pass_gate().await;
        let answer = self.answer();
        if answer.is_ok() {
            self.jobs.lock().unwrap().push(job);
        }
        answer
    }
}

/// Records the event every attempt gets (as JSON), changes it as a real handler does (a property
/// added, the distinct id and uuid altered), and fails the first `failures(distinct id)` attempts
/// of each distinct id with a retryable error.
pub struct MutatingFlaky {
    attempts: Mutex<Vec<Value>>,
    failures: Box<dyn Fn(&str) -> usize + Send + Sync>,
}

impl MutatingFlaky {
    pub fn new(failures: impl Fn(&str) -> usize + Send + Sync + 'static) -> Arc<MutatingFlaky> {
        Arc::new(MutatingFlaky { attempts: Mutex::new(Vec::new()), failures: Box::new(failures) })
    }

    pub fn attempts(&self) -> Vec<Value> {
        self.attempts.lock().unwrap().clone()
    }
}

#[async_trait]
impl EventHandler for MutatingFlaky {
    async fn handle_event(&self, mut event: PluginEvent) -> Result<(), HandleError> {
        let original = event.distinct_id.clone();
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            attempts.push(serde_json::to_value(&event).unwrap());
            attempts.iter().filter(|seen| seen["distinct_id"] == original.as_str()).count()
        };
        event.properties.get_or_insert_with(Default::default).insert("touched".to_string(), Value::from(attempt));
        event.distinct_id.push_str("-changed");
        event.uuid = None;
        if attempt <= (self.failures)(&original) {
            return Err(HandleError::Retryable("database restarting".into()));
        }
        Ok(())
    }

    async fn handle_plugin_job(&self, _job: Value) -> Result<(), HandleError> {
        Ok(())
    }
}

/// Makes sure a broker listens on [`kafka_hosts`], starting it with `scripts/kafka` if not.
pub fn ensure_kafka() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if std::net::TcpStream::connect(kafka_hosts()).is_ok() {
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka");
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg("start")
            .env("KAFKA_PORT", kafka_port().to_string())
            .status()
            .expect("run scripts/kafka");
        assert!(status.success(), "scripts/kafka start failed");
    });
}

/// Creates topics (one partition each) on the test broker.
pub async fn create_topics(topics: &[&str], partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    ensure_kafka();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka_hosts()).create().expect("admin client");
    let new_topics: Vec<NewTopic> =
        topics.iter().map(|topic| NewTopic::new(topic, partitions, TopicReplication::Fixed(1))).collect();
    let results = admin.create_topics(&new_topics, &AdminOptions::new()).await.expect("create topics");
    for result in results {
        if let Err((topic, error)) = result {
            assert!(matches!(error, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists), "create {topic}: {error}");
        }
    }
}

/// A config for tests: Kafka on the test broker, given extra pairs.
pub fn test_config(pairs: &[(&str, &str)]) -> plugin_server::config::Config {
    let mut all = vec![("KAFKA_HOSTS", kafka_hosts()), ("KAFKA_ENABLED", "true")];
    all.extend_from_slice(pairs);
    plugin_server::config::Config::from_pairs(&all).expect("config")
}

/// Reads partition 0 of `topic` from the beginning (no consumer group) until `count` messages have
/// arrived or `timeout`.
pub async fn consume_topic(topic: &str, count: usize, timeout: Duration) -> Vec<(Option<Vec<u8>>, Option<Vec<u8>>)> {
    consume_topic_from(topic, rdkafka::Offset::Beginning, count, timeout).await
}

/// The offset the next message on partition 0 of `topic` will get: read a shared topic (such as
/// `clickhouse_events_proto`, which every Kafka-mode test and bench writes to) from here so the
/// reader does not have to wade through everything earlier runs left on it.
pub fn topic_end(topic: &str) -> rdkafka::Offset {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", unique("watermarks"))
        .create()
        .expect("watermark reader");
    match consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)) {
        Ok((_, high)) => rdkafka::Offset::Offset(high),
        // The topic does not exist yet: everything on it will be new.
        Err(_) => rdkafka::Offset::Beginning,
    }
}

/// A reader of partition 0 of `topic` from `start`, in no consumer group of its own making.
fn partition_reader(topic: &str, start: rdkafka::Offset) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::TopicPartitionList;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, start).expect("partition");
    consumer.assign(&partitions).expect("assign");
    consumer
}

/// Every message of partition 0 of `topic` from `start` up to the end the partition has when this
/// is called. Reading a shared topic (every test of the suite writes `clickhouse_events_proto`)
/// for a fixed time returned only a prefix when the broker was slow or the topic long, and the
/// events at its tail looked lost; this reads to the end instead, and gives up only when the
/// broker sends no message for [`IDLE`] (errors do not count as progress; then what it has is
/// returned).
pub async fn consume_topic_to_end(topic: &str, start: rdkafka::Offset) -> Vec<(Option<Vec<u8>>, Option<Vec<u8>>)> {
    use rdkafka::Message;
    const IDLE: Duration = Duration::from_secs(30);
    let rdkafka::Offset::Offset(end) = topic_end(topic) else { return Vec::new() };
    if matches!(start, rdkafka::Offset::Offset(start) if start >= end) || end == 0 {
        return Vec::new();
    }
    let consumer = partition_reader(topic, start);
    let mut messages = Vec::new();
    let mut idle_until = tokio::time::Instant::now() + IDLE;
    loop {
        match tokio::time::timeout_at(idle_until, consumer.recv()).await {
            Ok(Ok(message)) => {
                messages.push((message.key().map(<[u8]>::to_vec), message.payload().map(<[u8]>::to_vec)));
                if message.offset() + 1 >= end {
                    break;
                }
                idle_until = tokio::time::Instant::now() + IDLE;
            }
            Ok(Err(error)) => eprintln!("reading {topic}: {error}"),
            Err(_) => {
                eprintln!("reading {topic} to offset {end}: no message for {IDLE:?}, {} read", messages.len());
                break;
            }
        }
    }
    messages
}

/// Reads up to `count` messages of partition 0 of `topic` from `start`, for at most `timeout`.
pub async fn consume_topic_from(
    topic: &str,
    start: rdkafka::Offset,
    count: usize,
    timeout: Duration,
) -> Vec<(Option<Vec<u8>>, Option<Vec<u8>>)> {
    use rdkafka::Message;
    let consumer = partition_reader(topic, start);
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while messages.len() < count {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => {
                messages.push((message.key().map(<[u8]>::to_vec), message.payload().map(<[u8]>::to_vec)))
            }
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
    messages
}

/// Produces raw values to a topic and waits for delivery.
pub async fn produce(topic: &str, values: &[Vec<u8>]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_hosts()).create().expect("producer");
    for value in values {
        producer
            .send(FutureRecord::<(), [u8]>::to(topic).payload(value.as_slice()), Duration::from_secs(10))
            .await
            .map_err(|(error, _)| error)
            .expect("produce");
    }
}
