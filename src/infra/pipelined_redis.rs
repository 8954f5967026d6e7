//! Redis commands of many concurrent handlers over one multiplexed connection: each caller's
//! commands go out as one pipeline, replies are matched to callers, and every reply must arrive
//! within a response timeout, after which the connection is presumed half-open and replaced. Used
//! by the Celery consumer (delivery counts, acknowledgements) and its write markers, so that the
//! time between an event's write and its marker is one round trip (two when another is out).
//!
//! The callers' pipelines are themselves batched ([`crate::infra::batch`]): whatever callers ask
//! while a round trip is out goes in the next one, as one write. Left to the connection, each
//! caller's few commands went out in their own socket write and came back in their own read
//! (2.1 writes and 1.7 reads per event on the server, 0.8 of each on Redis, under the side-by-side
//! kit's backlog), and on loopback each of those costs a pass through both ends' TCP stacks.
//!
//! The commands of one caller run in order and are not interleaved with another caller's, and
//! callers' commands run in the order they asked; but they are not a transaction: Redis executes
//! everything sent even if this process dies. An error reply to one caller's command fails that
//! caller only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use tokio::sync::Mutex;

use super::batch::{Batcher, Unanswered};
use super::redis_call::{within, RedisCallError};

/// Most callers whose commands share one round trip.
const MAX_CALLERS_PER_ROUND_TRIP: usize = 256;

/// What [`PipelinedRedis::count_delivery_below`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryCount {
    /// Counted: this is the count now.
    Counted(u64),
    /// At or above the limit already (this many): not counted.
    AtLeast(u64),
}

/// A first delivery: one `SET NX` with the TTL (`ARGV[2]`). Otherwise `GET`, then `INCR` and
/// `EXPIRE` below the limit (`ARGV[1]`); a count at or above it comes back negative, uncounted.
const COUNT_BELOW_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], 1, 'EX', ARGV[2], 'NX') then return 1 end
local previous = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if previous >= tonumber(ARGV[1]) then return -previous end
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
"#;

/// The SHA-1 of [`COUNT_BELOW_SCRIPT`], for `EVALSHA`.
static COUNT_BELOW_SHA: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| redis::Script::new(COUNT_BELOW_SCRIPT).get_hash().to_string());

/// One multiplexed, self-replacing connection and the batching of its callers; see the module
/// documentation.
pub struct PipelinedRedis {
    link: Arc<Link>,
    callers: Batcher<Vec<redis::Cmd>, Result<Vec<Value>, RedisCallError>>,
}

/// The connection, shared with the batching task.
struct Link {
    client: redis::Client,
    response_timeout: Duration,
    connection: Mutex<Option<ConnectionManager>>,
    round_trips: AtomicU64,
}

impl PipelinedRedis {
    pub fn new(client: redis::Client, response_timeout: Duration) -> PipelinedRedis {
        let link =
            Arc::new(Link { client, response_timeout, connection: Mutex::new(None), round_trips: AtomicU64::new(0) });
        let callers = Batcher::new(MAX_CALLERS_PER_ROUND_TRIP, {
            let link = Arc::clone(&link);
            move |callers: Vec<Vec<redis::Cmd>>| {
                let link = Arc::clone(&link);
                async move { link.round_trip(callers).await }
            }
        });
        PipelinedRedis { link, callers }
    }

    /// Round trips made so far (each carrying the commands of one or more callers).
    pub fn round_trips(&self) -> u64 {
        self.link.round_trips.load(Ordering::Relaxed)
    }

    /// Runs `commands` as one pipeline: one reply per command, or the first error reply among
    /// them (as a pipeline's `query_async`).
    pub async fn query(&self, commands: Vec<redis::Cmd>) -> Result<Vec<Value>, RedisCallError> {
        match self.callers.submit(commands).await {
            Ok(reply) => reply,
            // The batching task is gone (the runtime is shutting down): on its own.
            Err(Unanswered::NotTaken(commands)) => {
                self.link.round_trip(vec![commands]).await.pop().unwrap_or_else(|| Err(lost().into()))
            }
            Err(Unanswered::Lost) => Err(lost().into()),
        }
    }

