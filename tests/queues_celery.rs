//! Celery over Redis: decoding Python Celery's exact messages, producing the reference's bytes, and
//! the consumer against a real Redis (port of the reference's tests/postgres/queue.test.ts plus
//! reliability cases: bad messages set aside, back-pressure, kill-and-restart loses nothing).

mod queues_support;

use std::sync::Arc;
use std::time::Duration;

use plugin_server::ingestion::queues::celery::{
    decode_envelope, decode_task, encode_task_message, TaskSet, PLUGIN_JOB_TASK, PROCESS_EVENT_TASK,
};
use plugin_server::ingestion::queues::retry::RetryPolicy;
use plugin_server::ingestion::queues::{
    CeleryConsumer, CeleryConsumerOptions, CeleryProducer, CeleryTask, DecodeError, HandleError,
};
use queues_support::*;
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

const EVENTS: TaskSet = TaskSet { process_events: true };

fn testdata(name: &str) -> String {
    let path = format!("{}/../shared/testdata/celery/{name}", env!("CARGO_MANIFEST_DIR"));
    let path = if std::path::Path::new(&path).exists() { path } else { format!("/work/shared/testdata/celery/{name}") };
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn event_of(task: CeleryTask) -> plugin_server::event::PluginEvent {
    match task {
        CeleryTask::ProcessEvent(event) => *event,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[test]
fn decodes_python_celery_protocol_2_messages() {
    let event =
        event_of(decode_task("posthog-plugins", testdata("process_event_with_plugins-0.json").trim(), EVENTS).unwrap());
    assert_eq!(event.distinct_id, "user-989");
    assert_eq!(event.ip, Some(json!("127.0.3.240")));
    assert_eq!(event.site_url, "http://127.0.0.1:8000");
    assert_eq!(event.team_id, 2);
    assert_eq!(event.now, "2021-10-28T12:00:00+00:00");
    assert_eq!(event.sent_at.as_deref(), Some("2021-10-28T11:59:59.597000Z"));
    assert_eq!(event.event, "$autocapture");
    assert_eq!(event.timestamp, Some(json!("2021-10-28T11:59:57.792000Z")));
    let properties = event.properties.as_ref().unwrap();
    assert_eq!(properties["$os"], json!("Android"));
    assert_eq!(properties["$elements"].as_array().unwrap().len(), 3);
    // No uuid in `data`: a fresh UUIDT, as the reference generates.
    let uuid = uuid::Uuid::parse_str(event.uuid.as_deref().unwrap()).unwrap();
    let millis = u64::from_be_bytes([
        0,
        0,
        uuid.as_bytes()[0],
        uuid.as_bytes()[1],
        uuid.as_bytes()[2],
        uuid.as_bytes()[3],
        uuid.as_bytes()[4],
        uuid.as_bytes()[5],
    ]);
    assert!((millis as i64 - chrono::Utc::now().timestamp_millis()).abs() < 60_000);

    for (file, event_name) in
        [("process_event_with_plugins-1.json", "$pageview"), ("process_event_with_plugins-2.json", "signed_up")]
    {
        let event = event_of(decode_task("posthog-plugins", testdata(file).trim(), EVENTS).unwrap());
        assert_eq!(event.event, event_name);
        assert_eq!(event.team_id, 2);
    }
}

#[test]
fn decodes_kombu_5_tagged_datetimes() {
    let message =
        decode_envelope("tmp-k5", testdata("process_event_with_plugins-kombu5-datetime.json").trim()).unwrap();
    assert_eq!(message.task, PROCESS_EVENT_TASK);
    assert_eq!(message.id.as_deref(), Some("2462d6a2-518e-4dac-8e08-118f93b76af7"));
    assert_eq!(message.args[6], json!("2021-10-28T11:59:59.597000+00:00"));
    let event = event_of(message.into_task(EVENTS).unwrap());
    assert_eq!(event.sent_at.as_deref(), Some("2021-10-28T11:59:59.597000+00:00"));
    assert_eq!(event.distinct_id, "user-989");
}

fn envelope_with_body(body: &Value, headers: Value) -> String {
    use base64::Engine;
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": headers,
        "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": "q"}},
    })
    .to_string()
}

