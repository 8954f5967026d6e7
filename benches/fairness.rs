//! Fair share (issue 14): team B's `processEvent` throughput with and without team A's load,
//! where team A's plugin spins until TASK_TIMEOUT (1 s here) on every event. Target: team B
//! keeps at least 70% of its unloaded rate.
//!
//! Run: `cargo bench --bench fairness` (optional env: BENCH_THREADS (default: cores),
//! BENCH_SECONDS (default 5), BENCH_WINDOW (B's calls in flight, default 200), BENCH_A_WINDOW
//! (A's calls in flight, default 20)).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

const TEAM_A: i64 = 1;
const TEAM_B: i64 = 2;
const SPIN: &str = "function processEvent (event, meta) { for (;;) {} }";
const SIMPLE: &str = "
    function processEvent (event, meta) {
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

/// Team B's events/s over `seconds`, keeping `window` calls in flight.
async fn team_b_rate(pool: &WorkerPool, window: usize, seconds: u64) -> f64 {
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut in_flight = FuturesUnordered::new();
    let mut done = 0usize;
    let mut index = 0;
    loop {
        while Instant::now() < until && in_flight.len() < window {
            index += 1;
            let i = index;
            in_flight.push(async move { pool.call(TEAM_B, "processEvent", vec![event(i)], CallKind::Method).await });
        }
        match in_flight.next().await {
            Some(out) => {
                assert_eq!(out.expect("team B's processEvent")["properties"]["somewhere"], "over the rainbow");
                done += 1;
            }
            None => break,
        }
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// Keeps `window` calls of team A in flight until `stop`; returns how many ended (each with
/// its timeout error).
async fn team_a_load(
    pool: WorkerPool,
    window: usize,
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicUsize>,
) -> (usize, usize) {
    let mut in_flight = FuturesUnordered::new();
    let (mut timed_out, mut other) = (0, 0);
    let mut index = 0;
    loop {
        while !stop.load(Ordering::Relaxed) && in_flight.len() < window {
            index += 1;
            let (pool, i) = (pool.clone(), index);
            in_flight.push(async move { pool.call(TEAM_A, "processEvent", vec![event(i)], CallKind::Method).await });
        }
        let next = in_flight.next().await;
        if next.is_some() {
            ended.fetch_add(1, Ordering::Relaxed);
        }
        match next {
            Some(Err(e)) if e.to_string().contains("timed out") => timed_out += 1,
            Some(out) => {
                if other == 0 {
                    println!("  team A: a call ended otherwise: {out:?}");
                }
                other += 1
            }
            None => return (timed_out, other),
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = env_number("BENCH_THREADS", cores);
        let seconds = env_number("BENCH_SECONDS", 5) as u64;
        let window = env_number("BENCH_WINDOW", 200);
        let a_window = env_number("BENCH_A_WINDOW", 20);
        let options = PoolOptions {
            threads,
            tasks_per_worker: 10,
            task_timeout: Duration::from_secs(1),
            ..PoolOptions::default()
        };
        let pool = WorkerPool::new(options).expect("pool");
        for (id, code) in [(TEAM_A, SPIN), (TEAM_B, SIMPLE)] {
            let spec = PluginVmSpec { plugin_config_id: id, code: code.to_string(), meta: Arc::new(NoMeta) };
            pool.load(spec).await.expect("load");
        }
        println!("fairness benchmark ({cores} cores, {threads} JS threads, TASK_TIMEOUT 1 s, TASKS_PER_WORKER 10)");
        team_b_rate(&pool, window, 1).await; // warm-up
        let alone = team_b_rate(&pool, window, seconds).await;
        println!("  team B alone:                          {alone:>9.0} events/s");

        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicUsize::new(0));
        let load = tokio::spawn(team_a_load(pool.clone(), a_window, stop.clone(), ended.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let ended_before = ended.load(Ordering::Relaxed);
        let loaded = team_b_rate(&pool, window, seconds).await;
        let ended_during = ended.load(Ordering::Relaxed) - ended_before;
        stop.store(true, Ordering::Relaxed);
        println!("  team B while team A spins every call:  {loaded:>9.0} events/s");
        println!("  team A's calls that ended (timed out) while team B was measured: {ended_during}");
        println!("  team B keeps {:.0}% of its unloaded rate (target ≥ 70%)", loaded / alone * 100.0);
        let (timed_out, other) = load.await.expect("team A");
        println!("  team A: {timed_out} calls ended with the timeout error, {other} otherwise (none dropped)");
        pool.shutdown(Duration::from_secs(5)).await;
    });
}
