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
//! * **Back-pressure.** At most `concurrency` ([`super::consumer_concurrency`]) messages
//!   are in flight; the consumer takes no more until one finishes.
//! * **Bad messages are set aside**, with their reason, in the list `<queue>:dead_letter` (capped
//!   at [`CeleryConsumerOptions::dead_letter_max_len`] entries), and consumption goes on. The
//!   same happens to a message the handler rejects (the reference only reports it to Sentry).
//!
//! Order is FIFO (producers `LPUSH`, we pop from the right) up to the concurrency.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deadpool_redis::Pool;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::json;
use thiserror::Error;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::celery::{decode_task, CeleryTask, TaskSet};
use super::retry::{Outcome, RetryPolicy};
use super::{EventHandler, QueueStats};
use crate::config::Config;
use crate::ingestion::timestamp::format_iso;

/// How many messages one round trip may move when the queue is busy.
const MAX_PREFETCH: usize = 64;

#[derive(Debug, Error)]
pub enum CeleryError {
    #[error("Celery consumer cannot connect to Redis: {0}")]
    Redis(String),
}

/// How a [`CeleryConsumer`] runs.
#[derive(Debug, Clone)]
pub struct CeleryConsumerOptions {
    /// The Redis list (`PLUGINS_CELERY_QUEUE`).
    pub queue: String,
    /// Which tasks it runs (`process_event_with_plugins` only when Kafka is off).
    pub tasks: TaskSet,
    /// Messages handled at once.
    pub concurrency: usize,
    /// Names this consumer's processing list and heartbeat; unique per running consumer.
    pub consumer_id: String,
    /// How long the heartbeat lives without renewal; a consumer silent this long is presumed dead
    /// and its in-flight messages are put back on the queue.
    pub heartbeat_ttl: Duration,
    /// How long one blocking pop waits (also bounds how long `pause` and `stop` wait for it).
    pub poll_timeout: Duration,
    pub retry: RetryPolicy,
    pub dead_letter_max_len: usize,
}

impl CeleryConsumerOptions {
    /// The server's settings: `PLUGINS_CELERY_QUEUE`, events only without Kafka, concurrency
    /// [`super::consumer_concurrency`].
    pub fn from_config(config: &Config) -> CeleryConsumerOptions {
        CeleryConsumerOptions {
            queue: config.PLUGINS_CELERY_QUEUE.clone(),
            tasks: TaskSet { process_events: !config.KAFKA_ENABLED },
            concurrency: super::consumer_concurrency(config),
            consumer_id: uuid::Uuid::new_v4().to_string(),
            heartbeat_ttl: Duration::from_secs(30),
            poll_timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            dead_letter_max_len: 10_000,
        }
    }

    pub fn processing_key(&self) -> String {
        processing_key(&self.queue, &self.consumer_id)
    }

    pub fn heartbeat_key(&self) -> String {
        format!("{}:consumer:{}", self.queue, self.consumer_id)
    }

