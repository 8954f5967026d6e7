//! One sandboxed VM: its own QuickJS runtime (own heap, hard memory limit, stack limit), the
//! sandbox globals (`prelude.js`), the plugin code, its discovered exports, and the machinery
//! that runs one call to completion on the worker thread: the CPU deadline through the
//! interrupt handler, host promises settled from Rust futures, and the reference's timeout
//! errors (30 §7).
//!
//! Not here: which thread runs what (`pool.rs`), what meta calls do (`MetaBindings`).
//!
//! Invariants: JS is entered only through [`VmInner::enter`] (never across an `.await`), and the
//! runtime-level job queue is drained only outside of it; every `Persistent` lives in
//! `VmInner::state`, which is emptied before the runtime is freed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rquickjs::function::{Args, Opt};
use rquickjs::loader::{Loader, Resolver};
use rquickjs::module::Declared;
use rquickjs::promise::PromiseState;
use rquickjs::{
    Array, ArrayBuffer, Context, Ctx, Error as QjsError, Exception, Function, Module, Object, Persistent, Promise,
    Runtime, Value as JsValue,
};
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::convert::{array_items, from_js, from_js_checked, to_js, Budget, Refused};
use super::host::{self, bytes_of};
use super::timeouts::{self, discarded_error, promise_timeout_error, refused_error};
use super::{next_vm_id, PluginConfigId, PoolOptions, VmId};
use super::{
    CallKind, FetchRequest, FetchResponse, JsError, MetaBindings, MetaError, PluginError, PluginExports, Thrown,
};
use crate::plugins::transform::{TransformedCode, VIRTUAL_FILENAME};

const PRELUDE: &str = include_str!("prelude.js");

/// Pseudo-methods for [`super::WorkerPool::call`]: read `meta.global` / set `meta.global[key]`.
pub const META_GLOBAL_GET: &str = "@meta.global.get";
pub const META_GLOBAL_SET: &str = "@meta.global.set";
/// Pseudo-method: `processEvent`, resolving to `[result, result === event]` (the reference adds
/// `$plugins_*` to the object it passed in, which shows only when a plugin returns that object).
pub const PROCESS_EVENT_TRACKED: &str = "@processEvent.tracked";

/// The modules plugin code may import that the prelude itself provides (reference 30 §5.2; the
/// facades of `runtime/modules` come on top, see [`is_allowed_import`]).
pub const ALLOWED_IMPORTS: &[&str] =
    &["node-fetch", "@posthog/plugin-scaffold", "@posthog/plugin-contrib", "crypto", "url", "zlib", "jsonwebtoken"];

/// The test-only module (exists when `PoolOptions::test_console_file` is set).
pub const TEST_CONSOLE_MODULE: &str = "test-utils/write-to-file";

/// Whether `module` is importable from plugin code: built into the prelude, or a facade
/// (`runtime/modules`).
pub fn is_allowed_import(module: &str) -> bool {
    ALLOWED_IMPORTS.contains(&module) || super::modules::is_importable(module)
}

fn base_instant() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn instant_ns(at: Instant) -> u64 {
    at.saturating_duration_since(base_instant()).as_nanos() as u64
}

/// The CPU deadline shared with the interrupt handler (which must be `Send`).
struct Clock {
    deadline_ns: AtomicU64,
    fired: AtomicBool,
    /// Set when the pool abandoned this VM's thread as stalled: every interrupt check fires from
    /// then on, so whatever JS still runs there stops at its next check, for good.
    abandoned: Arc<AtomicBool>,
}

impl Clock {
    const NONE: u64 = u64::MAX;
    fn set(&self, deadline: Instant) {
        self.fired.store(false, Ordering::Relaxed);
        self.deadline_ns.store(instant_ns(deadline), Ordering::Relaxed);
    }
    fn clear(&self) {
        self.deadline_ns.store(Self::NONE, Ordering::Relaxed);
    }
}

/// What error conversion needs to know about the VM.
#[derive(Clone)]
struct Diag {
    timeout: Duration,
    /// The code the plugin runs (to name the loop that timed out).
    code: Arc<TransformedCode>,
}

fn loop_timeout_error(diag: &Diag, stack: Option<String>) -> JsError {
    timeouts::loop_timeout_error(diag.timeout, &diag.code, stack)
}

