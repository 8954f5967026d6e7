//! Real plugins end to end: code loaded from the archive column (zip as GitHub makes them,
//! tar.gz as npm makes them), the source column (TypeScript) and a local folder, run on the
//! QuickJS worker pool with the real meta API over Postgres and Redis (the reference's
//! tests/plugins.test.ts, parts of tests/postgres/vm.test.ts, teardown.test.ts, errors.test.ts
//! and worker.test.ts).

mod common;
mod plugins_support;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use plugin_server::plugins::extensions::EnqueuedJob;
use plugin_server::plugins::lazy::LoadOptions;
use plugin_server::plugins::pooled_vm::RuntimeVmFactory;
use plugin_server::plugins::runtime::{PoolOptions, WorkerPool};
use plugin_server::schedule::ScheduledTask;
use plugins_support::*;
use serde_json::{json, Value};

fn runtime(threads: usize) -> Arc<RuntimeVmFactory> {
    let options = PoolOptions { threads, tasks_per_worker: 4, test_env: true, ..PoolOptions::default() };
    Arc::new(RuntimeVmFactory::new(Arc::new(WorkerPool::new(options).expect("worker pool"))))
}

async fn setup(code: &str) -> Setup {
    setup_threads(code, 1).await
}

async fn setup_threads(code: &str, threads: usize) -> Setup {
    let setup = Setup::with_options(
        code,
        runtime(threads),
        LoadOptions { retry_base: Duration::from_secs(60), test_env: true },
        &[],
    )
    .await;
    setup.plugins.reload().await.unwrap();
    setup
}

async fn set_archive(setup: &Setup, archive: Vec<u8>) {
    sqlx::query("UPDATE posthog_plugin SET archive = $1, updated_at = now() + interval '1 second' WHERE id = 60")
        .bind(archive)
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
}

#[tokio::test]
async fn the_fixture_plugin_processes_events() {
    let setup = setup(
        "function processEvent (event) { if (event.properties) { event.properties.processed = true } return event }",
    )
    .await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    let properties = returned.properties.unwrap();
    assert_eq!(properties["processed"], json!(true));
    assert_eq!(properties["$plugins_succeeded"], json!(["test-maxmind-plugin (39)"]));
    assert_eq!(
        setup.plugins.capabilities(CONFIG).await,
        Some(json!({"methods": ["processEvent"], "scheduled_tasks": [], "jobs": []}))
    );
}

#[tokio::test]
async fn meta_holds_config_attachments_global_and_the_extensions() {
    let setup = setup(
        "function setupPlugin (meta) { meta.global.key = 'value' }
         function processEvent (event, meta) { event.properties = meta; return event }",
    )
    .await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    let properties = returned.properties.unwrap();
    let mut keys: Vec<&str> = properties.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "$plugins_deferred",
            "$plugins_failed",
            "$plugins_succeeded",
            "attachments",
            "cache",
            "config",
            "geoip",
            "global",
            "jobs",
            "metrics",
            "storage",
            "utils"
        ]
    );
    assert_eq!(properties["config"], json!({"localhostIP": "94.224.212.175"}));
    assert_eq!(properties["global"], json!({"key": "value"}));
    assert_eq!(properties["attachments"]["maxmindMmdb"]["file_name"], "test.txt");
    assert_eq!(properties["attachments"]["maxmindMmdb"]["content_type"], "application/octet-stream");
}

#[tokio::test]
async fn a_syntax_error_is_recorded_and_events_pass_unchanged() {
    let setup = setup("function setupPlugin (met").await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert!(returned.properties.unwrap().is_empty());
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(error["name"], "SyntaxError");
    assert!(error["message"].as_str().unwrap().starts_with("/index.ts: "), "{error}");
    assert_eq!(setup.plugins.wait_for_schedule().await, Default::default());
}

