//! Containment at the VM ↔ host boundary, through the real server binary (Postgres pipeline,
//! Celery tasks in Redis): a hostile plugin first in a team's chain, a simple one after it. For
//! every attack the attacking event and the event after it land, the hostile plugin's change is
//! dropped, the next plugin still runs, the plugin's log entries say what was refused, the process
//! survives and its peak RSS (VmHWM) stays under [`RSS_BOUND_KB`]. Runs on either engine
//! (`JS_ENGINE`).

mod common;

use std::time::{Duration, Instant};

use common::server_process::Server;
use common::TestDb;
use plugin_server::sinks::CeleryProducer;
use serde_json::{json, Value};

/// Peak resident set of the whole server process allowed over the run (every attack included).
/// Each attack alone, unbounded, takes several GiB.
const RSS_BOUND_KB: u64 = 1024 * 1024;

const HOSTILE: &str = r#"
    import { gzipSync, gunzipSync } from 'zlib'

    export async function processEvent (event, meta) {
        const attack = event.properties.attack
        if (attack === 'sparse') {
            event.properties.big = Object.assign([], { length: 2 ** 31 - 1 })
        } else if (attack === 'sparse32') {
            event.properties.big = Object.assign([], { length: 2 ** 32 - 1 })
        } else if (attack === 'shared') {
            let o = { v: 1 }
            for (let i = 0; i < 40; i++) o = { a: o, b: o }
            event.properties.big = o
        } else if (attack === 'spin') {
            Promise.resolve().then(function spin () { Promise.resolve().then(spin); for (;;) {} })
            event.properties.big = 'spun'
        } else if (attack === 'bomb') {
            // 10,000 gzip members of 1 MiB of zeros: ~10 MB that inflate to 10 GiB.
            const member = gzipSync(Buffer.alloc(1024 * 1024))
            const bomb = Buffer.concat(new Array(10000).fill(member))
            event.properties.big = gunzipSync(bomb).length
        } else if (attack === 'arraybuffer' || attack === 'buffer' || attack === 'typed') {
            // 64 × 16 MiB kept and written to: 1 GiB of ArrayBuffer memory (outside V8's heap).
            const kept = []
            for (let i = 0; i < 64; i++) {
                const bytes = attack === 'arraybuffer' ? new Uint8Array(new ArrayBuffer(16 << 20))
                    : attack === 'buffer' ? Buffer.alloc(16 << 20) : new Uint8Array(16 << 20)
                bytes.fill(1)
                kept.push(bytes)
            }
            event.properties.big = kept.length
        } else if (attack === 'storage') {
            await meta.storage.set('big', Object.assign([], { length: 2 ** 31 - 1 }))
            event.properties.big = 'stored'
        }
        return event
    }
"#;

const SECOND: &str = r#"
    export function processEvent (event) {
        event.properties.second = 'ran'
        return event
    }
"#;

/// The second plugin of the team (order 1), after the fixture's plugin 60 / config 39.
async fn add_second_plugin(db: &TestDb) {
    let plugin_json = json!({"name": "second", "description": "runs after", "url": "http://example.com/second", "config": {}, "main": "index.js"});
    sqlx::query(
        "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, url, config_schema, tag,
            archive, error, from_json, from_web, is_global, is_preinstalled, capabilities, metrics)
         VALUES (61, $1::uuid, 'custom', 'second', 'runs after', 'http://example.com/second', '{}', '0.0.1', $2,
            NULL, false, false, false, false, '{}', '{}')",
    )
    .bind(common::COMMON_ORGANIZATION_ID)
    .bind(common::plugin_zip(Some(SECOND), &plugin_json))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
         VALUES (40, $1, 61, true, 1, '{}', NULL, now(), now())",
    )
    .bind(common::TEAM_ID)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the server process is alive");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn event_properties(pool: &sqlx::PgPool, marker: &str) -> Option<Value> {
    sqlx::query_scalar::<_, Value>("SELECT properties FROM posthog_event WHERE properties->>'marker' = $1")
        .bind(marker)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// The hostile plugin's log lines, oldest first.
