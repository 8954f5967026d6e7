//! The JavaScript runtime: a fixed pool of worker threads, each owning one sandboxed VM per plugin
//! config, on QuickJS or V8 (`JS_ENGINE`, behind `engine.rs`).
//!
//! Owns: the worker threads and their task channels (back-pressure), VM creation (transformed code,
//! sandbox globals, allow-listed imports, export discovery), per-call CPU deadlines, the per-VM
//! memory limit, promise timeouts with the reference's error messages, conversion of
//! `serde_json::Value` to and from JS values, and the JS surface of `meta`/`console`/`posthog`.
//!
//! Does not own: what the meta API *does* (cache, storage, jobs, geoip, capture, logs, metrics):
//! that is plain async Rust behind [`MetaBindings`], implemented by the plugin orchestration
//! (`plugins::extensions`). Nor retries of `setupPlugin`, the exportEvents buffer, the
//! processEvent chain or error recording: the orchestration drives those through [`WorkerPool`].
//! The engine (QuickJS through rquickjs, or V8 through `v8/`) stays behind `engine::Vm`: the pool
//! and the callers do not know which one runs. Both run the same `prelude.js`, the same host
//! logic (`host/`) and give the same error texts (`timeouts.rs`).

mod convert;
mod engine;
mod host;
pub mod modules;
mod pool;
mod quickjs;
mod timeouts;
pub mod v8;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use engine::CallArgs;
pub use host::fetch::{
    add_test_public_host, configure as configure_network, fetch_undecoded, fetch_with, http_fetch, internal_reason,
    node_tls_error, resolve_for_plugin, settings as network_settings, FetchError, FetchRequest, FetchResponse,
    NetworkSettings, OPTIONS_HEADER as FETCH_OPTIONS_HEADER, REFUSED_CODE as FETCH_REFUSED_CODE, REQUEST_TIMEOUT,
};
pub use host::memory_headroom;
pub use host::read_test_console;
pub use pool::{PoolStats, WorkerPool, CALL_ATTEMPTS};
pub use quickjs::{is_allowed_import, ALLOWED_IMPORTS, META_GLOBAL_GET, META_GLOBAL_SET, PROCESS_EVENT_TRACKED};

/// Identifies one plugin config (`posthog_pluginconfig.id`); one VM per id per worker thread.
pub type PluginConfigId = i64;

/// One VM as the host side of its calls knows it (unique in the process). What a call opens on a
/// VM's behalf (a facade's database connections) belongs to that VM and is closed by
/// [`MetaBindings::vm_closed`] when the VM goes (dropped, discarded, reloaded).
pub type VmId = u64;

/// A fresh [`VmId`]; every engine takes one per VM it builds.
pub fn next_vm_id() -> VmId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Everything needed to build a VM for one plugin config.
#[derive(Clone)]
pub struct PluginVmSpec {
    pub plugin_config_id: PluginConfigId,
    /// The plugin's source (`index.js`, `index.ts` or the file named by `plugin.json` `main`).
    /// It goes through [`crate::plugins::transform`] before it runs.
    pub code: String,
    /// The meta API of this config; shared by the VMs of this config on every thread.
    pub meta: Arc<dyn MetaBindings>,
}

impl std::fmt::Debug for PluginVmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginVmSpec").field("plugin_config_id", &self.plugin_config_id).finish_non_exhaustive()
    }
}

/// One `meta.attachments` entry; `contents` reaches the plugin as a `Buffer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub key: String,
    pub content_type: String,
    pub file_name: String,
    pub contents: Vec<u8>,
}

/// An error thrown into plugin code by a meta API call: becomes a JS `Error` with this `name`
/// (e.g. `IllegalOperationError`) and `message`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct MetaError {
    pub name: String,
    pub message: String,
}

impl MetaError {
    /// A plain `Error` with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        MetaError { name: "Error".to_string(), message: message.into() }
    }
    /// An error with a specific JS `name`, e.g. `IllegalOperationError` or `TypeError`.
    pub fn named(name: impl Into<String>, message: impl Into<String>) -> Self {
        MetaError { name: name.into(), message: message.into() }
    }
}

