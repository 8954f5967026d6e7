//! The exportEvents upgrade (the reference's exportEvents cases of tests/postgres/vm.test.ts):
//! buffer arithmetic, the timeout flush, the ignore list, RetryError retries through the job
//! queue (capped at 15), metrics, capabilities and the flush on teardown.

mod common;
mod plugins_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugin_server::event::PluginEvent;
use plugin_server::plugins::export_events::json_length;
use plugin_server::plugins::vm_boundary::{JsError, Method, VmExports};
use plugins_support::*;
use serde_json::{json, Value};

async fn setup_with(plugin: FakePlugin, config: Value) -> Setup {
    setup_and_fakes(plugin, config).await.1
}

async fn setup_and_fakes(plugin: FakePlugin, config: Value) -> (Arc<FakeFactory>, Setup) {
    let (fakes, setup) = fake_setup(plugin, Duration::from_secs(3)).await;
    sqlx::query("UPDATE posthog_pluginconfig SET config = $1 WHERE id = 39")
        .bind(config)
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
    (fakes, setup)
}

fn sized_event(name: &str) -> PluginEvent {
    event(name)
}

#[tokio::test]
async fn buffers_by_bytes_and_flushes_the_rest_after_the_timeout() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let size = json_length(&serde_json::to_value(sized_event("exported")).unwrap());
    // Room for 7 events, not 8 (the reference's test: 1000 bytes, 134-byte events).
    let limit = 7 * size + 2;
    let setup = setup_with(
        exporter(batches.clone(), false),
        json!({"exportEventsBufferBytes": limit.to_string(), "exportEventsBufferSeconds": "1"}),
    )
    .await;
    let capabilities = setup.plugins.capabilities(CONFIG).await.unwrap();
    assert_eq!(capabilities["methods"], json!(["setupPlugin", "teardownPlugin", "exportEvents", "onEvent"]));
    assert_eq!(
        capabilities["jobs"],
        json!(["exportEventsWithRetry", "exportEventsFromTheBeginning", "Export historical events"])
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            setup.plugin_column(60, "public_jobs").await == json!({"Export historical events": {}})
        })
        .await
    );
    assert_eq!(
        setup.plugin_column(60, "metrics").await,
        json!({"events_seen": "sum", "events_delivered_successfully": "sum", "undelivered_events": "sum", "retry_errors": "sum", "other_errors": "sum"})
    );
    // exportEvents plugins are deferred in the processEvent chain (they now have onEvent).
    let returned = setup.plugins.run_process_event(event("x")).await.expect("the chain ran").unwrap();
    assert_eq!(returned.properties.unwrap()["$plugins_deferred"], json!(["test-maxmind-plugin (39)"]));

    for _ in 0..100 {
        setup.plugins.run_on_event(&sized_event("exported")).await;
    }
    assert!(eventually(Duration::from_secs(3), || async { batches.lock().unwrap().len() == 14 }).await);
    assert!(batches.lock().unwrap().iter().all(|batch| batch.len() == 7));
    assert!(eventually(Duration::from_secs(5), || async { batches.lock().unwrap().len() == 15 }).await);
    assert_eq!(batches.lock().unwrap()[14].len(), 2);
    let values = setup.services.metrics.values(CONFIG);
    assert_eq!(values["events_seen"], 100);
    assert_eq!(values["events_delivered_successfully"], 100);
}

#[tokio::test]
async fn a_tiny_buffer_exports_every_event_alone_and_ignored_events_are_skipped() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let setup = setup_with(
        exporter(batches.clone(), false),
        json!({"exportEventsBufferBytes": "1", "exportEventsToIgnore": "default event, otherEvent"}),
    )
    .await;
    for name in ["default event", "otherEvent", "otherEvent2", "otherEvent3"] {
        setup.plugins.run_on_event(&event(name)).await;
    }
    assert!(eventually(Duration::from_secs(3), || async { batches.lock().unwrap().len() == 2 }).await);
    let mut names: Vec<String> =
        batches.lock().unwrap().iter().map(|batch| batch[0]["event"].as_str().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(names, ["otherEvent2", "otherEvent3"]);
}