async fn hostile_log(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT message FROM posthog_pluginlogentry WHERE plugin_config_id = 39 ORDER BY timestamp")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_are_refused_and_the_chain_goes_on() {
    let db = TestDb::with_fixture(Some(HOSTILE)).await;
    add_second_plugin(&db).await;
    let queue = common::unique_prefix("containment-vm");
    let default_queue = format!("{queue}-default");
    let redis = common::redis_url();
    // The server's environment is only what it is given: the engine of this run goes along.
    let engine = std::env::var("JS_ENGINE").unwrap_or_else(|_| "v8".to_string());
    let env = [
        ("JS_ENGINE", engine.as_str()),
        ("NODE_ENV", "test"),
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("PLUGINS_CELERY_QUEUE", queue.as_str()),
        ("CELERY_DEFAULT_QUEUE", default_queue.as_str()),
        ("JOB_QUEUES", "graphile"),
        ("WORKER_CONCURRENCY", "1"),
        ("TASK_TIMEOUT", "2"),
        ("LOG_LEVEL", "info"),
    ];
    let mut server = Server::start(&[], &env);
    let pid = server.pid();
    let redis_pool =
        deadpool_redis::Config::from_url(redis.clone()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    let producer = CeleryProducer::new(redis_pool, queue.clone());
    let capture = |marker: String, attack: &'static str| {
        let producer = &producer;
        async move {
            let data = json!({
                "distinct_id": "containment",
                "event": "attack",
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "properties": {"attack": attack, "marker": marker},
                "team_id": common::TEAM_ID,
                "uuid": uuid::Uuid::now_v7().to_string(),
            });
            producer.send_capture(data.as_object().unwrap(), i64::from(common::TEAM_ID)).await.unwrap();
        }
    };
    let buffer_refusal = if engine == "v8" { "Array buffer allocation failed" } else { "out of memory" };
    let attacks: &[(&str, &str)] = &[
        ("sparse", "refused the value processEvent returned: an array claims a length of 2147483647"),
        ("sparse32", "refused the value processEvent returned: an array claims a length of 4294967295"),
        // 2^40 visits: refused by the value budget, or by the deadline first on a slow machine.
        ("shared", "refused the value processEvent returned"),
        ("spin", "Script execution timed out after looping for 2 seconds"),
        // Inflating stops at the VM's memory budget; on a loaded machine the (unoptimized) inflate
        // may first run past the call's deadline instead. Either way it is bounded and refused.
        ("bomb", "Cannot create a Buffer larger than the plugin's memory allows|Script execution timed out"),
        ("storage", "refused the arguments of storage.set: an array claims a length of 2147483647"),
        // ArrayBuffer memory is budgeted like the heap: V8's allocator refuses past the VM's
        // memory limit, QuickJS counts it inside its one limit.
        ("arraybuffer", buffer_refusal),
        ("buffer", buffer_refusal),
        ("typed", buffer_refusal),
    ];
    for (attack, refusal) in attacks {
        // Only this attack's lines count (an earlier attack may have logged the same words).
        let earlier = hostile_log(&db.pool).await.len();
        let started = Instant::now();
        capture(format!("{attack}-attack"), attack).await;
        capture(format!("{attack}-next"), "none").await;
        for marker in [format!("{attack}-attack"), format!("{attack}-next")] {
            let landed = wait_for(Duration::from_secs(60), || event_properties(&db.pool, &marker)).await;
            let Some(properties) = landed else {
                panic!("{marker} did not land; server output:\n{}", server.output());
            };
            assert_eq!(properties.get("big"), None, "{marker}: the hostile change is dropped: {properties}");
            assert_eq!(properties["second"], "ran", "{marker}: the next plugin ran: {properties}");
        }
        let waited = Instant::now();
        let this_attack = async || hostile_log(&db.pool).await.get(earlier..).unwrap_or_default().join("\n");
        let mut log = this_attack().await;
        // `refusal`: the expected log line, or alternatives separated by `|`.
        let refused = |log: &str| refusal.split('|').any(|line| log.contains(line));
        while !refused(&log) && waited.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            log = this_attack().await;
        }
        assert!(refused(&log), "{attack}: {log}");
        let hwm = vm_hwm_kb(pid);
        println!("{attack}: both events landed in {:?}; VmHWM {hwm} kB", started.elapsed());
        assert!(hwm < RSS_BOUND_KB, "{attack}: peak RSS {hwm} kB over the {RSS_BOUND_KB} kB bound");
    }
    let error: Value =
        sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = 39").fetch_one(&db.pool).await.unwrap();
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "the config's error is set: {error}");
    assert_eq!(server.wait_exit(Duration::from_millis(10)), None, "the server is still running");
}
