//! The Kafka consumer (`KAFKA_ENABLED=true`): a consumer group on `KAFKA_CONSUMPTION_TOPIC` that
//! decodes raw event messages and hands each event to the [`EventHandler`].
//!
//! Delivery is at least once. Up to [`super::consumer_concurrency`] events of one team (the
//! reference's `WORKER_CONCURRENCY × TASKS_PER_WORKER`, times [`super::EVENTS_IN_FLIGHT_PER_TASK`])
//! and twice that in all are handled at once, a new message taken as soon as any finishes (a
//! sliding window: the reference's batches wait for their slowest event). An event whose team
//! is at its share is held back in memory (its offset in hand: the commit point waits for it) and
//! gives its place to other teams' events ([`super::window`]); while the held events fill their
//! bound, no more messages are taken. Per partition, the offset stored is the end
//! of the prefix of events that are done, and only after a producer flush that covers everything
//! those events queued (so their own writes are in Kafka); it is committed by the auto-commit
//! (every 1000 ms, as the reference) and at shutdown. A crash loses no event: what was not stored
//! is consumed again.
//!
//! A thread of its own polls the consumer (librdkafka serves rebalances there) and passes the
//! messages on. On a partition revoke the revoke waits while the consumer loop stops taking that
//! partition's events, waits up to [`REVOKE_DRAIN_TIMEOUT`] for those in hand (then abandons the
//! rest: their new owner handles them), flushes the producer, stores the handled prefix, and the
//! revoke commits it synchronously before it returns: a clean rebalance hands over without
//! duplicates. (The reference's kafkajs consumer only stops at its batch's next sub-batch.)
//!
//! Differences from the reference: a message that is not a valid event goes to
//! `events_dead_letter_queue` and consumption goes on (the reference's poison pill); the batch size
//! is never zero; a message whose handling crashed the process `KAFKA_MAX_DELIVERY_ATTEMPTS`
//! times is dead-lettered ([`super::kafka_deliveries`]); a failed Kafka delivery stops the
//! consumer with an error without committing (the server then exits and the events are
//! re-consumed) instead of being lost — messages refused for good are dead-lettered by the
//! producer and do not stop it.
//!
//! Settings as the reference's kafkajs consumer: group `clickhouse-ingestion`, read committed,
//! new groups start at the latest offset, session timeout 30 s, heartbeat 3 s.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::decode::decode_raw_event;
use super::kafka_deliveries::{Admission, DeliveryCounter};
use super::retry::{Outcome, RetryPolicy};
use super::window::{FairWindow, Slot, WindowLimits};
use super::{EventHandler, HandleError, QueueStats};
use crate::config::Config;
use crate::infra::kafka_settings::{self, KafkaSetupError};
use crate::metrics::catalog::{self, Stage};
use crate::sinks::kafka_producer::{KafkaProducerWrapper, ProduceError};
use crate::sinks::messages::{
    dead_letter_record, malformed_message_dead_letter_record, INGEST_EVENT_ERROR_LOCATION,
    KAFKA_CONSUMER_ERROR_LOCATION,
};

/// The reference's consumer group.
pub const CONSUMER_GROUP: &str = "clickhouse-ingestion";

/// How long a partition revoke waits for the events of that partition in hand to finish before
/// abandoning them (well within librdkafka's rebalance timeout).
pub const REVOKE_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages polled ahead of the consumer loop.
const POLLED_AHEAD: usize = 16;

/// How a [`KafkaQueue`] runs.
#[derive(Debug, Clone)]
pub struct KafkaConsumerOptions {
    /// `KAFKA_CONSUMPTION_TOPIC`.
    pub topic: String,
    pub group_id: String,
    /// Events handled at once, all teams together (the sliding window).
    pub concurrency: usize,
    /// Events of one team handled at once (fair share, [`super::window`]).
    pub team_share: usize,
    /// Events held back for their team's share, at most (then no more messages are taken).
    pub held: usize,
    /// Where a group without committed offsets starts: `latest` (the reference) or `earliest`.
    pub offset_reset: String,
    pub session_timeout: Duration,
    /// How long `start` waits for the first partition assignment.
    pub join_timeout: Duration,
    pub retry: RetryPolicy,
    pub client_id: String,
    /// Where delivery counts are kept (`None`: not counted).
    pub redis_url: Option<String>,
    /// `KAFKA_MAX_DELIVERY_ATTEMPTS` (0: not counted).
    pub max_delivery_attempts: u32,
    /// See [`REVOKE_DRAIN_TIMEOUT`].
    pub revoke_drain_timeout: Duration,
}

