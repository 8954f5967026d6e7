//! The Celery consumer: takes task messages off the Redis list `PLUGINS_CELERY_QUEUE` and hands
//! them to the [`EventHandler`], reliably and with bounded concurrency.
//!
//! Differences from the reference (which `BRPOP`s, runs every task unawaited and loses whatever was
//! in flight when the process dies, and whose polling loop dies on the first bad message):
//! * **Nothing is lost.** A message is moved atomically (`RPOPLPUSH`/`BRPOPLPUSH`) from the queue to
//!   this consumer's processing list `<queue>:processing:<consumer id>` and removed from it only
//!   once handled (or dead-lettered). Each consumer keeps a heartbeat key
//!   `<queue>:consumer:<consumer id>` alive; any consumer, at start-up and then periodically, puts
//!   the messages of processing lists whose heartbeat has expired back at the head of the queue.
//!   At shutdown, messages still waiting for a retry go back to the queue.
//! * **A stable identity.** The consumer id is the host name (or `PLUGINS_CELERY_CONSUMER_ID`), so
//!   a server restarted after a crash recognises its predecessor's processing list (the heartbeat
//!   names the process that wrote it; a process no longer running is dead) and takes it back at
//!   once instead of waiting for the heartbeat to expire. A live process already using the id
//!   (two servers on one host name) makes the newcomer fall back to a unique id.
//! * **Its own leftovers too.** A message left in this consumer's own processing list without a
//!   handler (its acknowledgement failed, the reply of a pop was lost, its handler panicked) is
//!   put back on the queue by the periodic check once seen orphaned twice in a row.
//! * **No hang on a half-open connection.** Every Redis reply must arrive within
//!   `response_timeout` (the blocking pop: its block time plus that margin); otherwise the
//!   connection is dropped and a new one made.
//! * **Poison messages end.** Each delivery of a message is counted in
//!   `<queue>:deliveries:<message id>`; a message delivered more than `max_deliveries` times (the
//!   server died while handling it each time) is dead-lettered with that reason.
//! * **Duplicates are rare and recognisable.** An event without a `uuid` in its data gets one
//!   derived from the message id ([`super::celery_dedupe::message_event_uuid`]), so every copy
//!   of a redelivered message carries the same uuid; a redelivered event whose write marker
//!   ([`super::celery_dedupe`]) is present was already written and is skipped.
//! * **Back-pressure, and a fair share of it.** At most `concurrency` messages are handled at
//!   once, at most `team_share` of them for one team ([`super::window`]); a message whose team is
//!   at its share is held back (still in the processing list) and gives its place to other teams.
//!   The consumer takes no more until a place is free, nor while `held` messages are held back.
//! * **Bad messages are set aside**, with their reason, in the list `<queue>:dead_letter` (capped
//!   at [`CeleryConsumerOptions::dead_letter_max_len`] entries), and consumption goes on. The
//!   same happens to a message the handler rejects (the reference only reports it to Sentry).
//!
//! Order is FIFO (producers `LPUSH`, we pop from the right) up to the concurrency.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use deadpool_redis::Pool;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rustc_hash::FxBuildHasher;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::celery::{decode_envelope, CeleryTask, TaskMessage, TaskSet};
use super::celery_dedupe::{message_event_uuid, message_key, written_marker_key, Redelivered};
use super::retry::{Outcome, RetryPolicy};
use super::window::{FairWindow, Slot, WindowLimits};
use super::{EventHandler, HandleError, QueueStats};
use crate::config::Config;
use crate::infra::pipelined_redis::{DeliveryCount, PipelinedRedis};
use crate::infra::redis_call::{within, RedisCallError};
use crate::js::iso;
use crate::metrics::catalog::{self, Stage};

/// How many messages one round trip may move when the queue is busy.
const MAX_PREFETCH: usize = 64;
/// Deliveries after which a message is handled alone (see [`Shared::handle`]): the first
/// redelivery after a crash runs with the others, so a restart drains quickly.
const ISOLATE_AFTER_DELIVERIES: u64 = 2;
/// How long a delivery count lives without being cleared (a message is normally done, and its
/// count deleted, within seconds).
const DELIVERY_COUNT_TTL_SECONDS: u64 = 24 * 3600;

