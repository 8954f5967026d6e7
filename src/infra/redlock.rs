//! A Redlock-style lock on one Redis (the reference's `redlock` v4 with its own retry loop): it
//! decides which server of a cluster runs the schedule and which consumes the job queue.
//!
//! * value: 16 random bytes, hex; acquire `SET key value NX PX ttl`; extend and release are
//!   scripts that act only while the key still holds our value;
//! * held: extend every `ttl/2`; not held: try again every `ttl/10`, or as soon as the current
//!   holder's key expires if that is sooner, so a dead holder is replaced within one TTL of its
//!   last renewal;
//! * [REF-BUG 14 fixed] a failed extension tells the owner at once that the lock is gone (the
//!   reference kept believing it held it), and any Redis error (not only "held by someone else")
//!   is followed by another attempt rather than giving up for good;
//! * a lock whose renewal has not succeeded within its TTL is reported lost even if Redis never
//!   answered, so two servers never both believe they hold it.
//!
//! The lock's state is published on a `watch` channel; this module does not know what the lock
//! protects.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::sentry::capture_error_message;

/// The schedule's lock (`plugin-server:locks:schedule`).
pub const SCHEDULE_LOCK: &str = "plugin-server:locks:schedule";
/// The job queue consumer's lock (`plugin-server:locks:job-queue-consumer`).
pub const JOB_QUEUE_CONSUMER_LOCK: &str = "plugin-server:locks:job-queue-consumer";

/// The Redis key of lock `name` for this configuration: `REDIS_LOCK_PREFIX` then `name` (the
/// prefix is empty by default, so the keys are the reference's).
pub fn lock_key(config: &crate::config::Config, name: &str) -> String {
    format!("{}{name}", config.REDIS_LOCK_PREFIX)
}

const EXTEND_SCRIPT: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE_SCRIPT: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

#[derive(Debug, Error)]
pub enum LockError {
    #[error("Redis error on lock {resource:?}: {source}")]
    Redis { resource: String, source: redis::RedisError },
    #[error("Redis did not answer within {0:?}")]
    TimedOut(Duration),
}

/// Watches whether this process holds a lock. Cloneable; `held()` is the current state and
/// `changed()` waits for the next change.
#[derive(Clone)]
pub struct LockState {
    receiver: watch::Receiver<bool>,
}

