//! The reference's tests/postgres/vm.test.ts, case by case. Each test is named after its reference
//! case (the doc comment quotes the case) and runs the same plugin source with the same
//! assertions against one plugin config as the reference's `createPluginConfigVM` builds it: the
//! real QuickJS runtime, the real meta API over Postgres and Redis, and the server's upgrades
//! (the exportEvents buffer and retry job). As in the reference, `fetch` is a mock that records its
//! calls, and the job queue records what is enqueued; `posthog.capture` goes through the real
//! Celery producer to a queue of the test's own.
//!
//! Cases ported elsewhere (same source and assertions): `processEvent`, the first `async
//! processEvent`, `processEventBatch`, `async processEventBatch`, `processEvent without returning`
//! and the four `module.exports`/`exports` cases (runtime_vm.rs `sync_and_async_process_event`,
//! `export_styles`), `fetch` and `fetch via import` (runtime_vm.rs `fetch_in_all_import_styles`),
//! `imports` (runtime_imports.rs `jsonwebtoken`).

mod common;
mod plugins_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use plugin_server::event::PluginEvent;
use plugin_server::hub::Hub;
use plugin_server::plugins::extensions::{PluginContext, PluginServices};
use plugin_server::plugins::lazy::{LazyVm, LoadOptions, LoadedVm};
use plugin_server::plugins::loader::PluginCode;
use plugin_server::plugins::log_entries::PostgresLogSink;
use plugin_server::plugins::pooled_vm::{Fetcher, RuntimeVmFactory};
use plugin_server::plugins::rows::{Attachment, Plugin, PluginConfig, PluginRow};
use plugin_server::plugins::run::{self, ConfigEntry};
use plugin_server::plugins::runtime::{FetchRequest, FetchResponse, MetaError, PoolOptions, WorkerPool};
use plugin_server::plugins::vm_boundary::{Method, TaskKind};
use plugin_server::sinks::capture::CeleryCapture;
use plugin_server::sinks::CeleryProducer;
use plugin_server::sources::celery::decode_envelope;
use plugins_support::{eventually, RecordingJobs};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use common::{TestDb, COMMON_ORGANIZATION_ID, PLUGIN_CONFIG_ID, PLUGIN_ID, TEAM_ID};

// ---------------------------------------------------------------- the reference's mocks

/// The reference's node-fetch mock (jest.setup.fetch-mock.js): records every call and answers
/// with the mock's JSON for the URLs it knows.
#[derive(Default)]
struct FetchMock {
    calls: Mutex<Vec<FetchRequest>>,
}