#[test]
fn data_keys_override_the_envelope_and_distinct_id_becomes_a_string() {
    let data = json!({"event": "$pageview", "uuid": "from-data", "team_id": 3, "distinct_id": 42, "now": "data-now", "properties": {"a": 1}});
    let args =
        json!(["envelope-id", "1.2.3.4", "http://site", data, 2, "2020-01-01T00:00:00Z", "2020-01-01T00:00:01Z"]);
    let raw = envelope_with_body(&json!([args, {}, {}]), json!({"task": PROCESS_EVENT_TASK, "id": "t1"}));
    let event = event_of(decode_task("q", &raw, EVENTS).unwrap());
    assert_eq!(event.uuid.as_deref(), Some("from-data"));
    assert_eq!(event.team_id, 3);
    assert_eq!(event.distinct_id, "42");
    assert_eq!(event.now, "data-now");
    assert_eq!(event.ip, Some(json!("1.2.3.4")));
    assert_eq!(event.sent_at.as_deref(), Some("2020-01-01T00:00:01Z"));
    assert_eq!(event.properties.unwrap()["a"], json!(1));

    // Six arguments: no sent_at (the reference would take the kwargs object for it).
    let args = json!(["id", null, null, {"event": "x"}, 2, "2020-01-01T00:00:00Z"]);
    let raw = envelope_with_body(&json!([args, {"extra": 1}, {}]), json!({"task": PROCESS_EVENT_TASK}));
    let event = event_of(decode_task("q", &raw, EVENTS).unwrap());
    assert_eq!(event.sent_at, None);
    assert_eq!(event.ip, None);
    assert_eq!(event.site_url, "");
}

#[test]
fn decodes_protocol_1_and_plugin_jobs() {
    let body =
        json!({"task": PLUGIN_JOB_TASK, "id": "abc", "args": [2, 39, "someJobName", "start", {"a": 1}], "kwargs": {}});
    let raw = envelope_with_body(&body, json!({}));
    let message = decode_envelope("q", &raw).unwrap();
    assert_eq!(message.id.as_deref(), Some("abc"));
    let CeleryTask::PluginJob(job) = message.into_task(TaskSet { process_events: false }).unwrap() else { panic!() };
    assert_eq!(job["type"], json!("someJobName"));
    assert_eq!(job["payload"], json!({"a": 1, "$operation": "start"}));
    assert_eq!(job["pluginConfigId"], json!(39));
    assert_eq!(job["pluginConfigTeam"], json!(2));
    assert!(job["timestamp"].is_i64());
    let keys: Vec<&String> = job.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["type", "payload", "pluginConfigId", "pluginConfigTeam", "timestamp"]);
}

