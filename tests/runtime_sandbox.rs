//! The sandbox: plugin code reaches nothing but its meta API and the allowed imports. Known escape
//! attempts must fail: Function-constructor tricks, prototype pollution across VMs and calls,
//! stack-trace hooks, Proxy games during conversion.

mod runtime_support;

use std::time::{Duration, Instant};

use plugin_server::plugins::runtime::{CallKind, WorkerPool};
use runtime_support::*;
use serde_json::{json, Value};

async fn run_task(pool: &WorkerPool, id: i64, body: &str) -> Value {
    let code = format!("async function runEveryMinute(meta) {{ {body} }}");
    load(pool, id, &code, TestMeta::new()).await.unwrap_or_else(|e| panic!("{body}: {e}"));
    pool.call(id, "runEveryMinute", vec![], CallKind::Task).await.unwrap_or_else(|e| panic!("{body}: {e}"))
}

#[tokio::test]
async fn no_host_objects_are_reachable() {
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    let probes = [
        "return (function(){}).constructor('return typeof process')()",
        "return (function(){}).constructor('return typeof this.process')()",
        "return typeof [].constructor.constructor('return this')().process",
        "return typeof globalThis.require('fs')",
        "return typeof globalThis.__host",
        "return typeof std + typeof os + typeof Deno + typeof Bun",
        "return typeof setTimeout + typeof setInterval + typeof queueMicrotask",
        "return Object.getOwnPropertyNames(globalThis).filter(n => n.startsWith('__') && n !== '__pluginHostImports' && n !== '__jestSetTimeout').join(',')",
    ];
    let expected = [
        json!("undefined"),
        json!("undefined"),
        json!("undefined"),
        Value::Null,
        json!("undefined"),
        json!("undefinedundefinedundefinedundefined"),
        json!("undefinedundefinedfunction"),
        json!(""),
    ];
    for (i, (probe, want)) in probes.iter().zip(expected).enumerate() {
        let body = format!("try {{ {probe} }} catch (e) {{ return null }}");
        assert_eq!(run_task(&pool, i as i64, &body).await, want, "{probe}");
    }
}

#[tokio::test]
async fn imports_of_host_modules_fail() {
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    for module in ["fs", "child_process", "process", "os", "net", "vm"] {
        let body = format!(
            "try {{ const name = '{module}'; require(name); return 'escaped' }} catch (e) {{ return e.message }}"
        );
        assert_eq!(
            run_task(&pool, 1, &body).await,
            json!(format!("Cannot import '{module}'! This package is not provided by PostHog in plugins."))
        );
        // Used, so Babel keeps the import (an unused one is erased before the check).
        let err = load(&pool, 2, &format!("import x from '{module}'\nx()"), TestMeta::new()).await.unwrap_err();
        assert!(err.to_string().contains(&format!("Cannot import '{module}'")), "{err}");
    }
}

#[tokio::test]
async fn prototype_pollution_stays_in_its_vm() {
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    let polluter = "function processEvent(e) {
        Object.prototype.polluted = 'yes'; Array.prototype.map = () => 'hijacked';
        JSON.stringify = () => 'hijacked'; Object.freeze = (x) => x;
        e.__proto__.injected = true; e.properties.constructor.prototype.viaEvent = 1;
        return e }";
    let victim = "function processEvent(e) {
        e.properties.seen = [({}).polluted, [1].map(x => x), JSON.stringify({a: 1}), ({}).injected, ({}).viaEvent];
        return e }";
    load(&pool, 1, polluter, TestMeta::new()).await.unwrap();
    load(&pool, 2, victim, TestMeta::new()).await.unwrap();
    let event = json!({"event": "e", "properties": {}});
    let polluted = pool.call(1, "processEvent", vec![event.clone()], CallKind::Method).await.unwrap();
    // The host receives plain data: nothing inherited leaks into the returned event.
    assert_eq!(polluted, json!({"event": "e", "properties": {}}));
    let out = pool.call(2, "processEvent", vec![event], CallKind::Method).await.unwrap();
    assert_eq!(out["properties"]["seen"], json!([null, [1], "{\"a\":1}", null, null]));
}

