//! The VM: export styles, meta, processEvent semantics (reference tests/postgres/vm.test.ts, the
//! VM parts) and the plugin sources of tests/transforms.test.ts as behaviours.

mod runtime_support;

use plugin_server::plugins::runtime::{CallKind, PluginError, WorkerPool};
use runtime_support::*;
use serde_json::{json, Value};

fn event() -> serde_json::Value {
    json!({"event": "original event", "distinct_id": "d", "team_id": 2, "properties": {"a": 1}})
}

#[tokio::test]
async fn sync_and_async_process_event() {
    let out =
        process("function processEvent(event) { event.event = 'changed event'; return event }", event()).await.unwrap();
    assert_eq!(out["event"], "changed event");
    assert_eq!(out["properties"]["a"], 1);
    let out = process(
        "async function processEvent(event) { await null; event.event = 'changed event'; return event }",
        event(),
    )
    .await
    .unwrap();
    assert_eq!(out["event"], "changed event");
    let out = process("function processEvent(event) { event.event = 'x' }", event()).await.unwrap();
    assert!(out.is_null());
}

#[tokio::test]
async fn export_styles() {
    let styles = [
        "module.exports = { processEvent: (e) => ({...e, event: 'changed event'}) }",
        "module.exports.processEvent = (e) => ({...e, event: 'changed event'})",
        "exports = { processEvent: (e) => ({...e, event: 'changed event'}) }",
        "exports.processEvent = (e) => ({...e, event: 'changed event'})",
        "export const processEvent = (e) => ({...e, event: 'changed event'})",
        "export function processEvent(e) { return {...e, event: 'changed event'} }",
        "export default { processEvent: (e) => ({...e, event: 'changed event'}) }",
        "function processEventBatch(batch) { return batch.map(e => ({...e, event: 'changed event'})) }",
        "export async function processEventBatch(batch) { return batch.map(e => ({...e, event: 'changed event'})) }",
        "export function processEvent(e: PluginEvent, { config }: any): PluginEvent { return {...e, event: 'changed event'} as PluginEvent }\ninterface PluginEvent { event: string }",
    ];
    for code in styles {
        let out = process(code, event()).await.unwrap_or_else(|e| panic!("{code}: {e}"));
        assert_eq!(out["event"], "changed event", "{code}");
    }
}

#[tokio::test]
async fn exports_are_discovered() {
    let pool = WorkerPool::new(options(2, 5.0)).unwrap();
    let code = "
        export function processEvent(e) { return e }
        export function onEvent() {}
        export function runEveryHour() { return 4 }
        export const notAFunction = 3
        export const jobs = { x: (payload, meta) => payload.n * 2, y: 5 }
        export const metrics = { total: 'sum' }";
    let exports = load(&pool, 7, code, TestMeta::new()).await.unwrap();
    assert!(exports.has("processEvent") && exports.has("onEvent") && exports.has("runEveryHour"));
    assert!(!exports.has("notAFunction"));
    assert_eq!(exports.jobs, vec!["x".to_string()]);
    assert_eq!(exports.metrics, Some(json!({"total": "sum"})));
    assert_eq!(pool.exports(7), Some(exports));
    assert_eq!(pool.call(7, "runEveryHour", vec![], CallKind::Task).await.unwrap(), json!(4));
    assert_eq!(pool.call(7, "jobs.x", vec![json!({"n": 21})], CallKind::Task).await.unwrap(), json!(42));
    assert!(matches!(
        pool.call(7, "teardownPlugin", vec![], CallKind::Method).await,
        Err(PluginError::MethodNotFound { .. })
    ));
    assert!(matches!(pool.call(8, "processEvent", vec![], CallKind::Method).await, Err(PluginError::NotLoaded(8))));
}

#[tokio::test]
async fn setup_plugin_sets_global_per_thread() {
    let pool = WorkerPool::new(options(2, 5.0)).unwrap();
    let code = "
        async function setupPlugin({ global, config }) { await null; global.data = config.greeting }
        function processEvent(event, { global }) { event.properties.data = global.data; return event }";
    let meta = std::sync::Arc::new(TestMeta { config: json!({"greeting": "hi"}), ..TestMeta::default() });
    load(&pool, 1, code, meta).await.unwrap();
    for _ in 0..4 {
        let out = pool.call(1, "processEvent", vec![event()], CallKind::Method).await.unwrap();
        assert_eq!(out["properties"]["data"], "hi");
    }
    assert_eq!(pool.broadcast(1, "setupPlugin", vec![], CallKind::Method).await.len(), 1, "one thread so far");
    // More concurrent calls than one thread takes: the second thread builds its VM (setupPlugin
    // included) on its first call.
    let slow = "async function setupPlugin({ global }) { global.data = 'hi' }
        async function processEvent(event, { global }) {
            await new Promise(r => __jestSetTimeout(r, 50)); event.properties.data = global.data; return event }";
    load(&pool, 2, slow, TestMeta::new()).await.unwrap();
    let calls = (0..16).map(|_| pool.call(2, "processEvent", vec![event()], CallKind::Method));
    for out in futures::future::join_all(calls).await {
        assert_eq!(out.unwrap()["properties"]["data"], "hi");
    }
    assert_eq!(pool.broadcast(2, "setupPlugin", vec![], CallKind::Method).await.len(), 2, "both threads now");
}

