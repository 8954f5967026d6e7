//! The reference's benchmarks/vm/worker.benchmark.ts (processEvent throughput of the `simple`,
//! `for2k` and `timeout100ms` plugins across thread counts, including the conversion of events
//! into and out of the VM and the hop to the worker thread) and benchmarks/vm/memory.benchmark.ts
//! (memory per idle plugin VM).
//!
//! Run: `cargo bench --bench vm_worker` (optional env: BENCH_EVENTS, BENCH_VMS,
//! BENCH_ONLY=memory; JS_ENGINE=v8 for V8).

use std::sync::Arc;

/// The server binary's allocator (src/main.rs), so the VMs run as they do there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use plugin_server::plugins::runtime::{CallKind, MetaBindings, MetaError, PluginVmSpec, PoolOptions, WorkerPool};
use serde_json::{json, Value};

struct NoMeta;

#[async_trait]
impl MetaBindings for NoMeta {
    async fn call(&self, _name: &str, _args: Vec<Value>) -> Result<Value, MetaError> {
        Ok(Value::Null)
    }
}

const SIMPLE: &str = "
    function processEvent (event, meta) {
        event.properties = { \"somewhere\": \"over the rainbow\" };
        return event
    }";
const FOR2K: &str = "
    function processEvent (event, meta) {
        let j = 0; for(let i = 0; i < 2000; i++) { j = i };
        event.properties = { \"somewhere\": \"over the rainbow\" };
        return event
    }";
/// `simple` whose first call holds its thread 80 ms (a GC pause, page faults or preemption on a
/// loaded machine): the pool marks the config heavy for 10 s, while it is the only config.
const HICCUP: &str = "
    let first = true
    function processEvent (event, meta) {
        if (first) { first = false; const until = Date.now() + 80; while (Date.now() < until) {} }
        event.properties = { \"somewhere\": \"over the rainbow\" };
        return event
    }";
const TIMEOUT100MS: &str = "
    async function processEvent (event, meta) {
        await new Promise(resolve => __jestSetTimeout(() => resolve(), 100))
        event.properties = { \"somewhere\": \"over the rainbow\" };
        return event
    }";

fn event(index: usize) -> Value {
    json!({
        "distinct_id": "my_id", "ip": "127.0.0.1", "site_url": "http://localhost", "team_id": 2,
        "now": "2021-10-29T12:00:00.000Z", "event": "default event",
        "properties": {"key": "value", "index": index},
    })
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn pool_with(threads: usize, code: &str) -> WorkerPool {
    let options = PoolOptions {
        threads,
        tasks_per_worker: 100,
        task_timeout: Duration::from_secs(30),
        test_env: true,
        ..PoolOptions::default()
    };
    let pool = WorkerPool::new(options).expect("pool");
    pool.load(PluginVmSpec { plugin_config_id: 1, code: code.to_string(), meta: Arc::new(NoMeta) })
        .await
        .expect("load");
    pool
}

/// Sends `count` processEvent tasks keeping at most 1000 in flight (like the reference).
async fn process(pool: &WorkerPool, count: usize) {
    let mut in_flight = FuturesUnordered::new();
    for i in 0..count {
        if in_flight.len() >= 1000 {
            in_flight.next().await;
        }
        in_flight.push(async move {
            let out = pool.call(1, "processEvent", vec![event(i)], CallKind::Method).await;
            assert_eq!(out.expect("processEvent")["properties"]["somewhere"], "over the rainbow");
        });
    }
    while in_flight.next().await.is_some() {}
}

async fn worker_benchmark() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads: Vec<usize> = [1, 2, 4, 8, 12, 16].into_iter().filter(|t| *t <= cores.max(1)).collect();
    let events = env_number("BENCH_EVENTS", 50_000);
    println!("engine: {} (JS_ENGINE)", plugin_server::config::JsEngine::from_process_env());
    println!("worker benchmark ({cores} cores): events/s through WorkerPool::call (serde_json values in and out, converted directly)");
    for (name, code, count) in [
        ("simple", SIMPLE, events),
        ("hiccup", HICCUP, events),
        ("for2k", FOR2K, events / 5),
        ("timeout100ms", TIMEOUT100MS, 5_000),
    ] {
        for &t in &threads {
            let pool = pool_with(t, code).await;
            process(&pool, t * 400).await; // warm-up
            let started = Instant::now();
            process(&pool, count).await;
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "  {name:<13} threads={t:<2} events={count:<6} {:>10.0} events/s  ({:.0} events/s per thread)",
                count as f64 / elapsed,
                count as f64 / elapsed / t as f64
            );
            pool.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

async fn memory_benchmark() {
    let vms = env_number("BENCH_VMS", 1000);
    let code = "
        async function processEvent (event, meta) {
            event.event = 'changed event'
            return event
        }
        async function runEveryMinute (meta) {
            console.log('I take up space')
        }";
    let options = PoolOptions { threads: 1, tasks_per_worker: 100, ..PoolOptions::default() };
    let pool = WorkerPool::new(options).expect("pool");
    let rss_start = rss_bytes().unwrap_or(0);
    let loading = Instant::now();
    for id in 0..vms as i64 {
        pool.load(PluginVmSpec { plugin_config_id: id, code: code.to_string(), meta: Arc::new(NoMeta) })
            .await
            .expect("load");
    }
    let load_time = loading.elapsed();
    let rss_loaded = rss_bytes().unwrap_or(0);
    for id in 0..vms as i64 {
        for i in 0..100 {
            pool.call(id, "processEvent", vec![event(i)], CallKind::Method).await.expect("processEvent");
        }
    }
    let rss_used = rss_bytes().unwrap_or(0);
    let heap: i64 = pool.memory_usage(0).await.into_iter().sum();
    println!("memory benchmark: {vms} VMs (one thread)");
    println!("  JS heap of one idle VM (QuickJS: after GC; V8: heap used): {:.1} KiB", heap as f64 / 1024.0);
    println!("  creating one VM (code + setup, wall):   {:.2} ms", load_time.as_secs_f64() * 1000.0 / vms as f64);
    println!(
        "  process RSS, all VMs after 100 events:  {:.1} MiB",
        rss_used.saturating_sub(rss_start) as f64 / 1024.0 / 1024.0
    );
    println!(
        "  process RSS per VM after load:          {:.1} KiB",
        (rss_loaded - rss_start) as f64 / vms as f64 / 1024.0
    );
    println!(
        "  process RSS per VM after 100 events:    {:.1} KiB",
        (rss_used - rss_start) as f64 / vms as f64 / 1024.0
    );
    pool.shutdown(Duration::from_secs(5)).await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        // BENCH_ONLY=memory skips the throughput part.
        if std::env::var("BENCH_ONLY").ok().as_deref() != Some("memory") {
            worker_benchmark().await;
        }
        memory_benchmark().await;
    });
}
