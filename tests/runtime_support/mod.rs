//! Shared helpers for the runtime tests: a recording `MetaBindings` and pool builders.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::plugins::runtime::{
    Attachment, CallKind, FetchRequest, FetchResponse, JsError, MetaBindings, MetaError, PluginError, PluginExports,
    PluginVmSpec, PoolOptions, WorkerPool,
};
use serde_json::{json, Value};

/// Records every meta call; answers `cache.get`/`storage.get` from a small map, everything else
/// with `null`; `fetch` answers with JSON echoing the URL.
#[derive(Default)]
pub struct TestMeta {
    pub calls: Mutex<Vec<(String, Vec<Value>)>>,
    pub fetches: Mutex<Vec<FetchRequest>>,
    pub store: Mutex<serde_json::Map<String, Value>>,
    pub rejections: Mutex<Vec<JsError>>,
    pub config: Value,
    pub attachments: Vec<Attachment>,
}

impl TestMeta {
    pub fn new() -> Arc<TestMeta> {
        Arc::new(TestMeta { config: json!({}), ..TestMeta::default() })
    }
    pub fn calls_named(&self, name: &str) -> Vec<Vec<Value>> {
        self.calls.lock().unwrap().iter().filter(|(n, _)| n == name).map(|(_, a)| a.clone()).collect()
    }
}

#[async_trait]
impl MetaBindings for TestMeta {
    fn config(&self) -> Value {
        self.config.clone()
    }
    fn attachments(&self) -> Vec<Attachment> {
        self.attachments.clone()
    }
    fn metric_kind(&self, name: &str) -> Option<String> {
        match name {
            "total" => Some("sum".into()),
            "biggest" => Some("max".into()),
            _ => None,
        }
    }
    async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        self.calls.lock().unwrap().push((name.to_string(), args.clone()));
        let key = args.first().and_then(|k| k.as_str()).unwrap_or_default().to_string();
        match name {
            "storage.set" | "cache.set" => {
                self.store.lock().unwrap().insert(key, args.get(1).cloned().unwrap_or(Value::Null));
                Ok(Value::Null)
            }
            "storage.get" => {
                Ok(self.store.lock().unwrap().get(&key).cloned().or(args.get(1).cloned()).unwrap_or(Value::Null))
            }
            "cache.get" => Ok(self.store.lock().unwrap().get(&key).cloned().unwrap_or(Value::Null)),
            "cache.fail" | "storage.del" if key == "boom" => Err(MetaError::named("IllegalOperationError", "nope")),
            "posthog.api" => Ok(
                json!({"url": format!("https://app.posthog.com{}", args[1].as_str().unwrap_or_default()), "method": args[0], "headers": {"authorization": "Bearer x"}}),
            ),
            _ => Ok(Value::Null),
        }
    }
    async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, MetaError> {
        self.fetches.lock().unwrap().push(request.clone());
        if request.url.contains("slow") {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(FetchResponse {
            status: 200,
            status_text: "OK".into(),
            url: request.url.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&json!({"url": request.url, "method": request.method})).unwrap(),
        })
    }
    fn unhandled_rejection(&self, error: JsError) {
        self.rejections.lock().unwrap().push(error);
    }
}

pub fn options(threads: usize, timeout_secs: f64) -> PoolOptions {
    PoolOptions {
        threads,
        tasks_per_worker: 4,
        task_timeout: Duration::from_secs_f64(timeout_secs),
        test_env: true,
        ..PoolOptions::default()
    }
}

pub async fn load(pool: &WorkerPool, id: i64, code: &str, meta: Arc<TestMeta>) -> Result<PluginExports, PluginError> {
    pool.load(PluginVmSpec { plugin_config_id: id, code: code.to_string(), meta }).await
}

/// Loads `code` as config 1 into a one-thread pool and calls `processEvent` with `event`.
pub async fn process(code: &str, event: Value) -> Result<Value, PluginError> {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    load(&pool, 1, code, TestMeta::new()).await?;
    pool.call(1, "processEvent", vec![event], CallKind::Method).await
}

pub fn message(result: Result<Value, PluginError>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e.js_error().map(|j| j.message.clone()).unwrap_or_else(|| e.to_string()),
    }
}