#[tokio::test]
async fn meta_global_is_reachable_from_the_server() {
    use plugin_server::plugins::runtime::{META_GLOBAL_GET, META_GLOBAL_SET};
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let code = "function onEvent(e, { global }) { global.timestampBoundariesForTeam = { max: 2, min: 1 } }
                function runEveryMinute({ global }) { return global.fromServer }";
    load(&pool, 1, code, TestMeta::new()).await.unwrap();
    pool.call(1, "onEvent", vec![event()], CallKind::Method).await.unwrap();
    let global = pool.call(1, META_GLOBAL_GET, vec![], CallKind::Method).await.unwrap();
    assert_eq!(global, json!({"timestampBoundariesForTeam": {"max": 2, "min": 1}}));
    pool.call(1, META_GLOBAL_SET, vec![json!("fromServer"), json!([1, 2])], CallKind::Method).await.unwrap();
    assert_eq!(pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap(), json!([1, 2]));
}

#[tokio::test]
async fn mutations_before_a_throw_are_kept() {
    let err = process(
        "function processEvent(event) { event.properties.processed = 'hell yes'; throw new Error('boom') }",
        event(),
    )
    .await
    .unwrap_err();
    match err {
        PluginError::Js { error, args_after } => {
            assert_eq!(error.message, "boom");
            assert_eq!(args_after.unwrap()[0]["properties"]["processed"], "hell yes");
        }
        other => panic!("{other:?}"),
    }
    let err = process(
        "async function processEvent(event) { event.properties.processed = 'hell yes'; await null; await meta.cache.get('x') }",
        event(),
    )
    .await
    .unwrap_err();
    match err {
        PluginError::Js { error, args_after } => {
            assert_eq!(error.name, "ReferenceError");
            assert_eq!(args_after.unwrap()[0]["properties"]["processed"], "hell yes");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn meta_calls_reach_the_bindings() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let meta = TestMeta::new();
    let code = "
        async function processEvent(event, { cache, storage, jobs, metrics, utils, geoip }) {
            await cache.set('counter', 1)
            event.properties.counter = await cache.get('counter', 5)
            event.properties.missing = await storage.get('nothing', 'default')
            await storage.set('deleteme', undefined)
            await jobs.someJob({ a: 1 }).runIn(3, 'minutes')
            await jobs.other({ b: 2 }).runAt(new Date(0))
            metrics.total.increment(5)
            try { metrics.nope } catch (e) { event.properties.metricError = e.name + ': ' + e.message }
            try { metrics.total.increment('x') } catch (e) { event.properties.typeError = e.message }
            await utils.cursor.increment('c', 2)
            await geoip.locate('127.0.0.1')
            try { await storage.del('boom') } catch (e) { event.properties.metaError = e.name + ': ' + e.message }
            console.log('number =', 987, {1: 'ein'}, [99, 79], new Error('something'))
            posthog.capture('my-event', { random: 'properties' })
            return event
        }";
    load(&pool, 1, code, meta.clone()).await.unwrap();
    let out = pool.call(1, "processEvent", vec![event()], CallKind::Method).await.unwrap();
    let p = &out["properties"];
    assert_eq!(p["counter"], 1);
    assert_eq!(p["missing"], "default");
    assert_eq!(p["metricError"], "IllegalOperationError: Invalid metric name");
    assert_eq!(p["typeError"], "Only numbers are allowed for operations on metrics");
    assert_eq!(p["metaError"], "IllegalOperationError: nope");
    assert_eq!(meta.calls_named("storage.set"), vec![vec![json!("deleteme")]]);
    assert_eq!(
        meta.calls_named("jobs.runIn"),
        vec![vec![json!("someJob"), json!({"a": 1}), json!(3), json!("minutes")]]
    );
    assert_eq!(
        meta.calls_named("jobs.runAt"),
        vec![vec![json!("other"), json!({"b": 2}), json!("1970-01-01T00:00:00.000Z")]]
    );
    assert_eq!(meta.calls_named("metrics.increment"), vec![vec![json!("total"), json!(5)]]);
    assert_eq!(meta.calls_named("utils.cursor.increment"), vec![vec![json!("c"), json!(2)]]);
    // console and posthog.capture are not awaited by the plugin: give them a moment.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        meta.calls_named("console.log"),
        vec![vec![json!("number = 987 {\"1\":\"ein\"} [99,79] Error: something")]]
    );
    assert_eq!(meta.calls_named("posthog.capture"), vec![vec![json!("my-event"), json!({"random": "properties"})]]);
}

#[tokio::test]
async fn config_and_attachments() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let meta = std::sync::Arc::new(TestMeta {
        config: json!({"key": "value"}),
        attachments: vec![plugin_server::plugins::runtime::Attachment {
            key: "file".into(),
            content_type: "text/plain".into(),
            file_name: "a.txt".into(),
            contents: b"test".to_vec(),
        }],
        ..TestMeta::default()
    });
    let code = "function processEvent(event, meta) {
        event.properties = { config: meta.config, name: meta.attachments.file.file_name,
            text: meta.attachments.file.contents.toString(), isBuffer: Buffer.isBuffer(meta.attachments.file.contents) }
        return event }";
    load(&pool, 1, code, meta).await.unwrap();
    let out = pool.call(1, "processEvent", vec![event()], CallKind::Method).await.unwrap();
    assert_eq!(
        out["properties"],
        json!({"config": {"key": "value"}, "name": "a.txt", "text": "test", "isBuffer": true})
    );
}