impl FetchMock {
    fn urls(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|request| request.url.clone()).collect()
    }

    fn called_with(&self, url: &str) -> bool {
        self.urls().iter().any(|called| called == url)
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

#[async_trait]
impl Fetcher for FetchMock {
    async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, MetaError> {
        self.calls.lock().unwrap().push(request.clone());
        let body = match request.url.as_str() {
            "https://google.com/results.json?query=fetched" => {
                json!({"count": 2, "query": "bla", "results": [true, true]})
            }
            "https://app.posthog.com/api/event?token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2" => json!({"hello": "world"}),
            _ => json!({"fetch": "mock"}),
        };
        Ok(FetchResponse {
            status: if request.method == "PUT" { 201 } else { 200 },
            status_text: "OK".into(),
            url: request.url,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        })
    }
}

// ---------------------------------------------------------------- createPluginConfigVM

/// `pluginConfig39` of the reference's helpers/plugins.ts, with what the cases vary.
struct ConfigSpec {
    /// `meta.config`.
    config: Value,
    /// `{ ...pluginConfig39, plugin: plugin60 }`: the plugin object is there (name
    /// `test-maxmind-plugin`). Without it the reference's config has no plugin, which is what
    /// makes `posthog.capture`'s default distinct id `plugin-id-60`.
    with_plugin60: bool,
    attachments: Vec<(String, Attachment)>,
}

impl Default for ConfigSpec {
    fn default() -> Self {
        ConfigSpec { config: json!({"localhostIP": "94.224.212.175"}), with_plugin60: false, attachments: Vec::new() }
    }
}

/// `pluginConfig39.config` with the exportEvents settings of a case.
fn export_config(bytes: &str, seconds: &str, ignore: &str) -> ConfigSpec {
    ConfigSpec {
        config: json!({
            "localhostIP": "94.224.212.175",
            "exportEventsBufferBytes": bytes,
            "exportEventsBufferSeconds": seconds,
            "exportEventsToIgnore": ignore,
        }),
        ..ConfigSpec::default()
    }
}

/// What `createPluginConfigVM` returns, and the mocks around it.
struct PluginConfigVm {
    db: TestDb,
    hub: Hub,
    services: Arc<PluginServices>,
    entry: Arc<ConfigEntry>,
    loaded: Arc<LoadedVm>,
    fetch: Arc<FetchMock>,
    jobs: Arc<RecordingJobs>,
}

/// `await resetTestDatabase(indexJs); await createPluginConfigVM(hub, pluginConfig39, indexJs)`.
async fn create_plugin_config_vm(code: &str) -> PluginConfigVm {
    create_plugin_config_vm_with(code, ConfigSpec::default()).await
}

async fn create_plugin_config_vm_with(code: &str, spec: ConfigSpec) -> PluginConfigVm {
    let db = TestDb::with_fixture(Some(code)).await;
    let plugins_queue = format!("test-plugins-celery-{}", Uuid::new_v4().simple());
    let default_queue = format!("test-celery-{}", Uuid::new_v4().simple());
    let hub =
        Hub::connect(db.config(&[
            ("PLUGINS_CELERY_QUEUE", plugins_queue.as_str()),
            ("CELERY_DEFAULT_QUEUE", default_queue.as_str()),
        ]))
        .await
        .expect("hub");
    let jobs = Arc::new(RecordingJobs::default());
    let services = Arc::new(PluginServices::new(
        hub.clone(),
        Arc::new(PostgresLogSink::new(hub.postgres.clone(), true)),
        Arc::new(CeleryCapture(Arc::new(CeleryProducer::new(hub.redis.clone(), plugins_queue)))),
        jobs.clone(),
        None,
    ));
    // One thread: one VM, as `createPluginConfigVM` makes (its `meta.global` is the one the case sees).
    let pool = WorkerPool::new(PoolOptions {
        threads: 1,
        task_timeout: hub.config.task_timeout(),
        test_env: true,
        ..PoolOptions::default()
    })
    .expect("worker pool");
    let fetch = Arc::new(FetchMock::default());
    let factory = Arc::new(RuntimeVmFactory::with_fetcher(Arc::new(pool), fetch.clone()));
    let now = Utc::now();
    let plugin = Plugin::new(PluginRow {
        id: PLUGIN_ID,
        organization_id: COMMON_ORGANIZATION_ID.parse().unwrap(),
        plugin_type: Some("custom".into()),
        is_global: false,
        name: spec.with_plugin60.then(|| "test-maxmind-plugin".to_string()),
        url: Some("https://www.npmjs.com/package/posthog-maxmind-plugin".into()),
        config_schema: common::plugin60_config_schema(),
        tag: Some("0.0.2".into()),
        archive: None,
        source: None,
        capabilities: json!({}),
        metrics: Some(json!({})),
        updated_at: now,
    });
    let config = Arc::new(PluginConfig {
        id: PLUGIN_CONFIG_ID,
        team_id: Some(TEAM_ID),
        plugin_id: PLUGIN_ID,
        order: 0,
        config: spec.config.as_object().cloned().unwrap_or_default(),
        error: None,
        created_at: now,
        updated_at: now,
        plugin: Arc::new(plugin),
        attachments: spec.attachments,
    });
    let context = Arc::new(PluginContext::new(services.clone(), config.clone()));
    let code = PluginCode { code: code.to_string(), log_info: "plugin 39".into(), json_config_schema: None };
    let options = LoadOptions { retry_base: Duration::from_secs(600), test_env: true };
    let vm = LazyVm::start(services.clone(), factory, options, context, Ok(code), None);
    let loaded = vm.get().await.expect("the VM loads");
    let entry = Arc::new(ConfigEntry { config, vm });
    PluginConfigVm { db, hub, services, entry, loaded, fetch, jobs }
}

impl PluginConfigVm {
    /// `vm.methods.processEvent(event)`: its return value (`undefined` → `null`).
    async fn process_event(&self, event: Value) -> Value {
        self.loaded.vm.call(Method::ProcessEvent, vec![event]).await.unwrap_or_else(|failure| panic!("{failure:?}"))
    }

    /// `vm.methods.onEvent(event)`, with the exportEvents upgrade.
    async fn on_event(&self, event: &Value) {
        let event: PluginEvent = serde_json::from_value(event.clone()).expect("an event");
        run::run_on_event(&self.services, std::slice::from_ref(&self.entry), &event, Method::OnEvent).await;
    }

    /// `vm.methods.onSnapshot(event)`.
    async fn on_snapshot(&self, event: &Value) {
        let event: PluginEvent = serde_json::from_value(event.clone()).expect("an event");
        run::run_on_event(&self.services, std::slice::from_ref(&self.entry), &event, Method::OnSnapshot).await;
    }

    /// `vm.methods.teardownPlugin()`, with the exportEvents upgrade (flush).
    async fn teardown_plugin(&self) {
        run::teardown(&self.services, &self.entry, false).await;
    }

    /// `vm.tasks.schedule[name].exec()`.
    async fn run_schedule(&self, name: &str) -> Option<Value> {
        run::run_plugin_task(&self.services, Some(&self.entry), TaskKind::Schedule, name, None).await
    }

    /// `vm.tasks.job[name].exec(payload)`.
    async fn run_job(&self, name: &str, payload: Value) -> Option<Value> {
        run::run_plugin_task(&self.services, Some(&self.entry), TaskKind::Job, name, Some(payload)).await
    }

    /// `exportEventsWithRetry` jobs enqueued so far.
    fn enqueued(&self) -> Vec<plugin_server::plugins::extensions::EnqueuedJob> {
        self.jobs.jobs.lock().unwrap().clone()
    }

    /// The raw Celery messages on a Redis list.
    async fn celery_messages(&self, queue: &str) -> Vec<String> {
        let mut connection = self.hub.redis.get().await.unwrap();
        redis::cmd("LRANGE").arg(queue).arg(0).arg(-1).query_async(&mut connection).await.unwrap()
    }
}

/// The reference's `defaultEvent` (team 3, `now` as `new Date().toISOString()`).
fn default_event() -> Value {
    json!({
        "distinct_id": "my_id",
        "ip": "127.0.0.1",
        "site_url": "http://localhost",
        "team_id": 3,
        "now": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "event": "default event",
    })
}

/// `{ ...defaultEvent, event: name }`.
fn event_named(name: &str) -> Value {
    let mut event = default_event();
    event["event"] = json!(name);
    event
}

/// `{ ...defaultEvent, event: name, properties: {} }`.
fn event_with_properties(name: &str) -> Value {
    let mut event = event_named(name);
    event["properties"] = json!({});
    event
}

/// The cache cases use fixed keys under the fixture's prefix `@plugin/60/2/` in the one Redis all
/// tests share: they hold this lock (a Redis key with an expiry, so a crashed test cannot hold it
/// for long; across test processes) and start with the keys gone, as the reference's cases (run
/// one after the other) do.
struct ExclusiveCacheKeys {
    client: redis::Client,
    token: String,
}

const CACHE_LOCK_KEY: &str = "test-lock:plugins_vm:@plugin/60/2";

async fn exclusive_cache_keys(keys: &[&str]) -> ExclusiveCacheKeys {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let token = Uuid::new_v4().to_string();
    loop {
        let taken: Option<String> = redis::cmd("SET")
            .arg(CACHE_LOCK_KEY)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut connection)
            .await
            .unwrap();
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for key in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(format!("@plugin/{PLUGIN_ID}/{TEAM_ID}/{key}"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    ExclusiveCacheKeys { client, token }
}

impl Drop for ExclusiveCacheKeys {
    fn drop(&mut self) {
        // Released only by its holder (after an expiry another test may hold it).
        if let Ok(mut connection) = self.client.get_connection() {
            let _: Result<i64, _> = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
            )
            .key(CACHE_LOCK_KEY)
            .arg(&self.token)
            .invoke(&mut connection);
        }
    }
}

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- the cases

/// Reference: `test('empty plugins')`.
#[tokio::test]
async fn empty_plugins() {
    let vm = create_plugin_config_vm("").await;
    assert!(vm.loaded.methods.is_empty());
    assert!(!vm.loaded.has(Method::ProcessEvent));
    assert_eq!(vm.loaded.capabilities(), json!({"methods": [], "scheduled_tasks": [], "jobs": []}));
}

/// Reference: `test('setupPlugin sync')`.
#[tokio::test]
async fn setup_plugin_sync() {
    let vm = create_plugin_config_vm(
        "
        function setupPlugin (meta) {
            meta.global.data = 'haha'
        }
        function processEvent (event, meta) {
            event.event = meta.global.data
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(default_event()).await;
    assert_eq!(new_event["event"], "haha");
}

/// Reference: `test('setupPlugin async')`.
#[tokio::test]
async fn setup_plugin_async() {
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin (meta) {
            await new Promise(resolve => __jestSetTimeout(resolve, 500))
            meta.global.data = 'haha'
        }
        function processEvent (event, meta) {
            event.event = meta.global.data
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(default_event()).await;
    assert_eq!(new_event["event"], "haha");
}

/// Reference: `test('teardownPlugin')`.
#[tokio::test]
async fn teardown_plugin() {
    let vm = create_plugin_config_vm(
        "
        function setupPlugin (meta) {
            meta.global.data = 'haha'
        }
        function teardownPlugin (meta) {
            fetch('https://google.com/results.json?query=' + meta.global.data)
        }
        function processEvent (event, meta) {
            meta.global.data = event.properties.haha
            return event
        }
    ",
    )
    .await;
    let mut event = default_event();
    event["properties"] = json!({"haha": "hoho"});
    vm.process_event(event).await;
    assert_eq!(vm.fetch.count(), 0);
    vm.teardown_plugin().await;
    // The plugin does not await its fetch: the request starts when teardownPlugin calls it.
    assert!(eventually(WAIT, || async { vm.fetch.called_with("https://google.com/results.json?query=hoho") }).await);
}

/// Reference: the second `test('async processEvent')` (the first one is in runtime_vm.rs).
#[tokio::test]
async fn async_process_event_second() {
    let vm = create_plugin_config_vm(
        "
        async function processEvent (event, meta) {
            await new Promise((resolve) => resolve())
            event.event = 'changed event'
            await new Promise((resolve) => resolve())
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_named("original event")).await;
    assert_eq!(new_event["event"], "changed event");
}

/// Reference: `test('processEvent && processEventBatch')`: processEvent wins.
#[tokio::test]
async fn process_event_and_process_event_batch() {
    let vm = create_plugin_config_vm(
        "
        function processEvent (event, meta) {
            event.event = 'changed event 1'
            return event
        }
        function processEventBatch (events, meta) {
            return events.map(event => {
                event.event = 'changed event 2'
                return event
            })
        }
    ",
    )
    .await;
    assert!(vm.loaded.has(Method::ProcessEvent));
    let new_event = vm.process_event(event_named("original event")).await;
    assert_eq!(new_event["event"], "changed event 1");
}

/// Reference: `describe('vm exports') > test('export')`.
#[tokio::test]
async fn vm_exports_export() {
    let vm = create_plugin_config_vm(
        "
            export const onEvent = async (event, meta) => {
                await fetch('https://google.com/results.json?query=' + event.event)
            }
        ",
    )
    .await;
    vm.on_event(&event_named("export")).await;
    assert_eq!(vm.fetch.urls(), ["https://google.com/results.json?query=export"]);
}

/// Reference: `describe('vm exports') > test('export default')`.
#[tokio::test]
async fn vm_exports_export_default() {
    let vm = create_plugin_config_vm(
        "
            const MyPlugin = {
                onEvent: async (event, meta) => {
                    await fetch('https://google.com/results.json?query=' + event.event)
                }
            }
            export default MyPlugin
        ",
    )
    .await;
    vm.on_event(&event_named("default export")).await;
    assert_eq!(vm.fetch.urls(), ["https://google.com/results.json?query=default export"]);
}

/// Reference: `test('meta.config')`.
#[tokio::test]
async fn meta_config() {
    let vm = create_plugin_config_vm(
        "
        async function processEvent (event, meta) {
            event.properties = meta.config
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"], json!({"localhostIP": "94.224.212.175"}));
}

/// Reference: `test('meta.cache set/get')`. The plugin does not await its `set`: the next event's
/// `get` must still see it (cache commands reach Redis in issue order, see extensions/cache.rs).
#[tokio::test]
async fn meta_cache_set_get() {
    let _keys = exclusive_cache_keys(&["counter"]).await;
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin (meta) {
            await meta.cache.set('counter', 0)
        }
        async function processEvent (event, meta) {
            const counter = await meta.cache.get('counter', 999)
            meta.cache.set('counter', counter + 1)
            event.properties['counter'] = counter + 1
            return event
        }
    ",
    )
    .await;
    for expected in 1..=3 {
        let new_event = vm.process_event(event_with_properties("original event")).await;
        assert_eq!(new_event["properties"]["counter"], expected);
    }
}

/// Reference: `test('meta.storage set/get/del')`.
#[tokio::test]
async fn meta_storage_set_get_del() {
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin (meta) {
            await meta.storage.set('counter', -1)
            const c = await meta.storage.get('counter')
            if (c === -1) {
                await meta.storage.set('counter', null)
            }
            const c2 = await meta.storage.get('counter')
            if (typeof c === 'undefined') {
                await meta.storage.set('counter', 0)
            }
        }
        async function processEvent (event, meta) {
            const counter = await meta.storage.get('counter', 999)
            await meta.storage.set('counter', counter + 1)
            event.properties['counter'] = counter + 1

            await meta.storage.set('deleteme', 10)
            await meta.storage.del('deleteme')
            const deleteMeResult = await meta.storage.get('deleteme', null)
            event.properties['deleteme'] = deleteMeResult

            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 1);
    assert_eq!(new_event["properties"]["deleteme"], Value::Null);
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 2);
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 3);
}

/// Reference: `test('meta.cache expire')`.
#[tokio::test]
async fn meta_cache_expire() {
    let _keys = exclusive_cache_keys(&["counter"]).await;
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin(meta) {
            await meta.cache.set('counter', 0)
        }
        async function processEvent (event, meta) {
            const counter = await meta.cache.get('counter', 0)
            await meta.cache.set('counter', counter + 1)
            await meta.cache.expire('counter', 1)
            event.properties['counter'] = counter + 1
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 1);
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 1);
}

/// Reference: `test('meta.cache set ttl')`.
#[tokio::test]
async fn meta_cache_set_ttl() {
    let _keys = exclusive_cache_keys(&["counter"]).await;
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin(meta) {
            await meta.cache.set('counter', 0)
        }
        async function processEvent (event, meta) {
            const counter = await meta.cache.get('counter', 0)
            await meta.cache.set('counter', counter + 1, 1)
            event.properties['counter'] = counter + 1
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 1);
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    assert_eq!(new_event["properties"]["counter"], 1);
}

/// Reference: `test('meta.cache incr')`.
#[tokio::test]
async fn meta_cache_incr() {
    let _keys = exclusive_cache_keys(&["counter"]).await;
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin(meta) {
            await meta.cache.set('counter', 0)
        }
        async function processEvent (event, meta) {
            const counter = await meta.cache.incr('counter')
            event.properties['counter'] = counter
            return event
        }
    ",
    )
    .await;
    for expected in 1..=3 {
        let new_event = vm.process_event(event_with_properties("original event")).await;
        assert_eq!(new_event["properties"]["counter"], expected);
    }
}

/// Whether `actual` is an array holding every one of `expected` (`expect.arrayContaining`).
fn array_containing(actual: &Value, expected: &[&str]) -> bool {
    let items = actual.as_array().cloned().unwrap_or_default();
    expected.iter().all(|wanted| items.contains(&json!(wanted)))
}

/// Reference: `test('meta.cache lpush/lrange/llen')`.
#[tokio::test]
async fn meta_cache_lpush_lrange_llen() {
    let _keys = exclusive_cache_keys(&["mylist"]).await;
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin (meta) {
            await meta.cache.lpush('mylist', 'a string')
            await meta.cache.lpush('mylist', ['an', 'array'])

        }
        async function processEvent (event, meta) {
            const mylistBefore = await meta.cache.lrange('mylist', 0, 3)
            const mylistLen = await meta.cache.llen('mylist')
            event.properties['mylist_before'] = mylistBefore
            event.properties['mylist_len'] = mylistLen
            await meta.cache.expire('mylist', 0)
            const mylistAfter = await meta.cache.lrange('mylist', 0, 3)
            event.properties['mylist_after'] = mylistAfter
            return event
        }

    ",
    )
    .await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    let properties = &new_event["properties"];
    assert!(array_containing(&properties["mylist_before"], &["a string", "an", "array"]), "{properties}");
    assert_eq!(properties["mylist_len"], 3);
    assert_eq!(properties["mylist_after"], json!([]));
}

/// Reference: `test('meta.cache lrem/lpop/lpush/lrange')`.
#[tokio::test]
async fn meta_cache_lrem_lpop_lpush_lrange() {
    let _keys = exclusive_cache_keys(&["mylist2"]).await;
    let vm = create_plugin_config_vm(
        "
        async function setupPlugin (meta) {
            await meta.cache.lpush('mylist2', ['1', '2', '3'])

        }
        async function processEvent (event, meta) {
            const mylistBefore = await meta.cache.lrange('mylist2', 0, 3)
            event.properties['mylist_before'] = mylistBefore

            const poppedElements = await meta.cache.lpop('mylist2', 1)
            event.properties['popped_elements'] = poppedElements

            const myListAfterLpop = await meta.cache.lrange('mylist2', 0, 3)
            event.properties['mylist_after_lpop'] = myListAfterLpop

            const removedElementsCount = await meta.cache.lrem('mylist2', 1, '2')
            event.properties['removed_elements_count'] = removedElementsCount

            const myListAfterLrem = await meta.cache.lrange('mylist2', 0, 3)
            event.properties['mylist_after_lrem'] = myListAfterLrem

            await meta.cache.expire('mylist2', 0)

            return event
        }

    ",
    )
    .await;
    let new_event = vm.process_event(event_with_properties("original event")).await;
    let properties = &new_event["properties"];
    assert!(array_containing(&properties["mylist_before"], &["1", "2", "3"]), "{properties}");
    assert_eq!(properties["popped_elements"], json!(["3"]));
    assert!(array_containing(&properties["mylist_after_lpop"], &["1", "2"]), "{properties}");
    assert_eq!(properties["removed_elements_count"], 1);
    assert_eq!(properties["mylist_after_lrem"], json!(["1"]));
}

/// Reference: `test('console.log')` (with `plugin: plugin60`).
#[tokio::test]
async fn console_log() {
    let vm = create_plugin_config_vm_with(
        "
        async function processEvent (event, meta) {
            console.log(event.event)
            return event
        }
    ",
        ConfigSpec { with_plugin60: true, ..ConfigSpec::default() },
    )
    .await;
    vm.process_event(event_named("logged event")).await;
    vm.services.logs.flush().await;
    type Row = (Uuid, Option<Uuid>, String, i32, i32, String, i32, Option<chrono::DateTime<Utc>>, String);
    let logged = || async {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, instance_id, message, plugin_config_id, plugin_id, source, team_id, timestamp, type \
             FROM posthog_pluginlogentry",
        )
        .fetch_all(&vm.db.pool)
        .await
        .unwrap();
        rows.into_iter().find(|row| row.2 == "logged event")
    };
    // console.log is not awaited by the plugin.
    assert!(eventually(WAIT, || async { logged().await.is_some() }).await);
    let (_id, instance_id, message, config_id, plugin_id, source, team_id, timestamp, log_type) =
        logged().await.unwrap();
    assert!(instance_id.is_some() && timestamp.is_some());
    assert_eq!(
        (message.as_str(), config_id, plugin_id, source.as_str(), team_id, log_type.as_str()),
        ("logged event", 39, 60, "CONSOLE", 2, "LOG")
    );
}

/// Reference: `test('fetch via require')`.
#[tokio::test]
async fn fetch_via_require() {
    let vm = create_plugin_config_vm(
        "
        async function processEvent (event, meta) {
            const response = await require('node-fetch')('https://google.com/results.json?query=' + event.event)
            event.properties = await response.json()
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_named("fetched")).await;
    assert_eq!(vm.fetch.urls(), ["https://google.com/results.json?query=fetched"]);
    assert_eq!(new_event["properties"], json!({"count": 2, "query": "bla", "results": [true, true]}));
}

/// Reference: `test('posthog.api')`. Header names reach `fetch` lower-cased (HTTP header names
/// are case-insensitive; the reference's mock saw `Authorization`).
#[tokio::test]
async fn posthog_api() {
    let vm = create_plugin_config_vm(
        "
        async function processEvent (event, meta) {
            event.properties = {}
            const getResponse = await posthog.api.get('/api/event')
            event.properties.get = await getResponse.json()
            await posthog.api.get('/api/event', { data: { url: 'param' } })
            await posthog.api.post('/api/event', { data: { a: 1 }})
            await posthog.api.put('/api/event', { data: { b: 2 } })
            await posthog.api.delete('/api/event')

            // test auth defaults override
            await posthog.api.get('/api/event', { projectApiKey: 'token', personalApiKey: 'secret' })
            return event
        }
    ",
    )
    .await;
    let new_event = vm.process_event(event_named("fetched")).await;
    assert_eq!(new_event["properties"]["get"], json!({"hello": "world"}));
    let calls = vm.fetch.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 6);
    let token_url = "https://app.posthog.com/api/event?token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2";
    let expected = [
        (token_url, "GET", None),
        ("https://app.posthog.com/api/event?url=param&token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2", "GET", None),
        (token_url, "POST", Some(r#"{"a":1}"#)),
        (token_url, "PUT", Some(r#"{"b":2}"#)),
        (token_url, "DELETE", None),
        ("https://app.posthog.com/api/event?token=token", "GET", None),
    ];
    for (call, (url, method, body)) in calls.iter().zip(expected) {
        assert_eq!(call.url, url);
        assert_eq!(call.method, method);
        assert_eq!(call.body.as_deref(), body.map(str::as_bytes), "{url} {method}");
        // node-fetch adds `text/plain;charset=UTF-8` to a string body (POST, PUT).
        let content_type = call.headers.iter().find(|(name, _)| name == "content-type").map(|(_, v)| v.as_str());
        assert_eq!(content_type, body.map(|_| "text/plain;charset=UTF-8"), "{:?}", call.headers);
        assert_eq!(call.headers.len(), 1 + usize::from(body.is_some()), "{:?}", call.headers);
        assert_eq!(call.headers[0].0, "authorization");
    }
    for call in &calls[..5] {
        assert!(call.headers[0].1.starts_with("Bearer phx_"), "{:?}", call.headers);
    }
    assert_eq!(calls[5].headers[0].1, "Bearer secret");
}

/// Reference: `test('attachments')`. `meta.attachments` crosses back as JSON: the contents
/// Buffer becomes Node's `{type: 'Buffer', data}`.
#[tokio::test]
async fn attachments() {
    let contents = br#"{"name": "plugin"}"#.to_vec();
    let attachment = Attachment {
        content_type: Some("application/json".into()),
        file_name: Some("plugin.json".into()),
        contents: contents.clone(),
    };
    let vm = create_plugin_config_vm_with(
        "
        async function processEvent (event, meta) {
            event.properties = meta.attachments
            return event
        }
    ",
        ConfigSpec { attachments: vec![("attachedFile".into(), attachment)], ..ConfigSpec::default() },
    )
    .await;
    let new_event = vm.process_event(event_named("attachments")).await;
    assert_eq!(
        new_event["properties"],
        json!({"attachedFile": {
            "content_type": "application/json",
            "file_name": "plugin.json",
            "contents": {"type": "Buffer", "data": contents},
        }})
    );
}

/// Reference: `test('runEvery')`.
#[tokio::test]
async fn run_every() {
    let vm = create_plugin_config_vm(
        "
        function runEveryMinute (meta) {

        }
        function runEveryHour (meta) {

        }
        function runEveryDay (meta) {

        }
    ",
    )
    .await;
    assert_eq!(vm.loaded.scheduled_tasks, ["runEveryMinute", "runEveryHour", "runEveryDay"]);
    assert!(vm.loaded.jobs.is_empty());
    // Each is a task that runs (and returns undefined).
    for name in ["runEveryMinute", "runEveryHour", "runEveryDay"] {
        assert_eq!(vm.run_schedule(name).await, Some(Value::Null), "{name}");
    }
}

/// Reference: `test('runEvery must be a function')`.
#[tokio::test]
async fn run_every_must_be_a_function() {
    let vm = create_plugin_config_vm(
        "
        function runEveryMinute(meta) {

        }
        const runEveryHour = false
        const runEveryDay = { some: 'object' }
    ",
    )
    .await;
    assert_eq!(vm.loaded.scheduled_tasks, ["runEveryMinute"]);
    assert_eq!(vm.run_schedule("runEveryMinute").await, Some(Value::Null));
}

/// The `process_event_with_plugins` Celery task `posthog.capture` sent, checked as the reference
/// checks the mocked client's `sendTaskAsync` call: task name, args
/// `[distinct_id, null, null, data, 2, ts, ts]` and kwargs `{}`. Returns `data`.
async fn captured_task(vm: &PluginConfigVm, distinct_id: &str) -> Map<String, Value> {
    let plugins_queue = vm.hub.config.PLUGINS_CELERY_QUEUE.clone();
    // Events go to the start of the plugin queue; nothing goes to CELERY_DEFAULT_QUEUE.
    assert!(eventually(WAIT, || async { !vm.celery_messages(&plugins_queue).await.is_empty() }).await);
    assert!(vm.celery_messages(&vm.hub.config.CELERY_DEFAULT_QUEUE).await.is_empty());
    let messages = vm.celery_messages(&plugins_queue).await;
    assert_eq!(messages.len(), 1);
    let task = decode_envelope(&plugins_queue, &messages[0]).unwrap();
    assert_eq!(task.task, "posthog.tasks.process_event.process_event_with_plugins");
    assert_eq!(task.kwargs, Map::new());
    let args = &task.args;
    assert_eq!(args.len(), 7);
    assert_eq!(args[..3], [json!(distinct_id), Value::Null, Value::Null]);
    assert_eq!(args[4], json!(2));
    let data = args[3].as_object().cloned().unwrap();
    assert_eq!(data["distinct_id"], distinct_id);
    assert_eq!(data["event"], "my-new-event");
    assert_eq!(data["properties"]["$lib"], "posthog-plugin-server");
    assert_eq!(data["properties"]["random"], "properties");
    // The reference takes these two from the call itself; they are the event's timestamp.
    assert_eq!((&args[5], &args[6]), (&data["timestamp"], &data["timestamp"]));
    data
}

/// Reference: `test('posthog in runEvery')`.
#[tokio::test]
async fn posthog_in_run_every() {
    let vm = create_plugin_config_vm(
        "
        async function runEveryMinute(meta) {
            await posthog.capture('my-new-event', { random: 'properties' })
            return 'haha'
        }
    ",
    )
    .await;
    assert_eq!(vm.run_schedule("runEveryMinute").await, Some(json!("haha")));
    let data = captured_task(&vm, "plugin-id-60").await;
    assert_eq!(data["properties"]["distinct_id"], "plugin-id-60");
}

/// Reference: `test('posthog in runEvery with timestamp')`.
#[tokio::test]
async fn posthog_in_run_every_with_timestamp() {
    let vm = create_plugin_config_vm(
        "
        async function runEveryMinute(meta) {
            await posthog.capture('my-new-event', { random: 'properties', timestamp: '2020-02-23T02:15:00Z' })
            return 'haha'
        }
    ",
    )
    .await;
    assert_eq!(vm.run_schedule("runEveryMinute").await, Some(json!("haha")));
    let data = captured_task(&vm, "plugin-id-60").await;
    // Taken out of the properties.
    assert_eq!(data["timestamp"], "2020-02-23T02:15:00Z");
    assert!(data["properties"].get("timestamp").is_none());
}

/// Reference: `test('posthog.capture accepts user-defined distinct id')`.
#[tokio::test]
async fn posthog_capture_accepts_user_defined_distinct_id() {
    let vm = create_plugin_config_vm(
        "
        function runEveryMinute(meta) {
            posthog.capture('my-new-event', { random: 'properties', distinct_id: 'custom id' })
            return 'haha'
        }
    ",
    )
    .await;
    assert_eq!(vm.run_schedule("runEveryMinute").await, Some(json!("haha")));
    let data = captured_task(&vm, "custom id").await;
    assert_eq!(data["properties"]["distinct_id"], "custom id");
}

/// Reference: `test('onEvent')`.
#[tokio::test]
async fn on_event() {
    let vm = create_plugin_config_vm(
        "
        async function onEvent (event, meta) {
            await fetch('https://google.com/results.json?query=' + event.event)
        }
    ",
    )
    .await;
    vm.on_event(&event_named("onEvent")).await;
    assert_eq!(vm.fetch.urls(), ["https://google.com/results.json?query=onEvent"]);
}

/// Reference: `test('onSnapshot')`.
#[tokio::test]
async fn on_snapshot() {
    let vm = create_plugin_config_vm(
        "
        async function onSnapshot (event, meta) {
            await fetch('https://google.com/results.json?query=' + event.event)
        }
    ",
    )
    .await;
    vm.on_snapshot(&event_named("$snapshot")).await;
    assert_eq!(vm.fetch.urls(), ["https://google.com/results.json?query=$snapshot"]);
}

const EXPORT_FIRST_EVENT: &str = "
            async function exportEvents (events, meta) {
                await fetch('https://export.com/results.json?query=' + events[0].event + '&events=' + events.length)
            }
        ";

/// Reference: `describe('exportEvents') > test('normal operation')`.
#[tokio::test]
async fn export_events_normal_operation() {
    let vm =
        create_plugin_config_vm_with(EXPORT_FIRST_EVENT, export_config("10000", "1", "default event,otherEvent")).await;
    vm.on_event(&default_event()).await;
    vm.on_event(&event_named("otherEvent")).await;
    vm.on_event(&event_named("otherEvent2")).await;
    vm.on_event(&event_named("otherEvent3")).await;
    // Flushed after exportEventsBufferSeconds (1 s).
    assert!(
        eventually(WAIT, || async {
            vm.fetch.called_with("https://export.com/results.json?query=otherEvent2&events=2")
        })
        .await
    );
    // Adds the exportEventsWithRetry job and the onEvent function.
    for job in ["exportEventsWithRetry", "exportEventsFromTheBeginning", "Export historical events"] {
        assert!(vm.loaded.jobs.iter().any(|name| name == job), "{job}");
    }
    assert!(vm.loaded.scheduled_tasks.is_empty());
    for method in [Method::ExportEvents, Method::OnEvent, Method::TeardownPlugin, Method::SetupPlugin] {
        assert!(vm.loaded.has(method), "{method:?}");
    }
}

/// Reference: `describe('exportEvents') > test('retries')`.
#[tokio::test]
async fn export_events_retries() {
    let vm = create_plugin_config_vm_with(
        "
            async function exportEvents (events, meta) {
                meta.global.ranTimes = (meta.global.ranTimes || 0) + 1;
                if (meta.global.ranTimes < 3) {
                    throw new RetryError('Try again')
                } else {
                    await fetch('https://export.com/results.json?query=' + events[0].event + '&events=' + events.length)
                }
            }
        ",
        export_config("10000", "1", ""),
    )
    .await;
    let event = event_named("exported");
    // The first ones will fail and be retried.
    for _ in 0..3 {
        vm.on_event(&event).await;
    }
    assert!(eventually(WAIT, || async { !vm.enqueued().is_empty() }).await);
    let enqueued = vm.enqueued();
    assert_eq!(enqueued.len(), 1);
    let job = &enqueued[0];
    assert_eq!((job.job_type.as_str(), job.plugin_config_id, job.plugin_config_team), ("exportEventsWithRetry", 39, 2));
    assert!(job.timestamp > 0);
    let payload = job.payload.clone();
    assert_eq!(payload["batch"], json!([event, event, event]));
    assert!(payload["batchId"].is_number());
    assert_eq!(payload["retriesPerformedSoFar"], 1);
    assert_eq!(payload.as_object().unwrap().len(), 3);

    // Run the job directly: enqueued again.
    vm.run_job("exportEventsWithRetry", payload.clone()).await;
    let enqueued = vm.enqueued();
    assert_eq!(enqueued.len(), 2);
    let job = &enqueued[1];
    assert_eq!((job.job_type.as_str(), job.plugin_config_id, job.plugin_config_team), ("exportEventsWithRetry", 39, 2));
    assert_eq!(
        job.payload,
        json!({"batch": payload["batch"], "batchId": payload["batchId"], "retriesPerformedSoFar": 2})
    );

    // Run the job a second time: now it passes.
    vm.run_job("exportEventsWithRetry", job.payload.clone()).await;
    assert!(vm.fetch.called_with("https://export.com/results.json?query=exported&events=3"));
}

/// Reference: `describe('exportEvents') > test('max retries')`.
#[tokio::test]
async fn export_events_max_retries() {
    let vm = create_plugin_config_vm_with(
        "
            async function exportEvents (events, meta) {
                meta.global.ranTimes = (meta.global.ranTimes || 0) + 1;
                await fetch('https://test.com/?rantimes=' + meta.global.ranTimes)
                throw new RetryError('Try again')
            }
        ",
        export_config("10000", "1", ""),
    )
    .await;
    for _ in 0..3 {
        vm.on_event(&default_event()).await;
    }
    assert!(eventually(WAIT, || async { vm.enqueued().len() == 1 }).await);
    // Won't retry after the 15th time.
    for i in 2..20 {
        let last = vm.enqueued().last().unwrap().payload.clone();
        vm.run_job("exportEventsWithRetry", last).await;
        assert_eq!(vm.enqueued().len(), if i > 15 { 15 } else { i }, "after run {i}");
    }
}

/// Reference: `describe('exportEvents') > test('works with onEvent')`: the upgrade patches onEvent,
/// the plugin's own still runs.
#[tokio::test]
async fn export_events_works_with_on_event() {
    let vm = create_plugin_config_vm_with(
        "
            async function exportEvents (events, meta) {
                await fetch('https://export.com/results.json?query=' + events[0].event + '&events=' + events.length)
            }
            async function onEvent (event, meta) {
                await fetch('https://onevent.com/')
            }
        ",
        export_config("10000", "1", "default event"),
    )
    .await;
    let event = event_named("exported");
    vm.on_event(&event).await;
    vm.on_event(&default_event()).await;
    vm.on_event(&event).await;
    assert!(eventually(WAIT, || async { vm.fetch.count() == 4 }).await);
    tokio::time::sleep(Duration::from_millis(1010)).await;
    assert_eq!(vm.fetch.count(), 4);
    assert!(vm.fetch.called_with("https://onevent.com/"));
    assert!(vm.fetch.called_with("https://export.com/results.json?query=exported&events=2"));
}

const EXPORT_LENGTHS: &str = "
            async function exportEvents (events, meta) {
                // console.log(meta.config)
                await fetch('https://export.com/?length=' + JSON.stringify(events).length + '&count=' + events.length)
            }
        ";

/// The reference's exported event (as `defaultEvent`, named `exported`).
fn exported_event() -> Value {
    event_named("exported")
}

/// Reference: `describe('exportEvents') > test('buffers bytes with exportEventsBufferBytes')`.
#[tokio::test]
async fn export_events_buffers_bytes_with_export_events_buffer_bytes() {
    let vm = create_plugin_config_vm_with(EXPORT_LENGTHS, export_config("1000", "1", "default event")).await;
    let event = exported_event();
    for _ in 0..100 {
        vm.on_event(&event).await;
    }
    assert!(eventually(WAIT, || async { vm.fetch.count() == 15 }).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut expected = vec!["https://export.com/?length=946&count=7".to_string(); 14];
    expected.push("https://export.com/?length=271&count=2".to_string());
    assert_eq!(vm.fetch.urls(), expected);
}

/// Reference: `describe('exportEvents') > test('buffers bytes with very tiny exportEventsBufferBytes')`.
#[tokio::test]
async fn export_events_buffers_bytes_with_very_tiny_export_events_buffer_bytes() {
    let vm = create_plugin_config_vm_with(EXPORT_LENGTHS, export_config("1", "1", "default event")).await;
    let event = exported_event();
    for _ in 0..100 {
        vm.on_event(&event).await;
    }
    assert!(eventually(WAIT, || async { vm.fetch.count() == 100 }).await);
    tokio::time::sleep(Duration::from_millis(1010)).await;
    assert_eq!(vm.fetch.urls(), vec!["https://export.com/?length=136&count=1".to_string(); 100]);
}

/// Reference: `describe('exportEvents') > test('flushes on teardown')`.
#[tokio::test]
async fn export_events_flushes_on_teardown() {
    let vm = create_plugin_config_vm_with(EXPORT_FIRST_EVENT, export_config("10000", "1000", "")).await;
    vm.on_event(&default_event()).await;
    let url = "https://export.com/results.json?query=default event&events=1";
    assert!(!vm.fetch.called_with(url));
    vm.teardown_plugin().await;
    assert!(vm.fetch.called_with(url));
}
