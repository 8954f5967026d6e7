//! Poison-message detection for the Kafka consumer: how many times the handling of each consumed
//! message was started without finishing, kept in Redis so that it survives the process.
//!
//! A message that crashes the process (a panic, an abort, the OOM killer) is never committed past:
//! after each restart it is consumed again and crashes the server again. So before an event is
//! handled, its key `plugin-server:kafka-deliveries:<group>:<topic>:<partition>:<offset>` is
//! incremented (with a TTL of [`DELIVERY_KEY_TTL`]); once handled, the key is deleted (in batches).
//! A count above 1 means an earlier handling of this very message never finished: it is a suspect,
//! handled alone (no other event of this consumer in hand), so that the next crash can only be its
//! own; above `KAFKA_MAX_DELIVERY_ATTEMPTS` it goes to the dead-letter queue instead of being
//! handled. The reference has no such protection (its crash loops never end).
//!
//! Redis being unavailable never stops ingestion: the count is then unknown and the event handled
//! as a first delivery (logged).

use std::time::Duration;

use deadpool_redis::Pool;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tracing::warn;

use crate::infra::redis_call::RedisCallError;

/// How long a count survives: long enough for any restart loop, short enough that keys left by
/// crashes go away on their own.
pub const DELIVERY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Held while an event is handled: shared by first deliveries, exclusive for suspects.
pub enum HandlingGuard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
    /// Counting is off.
    None,
}

/// What to do with a consumed event.
pub enum Admission {
    /// Handle it (holding the guard while doing so). `suspect`: an earlier handling never finished.
    Handle { guard: HandlingGuard, suspect: bool },
    /// Its handling was started `attempts` times without finishing: dead-letter it.
    DeadLetter { attempts: u64 },
}

/// The counts of one consumer group.
pub struct DeliveryCounter {
    pool: Option<Pool>,
    prefix: String,
    max_attempts: u64,
    exclusive: std::sync::Arc<RwLock<()>>,
}

impl DeliveryCounter {
    /// `max_attempts` 0 (or no Redis) turns counting off.
    pub fn new(redis_url: Option<&str>, group: &str, max_attempts: u32) -> DeliveryCounter {
        let pool = match redis_url.filter(|_| max_attempts > 0) {
            Some(url) => match deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1))
            {
                Ok(pool) => Some(pool),
                Err(error) => {
                    warn!("⚠️ Kafka delivery counting is off: no Redis pool ({error})");
                    None
                }
            },
            None => None,
        };
        DeliveryCounter {
            pool,
            prefix: format!("plugin-server:kafka-deliveries:{group}"),
            max_attempts: u64::from(max_attempts),
            exclusive: std::sync::Arc::new(RwLock::new(())),
        }
    }

    pub fn key(&self, topic: &str, partition: i32, offset: i64) -> String {
        format!("{}:{topic}:{partition}:{offset}", self.prefix)
    }

    /// Counts a handling of the message at `key` and says whether to handle it. Waits for the
    /// shared guard first (so an event waiting behind a suspect is not counted while it waits);
    /// a suspect gives it back, uncounts itself, and waits for the exclusive guard before counting
    /// again.
    pub async fn admit(&self, key: &str) -> Admission {
        let Some(pool) = &self.pool else { return Admission::Handle { guard: HandlingGuard::None, suspect: false } };
        let shared = std::sync::Arc::clone(&self.exclusive).read_owned().await;
        let count = match self.incr(pool, key).await {
            Some(count) => count,
            None => return Admission::Handle { guard: HandlingGuard::Shared(shared), suspect: false },
        };
        if count <= 1 {
            return Admission::Handle { guard: HandlingGuard::Shared(shared), suspect: false };
        }
        drop(shared);
        self.run(pool, redis::cmd("DECR").arg(key)).await;
        let exclusive = std::sync::Arc::clone(&self.exclusive).write_owned().await;
        let count = self.incr(pool, key).await.unwrap_or(count);
        if count > self.max_attempts {
            return Admission::DeadLetter { attempts: count - 1 };
        }
        warn!(
            "🧪 Handling a Kafka message alone: its handling was started {} time(s) before without finishing",
            count - 1
        );
        Admission::Handle { guard: HandlingGuard::Exclusive(exclusive), suspect: true }
    }

    /// Forgets the counts of messages whose handling finished (or was abandoned on purpose).
    pub async fn forget(&self, keys: &[String]) {
        if let (Some(pool), false) = (&self.pool, keys.is_empty()) {
            self.run(pool, redis::cmd("DEL").arg(keys)).await;
        }
    }

    pub fn enabled(&self) -> bool {
        self.pool.is_some()
    }

    async fn incr(&self, pool: &Pool, key: &str) -> Option<u64> {
        let mut pipe = redis::pipe();
        pipe.atomic().incr(key, 1).expire(key, DELIVERY_KEY_TTL.as_secs() as i64).ignore();
        let result: Result<(u64,), RedisCallError> = async {
            let mut connection = pool.get().await?;
            Ok(pipe.query_async(&mut connection).await?)
        }
        .await;
        match result {
            Ok((count,)) => Some(count),
            Err(error) => {
                warn!("⚠️ Could not count a Kafka delivery in Redis ({error}); handling it as a first delivery");
                None
            }
        }
    }

    async fn run(&self, pool: &Pool, command: &mut redis::Cmd) {
        let result: Result<(), RedisCallError> = async {
            let mut connection = pool.get().await?;
            Ok(command.query_async::<()>(&mut connection).await?)
        }
        .await;
        if let Err(error) = result {
            warn!("⚠️ Kafka delivery count update failed: {error}");
        }
    }
}
