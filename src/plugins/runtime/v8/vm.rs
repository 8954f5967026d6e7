//! One sandboxed plugin VM on V8: an isolate of its own (heap limit, CPU deadline), the same
//! sandbox as QuickJS's (`prelude.js`, run by `bootstrap.js`), the plugin code, its exports, and
//! the machinery that runs one call to completion on the worker thread: host ops (meta calls,
//! fetch, timers) driven as local tasks whose results settle their promises, and the reference's
//! timeout errors (`runtime/timeouts.rs`). The counterpart of `quickjs.rs`; the pool holds either
//! through `runtime/engine.rs`.
//!
//! Invariants: the isolate is entered only through `self.iso.borrow_mut()` held for one
//! synchronous call (never across an `.await`); after every entry, [`VmInner::after_js`] starts
//! the host ops JS began, reports unhandled rejections and wakes the waiting calls. A VM whose
//! promise jobs a deadline cut short (V8 drops the queue on termination), or whose isolate reached
//! its heap limit, is discarded: it runs no more JS and the pool builds a fresh one.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::future::Future;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::{EngineError, HostFuture, Outcome, RealmId, V8Isolate, V8Options};
use crate::plugins::runtime::host::{self, v8::bin_string};
use crate::plugins::runtime::timeouts::{loop_timeout_error, promise_timeout_error, refused_error};
use crate::plugins::runtime::{
    next_vm_id, CallArgs, CallKind, FetchRequest, JsError, MetaBindings, MetaError, PluginConfigId, PluginError,
    PluginExports, PoolOptions, VmId, META_GLOBAL_GET, PROCESS_EVENT_TRACKED,
};
use crate::plugins::transform::{TransformedCode, VIRTUAL_FILENAME};

const BOOTSTRAP: &str = include_str!("bootstrap.js");
const PRELUDE: &str = include_str!("../prelude.js");

/// The error of a call that took the isolate over its heap limit (QuickJS's words).
fn out_of_memory() -> JsError {
    JsError::new("InternalError", "out of memory")
}

/// Runs `future` on the main runtime (where the meta API's clients live), or here without one.
async fn on_main<T: Send + 'static>(
    main: Option<Handle>,
    future: impl Future<Output = Result<T, MetaError>> + Send + 'static,
) -> Result<T, MetaError> {
    match main {
        Some(handle) => handle.spawn(future).await.unwrap_or_else(|e| Err(MetaError::new(e.to_string()))),
        None => future.await,
    }
}

/// `future` limited like the reference's guarded `await` (`limit`: none for fire-and-forget ops).
async fn limited(
    limit: Option<Duration>,
    future: impl Future<Output = Result<Value, MetaError>>,
) -> Result<Value, MetaError> {
    match limit {
        Some(limit) => match tokio::time::timeout(limit, future).await {
            Ok(result) => result,
            Err(_) => {
                let error = promise_timeout_error(limit, "host call");
                Err(MetaError::named(error.name, error.message))
            }
        },
        None => future.await,
    }
}