impl KafkaConsumerOptions {
    pub fn from_config(config: &Config, instance_id: &uuid::Uuid) -> KafkaConsumerOptions {
        let window = super::consumer_window(config);
        KafkaConsumerOptions {
            topic: config
                .KAFKA_CONSUMPTION_TOPIC
                .clone()
                .unwrap_or_else(|| crate::sinks::topics::KAFKA_EVENTS_PLUGIN_INGESTION.to_string()),
            group_id: CONSUMER_GROUP.to_string(),
            concurrency: window.in_flight,
            team_share: window.team_share,
            held: window.held,
            offset_reset: "latest".into(),
            session_timeout: Duration::from_secs(30),
            join_timeout: Duration::from_secs(60),
            retry: RetryPolicy::from_config(config),
            client_id: kafka_settings::client_id(instance_id),
            redis_url: Some(crate::hub::redis_url(config)),
            max_delivery_attempts: config.KAFKA_MAX_DELIVERY_ATTEMPTS,
            revoke_drain_timeout: REVOKE_DRAIN_TIMEOUT,
        }
    }
}

/// What the polling thread tells the consumer loop besides messages.
enum Control {
    /// These partitions are being revoked: drain them, store what is done, then answer.
    Revoke { partitions: Vec<PartitionKey>, done: std::sync::mpsc::Sender<()> },
}

/// Re-applies a pause to partitions assigned while paused, announces joining the group, and hands
/// revokes to the consumer loop.
struct QueueContext {
    paused: Arc<AtomicBool>,
    joined: watch::Sender<bool>,
    group_id: String,
    control: mpsc::UnboundedSender<Control>,
    revoke_timeout: Duration,
    /// Cleared when the queue stops or is dropped.
    polling: Arc<AtomicBool>,
}

impl ClientContext for QueueContext {}

impl ConsumerContext for QueueContext {
    /// Runs on the polling thread, before librdkafka takes the partitions away: the consumer loop
    /// finishes or abandons their events and stores the handled prefix, which is committed here.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let partitions = partition_keys(revoked);
        if partitions.is_empty() {
            return;
        }
        info!("🔀 Kafka partitions revoked: {partitions:?}");
        let (done, answered) = std::sync::mpsc::channel();
        if self.control.send(Control::Revoke { partitions, done }).is_ok() {
            // The loop answers within its drain timeout plus a flush. It may also be gone or going
            // (the queue stopped or dropped): then there is nothing to wait for.
            let deadline = std::time::Instant::now() + self.revoke_timeout + Duration::from_secs(30);
            loop {
                match answered.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                if self.control.is_closed() || !self.polling.load(Ordering::SeqCst) {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    warn!("⚠️ The Kafka consumer loop did not finish the revoked partitions in time");
                    break;
                }
            }
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => warn!("⚠️ Committing Kafka offsets on revoke failed: {error}"),
        }
        debug!("🔀 Revoke handled");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                if !*self.joined.borrow() {
                    info!("✅ Kafka consumer joined group {}!", self.group_id);
                }
                info!("🔀 Kafka partitions assigned: {:?}", partition_keys(partitions));
                if self.paused.load(Ordering::SeqCst) && partitions.count() > 0 {
                    if let Err(error) = consumer.pause(partitions) {
                        warn!("⚠️ Could not pause newly assigned partitions: {error}");
                    }
                }
                self.joined.send_replace(true);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => warn!("⚠️ Kafka consumer rebalance error: {error}"),
        }
    }
}

/// The topic and partition of each element of a rebalance's list.
fn partition_keys(list: &TopicPartitionList) -> Vec<PartitionKey> {
    list.elements().iter().map(|element| (element.topic().to_string(), element.partition())).collect()
}

/// Why the consumer stopped on its own (the server then shuts down; nothing unhandled was
/// committed, so a restart consumes it again).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KafkaConsumerError {
    /// A flush failed: the offsets covering those writes are not stored.
    #[error("Kafka production failed, not committing: {0}")]
    Production(#[source] ProduceError),
    /// The thread polling the broker ended.
    #[error("the Kafka polling thread ended")]
    PollerEnded,
    /// The consuming task ended without a result (it panicked).
    #[error("Kafka consumer task ended")]
    TaskEnded,
}

type QueueConsumer = BaseConsumer<QueueContext>;