#[derive(Debug, Error)]
pub enum CeleryError {
    #[error("Celery consumer cannot connect to Redis: {0}")]
    Redis(#[from] RedisCallError),
}

/// How a [`CeleryConsumer`] runs.
#[derive(Debug, Clone)]
pub struct CeleryConsumerOptions {
    /// The Redis list (`PLUGINS_CELERY_QUEUE`).
    pub queue: String,
    /// Which tasks it runs (`process_event_with_plugins` only when Kafka is off).
    pub tasks: TaskSet,
    /// Messages handled at once, all teams together.
    pub concurrency: usize,
    /// Messages of one team handled at once (fair share, [`super::window`]).
    pub team_share: usize,
    /// Messages held back for their team's share, at most (then the consumer takes no more).
    pub held: usize,
    /// Names this consumer's processing list and heartbeat: stable across restarts of the same
    /// server (`PLUGINS_CELERY_CONSUMER_ID`, default the host name).
    pub consumer_id: String,
    /// How long the heartbeat lives without renewal; a consumer silent this long is presumed dead
    /// and its in-flight messages are put back on the queue.
    pub heartbeat_ttl: Duration,
    /// How long one blocking pop waits (also bounds how long `pause` and `stop` wait for it).
    pub poll_timeout: Duration,
    /// How long a Redis reply may take (beyond the blocking pop's own wait) before the connection
    /// is presumed half-open, dropped and made anew.
    pub response_timeout: Duration,
    /// Deliveries of one message before it is dead-lettered as poison
    /// (`PLUGINS_CELERY_MAX_DELIVERIES`).
    pub max_deliveries: u64,
    pub retry: RetryPolicy,
    pub dead_letter_max_len: usize,
    /// The events of redelivered messages in flight, shared with the server's event writer
    /// ([`super::celery_dedupe::MarkingWriter`]).
    pub redelivered: Arc<Redelivered>,
}

impl CeleryConsumerOptions {
    /// The server's settings: `PLUGINS_CELERY_QUEUE`, events only without Kafka, the window
    /// [`super::consumer_window`].
    pub fn from_config(config: &Config) -> CeleryConsumerOptions {
        let window = super::consumer_window(config);
        CeleryConsumerOptions {
            queue: config.PLUGINS_CELERY_QUEUE.clone(),
            tasks: TaskSet { process_events: !config.KAFKA_ENABLED },
            concurrency: window.in_flight,
            team_share: window.team_share,
            held: window.held,
            consumer_id: config
                .PLUGINS_CELERY_CONSUMER_ID
                .clone()
                .filter(|id| !id.is_empty())
                .unwrap_or_else(host_name),
            heartbeat_ttl: Duration::from_secs(30),
            poll_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
            max_deliveries: config.PLUGINS_CELERY_MAX_DELIVERIES.max(1),
            retry: RetryPolicy::from_config(config),
            dead_letter_max_len: 10_000,
            redelivered: Arc::default(),
        }
    }

    pub fn processing_key(&self) -> String {
        processing_key(&self.queue, &self.consumer_id)
    }

    pub fn window(&self) -> WindowLimits {
        WindowLimits::new(self.concurrency, self.team_share, self.held)
    }

    pub fn heartbeat_key(&self) -> String {
        format!("{}:consumer:{}", self.queue, self.consumer_id)
    }

    pub fn dead_letter_key(&self) -> String {
        dead_letter_key(&self.queue)
    }

    /// The delivery counter of the message with this id.
    pub fn deliveries_key(&self, message_id: &str) -> String {
        format!("{}:deliveries:{message_id}", self.queue)
    }
}

/// This machine's host name (the default consumer identity): the kernel's, else `HOSTNAME`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The processing list of consumer `consumer_id` of `queue`.
pub fn processing_key(queue: &str, consumer_id: &str) -> String {
    format!("{queue}:processing:{consumer_id}")
}

/// The dead-letter list of `queue`. Entries are JSON `{queue, reason, failed_at, consumer, message}`
/// where `message` is the original list item.
pub fn dead_letter_key(queue: &str) -> String {
    format!("{queue}:dead_letter")
}

/// Moves a processing list back to the head of the queue, unless ARGV[1] is "1" and its heartbeat
/// is alive. Newest first to the right end, so the oldest ends up popped first.
const RECOVER_SCRIPT: &str = r#"
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local moved = 0
while true do
  local item = redis.call('LPOP', KEYS[1])
  if not item then break end
  redis.call('RPUSH', KEYS[3], item)
  moved = moved + 1
end
return moved
"#;

/// Puts one orphaned item of a processing list back at the head of the queue.
const REQUEUE_ONE_SCRIPT: &str = r#"
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"#;

/// Renews the heartbeat, returning the value it replaced when another process wrote it.
const BEAT_SCRIPT: &str = r#"
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if previous and previous ~= ARGV[1] then return previous end
return false
"#;

/// What a heartbeat says: which process of which host keeps it alive.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Beat {
    nonce: String,
    host: String,
    pid: u32,
}

