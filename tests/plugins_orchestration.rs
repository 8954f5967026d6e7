//! The plugin orchestration against real Postgres and Redis with scripted fake VMs: loading,
//! the processEvent chain, error recording, ordering, reloads, capabilities, metrics, set-up
//! retries, teardown, tasks and jobs (the reference's tests/plugins.test.ts, vm.lazy.test.ts,
//! postgres/teardown.test.ts and the orchestration parts of postgres/vm.test.ts).
// Scripted plugins return the runtime's `CallError` (a JS error plus the mutated arguments).
#![allow(clippy::result_large_err)]

mod common;
mod plugins_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use plugin_server::plugins::extensions::EnqueuedJob;
use plugin_server::plugins::lazy::LoadOptions;
use plugin_server::plugins::vm_boundary::{CallError, JsError, Method, VmExports};
use plugin_server::schedule::ScheduledTask;
use plugins_support::*;
use serde_json::{json, Value};

fn factory() -> Arc<FakeFactory> {
    Arc::new(FakeFactory::default())
}

fn shared(factory: &Arc<FakeFactory>) -> Arc<SharedFakeFactory> {
    Arc::new(SharedFakeFactory(factory.clone()))
}

/// processEvent that sets `properties.processed = true`.
fn processed_plugin() -> FakePlugin {
    process_event_plugin(|mut event| {
        event["properties"]["processed"] = json!(true);
        Ok(event)
    })
}