#[test]
fn rejects_bad_messages_with_the_reference_texts() {
    let good = json!({"body": "W10=", "content-type": "application/json", "content-encoding": "utf-8", "headers": {}, "properties": {"body_encoding": "base64"}});
    let with = |key: &str, value: Value| {
        let mut envelope = good.clone();
        envelope[key] = value;
        envelope.to_string()
    };
    let error = |raw: &str| decode_task("q", raw, EVENTS).unwrap_err().to_string();
    assert_eq!(error(&with("content-type", json!("text/plain"))), "queue q item: unsupported content type text/plain");
    assert_eq!(error(&with("content-encoding", json!("binary"))), "queue q item: unsupported content encoding binary");
    assert_eq!(
        error(&with("properties", json!({"body_encoding": "hex"}))),
        "queue q item: unsupported body encoding hex"
    );
    assert!(error("not json").starts_with("queue q item: not a JSON object"));
    assert!(error(&with("body", json!("%%%"))).starts_with("queue q item: body is not base64"));
    let unknown = envelope_with_body(&json!([[], {}, {}]), json!({"task": "posthog.tasks.unknown"}));
    assert_eq!(
        decode_task("q", &unknown, EVENTS).unwrap_err(),
        DecodeError::MissingHandler("posthog.tasks.unknown".into())
    );
    // With Kafka on, process_event_with_plugins has no handler on the Celery queue.
    let event = envelope_with_body(
        &json!([["a", null, null, {"event": "x"}, 2, "now"], {}, {}]),
        json!({"task": PROCESS_EVENT_TASK}),
    );
    assert_eq!(
        decode_task("q", &event, TaskSet { process_events: false }).unwrap_err().to_string(),
        format!("Missing process handler for task {PROCESS_EVENT_TASK}")
    );
    let short = envelope_with_body(&json!([["a"], {}, {}]), json!({"task": PROCESS_EVENT_TASK}));
    assert!(matches!(decode_task("q", &short, EVENTS), Err(DecodeError::Arguments { .. })));
}

#[test]
fn produces_the_reference_bytes() {
    let args = [json!("my-id"), Value::Null, Value::Null, json!({"event": "e"}), json!(2), json!("t"), json!("t")];
    let raw = encode_task_message("posthog-plugins", PROCESS_EVENT_TASK, "task-1", &args, &Map::new());
    let envelope: Value = serde_json::from_str(&raw).unwrap();
    let tag = envelope["properties"]["delivery_tag"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&tag).is_ok());
    let body = r#"[["my-id",null,null,{"event":"e"},2,"t","t"],{},{}]"#;
    use base64::Engine;
    let expected = format!(
        concat!(
            r#"{{"body":"{}","content-type":"application/json","content-encoding":"utf-8","#,
            r#""headers":{{"lang":"js","task":"{}","id":"task-1"}},"#,
            r#""properties":{{"body_encoding":"base64","delivery_info":{{"exchange":"","routing_key":"posthog-plugins"}},"#,
            r#""delivery_mode":2,"delivery_tag":"{}","correlationId":"task-1","replyTo":""}}}}"#
        ),
        base64::engine::general_purpose::STANDARD.encode(body),
        PROCESS_EVENT_TASK,
        tag
    );
    assert_eq!(raw, expected);
    let event = event_of(decode_task("posthog-plugins", &raw, EVENTS).unwrap());
    assert_eq!(event.distinct_id, "my-id");
}

fn options(queue: &str, concurrency: usize) -> CeleryConsumerOptions {
    let config = plugin_server::config::Config::from_pairs(&[("PLUGINS_CELERY_QUEUE", queue)]).unwrap();
    CeleryConsumerOptions {
        concurrency,
        heartbeat_ttl: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        ..CeleryConsumerOptions::from_config(&config)
    }
}

fn process_event_args(distinct_id: &str) -> Vec<Value> {
    let now = chrono::Utc::now().to_rfc3339();
    vec![
        json!(distinct_id),
        json!("127.0.0.1"),
        json!("http://localhost"),
        json!({"event": "$pageview", "properties": {}}),
        json!(2),
        json!(now),
        json!(now),
    ]
}

async fn push_events(producer: &CeleryProducer, count: usize, prefix: &str) {
    for index in 0..count {
        producer
            .send_task(PROCESS_EVENT_TASK, &process_event_args(&format!("{prefix}{index}")), &Map::new())
            .await
            .unwrap();
    }
}