#[tokio::test]
async fn fetch_in_all_import_styles() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let styles = [
        "async function processEvent(event) { const r = await fetch('https://google.com/results.json?query=' + event.event); event.properties = await r.json(); return event }",
        "import fetch from 'node-fetch'\nexport async function processEvent(event) { const r = await fetch('https://google.com/results.json?query=' + event.event); event.properties = await r.json(); return event }",
        "const fetch = require('node-fetch')\nasync function processEvent(event) { const r = await fetch('https://google.com/results.json?query=' + event.event); event.properties = await r.json(); return event }",
    ];
    for (i, code) in styles.iter().enumerate() {
        let meta = TestMeta::new();
        load(&pool, i as i64, code, meta.clone()).await.unwrap();
        let out =
            pool.call(i as i64, "processEvent", vec![json!({"event": "fetched"})], CallKind::Method).await.unwrap();
        assert_eq!(out["properties"]["url"], "https://google.com/results.json?query=fetched", "{code}");
        assert_eq!(meta.fetches.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn posthog_api_goes_through_fetch() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let meta = TestMeta::new();
    let code = "async function runEveryMinute() { const r = await posthog.api.get('/api/event'); return [r.status, r.ok, r.headers.get('Content-Type'), (await r.json()).url] }";
    load(&pool, 1, code, meta.clone()).await.unwrap();
    let out = pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    assert_eq!(out, json!([200, true, "application/json", "https://app.posthog.com/api/event"]));
    let fetches = meta.fetches.lock().unwrap();
    assert_eq!(fetches[0].headers, vec![("authorization".to_string(), "Bearer x".to_string())]);
}

#[tokio::test]
async fn transform_errors() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let err =
        load(&pool, 1, "import { kea } from 'kea'\nexport function processEvent(e) { return kea(e) }", TestMeta::new())
            .await
            .unwrap_err();
    assert_eq!(err.to_string(), "/index.ts: Cannot import 'kea'! This package is not provided by PostHog in plugins.");
    let err = load(&pool, 1, "const kea = require('kea')", TestMeta::new()).await.unwrap_err();
    assert_eq!(err.to_string(), "/index.ts: Cannot import 'kea'! This package is not provided by PostHog in plugins.");
    let err = load(&pool, 1, "const name = 'k' + 'ea'; const kea = require(name)", TestMeta::new()).await.unwrap_err();
    assert_eq!(message(Err(err)), "Cannot import 'kea'! This package is not provided by PostHog in plugins.");
    let err = load(&pool, 1, "function processEvent(a b) {}", TestMeta::new()).await.unwrap_err();
    assert!(matches!(err, PluginError::Transform(ref m) if m.starts_with("/index.ts: ")), "{err}");
    assert!(pool.exports(1).is_none());
}

