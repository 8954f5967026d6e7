//! Celery over Redis: decoding Python Celery's exact messages, producing the reference's bytes, and
//! the consumer against a real Redis (port of the reference's tests/postgres/queue.test.ts plus
//! reliability cases: bad messages set aside, back-pressure, kill-and-restart loses nothing).

mod queues_support;

use std::sync::Arc;
use std::time::Duration;

use plugin_server::sinks::celery_producer::encode_task_message;
use plugin_server::sinks::CeleryProducer;
use plugin_server::sources::celery::{decode_envelope, decode_task, TaskSet, PLUGIN_JOB_TASK, PROCESS_EVENT_TASK};
use plugin_server::sources::retry::RetryPolicy;
use plugin_server::sources::{CeleryConsumer, CeleryConsumerOptions, CeleryTask, DecodeError, HandleError};
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

/// A retry gets the message's event as the first attempt got it (the consumer keeps no copy; it
/// decodes the message again), whatever the failed attempts did to theirs: the same uuid, the
/// same data, for a real Python Celery envelope.
#[tokio::test]
async fn a_retried_event_is_the_event_the_first_attempt_got() {
    let pool = redis_pool();
    let queue = unique("celery-retry-same");
    lpush(&pool, &queue, testdata("process_event_with_plugins-0.json").trim()).await;
    let handler = MutatingFlaky::new(|_| 2);
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), options(&queue, 1)).await.unwrap();
    assert!(eventually(Duration::from_secs(10), || async { consumer.stats().snapshot().handled == 1 }).await);
    let attempts = handler.attempts();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert!(attempts[0]["uuid"].as_str().is_some_and(|uuid| uuid.len() == 36), "{:?}", attempts[0]);
    assert!(attempts[0]["properties"].get("touched").is_none());
    assert_eq!(attempts[1], attempts[0]);
    assert_eq!(attempts[2], attempts[0]);
    assert_eq!(consumer.stats().snapshot().retries, 2);
    consumer.stop().await;
    assert_eq!(llen(&pool, &options(&queue, 1).processing_key()).await, 0);
    cleanup_queue(&pool, &queue).await;
}

fn dead_letter_key_of(queue: &str) -> String {
    plugin_server::sources::celery_consumer::dead_letter_key(queue)
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
impl plugin_server::sources::EventHandler for RetryOne {
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

/// A TCP proxy to Redis on loopback whose connections can be frozen: a frozen connection stays
/// open but forwards nothing more (a half-open socket as seen from the client). Connections made
/// after a freeze forward normally.
struct FreezingProxy {
    port: u16,
    generation: Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start() -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(std::sync::Mutex::new(tokio_util::sync::CancellationToken::new()));
        let current = generation.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let frozen = current.lock().unwrap().clone();
                connections.spawn(async move {
                    let Ok(upstream) = tokio::net::TcpStream::connect("127.0.0.1:6379").await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (upstream_read, upstream_write) = upstream.into_split();
                    tokio::join!(
                        forward(client_read, upstream_write, frozen.clone()),
                        forward(upstream_read, client_write, frozen)
                    );
                });
            }
        });
        FreezingProxy { port, generation, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every connection open now stops forwarding (and stays open).
    fn freeze(&self) {
        let mut generation = self.generation.lock().unwrap();
        generation.cancel();
        *generation = tokio_util::sync::CancellationToken::new();
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = frozen.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(count) if !frozen.is_cancelled() => {
                if to.write_all(&buffer[..count]).await.is_err() {
                    return;
                }
            }
            Ok(_) => break,
        }
    }
    // Half-open: hold both ends, forward nothing.
    let _held = (from, to);
    std::future::pending::<()>().await;
}