#[tokio::test]
async fn a_typescript_source_plugin_uses_cache_and_config() {
    let setup = setup("unused").await;
    let key = format!("ts-{}", uuid::Uuid::new_v4().simple());
    setup
        .set_source(
            60,
            &format!(
                "interface Meta {{ config: Record<string, string>; cache: any }}
                 export async function processEvent(event: any, {{ config, cache }}: Meta) {{
                     const n: number = await cache.incr('{key}')
                     event.properties.ip = config.localhostIP as string
                     event.properties.n = n
                     return event
                 }}
                 export function onSnapshot(event: any): void {{}}"
            ),
        )
        .await;
    setup.plugins.reload().await.unwrap();
    for expected in 1..=2 {
        let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
        let properties = returned.properties.unwrap();
        assert_eq!(properties["ip"], "94.224.212.175");
        assert_eq!(properties["n"], expected);
    }
    assert_eq!(setup.plugins.capabilities(CONFIG).await.unwrap()["methods"], json!(["onSnapshot", "processEvent"]));
}

#[tokio::test]
async fn a_github_zipball_with_a_typescript_main() {
    let setup = setup("unused").await;
    let mut cursor = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut cursor);
        let options = zip::write::SimpleFileOptions::default();
        zip.add_directory("posthog-hello-plugin-4f1b2c3/", options).unwrap();
        zip.start_file("posthog-hello-plugin-4f1b2c3/plugin.json", options).unwrap();
        zip.write_all(br#"{"name": "hello", "main": "src/main.ts", "config": [{"key": "greeting", "default": "hi"}]}"#)
            .unwrap();
        zip.start_file("posthog-hello-plugin-4f1b2c3/src/main.ts", options).unwrap();
        zip.write_all(
            b"import { RetryError as Retry } from '@posthog/plugin-scaffold'
              import { createBuffer } from '@posthog/plugin-contrib'
              export function processEvent(event: any, meta: any): any {
                  event.properties.greeting = meta.config.greeting ?? 'none'
                  event.properties.retry = typeof Retry
                  event.properties.buffer = typeof createBuffer
                  return event
              }",
        )
        .unwrap();
        zip.finish().unwrap();
    }
    set_archive(&setup, cursor.into_inner()).await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    let properties = returned.properties.unwrap();
    assert_eq!(setup.config_error(CONFIG).await, None);
    // The fixture's DB schema (with its own defaults) is used; plugin.json's config only fills
    // in when the DB schema is empty.
    assert_eq!(properties["greeting"], "none");
    assert_eq!(properties["retry"], "function");
    assert_eq!(properties["buffer"], "function");
}

#[tokio::test]
async fn an_npm_tarball_with_module_exports() {
    let setup = setup("unused").await;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    let files = [
        ("package/package.json", r#"{"name": "posthog-npm-plugin", "version": "1.0.0"}"#),
        ("package/plugin.json", r#"{"name": "npm plugin", "config": [{"key": "greeting", "default": "hello"}]}"#),
        ("package/index.js", "module.exports = { processEvent: (event, { config }) => { event.properties.greeting = config.greeting; return event } }"),
    ];
    for (name, contents) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, contents.as_bytes()).unwrap();
    }
    let archive = builder.into_inner().unwrap().finish().unwrap();
    sqlx::query("UPDATE posthog_plugin SET config_schema = '{}' WHERE id = 60").execute(&setup.db.pool).await.unwrap();
    set_archive(&setup, archive).await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    // plugin.json's schema default fills the missing config key.
    assert_eq!(returned.properties.unwrap()["greeting"], "hello");
}

#[tokio::test]
async fn a_local_plugin_with_plain_functions() {
    let setup = setup("unused").await;
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("plugin.json"), r#"{"name": "local"}"#).unwrap();
    std::fs::write(
        folder.path().join("index.js"),
        "function processEvent (event) { event.properties.local = true; return event }
         function onEvent (event, { cache }) { }",
    )
    .unwrap();
    sqlx::query(
        "UPDATE posthog_plugin SET archive = NULL, url = $1, updated_at = now() + interval '1 second' WHERE id = 60",
    )
    .bind(format!("file:{}", folder.path().display()))
    .execute(&setup.db.pool)
    .await
    .unwrap();
    setup.plugins.reload().await.unwrap();
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(returned.properties.unwrap()["local"], json!(true));
    assert_eq!(setup.plugins.capabilities(CONFIG).await.unwrap()["methods"], json!(["onEvent", "processEvent"]));
}