struct Shared {
    consumer: Arc<QueueConsumer>,
    options: KafkaConsumerOptions,
    handler: Arc<dyn EventHandler>,
    producer: Arc<KafkaProducerWrapper>,
    deliveries: Arc<DeliveryCounter>,
    paused: Arc<AtomicBool>,
    window: Arc<FairWindow>,
    stop: CancellationToken,
    /// Tells the polling thread to end.
    polling: Arc<AtomicBool>,
    stats: Arc<QueueStats>,
}

/// A running Kafka ingestion consumer.
pub struct KafkaQueue {
    shared: Arc<Shared>,
    finished: watch::Receiver<Option<Result<(), KafkaConsumerError>>>,
}

enum MessageOutcome {
    /// Handled or dead-lettered; the delivery count key to forget, if counted.
    Done(Option<String>),
    Interrupted,
}

type PartitionKey = (String, i32);
/// A partition and the next offset to read there (everything before it is handled).
type PartitionOffset = (PartitionKey, i64);

/// Which offsets of each partition are in hand, and how far the handled prefix reaches. Messages
/// of a partition arrive in offset order and finish in any order; the offset that may be stored
/// is the oldest one still in hand or, with none in hand, one past the newest finished.
#[derive(Default)]
struct OffsetTracker {
    partitions: HashMap<PartitionKey, PartitionProgress>,
}

#[derive(Default)]
struct PartitionProgress {
    /// Offsets in hand (a count, since after a rebalance an offset can be in hand twice).
    in_hand: BTreeMap<i64, usize>,
    /// One past the newest offset taken.
    next_after_newest: i64,
    /// The last offset returned by `take_progress`; at first the first offset taken (storing
    /// that would say nothing).
    reported: i64,
}

impl PartitionProgress {
    fn storable(&self) -> i64 {
        self.in_hand.keys().next().copied().unwrap_or(self.next_after_newest)
    }
}

impl OffsetTracker {
    fn start(&mut self, key: PartitionKey, offset: i64) {
        let partition =
            self.partitions.entry(key).or_insert_with(|| PartitionProgress { reported: offset, ..Default::default() });
        *partition.in_hand.entry(offset).or_insert(0) += 1;
        partition.next_after_newest = offset + 1;
    }

    fn finish(&mut self, key: PartitionKey, offset: i64) {
        if let Some(partition) = self.partitions.get_mut(&key) {
            if let Some(count) = partition.in_hand.get_mut(&offset) {
                *count -= 1;
                if *count == 0 {
                    partition.in_hand.remove(&offset);
                }
            }
        }
    }

    /// Whether any event of these partitions is in hand.
    fn any_in_hand(&self, keys: &[PartitionKey]) -> bool {
        keys.iter().any(|key| self.partitions.get(key).is_some_and(|partition| !partition.in_hand.is_empty()))
    }

    /// Forgets partitions (revoked: their offsets are no longer ours to store).
    fn remove(&mut self, keys: &[PartitionKey]) {
        for key in keys {
            self.partitions.remove(key);
        }
    }

    /// The partitions whose storable offset moved since the last call, with that offset.
    fn take_progress(&mut self) -> Vec<PartitionOffset> {
        let mut progress = Vec::new();
        for (key, partition) in &mut self.partitions {
            let storable = partition.storable();
            if storable != partition.reported {
                partition.reported = storable;
                progress.push((key.clone(), storable));
            }
        }
        progress
    }
}

/// An event's handling, once over: `None` in the outcome when it was abandoned.
type Finishing = BoxFuture<'static, (u64, PartitionKey, i64, Option<MessageOutcome>)>;
/// A producer flush in progress, and the offsets to store once it succeeded.
type Storing = Option<BoxFuture<'static, (Result<(), ProduceError>, Vec<PartitionOffset>)>>;

/// The events in hand, each abortable (a revoke abandons those of its partitions).
struct InHand {
    futures: FuturesUnordered<Finishing>,
    aborts: HashMap<u64, (PartitionKey, AbortHandle)>,
    next_id: u64,
}

impl InHand {
    fn new() -> InHand {
        InHand { futures: FuturesUnordered::new(), aborts: HashMap::new(), next_id: 0 }
    }

    fn len(&self) -> usize {
        self.futures.len()
    }

    fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    fn push(&mut self, key: PartitionKey, offset: i64, work: BoxFuture<'static, MessageOutcome>) {
        let id = self.next_id;
        self.next_id += 1;
        let (handle, registration) = AbortHandle::new_pair();
        self.aborts.insert(id, (key.clone(), handle));
        self.futures
            .push(Abortable::new(work, registration).map(move |outcome| (id, key, offset, outcome.ok())).boxed());
    }

