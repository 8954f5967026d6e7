//! The job queue consumer: consumes the job queues only on the server holding the Redis lock
//! `plugin-server:locks:job-queue-consumer` (after `REDIS_LOCK_PREFIX`; TTL `SCHEDULE_LOCK_TTL`), so a job is fetched by one
//! server of the cluster. Lock won → start consuming; lock lost or shutdown → stop.
//!
//! A consumer that cannot start is logged (`Can not start job queue consumer!`); with
//! `CRASH_IF_NO_PERSISTENT_JOB_QUEUE` the component ends instead, which stops the server, as the
//! reference kills its process.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;
use crate::infra::redlock::{lock_key, Redlock, JOB_QUEUE_CONSUMER_LOCK};
use crate::jobs::manager::JobQueueManager;
use crate::jobs::queue::JobRunner;
use crate::metrics::sentry::capture_error_message;

/// The consumer's lock and failure policy; [`JobConsumerSettings::from_config`] is production.
#[derive(Debug, Clone)]
pub struct JobConsumerSettings {
    /// `REDIS_LOCK_PREFIX` + `plugin-server:locks:job-queue-consumer`.
    pub lock_resource: String,
    /// `SCHEDULE_LOCK_TTL`.
    pub lock_ttl: Duration,
    /// `CRASH_IF_NO_PERSISTENT_JOB_QUEUE`.
    pub crash_if_no_persistent_job_queue: bool,
}

impl JobConsumerSettings {
    pub fn from_config(config: &Config) -> JobConsumerSettings {
        JobConsumerSettings {
            lock_resource: lock_key(config, JOB_QUEUE_CONSUMER_LOCK),
            lock_ttl: Duration::from_secs_f64(config.SCHEDULE_LOCK_TTL),
            crash_if_no_persistent_job_queue: config.CRASH_IF_NO_PERSISTENT_JOB_QUEUE,
        }
    }
}

/// Runs until `shutdown` (or, with `crash_if_no_persistent_job_queue`, until a consumer fails to
/// start).
pub async fn run_job_queue_consumer(
    manager: Arc<JobQueueManager>,
    runner: Arc<dyn JobRunner>,
    redis: redis::Client,
    settings: JobConsumerSettings,
    shutdown: CancellationToken,
) {
    info!("🔄 Starting job queue consumer, trying to get lock...");
    let lock_shutdown = CancellationToken::new();
    let (mut lock, lock_task) =
        Redlock::new(settings.lock_resource.clone(), settings.lock_ttl).spawn(redis, lock_shutdown.clone());
    let mut consuming = false;
    // After a failed start, try again every TTL while we still hold the lock (the reference
    // only tried again after losing and winning the lock).
    let mut start_failed = false;
    loop {
        let retry = async {
            if start_failed && !consuming {
                tokio::time::sleep(settings.lock_ttl).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let held = tokio::select! {
            _ = shutdown.cancelled() => break,
            held = lock.changed() => held,
            _ = retry => Some(lock.held()),
        };
        match held {
            Some(true) if !consuming => {
                info!("🔄 Job queue consumer lock acquired");
                match manager.start_consumer(Arc::clone(&runner)).await {
                    Ok(()) => {
                        consuming = true;
                        start_failed = false;
                    }
                    Err(start_error) => {
                        start_failed = true;
                        error!("🔴 Can not start job queue consumer! {start_error}");
                        capture_error_message(&format!("Can not start job queue consumer! {start_error}"));
                        manager.stop_consumer().await;
                        if settings.crash_if_no_persistent_job_queue {
                            break;
                        }
                    }
                }
            }
            Some(false) => {
                start_failed = false;
                if consuming {
                    info!("🔄 Stopping job queue consumer");
                    manager.stop_consumer().await;
                    consuming = false;
                }
            }
            Some(true) => {}
            None => break,
        }
    }
    if consuming {
        info!("🔄 Stopping job queue consumer");
        manager.stop_consumer().await;
    }
    lock_shutdown.cancel();
    let _ = lock_task.await;
}