/// A consumer whose connection goes half-open (the socket stays up, nothing comes back) does not
/// hang: the reply times out, it reconnects, and the message whose reply was lost is put back
/// from its own processing list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_replaced_and_nothing_is_stuck() {
    let pool = redis_pool();
    let queue = unique("celery-half-open");
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    let proxy = FreezingProxy::start().await;
    let handler = RecordingHandler::new();
    let opts = CeleryConsumerOptions {
        poll_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(1),
        heartbeat_ttl: Duration::from_millis(1500),
        ..options(&queue, 4)
    };
    let processing = opts.processing_key();
    let consumer = CeleryConsumer::start(&proxy.url(), pool.clone(), handler.clone(), opts).await.unwrap();
    push_events(&producer, 3, "before-").await;
    assert!(eventually(Duration::from_secs(5), || async { handler.event_count() == 3 }).await);

    // The blocking pop under way now never gets its reply; the next message is moved by it.
    proxy.freeze();
    tokio::time::sleep(Duration::from_millis(100)).await;
    push_events(&producer, 5, "after-").await;
    assert!(
        eventually(Duration::from_secs(20), || async { handler.event_count() == 8 }).await,
        "handled {} of 8; processing list holds {}",
        handler.event_count(),
        llen(&pool, &processing).await
    );
    let mut seen: Vec<String> = handler.events().into_iter().map(|event| event.distinct_id).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "{seen:?}");
    consumer.stop().await;
    assert_eq!(llen(&pool, &processing).await, 0);
    cleanup_queue(&pool, &queue).await;
}

/// A message left in the consumer's own processing list with no handler (its acknowledgement
/// failed, or the reply of its pop was lost) is handled again instead of waiting for a restart.
#[tokio::test]
async fn orphans_in_the_own_processing_list_are_requeued() {
    let pool = redis_pool();
    let queue = unique("celery-orphan");
    let handler = RecordingHandler::new();
    let opts = CeleryConsumerOptions { heartbeat_ttl: Duration::from_millis(600), ..options(&queue, 2) };
    let processing = opts.processing_key();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts).await.unwrap();
    let orphan =
        encode_task_message(&queue, PROCESS_EVENT_TASK, "orphan-task", &process_event_args("orphan"), &Map::new());
    lpush(&pool, &processing, &orphan).await;
    assert!(eventually(Duration::from_secs(10), || async { handler.event_count() == 1 }).await);
    assert_eq!(handler.events()[0].distinct_id, "orphan");
    assert!(eventually(Duration::from_secs(2), || async { llen(&pool, &processing).await == 0 }).await);
    consumer.stop().await;
    cleanup_queue(&pool, &queue).await;
}

/// A restarted consumer (same identity, its predecessor's process gone) takes its predecessor's
/// unfinished messages back at start, without waiting for the old heartbeat to expire.
#[tokio::test]
async fn a_restarted_consumer_takes_back_its_list_at_once() {
    let pool = redis_pool();
    let queue = unique("celery-takeover");
    let opts = CeleryConsumerOptions { heartbeat_ttl: Duration::from_secs(60), ..options(&queue, 2) };
    let producer = CeleryProducer::new(pool.clone(), queue.clone());
    push_events(&producer, 4, "t-").await;
    // What a killed predecessor with this identity leaves: a live heartbeat naming a process that
    // is gone (no process has pid 0x7ffffffe) and two messages in its processing list.
    let mut connection = redis_conn(&pool).await;
    let host = plugin_server::sources::celery_consumer::host_name();
    let beat = json!({"nonce": "old", "host": host, "pid": 0x7fff_fffe_u32}).to_string();
    let _: () = redis::cmd("SET")
        .arg(opts.heartbeat_key())
        .arg(beat)
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .unwrap();
    for _ in 0..2 {
        let _: Option<String> =
            redis::cmd("RPOPLPUSH").arg(&queue).arg(opts.processing_key()).query_async(&mut connection).await.unwrap();
    }
    let handler = RecordingHandler::new();
    let started = std::time::Instant::now();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts.clone()).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { handler.event_count() == 4 }).await);
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut sorted: Vec<String> = handler.events().into_iter().map(|event| event.distinct_id).collect();
    sorted.sort();
    assert_eq!(sorted, ["t-0", "t-1", "t-2", "t-3"]);
    consumer.stop().await;

    // A live process holding the identity is not robbed: the newcomer takes a unique id.
    let live = json!({"nonce": "live", "host": host, "pid": 1}).to_string();
    let _: () = redis::cmd("SET")
        .arg(opts.heartbeat_key())
        .arg(&live)
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .unwrap();
    let second = CeleryConsumer::start(REDIS_URL, pool.clone(), RecordingHandler::new(), opts.clone()).await.unwrap();
    assert_ne!(second.options().consumer_id, opts.consumer_id);
    assert!(second.options().consumer_id.starts_with(&opts.consumer_id));
    second.stop().await;
    let still: String = redis::cmd("GET").arg(opts.heartbeat_key()).query_async(&mut connection).await.unwrap();
    assert_eq!(still, live);
    cleanup_queue(&pool, &queue).await;
}