#[tokio::test]
async fn console_capture_jobs_tasks_and_metrics_from_plugin_code() {
    let setup = setup(
        "export const metrics = { seen: 'sum' }
         export function processEvent (event, { jobs, metrics }) {
             console.log('logged event')
             metrics.seen.increment(1)
             jobs.reply({ text: event.event }).runNow()
             return event
         }
         export const jobs = {
             reply: async (payload, { storage }) => { await storage.set('reply', payload.text) }
         }
         export function runEveryMinute () { posthog.capture('my-new-event', { random: 'properties' }); return 'haha' }
         export async function runEveryDay (meta) { return 4 }",
    )
    .await;
    setup.plugins.run_process_event(event("hello")).await.expect("the chain ran").unwrap();
    let logged = ("CONSOLE".to_string(), "LOG".to_string(), "logged event".to_string());
    assert!(eventually(Duration::from_secs(5), || async { setup.log_entries(CONFIG).await.contains(&logged) }).await);
    // Neither the metric nor the job is awaited by the plugin.
    assert!(
        eventually(Duration::from_secs(5), || async {
            setup.services.metrics.values(CONFIG).get("seen") == Some(&json!(1))
        })
        .await
    );
    assert!(eventually(Duration::from_secs(5), || async { !setup.jobs.jobs.lock().unwrap().is_empty() }).await);
    let job: EnqueuedJob = setup.jobs.jobs.lock().unwrap()[0].clone();
    assert_eq!((job.job_type.as_str(), &job.payload), ("reply", &json!({"text": "hello"})));
    setup.plugins.run_job(job).await;
    let stored: String =
        sqlx::query_scalar("SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = 39 AND key = 'reply'")
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
    assert_eq!(stored, "\"hello\"");

    let schedule = setup.plugins.wait_for_schedule().await;
    assert_eq!(schedule.configs_for(ScheduledTask::RunEveryMinute), &[CONFIG]);
    assert_eq!(schedule.configs_for(ScheduledTask::RunEveryDay), &[CONFIG]);
    assert_eq!(setup.plugins.run_scheduled(ScheduledTask::RunEveryMinute, CONFIG).await, Some(json!("haha")));
    assert_eq!(setup.plugins.run_scheduled(ScheduledTask::RunEveryDay, CONFIG).await, Some(json!(4)));
    // `posthog.capture` is not awaited by the task either.
    assert!(eventually(Duration::from_secs(5), || async { !setup.capture.events.lock().unwrap().is_empty() }).await);
    let captured = setup.capture.events.lock().unwrap().clone();
    assert_eq!(captured.len(), 1);
    assert_eq!(captured[0].data["event"], "my-new-event");
    assert_eq!(captured[0].data["distinct_id"], "test-maxmind-plugin");
    assert_eq!(captured[0].data["properties"]["random"], "properties");
}

#[tokio::test]
async fn teardown_runs_on_every_thread_and_errors_are_recorded() {
    let setup = setup_threads(
        "export async function teardownPlugin ({ storage }) {
             await storage.set('storage', 'tore down')
             throw new Error('This Happened In The Teardown Palace')
         }
         export async function processEvent (event, { storage }) {
             event.properties.storage = await storage.get('storage', 'nope')
             return event
         }",
        2,
    )
    .await;
    let before = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(before.properties.unwrap()["storage"], "nope");
    setup.touch_config(CONFIG).await;
    setup.plugins.reload().await.unwrap();
    let after = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(after.properties.unwrap()["storage"], "tore down");
    setup.plugins.teardown_all().await;
    assert_eq!(setup.config_error(CONFIG).await.unwrap()["message"], "This Happened In The Teardown Palace");
}

