//! The Kafka consumer against a real broker (Tansu on loopback, started by scripts/kafka): raw
//! events reach the handler merged the reference's way, malformed messages and rejected events go
//! to events_dead_letter_queue (the dead-letter-queue.test.ts case) without stopping consumption,
//! pause/resume, a consumer killed mid-batch loses nothing, and a team whose events do not finish
//! takes only its share of the window (issue 14).

mod queues_support;

use std::sync::Arc;
use std::time::Duration;

use plugin_server::sinks::KafkaProducerWrapper;
use plugin_server::sources::retry::RetryPolicy;
use plugin_server::sources::{HandleError, KafkaConsumerOptions, KafkaQueue};
use queues_support::*;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

fn raw_event(distinct_id: &str, event: &str) -> Vec<u8> {
    raw_event_of(2, distinct_id, event)
}

fn raw_event_of(team: i64, distinct_id: &str, event: &str) -> Vec<u8> {
    let data = json!({"event": event, "properties": {"key": "value"}, "distinct_id": distinct_id, "timestamp": "2021-10-28T11:59:57.792Z"});
    json!({"distinct_id": distinct_id, "ip": "127.0.0.1", "site_url": "", "team_id": team, "uuid": uuid::Uuid::new_v4().to_string(),
        "data": data.to_string(), "now": "2021-10-28T12:00:00Z", "sent_at": "2021-10-28T11:59:59Z"})
    .to_string()
    .into_bytes()
}

struct Setup {
    topic: String,
    dead_letters: String,
    config: plugin_server::config::Config,
    options: KafkaConsumerOptions,
    producer: Arc<KafkaProducerWrapper>,
}

/// A topic, a dead-letter topic and a group of this test's own. The dead-letter topic name is the
/// fixed `events_dead_letter_queue`, so rows are told apart by the test's unique distinct ids.
async fn setup(name: &str, concurrency: usize) -> Setup {
    let topic = unique(name);
    let dead_letters = "events_dead_letter_queue".to_string();
    create_topics(&[&topic, &dead_letters], 1).await;
    let config = test_config(&[("KAFKA_CONSUMPTION_TOPIC", &topic)]);
    let options = KafkaConsumerOptions {
        group_id: unique("group"),
        concurrency,
        offset_reset: "earliest".into(),
        session_timeout: Duration::from_secs(6),
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        ..KafkaConsumerOptions::from_config(&config, &uuid::Uuid::new_v4())
    };
    let producer = KafkaProducerWrapper::connect(&config, "test").unwrap();
    Setup { topic, dead_letters, config, options, producer }
}

async fn dead_letters_for(topic: &str, marker: &str, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<Value> = consume_topic_to_end(topic, rdkafka::Offset::Beginning)
            .await
            .into_iter()
            .filter_map(|(_, value)| serde_json::from_slice::<Value>(&value?).ok())
            .filter(|row| row.to_string().contains(marker))
            .collect();
        if rows.len() >= count || tokio::time::Instant::now() > deadline {
            return rows;
        }
    }
}