/// Each delivery of a message is counted; one delivered more than `max_deliveries` times (the
/// consumer died while handling it each time) is dead-lettered with that reason, and its
/// redelivered event carries the same uuid every time.
#[tokio::test]
async fn a_message_delivered_too_often_is_dead_lettered_and_uuids_are_stable() {
    let pool = redis_pool();
    let queue = unique("celery-poison");
    let opts = CeleryConsumerOptions { max_deliveries: 3, ..options(&queue, 2) };
    let poison =
        encode_task_message(&queue, PROCESS_EVENT_TASK, "poison-task", &process_event_args("poison"), &Map::new());
    let fine = encode_task_message(&queue, PROCESS_EVENT_TASK, "fine-task", &process_event_args("fine"), &Map::new());
    // Three deliveries already happened (each ended by a crash).
    let mut connection = redis_conn(&pool).await;
    let _: () =
        redis::cmd("SET").arg(opts.deliveries_key("poison-task")).arg(3).query_async(&mut connection).await.unwrap();
    lpush(&pool, &queue, &poison).await;
    lpush(&pool, &queue, &fine).await;
    let handler = RecordingHandler::new();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts.clone()).await.unwrap();
    let dead_letters = dead_letter_key_of(&queue);
    assert!(
        eventually(Duration::from_secs(5), || async {
            handler.event_count() == 1 && llen(&pool, &dead_letters).await == 1
        })
        .await
    );
    assert_eq!(handler.events()[0].distinct_id, "fine");
    let entry: Value = serde_json::from_str(&lrange(&pool, &dead_letters).await[0]).unwrap();
    assert!(entry["reason"].as_str().unwrap().starts_with("delivered 4 times"), "{entry}");
    assert_eq!(entry["message"], json!(poison));
    // The counters are gone with their messages.
    let left: i64 = redis::cmd("EXISTS")
        .arg(opts.deliveries_key("poison-task"))
        .arg(opts.deliveries_key("fine-task"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // The event's uuid is derived from the task id: the same on every delivery.
    let expected = plugin_server::sources::celery_dedupe::message_event_uuid("fine-task").to_string();
    assert_eq!(handler.events()[0].uuid.as_deref(), Some(expected.as_str()));
    consumer.stop().await;
    cleanup_queue(&pool, &queue).await;
}

/// A redelivered message whose event was already written (its write marker is set) is skipped.
#[tokio::test]
async fn a_redelivered_message_already_written_is_skipped() {
    let pool = redis_pool();
    let queue = unique("celery-dedupe");
    let opts = options(&queue, 2);
    let raw =
        encode_task_message(&queue, PROCESS_EVENT_TASK, "written-task", &process_event_args("written"), &Map::new());
    let uuid = plugin_server::sources::celery_dedupe::message_event_uuid("written-task").to_string();
    let marker = plugin_server::sources::celery_dedupe::written_marker_key(&queue, &uuid);
    let mut connection = redis_conn(&pool).await;
    let _: () =
        redis::cmd("SET").arg(opts.deliveries_key("written-task")).arg(1).query_async(&mut connection).await.unwrap();
    let _: () = redis::cmd("SET").arg(&marker).arg("written").query_async(&mut connection).await.unwrap();
    lpush(&pool, &queue, &raw).await;
    // A first delivery is never skipped, marker or not.
    let first =
        encode_task_message(&queue, PROCESS_EVENT_TASK, "first-task", &process_event_args("first"), &Map::new());
    let first_marker = plugin_server::sources::celery_dedupe::written_marker_key(
        &queue,
        &plugin_server::sources::celery_dedupe::message_event_uuid("first-task").to_string(),
    );
    let _: () = redis::cmd("SET").arg(&first_marker).arg("written").query_async(&mut connection).await.unwrap();
    lpush(&pool, &queue, &first).await;
    let handler = RecordingHandler::new();
    let consumer = CeleryConsumer::start(REDIS_URL, pool.clone(), handler.clone(), opts.clone()).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { consumer.stats().snapshot().handled == 2 }).await);
    let seen: Vec<String> = handler.events().into_iter().map(|event| event.distinct_id).collect();
    assert_eq!(seen, ["first"]);
    let left: i64 = redis::cmd("EXISTS").arg(&marker).arg(&first_marker).query_async(&mut connection).await.unwrap();
    assert_eq!(left, 0, "markers are deleted with their messages");
    consumer.stop().await;
    cleanup_queue(&pool, &queue).await;
}