    /// Runs `commands`, discarding the replies.
    pub async fn run(&self, commands: Vec<redis::Cmd>) -> Result<(), RedisCallError> {
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

    /// In one round trip: the count at `key` if it is `limit` or more (not counted), else that
    /// count plus one, kept `ttl_seconds`. When Redis cannot be asked: counted, once.
    pub async fn count_delivery_below(&self, key: &str, limit: u64, ttl_seconds: u64) -> DeliveryCount {
        // By its hash (Redis then neither receives nor hashes the script's text per message); the
        // text only when this Redis has not seen it yet (a restart, `SCRIPT FLUSH`).
        let invoke =
            |verb: &str, script: &str| redis::cmd(verb).arg(script).arg(1).arg(key).arg(limit).arg(ttl_seconds).clone();
        let mut reply = self.query(vec![invoke("EVALSHA", COUNT_BELOW_SHA.as_str())]).await;
        if matches!(&reply, Err(RedisCallError::Redis(error)) if error.kind() == redis::ErrorKind::NoScriptError) {
            reply = self.query(vec![invoke("EVAL", COUNT_BELOW_SCRIPT)]).await;
        }
        match reply.as_deref() {
            Ok([Value::Int(count)]) if *count < 0 => DeliveryCount::AtLeast(count.unsigned_abs()),
            Ok([Value::Int(count)]) => DeliveryCount::Counted((*count).max(1) as u64),
            Ok(_) => DeliveryCount::Counted(1),
            Err(reason) => {
                tracing::warn!("⚠️ Could not count the delivery of a Celery message: {reason}");
                DeliveryCount::Counted(1)
            }
        }
    }

    /// `GET key` as text; `None` when absent or when Redis cannot be asked.
    pub async fn get(&self, key: &str) -> Option<String> {
        match self.query(vec![redis::cmd("GET").arg(key).clone()]).await.as_deref() {
            Ok([Value::BulkString(bytes)]) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        }
    }
}

/// A round trip that ended without an answer for a caller: as a connection lost mid-call.
fn lost() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other("a pipelined Redis round trip ended without an answer"))
}

/// `error` again, for each caller of the same round trip (a `RedisError` cannot be cloned): the
/// same kind, and still an I/O error, a timeout or a dropped connection if it was one.
fn replicate(error: &RedisCallError) -> RedisCallError {
    let error = match error {
        RedisCallError::Redis(error) => error,
        RedisCallError::Timeout(limit) => return RedisCallError::Timeout(*limit),
        RedisCallError::Pool(error) => return redis::RedisError::from(std::io::Error::other(error.to_string())).into(),
    };
    let again = if error.is_timeout() {
        redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, error.to_string()))
    } else if error.is_io_error() || error.is_connection_dropped() {
        redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, error.to_string()))
    } else {
        redis::RedisError::from((error.kind(), "Redis pipeline failed", error.to_string()))
    };
    again.into()
}

impl Link {
    async fn connection(&self) -> Result<ConnectionManager, RedisCallError> {
        let mut current = self.connection.lock().await;
        if let Some(connection) = current.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.response_timeout)
            .set_response_timeout(self.response_timeout)
            .set_number_of_retries(1);
        let connection =
            within(self.response_timeout * 2, ConnectionManager::new_with_config(self.client.clone(), config)).await?;
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// The commands of `callers` as one pipeline, in order; each caller's replies, or the first
    /// error reply among them, or the round trip's own failure.
    async fn round_trip(&self, callers: Vec<Vec<redis::Cmd>>) -> Vec<Result<Vec<Value>, RedisCallError>> {
        let mut pipe = redis::pipe();
        let mut counts = Vec::with_capacity(callers.len());
        for commands in callers {
            counts.push(commands.len());
            for command in commands {
                pipe.add_command(command);
            }
        }
        let total: usize = counts.iter().sum();
        if total == 0 {
            return counts.iter().map(|_| Ok(Vec::new())).collect();
        }
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let reply = match self.connection().await {
            // Error replies stay values here, so that one caller's does not fail the others.
            Ok(mut connection) => within(self.response_timeout, connection.req_packed_commands(&pipe, 0, total)).await,
            Err(error) => Err(error),
        };
        let broken = match &reply {
            Err(RedisCallError::Redis(error)) => {
                error.is_io_error() || error.is_connection_dropped() || error.is_timeout()
            }
            // Half-open: the next caller gets a fresh connection.
            Err(RedisCallError::Timeout(_)) => true,
            _ => false,
        };
        if broken {
            self.connection.lock().await.take();
        }
        let failure = match reply {
            Ok(values) if values.len() == total => {
                let mut values = values.into_iter();
                return counts
                    .into_iter()
                    .map(|count| {
                        let own: Vec<Value> = values.by_ref().take(count).collect();
                        Value::extract_error(Value::Array(own))
                            .map(|value| match value {
                                Value::Array(own) => own,
                                other => vec![other],
                            })
                            .map_err(RedisCallError::from)
                    })
                    .collect();
            }
            Ok(values) => RedisCallError::Redis(redis::RedisError::from((
                redis::ErrorKind::ParseError,
                "unexpected replies",
                format!("{} replies to {total} pipelined Redis commands", values.len()),
            ))),
            Err(error) => error,
        };
        counts.iter().map(|_| Err(replicate(&failure))).collect()
    }
}