#[tokio::test]
async fn consumes_events_and_dead_letters_bad_ones() {
    let setup = setup("ingest", 4).await;
    let marker = unique("m");
    let mut values = vec![raw_event(&format!("{marker}-0"), "first")];
    values.push(b"this is not json".to_vec());
    values.push(
        json!({"distinct_id": format!("{marker}-bad"), "team_id": 2, "data": "{not json"}).to_string().into_bytes(),
    );
    values.push(raw_event(&format!("{marker}-rejected"), "default event"));
    for index in 1..6 {
        values.push(raw_event(&format!("{marker}-{index}"), "later"));
    }
    produce(&setup.topic, &values).await;

    let handler = RecordingHandler::answering(vec![]);
    let handler_for_queue = handler.clone();
    // The event of `-rejected` fails ingestion: reject it when it comes.
    let rejecting = Arc::new(RejectOne { inner: handler_for_queue, distinct_id: format!("{marker}-rejected") });
    let queue =
        KafkaQueue::start(&setup.config, setup.options.clone(), rejecting, setup.producer.clone()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async { handler.event_count() == 6 }).await,
        "got {}",
        handler.event_count()
    );
    let first = handler.events().into_iter().find(|event| event.event == "first").unwrap();
    assert_eq!(first.ip, Some(serde_json::json!("127.0.0.1")));
    assert_eq!(first.site_url, "");
    assert_eq!(first.team_id, 2);
    assert_eq!(first.properties.unwrap()["key"], json!("value"));

    assert!(eventually(Duration::from_secs(10), || async { queue.stats().snapshot().dead_lettered == 3 }).await);
    let stats = queue.stats().snapshot();
    assert_eq!((stats.received, stats.handled, stats.dead_lettered), (9, 6, 3));
    queue.stop().await;

    let rows = dead_letters_for(&setup.dead_letters, &marker, 2).await;
    let rejected =
        rows.iter().find(|row| row["distinct_id"] == json!(format!("{marker}-rejected"))).expect("rejected row");
    assert_eq!(rejected["event"], json!("default event"));
    assert_eq!(rejected["ip"], json!("127.0.0.1"));
    assert_eq!(rejected["team_id"], json!(2));
    assert_eq!(rejected["error_location"], json!("plugin_server_ingest_event"));
    assert_eq!(rejected["error"], json!("ingestEvent failed. Error: database unavailable"));
    assert_eq!(rejected["properties"], json!(r#"{"key":"value"}"#));
    let malformed =
        rows.iter().find(|row| row["distinct_id"] == json!(format!("{marker}-bad"))).expect("malformed row");
    assert_eq!(malformed["error_location"], json!("plugin_server_kafka_consumer"));
    assert!(malformed["error"].as_str().unwrap().contains("`data` is not a JSON-encoded object"));
}

/// Rejects the event of one distinct id as "database unavailable", delegating the rest.
struct RejectOne {
    inner: Arc<RecordingHandler>,
    distinct_id: String,
}

#[async_trait::async_trait]
impl plugin_server::sources::EventHandler for RejectOne {
    async fn handle_event(&self, event: plugin_server::event::PluginEvent) -> Result<(), HandleError> {
        if event.distinct_id == self.distinct_id {
            return Err(HandleError::Rejected("database unavailable".into()));
        }
        self.inner.handle_event(event).await
    }
    async fn handle_plugin_job(&self, job: Value) -> Result<(), HandleError> {
        self.inner.handle_plugin_job(job).await
    }
}

#[tokio::test]
async fn pause_and_resume() {
    let setup = setup("pause", 4).await;
    produce(&setup.topic, &[raw_event("p-0", "e")]).await;
    let handler = RecordingHandler::new();
    let queue =
        KafkaQueue::start(&setup.config, setup.options.clone(), handler.clone(), setup.producer.clone()).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || async { handler.event_count() == 1 }).await);
    queue.pause();
    assert!(queue.is_paused());
    produce(&setup.topic, &[raw_event("p-1", "e"), raw_event("p-2", "e")]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(handler.event_count(), 1);
    queue.resume();
    assert!(!queue.is_paused());
    assert!(eventually(Duration::from_secs(30), || async { handler.event_count() == 3 }).await);
    let shutdown = tokio_util::sync::CancellationToken::new();
    shutdown.cancel();
    assert_eq!(queue.run_until(shutdown).await, Ok(()));
    assert_eq!(queue.finished().await, Ok(()));
}

/// A consumer whose runtime dies while events are in its handler: a new member of the group gets
/// every event that was not completely handled (at least once; nothing lost).
#[tokio::test]
async fn kill_mid_batch_and_restart_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("plugin_server=debug,rdkafka=info"))
        .with_test_writer()
        .try_init();
    let setup = setup("kill", 5).await;
    let values: Vec<Vec<u8>> = (0..30).map(|index| raw_event(&format!("k-{index}"), "e")).collect();
    produce(&setup.topic, &values).await;

    // The first consumer completes 12 events, then hangs inside the handler.
    let doomed = RecordingHandler::gated(Arc::new(Semaphore::new(12)));
    let (doomed_for_thread, config, options) = (doomed.clone(), setup.config.clone(), setup.options.clone());
    let (started_sender, started) = std::sync::mpsc::channel();
    let (kill_sender, kill) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let queue = runtime
            .block_on(async {
                let producer = KafkaProducerWrapper::connect(&config, "doomed").unwrap();
                KafkaQueue::start(&config, options, doomed_for_thread, producer).await
            })
            .unwrap();
        started_sender.send(()).unwrap();
        kill.recv().unwrap();
        drop(queue);
        runtime.shutdown_background();
    });
    tokio::task::spawn_blocking(move || started.recv().unwrap()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            doomed.event_count() == 12 && doomed.started.lock().unwrap().len() > 12
        })
        .await
    );
    // Give the auto-commit time to commit what was stored.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill_sender.send(()).unwrap();
    // librdkafka's close can wait on a slow broker; a consumer that takes long to go is as good as
    // killed for this test (its session expires), so the wait is bounded rather than asserted.
    let joined =
        tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(move || thread.join())).await;
    if joined.is_err() {
        eprintln!("the killed consumer's thread did not finish within 20 s; going on");
    }
    // The killed consumer leaves the group as its process would die; a member that leaves while
    // another is joining stalls the loopback broker's (Tansu 0.6) group for over a minute, so the
    // new member comes once the leave is through.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let handler = RecordingHandler::new();
    let queue =
        KafkaQueue::start(&setup.config, setup.options.clone(), handler.clone(), setup.producer.clone()).await.unwrap();
    let all_seen = || {
        let mut seen: Vec<String> =
            doomed.events().into_iter().chain(handler.events()).map(|event| event.distinct_id).collect();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    assert!(eventually(Duration::from_secs(60), || async { all_seen() == 30 }).await, "saw {}", all_seen());
    // The committed offset is the end of the handled prefix: with at most 5 in hand and 12 done,
    // that prefix holds at least 8 events, which come no more.
    assert!(handler.event_count() <= 30 - 8, "redelivered {}", handler.event_count());
    assert!(tokio::time::timeout(Duration::from_secs(30), queue.stop()).await.is_ok(), "the consumer stops");
}