fn error_from_value<'js>(ctx: &Ctx<'js>, value: &JsValue<'js>, diag: &Diag, interrupted: bool) -> JsError {
    let mut error = JsError::default();
    if let Some(object) = value.as_object() {
        error.name = object.get::<_, Option<String>>("name").ok().flatten().unwrap_or_default();
        error.message = object.get::<_, Option<String>>("message").ok().flatten().unwrap_or_default();
        error.stack = object.get::<_, Option<String>>("stack").ok().flatten();
        error.caller = object.get::<_, Option<String>>("caller").ok().flatten();
        error.retry = object.get::<_, Option<bool>>("__posthogRetryError").ok().flatten().unwrap_or(false);
        if error.name.is_empty() && error.message.is_empty() && !value.is_error() {
            error.message = from_js(value).to_string();
        }
    } else if value.is_null() && interrupted {
        error.name = "InternalError".into();
        error.message = "interrupted".into();
    } else if value.is_null() {
        // QuickJS throws `null` when the heap is so full that even its "out of memory" error
        // cannot be allocated. (A plugin's own `throw null` reads the same; that is rare enough.)
        error.name = "InternalError".into();
        error.message = "out of memory".into();
    } else {
        error.thrown = if value.is_string() { Thrown::String } else { Thrown::Primitive };
        error.message = ctx
            .globals()
            .get::<_, Function>("String")
            .and_then(|f| f.call::<_, String>((value.clone(),)))
            .unwrap_or_default();
    }
    if error.name == "InternalError" && error.message == "interrupted" {
        return loop_timeout_error(diag, error.stack);
    }
    error
}

fn caught<'js>(ctx: &Ctx<'js>, err: QjsError, diag: &Diag, interrupted: bool) -> JsError {
    match err {
        QjsError::Exception => error_from_value(ctx, &ctx.catch(), diag, interrupted),
        other => JsError { name: "Error".into(), message: other.to_string(), ..JsError::default() },
    }
}

fn js_error_value<'js>(ctx: &Ctx<'js>, error: &JsError) -> rquickjs::Result<JsValue<'js>> {
    let make: Function = ctx.globals().get("Error")?;
    let object: Object = make.call((error.message.as_str(),))?;
    object.set("name", error.name.as_str())?;
    if let Some(caller) = &error.caller {
        object.set("caller", caller.as_str())?;
    }
    Ok(object.into_value())
}

/// What a finished host operation hands back to JS.
enum HostOk {
    Json(Value),
    Fetch(FetchResponse),
}

enum HostErr {
    Meta(MetaError),
    Timeout,
}

/// A call whose promise has not settled yet.
struct PendingCall {
    promise: Persistent<Promise<'static>>,
    args: Vec<Persistent<JsValue<'static>>>,
}

#[derive(Default)]
struct State {
    ops: HashMap<u64, (Persistent<Function<'static>>, Persistent<Function<'static>>)>,
    calls: HashMap<u64, PendingCall>,
    functions: HashMap<String, Persistent<Function<'static>>>,
    jobs: HashMap<String, Persistent<Function<'static>>>,
    meta: Option<Persistent<JsValue<'static>>>,
}

/// Unhandled rejections noted by the tracker; reported after the job queue drained (a handler
/// attached later in the same turn cancels the report, like Node's `unhandledRejection`).
type Rejections = Arc<Mutex<Vec<(u64, JsError)>>>;

pub struct VmInner {
    pub plugin_config_id: PluginConfigId,
    /// This VM to the host side of its calls (facades' connections are closed when it drops).
    vm_id: VmId,
    // `state` holds JS values: it is declared (and so dropped) before the context and runtime.
    state: RefCell<State>,
    ctx: Context,
    rt: Runtime,
    clock: Arc<Clock>,
    rejections: Rejections,
    meta: Arc<dyn MetaBindings>,
    main: Option<Handle>,
    task_timeout: Duration,
    diag: Diag,
    notify: Notify,
    last_progress: Cell<Instant>,
    /// Interrupts that escaped promise jobs (no promise carries them): count and last error.
    interrupts: Cell<u64>,
    last_interrupt: RefCell<Option<JsError>>,
    /// Set when promise jobs were still queued after a call's deadline (they would run on the
    /// next call's time, e.g. a job that queues itself and spins): the VM runs no more JS, its
    /// waiting calls fail with this error, and the pool builds a fresh one.
    discarded: RefCell<Option<JsError>>,
    next_id: Cell<u64>,
    self_weak: Weak<VmInner>,
    pub exports: RefCell<PluginExports>,
}

impl Drop for VmInner {
    fn drop(&mut self) {
        // Persistent values must go before the runtime that owns them.
        let state = std::mem::take(self.state.get_mut());
        drop(state);
        self.meta.vm_closed(self.vm_id);
    }
}