#[tokio::test]
async fn setup_failure_unregisters() {
    let pool = WorkerPool::new(options(2, 5.0)).unwrap();
    let err =
        load(&pool, 3, "function setupPlugin() { throw new Error('no setup') }", TestMeta::new()).await.unwrap_err();
    assert_eq!(message(Err(err)), "no setup");
    assert!(matches!(pool.call(3, "processEvent", vec![], CallKind::Method).await, Err(PluginError::NotLoaded(3))));
}

#[tokio::test]
async fn teardown_broadcast_and_reload() {
    let pool = WorkerPool::new(options(2, 5.0)).unwrap();
    let meta = TestMeta::new();
    load(&pool, 1, "async function teardownPlugin(meta) { await meta.storage.set('storage', 'tore down') }\nfunction processEvent(e) { return e }", meta.clone())
        .await
        .unwrap();
    let results = pool.broadcast(1, "teardownPlugin", vec![], CallKind::Method).await;
    // Only threads holding a VM answer: right after load, one thread.
    assert_eq!(results.len(), 1);
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(meta.calls_named("storage.set").len(), 1);
    load(&pool, 1, "function processEvent(e) { e.event = 'v2'; return e }", meta.clone()).await.unwrap();
    assert_eq!(pool.call(1, "processEvent", vec![event()], CallKind::Method).await.unwrap()["event"], "v2");
    pool.unload(1).await;
    assert!(matches!(pool.call(1, "processEvent", vec![], CallKind::Method).await, Err(PluginError::NotLoaded(1))));
}

#[tokio::test]
async fn unhandled_rejections_are_attributed() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let meta = TestMeta::new();
    let code = "function processEvent(e) { Promise.reject(new Error('error thrown in plugin')); return e }";
    load(&pool, 1, code, meta.clone()).await.unwrap();
    pool.call(1, "processEvent", vec![event()], CallKind::Method).await.unwrap();
    let rejections = meta.rejections.lock().unwrap().clone();
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].message, "error thrown in plugin");
}

/// The plugin sources of the reference's tests/transforms.test.ts must run (as behaviours: the
/// port guards loops and promises in the engine instead of rewriting the code).
#[tokio::test]
async fn reference_transform_sources_run() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let meta = TestMeta::new();
    let sources = [
        "async function x() {\n  await console.log()\n}\nasync function runEveryMinute() { await x(); return 'awaited' }",
        "async function anotherAsyncFunction(a, b) { return a + b }\nasync function runEveryMinute() { return await anotherAsyncFunction('arg1', 'arg2') }",
        "async function runEveryMinute() { return typeof await (async () => {console.log()}) }",
        "async function x() {}\nconst p = x().then(() => null)\nasync function runEveryMinute() { return await p }",
        "let n = 0\nfor (let i = 0; i < 3; i++) {\n    n += i\n}\nfunction runEveryMinute() { return n }",
        "let n = 0\nfor (let i = 0; i < 3; i++) n += i\nfunction runEveryMinute() { return n }",
        "const _LP = 0\nlet n = _LP\nfor (let i = 0; i < 3; i++) {\n    n += i\n}\nfunction runEveryMinute() { return n }",
        "interface Y {\n  a: int\n  b: string\n}\nfunction k({ a, b }: Y): string {\n    return `a * 10 is ${a * 10}, while b is just ${b}`\n}\nlet a: int = 2\nconsole.log(k({ a, b: 'tomato' }))\nfunction runEveryMinute() { return k({ a, b: 'tomato' }) }",
        "import { bla, bla2, bla3 as bla4 } from 'node-fetch'\nimport fetch1 from 'node-fetch'\nimport * as fetch2 from 'node-fetch'\nconsole.log(bla, bla2, bla4, fetch1, fetch2);\nfunction runEveryMinute() { return [bla, bla4, typeof fetch1, fetch2 === fetch1] }",
        "const fetch = require('node-fetch')\nconsole.log(fetch);\nfunction runEveryMinute() { return typeof fetch }",
    ];
    let expected = [
        json!("awaited"),
        json!("arg1arg2"),
        json!("function"),
        Value::Null,
        json!(3),
        json!(3),
        json!(3),
        json!("a * 10 is 20, while b is just tomato"),
        json!([null, null, "function", true]),
        json!("function"),
    ];
    for (i, (code, want)) in sources.iter().zip(expected).enumerate() {
        load(&pool, i as i64, code, meta.clone()).await.unwrap_or_else(|e| panic!("{code}: {e}"));
        let out = pool
            .call(i as i64, "runEveryMinute", vec![], CallKind::Task)
            .await
            .unwrap_or_else(|e| panic!("{code}: {e}"));
        assert_eq!(out, want, "{code}");
    }
}
