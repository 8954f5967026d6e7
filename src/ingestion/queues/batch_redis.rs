//! Redis commands of many concurrent handlers sent together: each caller submits its commands and
//! waits for their replies; one task sends everything waiting as one pipeline (one round trip),
//! bounded by a response timeout so a half-open connection cannot hang the callers. Used by the
//! Celery consumer (delivery counts, write markers, acknowledgements) so that hundreds of
//! messages in flight cost a few round trips instead of one each.
//!
//! The commands of one caller run in order and are not interleaved with another caller's, but a
//! batch is not a transaction: Redis executes everything sent even if this process dies.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;
use redis::Value;

use crate::ingestion::batch::Batcher;

/// Most callers served by one pipeline.
const MAX_BATCH: usize = 256;

/// Submits pipelines of commands; see the module documentation.
#[derive(Clone)]
pub struct RedisBatcher {
    batcher: Arc<Batcher<Vec<redis::Cmd>, Result<Vec<Value>, String>>>,
}

impl RedisBatcher {
    pub fn new(pool: Pool, response_timeout: Duration) -> RedisBatcher {
        let batcher = Batcher::new(MAX_BATCH, move |batches: Vec<Vec<redis::Cmd>>| {
            let pool = pool.clone();
            async move { run_batch(&pool, response_timeout, batches).await }
        });
        RedisBatcher { batcher: Arc::new(batcher) }
    }

    /// Runs `commands` within the next batch: one reply per command.
    pub async fn query(&self, commands: Vec<redis::Cmd>) -> Result<Vec<Value>, String> {
        self.batcher.submit(commands).await.unwrap_or_else(|| Err("the Redis batching task is gone".to_string()))
    }

    /// Runs `commands`, discarding the replies.
    pub async fn run(&self, commands: Vec<redis::Cmd>) -> Result<(), String> {
        self.query(commands).await.map(|_| ())
    }

    /// `INCR key` (and `EXPIRE key ttl`): this delivery's number. When Redis cannot be asked the
    /// answer is 1 (handling goes on; only the poison count is lost for this delivery).
    pub async fn count_delivery(&self, key: &str, ttl_seconds: u64) -> u64 {
        let commands =
            vec![redis::cmd("INCR").arg(key).clone(), redis::cmd("EXPIRE").arg(key).arg(ttl_seconds).clone()];
        match self.query(commands).await {
            Ok(values) => match values.first() {
                Some(Value::Int(count)) => (*count).max(1) as u64,
                _ => 1,
            },
            Err(reason) => {
                tracing::warn!("⚠️ Could not count the delivery of a Celery message: {reason}");
                1
            }
        }
    }

    /// `GET key` as a count (0 when absent or when Redis cannot be asked).
    pub async fn delivery_count(&self, key: &str) -> u64 {
        match self.query(vec![redis::cmd("GET").arg(key).clone()]).await.as_deref() {
            Ok([Value::BulkString(bytes)]) => {
                std::str::from_utf8(bytes).ok().and_then(|text| text.parse().ok()).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// `EXISTS key`; `false` when Redis cannot be asked.
    pub async fn exists(&self, key: &str) -> bool {
        matches!(self.query(vec![redis::cmd("EXISTS").arg(key).clone()]).await.as_deref(), Ok([Value::Int(1)]))
    }
}

/// One pipeline for the whole batch; when it fails on a reply error (not a connection problem),
/// each caller's commands are sent alone so that one bad command fails only its caller.
async fn run_batch(pool: &Pool, timeout: Duration, batches: Vec<Vec<redis::Cmd>>) -> Vec<Result<Vec<Value>, String>> {
    let pipeline_of = |commands: &[redis::Cmd]| {
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.add_command(command.clone());
        }
        pipe
    };
    let combined = pipeline_of(&batches.concat());
    match query(pool, timeout, &combined).await {
        Ok(values) => {
            let mut values = values.into_iter();
            batches.iter().map(|commands| Ok(values.by_ref().take(commands.len()).collect())).collect()
        }
        Err(QueryError::Connection(reason)) => batches.iter().map(|_| Err(reason.clone())).collect(),
        Err(QueryError::Reply(_)) if batches.len() > 1 => {
            let mut results = Vec::with_capacity(batches.len());
            for commands in &batches {
                results.push(query(pool, timeout, &pipeline_of(commands)).await.map_err(QueryError::into_text));
            }
            results
        }
        Err(error) => vec![Err(error.into_text())],
    }
}

enum QueryError {
    Connection(String),
    Reply(String),
}

impl QueryError {
    fn into_text(self) -> String {
        match self {
            QueryError::Connection(text) | QueryError::Reply(text) => text,
        }
    }
}

async fn query(pool: &Pool, timeout: Duration, pipe: &redis::Pipeline) -> Result<Vec<Value>, QueryError> {
    let work = async {
        let mut connection = pool.get().await.map_err(|error| QueryError::Connection(error.to_string()))?;
        pipe.query_async::<Vec<Value>>(&mut connection).await.map_err(|error| {
            if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
                QueryError::Connection(error.to_string())
            } else {
                QueryError::Reply(error.to_string())
            }
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(QueryError::Connection(format!("no answer from Redis within {timeout:?}"))))
}