/// Port of queue.test.ts "pause and resume".
#[tokio::test]
async fn pause_and_resume() {
    let pool = redis_pool();
    let queue = unique("celery-pause");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    push_events(&producer, 6, "my-id-").await;
    assert_eq!(llen(&pool, &queue).await, 6);
    let handler = RecordingHandler::new();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), options(&queue, 40)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { llen(&pool, &queue).await != 6 }).await);
    consumer.pause().await;
    assert!(consumer.is_paused());
    push_events(&producer, 3, "later-").await;
    let length = llen(&pool, &queue).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(llen(&pool, &queue).await, length);
    consumer.resume();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(llen(&pool, &queue).await, 0);
    assert!(eventually(Duration::from_secs(5), || async { handler.event_count() == 9 }).await);
    consumer.stop().await;
    assert_eq!(llen(&pool, &options(&queue, 1).processing_key()).await, 0);
    cleanup_queue(&pool, &queue).await;
}

/// Port of queue.test.ts "plugin jobs are enqueued".
#[tokio::test]
async fn plugin_jobs_reach_the_handler() {
    let pool = redis_pool();
    let queue = unique("celery-jobs");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    for _ in 0..6 {
        producer
            .send_task(
                PLUGIN_JOB_TASK,
                &[json!(2), json!(39), json!("someJobName"), json!("start"), json!({"a": 1})],
                &Map::new(),
            )
            .await
            .unwrap();
    }
    let handler = RecordingHandler::new();
    let mut opts = options(&queue, 10);
    opts.tasks = TaskSet { process_events: false };
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { handler.jobs().len() == 6 }).await);
    for job in handler.jobs() {
        assert_eq!(job["pluginConfigTeam"], json!(2));
        assert_eq!(job["pluginConfigId"], json!(39));
        assert_eq!(job["type"], json!("someJobName"));
        assert_eq!(job["payload"], json!({"a": 1, "$operation": "start"}));
        assert!(job["timestamp"].is_number());
    }
    consumer.stop().await;
    cleanup_queue(&pool, &queue).await;
}

#[tokio::test]
async fn python_messages_from_redis_are_consumed() {
    let pool = redis_pool();
    let queue = unique("celery-python");
    for file in [
        "process_event_with_plugins-0.json",
        "process_event_with_plugins-1.json",
        "process_event_with_plugins-kombu5-datetime.json",
    ] {
        lpush(&pool, &queue, testdata(file).trim()).await;
    }
    let handler = RecordingHandler::new();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), options(&queue, 4)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { handler.event_count() == 3 }).await);
    let mut ids: Vec<String> = handler.events().into_iter().map(|event| event.distinct_id).collect();
    ids.sort();
    assert_eq!(ids, ["user-100", "user-989", "user-989"]);
    consumer.stop().await;
    cleanup_queue(&pool, &queue).await;
}

