//! The orchestration's VM traits ([`VmFactory`], [`PluginVm`]) over the QuickJS worker pool
//! (`runtime::WorkerPool`), and the pool's `MetaBindings` over [`PluginContext`]. This is the only
//! place that knows both sides: the runtime stays ignorant of plugin configs and the orchestration
//! of the engine.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::errors::{process_error, PluginFailure};
use super::extensions::PluginContext;
use super::log_entries::{LogSource, LogType, PluginLogEntry};
use super::runtime::{
    self, Attachment, CallArgs, CallKind, FetchRequest, FetchResponse, MetaBindings, MetaError, PluginError,
    PluginExports, PluginVmSpec, VmId, WorkerPool,
};
use super::vm_boundary::{CallError, JsError, Method, PluginVm, TaskKind, VmExports, VmFactory};
use crate::event::PluginEvent;

/// Performs the plugins' `fetch` (the global and the `node-fetch` import). The server's is the
/// network ([`runtime::http_fetch`]); tests put their own in its place, as the reference's tests
/// mock `node-fetch`.
#[async_trait]
pub trait Fetcher: Send + Sync {
    async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, MetaError>;
}

/// Makes VMs on the worker pool (one per config per worker thread).
pub struct RuntimeVmFactory {
    pool: Arc<WorkerPool>,
    /// `None`: the network.
    fetcher: Option<Arc<dyn Fetcher>>,
}

impl RuntimeVmFactory {
    pub fn new(pool: Arc<WorkerPool>) -> RuntimeVmFactory {
        RuntimeVmFactory { pool, fetcher: None }
    }

    /// VMs whose `fetch` calls go to `fetcher` instead of the network.
    pub fn with_fetcher(pool: Arc<WorkerPool>, fetcher: Arc<dyn Fetcher>) -> RuntimeVmFactory {
        RuntimeVmFactory { pool, fetcher: Some(fetcher) }
    }
}

fn js_error(mut error: JsError) -> JsError {
    // `RetryError` extends `Error` without renaming itself, as in `@posthog/plugin-scaffold`; the
    // runtime reports it by class name.
    error.retry = error.retry || error.name == "RetryError";
    error
}

fn call_error(error: PluginError) -> CallError {
    match error {
        PluginError::Js { error, args_after } => {
            CallError { error: js_error(error), args: args_after, unavailable: false }
        }
        // The pool could not run the call (it already retried on another thread): the caller
        // must not go on as if the plugin had failed (run.rs fails the event back to its queue).
        error @ (PluginError::WorkerUnavailable { .. } | PluginError::ShutDown) => {
            CallError { error: JsError::new("Error", error.to_string()), args: None, unavailable: true }
        }
        // Babel reports parse errors as SyntaxError and its plugins' errors (forbidden imports) as Error.
        PluginError::Transform(message) => {
            let name = if message.contains("Cannot import") { "Error" } else { "SyntaxError" };
            JsError::new(name, message).into()
        }
        other => JsError::new("Error", other.to_string()).into(),
    }
}

