//! Issue 16's export benchmark: N events through `exportEvents` of PostHog's Postgres export
//! plugin (unmodified, `tests/data/plugins/postgres-plugin`) into the local PostgreSQL, over the
//! `pg` facade: the plugin's `exportEvents` and the `uploadBatchToPostgres` job it queues are
//! called in turn on the worker pool, batch after batch, as the server's export buffer and job
//! queue would. Prints events/s and the process's peak RSS. `benches/export_pg_node.js` does the
//! same on Node with node-postgres for the original's figure.
//!
//! Run: `cargo bench --profile dev --bench export_pg` (env: BENCH_EVENTS, default 20000;
//! BENCH_BATCH, default 500; TEST_POSTGRES_HOST/PORT as the tests).

mod e2e_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server binary's allocator (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use async_trait::async_trait;
use e2e_support::{env_number, peak_rss_mib};
use plugin_server::plugins::extensions::pg::{close_all, PgConnections};
use plugin_server::plugins::runtime::{
    configure_network, CallKind, MetaBindings, MetaError, NetworkSettings, PluginVmSpec, PoolOptions, VmId, WorkerPool,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// `pg.*` through the facade's host side; `meta.jobs.<name>(payload).runNow()` handed to the
/// bench loop; console output dropped.
struct BenchMeta {
    pg: PgConnections,
    jobs: mpsc::UnboundedSender<Value>,
    config: Value,
}

#[async_trait]
impl MetaBindings for BenchMeta {
    fn config(&self) -> Value {
        self.config.clone()
    }
    async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        if name == "jobs.runNow" {
            let _ = self.jobs.send(args.get(1).cloned().unwrap_or(Value::Null));
        }
        Ok(Value::Null)
    }
    async fn call_from(&self, vm: VmId, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        match name.strip_prefix("pg.") {
            Some(op) => self.pg.call(vm, op, args).await.map_err(|e| MetaError::named(e.name, e.message)),
            None => self.call(name, args).await,
        }
    }
    fn vm_closed(&self, vm: VmId) {
        drop(close_all(self.pg.close_vm(vm)));
    }
}

fn event(index: usize) -> Value {
    json!({
        "event": "bench", "distinct_id": format!("u{}", index % 100), "team_id": 2,
        "uuid": format!("0178{index:028}"), "ip": "1.2.3.4", "site_url": "http://x",
        "now": "2021-11-01T10:00:00.000Z", "timestamp": "2021-11-01T10:00:00.000Z",
        "properties": {"$current_url": format!("http://x/{index}"), "n": index, "nested": {"a": [1, 2, 3], "b": "text"}},
    })
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let events = env_number("BENCH_EVENTS", 20_000);
        let batch_size = env_number("BENCH_BATCH", 500).max(1);
        configure_network(NetworkSettings {
            allow_internal_ips: true,
            ..NetworkSettings::defaults(plugin_server::config::NodeEnv::Test)
        });
        let host = std::env::var("TEST_POSTGRES_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port = std::env::var("TEST_POSTGRES_PORT").unwrap_or_else(|_| "5432".into());
        let table = format!("bench_export_{}", uuid::Uuid::new_v4().simple());
        let code = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plugins/postgres-plugin/index.ts"),
        )
        .expect("the plugin's source");
        let (jobs, mut queued) = mpsc::unbounded_channel();
        let config = json!({
            "host": host, "port": port, "dbName": "postgres", "tableName": table, "dbUsername": "postgres",
            "dbPassword": "x", "hasSelfSignedCert": "Yes", "eventsToIgnore": ""
        });
        let meta = Arc::new(BenchMeta { pg: PgConnections::new(Duration::from_secs(30)), jobs, config });
        let options = PoolOptions { threads: 1, task_timeout: Duration::from_secs(30), ..PoolOptions::default() };
        let pool = WorkerPool::new(options).expect("pool");
        pool.load(PluginVmSpec { plugin_config_id: 1, code, meta }).await.expect("load");
        pool.call(1, "setupPlugin", vec![], CallKind::Method).await.expect("setupPlugin");
        let started = Instant::now();
        let (mut in_export, mut in_job) = (Duration::ZERO, Duration::ZERO);
        let mut sent = 0;
        while sent < events {
            let batch: Vec<Value> = (sent..events.min(sent + batch_size)).map(event).collect();
            sent += batch.len();
            let phase = Instant::now();
            pool.call(1, "exportEvents", vec![Value::Array(batch)], CallKind::Method).await.expect("exportEvents");
            in_export += phase.elapsed();
            let phase = Instant::now();
            while let Ok(payload) = queued.try_recv() {
                pool.call(1, "jobs.uploadBatchToPostgres", vec![payload], CallKind::Task).await.expect("upload job");
            }
            in_job += phase.elapsed();
        }
        let seconds = started.elapsed().as_secs_f64();
        let count = pool
            .call(1, "@meta.global.get", vec![], CallKind::Method)
            .await
            .map(|global| global["sanitizedTableName"].clone())
            .unwrap_or(Value::Null);
        println!(
            "export benchmark (postgres-plugin, pg facade): {events} events in batches of {batch_size} into {count}: \
             {:.0} events/s, peak RSS {:.1} MiB",
            events as f64 / seconds,
            peak_rss_mib()
        );
        // The rows, and the table dropped again, through the plugin's own connection settings.
        let meta_check = format!(
            "const {{ Client }} = require('pg')
            async function runEveryMinute() {{
                const c = new Client({{ host: '{host}', port: {port}, user: 'postgres', database: 'postgres' }})
                await c.connect()
                const n = (await c.query('SELECT count(*) FROM {table}')).rows[0].count
                await c.query('DROP TABLE {table}')
                await c.end()
                return n
            }}"
        );
        let (jobs, _) = mpsc::unbounded_channel();
        let meta = Arc::new(BenchMeta { pg: PgConnections::new(Duration::from_secs(30)), jobs, config: json!({}) });
        pool.load(PluginVmSpec { plugin_config_id: 2, code: meta_check, meta }).await.expect("load check");
        let rows = pool.call(2, "runEveryMinute", vec![], CallKind::Task).await.expect("count rows");
        println!("  rows in the table: {rows}; time in exportEvents {in_export:.2?}, in the upload job {in_job:.2?}");
        pool.shutdown(Duration::from_secs(5)).await;
    });
}
