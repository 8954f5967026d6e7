//! What the metrics cost one event: the catalog calls the Celery + Postgres pipeline makes for an
//! event through the one-line plugin (stage counters, step timings, the plugin call, two timed
//! queries, action matching, the save), with statsd sending to a local UDP socket (drained by a
//! thread of this process, as `BENCH_METRICS=1` does for `e2e_server`) and the Prometheus
//! recorder installed and kept up. Prints the process's CPU time per event (every thread: the
//! callers, the statsd flusher, the socket's reader, the Prometheus upkeep), so that a loaded
//! machine does not inflate it as it does wall time, for one calling thread and for two.
//!
//! Run: `cargo bench --bench metrics_calls` (`METRICS=statsd` or `METRICS=prometheus`: that one
//! only; `METRICS=off`: neither, the cost of the calls themselves; `BENCH_EVENTS`, default
//! 200,000).

use std::future::ready;
use std::time::{Duration, Instant};

use plugin_server::metrics::catalog::{self, EventStep, PluginCall, Stage};

fn one_event(team_id: i64) {
    let elapsed = Duration::from_micros(1500);
    catalog::received(Stage::Consumer, "celery", 1);
    catalog::received(Stage::Plugins, "processEvent", 1);
    catalog::plugin_call(
        plugin_server::metrics::global(),
        &PluginCall {
            team_id,
            plugin_config_id: 39,
            plugin_name: "bench plugin",
            function: "processEvent",
            elapsed,
            failed: false,
            task: None,
        },
    );
    catalog::event_step(EventStep::ProcessEvent, elapsed);
    catalog::handled(Stage::Plugins, "processEvent", 1);
    catalog::received(Stage::Ingestion, "event", 1);
    let _ = futures::executor::block_on(catalog::postgres("fetchPerson", ready(Ok::<(), ()>(()))));
    catalog::action_matching(elapsed, 0);
    let _ = futures::executor::block_on(catalog::postgres("createEventInsert", ready(Ok::<(), ()>(()))));
    catalog::single_save(false, team_id, Instant::now());
    catalog::event_step(EventStep::Ingestion, elapsed);
    catalog::handled(Stage::Ingestion, "event", 1);
    catalog::event_step(EventStep::OnEvent, elapsed);
    catalog::each_event(elapsed);
    catalog::handled(Stage::Consumer, "celery", 1);
}

/// Installs what `METRICS` asks for (default: both).
fn metrics_on(only: &str) {
    if only.is_empty() || only == "statsd" {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("statsd socket");
        let port = socket.local_addr().expect("address").port();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 65536];
            while socket.recv_from(&mut buffer).is_ok() {}
        });
        let client = plugin_server::metrics::Metrics::udp("127.0.0.1", port, "plugin-server.").expect("statsd client");
        plugin_server::metrics::install(client);
    }
    if only.is_empty() || only == "prometheus" {
        let prometheus = plugin_server::metrics::prometheus::install().expect("Prometheus recorder");
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            prometheus.run_upkeep();
        });
    }
}

/// User + system CPU seconds of this process (`/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |index: usize| fields.get(index).and_then(|value| value.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU microseconds per event with `threads` threads calling, all samples sent.
fn measure(events: usize, threads: usize) -> (f64, f64) {
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    std::thread::scope(|scope| {
        for thread in 0..threads {
            scope.spawn(move || {
                for _ in 0..events / threads {
                    one_event(2 + thread as i64);
                }
            });
        }
    });
    plugin_server::metrics::global().flush();
    // The socket's reader catches up.
    std::thread::sleep(Duration::from_millis(200));
    let cpu = cpu_seconds() - cpu;
    let wall = wall.elapsed().as_secs_f64() - 0.2;
    (cpu * 1e6 / events as f64, wall * 1e6 / events as f64)
}

fn main() {
    let only = std::env::var("METRICS").unwrap_or_default();
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(200_000);
    metrics_on(&only);
    let mode = if only.is_empty() { "statsd + Prometheus" } else { &only };
    // Warm-up: keys registered, handles resolved.
    measure(events / 10, 1);
    for threads in [1, 2] {
        let (cpu, wall) = measure(events, threads);
        println!(
            "metrics per event ({mode}, {threads} thread{}): {cpu:.2} µs CPU, {wall:.2} µs wall ({events} events)",
            if threads == 1 { "" } else { "s" }
        );
    }
}
