//! Facade modules (`runtime/modules`): libraries the reference lets plugins import, evaluated in
//! the VM only when a plugin requires them, with their host work behind `MetaBindings::call_from`.

mod runtime_support;

use plugin_server::plugins::runtime::{CallKind, WorkerPool};
use runtime_support::*;
use serde_json::{json, Value};

async fn run_task(code: &str) -> Value {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    load(&pool, 1, code, TestMeta::new()).await.unwrap_or_else(|e| panic!("{e}"));
    pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap_or_else(|e| panic!("{e}"))
}

/// `stream` as the reference offers it (`{ PassThrough }`): written chunks come out as 'data'
/// events, by async iteration and through `pipe`, with 'end' and 'finish'.
#[tokio::test]
async fn stream_pass_through() {
    let out = run_task(
        "import { PassThrough } from 'stream'
        export async function runEveryMinute() {
            const seen = []
            const a = new PassThrough()
            a.on('data', (chunk) => seen.push(chunk.toString()))
            const ended = new Promise((resolve) => a.on('end', resolve))
            const finished = new Promise((resolve) => a.on('finish', resolve))
            a.write('he')
            a.write(Buffer.from('llo'))
            a.end(' world')
            await Promise.all([ended, finished])
            const b = new PassThrough()
            const c = new PassThrough({ objectMode: true })
            b.pipe(new PassThrough()).pipe(c)
            b.end('piped')
            const parts = []
            for await (const part of c) parts.push(part.toString())
            return [seen.join(''), parts, typeof require('stream').PassThrough]
        }",
    )
    .await;
    assert_eq!(out, json!(["hello world", ["piped"], "function"]));
}

/// Facades that exist only for other facades (`events`) are not importable: the reference's
/// message, at load, like any module outside its list.
#[tokio::test]
async fn internal_facades_are_not_importable() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    for code in [
        "import { EventEmitter } from 'events'\nexport function f() { return EventEmitter }",
        "const e = require('events')",
    ] {
        let error = load(&pool, 1, code, TestMeta::new()).await.unwrap_err().to_string();
        assert_eq!(error, "/index.ts: Cannot import 'events'! This package is not provided by PostHog in plugins.");
    }
}

/// A facade costs nothing to VMs that do not import it: it is compiled on first use, so a VM
/// whose plugin requires it is larger by at least the facade's code, and one that does not is as
/// small as before facades existed.
#[tokio::test]
async fn facades_load_lazily() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let plain = "export function runEveryMinute() { return 1 }";
    let importing = "import { Client } from 'pg'\nexport function runEveryMinute() { return typeof Client }";
    let unused = "import { Client } from 'pg'\nexport function runEveryMinute() { return 1 }";
    load(&pool, 1, plain, TestMeta::new()).await.unwrap();
    load(&pool, 2, importing, TestMeta::new()).await.unwrap();
    load(&pool, 3, unused, TestMeta::new()).await.unwrap();
    for id in [1, 2, 3] {
        pool.call(id, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    }
    let memory = |values: Vec<i64>| values.into_iter().sum::<i64>();
    let plain_bytes = memory(pool.memory_usage(1).await);
    let importing_bytes = memory(pool.memory_usage(2).await);
    let unused_bytes = memory(pool.memory_usage(3).await);
    assert!(importing_bytes > plain_bytes + 20_000, "pg + events loaded: {importing_bytes} vs {plain_bytes}");
    // An unused import is erased (as Babel does) and loads nothing.
    assert!(unused_bytes < plain_bytes + 2_000, "nothing loaded: {unused_bytes} vs {plain_bytes}");
}

/// `generic-pool` is the real library (3.7.1): a pool of factory-made resources with a maximum,
/// waiting acquirers, `use`, validation and drain/clear.
#[tokio::test]
async fn generic_pool_is_the_real_library() {
    let out = run_task(
        "import * as genericPool from 'generic-pool'
        export async function runEveryMinute() {
            let made = 0
            const destroyed = []
            const pool = genericPool.createPool({
                create: async () => ({ id: ++made }),
                destroy: async (r) => { destroyed.push(r.id) },
            }, { max: 2, min: 0 })
            const a = await pool.acquire()
            const b = await pool.acquire()
            const waiting = pool.acquire()
            const pending = pool.pending
            await pool.release(a)
            const c = await waiting
            await pool.release(b)
            await pool.release(c)
            const sizes = [pool.size, pool.available, pool.borrowed, pending]
            const used = await pool.use(async (r) => r.id * 10)
            await pool.drain()
            await pool.clear()
            return { ids: [a.id, b.id, c.id], sizes, used, made, destroyed: destroyed.sort(), keys: Object.keys(genericPool).sort() }
        }",
    )
    .await;
    assert_eq!(out["ids"], json!([1, 2, 1]));
    assert_eq!(out["sizes"], json!([2, 2, 0, 1]));
    assert!(out["used"] == json!(10) || out["used"] == json!(20), "{out}");
    assert_eq!(out["made"], json!(2));
    assert_eq!(out["destroyed"], json!([1, 2]));
    assert_eq!(out["keys"], json!(["DefaultEvictor", "Deque", "Pool", "PriorityQueue", "createPool"]));
}

/// An allowed facade imported but never used loads nothing and never fails (Babel erases the
/// import); one required in a branch that never runs is allowed too; a module the reference does
/// not offer still fails at load with its message, even in an unused branch.
#[tokio::test]
async fn imports_at_load_follow_the_reference() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let unused = "import { Client } from 'pg'\nexport function runEveryMinute() { return 1 }";
    let branch = "export function runEveryMinute(meta) { if (meta.config.never) { const pg = require('pg'); return pg } return 2 }";
    load(&pool, 1, unused, TestMeta::new()).await.unwrap();
    load(&pool, 2, branch, TestMeta::new()).await.unwrap();
    assert_eq!(pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap(), json!(1));
    assert_eq!(pool.call(2, "runEveryMinute", vec![], CallKind::Task).await.unwrap(), json!(2));
    for (module, code) in [
        ("fs", "import { readFileSync } from 'fs'\nexport function runEveryMinute() { return readFileSync }"),
        ("child_process", "export function runEveryMinute(meta) { if (meta.config.never) require('child_process') }"),
    ] {
        let error = load(&pool, 3, code, TestMeta::new()).await.unwrap_err().to_string();
        assert_eq!(
            error,
            format!("/index.ts: Cannot import '{module}'! This package is not provided by PostHog in plugins.")
        );
    }
}