impl Beat {
    /// Whether the process that wrote this beat is certainly gone: same host, and its pid is ours
    /// (a restarted container) or no longer exists.
    fn writer_is_dead(&self) -> bool {
        if self.host != host_name() {
            return false;
        }
        if self.pid == std::process::id() {
            return true;
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        matches!(nix::sys::signal::kill(pid, None), Err(nix::errno::Errno::ESRCH))
    }
}

struct Shared {
    options: CeleryConsumerOptions,
    pool: Pool,
    handler: Arc<dyn EventHandler>,
    window: Arc<FairWindow>,
    paused: watch::Sender<bool>,
    /// True while the polling loop is not inside a pop (what `pause` waits for).
    parked: watch::Sender<bool>,
    stop_polling: CancellationToken,
    /// Cancelled at shutdown: retries stop waiting and their messages go back to the queue.
    shutdown: CancellationToken,
    stats: Arc<QueueStats>,
    /// This process's heartbeat value (JSON [`Beat`]).
    beat: String,
    /// Messages of the processing list this process holds (taken and not yet acknowledged), with
    /// how many copies of each; anything else in the list is an orphan. Keyed by the whole
    /// message, hashed with Fx: SipHash of every message (kilobytes each) twice per event was 2%
    /// of the server's CPU. Not DoS-resistant, and needs not be: it holds at most the in-flight
    /// window.
    in_hand: Mutex<HashMap<Arc<str>, usize, FxBuildHasher>>,
    /// Orphans seen at the previous check (requeued when seen again).
    suspects: Mutex<HashSet<Arc<str>>>,
    /// Redis commands of all handlers, multiplexed on one connection.
    redis: PipelinedRedis,
    /// Read by every handler, written by one handling a suspected poison message alone.
    gate: tokio::sync::RwLock<()>,
}

/// A running Celery consumer.
pub struct CeleryConsumer {
    shared: Arc<Shared>,
    polling: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    heartbeat: JoinHandle<()>,
}

impl CeleryConsumer {
    /// Connects, announces itself (heartbeat), takes back its predecessor's unfinished messages,
    /// recovers dead consumers' messages and starts consuming. `redis_url` is the server's
    /// (`hub::redis_url`); the blocking pop gets its own connection so it never holds a pooled one.
    pub async fn start(
        redis_url: &str,
        pool: Pool,
        handler: Arc<dyn EventHandler>,
        mut options: CeleryConsumerOptions,
    ) -> Result<CeleryConsumer, CeleryError> {
        let client = redis::Client::open(redis_url).map_err(RedisCallError::from)?;
        let blocking = connect_blocking(&client, &options).await?;
        info!("🍆 Starting Celery worker...");
        let beat = Beat { nonce: uuid::Uuid::new_v4().to_string(), host: host_name(), pid: std::process::id() };
        let beat_text = serde_json::to_string(&beat).unwrap_or_default();
        let predecessor = claim_identity(&pool, &mut options).await?;
        let redis = PipelinedRedis::new(client.clone(), options.response_timeout);
        let stats = Arc::new(QueueStats::default());
        let window = FairWindow::new(options.window(), Arc::clone(&stats), "Celery");
        let shared = Arc::new(Shared {
            options,
            pool,
            handler,
            window,
            paused: watch::Sender::new(false),
            parked: watch::Sender::new(true),
            stop_polling: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            stats,
            beat: beat_text,
            in_hand: Mutex::new(HashMap::default()),
            suspects: Mutex::new(HashSet::new()),
            redis,
            gate: tokio::sync::RwLock::new(()),
        });
        shared.beat(predecessor).await?;
        if predecessor {
            match shared.recover_list(&shared.options.processing_key(), &shared.options.heartbeat_key(), false).await {
                Ok(moved) if moved > 0 => warn!(
                    "♻️ Took back {moved} unfinished message(s) of this consumer's previous run ({})",
                    shared.options.consumer_id
                ),
                Ok(_) => {}
                Err(reason) => warn!("⚠️ Could not take back this consumer's unfinished messages: {reason}"),
            }
        }
        let heartbeat = tokio::spawn(Arc::clone(&shared).heartbeat_loop());
        if let Err(reason) = shared.recover_dead_consumers().await {
            warn!("⚠️ Could not recover messages of stopped Celery consumers: {reason}");
        }
        let polling = tokio::spawn(Arc::clone(&shared).poll_loop(client, blocking));
        info!("✅ Celery worker subscribed to {}!", shared.subscribed_tasks());
        Ok(CeleryConsumer { shared, polling: tokio::sync::Mutex::new(Some(polling)), heartbeat })
    }

    /// Outcome counters.
    pub fn stats(&self) -> Arc<QueueStats> {
        Arc::clone(&self.shared.stats)
    }

    pub fn options(&self) -> &CeleryConsumerOptions {
        &self.shared.options
    }

    /// Messages taken and not yet done: being handled or held back for their team's share.
    pub fn in_flight(&self) -> usize {
        self.shared.window.in_hand()
    }

    /// Messages held back right now, waiting for their team's share of the window.
    pub fn held_back(&self) -> usize {
        self.shared.window.held()
    }

    /// Stops taking messages and waits until no pop is under way (at most `poll_timeout`); messages
    /// already taken are still handled.
    pub async fn pause(&self) {
        self.shared.paused.send_replace(true);
        let mut parked = self.shared.parked.subscribe();
        let _ = parked.wait_for(|parked| *parked).await;
    }

    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.shared.paused.borrow()
    }