#[tokio::test]
async fn shared_modules_and_globals_are_read_only() {
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    let body = "
        const crypto = require('crypto');
        const attempts = [
            () => { crypto.createHash = () => 'hijacked' },
            () => { __pluginHostImports.crypto = {} },
            () => { Buffer.prototype.toString = () => 'hijacked' },
            () => { console.log = () => 'hijacked' },
        ];
        const failed = attempts.map(f => { try { f(); return false } catch (e) { return e instanceof TypeError } });
        return [failed, typeof crypto.createHash('md5').update, Buffer.from('a').toString('hex')];";
    let code = format!("'use strict';\nasync function runEveryMinute(meta) {{ {body} }}");
    load(&pool, 1, &code, TestMeta::new()).await.unwrap();
    let out = pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    assert_eq!(out, json!([[true, true, true, true], "function", "61"]));
}

#[tokio::test]
async fn stack_trace_hooks_expose_nothing() {
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    let body = "
        const seen = [];
        Error.prepareStackTrace = (err, frames) => {
            for (const f of frames || []) {
                try { seen.push(typeof f.getThis && typeof f.getThis()); } catch (e) {}
                try { const fn = f.getFunction && f.getFunction(); if (fn) seen.push(String(fn).slice(0, 30)) } catch (e) {}
            }
            return 'custom';
        };
        try { await meta.storage.del('boom') } catch (e) { String(e.stack) }
        try { new URL('not a url') } catch (e) { String(e.stack) }
        try { require('crypto').createHash('nope') } catch (e) { String(e.stack) }
        return typeof (function () { return this })() + ':' + seen.filter(s => s !== 'undefined').filter(s => /native|host|Rust/i.test(s)).length;";
    assert_eq!(run_task(&pool, 1, body).await, json!("undefined:0"));
}

#[tokio::test]
async fn proxy_games_do_not_hang_or_crash_the_host() {
    let pool = WorkerPool::new(options(1, 1.0)).unwrap();
    let cases = [
        "return new Proxy({}, { ownKeys() { while (true) {} } })",
        "return new Proxy({}, { ownKeys() { throw new Error('trap') } })",
        "return { get a() { throw new Error('getter') }, b: 1 }",
        "return { toJSON() { while (true) {} } }",
        "const a = []; a.push(a); return a",
        "let o = {}; for (let i = 0; i < 10000; i++) o = { o }; return o",
    ];
    let healthy = "function processEvent(e) { return e }";
    load(&pool, 99, healthy, TestMeta::new()).await.unwrap();
    for (i, body) in cases.iter().enumerate() {
        let code = format!("function processEvent(e) {{ {body} }}");
        load(&pool, i as i64, &code, TestMeta::new()).await.unwrap();
        let started = Instant::now();
        let _ = pool.call(i as i64, "processEvent", vec![json!({"event": "x"})], CallKind::Method).await;
        assert!(started.elapsed() < Duration::from_secs(4), "{body}: {:?}", started.elapsed());
        let out = pool.call(99, "processEvent", vec![json!({"event": "ok"})], CallKind::Method).await.unwrap();
        assert_eq!(out["event"], "ok", "{body}");
    }
}

#[tokio::test]
async fn globals_are_private_per_config() {
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    let writer =
        "function processEvent(e, { global }) { global.secret = 'mine'; globalThis.shared = 'mine'; return e }";
    let reader = "function processEvent(e, meta) { e.properties = { global: meta.global.secret || null, shared: globalThis.shared || null, config: meta.config }; return e }";
    let meta_a = std::sync::Arc::new(TestMeta { config: json!({"apiKey": "secret-a"}), ..TestMeta::default() });
    let meta_b = std::sync::Arc::new(TestMeta { config: json!({"apiKey": "b"}), ..TestMeta::default() });
    load(&pool, 1, writer, meta_a).await.unwrap();
    load(&pool, 2, reader, meta_b).await.unwrap();
    pool.call(1, "processEvent", vec![json!({})], CallKind::Method).await.unwrap();
    let out = pool.call(2, "processEvent", vec![json!({})], CallKind::Method).await.unwrap();
    assert_eq!(out["properties"], json!({"global": null, "shared": null, "config": {"apiKey": "b"}}));
}

#[tokio::test]
async fn the_engine_is_the_one_js_engine_names() {
    // `JS_ENGINE` picks the engine of every pool built without a config (scripts/test runs this
    // file on both): V8 words its TypeErrors as Node does, QuickJS its own way.
    let pool = WorkerPool::new(options(1, 2.0)).unwrap();
    let message = run_task(&pool, 1, "try { undefined.plan } catch (e) { return e.message }").await;
    let expected = match plugin_server::config::JsEngine::from_process_env() {
        plugin_server::config::JsEngine::V8 => "Cannot read properties of undefined (reading 'plan')",
        plugin_server::config::JsEngine::QuickJs => "cannot read property 'plan' of undefined",
    };
    assert_eq!(message, json!(expected));
}