#[tokio::test]
async fn rejections_nobody_handles_are_the_plugins_errors() {
    let setup = setup(
        "export function processEvent (event) {
             void new Promise((_, reject) => reject(new Error('error thrown in plugin')))
             return event
         }",
    )
    .await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran");
    assert!(returned.is_some(), "the event is still ingested");
    assert!(
        eventually(Duration::from_secs(5), || async {
            setup.config_error(CONFIG).await.is_some_and(|error| error["message"] == "error thrown in plugin")
        })
        .await
    );
}

#[tokio::test]
async fn export_events_plugins_get_the_buffer() {
    let setup = setup(
        "export async function exportEvents (events, { global }) {
             global.exported = (global.exported || 0) + events.length
         }",
    )
    .await;
    sqlx::query("UPDATE posthog_pluginconfig SET config = '{\"exportEventsBufferBytes\": \"1\"}', updated_at = now() + interval '1 second' WHERE id = 39")
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
    let capabilities = setup.plugins.capabilities(CONFIG).await.unwrap();
    assert_eq!(capabilities["methods"], json!(["setupPlugin", "teardownPlugin", "exportEvents", "onEvent"]));
    for _ in 0..3 {
        setup.plugins.run_on_event(&event("exported")).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            setup.services.metrics.values(CONFIG).get("events_delivered_successfully") == Some(&json!(3))
        })
        .await
    );
    assert_eq!(setup.config_error(CONFIG).await, None::<Value>);
}

#[tokio::test]
async fn a_throwing_process_event_keeps_what_it_changed_before_the_throw() {
    // The reference's postgres e2e plugin: mutate the event, then hit a ReferenceError.
    let setup = setup(
        "export function processEvent (event) {
             event.properties.processed = 'hell yes'
             event.properties.upperUuid = event.properties.uuid?.toUpperCase()
             event.properties['$snapshot_data'] = 'no way'
             return definitelyNotDefined(event)
         }",
    )
    .await;
    let returned =
        setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").expect("still ingested");
    let properties = returned.properties.unwrap();
    assert_eq!(properties["processed"], "hell yes");
    assert_eq!(properties["$plugins_failed"], json!(["test-maxmind-plugin (39)"]));
    let error = setup.config_error(CONFIG).await.unwrap();
    assert_eq!(error["name"], "ReferenceError");
    assert_eq!(error["event"]["properties"]["processed"], "hell yes");
}

#[tokio::test]
async fn process_event_batch_alone_processes_events() {
    let setup = setup(
        "export async function processEventBatch (events) { return events.map(e => ({ ...e, event: 'changed event' })) }",
    )
    .await;
    let returned = setup.plugins.run_process_event(event("$test")).await.expect("the chain ran").unwrap();
    assert_eq!(returned.event, "changed event");
    assert_eq!(setup.plugins.capabilities(CONFIG).await.unwrap()["methods"], json!(["processEvent"]));
}

#[tokio::test]
async fn a_retry_error_from_export_events_schedules_a_retry_job() {
    // `RetryError` keeps the name `Error` (as in @posthog/plugin-scaffold): the runtime must still
    // recognise it, as the reference's `instanceof RetryError` does.
    let setup = setup(
        "import { RetryError } from '@posthog/plugin-scaffold'
         export async function exportEvents (events) {
             const error = new RetryError('try again later')
             if (error.name !== 'Error') { throw new Error('RetryError must be named Error') }
             throw error
         }",
    )
    .await;
    sqlx::query("UPDATE posthog_pluginconfig SET config = '{\"exportEventsBufferBytes\": \"1\"}', updated_at = now() + interval '1 second' WHERE id = 39")
        .execute(&setup.db.pool)
        .await
        .unwrap();
    setup.plugins.reload().await.unwrap();
    setup.plugins.run_on_event(&event("to export")).await;
    assert!(
        eventually(Duration::from_secs(5), || async { !setup.jobs.jobs.lock().unwrap().is_empty() }).await,
        "a retry job was queued"
    );
    let job = setup.jobs.jobs.lock().unwrap()[0].clone();
    assert_eq!(job.job_type, "exportEventsWithRetry");
    assert_eq!(job.payload["retriesPerformedSoFar"], 1);
}
