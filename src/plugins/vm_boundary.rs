//! The boundary between the orchestration (this module's siblings) and the JavaScript runtime:
//! what a loaded plugin VM must offer ([`PluginVm`]) and how one is made ([`VmFactory`]). The
//! runtime (`plugins::runtime`) implements these over its worker threads; tests use fakes.
//!
//! A VM here is "the plugin config's code, evaluated, with exports discovered and `setupPlugin`
//! awaited" (on every worker thread: the runtime keeps one VM per config per thread). The
//! orchestration retries failed set-ups, wraps `onEvent` and `teardownPlugin` for the
//! exportEvents buffer, and owns metrics and capabilities; the runtime owns evaluation,
//! sandboxing, timeouts and binding `meta` (from [`PluginContext`]).
//!
//! VMs are keyed by plugin config id in the runtime: creating a VM for an id replaces the one
//! before it, so the orchestration tears a replaced config down *before* creating its successor
//! and only [`PluginVm::dispose`]s configs that are gone.
//!
//! [`PluginContext`]: super::extensions::PluginContext

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::extensions::PluginContext;
/// The one JavaScript error type, shared by the runtime (which builds it from what plugin code
/// threw) and the orchestration.
pub use super::runtime::{JsError, Thrown};
use crate::event::PluginEvent;

/// The plugin methods the server calls, in the reference's capability order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    SetupPlugin,
    TeardownPlugin,
    ExportEvents,
    OnEvent,
    OnSnapshot,
    ProcessEvent,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::SetupPlugin,
        Method::TeardownPlugin,
        Method::ExportEvents,
        Method::OnEvent,
        Method::OnSnapshot,
        Method::ProcessEvent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::SetupPlugin => "setupPlugin",
            Method::TeardownPlugin => "teardownPlugin",
            Method::ExportEvents => "exportEvents",
            Method::OnEvent => "onEvent",
            Method::OnSnapshot => "onSnapshot",
            Method::ProcessEvent => "processEvent",
        }
    }
}

/// The two kinds of plugin tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// `runEvery*` functions.
    Schedule,
    /// Entries of `exports.jobs`.
    Job,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Schedule => "schedule",
            TaskKind::Job => "job",
        }
    }
}

/// What the plugin code exports (after export discovery, before the server's upgrades).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmExports {
    /// Methods present. `processEvent` is present when only `processEventBatch` is exported
    /// (the runtime synthesizes it).
    pub methods: Vec<Method>,
    /// Exported functions whose names start with `runEvery`, in discovery order.
    pub scheduled_tasks: Vec<String>,
    /// Keys of `exports.jobs`, in discovery order.
    pub jobs: Vec<String>,
    /// The exported `metrics` object's string entries as written (not lower-cased), or `None`
    /// when the plugin exports no `metrics` object.
    pub metrics: Option<Map<String, Value>>,
}

impl VmExports {
    pub fn has(&self, method: Method) -> bool {
        self.methods.contains(&method)
    }
}

/// A failed call. `args` are the call's arguments as the plugin left them when it threw (so
/// `processEvent` failures keep in-place mutations); `None` when they must not be used (after a
/// timeout the plugin may still be running and mutating them).
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    pub error: JsError,
    pub args: Option<Vec<Value>>,
    /// The runtime could not run the call at all (its worker thread stalled and the retry failed
    /// too, or the pool is shutting down): not the plugin's error, and the call did not happen.
    /// An event must then not go on without this plugin.
    pub unavailable: bool,
}

impl From<JsError> for CallError {
    fn from(error: JsError) -> Self {
        CallError { error, args: None, unavailable: false }
    }
}

/// The event as JS sees it, as values.
pub fn event_value(event: &PluginEvent) -> Value {
    serde_json::to_value(event).unwrap_or(Value::Null)
}

/// One plugin config's evaluated code.
#[async_trait]
pub trait PluginVm: Send + Sync {
    fn exports(&self) -> &VmExports;

    /// Calls a method present in [`VmExports::methods`] with `args` followed by `meta`, under
    /// the method-level `TASK_TIMEOUT` guard. Returns the (awaited) return value; `undefined`
    /// comes back as `null`.
    async fn call(&self, method: Method, args: Vec<Value>) -> Result<Value, CallError>;

    /// `processEvent(event)`, and whether it returned the very object it was given (the reference
    /// adds `$plugins_*` to that object only). A VM that cannot tell says it did.
    async fn call_process_event(&self, event: &PluginEvent) -> Result<(Value, bool), CallError> {
        self.call(Method::ProcessEvent, vec![event_value(event)]).await.map(|value| (value, true))
    }

    /// Runs a scheduled task (`fn(meta)`) or a job (`fn(payload, meta)`); no method-level guard.
    async fn run_task(&self, kind: TaskKind, name: &str, payload: Option<Value>) -> Result<Value, CallError>;

    /// Releases the VM (after the teardown of a config that is no longer in force).
    async fn dispose(&self);
}

/// Makes VMs: transforms the code, evaluates it with `meta` bound to `context`, discovers
/// exports, then awaits `setupPlugin` (when exported) under the method-level guard. Any error
/// fails the creation and leaves no VM behind.
#[async_trait]
pub trait VmFactory: Send + Sync {
    async fn create(&self, context: Arc<PluginContext>, code: String) -> Result<Arc<dyn PluginVm>, JsError>;
}