fn text(args: &[Value], index: usize) -> String {
    match args.get(index) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

pub struct VmInner {
    pub plugin_config_id: PluginConfigId,
    /// This VM to the host side of its calls (facades' connections are closed when it drops).
    vm_id: VmId,
    iso: RefCell<V8Isolate>,
    meta: Arc<dyn MetaBindings>,
    task_timeout: Duration,
    code: Arc<TransformedCode>,
    notify: Notify,
    last_progress: Cell<Instant>,
    discarded: RefCell<Option<JsError>>,
    abandoned: Arc<AtomicBool>,
    next_id: Cell<u64>,
    self_weak: Weak<VmInner>,
    /// Callable names: the exported functions and the server's internal helpers.
    callable: RefCell<HashSet<String>>,
    jobs: RefCell<HashSet<String>>,
    pub exports: RefCell<PluginExports>,
}

pub type Vm = Rc<VmInner>;

impl Drop for VmInner {
    fn drop(&mut self) {
        self.meta.vm_closed(self.vm_id);
    }
}

/// The host functions that need the VM's async machinery or its meta API.
fn install_async(
    iso: &mut V8Isolate,
    meta: &Arc<dyn MetaBindings>,
    vm_id: VmId,
    main: &Option<Handle>,
    timeout: Duration,
) -> Result<(), EngineError> {
    let prefix = host::v8::PREFIX;
    let m = meta.clone();
    iso.register_function(&format!("{prefix}metricKind"), move |args| {
        Ok(m.metric_kind(&text(&args, 0)).map_or(Value::Null, Value::String))
    })?;
    let (m, h) = (meta.clone(), main.clone());
    iso.register_async(&format!("{prefix}call"), move |args| -> HostFuture {
        let name = text(&args, 0);
        let call_args = match args.into_iter().nth(1) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        // Logging and metrics are fire-and-forget in the reference; everything else is an
        // awaited promise limited like the reference's guarded `await`.
        let limit = (!name.starts_with("console.") && !name.starts_with("metrics.")).then_some(timeout);
        let (meta, main) = (m.clone(), h.clone());
        Box::pin(limited(limit, on_main(main, async move { meta.call_from(vm_id, &name, call_args).await })))
    })?;
    let (m, h) = (meta.clone(), main.clone());
    iso.register_async(&format!("{prefix}fetch"), move |args| -> HostFuture {
        let headers = match args.get(2) {
            Some(Value::Array(pairs)) => pairs
                .iter()
                .filter_map(|pair| Some((pair.get(0)?.as_str()?.to_string(), pair.get(1)?.as_str()?.to_string())))
                .collect(),
            _ => Vec::new(),
        };
        let binary = args.get(4).and_then(Value::as_bool).unwrap_or(false);
        let body = match args.get(3) {
            Some(Value::Null) | None => Ok(None),
            Some(value) if binary => host::v8::bin_bytes(Some(value)).map(Some),
            Some(_) => Ok(Some(text(&args, 3).into_bytes())),
        };
        let (meta, main) = (m.clone(), h.clone());
        let request = body.map(|body| FetchRequest { url: text(&args, 0), method: text(&args, 1), headers, body });
        Box::pin(async move {
            let request = request?;
            let response = on_main(main, async move { meta.fetch(request).await }).await?;
            Ok(json!({
                "status": response.status,
                "statusText": response.status_text,
                "url": response.url,
                "headers": response.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                "body": bin_string(&response.body),
            }))
        })
    })?;
    iso.register_async(&format!("{prefix}sleep"), |args| -> HostFuture {
        let ms = args.first().and_then(Value::as_f64).filter(|m| m.is_finite() && *m > 0.0).unwrap_or(0.0);
        let ms = ms.min(86_400_000.0);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
            Ok(Value::Null)
        })
    })?;
    Ok(())
}

impl VmInner {
    /// Builds the VM and runs the plugin code (not `setupPlugin`). Must run inside the worker's
    /// `LocalSet`.
    pub async fn create(
        plugin_config_id: PluginConfigId,
        code: &Arc<TransformedCode>,
        meta: Arc<dyn MetaBindings>,
        options: &PoolOptions,
        main: Option<Handle>,
        abandoned: Arc<AtomicBool>,
    ) -> Result<Vm, PluginError> {
        let setup_error = |e: EngineError| PluginError::Js {
            error: JsError::new("Error", format!("Could not create the plugin VM: {e}")),
            args_after: None,
        };
        let timeout = options.task_timeout;
        let v8_options = V8Options {
            heap_limit_bytes: options.memory_limit_bytes,
            // ArrayBuffers live outside the V8 heap: their bytes get a budget of the same size
            // (QuickJS counts them inside its one limit).
            array_buffer_limit_bytes: options.memory_limit_bytes,
            lenient: true,
            gc_budget: true,
            ..V8Options::default()
        };
        let mut iso = V8Isolate::new(v8_options).map_err(setup_error)?;
        let probe = iso.heap_probe();
        host::v8::install(&mut iso, Rc::new(move || probe.headroom()), options.test_console_file.clone())
            .map_err(setup_error)?;
        let vm_id = next_vm_id();
        install_async(&mut iso, &meta, vm_id, &main, timeout).map_err(setup_error)?;
        match iso.load(super::SourceKind::FunctionBody, BOOTSTRAP, "bootstrap", timeout) {
            Ok(_) => {}
            Err(e) => return Err(setup_error(e)),
        }
        let vm = Rc::new_cyclic(|weak| VmInner {
            plugin_config_id,
            vm_id,
            iso: RefCell::new(iso),
            meta,
            task_timeout: timeout,
            code: code.clone(),
            notify: Notify::new(),
            last_progress: Cell::new(Instant::now()),
            discarded: RefCell::new(None),
            abandoned,
            next_id: Cell::new(1),
            self_weak: weak.clone(),
            callable: RefCell::default(),
            jobs: RefCell::default(),
            exports: RefCell::default(),
        });
        vm.load(options).await?;
        Ok(vm)
    }

