//! What the metrics cost one event: the catalog calls the Celery + Postgres pipeline makes for an
//! event through the one-line plugin (stage counters, step timings, the plugin call, two timed
//! queries, action matching, the save), with statsd sending to a local UDP socket (drained by a
//! thread, as `BENCH_METRICS=1` does for `e2e_server`) and the Prometheus recorder installed and
//! kept up. `one thread` calls them in a loop; `two threads` from two threads at once (the calls
//! share the statsd queue and the handle maps).
//!
//! Run: `cargo bench --bench metrics_calls`.

use std::future::ready;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
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

fn metrics_on() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("statsd socket");
    let port = socket.local_addr().expect("address").port();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 65536];
        while socket.recv_from(&mut buffer).is_ok() {}
    });
    let client = plugin_server::metrics::Metrics::udp("127.0.0.1", port, "plugin-server.").expect("statsd client");
    plugin_server::metrics::install(client);
    let prometheus = plugin_server::metrics::prometheus::install().expect("Prometheus recorder");
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        prometheus.run_upkeep();
    });
}

fn per_event(c: &mut Criterion) {
    metrics_on();
    let mut group = c.benchmark_group("metrics per event");
    group.bench_function("one thread", |b| b.iter(|| one_event(2)));
    group.bench_function("two threads", |b| {
        b.iter_custom(|iterations| {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for thread in 0..2 {
                    scope.spawn(move || {
                        for _ in 0..iterations.div_ceil(2) {
                            one_event(2 + thread);
                        }
                    });
                }
            });
            started.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, per_event);
criterion_main!(benches);