fn promise_key(value: &JsValue<'_>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Resolves only allow-listed bare names; anything else fails with the reference's message.
struct ImportResolver;

impl Resolver for ImportResolver {
    fn resolve(&mut self, ctx: &Ctx<'_>, _base: &str, name: &str) -> rquickjs::Result<String> {
        if is_allowed_import(name) || name == TEST_CONSOLE_MODULE {
            Ok(name.to_string())
        } else {
            Err(Exception::throw_message(ctx, &crate::plugins::transform::forbidden_import_message(name)))
        }
    }
}

/// Serves an allowed module as a tiny ES module re-exporting `__pluginHostImports[name]`.
struct ImportLoader;

impl Loader for ImportLoader {
    fn load<'js>(&mut self, ctx: &Ctx<'js>, name: &str) -> rquickjs::Result<Module<'js, Declared>> {
        let modules: Object = ctx.globals().get("__pluginHostImports")?;
        let module: Object = modules.get(name)?;
        let keys: Vec<String> = module
            .keys::<String>()
            .filter_map(|k| k.ok())
            .filter(|k| {
                k != "default" && !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
            })
            .collect();
        let quoted = serde_json::to_string(name).map_err(|e| Exception::throw_message(ctx, &e.to_string()))?;
        let mut source = format!("const m = globalThis.__pluginHostImports[{quoted}];\nexport default m;\n");
        // One declaration per name: QuickJS does not bind names exported by destructuring.
        for key in keys {
            source.push_str(&format!("export const {key} = m.{key};\n"));
        }
        Module::declare(ctx.clone(), name, source)
    }
}