    pub fn dead_letter_key(&self) -> String {
        dead_letter_key(&self.queue)
    }
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

/// Moves a dead consumer's processing list back to the head of the queue, unless its heartbeat is
/// alive. Newest first to the right end, so the oldest ends up popped first.
const RECOVER_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local moved = 0
while true do
  local item = redis.call('LPOP', KEYS[1])
  if not item then break end
  redis.call('RPUSH', KEYS[3], item)
  moved = moved + 1
end
return moved
"#;

struct Shared {
    options: CeleryConsumerOptions,
    pool: Pool,
    handler: Arc<dyn EventHandler>,
    permits: Arc<Semaphore>,
    paused: watch::Sender<bool>,
    /// True while the polling loop is not inside a pop (what `pause` waits for).
    parked: watch::Sender<bool>,
    stop_polling: CancellationToken,
    /// Cancelled at shutdown: retries stop waiting and their messages go back to the queue.
    shutdown: CancellationToken,
    stats: Arc<QueueStats>,
}

/// A running Celery consumer.
pub struct CeleryConsumer {
    shared: Arc<Shared>,
    polling: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    heartbeat: JoinHandle<()>,
}

impl CeleryConsumer {
    /// Connects, announces itself (heartbeat), recovers dead consumers' messages and starts
    /// consuming. `redis_url` is the server's (`hub::redis_url`); the blocking pop gets its own
    /// connection so it never holds a pooled one.
    pub async fn start(
        redis_url: &str,
        pool: Pool,
        handler: Arc<dyn EventHandler>,
        options: CeleryConsumerOptions,
    ) -> Result<CeleryConsumer, CeleryError> {
        let client = redis::Client::open(redis_url).map_err(|error| CeleryError::Redis(error.to_string()))?;
        let blocking = ConnectionManager::new_with_config(client, ConnectionManagerConfig::new())
            .await
            .map_err(|error| CeleryError::Redis(error.to_string()))?;
        info!("🍆 Starting Celery worker...");
        let concurrency = options.concurrency.max(1);
        let shared = Arc::new(Shared {
            options,
            pool,
            handler,
            permits: Arc::new(Semaphore::new(concurrency)),
            paused: watch::Sender::new(false),
            parked: watch::Sender::new(true),
            stop_polling: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            stats: Arc::new(QueueStats::default()),
        });
        shared.beat().await.map_err(CeleryError::Redis)?;
        let heartbeat = tokio::spawn(Arc::clone(&shared).heartbeat_loop());
        if let Err(reason) = shared.recover_dead_consumers().await {
            warn!("⚠️ Could not recover messages of stopped Celery consumers: {reason}");
        }
        let polling = tokio::spawn(Arc::clone(&shared).poll_loop(blocking));
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

    /// Messages being handled right now.
    pub fn in_flight(&self) -> usize {
        self.shared.options.concurrency.max(1) - self.shared.permits.available_permits()
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
    pub async fn run_until(&self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        self.stop().await;
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
        let all = shared.options.concurrency.max(1) as u32;
        let _ = shared.permits.acquire_many(all).await;
        self.heartbeat.abort();
        if let Ok(mut connection) = shared.pool.get().await {
            let _: Result<i64, _> =
                redis::cmd("DEL").arg(shared.options.heartbeat_key()).query_async(&mut connection).await;
        }
        info!("🛑 Celery worker disconnected!");
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

    async fn beat(&self) -> Result<(), String> {
        let mut connection = self.pool.get().await.map_err(|error| error.to_string())?;
        redis::cmd("SET")
            .arg(self.options.heartbeat_key())
            .arg(format_iso(&Utc::now()))
            .arg("PX")
            .arg(self.options.heartbeat_ttl.as_millis().max(1) as u64)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| error.to_string())
    }

    /// Renews the heartbeat three times per TTL and recovers dead consumers' lists once per TTL.
    async fn heartbeat_loop(self: Arc<Self>) {
        let period = (self.options.heartbeat_ttl / 3).max(Duration::from_millis(10));
        let mut beats = 0u32;
        loop {
            tokio::time::sleep(period).await;
            if let Err(reason) = self.beat().await {
                warn!("⚠️ Celery consumer heartbeat failed: {reason}");
            }
            beats += 1;
            if beats % 3 == 0 {
                if let Err(reason) = self.recover_dead_consumers().await {
                    warn!("⚠️ Could not recover messages of stopped Celery consumers: {reason}");
                }
            }
        }
    }

    async fn recover_dead_consumers(&self) -> Result<u64, String> {
        let queue = &self.options.queue;
        let prefix = format!("{queue}:processing:");
        let pattern = format!("{}*", escape_glob(&prefix));
        let mut connection = self.pool.get().await.map_err(|error| error.to_string())?;
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut connection)
                .await
                .map_err(|error| error.to_string())?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let script = redis::Script::new(RECOVER_SCRIPT);
        let mut recovered = 0u64;
        for key in keys {
            let Some(consumer_id) = key.strip_prefix(&prefix) else { continue };
            if consumer_id == self.options.consumer_id {
                continue;
            }
            let heartbeat = format!("{queue}:consumer:{consumer_id}");
            let moved: i64 = script
                .key(&key)
                .key(&heartbeat)
                .key(queue)
                .invoke_async(&mut connection)
                .await
                .map_err(|error| error.to_string())?;
            if moved > 0 {
                warn!("♻️ Put {moved} unfinished message(s) of stopped Celery consumer {consumer_id} back on {queue}");
                recovered += moved as u64;
            }
        }
        Ok(recovered)
    }

    async fn poll_loop(self: Arc<Self>, mut blocking: ConnectionManager) {
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
                permit = Arc::clone(&self.permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            self.parked.send_replace(false);
            let mut permits = vec![first];
            self.take_free_permits(&mut permits);
            if permits.len() < self.options.concurrency.min(MAX_PREFETCH) / 4 {
                // Only a few slots free: let the handlers finishing right now free theirs, so one
                // round trip moves a batch instead of a message per finished handler.
                tokio::time::sleep(Duration::from_millis(1)).await;
                self.take_free_permits(&mut permits);
            }
            match self.pop(&mut blocking, &queue, &processing, permits.len()).await {
                Ok(items) => {
                    for (raw, permit) in items.into_iter().zip(permits) {
                        QueueStats::bump(&self.stats.received);
                        tokio::spawn(Arc::clone(&self).handle(raw, permit));
                    }
                }
                Err(reason) => {
                    drop(permits);
                    error!("⚠️ An error occured in Celery broker: {reason}");
                    tokio::select! {
                        _ = self.stop_polling.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    fn take_free_permits(&self, permits: &mut Vec<OwnedSemaphorePermit>) {
        while permits.len() < MAX_PREFETCH {
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
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
    ) -> Result<Vec<String>, String> {
        let mut pipe = redis::pipe();
        for _ in 0..wanted {
            pipe.cmd("RPOPLPUSH").arg(queue).arg(processing);
        }
        let popped: Vec<Option<String>> = pipe.query_async(blocking).await.map_err(|error| error.to_string())?;
        let items: Vec<String> = popped.into_iter().flatten().collect();
        if !items.is_empty() {
            return Ok(items);
        }
        let timeout_secs = self.options.poll_timeout.as_secs_f64().max(0.01);
        let item: Option<String> = redis::cmd("BRPOPLPUSH")
            .arg(queue)
            .arg(processing)
            .arg(timeout_secs)
            .query_async(blocking)
            .await
            .map_err(|error| error.to_string())?;
        Ok(item.into_iter().collect())
    }

    async fn handle(self: Arc<Self>, raw: String, _permit: OwnedSemaphorePermit) {
        let task = match decode_task(&self.options.queue, &raw, self.options.tasks) {
            Ok(task) => task,
            Err(error) => {
                warn!("⚠️ Setting aside Celery message: {error}");
                return self.finish(&raw, Finish::DeadLetter(error.to_string())).await;
            }
        };
        let (what, handler) = (task_description(&task), Arc::clone(&self.handler));
        let outcome = self
            .options
            .retry
            .run(&what, &self.shutdown, &self.stats, || {
                let (handler, task) = (Arc::clone(&handler), task.clone());
                async move {
                    match task {
                        CeleryTask::ProcessEvent(event) => handler.handle_event(*event).await,
                        CeleryTask::PluginJob(job) => handler.handle_plugin_job(job).await,
                    }
                }
            })
            .await;
        let finish = match outcome {
            Outcome::Handled => Finish::Done,
            Outcome::Failed(reason) => {
                warn!("⚠️ Setting aside Celery message ({what}): {reason}");
                Finish::DeadLetter(reason)
            }
            Outcome::Interrupted => Finish::Requeue,
        };
        self.finish(&raw, finish).await;
    }

    /// Removes the message from the processing list, dead-lettering or requeueing it in the same
    /// transaction. Retried for a while if Redis is unavailable; if that fails the message stays
    /// in the processing list and is redelivered by recovery (at least once, never lost).
    async fn finish(&self, raw: &str, finish: Finish) {
        let processing = self.options.processing_key();
        let mut pipe = redis::pipe();
        if !matches!(finish, Finish::Done) {
            pipe.atomic();
        }
        match &finish {
            Finish::Done => {}
            Finish::DeadLetter(reason) => {
                let entry = json!({
                    "queue": self.options.queue,
                    "reason": reason,
                    "failed_at": format_iso(&Utc::now()),
                    "consumer": self.options.consumer_id,
                    "message": raw,
                });
                let key = self.options.dead_letter_key();
                pipe.cmd("LPUSH").arg(&key).arg(entry.to_string()).ignore();
                pipe.cmd("LTRIM").arg(&key).arg(0).arg(self.options.dead_letter_max_len.max(1) as i64 - 1).ignore();
            }
            Finish::Requeue => {
                pipe.cmd("RPUSH").arg(&self.options.queue).arg(raw).ignore();
            }
        }
        pipe.cmd("LREM").arg(&processing).arg(1).arg(raw).ignore();
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=10 {
            let result = match self.pool.get().await {
                Ok(mut connection) => pipe.query_async::<()>(&mut connection).await.map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match result {
                Ok(()) => {
                    let counter = match finish {
                        Finish::Done => &self.stats.handled,
                        Finish::DeadLetter(_) => &self.stats.dead_lettered,
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

enum Finish {
    Done,
    DeadLetter(String),
    Requeue,
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