    /// For a server component: consumes until `shutdown` is cancelled, then stops gracefully.
    /// Returns early, without stopping, if the polling loop or the heartbeat ends on its own (a
    /// bug or a panic): the lifecycle then treats the consumer as dead.
    pub async fn run_until(&self, shutdown: CancellationToken) {
        let mut polling = self.polling.lock().await;
        let Some(handle) = polling.as_mut() else { return };
        let died = tokio::select! {
            _ = shutdown.cancelled() => None,
            result = handle => Some(format!("the polling loop ended on its own: {result:?}")),
            _ = self.heartbeat_ended() => Some("the heartbeat ended on its own".to_string()),
        };
        if let Some(reason) = died {
            polling.take();
            error!("💥 Celery consumer: {reason}");
            return;
        }
        drop(polling);
        self.stop().await;
    }

    async fn heartbeat_ended(&self) {
        while !self.heartbeat.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops consuming, waits for the messages in flight (a message waiting for a retry goes back
    /// to the queue), and withdraws the heartbeat so any leftover is recovered at once.
    pub async fn stop(&self) {
        let shared = &self.shared;
        let in_flight = self.in_flight();
        if in_flight > 0 {
            let (noun, pronoun) = if in_flight == 1 { ("task", "it") } else { ("tasks", "them") };
            info!("⌛ {in_flight} {noun} in progress, waiting for {pronoun} to finish before disconnecting Celery...");
        } else {
            info!("👍 No tasks in progress, disconnecting Celery...");
        }
        shared.stop_polling.cancel();
        shared.shutdown.cancel();
        if let Some(polling) = self.polling.lock().await.take() {
            let _ = polling.await;
        }
        shared.window.drained().await;
        self.heartbeat.abort();
        if let Ok(mut connection) = shared.pool.get().await {
            let _: Result<i64, _> =
                redis::cmd("DEL").arg(shared.options.heartbeat_key()).query_async(&mut connection).await;
        }
        info!("🛑 Celery worker disconnected!");
    }
}

/// The blocking connection: replies must come within the pop's block time plus the margin.
async fn connect_blocking(
    client: &redis::Client,
    options: &CeleryConsumerOptions,
) -> Result<ConnectionManager, RedisCallError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(options.response_timeout)
        .set_response_timeout(options.poll_timeout + options.response_timeout)
        .set_number_of_retries(1);
    within(options.response_timeout * 2, ConnectionManager::new_with_config(client.clone(), config)).await
}

/// Claims the consumer identity. Returns whether a predecessor of this identity is known dead
/// (its processing list is then ours to take back at once). When a live process holds the
/// identity, falls back to a unique id.
async fn claim_identity(pool: &Pool, options: &mut CeleryConsumerOptions) -> Result<bool, RedisCallError> {
    let mut connection = pool.get().await?;
    let current: Option<String> = redis::cmd("GET").arg(options.heartbeat_key()).query_async(&mut connection).await?;
    let Some(current) = current else { return Ok(true) };
    match serde_json::from_str::<Beat>(&current) {
        Ok(holder) if !holder.writer_is_dead() => {
            let unique = format!("{}-{}", options.consumer_id, &uuid::Uuid::new_v4().simple().to_string()[..8]);
            error!(
                "⚠️ Celery consumer id {} is in use by process {} of {}: using {unique} (set PLUGINS_CELERY_CONSUMER_ID \
                 to a different value on each server sharing a host name)",
                options.consumer_id, holder.pid, holder.host
            );
            options.consumer_id = unique;
            Ok(false)
        }
        // A dead process of this host, or an older server's plain timestamp.
        _ => Ok(true),
    }
}

impl Shared {
    fn subscribed_tasks(&self) -> String {
        let mut names = vec![super::celery::PLUGIN_JOB_TASK];
        if self.options.tasks.process_events {
            names.push(super::celery::PROCESS_EVENT_TASK);
        }
        names.join(", ")
    }

    /// Renews the heartbeat. `replacing`: the previous value is a dead predecessor's (not a twin).
    async fn beat(&self, replacing: bool) -> Result<(), RedisCallError> {
        let work = async {
            let mut connection = self.pool.get().await?;
            let replaced = redis::Script::new(BEAT_SCRIPT)
                .key(self.options.heartbeat_key())
                .arg(&self.beat)
                .arg(self.options.heartbeat_ttl.as_millis().max(1) as u64)
                .invoke_async::<Option<String>>(&mut connection)
                .await?;
            Ok::<_, RedisCallError>(replaced)
        };
        let replaced = within(self.options.response_timeout, work).await?;
        if let Some(other) = replaced.filter(|_| !replacing) {
            // Another process renewed our identity's heartbeat: it shares our processing list.
            error!(
                "⚠️ Another process ({other}) uses Celery consumer id {}; set PLUGINS_CELERY_CONSUMER_ID to a \
                 different value on each server",
                self.options.consumer_id
            );
        }
        Ok(())
    }

