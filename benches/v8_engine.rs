//! The V8 engine (src/plugins/runtime/v8) on its own, beside `vm_worker` (QuickJS): calls/s of the
//! reference benchmark's `simple` and `for2k` processEvent on one thread (JSON in and out, direct
//! calls: no pool, no thread hop), and memory and creation cost of the isolation units: an
//! isolate per plugin config, or a context (realm) per plugin config in one isolate, for 1, 100
//! and 1,000 configs (each loaded and given 100 events). Every memory figure comes from a fresh
//! child process of this binary, so one measurement does not inherit another's heap.
//!
//! Run: `cargo bench --bench v8_engine` (optional env: BENCH_SECONDS, default 3; BENCH_UNITS,
//! e.g. `vm-isolate,vm-context`: the isolation units to measure; BENCH_ONLY=units skips the
//! throughput part).

use std::time::{Duration, Instant};

/// The server binary's allocator (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use plugin_server::plugins::runtime::v8::{vm, Outcome, RealmId, SourceKind, V8Isolate, V8Options};
use serde_json::{json, Value};

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
/// vm_worker's memory benchmark plugin.
const IDLE: &str = "
    async function processEvent (event, meta) {
        event.event = 'changed event'
        return event
    }
    async function runEveryMinute (meta) {
        console.log('I take up space')
    }";
const TIMEOUT: Duration = Duration::from_secs(30);

fn event(index: usize) -> Value {
    json!({
        "distinct_id": "my_id", "ip": "127.0.0.1", "site_url": "http://localhost", "team_id": 2,
        "now": "2021-10-29T12:00:00.000Z", "event": "default event",
        "properties": {"key": "value", "index": index},
    })
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

/// CPU time of the whole process (every thread: V8's GC helpers, tokio, the JS thread), from
/// /proc/self/stat. On a shared machine calls per CPU-second compare engines better than calls/s.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    ticks / 100.0
}

fn report(name: &str, calls: usize, wall: Duration, cpu: f64) {
    println!(
        "  {name:<16} {:>9.0} calls/s wall   {:>9.0} calls per CPU-second ({:.0}% of a core)",
        calls as f64 / wall.as_secs_f64(),
        calls as f64 / cpu.max(0.01),
        cpu / wall.as_secs_f64() * 100.0
    );
}

/// QuickJS through the pool (one thread), as `vm_worker` measures it, in the same process and
/// minute as the V8 figures.
fn quickjs(seconds: f64) {
    use std::sync::Arc;

    use async_trait::async_trait;
    use futures::stream::{FuturesUnordered, StreamExt};
    use plugin_server::plugins::runtime::{CallKind, MetaBindings, MetaError, PluginVmSpec, PoolOptions, WorkerPool};

    struct NoMeta;
    #[async_trait]
    impl MetaBindings for NoMeta {
        async fn call(&self, _name: &str, _args: Vec<Value>) -> Result<Value, MetaError> {
            Ok(Value::Null)
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        for (name, code) in [("quickjs simple", SIMPLE), ("quickjs for2k", FOR2K)] {
            let options = PoolOptions { threads: 1, tasks_per_worker: 100, test_env: true, ..PoolOptions::default() };
            let pool = WorkerPool::new(options).expect("pool");
            pool.load(PluginVmSpec { plugin_config_id: 1, code: code.to_string(), meta: Arc::new(NoMeta) })
                .await
                .expect("load");
            let run = |count: usize| {
                let pool = &pool;
                async move {
                    let mut in_flight = FuturesUnordered::new();
                    for i in 0..count {
                        if in_flight.len() >= 1000 {
                            in_flight.next().await;
                        }
                        in_flight.push(async move {
                            pool.call(1, "processEvent", vec![event(i)], CallKind::Method).await.expect("processEvent");
                        });
                    }
                    while in_flight.next().await.is_some() {}
                }
            };
            run(2000).await;
            let (started, cpu) = (Instant::now(), cpu_seconds());
            let mut calls = 0;
            while started.elapsed().as_secs_f64() < seconds {
                run(1000).await;
                calls += 1000;
            }
            report(name, calls, started.elapsed(), cpu_seconds() - cpu);
            pool.shutdown(Duration::from_secs(5)).await;
        }
    });
}

fn process(isolate: &mut V8Isolate, realm: RealmId, i: usize) {
    match isolate.call_in(realm, "processEvent", &[event(i)], TIMEOUT) {
        Ok(Outcome::Done(out)) => assert!(out.is_object()),
        other => panic!("processEvent: {other:?}"),
    }
}

fn throughput() {
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    println!(
        "V8 {} throughput, one thread, direct calls (JSON in and out); QuickJS through a one-thread pool:",
        plugin_server::plugins::runtime::v8::version()
    );
    for (name, code) in [("simple", SIMPLE), ("for2k", FOR2K)] {
        let mut isolate = V8Isolate::new(V8Options::default()).expect("isolate");
        isolate.load(SourceKind::Script, code, "index.js", TIMEOUT).expect("load");
        for i in 0..2000 {
            process(&mut isolate, RealmId::MAIN, i);
        }
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let mut calls = 0;
        while started.elapsed().as_secs_f64() < seconds {
            for _ in 0..100 {
                process(&mut isolate, RealmId::MAIN, calls);
                calls += 1;
            }
        }
        report(&format!("v8 {name}"), calls, started.elapsed(), cpu_seconds() - cpu);
    }
    quickjs(seconds);
}