#[tokio::test]
async fn loads_the_fixture_config_and_runs_process_event() {
    let fakes = factory();
    fakes.register("processed", processed_plugin());
    let setup = Setup::new("processed", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();

    let config = setup.plugins.config(CONFIG).expect("config 39 loaded");
    assert_eq!(config.team_id, Some(2));
    assert_eq!(config.plugin.id(), 60);
    assert_eq!(config.config, json!({"localhostIP": "94.224.212.175"}).as_object().unwrap().clone());
    assert_eq!(config.attachments.len(), 1);
    assert_eq!(config.attachments[0].0, "maxmindMmdb");
    assert_eq!(config.attachments[0].1.contents, b"test");

    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").expect("kept");
    let properties = returned.properties.unwrap();
    assert_eq!(properties["processed"], json!(true));
    assert_eq!(properties["$plugins_succeeded"], json!(["test-maxmind-plugin (39)"]));
    assert_eq!(properties["$plugins_failed"], json!([]));
    assert_eq!(properties["$plugins_deferred"], json!([]));

    let capabilities = json!({"methods": ["processEvent"], "scheduled_tasks": [], "jobs": []});
    assert_eq!(setup.plugins.capabilities(CONFIG).await, Some(capabilities.clone()));
    assert!(
        eventually(Duration::from_secs(5), || async { setup.plugin_column(60, "capabilities").await == capabilities })
            .await
    );
    let entries = setup.log_entries(CONFIG).await;
    assert!(entries.iter().any(|(source, kind, message)| source == "SYSTEM"
        && kind == "INFO"
        && message.starts_with("Plugin loaded (instance ID ")));
}

/// The pipeline copies an event for after its ingestion only when a config of the team takes it
/// there (`onEvent`, `onSnapshot` for snapshots, or `exportEvents`).
#[tokio::test]
async fn only_a_config_that_takes_events_after_ingestion_gets_them_copied() {
    let fakes = factory();
    fakes.register("processed", processed_plugin());
    fakes.register(
        "listens",
        FakePlugin { exports: exports(&[Method::OnEvent]), handler: handler(|_| async { Ok(Value::Null) }) },
    );
    let setup = Setup::new("processed", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    setup.plugins.run_process_event(event("$test")).await.expect("the chain ran");
    assert!(!setup.plugins.team_takes_events_after_ingestion(2, false), "processEvent alone");
    assert!(!setup.plugins.team_takes_events_after_ingestion(2, true));
    assert!(!setup.plugins.team_takes_events_after_ingestion(3, false), "a team without configs");

    let setup = Setup::new("listens", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    assert_eq!(setup.plugins.capabilities(CONFIG).await.map(|c| c["methods"].clone()), Some(json!(["onEvent"])));
    assert!(setup.plugins.team_takes_events_after_ingestion(2, false), "onEvent");
    assert!(!setup.plugins.team_takes_events_after_ingestion(2, true), "no onSnapshot");
}

#[tokio::test]
async fn a_null_return_drops_the_event_and_stops_the_chain() {
    let fakes = factory();
    fakes.register(
        "drop",
        FakePlugin { exports: exports(&[Method::ProcessEvent]), handler: handler(|_| async { Ok(Value::Null) }) },
    );
    let setup = Setup::new("drop", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    assert_eq!(setup.plugins.run_process_event(event("$test")).await.expect("the chain ran"), None);
}

#[tokio::test]
async fn changing_team_id_is_an_error_and_the_team_is_restored() {
    let plugin = process_event_plugin(|mut event| {
        event["team_id"] = json!(400);
        Ok(event)
    });
    let (_fakes, setup) = fake_setup(plugin, Duration::from_secs(3)).await;
    setup.plugins.reload().await.unwrap();
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").expect("kept");
    assert_eq!(returned.team_id, 2);
    let properties = returned.properties.unwrap();
    assert_eq!(properties["$plugins_failed"], json!(["test-maxmind-plugin (39)"]));
    assert_eq!(properties["$plugins_succeeded"], json!([]));
    let error = setup.config_error(CONFIG).await.expect("error recorded");
    assert_eq!(error["name"], "IllegalOperationError");
    assert_eq!(error["message"], "Plugin tried to change event.team_id");
    assert_eq!(error["event"]["team_id"], 2);
    let entries = setup.log_entries(CONFIG).await;
    assert!(entries.contains(&("PLUGIN".into(), "ERROR".into(), "Plugin tried to change event.team_id".into())));
}

#[tokio::test]
async fn a_throwing_plugin_keeps_its_in_place_mutations_but_not_after_a_timeout() {
    let plugin = process_event_plugin(|mut event| {
        let timeout = event["event"] == "timeout";
        event["properties"]["mutated"] = json!(true);
        if timeout {
            return Err(JsError::new("TimeoutError", "Script execution timed out").into());
        }
        Err(CallError {
            error: JsError::new("ReferenceError", "x is not defined"),
            args: Some(vec![event]),
            unavailable: false,
        })
    });
    let (_fakes, setup) = fake_setup(plugin, Duration::from_secs(3)).await;
    setup.plugins.reload().await.unwrap();
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").expect("kept");
    let properties = returned.properties.unwrap();
    assert_eq!(properties["mutated"], json!(true));
    assert_eq!(properties["$plugins_failed"], json!(["test-maxmind-plugin (39)"]));
    assert_eq!(setup.config_error(CONFIG).await.unwrap()["message"], "x is not defined");

    let returned = setup.plugins.run_process_event(event("timeout")).await.expect("the chain ran").expect("kept");
    assert!(returned.properties.unwrap().get("mutated").is_none());
    let runs = setup.observer.runs.lock().unwrap().clone();
    assert_eq!(runs, [("processEvent".to_string(), 2, true), ("processEvent".to_string(), 2, true)]);
}

#[tokio::test]
async fn a_plugin_the_runtime_cannot_run_fails_the_event_instead_of_skipping_the_plugin() {
    // A filter or PII-scrubbing plugin whose worker thread was lost (twice: the pool retries once)
    // must not be skipped: the chain fails, so the pipeline hands the event back to its queue.
    let plugin = process_event_plugin(|_| {
        Err(CallError {
            error: JsError::new("Error", "JS worker thread 0 unavailable: the thread is stalled"),
            args: None,
            unavailable: true,
        })
    });
    let (_fakes, setup) = fake_setup(plugin, Duration::from_secs(3)).await;
    setup.plugins.reload().await.unwrap();
    let failure = setup.plugins.run_process_event(event("$test")).await.expect_err("the event does not go on");
    assert_eq!(failure.plugin_config_id, CONFIG);
    assert!(failure.to_string().contains("the thread is stalled"), "{failure}");
    // Not the plugin's error: nothing recorded on its config.
    assert_eq!(setup.config_error(CONFIG).await, None);
}

#[tokio::test]
async fn on_event_only_plugins_are_deferred_and_on_event_errors_are_recorded() {
    let fakes = factory();
    fakes.register(
        "on-event",
        FakePlugin {
            exports: exports(&[Method::OnEvent, Method::OnSnapshot]),
            handler: handler(|call| async move {
                if call.name == "onSnapshot" {
                    return Err(JsError::new("Error", "snapshot failed").into());
                }
                Ok(Value::Null)
            }),
        },
    );
    let setup = Setup::new("on-event", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").expect("kept");
    assert_eq!(returned.properties.unwrap()["$plugins_deferred"], json!(["test-maxmind-plugin (39)"]));
    setup.plugins.run_on_event(&event("$test")).await;
    assert_eq!(fakes.calls_of("onEvent"), 1);
    assert_eq!(setup.config_error(CONFIG).await, None);
    setup.plugins.run_on_snapshot(&event("$snapshot")).await;
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(error["message"], "snapshot failed");
    assert_eq!(error["event"]["event"], "$snapshot");
}

#[tokio::test]
async fn process_event_batch_only_plugins_process_events() {
    // The runtime reports a synthesized processEvent for processEventBatch-only plugins; the
    // orchestration treats it like any processEvent.
    let fakes = factory();
    fakes.register("processed", processed_plugin());
    let setup = Setup::new("processed", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    assert!(setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").is_some());
}

#[tokio::test]
async fn a_plugin_that_fails_to_evaluate_leaves_events_alone() {
    let fakes = factory();
    let setup = Setup::with_options(
        "function setupPlugin (met",
        shared(&fakes),
        LoadOptions { retry_base: Duration::from_secs(60), test_env: true },
        &[],
    )
    .await;
    setup.plugins.reload().await.unwrap();
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").expect("kept");
    assert!(returned.properties.unwrap().is_empty());
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(error["name"], "SyntaxError");
    assert!(error["message"].as_str().unwrap().contains(": Unexpected token, expected \",\""));
    assert_eq!(setup.plugins.wait_for_schedule().await, Default::default());
    let entries = setup.log_entries(CONFIG).await;
    assert!(entries.contains(&(
        "SYSTEM".into(),
        "ERROR".into(),
        format!("Plugin failed to load (instance ID {}). Retrying in 60 s.", setup.hub.instance_id)
    )));
}

#[tokio::test]
async fn loading_failures_are_recorded_with_the_reference_messages() {
    let fakes = factory();
    let setup = Setup::new("unused", shared(&fakes)).await;
    let digest = "plugin test-maxmind-plugin ID 60 (organization ID ca30f2ec-e9a4-4001-bf27-3ef194086068)";

    // plugin.json that is not JSON at all.
    let broken = {
        let mut cursor = std::io::Cursor::new(Vec::new());
        {
            use std::io::Write;
            let mut zip = zip::ZipWriter::new(&mut cursor);
            let options = zip::write::SimpleFileOptions::default();
            zip.start_file("testplugin/index.js", options).unwrap();
            zip.write_all(b"code").unwrap();
            zip.start_file("testplugin/plugin.json", options).unwrap();
            zip.write_all(b"{ broken").unwrap();
            zip.finish().unwrap();
        }
        cursor.into_inner()
    };
    sqlx::query("UPDATE posthog_plugin SET archive = $1 WHERE id = 60")
        .bind(&broken)
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
    assert!(setup.plugins.capabilities(CONFIG).await.is_none());
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(error, json!({"message": format!("Can not load plugin.json for {digest}"), "time": error["time"]}));

    sqlx::query("UPDATE posthog_plugin SET archive = 'this is not a zip'::bytea, updated_at = now() WHERE id = 60")
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
    assert!(setup.plugins.capabilities(CONFIG).await.is_none());
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(error["message"], "Could not read archive as .zip or .tgz");
    assert_eq!(error["name"], "Error");

    sqlx::query(
        "UPDATE posthog_plugin SET archive = NULL, is_global = true, url = 'https://example.com', updated_at = now() WHERE id = 60",
    )
    .execute(&setup.db.pool)
    .await
    .unwrap();
    setup.plugins.reload().await.unwrap();
    assert!(setup.plugins.capabilities(CONFIG).await.is_none());
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(
        error["message"],
        "Tried using undownloaded remote plugin test-maxmind-plugin ID 60 (organization ID ca30f2ec-e9a4-4001-bf27-3ef194086068 - global), which is not supported!"
    );

    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("plugin.json"), "{ not json").unwrap();
    std::fs::write(folder.path().join("index.js"), "code").unwrap();
    sqlx::query("UPDATE posthog_plugin SET url = $1, updated_at = now() WHERE id = 60")
        .bind(format!("file:{}", folder.path().display()))
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
    assert!(setup.plugins.capabilities(CONFIG).await.is_none());
    let message = setup.config_error(CONFIG).await.unwrap()["message"].as_str().unwrap().to_string();
    assert!(message.starts_with("Could not load posthog config at "), "{message}");
    // Events still pass through unchanged.
    assert!(setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").is_some());
}

#[tokio::test]
async fn configs_run_in_order_and_reloads_only_reload_what_changed() {
    let fakes = factory();
    for id in [60, 61, 62, 63, 64] {
        let plugin = process_event_plugin(move |mut event| {
            let mut list = event["properties"]["plugins"].as_array().cloned().unwrap_or_default();
            list.push(json!(id));
            event["properties"]["plugins"] = json!(list);
            Ok(event)
        });
        fakes.register(&format!("push-{id}"), plugin);
    }
    let setup = Setup::new("push-60", shared(&fakes)).await;
    sqlx::query("UPDATE posthog_pluginconfig SET \"order\" = 2 WHERE id = 39").execute(&setup.db.pool).await.unwrap();
    setup.add_source_plugin(61, 40, 1, "push-61").await;
    setup.add_source_plugin(62, 41, 3, "push-62").await;
    setup.plugins.reload().await.unwrap();
    assert_eq!(setup.plugins.team_order(2), vec![(40, 1), (39, 2), (41, 3)]);
    for _ in 0..2 {
        let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
        assert_eq!(returned.properties.unwrap()["plugins"], json!([61, 60, 62]));
    }
    setup.add_source_plugin(63, 42, 0, "push-63").await;
    setup.plugins.reload().await.unwrap();
    setup.plugins.wait_for_schedule().await;
    assert_eq!(fakes.loads.load(Ordering::SeqCst), 4);

    // 39 unchanged; 40's config updated; 41 removed; 42's plugin updated; 43 new.
    let pool = &setup.db.pool;
    sqlx::query("UPDATE posthog_pluginconfig SET updated_at = now() + interval '1 second' WHERE id = 40")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE posthog_pluginconfig SET enabled = false WHERE id = 41").execute(pool).await.unwrap();
    sqlx::query("UPDATE posthog_plugin SET updated_at = now() + interval '1 second' WHERE id = 63")
        .execute(pool)
        .await
        .unwrap();
    setup.add_source_plugin(64, 43, 1, "push-64").await;
    setup.plugins.reload().await.unwrap();
    setup.plugins.wait_for_schedule().await;
    assert_eq!(fakes.loads.load(Ordering::SeqCst), 7);
    assert_eq!(setup.plugins.team_order(2), vec![(42, 0), (40, 1), (43, 1), (39, 2)]);
    assert!(setup.plugins.config(41).is_none());
    // The removed config was torn down and released.
    assert!(
        eventually(Duration::from_secs(5), || async {
            fakes.calls.lock().unwrap().iter().any(|(id, call)| *id == 41 && call == "dispose")
        })
        .await
    );
}

#[tokio::test]
async fn capabilities_cover_methods_tasks_and_jobs_and_metrics_are_stored_lower_case() {
    let fakes = factory();
    fakes.register(
        "all",
        FakePlugin {
            exports: VmExports {
                methods: vec![Method::ProcessEvent, Method::OnEvent],
                scheduled_tasks: vec!["runEveryHour".into()],
                jobs: vec!["x".into()],
                metrics: Some(
                    json!({"metric1": "sum", "metric2": "mAx", "metric3": "MIN"}).as_object().unwrap().clone(),
                ),
            },
            handler: handler(|_| async { Ok(json!(4)) }),
        },
    );
    let setup = Setup::new("all", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    assert_eq!(
        setup.plugins.capabilities(CONFIG).await.unwrap(),
        json!({"methods": ["onEvent", "processEvent"], "scheduled_tasks": ["runEveryHour"], "jobs": ["x"]})
    );
    assert_eq!(setup.plugin_column(60, "metrics").await, json!({"metric1": "sum", "metric2": "max", "metric3": "min"}));
    let schedule = setup.plugins.wait_for_schedule().await;
    assert_eq!(schedule.configs_for(ScheduledTask::RunEveryHour), &[CONFIG]);
    assert_eq!(setup.plugins.schedule(), Some(schedule));
    assert_eq!(setup.plugins.run_scheduled(ScheduledTask::RunEveryHour, CONFIG).await, Some(json!(4)));

    // Metric operations follow the declared types.
    let config = setup.plugins.config(CONFIG).unwrap();
    let context = plugin_server::plugins::extensions::PluginContext::new(setup.services.clone(), config);
    for value in [100, 10, -10] {
        context.call("metrics.increment", vec![json!("metric1"), json!(value)]).await.unwrap();
    }
    context.call("metrics.max", vec![json!("metric2"), json!(5)]).await.unwrap();
    context.call("metrics.max", vec![json!("metric2"), json!(10)]).await.unwrap();
    context.call("metrics.min", vec![json!("metric3"), json!(4)]).await.unwrap();
    context.call("metrics.min", vec![json!("metric3"), json!(1)]).await.unwrap();
    let values = setup.services.metrics.values(CONFIG);
    assert_eq!(Value::Object(values), json!({"metric1": 100, "metric2": 10, "metric3": 1}));
    let invalid = context.call("metrics.increment", vec![json!("nope"), json!(1)]).await.unwrap_err();
    assert_eq!((invalid.name.as_str(), invalid.message.as_str()), ("IllegalOperationError", "Invalid metric name"));
    let not_number = context.call("metrics.increment", vec![json!("metric1"), json!("1")]).await.unwrap_err();
    assert_eq!(not_number.message, "Only numbers are allowed for operations on metrics");
    assert_eq!(context.call("metrics.max", vec![json!("metric1"), json!(1)]).await.unwrap_err().name, "TypeError");

    setup.plugins.send_plugin_metrics().await;
    let captured = setup.capture.events.lock().unwrap().clone();
    assert_eq!(captured.len(), 1);
    assert_eq!(captured[0].data["event"], "$$plugin_metrics");
    assert_eq!(captured[0].data["properties"]["metric1"], 100);
    assert_eq!(captured[0].data["properties"]["plugin_name"], "test-maxmind-plugin");
    assert_eq!(captured[0].data["properties"]["plugin_tag"], "0.0.2");
    assert!(setup.services.metrics.values(CONFIG).is_empty());
}

#[tokio::test]
async fn invalid_metric_types_fail_the_load() {
    let fakes = factory();
    fakes.register(
        "bad-metrics",
        FakePlugin {
            exports: VmExports {
                methods: vec![Method::ProcessEvent],
                metrics: Some(json!({"a": "avg"}).as_object().unwrap().clone()),
                ..VmExports::default()
            },
            handler: handler(|_| async { Ok(Value::Null) }),
        },
    );
    let setup = Setup::with_options(
        "bad-metrics",
        shared(&fakes),
        LoadOptions { retry_base: Duration::from_secs(60), test_env: true },
        &[],
    )
    .await;
    setup.plugins.reload().await.unwrap();
    assert!(setup.plugins.capabilities(CONFIG).await.is_none());
    assert_eq!(
        setup.config_error(CONFIG).await.unwrap()["message"],
        "Only 'sum', 'max', and 'min' are supported as metric types. Invalid types received: avg"
    );
}

#[tokio::test]
async fn setup_is_retried_with_back_off_then_the_config_is_disabled() {
    let fakes = factory();
    fakes.register(
        "always-fails",
        FakePlugin {
            exports: exports(&[Method::SetupPlugin, Method::ProcessEvent]),
            handler: handler(|call| async move {
                if call.name == "setupPlugin" {
                    return Err(JsError::retry("I always fail!").into());
                }
                Ok(call.args[0].clone())
            }),
        },
    );
    let setup = Setup::with_options(
        "always-fails",
        shared(&fakes),
        LoadOptions { retry_base: Duration::from_millis(3), test_env: true },
        &[],
    )
    .await;
    setup.plugins.reload().await.unwrap();
    let instance = setup.hub.instance_id;
    let done = eventually(Duration::from_secs(20), || async {
        let enabled: bool = sqlx::query_scalar("SELECT enabled FROM posthog_pluginconfig WHERE id = 39")
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
        !enabled
    })
    .await;
    assert!(done, "config disabled after 10 attempts");
    assert_eq!(fakes.calls_of("setupPlugin"), 10);
    let system: Vec<String> = setup
        .log_entries(CONFIG)
        .await
        .into_iter()
        .filter(|(source, _, message)| source == "SYSTEM" && message.starts_with("Plugin failed"))
        .map(|(_, _, message)| message)
        .collect();
    assert_eq!(system.len(), 10);
    assert_eq!(system[0], format!("Plugin failed to load (instance ID {instance}). Retrying in 0.003 s."));
    assert_eq!(system[8], format!("Plugin failed to load (instance ID {instance}). Retrying in 0.768 s."));
    assert_eq!(
        system[9],
        format!(
            "Plugin failed to load (instance ID {instance}). Disabling it due to too many retries – tried to load it 10 times before giving up."
        )
    );
    // Events skip the plugin meanwhile.
    assert!(setup
        .plugins
        .run_process_event(event("$test"))
        .await
        .expect("the chain ran")
        .unwrap()
        .properties
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn setup_succeeding_on_retry_loads_the_plugin_and_clears_the_error() {
    let fakes = factory();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    fakes.register(
        "flaky",
        FakePlugin {
            exports: exports(&[Method::SetupPlugin, Method::ProcessEvent]),
            handler: handler(move |call| {
                let counter = counter.clone();
                async move {
                    if call.name == "setupPlugin" && counter.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(JsError::new("Error", "first time fails").into());
                    }
                    let mut event = call.args.first().cloned().unwrap_or(Value::Null);
                    if !event.is_null() {
                        event["properties"]["ok"] = json!(true);
                    }
                    Ok(event)
                }
            }),
        },
    );
    let setup = Setup::with_options(
        "flaky",
        shared(&fakes),
        LoadOptions { retry_base: Duration::from_millis(50), test_env: true },
        &[],
    )
    .await;
    setup.plugins.reload().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { setup.plugins.capabilities(CONFIG).await.is_some() }).await);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(returned.properties.unwrap()["ok"], json!(true));
    assert!(eventually(Duration::from_secs(5), || async { setup.config_error(CONFIG).await.is_none() }).await);
}

#[tokio::test]
async fn teardown_errors_are_recorded_and_teardown_runs_before_the_reloaded_setup() {
    let fakes = factory();
    fakes.register(
        "teardown",
        FakePlugin {
            exports: exports(&[Method::SetupPlugin, Method::TeardownPlugin, Method::ProcessEvent]),
            handler: handler(|call| async move {
                let storage = call.context.storage();
                match call.name.as_str() {
                    "setupPlugin" => Ok(Value::Null),
                    "teardownPlugin" => {
                        storage.set("storage", Some(&json!("tore down"))).await?;
                        Err(JsError::new("Error", "This Happened In The Teardown Palace").into())
                    }
                    _ => {
                        let mut event = call.args[0].clone();
                        event["properties"]["storage"] = storage.get("storage", json!("nope")).await?;
                        Ok(event)
                    }
                }
            }),
        },
    );
    let setup = Setup::new("teardown", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    let before = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(before.properties.unwrap()["storage"], "nope");
    setup.touch_config(CONFIG).await;
    setup.plugins.reload().await.unwrap();
    let after = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(after.properties.unwrap()["storage"], "tore down");
    // The reloaded VM loaded fine, which clears the error the old one's teardown recorded.
    assert_eq!(setup.config_error(CONFIG).await, None);
    let instance = setup.hub.instance_id;
    assert!(setup.log_entries(CONFIG).await.contains(&(
        "SYSTEM".into(),
        "ERROR".into(),
        format!("Plugin failed to unload (instance ID {instance}).")
    )));
    setup.plugins.teardown_all().await;
    assert_eq!(fakes.calls_of("teardownPlugin"), 2);
    assert_eq!(setup.config_error(CONFIG).await.unwrap()["message"], "This Happened In The Teardown Palace");
}

#[tokio::test]
async fn jobs_and_tasks_run_and_missing_ones_are_errors() {
    let fakes = factory();
    fakes.register(
        "jobs",
        FakePlugin {
            exports: VmExports {
                methods: vec![],
                scheduled_tasks: vec!["runEveryDay".into()],
                jobs: vec!["reply".into()],
                metrics: None,
            },
            handler: handler(|call| async move { Ok(json!({"name": call.name, "args": call.args})) }),
        },
    );
    let setup = Setup::new("jobs", shared(&fakes)).await;
    setup.plugins.reload().await.unwrap();
    assert_eq!(
        setup.plugins.wait_for_schedule().await.configs_for(ScheduledTask::RunEveryDay),
        &[CONFIG],
        "schedule {{runEveryDay: [39]}}"
    );
    let job = |job_type: &str, payload: Value| EnqueuedJob {
        job_type: job_type.into(),
        payload,
        timestamp: 0,
        plugin_config_id: i64::from(CONFIG),
        plugin_config_team: 2,
    };
    assert_eq!(
        setup.plugins.run_job(job("reply", json!({"a": 1}))).await,
        Some(json!({"name": "jobs.reply", "args": [{"a": 1}]}))
    );
    assert_eq!(setup.plugins.run_job(job("missing", json!({}))).await, None);
    assert_eq!(
        setup.config_error(CONFIG).await.unwrap()["message"],
        "Task \"missing\" not found for plugin \"test-maxmind-plugin\" with config id [object Object]"
    );
    assert_eq!(setup.plugins.run_scheduled(ScheduledTask::RunEveryMinute, 12345).await, None);
}