fn vm_exports(exports: &PluginExports) -> VmExports {
    let methods = Method::ALL.into_iter().filter(|method| exports.has(method.name())).collect();
    let scheduled_tasks =
        exports.functions.iter().filter(|name| name.starts_with("runEvery")).cloned().collect::<Vec<_>>();
    let metrics = match &exports.metrics {
        Some(Value::Object(map)) => {
            Some(map.iter().filter(|(_, kind)| kind.is_string()).map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        Some(_) => Some(Map::new()),
        None => None,
    };
    VmExports { methods, scheduled_tasks, jobs: exports.jobs.clone(), metrics }
}

#[async_trait]
impl VmFactory for RuntimeVmFactory {
    async fn create(&self, context: Arc<PluginContext>, code: String) -> Result<Arc<dyn PluginVm>, JsError> {
        let id = context.config.id;
        let spec = PluginVmSpec {
            plugin_config_id: id as runtime::PluginConfigId,
            code,
            meta: Arc::new(ContextBindings {
                context,
                main: tokio::runtime::Handle::current(),
                fetcher: self.fetcher.clone(),
            }),
        };
        let exports = self.pool.load(spec).await.map_err(|error| call_error(error).error)?;
        Ok(Arc::new(RuntimeVm { pool: self.pool.clone(), id, exports: vm_exports(&exports) }))
    }
}

/// One config's VMs on the pool.
struct RuntimeVm {
    pool: Arc<WorkerPool>,
    id: i32,
    exports: VmExports,
}

impl RuntimeVm {
    fn pool_id(&self) -> runtime::PluginConfigId {
        self.id as runtime::PluginConfigId
    }
}

#[async_trait]
impl PluginVm for RuntimeVm {
    fn exports(&self) -> &VmExports {
        &self.exports
    }

    async fn call(&self, method: Method, args: Vec<Value>) -> Result<Value, CallError> {
        if method == Method::TeardownPlugin || method == Method::SetupPlugin {
            // Every worker thread has its own VM (and its own `meta.global`) to set up or tear down.
            let results = self.pool.broadcast(self.pool_id(), method.name(), args, CallKind::Method).await;
            return match results.into_iter().find_map(Result::err) {
                Some(error) => Err(call_error(error)),
                None => Ok(Value::Null),
            };
        }
        self.pool.call(self.pool_id(), method.name(), args, CallKind::Method).await.map_err(call_error)
    }

    async fn call_process_event(&self, event: &PluginEvent) -> Result<(Value, bool), CallError> {
        // Serialized straight from the event: no copy of it as values first.
        let args = CallArgs::json_array(event).map_err(|e| {
            CallError::from(JsError::new("TypeError", format!("the event could not be serialized: {e}")))
        })?;
        let pair = self
            .pool
            .call_with(self.pool_id(), runtime::PROCESS_EVENT_TRACKED, args, CallKind::Method)
            .await
            .map_err(call_error)?;
        match pair {
            Value::Array(mut pair) if pair.len() == 2 => {
                let same = pair.pop().is_some_and(|same| same == Value::Bool(true));
                Ok((pair.pop().unwrap_or(Value::Null), same))
            }
            other => Ok((other, false)),
        }
    }

    async fn run_task(&self, kind: TaskKind, name: &str, payload: Option<Value>) -> Result<Value, CallError> {
        let function = match kind {
            TaskKind::Schedule => name.to_string(),
            TaskKind::Job => format!("jobs.{name}"),
        };
        self.pool
            .call(self.pool_id(), &function, payload.into_iter().collect(), CallKind::Task)
            .await
            .map_err(call_error)
    }

    async fn dispose(&self) {
        self.pool.unload(self.pool_id()).await;
    }
}

/// `meta`, `console` and `posthog` of one config for the runtime.
struct ContextBindings {
    context: Arc<PluginContext>,
    /// The main runtime: rejections are reported from worker threads.
    main: tokio::runtime::Handle,
    fetcher: Option<Arc<dyn Fetcher>>,
}

#[async_trait]
impl MetaBindings for ContextBindings {
    fn config(&self) -> Value {
        self.context.config_json()
    }

    fn attachments(&self) -> Vec<Attachment> {
        self.context
            .config
            .attachments
            .iter()
            .map(|(key, attachment)| Attachment {
                key: key.clone(),
                content_type: attachment.content_type.clone().unwrap_or_default(),
                file_name: attachment.file_name.clone().unwrap_or_default(),
                contents: attachment.contents.clone(),
            })
            .collect()
    }

    fn metric_kind(&self, name: &str) -> Option<String> {
        self.context.metric_types().get(name).and_then(Value::as_str).map(str::to_lowercase)
    }

    async fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        self.context.call(name, args).await.map_err(|error| MetaError::named(error.name, error.message))
    }

    async fn call_from(&self, vm: VmId, name: &str, args: Vec<Value>) -> Result<Value, MetaError> {
        self.context.call_from(vm, name, args).await.map_err(|error| MetaError::named(error.name, error.message))
    }

    /// The VM's facade connections are closed on the main runtime (this runs on its worker
    /// thread, as it drops).
    fn vm_closed(&self, vm: VmId) {
        let left = self.context.left_open_by(vm);
        if !left.is_empty() {
            self.main.spawn(left.close());
        }
    }

    /// The plugin's fetch: a sealed `posthog.api` key is unsealed (only for the PostHog host),
    /// and a request the network policy refuses is also written to the plugin's log.
    async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, MetaError> {
        let result = match self.context.services.api_keys.unseal(request) {
            Ok(request) => match &self.fetcher {
                Some(fetcher) => fetcher.fetch(request).await,
                None => runtime::http_fetch(request).await,
            },
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            if error.name.contains(runtime::FETCH_REFUSED_CODE) {
                let entry = PluginLogEntry::new(
                    &self.context.config,
                    LogSource::System,
                    LogType::Warn,
                    format!("fetch refused: {}", error.message),
                    self.context.services.hub.instance_id,
                    None,
                );
                self.context.services.logs.queue(entry).await;
            }
        }
        result
    }

    /// A rejection nobody handled is the plugin's error (reference 30 §8.3), recorded for its
    /// config.
    fn unhandled_rejection(&self, error: JsError) {
        let context = self.context.clone();
        self.main.spawn(async move {
            let failure = PluginFailure::Error(js_error(error));
            process_error(&context.services, &context.config, &failure, None).await;
        });
    }
}