    fn fresh_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Whether this VM may no longer run JS (discarded, its heap limit reached, or its thread
    /// abandoned).
    pub fn is_discarded(&self) -> bool {
        self.discarded.borrow().is_some() || self.abandoned.load(Ordering::Relaxed) || self.iso.borrow().is_dead()
    }

    fn discard_error(&self) -> Option<JsError> {
        if let Some(error) = self.discarded.borrow().clone() {
            return Some(error);
        }
        if self.abandoned.load(Ordering::Relaxed) {
            return Some(JsError::new("Error", "the plugin VM's thread was abandoned"));
        }
        self.iso.borrow().is_dead().then(out_of_memory)
    }

    fn discard(&self, error: JsError) {
        tracing::warn!(plugin_config_id = self.plugin_config_id, %error, "plugin VM discarded");
        self.discarded.borrow_mut().get_or_insert(error);
    }

    /// Calls a bootstrap function (`exports.<name>` of bootstrap.js) under the CPU deadline.
    fn enter(&self, name: &str, args: &[Value]) -> Result<Outcome, EngineError> {
        let outcome = self.iso.borrow_mut().call(name, args, self.task_timeout);
        self.after_js();
        outcome
    }

    /// [`VmInner::enter`] with the argument list as JSON text (an array).
    fn enter_text(&self, name: &str, args: &str) -> Result<Outcome, EngineError> {
        let outcome = self.iso.borrow_mut().call_in_text(RealmId::MAIN, name, args, self.task_timeout);
        self.after_js();
        outcome
    }

    /// After JS ran: start the host ops it began, report unhandled rejections, wake the waiters.
    fn after_js(&self) {
        let started = self.iso.borrow().take_started_ops();
        for (op, future) in started {
            let weak = self.self_weak.clone();
            tokio::task::spawn_local(async move {
                let result = future.await;
                if let Some(vm) = weak.upgrade() {
                    vm.settle(op, result);
                }
            });
        }
        let rejections = self.iso.borrow_mut().take_unhandled_rejections(self.task_timeout);
        for error in rejections {
            self.meta.unhandled_rejection(error);
        }
        self.notify.notify_waiters();
    }

    /// A host op ended: settle its promise and run the promise jobs that follow.
    fn settle(&self, op: super::OpId, result: Result<Value, MetaError>) {
        if self.is_discarded() {
            return;
        }
        self.last_progress.set(Instant::now());
        let settled = self.iso.borrow_mut().settle_op(RealmId::MAIN, op, result, self.task_timeout);
        match settled {
            Ok(()) | Err(EngineError::NotFound(_)) => {}
            Err(EngineError::Timeout(_)) => {
                // V8 dropped the queued jobs: the promises they would have settled never will.
                let stack = self.iso.borrow_mut().take_term_stack();
                self.discard(loop_timeout_error(self.task_timeout, &self.code, stack));
            }
            Err(EngineError::HeapLimit(_)) => {
                // The jobs were cut short, as by a deadline.
                self.discard(out_of_memory())
            }
            Err(error) => {
                tracing::debug!(plugin_config_id = self.plugin_config_id, %error, "settling a host promise failed")
            }
        }
        self.after_js();
    }

    /// The error of a failed call of `method` (`id`: the call, whose arguments as they were at the
    /// throw bootstrap.js kept).
    fn failed(&self, error: EngineError, id: u64, method: &str) -> PluginError {
        let js = |error: JsError| PluginError::Js { error, args_after: None };
        match error {
            EngineError::Js(error) => {
                let timed_out = error.message.starts_with("Script execution timed out after looping");
                let args_after = if timed_out { None } else { self.args_after(id) };
                PluginError::Js { error, args_after }
            }
            EngineError::Timeout(_) => {
                self.args_after(id);
                let stack = self.iso.borrow_mut().take_term_stack();
                js(loop_timeout_error(self.task_timeout, &self.code, stack))
            }
            EngineError::HeapLimit(_) => {
                // Over the GC budget the isolate lives on (its garbage goes at the next GC); at
                // the heap limit it is dead.
                if self.iso.borrow().is_dead() {
                    self.discard(out_of_memory());
                }
                self.args_after(id);
                js(out_of_memory())
            }
            EngineError::Refused(refused) => {
                self.args_after(id);
                js(refused_error(&format!("the value {method} returned"), &refused))
            }
            EngineError::NotFound(_) => {
                PluginError::MethodNotFound { plugin_config_id: self.plugin_config_id, method: method.to_string() }
            }
            other => js(JsError::new("Error", other.to_string())),
        }
    }

    /// The arguments of call `id` as they were when it threw (then forgotten).
    fn args_after(&self, id: u64) -> Option<Vec<Value>> {
        if self.is_discarded() {
            return None;
        }
        match self.enter("argsAfter", &[json!(id)]) {
            Ok(Outcome::Done(Value::Array(args))) => Some(args),
            _ => None,
        }
    }

    async fn load(self: &Rc<Self>, options: &PoolOptions) -> Result<(), PluginError> {
        let load_error = |vm: &VmInner, e: EngineError| match vm.failed(e, 0, "setupPlugin") {
            PluginError::Js { error, .. } => PluginError::Js { error, args_after: None },
            other => other,
        };
        let attachments: Vec<Value> = self
            .meta
            .attachments()
            .iter()
            .map(|a| {
                json!({
                    "key": a.key,
                    "content_type": a.content_type,
                    "file_name": a.file_name,
                    "contents": bin_string(&a.contents),
                })
            })
            .collect();
        let setup = [
            json!(PRELUDE),
            self.meta.config(),
            Value::Array(attachments),
            json!(options.test_env),
            json!(options.test_console_file.is_some()),
        ];
        self.enter("setup", &setup).map_err(|e| load_error(self, e))?;
        let started = Instant::now();
        let code = [json!(self.code.code), json!(self.code.is_module), json!(VIRTUAL_FILENAME)];
        match self.enter("load", &code).map_err(|e| load_error(self, e))? {
            Outcome::Done(_) => {}
            Outcome::Pending(call) => {
                // Top-level await in an ES module: wait like any call.
                let deadline = started + self.task_timeout;
                self.wait(call, 0, CallKind::Method, "setupPlugin", started, deadline).await?;
            }
        }
        let found = match self.enter("discover", &[]).map_err(|e| load_error(self, e))? {
            Outcome::Done(found) => found,
            Outcome::Pending(_) => Value::Null,
        };
        self.store_exports(&found);
        Ok(())
    }

    fn store_exports(&self, found: &Value) {
        let names = |key: &str| -> Vec<String> {
            found
                .get(key)
                .and_then(Value::as_array)
                .map_or_else(Vec::new, |list| list.iter().filter_map(|n| n.as_str().map(str::to_string)).collect())
        };
        let functions = names("functions");
        let jobs = names("jobs");
        let mut callable: HashSet<String> = functions.iter().cloned().collect();
        callable.extend(names("internal"));
        *self.callable.borrow_mut() = callable;
        *self.jobs.borrow_mut() = jobs.iter().cloned().collect();
        let has_metrics = found.get("hasMetrics").and_then(Value::as_bool).unwrap_or(false);
        let metrics = found.get("metrics").cloned().filter(|_| has_metrics);
        *self.exports.borrow_mut() = PluginExports { functions, jobs, metrics };
    }

    /// Calls an exported function (or `jobs.<name>`) with `args` and `meta`, and waits for its
    /// result under the limits of `kind`.
    pub async fn call(self: &Rc<Self>, method: &str, args: CallArgs, kind: CallKind) -> Result<Value, PluginError> {
        if method == META_GLOBAL_GET || method == crate::plugins::runtime::META_GLOBAL_SET {
            return self.meta_global(method, args.to_values());
        }
        let known = match method.strip_prefix("jobs.") {
            Some(job) => self.jobs.borrow().contains(job),
            None => self.callable.borrow().contains(method),
        };
        if !known {
            return Err(PluginError::MethodNotFound {
                plugin_config_id: self.plugin_config_id,
                method: method.to_string(),
            });
        }
        // Errors name the plugin's method, as the reference's guard does.
        let name = if method == PROCESS_EVENT_TRACKED { "processEvent" } else { method };
        if let Some(error) = self.discard_error() {
            return Err(PluginError::Js { error, args_after: None });
        }
        let started = Instant::now();
        let deadline = started + self.task_timeout;
        let id = self.fresh_id();
        // The bootstrap's `call(id, method, args)`, its argument list written as text around the
        // arguments' own (already JSON when the caller made them so).
        let entered = args.to_json_array().map_err(|e| EngineError::Internal(e.to_string())).and_then(|args| {
            let method = serde_json::to_string(method).map_err(|e| EngineError::Internal(e.to_string()))?;
            self.enter_text("call", &format!("[{id},{method},{args}]"))
        });
        match entered {
            Ok(Outcome::Done(value)) => Ok(value),
            Ok(Outcome::Pending(call)) => self.wait(call, id, kind, name, started, deadline).await,
            Err(error) => Err(self.failed(error, id, name)),
        }
    }

    /// Waits for pending call `call` (bootstrap id `id`) to settle.
    async fn wait(
        &self,
        call: super::CallId,
        id: u64,
        kind: CallKind,
        method: &str,
        started: Instant,
        deadline: Instant,
    ) -> Result<Value, PluginError> {
        let timeout = self.task_timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(error) = self.discard_error() {
                if !self.iso.borrow().is_dead() {
                    self.iso.borrow_mut().forget(call);
                }
                return Err(PluginError::Js { error, args_after: None });
            }
            let polled = self.iso.borrow_mut().poll(RealmId::MAIN, call);
            match polled {
                Ok(Outcome::Pending(_)) => {}
                Ok(Outcome::Done(value)) => {
                    self.after_js();
                    return Ok(value);
                }
                Err(error) => {
                    self.after_js();
                    return Err(self.failed(error, id, method));
                }
            }
            let wake_at = match kind {
                CallKind::Method => deadline,
                CallKind::Task => self.last_progress.get().max(started) + timeout,
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake_at.into()) => {
                    let expired = match kind {
                        CallKind::Method => true,
                        CallKind::Task => Instant::now() >= self.last_progress.get().max(started) + timeout,
                    };
                    if expired {
                        // The plugin's promise keeps running in the background (like the
                        // reference); its later mutations are not read back.
                        self.iso.borrow_mut().forget(call);
                        self.args_after(id);
                        return Err(PluginError::Js { error: promise_timeout_error(timeout, method), args_after: None });
                    }
                }
            }
        }
    }

    /// Reads `meta.global` (as JSON) or sets one key of it (see `quickjs.rs`).
    fn meta_global(&self, method: &str, args: Vec<Value>) -> Result<Value, PluginError> {
        let set = method != META_GLOBAL_GET;
        let key = args.first().cloned().unwrap_or(Value::Null);
        let value = args.get(1).cloned().unwrap_or(Value::Null);
        match self.enter("metaGlobal", &[json!(set), key, value]) {
            Ok(Outcome::Done(value)) => Ok(value),
            Ok(Outcome::Pending(_)) => Ok(Value::Null),
            Err(error) => Err(self.failed(error, 0, method)),
        }
    }

    /// Heap used by this VM's isolate in bytes (for the memory benchmark and stats).
    pub fn memory_used(&self) -> i64 {
        let iso = self.iso.borrow();
        iso.collect_garbage();
        i64::try_from(iso.heap().used).unwrap_or(i64::MAX)
    }
}