/// Delivery counts go by the script's hash; a Redis that has forgotten the script (restarted,
/// `SCRIPT FLUSH`) gets its text once and the count is still right.
#[tokio::test]
async fn delivery_counts_survive_a_redis_that_forgot_the_script() {
    use plugin_server::infra::pipelined_redis::{DeliveryCount, PipelinedRedis};
    let pool = redis_pool();
    let key = unique("celery-count");
    let redis = PipelinedRedis::new(redis::Client::open(REDIS_URL).unwrap(), Duration::from_secs(5));
    let mut connection = redis_conn(&pool).await;
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
    assert_eq!(redis.count_delivery_below(&key, 2, 60).await, DeliveryCount::Counted(1));
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
    assert_eq!(redis.count_delivery_below(&key, 2, 60).await, DeliveryCount::Counted(2));
    assert_eq!(redis.count_delivery_below(&key, 2, 60).await, DeliveryCount::AtLeast(2));
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut connection).await.unwrap();
    assert!((1..=60).contains(&ttl), "{ttl}");
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut connection).await.unwrap();
}

/// Concurrent callers' commands share round trips, each caller gets its own replies in order, and
/// an error reply to one caller's command fails that caller only.
#[tokio::test]
async fn concurrent_callers_share_round_trips_and_keep_their_own_replies() {
    use plugin_server::infra::pipelined_redis::PipelinedRedis;
    let key = unique("pipelined");
    let pool = redis_pool();
    let redis = PipelinedRedis::new(redis::Client::open(REDIS_URL).unwrap(), Duration::from_secs(5));
    let callers = 200;
    let replies = futures::future::join_all((0..callers).map(|caller| {
        let redis = &redis;
        let key = format!("{key}:{caller}");
        async move {
            let commands = if caller % 10 == 3 {
                // A type error: INCR of a key holding a list.
                vec![
                    redis::cmd("RPUSH").arg(&key).arg("x").clone(),
                    redis::cmd("INCR").arg(&key).clone(),
                    redis::cmd("DEL").arg(&key).clone(),
                ]
            } else {
                vec![
                    redis::cmd("SET").arg(&key).arg(caller).clone(),
                    redis::cmd("INCR").arg(&key).clone(),
                    redis::cmd("GET").arg(&key).clone(),
                    redis::cmd("DEL").arg(&key).clone(),
                ]
            };
            redis.query(commands).await
        }
    }))
    .await;
    for (caller, reply) in replies.into_iter().enumerate() {
        if caller % 10 == 3 {
            let error = reply.expect_err("INCR of a list is an error reply");
            assert!(error.to_string().contains("WRONGTYPE"), "{error}");
            let mut connection = redis_conn(&pool).await;
            let _: () = redis::cmd("DEL").arg(format!("{key}:{caller}")).query_async(&mut connection).await.unwrap();
        } else {
            let values = reply.unwrap_or_else(|error| panic!("caller {caller}: {error}"));
            let expected = (caller + 1).to_string();
            assert_eq!(values.len(), 4, "caller {caller}: {values:?}");
            assert_eq!(values[1], redis::Value::Int(caller as i64 + 1), "caller {caller}: {values:?}");
            assert_eq!(values[2], redis::Value::BulkString(expected.into_bytes()), "caller {caller}");
        }
    }
    let round_trips = redis.round_trips();
    assert!(round_trips < callers as u64 / 2, "{callers} concurrent callers took {round_trips} round trips");
}
