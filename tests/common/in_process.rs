//! The whole server in this test's process (`server::run`) on a test database, with a Celery
//! producer for its queue, and a clean stop.

use std::time::Duration;

use plugin_server::config::Config;
use plugin_server::sinks::CeleryProducer;
use tokio_util::sync::CancellationToken;

use super::TestDb;

/// A running in-process server and a producer of Celery tasks for its `PLUGINS_CELERY_QUEUE`.
pub struct InProcessServer {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), plugin_server::server::ServerError>>,
    pub producer: CeleryProducer,
}

/// `db`'s configuration for a server on Celery queues of its own (named after `queue_prefix`),
/// 2 worker threads, warnings logged; `extra` settings win over these.
pub fn celery_config(db: &TestDb, queue_prefix: &str, extra: &[(&str, &str)]) -> Config {
    let queue = super::unique_prefix(queue_prefix);
    let default_queue = format!("{queue}-default");
    let mut settings = vec![
        ("WORKER_CONCURRENCY", "2"),
        ("PLUGINS_CELERY_QUEUE", queue.as_str()),
        ("CELERY_DEFAULT_QUEUE", default_queue.as_str()),
        ("LOG_LEVEL", "warn"),
    ];
    settings.extend_from_slice(extra);
    db.config(&settings)
}

impl InProcessServer {
    pub fn start(config: Config) -> InProcessServer {
        let redis = deadpool_redis::Config::from_url(config.REDIS_URL.clone())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap();
        let producer = CeleryProducer::new(redis, config.PLUGINS_CELERY_QUEUE.clone());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
        InProcessServer { shutdown, handle, producer }
    }

    /// Stops the server and checks that it ended cleanly within 30 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "server stopped cleanly: {result:?}");
    }
}