/// For `benches/v8_engine.rs` only: the other isolation unit, several plugin configs as realms
/// (contexts) of one isolate, each run through the same bootstrap, prelude and plugin loading as
/// a [`VmInner`] (sync plugin code only; no meta API behind `meta`).
#[doc(hidden)]
pub mod bench {
    use super::*;

    struct NoMeta;

    #[async_trait::async_trait]
    impl MetaBindings for NoMeta {
        async fn call(&self, _name: &str, _args: Vec<Value>) -> Result<Value, MetaError> {
            Ok(Value::Null)
        }
    }

    /// An isolate with the VM's host functions (in every realm, now and later).
    pub fn isolate(options: V8Options, timeout: Duration) -> Result<V8Isolate, EngineError> {
        let mut iso = V8Isolate::new(options)?;
        let probe = iso.heap_probe();
        host::v8::install(&mut iso, Rc::new(move || probe.headroom()), None)?;
        let meta: Arc<dyn MetaBindings> = Arc::new(NoMeta);
        install_async(&mut iso, &meta, next_vm_id(), &None, timeout)?;
        Ok(iso)
    }

    /// Runs the bootstrap, the prelude and `code` (a classic script) in `realm`, as
    /// [`VmInner::create`] does in its isolate's main realm.
    pub fn load_plugin(iso: &mut V8Isolate, realm: RealmId, code: &str, timeout: Duration) -> Result<(), EngineError> {
        iso.load_in(realm, super::super::SourceKind::FunctionBody, BOOTSTRAP, "bootstrap", timeout)?;
        let setup = [json!(PRELUDE), json!({}), json!([]), json!(false), json!(false)];
        iso.call_in(realm, "setup", &setup, timeout)?;
        iso.call_in(realm, "load", &[json!(code), json!(false), json!(VIRTUAL_FILENAME)], timeout)?;
        iso.call_in(realm, "discover", &[], timeout)?;
        Ok(())
    }

    /// Calls the plugin's `method` in `realm` through the bootstrap (`meta` appended).
    pub fn call(
        iso: &mut V8Isolate,
        realm: RealmId,
        id: u64,
        method: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Outcome, EngineError> {
        iso.call_in(realm, "call", &[json!(id), json!(method), Value::Array(args)], timeout)
    }
}
