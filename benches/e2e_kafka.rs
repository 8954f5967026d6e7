//! Kafka consumer throughput: N raw event messages (3000 by default) produced to a fresh topic,
//! then consumed by the ingestion consumer group into a counting handler (`BENCH_HANDLER_MS`
//! simulates the pipeline), offsets stored per sub-batch after the producer flush as in
//! production. Prints events/s and peak RSS. Needs a broker (`scripts/kafka start`; `KAFKA_HOSTS`
//! to override 127.0.0.1:9092).
//!
//! Run: `cargo bench --bench e2e_kafka` (env: BENCH_EVENTS, BENCH_HANDLER_MS, BENCH_CONCURRENCY).

mod e2e_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_support::*;
use plugin_server::sinks::messages::raw_event_record;
use plugin_server::sinks::KafkaProducerWrapper;
use plugin_server::sources::{KafkaConsumerOptions, KafkaQueue};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::json;

#[tokio::main]
async fn main() {
    let hosts = std::env::var("KAFKA_HOSTS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let topic = format!("bench-kafka-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &hosts).create().expect("admin");
    admin
        .create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("create topic");
    let concurrency = concurrency().to_string();
    let config = plugin_server::config::Config::from_pairs(&[
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_HOSTS", hosts.as_str()),
        ("KAFKA_CONSUMPTION_TOPIC", topic.as_str()),
        ("KAFKA_PRODUCER_MAX_QUEUE_SIZE", "1000"),
        ("WORKER_CONCURRENCY", "1"),
        ("TASKS_PER_WORKER", concurrency.as_str()),
    ])
    .expect("config");
    let producer = KafkaProducerWrapper::connect(&config, "bench").expect("producer");
    let events = event_count();
    for index in 0..events {
        let data = json!({"distinct_id": format!("user-{}", index % 100), "event": "$pageview", "timestamp": chrono::Utc::now().to_rfc3339(),
            "properties": {"$current_url": "https://example.com/", "index": index}, "team_id": 2, "uuid": uuid::Uuid::new_v4().to_string()});
        producer.queue_message(raw_event_record(&topic, data.as_object().expect("object"), 2)).await.expect("queue");
    }
    producer.flush().await.expect("produce");

    let handler = Arc::new(CountingHandler { latency: handler_latency(), ..CountingHandler::default() });
    let options = KafkaConsumerOptions {
        group_id: format!("bench-{}", uuid::Uuid::new_v4().simple()),
        offset_reset: "earliest".into(),
        ..KafkaConsumerOptions::from_config(&config, &uuid::Uuid::new_v4())
    };
    let queue = KafkaQueue::start(&config, options, handler.clone(), producer.clone()).await.expect("consumer");
    let started = Instant::now();
    let done = handler.wait_for(events, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    queue.stop().await;
    assert!(done, "only {} of {events} events consumed", handler.events.load(std::sync::atomic::Ordering::Relaxed));
    report("Kafka consumer", events, elapsed);
}