/// The meta API of one plugin config, as plain Rust. The runtime builds the JS objects
/// (`meta.cache.get(...)`, `console.log(...)`, `posthog.capture(...)`, ...) and forwards every
/// call here; `call` futures run on the main tokio runtime (the one `WorkerPool::new` was called
/// on), never on the JS worker threads.
///
/// Argument convention for `call`: the plugin's arguments converted to JSON (`Date` → ISO string,
/// `Buffer`/typed arrays → `{type: "Buffer", data: [...]}` like Node's `JSON.stringify`,
/// functions dropped), with `undefined` → `null`, except that **trailing `undefined` arguments
/// are omitted** (so `storage.set('k', undefined)` arrives as `["k"]`). The returned value goes
/// back to the plugin (`Value::Null` → `null`). An `Err` rejects the plugin's promise.
///
/// Names passed to `call` (the plugin's call → name, args):
/// * `meta.cache.<set|get|incr|expire|lpush|lrange|llen|lrem|lpop>(...)` → `"cache.<op>"`, args as given
/// * `meta.storage.<get|set|del>(...)` → `"storage.<op>"`
/// * `meta.utils.cursor.<init|increment>(...)` → `"utils.cursor.<op>"`
/// * `meta.geoip.locate(ip)` → `"geoip.locate"`, `[ip]`
/// * `meta.jobs.<name>(payload).runNow()` → `"jobs.runNow"`, `[name, payload]`;
///   `.runIn(duration, unit)` → `"jobs.runIn"`, `[name, payload, duration, unit]`;
///   `.runAt(date)` → `"jobs.runAt"`, `[name, payload, date]` (a JS `Date` arrives as ISO string)
/// * `meta.metrics.<name>.<increment|max|min>(value)` → `"metrics.<op>"`, `[name, value]` (not awaited
///   by the plugin; the runtime has checked the name via [`MetaBindings::metric_kind`] and that
///   `value` is a number)
/// * `console.<debug|log|info|warn|error>(...)` → `"console.<level>"`, `[message]` where message is
///   already rendered by the reference's rules (args joined by spaces; arrays and `[object Object]`
///   values as JSON)
/// * `posthog.capture(event, properties?)` → `"posthog.capture"`, `[event, properties?]`
/// * `posthog.api.<get|post|put|delete>(path, options?)` → `"posthog.api"`,
///   `[method_upper, path, options?]`; must return a request `{url, method, headers?: {k: v},
///   body?: string}` which the runtime then performs with [`MetaBindings::fetch`] and hands the
///   plugin the Response.
#[async_trait]
pub trait MetaBindings: Send + Sync + 'static {
    /// `meta.config` (the plugin config's `config` JSON).
    fn config(&self) -> Value {
        Value::Object(Default::default())
    }
    /// `meta.attachments` entries.
    fn attachments(&self) -> Vec<Attachment> {
        Vec::new()
    }
    /// The declared type (`"sum"`, `"max"` or `"min"`) of metric `name`, or `None` when the
    /// plugin did not declare it (the plugin then gets `IllegalOperationError: Invalid metric
    /// name`). Called when the plugin reads `meta.metrics.<name>`.
    fn metric_kind(&self, _name: &str) -> Option<String> {
        None
    }
    /// Every other meta call, see the trait docs for names and arguments.
    async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, MetaError>;
    /// [`MetaBindings::call`] made by VM `vm`: how every engine calls the host, so that the
    /// facades' host operations (`pg.*`, see `runtime/modules`) can keep state per VM (open
    /// connections, bounded per VM). Default: `call`.
    async fn call_from(&self, _vm: VmId, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        self.call(name, args).await
    }
    /// VM `vm` is gone: close whatever its calls left open. Called on the VM's worker thread as
    /// it drops; must not block. Default: nothing.
    fn vm_closed(&self, _vm: VmId) {}
    /// The `fetch` global and `node-fetch` import. The default performs a real HTTP request
    /// (bounded body size and time); tests override it.
    async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, MetaError> {
        http_fetch(request).await
    }
    /// A promise rejected with nobody handling it, inside this config's VM (reference §8.3:
    /// the error is recorded for the config). Default: ignore.
    fn unhandled_rejection(&self, _error: JsError) {}
}

/// A JS error as seen from Rust.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JsError {
    /// `error.name` (`Error`, `TypeError`, `TimeoutError`, ...); empty when a non-Error was thrown.
    pub name: String,
    /// `error.message`, or the string form of a thrown non-Error value.
    pub message: String,
    pub stack: Option<String>,
    /// `TimeoutError.caller`: the method name for method-level timeouts.
    pub caller: Option<String>,
    /// The thrown value is a `RetryError` (`@posthog/plugin-scaffold`), whose name is plain `Error`.
    pub retry: bool,
    /// What kind of value was thrown (the reference records a thrown string differently).
    pub thrown: Thrown,
}

impl JsError {
    pub fn new(name: &str, message: impl Into<String>) -> JsError {
        JsError { name: name.to_string(), message: message.into(), ..JsError::default() }
    }

    /// A `RetryError` thrown by plugin code.
    pub fn retry(message: impl Into<String>) -> JsError {
        JsError { retry: true, ..JsError::new("Error", message) }
    }
}

/// The kind of value plugin code threw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thrown {
    /// An object: an `Error` or anything else with properties.
    #[default]
    Object,
    /// A string (`throw 'message'`).
    String,
    /// Another primitive (`throw 42`, `throw undefined`).
    Primitive,
}

impl std::fmt::Display for JsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.name, self.message)
        }
    }
}