#[tokio::test]
async fn retry_errors_are_retried_through_the_job_queue_up_to_15_times() {
    let statsd = common::statsd::StatsdListener::start();
    statsd.install_global();
    let batches = Arc::new(Mutex::new(Vec::new()));
    let setup = setup_with(exporter(batches.clone(), true), json!({"exportEventsBufferBytes": "1"})).await;
    setup.plugins.run_on_event(&event("exported")).await;
    assert!(eventually(Duration::from_secs(3), || async { setup.jobs.jobs.lock().unwrap().len() == 1 }).await);
    let job = setup.jobs.jobs.lock().unwrap()[0].clone();
    assert_eq!((job.job_type.as_str(), job.plugin_config_id, job.plugin_config_team), ("exportEventsWithRetry", 39, 2));
    assert_eq!(job.payload["retriesPerformedSoFar"], 1);
    assert_eq!(job.payload["batch"][0]["event"], "exported");
    let now = chrono::Utc::now().timestamp_millis();
    assert!(job.timestamp > now + 5_000 && job.timestamp <= now + 6_000, "first retry in 6 s");
    // Run each enqueued retry as the job consumer would.
    for expected in 2..=15 {
        let last = setup.jobs.jobs.lock().unwrap().last().cloned().unwrap();
        setup.plugins.run_job(last).await;
        let jobs = setup.jobs.jobs.lock().unwrap().clone();
        assert_eq!(jobs.len(), expected);
        assert_eq!(jobs.last().unwrap().payload["retriesPerformedSoFar"], expected as u64);
        assert_eq!(jobs.last().unwrap().payload["batchId"], job.payload["batchId"]);
    }
    let last = setup.jobs.jobs.lock().unwrap().last().cloned().unwrap();
    setup.plugins.run_job(last).await;
    assert_eq!(setup.jobs.jobs.lock().unwrap().len(), 15, "no 16th retry");
    let values = setup.services.metrics.values(CONFIG);
    assert_eq!(values["events_seen"], 1);
    assert_eq!(values["retry_errors"], 16);
    assert_eq!(values["undelivered_events"], 1);
    assert_eq!(setup.config_error(CONFIG).await, None);

    // The reference's retry counters, tagged with the retry number, plugin and team.
    statsd.wait_for_line("plugin.export_events.retry_dropped", Duration::from_secs(3));
    let lines = statsd.lines();
    let retries: Vec<&String> = lines.iter().filter(|line| line.starts_with("plugin.export_events.retry_")).collect();
    let plugin = setup.plugins.config(CONFIG).expect("config in force").plugin.name();
    let mut expected: Vec<String> = (1..=15)
        .map(|retry| format!("plugin.export_events.retry_enqueued,retry={retry},plugin={plugin},teamId=2:1|c"))
        .collect();
    expected.push(format!("plugin.export_events.retry_dropped,retry=15,plugin={plugin},teamId=2:1|c"));
    assert_eq!(retries, expected.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn other_errors_are_recorded_and_teardown_flushes() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let recorded = batches.clone();
    let plugin = FakePlugin {
        exports: VmExports { methods: vec![Method::ExportEvents, Method::OnEvent], ..VmExports::default() },
        handler: handler(move |call| {
            let recorded = recorded.clone();
            async move {
                match call.name.as_str() {
                    "exportEvents" => {
                        recorded.lock().unwrap().push(call.args[0].as_array().cloned().unwrap_or_default());
                        Err(JsError::new("Error", "export exploded").into())
                    }
                    _ => Ok(Value::Null),
                }
            }
        }),
    };
    let (fakes, setup) = setup_and_fakes(plugin, json!({})).await;
    setup.plugins.run_on_event(&event("a")).await;
    setup.plugins.run_on_event(&event("b")).await;
    // Nothing flushed yet (1 MiB, 600 s in tests); the plugin's own onEvent ran too.
    assert!(batches.lock().unwrap().is_empty());
    assert_eq!(fakes.calls_of("onEvent"), 2);
    setup.plugins.teardown_all().await;
    assert_eq!(batches.lock().unwrap().len(), 1);
    assert_eq!(batches.lock().unwrap()[0].len(), 2);
    assert!(
        eventually(Duration::from_secs(3), || async {
            setup.config_error(CONFIG).await.is_some_and(|error| error["message"] == "export exploded")
        })
        .await
    );
    let values = setup.services.metrics.values(CONFIG);
    assert_eq!(values["other_errors"], 2);
    assert_eq!(values["undelivered_events"], 2);
}

#[tokio::test]
async fn historical_export_walks_the_stored_events() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (_fakes, setup) = fake_setup(exporter(batches.clone(), false), Duration::from_secs(3)).await;
    for minutes_ago in [9, 7, 5, 3] {
        sqlx::query(
            "INSERT INTO posthog_event (created_at, event, distinct_id, properties, team_id, timestamp) \
             VALUES (now(), 'historical', 'd1', '{\"$ip\": \"1.2.3.4\"}', 2, now() - make_interval(mins => $1))",
        )
        .bind(minutes_ago)
        .execute(&setup.db.pool)
        .await
        .unwrap();
    }
    setup.plugins.reload().await.unwrap();
    setup.plugins.capabilities(CONFIG).await.unwrap();
    let job = |payload: Value| plugin_server::plugins::extensions::EnqueuedJob {
        job_type: "Export historical events".into(),
        payload,
        timestamp: 0,
        plugin_config_id: i64::from(CONFIG),
        plugin_config_team: 2,
    };
    let exported = |batches: &Arc<Mutex<Vec<Vec<Value>>>>| batches.lock().unwrap().iter().map(Vec::len).sum::<usize>();

    setup.plugins.run_job(job(json!({}))).await;
    setup.drain_jobs().await;
    assert_eq!(exported(&batches), 4);
    let first = batches.lock().unwrap().iter().find(|batch| !batch.is_empty()).unwrap()[0].clone();
    assert_eq!(first["event"], "historical");
    assert_eq!(first["ip"], "1.2.3.4");
    assert_eq!(first["site_url"], "");
    let logs: Vec<String> = setup.log_entries(CONFIG).await.into_iter().map(|(_, _, message)| message).collect();
    assert!(logs.iter().any(|message| message.ends_with(") Done exporting all events")), "{logs:?}");
    assert!(logs.iter().any(|message| message.contains(") Successfully processed events 0-100 from ")));
    assert!(logs.iter().any(|message| message.contains(") Export progress: ")));

    // Nothing stored after `dateFrom`: nothing exported.
    batches.lock().unwrap().clear();
    let now = chrono::Utc::now().to_rfc3339();
    setup.plugins.run_job(job(json!({"dateFrom": now, "dateTo": now}))).await;
    setup.drain_jobs().await;
    assert_eq!(exported(&batches), 0);

    let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    setup.plugins.run_job(job(json!({"dateFrom": hour_ago}))).await;
    setup.drain_jobs().await;
    assert_eq!(exported(&batches), 4);
    assert_eq!(setup.config_error(CONFIG).await, None);
}