pub type Vm = Rc<VmInner>;

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
        let setup_error = |e: QjsError| PluginError::Js {
            error: JsError {
                name: "Error".into(),
                message: format!("Could not create the plugin VM: {e}"),
                ..JsError::default()
            },
            args_after: None,
        };
        let rt = Runtime::new().map_err(setup_error)?;
        rt.set_memory_limit(options.memory_limit_bytes);
        rt.set_max_stack_size(options.max_stack_bytes);
        let clock =
            Arc::new(Clock { deadline_ns: AtomicU64::new(Clock::NONE), fired: AtomicBool::new(false), abandoned });
        let handler_clock = clock.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            if handler_clock.abandoned.load(Ordering::Relaxed) {
                handler_clock.fired.store(true, Ordering::Relaxed);
                return true;
            }
            let deadline = handler_clock.deadline_ns.load(Ordering::Relaxed);
            if deadline != Clock::NONE && instant_ns(Instant::now()) > deadline {
                handler_clock.fired.store(true, Ordering::Relaxed);
                return true;
            }
            false
        })));
        rt.set_loader(ImportResolver, ImportLoader);
        let rejections: Rejections = Arc::default();
        let tracked = rejections.clone();
        let diag = Diag { timeout: options.task_timeout, code: code.clone() };
        let tracker_diag = diag.clone();
        rt.set_host_promise_rejection_tracker(Some(Box::new(move |ctx, promise, reason, is_handled| {
            let key = promise_key(&promise);
            // Reading the error runs plugin code (`stack` getters, `Error.prepareStackTrace`),
            // which may reject more promises and re-enter here: never hold the lock meanwhile.
            let error = if is_handled { None } else { Some(error_from_value(&ctx, &reason, &tracker_diag, false)) };
            let Ok(mut list) = tracked.lock() else { return };
            match error {
                None => list.retain(|(k, _)| *k != key),
                Some(error) => list.push((key, error)),
            }
        })));
        let ctx = Context::full(&rt).map_err(setup_error)?;
        let vm = Rc::new_cyclic(|weak| VmInner {
            plugin_config_id,
            vm_id: next_vm_id(),
            state: RefCell::default(),
            ctx,
            rt,
            clock,
            rejections,
            meta,
            main,
            task_timeout: options.task_timeout,
            diag,
            notify: Notify::new(),
            last_progress: Cell::new(Instant::now()),
            interrupts: Cell::new(0),
            last_interrupt: RefCell::new(None),
            discarded: RefCell::new(None),
            next_id: Cell::new(1),
            self_weak: weak.clone(),
            exports: RefCell::default(),
        });
        vm.load(code, options).await?;
        Ok(vm)
    }

    fn fresh_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Runs `f` inside the context with the CPU deadline armed.
    fn enter<R>(&self, deadline: Instant, f: impl for<'js> FnOnce(Ctx<'js>) -> R) -> (R, bool) {
        self.clock.set(deadline);
        let result = self.ctx.with(f);
        self.clock.clear();
        (result, self.clock.fired.load(Ordering::Relaxed))
    }

    /// Whether this VM may no longer run JS (discarded after a deadline, or its thread abandoned).
    pub fn is_discarded(&self) -> bool {
        self.discarded.borrow().is_some() || self.clock.abandoned.load(Ordering::Relaxed)
    }

    fn discard(&self, error: JsError) {
        tracing::warn!(plugin_config_id = self.plugin_config_id, %error, "plugin VM discarded");
        self.discarded.borrow_mut().get_or_insert(error);
    }

    /// Runs queued promise jobs until the queue is empty or `deadline` (the deadline of the call
    /// that queued them) passes. Jobs left over at the deadline would run on the next call's time
    /// (a job that re-queues itself and spins never ends), so the VM is discarded instead.
    fn drain_jobs(&self, deadline: Instant) {
        if self.is_discarded() {
            self.notify.notify_waiters();
            return;
        }
        self.clock.set(deadline);
        loop {
            if Instant::now() > deadline || self.clock.abandoned.load(Ordering::Relaxed) {
                if self.rt.is_job_pending() {
                    let error =
                        self.last_interrupt.borrow().clone().unwrap_or_else(|| discarded_error(self.task_timeout));
                    self.discard(error);
                }
                break;
            }
            match self.rt.execute_pending_job() {
                Ok(true) => {}
                Ok(false) => break,
                Err(exception) => {
                    // rquickjs 0.9 wraps the job's context without taking a reference, yet
                    // releases one when the wrapper drops: take the reference it will give back.
                    // SAFETY: the pointer is a live context of this runtime (QuickJS just ran a
                    // job in it), and we are on the runtime's thread outside any `with`.
                    unsafe { rquickjs::qjs::JS_DupContext(exception.0.as_raw().as_ptr()) };
                    // An error escaping a job (the interrupt inside a promise continuation): the
                    // promise it belonged to stays pending, so the calls waiting then fail with it.
                    let interrupted = self.clock.fired.load(Ordering::Relaxed);
                    let error = exception.0.with(|ctx| error_from_value(&ctx, &ctx.catch(), &self.diag, interrupted));
                    tracing::debug!(plugin_config_id = self.plugin_config_id, %error, "plugin promise job failed");
                    if interrupted {
                        // The deadline is spent: no further job runs on it (the loop's check
                        // above discards the VM if any is left).
                        self.interrupts.set(self.interrupts.get() + 1);
                        *self.last_interrupt.borrow_mut() = Some(error);
                    }
                }
            }
        }
        self.clock.clear();
        self.report_rejections();
        self.notify.notify_waiters();
    }

    fn report_rejections(&self) {
        let pending = match self.rejections.lock() {
            Ok(mut list) => std::mem::take(&mut *list),
            Err(_) => return,
        };
        for (_, error) in pending {
            self.meta.unhandled_rejection(error);
        }
    }

    async fn load(self: &Rc<Self>, code: &TransformedCode, options: &PoolOptions) -> Result<(), PluginError> {
        let test_env = options.test_env;
        let test_console = options.test_console_file.clone();
        let timeout = self.task_timeout;
        let deadline = Instant::now() + timeout + Duration::from_millis(1);
        let interrupts_before = self.interrupts.get();
        let config = self.meta.config();
        let attachments = self.meta.attachments();
        let weak = self.self_weak.clone();
        let (result, fired) = self.enter(deadline, |ctx| -> Result<Option<Persistent<Promise<'static>>>, JsError> {
            let run = || -> rquickjs::Result<Option<Persistent<Promise<'static>>>> {
                let host = Object::new(ctx.clone())?;
                host::install(&ctx, &host)?;
                install_async(&ctx, &host, weak)?;
                let has_test_console = test_console.is_some();
                if let Some(path) = test_console {
                    host::install_test_console(&ctx, &host, path)?;
                }
                // A module named `prelude`, so its stack frames are told apart from plugin code.
                let (prelude, _) =
                    Module::declare(ctx.clone(), "prelude", format!("export default {PRELUDE}"))?.eval()?;
                let setup: Function = prelude.namespace()?.get("default")?;
                let attachment_list = Array::new(ctx.clone())?;
                for (i, a) in attachments.iter().enumerate() {
                    let item = Object::new(ctx.clone())?;
                    item.set("key", a.key.as_str())?;
                    item.set("content_type", a.content_type.as_str())?;
                    item.set("file_name", a.file_name.as_str())?;
                    item.set("contents", ArrayBuffer::new_copy(ctx.clone(), &a.contents)?)?;
                    attachment_list.set(i, item)?;
                }
                let helpers: Object =
                    setup.call((host, to_js(&ctx, &config)?, attachment_list, test_env, has_test_console))?;
                let meta: JsValue = helpers.get("meta")?;
                let discover: Function = helpers.get("discover")?;
                self.state.borrow_mut().meta = Some(Persistent::save(&ctx, meta));
                let (namespace, evaluation) = if code.is_module {
                    let declared = Module::declare(ctx.clone(), VIRTUAL_FILENAME, code.code.as_str())?;
                    let (module, promise) = declared.eval()?;
                    (module.namespace()?.into_value(), Some(promise))
                } else {
                    ctx.eval::<JsValue, _>(code.code.as_str())?;
                    (JsValue::new_undefined(ctx.clone()), None)
                };
                let found: Object = discover.call((namespace,))?;
                self.store_exports(&ctx, &found)?;
                Ok(evaluation.map(|p| Persistent::save(&ctx, p)))
            };
            run().map_err(|e| caught(&ctx, e, &self.diag, false))
        });
        let evaluation = result.map_err(|mut error| {
            if fired && !error.message.starts_with("Script execution timed out") {
                error = loop_timeout_error(&self.diag, error.stack);
            }
            PluginError::Js { error, args_after: None }
        })?;
        self.drain_jobs(deadline);
        if let Some(promise) = evaluation {
            // Top-level await in an ES module: wait like any call, then rediscover exports.
            let id = self.fresh_id();
            self.state.borrow_mut().calls.insert(id, PendingCall { promise, args: Vec::new() });
            self.wait(id, CallKind::Method, "setupPlugin", Instant::now(), deadline, interrupts_before).await?;
        }
        Ok(())
    }

    fn store_exports<'js>(&self, ctx: &Ctx<'js>, found: &Object<'js>) -> rquickjs::Result<()> {
        let mut exports = PluginExports::default();
        let mut state = self.state.borrow_mut();
        let functions: Object = found.get("functions")?;
        for entry in functions.props::<String, Function>() {
            let (name, function) = entry?;
            exports.functions.push(name.clone());
            state.functions.insert(name, Persistent::save(ctx, function));
        }
        let jobs: Object = found.get("jobs")?;
        for entry in jobs.props::<String, Function>() {
            let (name, function) = entry?;
            exports.jobs.push(name.clone());
            state.jobs.insert(name, Persistent::save(ctx, function));
        }
        // Server-side helpers: callable, not exports of the plugin.
        let internal: Object = found.get("internal")?;
        for entry in internal.props::<String, Function>() {
            let (name, function) = entry?;
            state.functions.insert(name, Persistent::save(ctx, function));
        }
        let metrics: JsValue = found.get("metrics")?;
        exports.metrics = if metrics.is_undefined() { None } else { Some(from_js(&metrics)) };
        *self.exports.borrow_mut() = exports;
        Ok(())
    }

    /// Calls an exported function (or `jobs.<name>`) with `args` and `meta`, and waits for its
    /// result under the limits of `kind`.
    pub async fn call(self: &Rc<Self>, method: &str, args: Vec<Value>, kind: CallKind) -> Result<Value, PluginError> {
        if method == META_GLOBAL_GET || method == META_GLOBAL_SET {
            return self.meta_global(method, args);
        }
        let function = {
            let state = self.state.borrow();
            let found = match method.strip_prefix("jobs.") {
                Some(job) => state.jobs.get(job),
                None => state.functions.get(method),
            };
            found.cloned()
        };
        let Some(function) = function else {
            return Err(PluginError::MethodNotFound {
                plugin_config_id: self.plugin_config_id,
                method: method.to_string(),
            });
        };
        // Errors name the plugin's method, as the reference's guard does.
        let method = if method == PROCESS_EVENT_TRACKED { "processEvent" } else { method };
        if let Some(error) = self.discarded.borrow().clone() {
            return Err(PluginError::Js { error, args_after: None });
        }
        let meta = self.state.borrow().meta.clone();
        let timeout = self.task_timeout;
        let started = Instant::now();
        let deadline = started + timeout;
        let interrupts_before = self.interrupts.get();
        let id = self.fresh_id();
        let refused = |refused: Refused| PluginError::Js {
            error: refused_error(&format!("the value {method} returned"), &refused),
            args_after: None,
        };
        let (outcome, _) = self.enter(deadline, |ctx| -> Result<Option<Value>, PluginError> {
            let mut js_args = Vec::with_capacity(args.len());
            let mut call_args = Args::new(ctx.clone(), args.len() + 1);
            let prepared = (|| -> rquickjs::Result<Function> {
                for arg in &args {
                    let value = to_js(&ctx, arg)?;
                    js_args.push(value.clone());
                    call_args.push_arg(value)?;
                }
                if let Some(meta) = meta {
                    call_args.push_arg(meta.restore(&ctx)?)?;
                }
                function.restore(&ctx)
            })();
            let function = prepared
                .map_err(|e| PluginError::Js { error: caught(&ctx, e, &self.diag, false), args_after: None })?;
            match function.call_arg::<JsValue>(call_args) {
                Ok(result) => {
                    if let Some(promise) = result.as_promise() {
                        match promise.state() {
                            PromiseState::Resolved => match promise.result::<JsValue>().and_then(|r| r.ok()) {
                                Some(v) => {
                                    from_js_checked(&v, &mut Budget::new(Some(deadline))).map(Some).map_err(refused)
                                }
                                None => Ok(Some(Value::Null)),
                            },
                            _ => {
                                // Mark it handled: its rejection is this call's error, not an
                                // unhandled one.
                                let noop = Function::new(ctx.clone(), || ());
                                if let (Ok(catch), Ok(noop)) = (promise.catch(), noop) {
                                    let _ = catch.call::<_, JsValue>((rquickjs::function::This(promise.clone()), noop));
                                }
                                let pending = PendingCall {
                                    promise: Persistent::save(&ctx, promise.clone()),
                                    args: js_args.into_iter().map(|v| Persistent::save(&ctx, v)).collect(),
                                };
                                self.state.borrow_mut().calls.insert(id, pending);
                                Ok(None)
                            }
                        }
                    } else {
                        from_js_checked(&result, &mut Budget::new(Some(deadline))).map(Some).map_err(refused)
                    }
                }
                Err(e) => {
                    let interrupted = self.clock.fired.load(Ordering::Relaxed);
                    let error = caught(&ctx, e, &self.diag, interrupted);
                    // The mutations made before the throw are kept, if they fit the budget.
                    let args_after = if interrupted {
                        None
                    } else {
                        let mut budget = Budget::new(Some(deadline));
                        js_args.iter().map(|a| from_js_checked(a, &mut budget)).collect::<Result<Vec<_>, _>>().ok()
                    };
                    Err(PluginError::Js { error, args_after })
                }
            }
        });
        let outcome = match outcome {
            Err(error) => {
                if self.clock.fired.load(Ordering::Relaxed) && self.rt.is_job_pending() {
                    // Jobs the interrupted call queued would run on the next call's time.
                    self.discard(error.js_error().cloned().unwrap_or_else(|| discarded_error(timeout)));
                }
                return Err(error);
            }
            Ok(outcome) => outcome,
        };
        self.drain_jobs(deadline);
        if let Some(error) = self.discarded.borrow().clone() {
            // This call's promise jobs ran to its deadline: whatever it returned is not taken.
            self.state.borrow_mut().calls.remove(&id);
            return Err(PluginError::Js { error, args_after: None });
        }
        match outcome {
            Some(value) => Ok(value),
            None => self.wait(id, kind, method, started, deadline, interrupts_before).await,
        }
    }

    /// Reads `meta.global` (as JSON) or sets one key of it, for server-side code that shares
    /// state with the plugin through it (the reference's historical export reads
    /// `global.timestampBoundariesForTeam`).
    fn meta_global(&self, method: &str, args: Vec<Value>) -> Result<Value, PluginError> {
        let meta = self.state.borrow().meta.clone();
        let (result, _) = self.enter(Instant::now() + self.task_timeout, |ctx| {
            let run = || -> rquickjs::Result<Value> {
                let Some(meta) = meta else { return Ok(Value::Null) };
                let meta_object: Object = meta.restore(&ctx)?.get()?;
                let global: Object = meta_object.get("global")?;
                if method == META_GLOBAL_GET {
                    return Ok(from_js(&global.into_value()));
                }
                let key = args.first().and_then(|k| k.as_str()).unwrap_or_default();
                let value = to_js(&ctx, args.get(1).unwrap_or(&Value::Null))?;
                global.set(key, value)?;
                Ok(Value::Null)
            };
            run().map_err(|e| PluginError::Js { error: caught(&ctx, e, &self.diag, false), args_after: None })
        });
        result
    }

    /// Waits for pending call `id` to settle.
    async fn wait(
        &self,
        id: u64,
        kind: CallKind,
        method: &str,
        started: Instant,
        deadline: Instant,
        interrupts_before: u64,
    ) -> Result<Value, PluginError> {
        let timeout = self.task_timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(error) = self.discarded.borrow().clone() {
                self.state.borrow_mut().calls.remove(&id);
                return Err(PluginError::Js { error, args_after: None });
            }
            let read_by = match kind {
                CallKind::Method => deadline,
                CallKind::Task => Instant::now() + timeout,
            };
            if let Some(result) = self.settled(id, method, read_by) {
                return result;
            }
            if self.interrupts.get() != interrupts_before {
                if let Some(error) = self.last_interrupt.borrow().clone() {
                    self.state.borrow_mut().calls.remove(&id);
                    return Err(PluginError::Js { error, args_after: None });
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
                        self.state.borrow_mut().calls.remove(&id);
                        return Err(PluginError::Js { error: promise_timeout_error(timeout, method), args_after: None });
                    }
                }
            }
        }
    }

    fn settled(&self, id: u64, method: &str, deadline: Instant) -> Option<Result<Value, PluginError>> {
        let (promise, args) = {
            let state = self.state.borrow();
            let call = state.calls.get(&id)?;
            (call.promise.clone(), call.args.clone())
        };
        let (result, _) = self.enter(deadline, |ctx| -> Option<Result<Value, PluginError>> {
            let promise = promise.restore(&ctx).ok()?;
            match promise.state() {
                PromiseState::Pending => None,
                PromiseState::Resolved => {
                    let value: JsValue = promise
                        .result::<JsValue>()
                        .and_then(|r| r.ok())
                        .unwrap_or_else(|| JsValue::new_undefined(ctx.clone()));
                    Some(from_js_checked(&value, &mut Budget::new(Some(deadline))).map_err(|refused| PluginError::Js {
                        error: refused_error(&format!("the value {method} returned"), &refused),
                        args_after: None,
                    }))
                }
                PromiseState::Rejected => {
                    let reason = match promise.result::<JsValue>() {
                        Some(Err(QjsError::Exception)) => ctx.catch(),
                        Some(Ok(v)) => v,
                        _ => JsValue::new_undefined(ctx.clone()),
                    };
                    let error = error_from_value(&ctx, &reason, &self.diag, false);
                    let timed_out = error.message.starts_with("Script execution timed out after looping");
                    let args_after = if timed_out {
                        None
                    } else {
                        let mut budget = Budget::new(Some(deadline));
                        args.into_iter()
                            .filter_map(|a| a.restore(&ctx).ok())
                            .map(|v| from_js_checked(&v, &mut budget))
                            .collect::<Result<Vec<_>, _>>()
                            .ok()
                    };
                    Some(Err(PluginError::Js { error, args_after }))
                }
            }
        });
        if result.is_some() {
            self.state.borrow_mut().calls.remove(&id);
        }
        result
    }

    /// Starts a host operation and returns the JS promise it settles.
    fn spawn_op<'js, F>(&self, ctx: &Ctx<'js>, limit: Option<Duration>, op: F) -> rquickjs::Result<Promise<'js>>
    where
        F: Future<Output = Result<HostOk, MetaError>> + Send + 'static,
    {
        let (promise, resolve, reject) = Promise::new(ctx)?;
        let id = self.fresh_id();
        self.state.borrow_mut().ops.insert(id, (Persistent::save(ctx, resolve), Persistent::save(ctx, reject)));
        let weak = self.self_weak.clone();
        let main = self.main.clone();
        tokio::task::spawn_local(async move {
            let run = async move {
                match main {
                    Some(handle) => handle.spawn(op).await.unwrap_or_else(|e| Err(MetaError::new(e.to_string()))),
                    None => op.await,
                }
            };
            let result = match limit {
                Some(limit) => match tokio::time::timeout(limit, run).await {
                    Ok(r) => r.map_err(HostErr::Meta),
                    Err(_) => Err(HostErr::Timeout),
                },
                None => run.await.map_err(HostErr::Meta),
            };
            if let Some(vm) = weak.upgrade() {
                vm.settle_op(id, result);
            }
        });
        Ok(promise)
    }

    fn settle_op(&self, id: u64, result: Result<HostOk, HostErr>) {
        let Some((resolve, reject)) = self.state.borrow_mut().ops.remove(&id) else { return };
        if self.is_discarded() {
            return;
        }
        self.last_progress.set(Instant::now());
        let timeout = self.task_timeout;
        let deadline = Instant::now() + timeout;
        self.enter(deadline, |ctx| {
            let outcome = (|| -> rquickjs::Result<()> {
                match result {
                    Ok(ok) => {
                        let value = match ok {
                            HostOk::Json(v) => to_js(&ctx, &v),
                            HostOk::Fetch(r) => fetch_response_to_js(&ctx, r),
                        };
                        match value {
                            Ok(value) => resolve.restore(&ctx)?.call::<_, ()>((value,)),
                            // The result could not be handed over (over the memory limit): the
                            // plugin's promise rejects with that error instead of hanging.
                            Err(QjsError::Exception) => {
                                let error = ctx.catch();
                                reject.restore(&ctx)?.call::<_, ()>((error,))
                            }
                            Err(other) => Err(other),
                        }
                    }
                    Err(err) => {
                        let error = match err {
                            HostErr::Meta(e) => JsError { name: e.name, message: e.message, ..JsError::default() },
                            HostErr::Timeout => promise_timeout_error(timeout, "host call"),
                        };
                        reject.restore(&ctx)?.call::<_, ()>((js_error_value(&ctx, &error)?,))
                    }
                }
            })();
            if let Err(e) = outcome {
                let error = caught(&ctx, e, &self.diag, false);
                tracing::debug!(plugin_config_id = self.plugin_config_id, %error, "settling a host promise failed");
            }
        });
        self.drain_jobs(deadline);
    }

    /// Heap usage of this VM in bytes (for the memory benchmark and stats).
    pub fn memory_used(&self) -> i64 {
        self.rt.run_gc();
        self.rt.memory_usage().memory_used_size
    }
}