    /// The next finished event: `None` in the outcome when it was abandoned.
    async fn next(&mut self) -> Option<(PartitionKey, i64, Option<MessageOutcome>)> {
        let (id, key, offset, outcome) = self.futures.next().await?;
        self.aborts.remove(&id);
        Some((key, offset, outcome))
    }

    fn abort(&mut self, keys: &[PartitionKey]) -> usize {
        let mut count = 0;
        self.aborts.retain(|_, (key, handle)| {
            let revoked = keys.contains(key);
            if revoked {
                handle.abort();
                count += 1;
            }
            !revoked
        });
        count
    }
}

impl KafkaQueue {
    /// Subscribes and returns once the consumer has joined its group (its first assignment), as the
    /// reference's `start()` does. Events go to `handler`; dead letters and every write the handler
    /// queues go through `producer`, which is flushed before offsets are stored.
    pub async fn start(
        config: &Config,
        options: KafkaConsumerOptions,
        handler: Arc<dyn EventHandler>,
        producer: Arc<KafkaProducerWrapper>,
    ) -> Result<KafkaQueue, KafkaSetupError> {
        let mut client = kafka_settings::base_config(config, &options.client_id)?;
        client
            .set("group.id", &options.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", &options.offset_reset)
            .set("session.timeout.ms", options.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (options.session_timeout.as_millis() / 10).clamp(100, 3000).to_string())
            // librdkafka's prefetch (`queued.max.messages.kbytes`) stays at its 64 MiB default:
            // at 16 MiB the e2e bench fell from 12,472 to 3,802 events/s with a 300k backlog on
            // the loopback broker, and peak RSS did not move (166 vs 169 MiB).
            .set("max.partition.fetch.bytes", "1048576");
        let paused = Arc::new(AtomicBool::new(false));
        let (joined_sender, mut joined) = watch::channel(false);
        let (control_sender, control) = mpsc::unbounded_channel();
        let polling = Arc::new(AtomicBool::new(true));
        let context = QueueContext {
            polling: Arc::clone(&polling),
            paused: Arc::clone(&paused),
            joined: joined_sender,
            group_id: options.group_id.clone(),
            control: control_sender,
            revoke_timeout: options.revoke_drain_timeout,
        };
        info!("⏬ Connecting Kafka consumer to {}...", config.KAFKA_HOSTS.as_deref().unwrap_or_default());
        let consumer: QueueConsumer = client.create_with_context(context)?;
        consumer.subscribe(&[options.topic.as_str()])?;
        let join_timeout = options.join_timeout;
        let deliveries = Arc::new(DeliveryCounter::new(
            options.redis_url.as_deref(),
            &options.group_id,
            options.max_delivery_attempts,
        ));
        let stats = Arc::new(QueueStats::default());
        let limits = WindowLimits::new(options.concurrency, options.team_share, options.held);
        let window = FairWindow::new(limits, Arc::clone(&stats), "Kafka");
        let shared = Arc::new(Shared {
            consumer: Arc::new(consumer),
            window,
            options,
            handler,
            producer,
            deliveries,
            paused,
            stop: CancellationToken::new(),
            polling,
            stats,
        });
        let messages = shared.spawn_poller()?;
        let (finished_sender, finished) = watch::channel(None);
        let looping = Arc::clone(&shared);
        tokio::spawn(async move {
            let result = looping.consume_loop(messages, control).await;
            if let Err(reason) = &result {
                error!("💥 Kafka consumer stopped: {reason}");
            }
            finished_sender.send_replace(Some(result));
        });
        let queue = KafkaQueue { shared, finished };
        let joined_in_time =
            tokio::time::timeout(join_timeout, joined.wait_for(|joined| *joined)).await.is_ok_and(|r| r.is_ok());
        match joined_in_time {
            true => Ok(queue),
            false => {
                queue.stop().await;
                Err(KafkaSetupError::JoinTimeout(join_timeout))
            }
        }
    }

    pub fn stats(&self) -> Arc<QueueStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Stops fetching from the consumption topic (events already fetched are still handled).
    pub fn pause(&self) {
        if !self.shared.paused.swap(true, Ordering::SeqCst) {
            info!("⏳ Pausing Kafka consumer...");
            self.shared.set_paused(true);
            info!("⏸ Kafka consumer paused!");
        }
    }

    pub fn resume(&self) {
        if self.shared.paused.swap(false, Ordering::SeqCst) {
            info!("⏳ Resuming Kafka consumer...");
            self.shared.set_paused(false);
            info!("▶️ Kafka consumer resumed!");
        }
    }

    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Resolves when the consumer stopped: `Ok` after [`Self::stop`], `Err` when it had to stop on
    /// its own (the server should then shut down; nothing unhandled was committed).
    pub async fn finished(&self) -> Result<(), KafkaConsumerError> {
        let mut finished = self.finished.clone();
        let result = match finished.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Ok(())),
            Err(_) => Err(KafkaConsumerError::TaskEnded),
        };
        result
    }

    /// For a server component: consumes until `shutdown` is cancelled (then stops gracefully and
    /// returns `Ok`) or the consumer fails on its own (`Err`: the server should shut down; nothing
    /// unhandled was committed, so a restart re-consumes it).
    pub async fn run_until(&self, shutdown: CancellationToken) -> Result<(), KafkaConsumerError> {
        tokio::select! {
            _ = shutdown.cancelled() => {
                self.stop().await;
                Ok(())
            }
            result = self.finished() => {
                self.stop().await;
                result
            }
        }
    }

    /// Finishes the events in hand (waiting retries are abandoned and those events not committed),
    /// commits what was handled, and leaves the group.
    pub async fn stop(&self) {
        info!("⏳ Stopping Kafka queue...");
        self.shared.stop.cancel();
        let _ = self.finished().await;
        let consumer = Arc::clone(&self.shared.consumer);
        let polling = Arc::clone(&self.shared.polling);
        // librdkafka calls block (a commit, leaving the group): off the async threads.
        let left = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => {}
                Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
                Err(error) => warn!("⚠️ Committing Kafka offsets at shutdown failed: {error}"),
            }
            consumer.unsubscribe();
            // The polling thread serves the revoke of the unsubscribe, then ends.
            std::thread::sleep(Duration::from_millis(200));
            polling.store(false, Ordering::SeqCst);
        })
        .await;
        if let Err(error) = left {
            warn!("⚠️ Leaving the Kafka group failed: {error}");
        }
        info!("⏹ Kafka consumer stopped!");
    }
}