/// In a child process: `units` plugin configs as isolates or realms; prints one line of figures.
fn measure(kind: &str, units: usize) {
    let rss_start = rss_bytes();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let mut isolates = Vec::new();
    let mut realms = Vec::new();
    // The plugin VM's own set-up (host functions, bootstrap.js, prelude.js, the plugin) per unit:
    // an isolate per config as the server runs them, or realms of one isolate.
    let full = kind.starts_with("vm-");
    if kind == "vm-isolate" {
        let mut parts = [Duration::ZERO; 3];
        for _ in 0..units {
            let t0 = Instant::now();
            let mut isolate = vm::bench::isolate(V8Options::default(), TIMEOUT).expect("isolate");
            let t1 = Instant::now();
            vm::bench::load_plugin(&mut isolate, RealmId::MAIN, IDLE, TIMEOUT).expect("load");
            parts[0] += t1 - t0;
            parts[1] += t1.elapsed();
            isolates.push(isolate);
        }
        parts[2] = parts[0] + parts[1];
        println!(
            "  vm-isolate x{units}: per unit {:.2} ms = isolate + host functions {:.2} ms, bootstrap + prelude + plugin {:.2} ms",
            parts[2].as_secs_f64() * 1e3 / units as f64,
            parts[0].as_secs_f64() * 1e3 / units as f64,
            parts[1].as_secs_f64() * 1e3 / units as f64,
        );
    } else if kind == "vm-context" {
        // One heap limit for all: V8 has no per-context budget.
        let options = V8Options { heap_limit_bytes: 4096 << 20, array_buffer_limit_bytes: 0, ..V8Options::default() };
        let mut shared = vm::bench::isolate(options, TIMEOUT).expect("isolate");
        vm::bench::load_plugin(&mut shared, RealmId::MAIN, IDLE, TIMEOUT).expect("load");
        realms.push(RealmId::MAIN);
        for _ in 1..units {
            let realm = shared.new_realm().expect("realm");
            vm::bench::load_plugin(&mut shared, realm, IDLE, TIMEOUT).expect("load");
            realms.push(realm);
        }
        isolates.push(shared);
    } else if kind == "isolate" {
        for _ in 0..units {
            let mut isolate = V8Isolate::new(V8Options::default()).expect("isolate");
            isolate.load(SourceKind::Script, IDLE, "index.js", TIMEOUT).expect("load");
            isolates.push(isolate);
        }
    } else {
        let isolate =
            V8Isolate::new(V8Options { heap_limit_bytes: 2048 << 20, ..V8Options::default() }).expect("isolate");
        isolates.push(isolate);
        let shared = &mut isolates[0];
        shared.load(SourceKind::Script, IDLE, "index.js", TIMEOUT).expect("load");
        realms.push(RealmId::MAIN);
        for _ in 1..units {
            let realm = shared.new_realm().expect("realm");
            shared.load_in(realm, SourceKind::Script, IDLE, "index.js", TIMEOUT).expect("load");
            realms.push(realm);
        }
    }
    let create = started.elapsed();
    let create_cpu = cpu_seconds() - cpu;
    let rss_loaded = rss_bytes();
    for i in 0..units {
        let (isolate, realm) =
            if kind.ends_with("isolate") { (&mut isolates[i], RealmId::MAIN) } else { (&mut isolates[0], realms[i]) };
        for e in 0..100 {
            if full {
                match vm::bench::call(isolate, realm, e as u64, "processEvent", vec![event(e)], TIMEOUT) {
                    Ok(Outcome::Done(out)) => assert_eq!(out["event"], "changed event"),
                    other => panic!("processEvent: {other:?}"),
                }
            } else {
                process(isolate, realm, e);
            }
        }
    }
    let rss_used = rss_bytes();
    let heap: usize = isolates.iter().map(|i| i.heap().used).sum();
    println!(
        "  {kind:<10} x{units:<5} create+load {:>7.0} µs each ({:>6.0} µs of CPU) | RSS per unit: {:>7.0} KiB loaded, {:>7.0} KiB after 100 events | total RSS {:>6.0} MiB | V8 heap used per unit {:>6.0} KiB",
        create.as_secs_f64() * 1e6 / units as f64,
        create_cpu * 1e6 / units as f64,
        (rss_loaded.saturating_sub(rss_start)) as f64 / units as f64 / 1024.0,
        (rss_used.saturating_sub(rss_start)) as f64 / units as f64 / 1024.0,
        rss_used as f64 / 1048576.0,
        heap as f64 / units as f64 / 1024.0,
    );
}

fn main() {
    if let Ok(spec) = std::env::var("V8_BENCH_MEASURE") {
        let (kind, units) = spec.split_once(':').expect("kind:units");
        plugin_server::plugins::runtime::v8::init();
        measure(kind, units.parse().expect("units"));
        return;
    }
    if std::env::var("BENCH_ONLY").ok().as_deref() != Some("units") {
        throughput();
    }
    println!("isolation units (a fresh process each; the V8 platform initialised before the baseline):");
    let me = std::env::current_exe().expect("own path");
    // BENCH_UNITS: the kinds to measure (default all): bare units (the plugin code alone) and
    // `vm-*` units (the plugin VM's bootstrap, prelude and plugin, as the server runs them).
    let kinds = std::env::var("BENCH_UNITS").unwrap_or_else(|_| "isolate,context,vm-isolate,vm-context".into());
    for kind in kinds.split(',') {
        for units in [1, 100, 1000] {
            let status = std::process::Command::new(&me)
                .env("V8_BENCH_MEASURE", format!("{kind}:{units}"))
                .arg("--bench")
                .status()
                .expect("child");
            assert!(status.success());
        }
    }
}