#[tokio::test]
async fn bad_and_rejected_messages_are_set_aside_and_the_next_is_processed() {
    let pool = redis_pool();
    let queue = unique("celery-bad");
    lpush(&pool, &queue, "this is not json").await;
    lpush(&pool, &queue, &json!({"body": "W10=", "content-type": "text/xml", "content-encoding": "utf-8", "properties": {"body_encoding": "base64"}}).to_string()).await;
    lpush(&pool, &queue, &envelope_with_body(&json!([[], {}, {}]), json!({"task": "posthog.tasks.nope"}))).await;
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    push_events(&producer, 3, "ok-").await;
    // First handled event is rejected, the second fails twice then succeeds, the third is fine.
    let handler = RecordingHandler::answering(vec![
        Err(HandleError::Rejected("database unavailable".into())),
        Err(HandleError::Retryable("flaky".into())),
        Err(HandleError::Retryable("flaky".into())),
    ]);
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), options(&queue, 1)).await.unwrap();
    let dead_letters = dead_letter_key_of(&queue);
    assert!(
        eventually(Duration::from_secs(10), || async {
            handler.event_count() == 2 && llen(&pool, &dead_letters).await == 4
        })
        .await
    );
    let reasons: Vec<String> = lrange(&pool, &dead_letters)
        .await
        .iter()
        .map(|entry| serde_json::from_str::<Value>(entry).unwrap()["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|reason| reason.starts_with("queue ") && reason.contains("not a JSON object")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&format!("queue {queue} item: unsupported content type text/xml")), "{reasons:?}");
    assert!(reasons.contains(&"Missing process handler for task posthog.tasks.nope".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"database unavailable".to_string()), "{reasons:?}");
    let entry: Value = serde_json::from_str(&lrange(&pool, &dead_letters).await[3]).unwrap();
    assert_eq!(entry["message"], json!("this is not json"));
    let stats = consumer.stats().snapshot();
    assert_eq!((stats.received, stats.handled, stats.dead_lettered, stats.retries), (6, 2, 4, 2));
    consumer.stop().await;
    assert_eq!(llen(&pool, &options(&queue, 1).processing_key()).await, 0);
    cleanup_queue(&pool, &queue).await;
}

fn dead_letter_key_of(queue: &str) -> String {
    plugin_server::ingestion::queues::celery_consumer::dead_letter_key(queue)
}

#[tokio::test]
async fn in_flight_messages_are_bounded_by_the_concurrency() {
    let pool = redis_pool();
    let queue = unique("celery-bounded");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    push_events(&producer, 10, "b-").await;
    let gate = Arc::new(Semaphore::new(0));
    let handler = RecordingHandler::gated(gate.clone());
    let opts = options(&queue, 3);
    let processing = opts.processing_key();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { consumer.in_flight() == 3 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(consumer.in_flight(), 3);
    assert_eq!(llen(&pool, &queue).await, 7);
    assert_eq!(llen(&pool, &processing).await, 3);
    gate.add_permits(10);
    assert!(eventually(Duration::from_secs(5), || async { handler.event_count() == 10 }).await);
    consumer.stop().await;
    assert_eq!(llen(&pool, &processing).await, 0);
    cleanup_queue(&pool, &queue).await;
}

/// A consumer killed while handling (its runtime dropped: no clean-up code runs) loses nothing: a
/// new consumer puts the dead one's in-flight messages back and handles everything.
#[tokio::test]
async fn kill_and_restart_loses_nothing() {
    let pool = redis_pool();
    let queue = unique("celery-kill");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    push_events(&producer, 20, "k-").await;

    let doomed_handler = RecordingHandler::gated(Arc::new(Semaphore::new(2)));
    let doomed_options = CeleryConsumerOptions { heartbeat_ttl: Duration::from_millis(600), ..options(&queue, 5) };
    let doomed_processing = doomed_options.processing_key();
    let (started_sender, started) = std::sync::mpsc::channel();
    let (kill_sender, kill) = std::sync::mpsc::channel::<()>();
    let handler_for_thread = doomed_handler.clone();
    let thread = std::thread::spawn(move || {
        // Its own runtime and pool: pooled connections are driven by the runtime that made them.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let consumer = runtime
            .block_on(async {
                CeleryConsumer::start(REDIS_URL, redis_pool(), handler_for_thread, doomed_options).await
            })
            .unwrap();
        started_sender.send(()).unwrap();
        kill.recv().unwrap();
        std::mem::forget(consumer);
        runtime.shutdown_background();
    });
    tokio::task::spawn_blocking(move || started.recv().unwrap()).await.unwrap();
    // Two handled, five stuck in the handler.
    assert!(
        eventually(Duration::from_secs(5), || async {
            doomed_handler.event_count() == 2 && doomed_handler.started.lock().unwrap().len() == 7
        })
        .await
    );
    kill_sender.send(()).unwrap();
    tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
    assert_eq!(llen(&pool, &doomed_processing).await, 5);

    let handler = RecordingHandler::new();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), options(&queue, 5)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { handler.event_count() == 18 }).await,
        "got {}",
        handler.event_count()
    );
    let mut seen: Vec<String> =
        doomed_handler.events().into_iter().chain(handler.events()).map(|event| event.distinct_id).collect();
    seen.sort();
    let mut expected: Vec<String> = (0..20).map(|index| format!("k-{index}")).collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(llen(&pool, &doomed_processing).await, 0);
    let shutdown = tokio_util::sync::CancellationToken::new();
    shutdown.cancel();
    consumer.run_until(shutdown).await;
    cleanup_queue(&pool, &queue).await;
}