impl LockState {
    pub fn held(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits until the state changes; returns the new state, or `None` once the lock task ended.
    pub async fn changed(&mut self) -> Option<bool> {
        match self.receiver.changed().await {
            Ok(()) => Some(*self.receiver.borrow_and_update()),
            Err(_) => None,
        }
    }

    /// Waits until the lock is held (returns `false` if the lock task ended first).
    pub async fn wait_until_held(&mut self) -> bool {
        self.receiver.wait_for(|held| *held).await.is_ok()
    }
}

/// One lock resource and how long it is held between renewals.
#[derive(Debug, Clone)]
pub struct Redlock {
    resource: String,
    ttl: Duration,
    value: String,
}

impl Redlock {
    pub fn new(resource: impl Into<String>, ttl: Duration) -> Redlock {
        let bytes: [u8; 16] = rand::random();
        let value = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        Redlock { resource: resource.into(), ttl: ttl.max(Duration::from_millis(10)), value }
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Each Redis call gets a quarter of the TTL: a hung call must not outlive the lock.
    fn call_timeout(&self) -> Duration {
        self.ttl / 4
    }

    async fn bounded<T>(&self, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, LockError> {
        match tokio::time::timeout(self.call_timeout(), call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(LockError::Redis { resource: self.resource.clone(), source }),
            Err(_) => Err(LockError::TimedOut(self.call_timeout())),
        }
    }

    /// `SET NX PX`. `Ok(None)` when acquired; `Ok(Some(remaining))` when someone else holds it
    /// (with the time left on their key, when known).
    async fn try_acquire(&self, connection: &mut ConnectionManager) -> Result<Option<Option<Duration>>, LockError> {
        let set: Option<String> = self
            .bounded(
                redis::cmd("SET")
                    .arg(&self.resource)
                    .arg(&self.value)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms())
                    .query_async(connection),
            )
            .await?;
        if set.is_some() {
            return Ok(None);
        }
        let remaining: i64 = self.bounded(redis::cmd("PTTL").arg(&self.resource).query_async(connection)).await?;
        Ok(Some((remaining > 0).then(|| Duration::from_millis(remaining as u64))))
    }

    async fn extend(&self, connection: &mut ConnectionManager) -> Result<bool, LockError> {
        let script = Script::new(EXTEND_SCRIPT);
        let extended: i64 = self
            .bounded(script.key(&self.resource).arg(&self.value).arg(self.ttl_ms()).invoke_async(connection))
            .await?;
        Ok(extended == 1)
    }

    async fn release(&self, connection: &mut ConnectionManager) -> Result<(), LockError> {
        let script = Script::new(RELEASE_SCRIPT);
        let _: i64 = self.bounded(script.key(&self.resource).arg(&self.value).invoke_async(connection)).await?;
        Ok(())
    }

    /// Starts contending for the lock on a dedicated connection from `client`. Returns the state
    /// watcher and the task; cancel `shutdown` to release the lock and end the task.
    pub fn spawn(self, client: redis::Client, shutdown: CancellationToken) -> (LockState, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = watch::channel(false);
        let handle = tokio::spawn(self.run(client, sender, shutdown));
        (LockState { receiver }, handle)
    }

    async fn run(self, client: redis::Client, state: watch::Sender<bool>, shutdown: CancellationToken) {
        info!("⏰ Starting redlock \"{}\" ...", self.resource);
        let retry_delay = self.ttl / 10;
        let extend_delay = self.ttl / 2;
        let mut connection: Option<ConnectionManager> = None;
        // When the lock is held: the instant its validity ends unless renewed.
        let mut valid_until: Option<Instant> = None;
        loop {
            let wait = match valid_until {
                Some(_) => extend_delay,
                None => retry_delay,
            };
            let step = async {
                let manager = match &mut connection {
                    Some(manager) => manager,
                    None => match self.bounded(ConnectionManager::new(client.clone())).await {
                        Ok(manager) => connection.insert(manager),
                        Err(error) => return Err(error),
                    },
                };
                match valid_until {
                    Some(_) => self.extend(manager).await.map(|extended| (extended, None)),
                    None => self.try_acquire(manager).await.map(|outcome| match outcome {
                        None => (true, None),
                        Some(remaining) => (false, remaining),
                    }),
                }
            };
            let attempt_started = Instant::now();
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                outcome = step => outcome,
            };
            let mut next_wait = wait;
            match outcome {
                Ok((true, _)) => {
                    if valid_until.is_none() {
                        info!("🔒 Redlock \"{}\" acquired!", self.resource);
                    }
                    valid_until = Some(attempt_started + self.ttl);
                    publish(&state, true);
                }
                Ok((false, remaining)) => {
                    if valid_until.take().is_some() {
                        error!("🔴 Redlock cannot extend lock \"{}\": it is no longer ours", self.resource);
                        capture_error_message(&format!("Redlock cannot extend lock \"{}\"", self.resource));
                        publish(&state, false);
                        next_wait = Duration::ZERO;
                    } else if let Some(remaining) = remaining {
                        next_wait = next_wait.min(remaining + Duration::from_millis(5));
                    }
                }
                Err(lock_error) => {
                    error!("🔴 Redlock \"{}\" error: {lock_error}", self.resource);
                    capture_error_message(&format!("Redlock \"{}\" error: {lock_error}", self.resource));
                    if valid_until.is_some_and(|until| Instant::now() + self.call_timeout() >= until) {
                        // We cannot prove the lock is still ours; stop acting on it.
                        valid_until = None;
                        publish(&state, false);
                    }
                    // A broken connection is rebuilt on the next attempt.
                    if matches!(lock_error, LockError::TimedOut(_)) {
                        connection = None;
                    }
                    next_wait = next_wait.min(retry_delay);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(next_wait) => {}
            }
        }
        if valid_until.is_some() {
            info!("🔓 Releasing redlock \"{}\"", self.resource);
        }
        publish(&state, false);
        // Also when we did not know we held it: shutdown may have interrupted an acquisition
        // that Redis had already granted. The script only deletes our own value.
        if let Some(manager) = &mut connection {
            if let Err(error) = self.release(manager).await {
                error!("🔴 Redlock \"{}\" could not be released: {error}", self.resource);
                capture_error_message(&format!("Redlock \"{}\" release failed: {error}", self.resource));
            }
        }
    }
}

/// Publishes the state, waking watchers only when it changed.
fn publish(state: &watch::Sender<bool>, held: bool) {
    state.send_if_modified(|current| std::mem::replace(current, held) != held);
}
