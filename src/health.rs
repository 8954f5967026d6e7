//! The health ping: the running server writes `@posthog-plugin-server/ping` (ISO timestamp, 60 s
//! expiry) and `@posthog-plugin-server/version` every 5 s, exactly as the reference does, and
//! `plugin-server --healthcheck` (any other process) reads the ping key.
//!
//! Unlike the reference, the healthcheck never hangs on an unreachable Redis (it answers 1 within
//! [`HEALTHCHECK_TIMEOUT`]) and a gracefully stopped server deletes its ping so that a probe sees it
//! gone at once instead of for up to a minute. While any component of the server is dead
//! ([`Liveness`]), the ping is not written and its key is deleted: a server that stopped
//! consuming never looks healthy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool as RedisPool;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hub::redis_client;
use crate::infra::redis_call::RedisCallError;

pub const PING_KEY: &str = "@posthog-plugin-server/ping";
pub const VERSION_KEY: &str = "@posthog-plugin-server/version";
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
pub const PING_TTL_SECONDS: u64 = 60;
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What `--healthcheck` found.
#[derive(Debug, PartialEq, Eq)]
pub enum HealthStatus {
    /// The ping key exists, with this value.
    Alive(String),
    /// The key is missing or empty.
    Offline,
    /// Redis could not be asked (unreachable, timed out, bad URL).
    Unreachable(String),
}

impl HealthStatus {
    pub fn exit_code(&self) -> i32 {
        match self {
            HealthStatus::Alive(_) => 0,
            _ => 1,
        }
    }
}

/// `--healthcheck`: `GET` the ping key, bounded by [`HEALTHCHECK_TIMEOUT`].
pub async fn healthcheck(config: &Config) -> HealthStatus {
    let client = match redis_client(config) {
        Ok(client) => client,
        Err(error) => return HealthStatus::Unreachable(error.to_string()),
    };
    let lookup = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        connection.get::<_, Option<String>>(PING_KEY).await
    };
    match tokio::time::timeout(HEALTHCHECK_TIMEOUT, lookup).await {
        Ok(Ok(Some(value))) if !value.is_empty() => HealthStatus::Alive(value),
        Ok(Ok(_)) => HealthStatus::Offline,
        Ok(Err(error)) => HealthStatus::Unreachable(error.to_string()),
        Err(_) => HealthStatus::Unreachable(format!("no answer from Redis within {HEALTHCHECK_TIMEOUT:?}")),
    }
}

/// Writes the ping and version keys once.
pub async fn write_ping(redis: &RedisPool) -> Result<(), RedisCallError> {
    crate::metrics::catalog::instrument_query(crate::metrics::catalog::statsd::REDIS_SET, None, async {
        let mut connection = redis.get().await?;
        redis::pipe()
            .set_ex(PING_KEY, crate::js::iso_now(), PING_TTL_SECONDS)
            .ignore()
            .set(VERSION_KEY, crate::VERSION)
            .ignore()
            .query_async::<()>(&mut connection)
            .await?;
        Ok(())
    })
    .await
}

/// Whether every component of the running server is alive, and whether it is consuming; shared
/// by the lifecycle (which marks a component dead when it ends on its own, and the server ready
/// once every component started), the ping (which stops once a component died) and the HTTP
/// endpoints (`/_health`, `/_ready`).
#[derive(Clone, Default)]
pub struct Liveness {
    dead: Arc<AtomicBool>,
    /// The components that died, in the order they did.
    dead_components: Arc<std::sync::Mutex<Vec<String>>>,
    ready: Arc<AtomicBool>,
    changed: Arc<tokio::sync::Notify>,
}

impl Liveness {
    pub fn mark_dead(&self, component: &str) {
        tracing::error!("💀 Component {component} is dead: the health ping stops");
        if let Ok(mut dead) = self.dead_components.lock() {
            dead.push(component.to_string());
        }
        self.dead.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }

    /// The components that died (empty while every one is alive).
    pub fn dead_components(&self) -> Vec<String> {
        self.dead_components.lock().map(|dead| dead.clone()).unwrap_or_default()
    }

    /// Every component started: the consumers are consuming (`false` again at shutdown).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Consuming, and no component died.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.is_alive()
    }
}

async fn delete_ping(redis: &RedisPool) {
    if let Ok(mut connection) = redis.get().await {
        let _: Result<(), _> = connection.del(PING_KEY).await;
    }
}

/// Writes the ping every [`PING_INTERVAL`] until `shutdown`, then deletes it. A failed write is
/// logged and retried at the next tick: the key simply expires if Redis stays away. Once
/// `liveness` says a component died, the key is deleted and never written again.
pub async fn run_ping(redis: RedisPool, liveness: Liveness, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(PING_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let died = liveness.changed.notified();
        if !liveness.is_alive() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = died => break,
            _ = interval.tick() => {
                if !liveness.is_alive() {
                    break;
                }
                if let Err(error) = write_ping(&redis).await {
                    tracing::error!("🔴 Could not write the health ping to Redis: {error}");
                }
            }
        }
    }
    delete_ping(&redis).await;
    if !liveness.is_alive() {
        // Dead part: stay silent until asked to stop (the server is shutting down with code 1).
        shutdown.cancelled().await;
    }
}