/// Why a VM could not be built or a call did not return a value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// The code could not be transformed (syntax error, forbidden import). The message carries
    /// the reference's `/index.ts: ` prefix.
    #[error("{0}")]
    Transform(String),
    /// Plugin code threw (or a promise rejected, or a timeout/limit fired). `args_after` holds the
    /// call's arguments as they were after the throw (a plugin may mutate the event in place
    /// before throwing; the reference keeps those mutations, 30 §6.1). `None` for timeouts, whose
    /// later mutations must not leak.
    #[error("{error}")]
    Js { error: JsError, args_after: Option<Vec<Value>> },
    /// No VM spec registered for this plugin config id.
    #[error("plugin config {0} is not loaded")]
    NotLoaded(PluginConfigId),
    /// The plugin does not export this method / job.
    #[error("method {method} not found in plugin config {plugin_config_id}")]
    MethodNotFound { plugin_config_id: PluginConfigId, method: String },
    /// The worker thread did not answer in time or is gone; the task was not (fully) run.
    #[error("JS worker thread {worker} unavailable: {reason}")]
    WorkerUnavailable { worker: usize, reason: String },
    /// The pool is shutting down.
    #[error("the JS worker pool is shut down")]
    ShutDown,
}

impl PluginError {
    /// The JS error if plugin code failed.
    pub fn js_error(&self) -> Option<&JsError> {
        match self {
            PluginError::Js { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// What a plugin exports, found after its code ran (reference 30 §5.3): destinations
/// `exports`, `exports.default`, `module.exports` (or the global object when none has keys).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PluginExports {
    /// Names of exported functions (`processEvent`, `onEvent`, `runEveryHour`, helpers...). If the
    /// plugin exports `processEventBatch` but not `processEvent`, `processEvent` is listed too (it
    /// is synthesized, reference 30 §6).
    pub functions: Vec<String>,
    /// Names of the functions in the exported `jobs` object; call them as `"jobs.<name>"`.
    pub jobs: Vec<String>,
    /// The exported `metrics` object (e.g. `{"count": "sum"}`), as JSON, when present.
    pub metrics: Option<Value>,
}

impl PluginExports {
    pub fn has(&self, function: &str) -> bool {
        self.functions.iter().any(|f| f == function)
    }
}

/// How a call is time-limited (reference 30 §6, §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// setupPlugin/teardownPlugin/exportEvents/onEvent/onSnapshot/processEvent: the whole call
    /// (including everything it awaits) must finish within `TASK_TIMEOUT`, else `TimeoutError`
    /// with `caller` = the method name.
    Method,
    /// Scheduled tasks and jobs: no deadline for the whole call, but each wait without progress
    /// is limited to `TASK_TIMEOUT` and each synchronous stretch of JS to `TASK_TIMEOUT`.
    Task,
}

/// Tunables of the pool; [`PoolOptions::from_config`] reads the server config.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Worker threads (`WORKER_CONCURRENCY`, 0 = cores).
    pub threads: usize,
    /// Tasks one thread runs at once (`TASKS_PER_WORKER`); also the bound of its task channel.
    pub tasks_per_worker: usize,
    /// `TASK_TIMEOUT`.
    pub task_timeout: Duration,
    /// Hard heap limit of each VM.
    pub memory_limit_bytes: usize,
    /// JS stack limit of each VM (deep recursion → `RangeError`).
    pub max_stack_bytes: usize,
    /// Test env: expose `__jestSetTimeout` like the reference does under tests.
    pub test_env: bool,
    /// Where the test-only module `test-utils/write-to-file` writes (reference 30 §5.2); the
    /// module exists only when this is set (`from_config` sets `<cwd>/tmp/test-console.txt` in
    /// the test env). See [`read_test_console`].
    pub test_console_file: Option<std::path::PathBuf>,
    /// A worker whose heartbeat is older than this is stalled and gets replaced (default
    /// `2 × TASK_TIMEOUT + 5 s`: longer than any stretch the CPU deadline allows).
    pub stall_after: Option<Duration>,
    /// The JavaScript engine of the VMs (`JS_ENGINE`).
    pub engine: crate::config::JsEngine,
}

impl PoolOptions {
    pub fn from_config(config: &crate::config::Config) -> PoolOptions {
        let test_env = config.is_test();
        PoolOptions {
            threads: config.worker_threads(),
            tasks_per_worker: config.tasks_per_worker(),
            task_timeout: config.task_timeout(),
            test_env,
            test_console_file: test_env.then(|| std::path::Path::new("tmp").join("test-console.txt")),
            stall_after: (config.PLUGIN_WORKER_STALL_MS > 0)
                .then(|| std::time::Duration::from_millis(config.PLUGIN_WORKER_STALL_MS)),
            engine: config.JS_ENGINE,
            ..PoolOptions::default()
        }
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            threads: 2,
            tasks_per_worker: 10,
            task_timeout: Duration::from_secs(30),
            memory_limit_bytes: 128 * 1024 * 1024,
            max_stack_bytes: 1024 * 1024,
            test_env: false,
            test_console_file: None,
            stall_after: None,
            // Without a config (tests, benches, the dev loop's defaults): `JS_ENGINE` of the
            // process, so one test file exercises either engine.
            engine: crate::config::JsEngine::from_process_env(),
        }
    }
}
