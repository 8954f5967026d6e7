//! Issue 16's export benchmark for S3: N events through `exportEvents` of PostHog's S3 export
//! plugin (unmodified, `tests/data/plugins/s3-export-plugin`, gzip) into a local S3 (moto,
//! `scripts/moto`, on a port of its own), over the `aws-sdk` facade: the plugin's `exportEvents` is
//! called on the worker pool batch after batch, as the server's export buffer would. Prints
//! events/s and the process's peak RSS, then checks that every event is in the bucket.
//! `benches/export_s3_node.js` does the same on Node with aws-sdk 2.927.0 for the original's figure.
//!
//! Run: `cargo bench --profile dev --bench export_s3` (env: BENCH_EVENTS, default 20000;
//! BENCH_BATCH, default 500; BENCH_COMPRESSION, default gzip).

mod e2e_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server binary's allocator (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use async_trait::async_trait;
use base64::Engine as _;
use e2e_support::{env_number, peak_rss_mib};
use plugin_server::plugins::extensions::aws::Aws;
use plugin_server::plugins::runtime::{
    configure_network, CallKind, MetaBindings, MetaError, NetworkSettings, PluginVmSpec, PoolOptions, WorkerPool,
};
use serde_json::{json, Value};

/// `aws.*` through the facade's host side; console output dropped.
struct BenchMeta {
    aws: Aws,
    config: Value,
}

#[async_trait]
impl MetaBindings for BenchMeta {
    fn config(&self) -> Value {
        self.config.clone()
    }
    async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        if name.starts_with("aws.") {
            return self
                .aws
                .call(name, &args, Duration::from_secs(29))
                .await
                .map_err(|e| MetaError::named(e.name, e.message));
        }
        Ok(Value::Null)
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

/// moto on a free port (killed when dropped).
struct Moto(std::process::Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_moto() -> (Moto, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let child = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/moto"))
        .arg("serve")
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("scripts/moto serve");
    let moto = Moto(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(120), "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let created = reqwest::Client::new().put(format!("{endpoint}/bench")).send().await.expect("create bucket");
    assert!(created.status().is_success(), "create bucket: {}", created.status());
    (moto, endpoint)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let events = env_number("BENCH_EVENTS", 20_000);
        let batch_size = env_number("BENCH_BATCH", 500).max(1);
        let compression = std::env::var("BENCH_COMPRESSION").unwrap_or_else(|_| "gzip".into());
        configure_network(NetworkSettings {
            allow_internal_ips: true,
            ..NetworkSettings::defaults(plugin_server::config::NodeEnv::Test)
        });
        let (_moto, endpoint) = start_moto().await;
        let code = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plugins/s3-export-plugin/index.ts"),
        )
        .expect("the plugin's source");
        let config = json!({
            "awsAccessKey": "AKIDBENCH", "awsSecretAccessKey": "bench-secret", "awsRegion": "us-east-1",
            "s3BucketName": "bench", "s3BucketEndpoint": endpoint, "s3ForcePathStyle": "true", "prefix": "",
            "eventsToIgnore": "", "compression": compression, "signatureVersion": "", "sse": "disabled",
        });
        let meta = Arc::new(BenchMeta { aws: Aws::default(), config: config.clone() });
        let options = PoolOptions { threads: 1, task_timeout: Duration::from_secs(30), ..PoolOptions::default() };
        let pool = WorkerPool::new(options).expect("pool");
        pool.load(PluginVmSpec { plugin_config_id: 1, code, meta }).await.expect("load");
        pool.call(1, "setupPlugin", vec![], CallKind::Method).await.expect("setupPlugin");
        let started = Instant::now();
        let mut sent = 0;
        while sent < events {
            let batch: Vec<Value> = (sent..events.min(sent + batch_size)).map(event).collect();
            sent += batch.len();
            pool.call(1, "exportEvents", vec![Value::Array(batch)], CallKind::Method).await.expect("exportEvents");
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "export benchmark (s3-export-plugin, aws-sdk facade, {compression}): {events} events in batches of \
             {batch_size}: {:.0} events/s, peak RSS {:.1} MiB",
            events as f64 / seconds,
            peak_rss_mib()
        );
        // Every event in the bucket: the objects listed, read back and their lines counted.
        let aws = Aws::default();
        let client = json!({"accessKeyId": "AKIDBENCH", "secretAccessKey": "bench-secret", "region": "us-east-1",
                            "endpoint": endpoint, "s3ForcePathStyle": true});
        let (mut objects, mut lines, mut token) = (0, 0, Value::Null);
        loop {
            let mut params = json!({"Bucket": "bench"});
            if !token.is_null() {
                params["ContinuationToken"] = token.clone();
            }
            let listed =
                aws.call("aws.s3", &[client.clone(), json!("listObjectsV2"), params], Duration::from_secs(30)).await;
            let listed = listed.expect("listObjectsV2")["data"].clone();
            for object in listed["Contents"].as_array().cloned().unwrap_or_default() {
                let params = json!({"Bucket": "bench", "Key": object["Key"]});
                let got =
                    aws.call("aws.s3", &[client.clone(), json!("getObject"), params], Duration::from_secs(30)).await;
                let body = base64::engine::general_purpose::STANDARD
                    .decode(got.expect("getObject")["data"]["Body"].as_str().unwrap_or_default())
                    .expect("base64");
                let mut text = String::new();
                let key = object["Key"].as_str().unwrap_or_default();
                if key.ends_with(".gz") {
                    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
                        .expect("gzip");
                } else if key.ends_with(".br") {
                    std::io::Read::read_to_string(&mut brotli::Decompressor::new(&body[..], 4096), &mut text)
                        .expect("br");
                } else {
                    text = String::from_utf8_lossy(&body).into_owned();
                }
                objects += 1;
                lines += text.lines().count();
            }
            token = listed["NextContinuationToken"].clone();
            if token.is_null() {
                break;
            }
        }
        println!("  objects in the bucket: {objects}, events in them: {lines}");
        assert_eq!(lines, events, "every event exported once");
        pool.shutdown(Duration::from_secs(5)).await;
    });
}