fn fetch_response_to_js<'js>(ctx: &Ctx<'js>, response: FetchResponse) -> rquickjs::Result<JsValue<'js>> {
    let object = Object::new(ctx.clone())?;
    object.set("status", response.status)?;
    object.set("statusText", response.status_text)?;
    object.set("url", response.url)?;
    let headers = Array::new(ctx.clone())?;
    for (i, (k, v)) in response.headers.into_iter().enumerate() {
        let pair = Array::new(ctx.clone())?;
        pair.set(0, k)?;
        pair.set(1, v)?;
        headers.set(i, pair)?;
    }
    object.set("headers", headers)?;
    // Copied into the VM's heap: the body counts against the plugin's memory limit.
    let headroom = host::memory_headroom(ctx);
    if response.body.len() > headroom {
        return Err(Exception::throw_range(
            ctx,
            &format!(
                "The plugin server refused a response body of {} bytes: the plugin's memory has {headroom} bytes left",
                response.body.len()
            ),
        ));
    }
    object.set("body", host::buffer(ctx, response.body)?)?;
    Ok(object.into_value())
}

/// Host functions that start asynchronous work on behalf of the VM.
fn install_async<'js>(ctx: &Ctx<'js>, host: &Object<'js>, weak: Weak<VmInner>) -> rquickjs::Result<()> {
    let vm_of = |ctx: &Ctx<'_>, weak: &Weak<VmInner>| -> rquickjs::Result<Rc<VmInner>> {
        weak.upgrade().ok_or_else(|| Exception::throw_message(ctx, "the plugin VM is gone"))
    };
    let w = weak.clone();
    host.set(
        "call",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, name: String, args: Array<'js>| -> rquickjs::Result<Promise<'js>> {
                let vm = vm_of(&ctx, &w)?;
                // Bounded like every value leaving the VM; a refused one fails this call only.
                let mut budget = Budget::new(Some(Instant::now() + vm.task_timeout));
                let args = array_items(&args, &mut budget).and_then(|items| {
                    items.iter().map(|v| from_js_checked(v, &mut budget)).collect::<Result<Vec<Value>, _>>()
                });
                let args = match args {
                    Ok(args) => args,
                    Err(refused) => {
                        let error = refused_error(&format!("the arguments of {name}"), &refused);
                        tracing::warn!(plugin_config_id = vm.plugin_config_id, %error, "value refused");
                        return Err(Exception::throw_range(&ctx, &error.message));
                    }
                };
                let meta = vm.meta.clone();
                let vm_id = vm.vm_id;
                // Logging and metrics are fire-and-forget in the reference; everything else is an
                // awaited promise limited like the reference's guarded `await`.
                let limit = if name.starts_with("console.") || name.starts_with("metrics.") {
                    None
                } else {
                    Some(vm.task_timeout)
                };
                vm.spawn_op(&ctx, limit, async move { meta.call_from(vm_id, &name, args).await.map(HostOk::Json) })
            },
        )?,
    )?;
    let w = weak.clone();
    host.set(
        "fetch",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  url: String,
                  method: String,
                  headers: Array<'js>,
                  body: JsValue<'js>|
                  -> rquickjs::Result<Promise<'js>> {
                let vm = vm_of(&ctx, &w)?;
                let mut header_pairs = Vec::new();
                let mut budget = Budget::new(Some(Instant::now() + vm.task_timeout));
                let pairs = array_items(&headers, &mut budget).map_err(|refused| {
                    Exception::throw_range(&ctx, &refused_error("the fetch headers", &refused).message)
                })?;
                for pair in pairs {
                    let Some(pair) = pair.as_object() else { continue };
                    header_pairs.push((pair.get::<_, String>(0)?, pair.get::<_, String>(1)?));
                }
                let body = if body.is_null() || body.is_undefined() {
                    None
                } else if let Some(s) = body.as_string() {
                    Some(s.to_string()?.into_bytes())
                } else {
                    Some(bytes_of(&ctx, &body)?)
                };
                let request = FetchRequest { url, method, headers: header_pairs, body };
                let meta = vm.meta.clone();
                vm.spawn_op(&ctx, None, async move { meta.fetch(request).await.map(HostOk::Fetch) })
            },
        )?,
    )?;
    let w = weak.clone();
    host.set(
        "sleep",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, ms: Opt<f64>| -> rquickjs::Result<Promise<'js>> {
            let vm = vm_of(&ctx, &w)?;
            let ms = ms.0.filter(|m| m.is_finite() && *m > 0.0).unwrap_or(0.0).min(86_400_000.0);
            vm.spawn_op(&ctx, None, async move {
                tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
                Ok(HostOk::Json(Value::Null))
            })
        })?,
    )?;
    let w = weak;
    host.set(
        "metricKind",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, name: String| -> rquickjs::Result<Option<String>> {
            let vm = vm_of(&ctx, &w)?;
            Ok(vm.meta.metric_kind(&name))
        })?,
    )?;
    Ok(())
}