/// Offsets are committed only once the events' own writes are delivered: while the producer's
/// send is held back, the group's committed offset does not move; once it completes, it does.
#[tokio::test]
async fn offsets_wait_for_the_producer() {
    use plugin_server::sinks::kafka_producer::{BatchSender, FlushSettings};
    use plugin_server::sinks::{KafkaRecord, ProduceError};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    struct HeldSender(Arc<Semaphore>);
    #[async_trait::async_trait]
    impl BatchSender for HeldSender {
        async fn send_batch(&self, _records: Vec<KafkaRecord>) -> Result<(), ProduceError> {
            self.0.acquire().await.map_err(|error| ProduceError::Send(error.to_string()))?.forget();
            Ok(())
        }
    }
    /// Queues one record per event, as the ClickHouse writer does.
    struct Writing(Arc<KafkaProducerWrapper>);
    #[async_trait::async_trait]
    impl plugin_server::sources::EventHandler for Writing {
        async fn handle_event(&self, event: plugin_server::event::PluginEvent) -> Result<(), HandleError> {
            let record = KafkaRecord::single("elsewhere", None, event.distinct_id.into_bytes());
            self.0.queue_message(record).await.map_err(|error| HandleError::Retryable(error.into()))
        }
        async fn handle_plugin_job(&self, _job: Value) -> Result<(), HandleError> {
            Ok(())
        }
    }

    let setup = setup("commit", 10).await;
    produce(&setup.topic, &(0..3).map(|index| raw_event(&format!("c-{index}"), "e")).collect::<Vec<_>>()).await;
    let held = Arc::new(Semaphore::new(0));
    let settings =
        FlushSettings { max_queue_size: 1000, max_batch_bytes: 900_000, flush_frequency: Duration::from_secs(60) };
    let producer = Arc::new(KafkaProducerWrapper::new(Box::new(HeldSender(held.clone())), settings));
    let queue =
        KafkaQueue::start(&setup.config, setup.options.clone(), Arc::new(Writing(producer.clone())), producer.clone())
            .await
            .unwrap();

    let observer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", &setup.options.group_id)
        .create()
        .unwrap();
    let committed = |observer: &BaseConsumer| {
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&setup.topic, 0);
        let offsets = observer.committed_offsets(partitions, Duration::from_secs(5)).unwrap();
        offsets.find_partition(&setup.topic, 0).map(|element| element.offset()).unwrap_or(Offset::Invalid)
    };
    assert!(eventually(Duration::from_secs(20), || async { queue.stats().snapshot().handled == 3 }).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!matches!(committed(&observer), Offset::Offset(_)), "committed before the writes were delivered");
    held.add_permits(10);
    let mut last = Offset::Invalid;
    for _ in 0..50 {
        last = committed(&observer);
        if last == Offset::Offset(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, Offset::Offset(3));
    queue.stop().await;
}

/// Team `slow`'s events wait for the gate; the others go straight to the recorder.
struct SlowTeam {
    inner: Arc<RecordingHandler>,
    slow: i64,
    gate: Arc<Semaphore>,
}

