//! Fair share of the JS worker threads (issue 14): a team whose plugin spins until TASK_TIMEOUT
//! on every event must not slow another team to its pace; its own calls still all complete.

mod runtime_support;

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use plugin_server::plugins::runtime::{CallKind, PluginError, WorkerPool};
use runtime_support::*;
use serde_json::{json, Value};

const SPIN: &str = "function processEvent(event) { for (;;) {} }";
const SIMPLE: &str = "function processEvent(event) { event.properties.seen = true; return event }";

fn event(index: usize) -> Value {
    json!({"distinct_id": "d", "team_id": 2, "event": "e", "properties": {"index": index}})
}

/// Keeps `depth` calls of config 1 (the spinner) in flight until `stop` is set; returns every
/// result.
async fn spin_load(
    pool: WorkerPool,
    depth: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<Result<Value, PluginError>> {
    let mut in_flight = FuturesUnordered::new();
    let mut results = Vec::new();
    let mut sent = 0;
    loop {
        while !*stop.borrow() && in_flight.len() < depth {
            let pool = pool.clone();
            let index = sent;
            sent += 1;
            in_flight.push(async move { pool.call(1, "processEvent", vec![event(index)], CallKind::Method).await });
        }
        match in_flight.next().await {
            Some(result) => results.push(result),
            None => return results,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_b_flows_while_team_a_spins_to_task_timeout_on_every_call() {
    let pool = WorkerPool::new(options(2, 2.0)).unwrap();
    load(&pool, 1, SPIN, TestMeta::new()).await.unwrap();
    load(&pool, 2, SIMPLE, TestMeta::new()).await.unwrap();
    pool.call(2, "processEvent", vec![event(0)], CallKind::Method).await.unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let spinner = tokio::spawn(spin_load(pool.clone(), 4, stopped));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 300 calls of team B, 20 at a time, while team A keeps 4 spinning calls in flight.
    let started = Instant::now();
    let mut calls = FuturesUnordered::new();
    for index in 0..300 {
        if calls.len() >= 20 {
            let result: Result<Value, PluginError> = calls.next().await.unwrap();
            assert_eq!(result.unwrap()["properties"]["seen"], true);
        }
        let pool = pool.clone();
        calls.push(async move { pool.call(2, "processEvent", vec![event(index)], CallKind::Method).await });
    }
    while let Some(result) = calls.next().await {
        assert_eq!(result.unwrap()["properties"]["seen"], true);
    }
    let team_b = started.elapsed();
    // Behind a single spinning call, one of B's calls would wait up to TASK_TIMEOUT (2 s).
    assert!(team_b < Duration::from_millis(1500), "team B took {team_b:?} while team A spun");

    // Team A's calls are never dropped: each ends with its own timeout error.
    stop.send(true).unwrap();
    let results = tokio::time::timeout(Duration::from_secs(60), spinner).await.unwrap().unwrap();
    assert!(results.len() >= 4, "{} calls of team A", results.len());
    for result in results {
        let message = message(result);
        assert!(message.contains("Script execution timed out after looping for 2 seconds"), "{message}");
    }
    let stats = pool.stats();
    assert_eq!(stats.waiting_for_share, 0);
    assert!(stats.stalled_workers.is_empty(), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thread_is_shared_in_turns_and_b_is_not_starved() {
    // With one thread there is no thread to spare: the teams take turns, and team B's calls
    // still complete while team A keeps calls waiting.
    let pool = WorkerPool::new(options(1, 1.0)).unwrap();
    load(&pool, 1, SPIN, TestMeta::new()).await.unwrap();
    load(&pool, 2, SIMPLE, TestMeta::new()).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let spinner = tokio::spawn(spin_load(pool.clone(), 4, stopped));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|index| {
            let pool = pool.clone();
            async move { pool.call(2, "processEvent", vec![event(index)], CallKind::Method).await }
        })
        .collect();
    for result in futures::future::join_all(calls).await {
        assert_eq!(result.unwrap()["properties"]["seen"], true);
    }
    // B waits at most for the spinner's calls already queued on the thread before it was seen
    // heavy (up to TASKS_PER_WORKER = 4 of 1 s), never for the ones it keeps sending.
    let team_b = started.elapsed();
    assert!(team_b < Duration::from_millis(5500), "team B took {team_b:?}");
    stop.send(true).unwrap();
    let results = tokio::time::timeout(Duration::from_secs(60), spinner).await.unwrap().unwrap();
    assert!(results.iter().all(|r| r.is_err()));
}
