//! Celery consumer throughput: N `process_event_with_plugins` messages (the reference benchmark's
//! 3000 by default) pushed to a fresh Redis list, then consumed by the reliable consumer into a
//! counting handler (the pipeline is not wired here: `BENCH_HANDLER_MS` simulates its latency).
//! Prints events/s and peak RSS. Needs Redis on 127.0.0.1:6379 (`REDIS_URL` to override).
//!
//! Run: `cargo bench --bench e2e_celery` (env: BENCH_EVENTS, BENCH_HANDLER_MS, BENCH_CONCURRENCY).

mod e2e_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_support::*;
use plugin_server::sinks::celery_producer::encode_task_message;
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use plugin_server::sources::{CeleryConsumer, CeleryConsumerOptions};
use serde_json::{json, Map};

#[tokio::main]
async fn main() {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = format!("bench-celery-{}", uuid::Uuid::new_v4().simple());
    let pool = deadpool_redis::Config::from_url(&redis_url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("redis pool");
    let events = event_count();
    let mut pipe = redis::pipe();
    for index in 0..events {
        let now = chrono::Utc::now().to_rfc3339();
        let data = json!({"event": "$pageview", "distinct_id": format!("user-{}", index % 100), "timestamp": now,
            "properties": {"$current_url": "https://example.com/", "$browser": "Chrome", "index": index}});
        let args = [
            json!(format!("user-{}", index % 100)),
            json!("127.0.0.1"),
            json!("http://localhost"),
            data,
            json!(2),
            json!(now),
            json!(now),
        ];
        let task_id = uuid::Uuid::new_v4().to_string();
        pipe.cmd("LPUSH")
            .arg(&queue)
            .arg(encode_task_message(&queue, PROCESS_EVENT_TASK, &task_id, &args, &Map::new()))
            .ignore();
    }
    let mut connection = pool.get().await.expect("redis");
    pipe.query_async::<()>(&mut connection).await.expect("push");
    drop(connection);

    let handler = Arc::new(CountingHandler { latency: handler_latency(), ..CountingHandler::default() });
    let config =
        plugin_server::config::Config::from_pairs(&[("PLUGINS_CELERY_QUEUE", queue.as_str())]).expect("config");
    let options = CeleryConsumerOptions { concurrency: concurrency(), ..CeleryConsumerOptions::from_config(&config) };
    let started = Instant::now();
    let consumer = CeleryConsumer::start(&redis_url, pool.clone(), handler.clone(), options).await.expect("consumer");
    let done = handler.wait_for(events, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    consumer.stop().await;
    let mut connection = pool.get().await.expect("redis");
    let _: i64 = redis::cmd("DEL").arg(&queue).query_async(&mut connection).await.unwrap_or_default();
    assert!(done, "only {} of {events} events consumed", handler.events.load(std::sync::atomic::Ordering::Relaxed));
    report("Celery consumer", events, elapsed);
}