    /// Renews the heartbeat three times per TTL; once per TTL recovers dead consumers' lists and
    /// this consumer's own orphans.
    async fn heartbeat_loop(self: Arc<Self>) {
        let period = (self.options.heartbeat_ttl / 3).max(Duration::from_millis(10));
        let mut beats = 0u32;
        loop {
            tokio::time::sleep(period).await;
            if let Err(reason) = self.beat(false).await {
                warn!("⚠️ Celery consumer heartbeat failed: {reason}");
            }
            beats += 1;
            if beats % 3 == 0 {
                if let Err(reason) = self.recover_dead_consumers().await {
                    warn!("⚠️ Could not recover messages of stopped Celery consumers: {reason}");
                }
                if let Err(reason) = self.requeue_orphans().await {
                    warn!("⚠️ Could not check this Celery consumer's processing list: {reason}");
                }
            }
        }
    }

    async fn recover_list(&self, list: &str, heartbeat: &str, only_if_dead: bool) -> Result<i64, RedisCallError> {
        let mut connection = self.pool.get().await?;
        let script = redis::Script::new(RECOVER_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation.key(list).key(heartbeat).key(&self.options.queue).arg(if only_if_dead { "1" } else { "0" });
        within(self.options.response_timeout, invocation.invoke_async::<i64>(&mut connection)).await
    }

    async fn recover_dead_consumers(&self) -> Result<u64, RedisCallError> {
        let queue = &self.options.queue;
        let prefix = format!("{queue}:processing:");
        let pattern = format!("{}*", escape_glob(&prefix));
        let mut keys = Vec::new();
        {
            let mut connection = self.pool.get().await?;
            let mut cursor = 0u64;
            loop {
                let mut command = redis::cmd("SCAN");
                command.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(500);
                let scan = command.query_async::<(u64, Vec<String>)>(&mut connection);
                let (next, batch) = within(self.options.response_timeout, scan).await?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut recovered = 0u64;
        for key in keys {
            let Some(consumer_id) = key.strip_prefix(&prefix) else { continue };
            if consumer_id == self.options.consumer_id {
                continue;
            }
            let heartbeat = format!("{queue}:consumer:{consumer_id}");
            let moved = self.recover_list(&key, &heartbeat, true).await?;
            if moved > 0 {
                warn!("♻️ Put {moved} unfinished message(s) of stopped Celery consumer {consumer_id} back on {queue}");
                recovered += moved as u64;
            }
        }
        Ok(recovered)
    }

    /// Puts back on the queue the items of this consumer's own processing list that no handler
    /// holds, once seen so at two checks in a row (a pop's reply still on its way is received or
    /// timed out long before the next check).
    async fn requeue_orphans(&self) -> Result<u64, RedisCallError> {
        let processing = self.options.processing_key();
        let items: Vec<String> = {
            let mut connection = self.pool.get().await?;
            let mut command = redis::cmd("LRANGE");
            command.arg(&processing).arg(0).arg(-1);
            within(self.options.response_timeout, command.query_async(&mut connection)).await?
        };
        let orphans: HashSet<Arc<str>> = {
            let in_hand = self.in_hand.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut listed: HashMap<&str, usize> = HashMap::new();
            for item in &items {
                *listed.entry(item.as_str()).or_default() += 1;
            }
            listed
                .into_iter()
                .filter(|(item, count)| in_hand.get(*item).copied().unwrap_or(0) < *count)
                .map(|(item, _)| Arc::from(item))
                .collect()
        };
        let confirmed: Vec<Arc<str>> = {
            let mut suspects = self.suspects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let confirmed = orphans.iter().filter(|item| suspects.contains(*item)).cloned().collect();
            *suspects = orphans;
            confirmed
        };
        let mut requeued = 0u64;
        for item in confirmed {
            let mut connection = self.pool.get().await?;
            let script = redis::Script::new(REQUEUE_ONE_SCRIPT);
            let mut invocation = script.prepare_invoke();
            invocation.key(&processing).key(&self.options.queue).arg(&*item);
            let moved = within(self.options.response_timeout, invocation.invoke_async::<i64>(&mut connection)).await?;
            requeued += moved.max(0) as u64;
        }
        if requeued > 0 {
            warn!("♻️ Put {requeued} orphaned message(s) of this Celery consumer's processing list back on the queue");
        }
        Ok(requeued)
    }

    async fn poll_loop(self: Arc<Self>, client: redis::Client, mut blocking: ConnectionManager) {
        let mut paused = self.paused.subscribe();
        let queue = self.options.queue.clone();
        let processing = self.options.processing_key();
        loop {
            self.parked.send_replace(true);
            if self.stop_polling.is_cancelled() {
                return;
            }
            if *paused.borrow_and_update() {
                tokio::select! {
                    _ = self.stop_polling.cancelled() => return,
                    _ = paused.changed() => continue,
                }
            }
            let first = tokio::select! {
                _ = self.stop_polling.cancelled() => return,
                _ = paused.changed() => continue,
                slot = self.window.reserve() => slot,
            };
            self.parked.send_replace(false);
            let mut permits = vec![first];
            self.take_free_slots(&mut permits);
            if permits.len() < self.options.concurrency.min(MAX_PREFETCH) / 4 {
                // Only a few slots free: let the handlers finishing right now free theirs, so one
                // round trip moves a batch instead of a message per finished handler.
                tokio::time::sleep(Duration::from_millis(1)).await;
                self.take_free_slots(&mut permits);
            }
            let deadline = self.options.poll_timeout + self.options.response_timeout * 2;
            // The reference's `query.redisBRPop` (it pops one message per call; this moves a batch).
            let popped = catalog::instrument_query(
                catalog::statsd::REDIS_BRPOP,
                None,
                within(deadline, self.pop(&mut blocking, &queue, &processing, permits.len())),
            )
            .await;
            match popped {
                Ok(items) => {
                    for (raw, permit) in items.into_iter().zip(permits) {
                        QueueStats::bump(&self.stats.received);
                        catalog::received(Stage::Consumer, "celery", 1);
                        let raw: Arc<str> = Arc::from(raw);
                        self.hold(&raw);
                        tokio::spawn(Arc::clone(&self).handle(raw, permit));
                    }
                }
                Err(reason) => {
                    drop(permits);
                    error!("⚠️ An error occured in Celery broker: {reason}; reconnecting");
                    // A reply may have been lost with the connection (a half-open socket): what it
                    // moved stays in the processing list and is requeued by the orphan check.
                    tokio::select! {
                        _ = self.stop_polling.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    match connect_blocking(&client, &self.options).await {
                        Ok(fresh) => blocking = fresh,
                        Err(reason) => warn!("⚠️ Could not reconnect the Celery consumer to Redis: {reason}"),
                    }
                }
            }
        }
    }

    fn take_free_slots(&self, slots: &mut Vec<Slot>) {
        while slots.len() < MAX_PREFETCH {
            match self.window.try_reserve() {
                Some(slot) => slots.push(slot),
                None => break,
            }
        }
    }

    /// Moves up to `wanted` messages to the processing list in one round trip; if there are none,
    /// waits up to `poll_timeout` for one.
    async fn pop(
        &self,
        blocking: &mut ConnectionManager,
        queue: &str,
        processing: &str,
        wanted: usize,
    ) -> Result<Vec<String>, redis::RedisError> {
        let mut pipe = redis::pipe();
        for _ in 0..wanted {
            pipe.cmd("RPOPLPUSH").arg(queue).arg(processing);
        }
        let popped: Vec<Option<String>> = pipe.query_async(blocking).await?;
        let items: Vec<String> = popped.into_iter().flatten().collect();
        if !items.is_empty() {
            return Ok(items);
        }
        let timeout_secs = self.options.poll_timeout.as_secs_f64().max(0.01);
        let item: Option<String> =
            redis::cmd("BRPOPLPUSH").arg(queue).arg(processing).arg(timeout_secs).query_async(blocking).await?;
        Ok(item.into_iter().collect())
    }

    fn hold(&self, raw: &Arc<str>) {
        let mut in_hand = self.in_hand.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *in_hand.entry(Arc::clone(raw)).or_default() += 1;
    }

    fn release(&self, raw: &Arc<str>) {
        let mut in_hand = self.in_hand.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = in_hand.get_mut(raw) {
            *count -= 1;
            if *count == 0 {
                in_hand.remove(raw);
            }
        }
    }

    async fn handle(self: Arc<Self>, raw: Arc<str>, slot: Slot) {
        // Released whatever happens, a panic included: the message, if still listed, becomes an
        // orphan and is requeued (its delivery count then ends a panic loop).
        let _held = Held { shared: Arc::clone(&self), raw: Arc::clone(&raw) };
        let message = match decode_envelope(&self.options.queue, &raw) {
            Ok(message) => message,
            Err(error) => {
                warn!("⚠️ Setting aside Celery message: {error}");
                return self.finish(&raw, None, Finish::DeadLetter("undecodable", error.to_string())).await;
            }
        };
        let id = message_key(&message, &raw);
        let ids = MessageIds { deliveries: self.options.deliveries_key(&id), uuid: message_event_uuid(&id) };
        let data_has_uuid = data_has_uuid(&message);
        let task = match message.into_task(self.options.tasks) {
            Ok(task) => task,
            Err(error) => {
                warn!("⚠️ Setting aside Celery message: {error}");
                return self.finish(&raw, Some(&ids), Finish::DeadLetter("invalid_task", error.to_string())).await;
            }
        };
        // Its team's share of the window (held back meanwhile: still in the processing list, not
        // yet counted as delivered). At shutdown a held message goes back to the queue.
        let _slot = match task_team(&task) {
            Some(team) => tokio::select! {
                slot = slot.admit(team) => slot,
                _ = self.shutdown.cancelled() => {
                    return self.finish(&raw, Some(&ids), Finish::Requeue).await;
                }
            },
            None => slot,
        };
        // A message delivered twice already may be what kills the server: it runs alone, and
        // messages wait for it before being counted, so a crash then counts only against it (not
        // against the innocent messages that happened to be in flight).
        // One round trip for a message delivered fewer times: counted under the shared turn.
        let shared_turn = self.gate.read().await;
        let (_turn, deliveries) = match Box::pin(self.redis.count_delivery_below(
            &ids.deliveries,
            ISOLATE_AFTER_DELIVERIES,
            DELIVERY_COUNT_TTL_SECONDS,
        ))
        .await
        {
            DeliveryCount::Counted(deliveries) => (Turn::Shared { _guard: shared_turn }, deliveries),
            DeliveryCount::AtLeast(previous) => {
                drop(shared_turn);
                warn!("🔬 Celery message {id} was delivered {previous} times: handling it alone");
                let alone = Turn::Alone { _guard: self.gate.write().await };
                (alone, Box::pin(self.redis.count_delivery(&ids.deliveries, DELIVERY_COUNT_TTL_SECONDS)).await)
            }
        };
        if deliveries > self.options.max_deliveries {
            let reason = format!(
                "delivered {deliveries} times without being acknowledged (the server stopped while handling it each \
                 time); PLUGINS_CELERY_MAX_DELIVERIES is {}",
                self.options.max_deliveries
            );
            error!("☠️ Setting aside Celery message {id}: {reason}");
            return self.finish(&raw, Some(&ids), Finish::DeadLetter("out_of_deliveries", reason)).await;
        }
        let task = with_message_uuid(task, data_has_uuid, &ids.uuid);
        if deliveries > 1 {
            if let CeleryTask::ProcessEvent(event) = &task {
                let marker = event.uuid.as_deref().map(|uuid| written_marker_key(&self.options.queue, uuid));
                if let Some(marker) = marker {
                    if Box::pin(self.redis.get(&marker)).await.as_deref() == Some(super::celery_dedupe::WRITTEN) {
                        info!(
                            "♻️ Skipping redelivered Celery message {id}: its event {:?} was already written",
                            event.uuid
                        );
                        return self.finish(&raw, Some(&ids), Finish::Done).await;
                    }
                }
                // Perhaps written by a delivery that died before marking it: the writer looks.
                if let Some(uuid) = event.uuid.as_deref().and_then(|uuid| uuid.parse().ok()) {
                    self.options.redelivered.insert(uuid);
                }
            }
        }
        let (what, handler) = (task_description(&task), Arc::clone(&self.handler));
        let event_uuid = match &task {
            CeleryTask::ProcessEvent(event) => event.uuid.clone(),
            CeleryTask::PluginJob(_) => None,
        };
        // The first attempt gets the task itself; a retry decodes the message again (the handler
        // consumes and mutates what it is given), so no copy of each event is kept in flight.
        let mut first = Some(task);
        let outcome = self
            .options
            .retry
            .run(&what, &self.shutdown, &self.stats, || {
                let task = first.take().or_else(|| self.decode_again(&raw, &ids.uuid));
                let handler = Arc::clone(&handler);
                async move {
                    match task {
                        Some(CeleryTask::ProcessEvent(event)) => handler.handle_event(*event).await,
                        Some(CeleryTask::PluginJob(job)) => handler.handle_plugin_job(job).await,
                        None => Err(HandleError::Rejected("the message no longer decodes".into())),
                    }
                }
            })
            .await;
        if let Some(uuid) = event_uuid.as_deref().and_then(|uuid| uuid.parse().ok()) {
            self.options.redelivered.remove(&uuid);
        }
        let finish = match outcome {
            Outcome::Handled => Finish::Done,
            Outcome::Failed(reason) => {
                warn!("⚠️ Setting aside Celery message ({what}): {reason}");
                Finish::DeadLetter("handler_failed", reason)
            }
            Outcome::Interrupted => Finish::Requeue,
        };
        let ids = MessageIds { uuid: event_uuid.and_then(|uuid| uuid.parse().ok()).unwrap_or(ids.uuid), ..ids };
        self.finish(&raw, Some(&ids), finish).await;
    }

    /// The task of a message that decoded before, as its first attempt got it (for a retry).
    fn decode_again(&self, raw: &str, uuid: &uuid::Uuid) -> Option<CeleryTask> {
        let message = decode_envelope(&self.options.queue, raw).ok()?;
        let data_has_uuid = data_has_uuid(&message);
        let task = message.into_task(self.options.tasks).ok()?;
        Some(with_message_uuid(task, data_has_uuid, uuid))
    }

    /// Removes the message from the processing list (with its delivery count and write marker),
    /// dead-lettering or requeueing it in the same transaction. Retried for a while if Redis is
    /// unavailable; if that fails the message stays in the processing list, becomes an orphan and
    /// is requeued by the periodic check (at least once, never lost; an event already written is
    /// then skipped thanks to its marker).
    ///
    /// Boxed, as the other rarely taken or short awaits of [`Shared::handle`]: each message's task
    /// is sized for its longest-lived await (the handler) instead of the largest one.
    fn finish<'a>(
        &'a self,
        raw: &'a str,
        ids: Option<&'a MessageIds>,
        finish: Finish,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(self.finish_unboxed(raw, ids, finish))
    }

    async fn finish_unboxed(&self, raw: &str, ids: Option<&MessageIds>, finish: Finish) {
        let processing = self.options.processing_key();
        let mut commands = Vec::with_capacity(5);
        match &finish {
            Finish::Done => {}
            Finish::DeadLetter(_, reason) => {
                let entry = json!({
                    "queue": self.options.queue,
                    "reason": reason,
                    "failed_at": iso(&Utc::now()),
                    "consumer": self.options.consumer_id,
                    "message": raw,
                });
                let key = self.options.dead_letter_key();
                commands.push(redis::cmd("LPUSH").arg(&key).arg(entry.to_string()).clone());
                let last = self.options.dead_letter_max_len.max(1) as i64 - 1;
                commands.push(redis::cmd("LTRIM").arg(&key).arg(0).arg(last).clone());
            }
            Finish::Requeue => commands.push(redis::cmd("RPUSH").arg(&self.options.queue).arg(raw).clone()),
        }
        // Sent in one write after the dead letter or requeue: Redis runs it even if we die now.
        commands.push(redis::cmd("LREM").arg(&processing).arg(-1).arg(raw).clone());
        if let Some(ids) = ids {
            // A requeue at shutdown is not a crash: the count starts again.
            let marker = written_marker_key(&self.options.queue, &ids.uuid.to_string());
            commands.push(redis::cmd("DEL").arg(&ids.deliveries).arg(marker).clone());
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=10 {
            match self.redis.run(commands.clone()).await {
                Ok(()) => {
                    let counter = match finish {
                        Finish::Done => {
                            catalog::handled(Stage::Consumer, "celery", 1);
                            &self.stats.handled
                        }
                        Finish::DeadLetter(code, _) => {
                            catalog::dropped(Stage::Consumer, code, 1);
                            &self.stats.dead_lettered
                        }
                        // Back on the queue for later: neither handled nor dropped.
                        Finish::Requeue => &self.stats.requeued,
                    };
                    QueueStats::bump(counter);
                    return;
                }
                Err(reason) if attempt == 10 => {
                    error!("⚠️ Could not acknowledge Celery message ({reason}); it will be redelivered");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A message in the hands of a handler: its place in [`Shared::in_hand`].
struct Held {
    shared: Arc<Shared>,
    raw: Arc<str>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.release(&self.raw);
    }
}

/// A handler's turn: shared with other handlers, or alone (a suspected poison message).
enum Turn<'a> {
    Shared { _guard: tokio::sync::RwLockReadGuard<'a, ()> },
    Alone { _guard: tokio::sync::RwLockWriteGuard<'a, ()> },
}

/// The Redis keys derived from a message's id.
struct MessageIds {
    deliveries: String,
    uuid: uuid::Uuid,
}

enum Finish {
    Done,
    /// A short reason for the counters (`undecodable`, ...) and the message for the record.
    DeadLetter(&'static str, String),
    Requeue,
}

/// Whether the message's event data carries a `uuid` of its own.
fn data_has_uuid(message: &TaskMessage) -> bool {
    message.args.get(3).and_then(Value::as_object).is_some_and(|data| data.contains_key("uuid"))
}

/// The task with its event's uuid: the message's own unless the data has one. The reference gives
/// a fresh UUIDT; ours is the same for every copy of this message.
fn with_message_uuid(task: CeleryTask, data_has_uuid: bool, uuid: &uuid::Uuid) -> CeleryTask {
    match task {
        CeleryTask::ProcessEvent(mut event) if !data_has_uuid => {
            event.uuid = Some(uuid.to_string());
            CeleryTask::ProcessEvent(event)
        }
        other => other,
    }
}

/// The team whose share of the window a task takes (`None`: a job without a valid team).
fn task_team(task: &CeleryTask) -> Option<i64> {
    match task {
        CeleryTask::ProcessEvent(event) => Some(event.team_id),
        CeleryTask::PluginJob(job) => job.get("pluginConfigTeam").and_then(Value::as_i64),
    }
}

fn task_description(task: &CeleryTask) -> String {
    match task {
        CeleryTask::ProcessEvent(event) => format!("event {:?} of team {}", event.event, event.team_id),
        CeleryTask::PluginJob(job) => format!("plugin job {}", job.get("type").unwrap_or(&serde_json::Value::Null)),
    }
}

/// Escapes Redis glob metacharacters so a queue name matches literally in `SCAN MATCH`.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}
