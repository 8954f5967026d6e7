//! Redis commands of many concurrent handlers over one multiplexed connection: each caller's
//! commands go out as one pipeline at once, replies are matched to callers by the connection (no
//! per-command connection checkout, no waiting for a batch), and every reply must arrive within a
//! response timeout, after which the connection is presumed half-open and replaced. Used by the
//! Celery consumer (delivery counts, acknowledgements) and its write markers, so that the time
//! between an event's write and its marker is one round trip.
//!
//! The commands of one caller run in order and are not interleaved with another caller's (one
//! pipeline is written at once), but they are not a transaction: Redis executes everything sent
//! even if this process dies.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use tokio::sync::Mutex;

use super::redis_call::{within, RedisCallError};

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

/// One multiplexed, self-replacing connection; see the module documentation.
pub struct PipelinedRedis {
    client: redis::Client,
    response_timeout: Duration,
    connection: Mutex<Option<ConnectionManager>>,
}

impl PipelinedRedis {
    pub fn new(client: redis::Client, response_timeout: Duration) -> PipelinedRedis {
        PipelinedRedis { client, response_timeout, connection: Mutex::new(None) }
    }

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

    /// Runs `commands` as one pipeline: one reply per command.
    pub async fn query(&self, commands: Vec<redis::Cmd>) -> Result<Vec<Value>, RedisCallError> {
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.add_command(command);
        }
        let mut connection = self.connection().await?;
        let reply = within(self.response_timeout, pipe.query_async::<Vec<Value>>(&mut connection)).await;
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
        reply
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
