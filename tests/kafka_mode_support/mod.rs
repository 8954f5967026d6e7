//! What the Kafka-mode tests share: the server in process on a fresh input topic of one partition,
//! with the settings every such test starts from, and a raw event as PostHog's capture endpoint
//! produces it for `events_plugin_ingestion`. Needs `mod common;` and `mod queues_support;` beside it.

#![allow(dead_code)]

use std::time::Duration;

use plugin_server::server::ServerError;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::TestDb;
use crate::queues_support::{create_topics, ensure_kafka, kafka_hosts, unique};

/// A Kafka-mode server running in this process.
pub struct KafkaModeServer {
    /// The topic it consumes (`KAFKA_CONSUMPTION_TOPIC`).
    pub topic: String,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), ServerError>>,
}

impl KafkaModeServer {
    /// Starts a server on `db` consuming a new topic named after `prefix`: Kafka on the test
    /// broker, 2 worker threads, flushes every 100 ms; `extra` settings win over these.
    pub async fn start(db: &TestDb, prefix: &str, extra: &[(&str, &str)]) -> KafkaModeServer {
        ensure_kafka();
        let topic = unique(&format!("{prefix}-in"));
        create_topics(&[&topic], 1).await;
        let queue = crate::common::unique_prefix(&format!("{prefix}-celery"));
        let mut pairs = vec![
            ("KAFKA_ENABLED", "true"),
            ("KAFKA_HOSTS", kafka_hosts()),
            ("KAFKA_CONSUMPTION_TOPIC", topic.as_str()),
            ("PLUGINS_CELERY_QUEUE", queue.as_str()),
            ("WORKER_CONCURRENCY", "2"),
            ("KAFKA_FLUSH_FREQUENCY_MS", "100"),
        ];
        pairs.extend_from_slice(extra);
        let config = db.config(&pairs);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
        KafkaModeServer { topic, shutdown, server }
    }

    pub fn is_running(&self) -> bool {
        !self.server.is_finished()
    }

    /// Shuts it down and checks that it stopped cleanly, within 40 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(40), self.server).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "server stopped cleanly: {result:?}");
    }
}

/// A raw event (the capture endpoint's message): sent at 11:59:59 with the server's clock at
/// 12:00:00 (a skew of 1 s), from 10.1.2.3 on https://example.com.
pub fn raw_event(distinct_id: &str, uuid: &str, event: &str, properties: Value) -> Vec<u8> {
    let data = json!({"event": event, "properties": properties, "distinct_id": distinct_id,
        "timestamp": "2021-10-28T11:59:57.792Z"});
    json!({"distinct_id": distinct_id, "ip": "10.1.2.3", "site_url": "https://example.com", "team_id": crate::common::TEAM_ID,
        "uuid": uuid, "data": data.to_string(), "now": "2021-10-28T12:00:00Z", "sent_at": "2021-10-28T11:59:59Z"})
    .to_string()
    .into_bytes()
}

/// Whether `needle` is in `haystack`, byte for byte.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
}