impl Drop for KafkaQueue {
    fn drop(&mut self) {
        self.shared.polling.store(false, Ordering::SeqCst);
    }
}

impl Shared {
    fn set_paused(&self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else { return };
        let mut partitions = TopicPartitionList::new();
        for element in assignment.elements_for_topic(&self.options.topic) {
            partitions.add_partition(element.topic(), element.partition());
        }
        let result = if paused { self.consumer.pause(&partitions) } else { self.consumer.resume(&partitions) };
        if let Err(error) = result {
            warn!("⚠️ Could not {} Kafka consumer: {error}", if paused { "pause" } else { "resume" });
        }
    }

    /// Polls the consumer on a thread of its own (where librdkafka also runs the rebalance
    /// callbacks, which may block) and passes messages on, a few ahead of the loop.
    fn spawn_poller(&self) -> std::io::Result<mpsc::Receiver<OwnedMessage>> {
        let (sender, messages) = mpsc::channel(POLLED_AHEAD);
        // Weak: the queue's owner decides when the consumer closes (when the queue is dropped, at
        // once, as a crashed server's would), not this thread.
        let consumer = Arc::downgrade(&self.consumer);
        let polling = Arc::clone(&self.polling);
        std::thread::Builder::new().name("kafka-poll".into()).spawn(move || {
            while polling.load(Ordering::SeqCst) {
                let Some(consumer) = consumer.upgrade() else { break };
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    // An error means the loop is gone: keep serving callbacks until told to end.
                    Some(Ok(message)) => drop(sender.blocking_send(message.detach())),
                    Some(Err(error)) => {
                        warn!("⚠️ Kafka consumer error: {error}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            debug!("Kafka polling thread ends");
        })?;
        Ok(messages)
    }

    /// Keeps the window full: a new message is taken as soon as the window has room (an event
    /// finished, or one was held back for its team's share; no batch waits for its slowest event). Offsets advance per partition over the
    /// completed prefix only; they are stored after a producer flush that covers every write the
    /// completed events queued, while the next events are already being handled.
    async fn consume_loop(
        self: &Arc<Self>,
        mut messages: mpsc::Receiver<OwnedMessage>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), KafkaConsumerError> {
        let mut in_hand = InHand::new();
        // A place in the window reserved for the next message.
        let mut slot: Option<Slot> = None;
        let mut offsets = OffsetTracker::default();
        let mut storing: Storing = None;
        // Messages polled before a revoke, of partitions still ours.
        let mut backlog: VecDeque<OwnedMessage> = VecDeque::new();
        // Delivery count keys of events done, forgotten in batches.
        let mut finished_keys: Vec<String> = Vec::new();
        let mut interrupted = false;
        // `kafka_queue.each_batch`: the events completed between two offset stores form a batch;
        // its time runs from the previous store to the flush-and-store that commits it.
        let mut batch_started = std::time::Instant::now();
        loop {
            if storing.is_none() {
                let progress = offsets.take_progress();
                if !progress.is_empty() {
                    let producer = Arc::clone(&self.producer);
                    storing = Some(async move { (producer.flush().await, progress) }.boxed());
                    self.forget_deliveries(&mut finished_keys);
                }
            }
            if interrupted || (self.stop.is_cancelled() && in_hand.is_empty()) {
                break;
            }
            while !backlog.is_empty() && !self.stop.is_cancelled() {
                let Some(reserved) = slot.take().or_else(|| self.window.try_reserve()) else { break };
                let Some(message) = backlog.pop_front() else { break };
                self.take(message, reserved, &mut in_hand, &mut offsets);
            }
            tokio::select! {
                biased;
                Some(Control::Revoke { partitions, done }) = control.recv() => {
                    let result = self
                        .revoke(&partitions, &mut messages, &mut backlog, &mut in_hand, &mut offsets, &mut storing, &mut finished_keys)
                        .await;
                    let _ = done.send(());
                    result?;
                }
                Some((key, offset, outcome)) = in_hand.next(), if !in_hand.is_empty() => match outcome {
                    Some(MessageOutcome::Done(counted)) => {
                        offsets.finish(key, offset);
                        finished_keys.extend(counted);
                    }
                    Some(MessageOutcome::Interrupted) => interrupted = true,
                    None => {}
                },
                (flushed, progress) = async {
                    match storing.as_mut() {
                        Some(flush) => flush.await,
                        None => std::future::pending().await,
                    }
                }, if storing.is_some() => {
                    storing = None;
                    flushed.map_err(KafkaConsumerError::Production)?;
                    self.store_offsets(&progress);
                    catalog::each_batch(batch_started.elapsed());
                    batch_started = std::time::Instant::now();
                }
                _ = self.stop.cancelled(), if !self.stop.is_cancelled() => {}
                reserved = self.window.reserve(), if slot.is_none() && !self.stop.is_cancelled() => {
                    slot = Some(reserved);
                }
                message = messages.recv(), if slot.is_some() && !self.stop.is_cancelled() => match (message, slot.take()) {
                    (Some(message), Some(reserved)) => self.take(message, reserved, &mut in_hand, &mut offsets),
                    (Some(message), None) => backlog.push_back(message),
                    (None, _) => return Err(KafkaConsumerError::PollerEnded),
                },
            }
        }
        if interrupted {
            // Waiting retries were abandoned: those events stay uncommitted and come again.
            info!("🚪 Bailing out: {} more events in hand are not committed", in_hand.len());
            while in_hand.next().await.is_some() {}
        }
        // What completed before the stop is stored, after the flush that delivers its writes.
        if let Some(pending) = storing.take() {
            let (flushed, progress) = pending.await;
            flushed.map_err(KafkaConsumerError::Production)?;
            self.store_offsets(&progress);
        }
        self.store_done(&mut offsets).await?;
        self.forget_deliveries(&mut finished_keys);
        Ok(())
    }

    fn take(self: &Arc<Self>, message: OwnedMessage, slot: Slot, in_hand: &mut InHand, offsets: &mut OffsetTracker) {
        let key = (message.topic().to_string(), message.partition());
        let offset = message.offset();
        offsets.start(key.clone(), offset);
        let shared = Arc::clone(self);
        in_hand.push(key, offset, async move { shared.process_message(&message, slot).await }.boxed());
    }

    /// Flushes the producer and stores the handled prefix of every partition that moved.
    async fn store_done(&self, offsets: &mut OffsetTracker) -> Result<(), KafkaConsumerError> {
        let progress = offsets.take_progress();
        if !progress.is_empty() {
            self.producer.flush().await.map_err(KafkaConsumerError::Production)?;
            self.store_offsets(&progress);
        }
        Ok(())
    }

    fn forget_deliveries(&self, keys: &mut Vec<String>) {
        if keys.is_empty() || !self.deliveries.enabled() {
            keys.clear();
            return;
        }
        let keys = std::mem::take(keys);
        let counter = Arc::clone(&self.deliveries);
        tokio::spawn(async move { counter.forget(&keys).await });
    }

    /// A partition revoke: stop taking its events, wait (bounded) for those in hand, abandon the
    /// rest, flush the producer and store the handled prefix (the revoke then commits it).
    #[allow(clippy::too_many_arguments)]
    async fn revoke(
        self: &Arc<Self>,
        partitions: &[PartitionKey],
        messages: &mut mpsc::Receiver<OwnedMessage>,
        backlog: &mut VecDeque<OwnedMessage>,
        in_hand: &mut InHand,
        offsets: &mut OffsetTracker,
        storing: &mut Storing,
        finished_keys: &mut Vec<String>,
    ) -> Result<(), KafkaConsumerError> {
        // The poller waits in the revoke: what it passed on so far is all there is.
        while let Ok(message) = messages.try_recv() {
            backlog.push_back(message);
        }
        let revoked: HashSet<&PartitionKey> = partitions.iter().collect();
        let before = backlog.len();
        backlog.retain(|message| !revoked.contains(&(message.topic().to_string(), message.partition())));
        let deadline = tokio::time::Instant::now() + self.options.revoke_drain_timeout;
        while offsets.any_in_hand(partitions) {
            tokio::select! {
                Some((key, offset, outcome)) = in_hand.next() => match outcome {
                    Some(MessageOutcome::Done(counted)) => {
                        offsets.finish(key, offset);
                        finished_keys.extend(counted);
                    }
                    // Shutting down meanwhile: this event stays uncommitted.
                    Some(MessageOutcome::Interrupted) | None => {}
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let abandoned = in_hand.abort(partitions);
        if abandoned > 0 {
            warn!(
                "⚠️ Revoke: abandoned {abandoned} events still in hand after {:?}",
                self.options.revoke_drain_timeout
            );
        }
        info!("🔀 Revoke: {} polled events dropped, handled prefix stored", before - backlog.len());
        if let Some(pending) = storing.take() {
            let (flushed, progress) = pending.await;
            flushed.map_err(KafkaConsumerError::Production)?;
            self.store_offsets(&progress);
        }
        self.store_done(offsets).await?;
        offsets.remove(partitions);
        self.forget_deliveries(finished_keys);
        Ok(())
    }

    /// Stores (for the auto-commit) the next offset to read of each partition.
    fn store_offsets(&self, progress: &[PartitionOffset]) {
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in progress {
            if let Err(error) = offsets.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                warn!("⚠️ Bad offset {next} for {topic}/{partition}: {error}");
            }
        }
        if let Err(error) = self.consumer.store_offsets(&offsets) {
            // Typically the partition was revoked meanwhile: its new owner consumes these again.
            warn!("⚠️ Could not store Kafka offsets: {error}");
        }
        debug!("🧩 Kafka offsets stored: {progress:?}");
    }

    /// Handles one message in its place of the window (`slot`, released when done).
    async fn process_message(self: &Arc<Self>, message: &OwnedMessage, slot: Slot) -> MessageOutcome {
        QueueStats::bump(&self.stats.received);
        catalog::received(Stage::Consumer, "kafka", 1);
        let event = match decode_raw_event(message.payload()) {
            Ok(event) => event,
            Err(reason) => {
                warn!(
                    "⚠️ Dead-lettering Kafka message {}/{}@{}: {reason}",
                    message.topic(),
                    message.partition(),
                    message.offset()
                );
                let record = malformed_message_dead_letter_record(
                    message.payload().unwrap_or_default(),
                    &reason.to_string(),
                    &Utc::now(),
                );
                return self.dead_letter(record, None, "undecodable").await;
            }
        };
        // Its team's share of the window; held back meanwhile (not yet counted as a delivery). At
        // shutdown a held event is left uncommitted: it comes again.
        let _slot = tokio::select! {
            slot = slot.admit(event.team_id) => slot,
            _ = self.stop.cancelled() => return MessageOutcome::Interrupted,
        };
        let counted = self
            .deliveries
            .enabled()
            .then(|| self.deliveries.key(message.topic(), message.partition(), message.offset()));
        let (_guard, suspect) = match &counted {
            None => (None, false),
            Some(key) => match self.deliveries.admit(key).await {
                Admission::Handle { guard, suspect } => (Some(guard), suspect),
                Admission::DeadLetter { attempts } => {
                    let reason = format!(
                        "its handling was started {attempts} times without finishing (the server crashed or was killed each time)"
                    );
                    warn!(
                        "🪦 Dead-lettering poison Kafka message {}/{}@{}: {reason}",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    );
                    let record = dead_letter_record(&event, &reason, KAFKA_CONSUMER_ERROR_LOCATION, &Utc::now());
                    let outcome = self.dead_letter(record, None, "out_of_deliveries").await;
                    self.deliveries.forget(std::slice::from_ref(key)).await;
                    return outcome;
                }
            },
        };
        let what = format!("event {:?} of team {}", event.event, event.team_id);
        // The first attempt gets the event itself; a retry, or the dead-letter record after the
        // last, decodes the message again (the handler consumes and mutates what it is given), so
        // no copy of each event is kept in flight.
        let mut first = Some(event);
        let outcome = self
            .options
            .retry
            .run(&what, &self.stop, &self.stats, || {
                let event = first.take().or_else(|| decode_raw_event(message.payload()).ok());
                let handler = Arc::clone(&self.handler);
                async move {
                    match event {
                        Some(event) => handler.handle_event(event).await,
                        None => Err(HandleError::Rejected("the message no longer decodes".into())),
                    }
                }
            })
            .await;
        // A suspect's count is forgotten at once (the next suspect's fate must not depend on it).
        let counted = match (suspect, counted) {
            (true, Some(key)) => {
                if !matches!(outcome, Outcome::Interrupted) {
                    self.deliveries.forget(std::slice::from_ref(&key)).await;
                }
                None
            }
            (_, counted) => counted,
        };
        match outcome {
            Outcome::Handled => {
                QueueStats::bump(&self.stats.handled);
                catalog::handled(Stage::Consumer, "kafka", 1);
                MessageOutcome::Done(counted)
            }
            Outcome::Failed(reason) => {
                warn!("⚠️ Dead-lettering {what}: {reason}");
                // It decoded before, so it decodes again; were it not to, the payload itself goes.
                let record = match decode_raw_event(message.payload()) {
                    Ok(event) => dead_letter_record(&event, &reason, INGEST_EVENT_ERROR_LOCATION, &Utc::now()),
                    Err(_) => malformed_message_dead_letter_record(
                        message.payload().unwrap_or_default(),
                        &reason,
                        &Utc::now(),
                    ),
                };
                self.dead_letter(record, counted, "handler_failed").await
            }
            Outcome::Interrupted => MessageOutcome::Interrupted,
        }
    }

    /// `reason` is the short word for the counters (`undecodable`, ...).
    async fn dead_letter(
        &self,
        record: crate::sinks::KafkaRecord,
        counted: Option<String>,
        reason: &'static str,
    ) -> MessageOutcome {
        // A failed send is remembered by the producer and fails the batch's flush: not committed.
        if self.producer.queue_message(record).await.is_ok() {
            QueueStats::bump(&self.stats.dead_lettered);
            catalog::dropped(Stage::Consumer, reason, 1);
        }
        MessageOutcome::Done(counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(partition: i32) -> PartitionKey {
        ("events".to_string(), partition)
    }

    #[test]
    fn nothing_is_storable_before_an_event_is_done() {
        let mut tracker = OffsetTracker::default();
        tracker.start(key(0), 40);
        tracker.start(key(0), 41);
        assert!(tracker.take_progress().is_empty());
    }

    #[test]
    fn only_the_done_prefix_is_storable() {
        let mut tracker = OffsetTracker::default();
        for offset in 10..15 {
            tracker.start(key(0), offset);
        }
        // 11 and 12 finish first: 10 is still in hand, so nothing may be stored.
        tracker.finish(key(0), 11);
        tracker.finish(key(0), 12);
        assert!(tracker.take_progress().is_empty());
        tracker.finish(key(0), 10);
        assert_eq!(tracker.take_progress(), vec![(key(0), 13)]);
        // Unchanged since: nothing new to store.
        assert!(tracker.take_progress().is_empty());
        tracker.finish(key(0), 14);
        tracker.finish(key(0), 13);
        assert_eq!(tracker.take_progress(), vec![(key(0), 15)]);
    }

    #[test]
    fn partitions_advance_independently() {
        let mut tracker = OffsetTracker::default();
        tracker.start(key(0), 0);
        tracker.start(key(1), 7);
        tracker.start(key(1), 8);
        tracker.finish(key(1), 7);
        assert_eq!(tracker.take_progress(), vec![(key(1), 8)]);
        tracker.finish(key(0), 0);
        assert_eq!(tracker.take_progress(), vec![(key(0), 1)]);
    }

    #[test]
    fn an_offset_in_hand_twice_after_a_rebalance_holds_the_prefix_until_both_finish() {
        let mut tracker = OffsetTracker::default();
        tracker.start(key(0), 5);
        tracker.start(key(0), 5);
        tracker.start(key(0), 6);
        tracker.finish(key(0), 5);
        assert!(tracker.take_progress().is_empty());
        tracker.finish(key(0), 5);
        assert_eq!(tracker.take_progress(), vec![(key(0), 6)]);
    }
}