/// `posthog.capture` from a plugin in the Postgres pipeline comes back as the event it describes.
#[tokio::test]
async fn capture_round_trip() {
    let pool = redis_pool();
    let queue = unique("celery-capture");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    let data = json!({"distinct_id": "plugin-x", "event": "custom event", "timestamp": "2021-10-28T12:00:00.000Z",
        "properties": {"$lib": "posthog-plugin-server", "name": "haha"}, "team_id": 2, "uuid": "0179fb6c-0000-0000-0000-000000000001"});
    producer.send_capture(data.as_object().unwrap(), 2).await.unwrap();
    let handler = RecordingHandler::new();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), options(&queue, 2)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { handler.event_count() == 1 }).await);
    let event = handler.events().remove(0);
    assert_eq!(event.distinct_id, "plugin-x");
    assert_eq!(event.event, "custom event");
    assert_eq!(event.ip, None);
    assert_eq!(event.now, "2021-10-28T12:00:00.000Z");
    assert_eq!(event.sent_at.as_deref(), Some("2021-10-28T12:00:00.000Z"));
    assert_eq!(event.uuid.as_deref(), Some("0179fb6c-0000-0000-0000-000000000001"));
    assert_eq!(event.properties.unwrap()["name"], json!("haha"));
    consumer.stop().await;
    cleanup_queue(&pool, &queue).await;
}

/// `stop()` waits for the messages being handled; one waiting for a retry goes back to the queue.
#[tokio::test]
async fn stop_waits_for_in_flight_messages_and_requeues_pending_retries() {
    let pool = redis_pool();
    let queue = unique("celery-stop");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    push_events(&producer, 2, "s-").await;
    // The first event is slow (held by the gate), the second keeps failing with a retryable error.
    let gate = Arc::new(Semaphore::new(0));
    let handler = Arc::new(RetryOne { inner: RecordingHandler::gated(gate.clone()), failing: "s-1".into() });
    let opts = CeleryConsumerOptions {
        retry: RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
        },
        ..options(&queue, 2)
    };
    let processing = opts.processing_key();
    let consumer = Arc::new(CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts).await.unwrap());
    assert!(
        eventually(Duration::from_secs(5), || async {
            consumer.in_flight() == 2 && consumer.stats().snapshot().retries == 1
        })
        .await
    );
    let stopping = tokio::spawn({
        let consumer = consumer.clone();
        async move { consumer.stop().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "stop must wait for the slow event");
    gate.add_permits(1);
    stopping.await.unwrap();
    assert_eq!(handler.inner.event_count(), 1);
    assert_eq!(lrange(&pool, &queue).await.len(), 1);
    assert_eq!(llen(&pool, &processing).await, 0);
    let stats = consumer.stats().snapshot();
    assert_eq!((stats.handled, stats.requeued, stats.dead_lettered), (1, 1, 0));
    let leftover = decode_task(&queue, &lrange(&pool, &queue).await[0], EVENTS).unwrap();
    assert_eq!(event_of(leftover).distinct_id, "s-1");
    cleanup_queue(&pool, &queue).await;
}

/// Fails one distinct id with a retryable error forever; delegates the others.
struct RetryOne {
    inner: Arc<RecordingHandler>,
    failing: String,
}

#[async_trait::async_trait]
impl plugin_server::ingestion::queues::EventHandler for RetryOne {
    async fn handle_event(&self, event: plugin_server::event::PluginEvent) -> Result<(), HandleError> {
        if event.distinct_id == self.failing {
            return Err(HandleError::Retryable("database restarting".into()));
        }
        self.inner.handle_event(event).await
    }
    async fn handle_plugin_job(&self, job: Value) -> Result<(), HandleError> {
        self.inner.handle_plugin_job(job).await
    }
}
