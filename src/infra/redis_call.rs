//! Owns: the typed error of a Redis call made on the server's own behalf (consumers, delivery
//! counts, pipelined commands, the health ping) and [`within`], the bounded wait those calls
//! share: a reply that does not come in time is an error like any other, so a half-open socket
//! never hangs its caller.

use std::future::Future;
use std::time::Duration;

use thiserror::Error;

/// Why a Redis call failed.
#[derive(Debug, Error)]
pub enum RedisCallError {
    /// No connection could be taken from the pool.
    #[error("no Redis connection: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// Redis (or the connection to it) answered with an error.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// No answer within the deadline.
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
}

/// Runs `call`, failing with [`RedisCallError::Timeout`] when it takes longer than `limit`.
pub async fn within<T, E, F>(limit: Duration, call: F) -> Result<T, RedisCallError>
where
    F: Future<Output = Result<T, E>>,
    E: Into<RedisCallError>,
{
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(RedisCallError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_late_reply_is_a_timeout_error() {
        let late = within(Duration::from_millis(10), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, redis::RedisError>(())
        })
        .await;
        assert!(matches!(late, Err(RedisCallError::Timeout(limit)) if limit == Duration::from_millis(10)));
        let refused = within(Duration::from_secs(1), async {
            Err::<(), _>(redis::RedisError::from((redis::ErrorKind::ResponseError, "refused")))
        })
        .await;
        assert!(matches!(refused, Err(RedisCallError::Redis(_))));
    }
}