#[async_trait::async_trait]
impl plugin_server::sources::EventHandler for SlowTeam {
    async fn handle_event(&self, event: plugin_server::event::PluginEvent) -> Result<(), HandleError> {
        if event.team_id == self.slow {
            self.gate.acquire().await.map_err(|error| HandleError::Retryable(error.into()))?.forget();
        }
        self.inner.handle_event(event).await
    }
    async fn handle_plugin_job(&self, job: Value) -> Result<(), HandleError> {
        self.inner.handle_plugin_job(job).await
    }
}

#[tokio::test]
async fn a_team_whose_events_do_not_finish_takes_only_its_share_of_the_window() {
    // Window: 4 events in flight, 2 of one team, 20 held back. Team 1's 8 events come first and
    // never finish until the gate opens: 2 run, 6 are held back, and team 2's events behind them
    // are taken and handled (with one window of 4 for everyone they were not even taken).
    let mut setup = setup("fair-window", 4).await;
    setup.options.team_share = 2;
    setup.options.held = 20;
    let mut messages: Vec<Vec<u8>> = (0..8).map(|index| raw_event_of(1, &format!("a-{index}"), "slow")).collect();
    messages.extend((0..3).map(|index| raw_event_of(2, &format!("b-{index}"), "fast")));
    produce(&setup.topic, &messages).await;
    let recorder = RecordingHandler::new();
    let gate = Arc::new(Semaphore::new(0));
    let handler = Arc::new(SlowTeam { inner: recorder.clone(), slow: 1, gate: gate.clone() });
    let queue = KafkaQueue::start(&setup.config, setup.options.clone(), handler, setup.producer.clone()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async { recorder.event_count() == 3 }).await,
        "team 2's events were handled while team 1's were stuck: {:?}",
        queue.stats().snapshot()
    );
    assert!(recorder.events().iter().all(|event| event.team_id == 2));
    assert_eq!(queue.stats().snapshot().held_back, 6);
    // Once team 1's events move, its held ones run too; nothing lost.
    gate.add_permits(8);
    assert!(eventually(Duration::from_secs(30), || async { recorder.event_count() == 11 }).await);
    let mut slow: Vec<String> =
        recorder.events().iter().filter(|event| event.team_id == 1).map(|event| event.distinct_id.clone()).collect();
    slow.sort();
    assert_eq!(slow, (0..8).map(|index| format!("a-{index}")).collect::<Vec<_>>());
    let shutdown = tokio_util::sync::CancellationToken::new();
    shutdown.cancel();
    assert_eq!(queue.run_until(shutdown).await, Ok(()));
    assert_eq!(queue.finished().await, Ok(()));
}

/// A retry gets the message's event as the first attempt got it (the consumer keeps no copy; it
/// decodes the message again), and the dead-letter record after the last attempt is the event as
/// consumed, whatever the attempts did to theirs.
#[tokio::test]
async fn a_retried_event_and_its_dead_letter_are_the_event_as_consumed() {
    let setup = setup("retry-same", 4).await;
    let marker = unique("m");
    let (flaky, failing) = (format!("{marker}-flaky"), format!("{marker}-failing"));
    produce(&setup.topic, &[raw_event(&flaky, "flaky event"), raw_event(&failing, "failing event")]).await;
    let handler = MutatingFlaky::new({
        let (flaky, failing) = (flaky.clone(), failing.clone());
        move |distinct_id| match distinct_id {
            id if id == flaky => 1,
            id if id == failing => usize::MAX,
            _ => 0,
        }
    });
    let queue =
        KafkaQueue::start(&setup.config, setup.options.clone(), handler.clone(), setup.producer.clone()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            let stats = queue.stats().snapshot();
            stats.handled == 1 && stats.dead_lettered == 1
        })
        .await,
        "{:?}",
        queue.stats().snapshot()
    );
    queue.stop().await;
    let attempts = handler.attempts();
    for distinct_id in [&flaky, &failing] {
        let seen: Vec<&Value> = attempts.iter().filter(|event| event["distinct_id"] == json!(distinct_id)).collect();
        assert_eq!(seen.len(), 2, "{attempts:?}");
        assert_eq!(seen[0], seen[1]);
        assert!(seen[0]["properties"].get("touched").is_none());
    }
    let rows = dead_letters_for(&setup.dead_letters, &failing, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["distinct_id"], json!(failing));
    assert_eq!(rows[0]["event"], json!("failing event"));
    assert_eq!(rows[0]["properties"], json!(r#"{"key":"value"}"#));
    assert_eq!(rows[0]["error_location"], json!("plugin_server_ingest_event"));
}
