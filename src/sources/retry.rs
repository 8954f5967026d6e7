//! How the consumers retry a handler that failed with [`HandleError::Retryable`]: exponential
//! back-off, a bounded number of attempts, and a stop when the consumer shuts down. Shared by the
//! Celery and Kafka consumers so both treat a failing pipeline the same way.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{HandleError, QueueStats};

/// Back-off schedule for retryable handler errors.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in total (the first included). After the last, the error counts as a rejection.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Ten attempts over about three and a half minutes: rides out a database restart without
    /// holding a message forever.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The end of a handling with retries.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Handled,
    /// Rejected, or still failing after the last attempt: dead-letter it with this reason.
    Failed(String),
    /// Shutdown came while waiting to retry: the message must stay in (or go back to) the queue.
    Interrupted,
}

impl RetryPolicy {
    /// `INGESTION_RETRY_ATTEMPTS` attempts, the first wait `INGESTION_RETRY_BACKOFF_MS`, at most
    /// 30 s between two.
    pub fn from_config(config: &crate::config::Config) -> RetryPolicy {
        let default = RetryPolicy::default();
        RetryPolicy {
            max_attempts: config.INGESTION_RETRY_ATTEMPTS.max(1),
            initial_backoff: Duration::from_millis(config.INGESTION_RETRY_BACKOFF_MS),
            ..default
        }
    }

    /// Runs `attempt` until it succeeds, is rejected, runs out of attempts or `stop` is cancelled.
    pub async fn run<F, Fut>(&self, what: &str, stop: &CancellationToken, stats: &QueueStats, mut attempt: F) -> Outcome
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), HandleError>>,
    {
        let mut backoff = self.initial_backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(()) => return Outcome::Handled,
                Err(HandleError::Rejected(reason)) => return Outcome::Failed(reason.to_string()),
                Err(HandleError::Retryable(reason)) if attempts >= self.max_attempts.max(1) => {
                    return Outcome::Failed(format!("{reason} (gave up after {attempts} attempts)"))
                }
                Err(HandleError::Retryable(reason)) => {
                    QueueStats::bump(&stats.retries);
                    warn!("🔁 {what} failed ({reason}); retrying in {backoff:?} (attempt {attempts})");
                    tokio::select! {
                        _ = stop.cancelled() => return Outcome::Interrupted,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }
}
