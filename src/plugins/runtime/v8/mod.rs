//! V8 isolates (Debian's libnode108: V8 10.2 with ICU 72) behind a small safe API, shaped like
//! the QuickJS VM of `quickjs.rs` so the worker pool holds either engine (`engine.rs`; V8 is the
//! default of `JS_ENGINE`). `vm.rs` builds the plugin VM on it; `tests/v8_engine.rs` and
//! `benches/v8_engine.rs` use this API directly.
//!
//! Why a C++ shim and not rusty_v8 (the `v8` crate): the crate's versions that match V8 10.2 ship
//! their C++ bindings inside a prebuilt static V8 (downloaded at build time from a host these
//! machines cannot reach); linking them to libnode.so instead would mean compiling the crate's
//! `binding.cc` ourselves against Node's headers and build flags (pointer compression off, no
//! sandbox), which its build script does not offer short of a full Chromium-toolchain build. The
//! shim (native/v8_shim.cc, ~800 lines) needs only g++ and the headers of libnode-dev.
//!
//! Owns: the V8 platform (initialised once per process), isolates with a heap limit whose
//! near-limit callback ends only the running call (the isolate is then dead: [`EngineError::HeapLimit`],
//! every later call answers it), the CPU deadline (`watchdog.rs`: `TerminateExecution`), realms
//! (contexts) in an isolate, compiling code as a script, an ES module (imports refused) or a
//! function body, calling a function by name with JSON arguments and reading its result as JSON
//! within a budget, host functions (sync, into Rust) and host async ops (a Rust future per call,
//! its promise settled when the future ends), `console` capture, and V8's own error messages and
//! stacks. A bare isolate has none of Node's globals (`require`, `process`, `Buffer`, timers):
//! nothing of Node and nothing of the process environment is reachable from JS.
//!
//! Invariants: a `V8Isolate` stays on the thread that made it (it is `!Send`); JS runs only inside
//! one FFI call at a time, with a deadline armed; host callbacks never re-enter the isolate.

mod ffi;
pub mod vm;
mod watchdog;

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;

use super::convert::{Refused, MAX_BYTES, MAX_VALUES};
use super::{JsError, MetaError, Thrown};

/// Nesting deeper than this reads as `null` (cycles end here too). Below serde_json's recursion
/// limit of 128, which the JSON text crossing the boundary must pass.
pub const MAX_DEPTH: u32 = 120;
/// Lines of console output kept between two [`V8Isolate::take_console`]; later ones are counted.
pub const MAX_CONSOLE_LINES: usize = 10_000;

/// What a host async op resolves to (a rejection becomes a JS `Error` with that name and message).
pub type HostFuture = Pin<Box<dyn Future<Output = Result<Value, MetaError>>>>;
type SyncHost = Rc<dyn Fn(Vec<Value>) -> Result<Value, MetaError>>;
type AsyncHost = Rc<dyn Fn(Vec<Value>) -> HostFuture>;

/// Limits of one isolate.
#[derive(Debug, Clone)]
pub struct V8Options {
    /// The V8 heap limit (`ResourceConstraints`); reaching it ends the running call and kills the
    /// isolate.
    pub heap_limit_bytes: usize,
    /// The budget of the isolate's ArrayBuffer memory (ArrayBuffers, typed arrays, Buffers),
    /// which lives outside the V8 heap and its limit: an allocation that would take the live
    /// bytes over it throws `RangeError: Array buffer allocation failed` in the allocating call
    /// (the isolate lives on). 0: no budget.
    pub array_buffer_limit_bytes: usize,
    /// JS stack allowed below the point where a call enters V8.
    pub stack_bytes: usize,
    /// Budget of every value read out of JS (results, host function arguments).
    pub max_values: usize,
    pub max_bytes: usize,
    pub max_depth: u32,
    /// Read values as QuickJS's conversion does (`convert.rs`): a getter, proxy trap or `toJSON`
    /// that throws hides its member instead of failing the read, a BigInt becomes its decimal
    /// string. Off: `JSON.stringify`'s strictness.
    pub lenient: bool,
    /// End a call as out of memory (`HeapLimit`, the isolate still alive) when a full GC leaves
    /// the heap 90% full, instead of letting V8 run ever slower last-resort GCs until the heap
    /// limit kills the isolate.
    pub gc_budget: bool,
}

impl Default for V8Options {
    fn default() -> Self {
        V8Options {
            heap_limit_bytes: 128 * 1024 * 1024,
            array_buffer_limit_bytes: 128 * 1024 * 1024,
            stack_bytes: 768 * 1024,
            max_values: MAX_VALUES,
            max_bytes: MAX_BYTES,
            max_depth: MAX_DEPTH,
            lenient: false,
            gc_budget: false,
        }
    }
}

/// How [`V8Isolate::load`] compiles code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A classic script: its top-level functions are globals.
    Script,
    /// An ES module: its exports are callable; any `import` fails with `Cannot find module 'x'`.
    Module,
    /// A function body run with one parameter `exports` (an object); what it assigns there (or
    /// an object it returns) is callable.
    FunctionBody,
}

/// A realm (V8 context) of an isolate; [`RealmId::MAIN`] exists from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RealmId(u32);

impl RealmId {
    pub const MAIN: RealmId = RealmId(0);
}

/// A call whose promise is still pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallId(u64);

/// A host async op waiting for its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId(u64);

/// A call's result, or its promise still pending.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(Value),
    Pending(CallId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleLevel {
    Log,
    Info,
    Warn,
    Error,
    Debug,
}

/// One `console.<level>(...)` call: its arguments rendered (strings as they are, objects and
/// arrays as JSON, other values by V8's `String()`), joined by spaces.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleLine {
    pub level: ConsoleLevel,
    pub text: String,
}

/// The ArrayBuffer memory of an isolate (see [`V8Options::array_buffer_limit_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayBufferStats {
    /// Live bytes of ArrayBuffer backing stores (freed once V8 collects their buffers).
    pub used: usize,
    /// The budget (0: none).
    pub budget: usize,
    /// Allocations refused for the budget so far.
    pub refused: u64,
}

/// The heap of an isolate (V8's `GetHeapStatistics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    pub used: usize,
    pub total: usize,
    pub limit: usize,
}

/// Why a call did not give a value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("could not create a V8 isolate or realm")]
    Create,
    /// JS threw (or a promise rejected): V8's own error, message and stack.
    #[error("{0}")]
    Js(JsError),
    /// The CPU deadline passed and V8 was terminated.
    #[error("script execution timed out after {0:?}")]
    Timeout(Duration),
    /// The isolate reached its heap limit: this call ended and the isolate runs nothing more.
    #[error("the V8 isolate reached its heap limit of {0} bytes and was discarded")]
    HeapLimit(usize),
    /// The value returned (or passed to a host function) does not fit the budget.
    #[error("the plugin server refused the value: {0}")]
    Refused(Refused),
    #[error("no function {0}")]
    NotFound(String),
    /// The promise did not settle before the promise timeout.
    #[error("the promise did not settle within {0:?}")]
    PromiseTimeout(Duration),
    /// The promise is pending and nothing in flight could ever settle it.
    #[error("the promise can never settle (no host operation is in flight)")]
    NeverSettles,
    #[error("internal error of the V8 engine: {0}")]
    Internal(String),
}

/// The V8 version linked (e.g. `10.2.154.26-node.36`).
pub fn version() -> String {
    init();
    // SAFETY: V8 returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffi::pst_v8_version()) }.to_string_lossy().into_owned()
}

/// Initialises the V8 platform once per process (every isolate constructor calls it), with the
/// V8 flags of the environment variable `V8_FLAGS` (as `node --v8-options` lists them, e.g.
/// `--max-semi-space-size=1`); an addition, since the reference took them from `NODE_OPTIONS`.
pub fn init() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let flags = std::env::var("V8_FLAGS").ok().and_then(|flags| std::ffi::CString::new(flags).ok());
        let flags = flags.unwrap_or_default();
        // SAFETY: a NUL-terminated string that outlives the call; the shim initialises V8 once
        // (std::call_once) and copies the flags.
        unsafe { ffi::pst_v8_init(flags.as_ptr()) };
    });
}

/// What host callbacks reach: kept at a stable address (boxed) for the shim's `user` pointer.
#[derive(Default)]
struct HostTable {
    sync: RefCell<Vec<SyncHost>>,
    asyncs: RefCell<Vec<AsyncHost>>,
    started: RefCell<Vec<(OpId, HostFuture)>>,
    console: RefCell<Vec<ConsoleLine>>,
    console_dropped: Cell<u64>,
    reply: RefCell<Vec<u8>>,
}

fn bytes<'a>(ptr: *const c_char, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: the shim passes a live buffer of `len` bytes for the duration of the callback.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }
}

fn args_of(ptr: *const c_char, len: usize) -> Vec<Value> {
    match serde_json::from_slice(bytes(ptr, len)) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

fn error_json(error: &MetaError) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"name": error.name, "message": error.message})).unwrap_or_default()
}

extern "C" fn host_call(user: *mut c_void, fn_id: u32, args: *const c_char, len: usize, reply: *mut Reply) {
    // SAFETY: `user` is the isolate's boxed HostTable, alive while the isolate is.
    let table = unsafe { &*(user as *const HostTable) };
    let function = table.sync.borrow().get(fn_id as usize).cloned();
    let args = args_of(args, len);
    let result = match function {
        Some(function) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| function(args)))
            .unwrap_or_else(|_| Err(MetaError::new("host function panicked"))),
        None => Err(MetaError::new("unknown host function")),
    };
    let (status, text) = match result {
        // A binary string (bytes from crypto, zlib, base64…) crosses as one byte per char: as
        // JSON a byte would take up to six.
        Ok(Value::String(text)) if text.chars().all(|c| u8::try_from(c).is_ok()) => {
            (2, text.chars().map(|c| u8::try_from(c).unwrap_or(b'?')).collect())
        }
        Ok(value) => (0, serde_json::to_vec(&value).unwrap_or_else(|_| b"null".to_vec())),
        Err(error) => (1, error_json(&error)),
    };
    let mut buffer = table.reply.borrow_mut();
    *buffer = text;
    // SAFETY: `reply` points at the shim's reply struct for this callback.
    unsafe {
        (*reply).status = status;
        (*reply).ptr = buffer.as_ptr().cast();
        (*reply).len = buffer.len();
    }
}

extern "C" fn host_async(user: *mut c_void, fn_id: u32, op_id: u64, args: *const c_char, len: usize) {
    // SAFETY: as in `host_call`.
    let table = unsafe { &*(user as *const HostTable) };
    let function = table.asyncs.borrow().get(fn_id as usize).cloned();
    let args = args_of(args, len);
    let future: HostFuture = match function {
        Some(function) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| function(args)))
            .unwrap_or_else(|_| Box::pin(async { Err(MetaError::new("host function panicked")) })),
        None => Box::pin(async { Err(MetaError::new("unknown host function")) }),
    };
    table.started.borrow_mut().push((OpId(op_id), future));
}

extern "C" fn console(user: *mut c_void, level: u32, text: *const c_char, len: usize) {
    // SAFETY: as in `host_call`.
    let table = unsafe { &*(user as *const HostTable) };
    let mut lines = table.console.borrow_mut();
    if lines.len() >= MAX_CONSOLE_LINES {
        table.console_dropped.set(table.console_dropped.get() + 1);
        return;
    }
    let level = match level {
        1 => ConsoleLevel::Info,
        2 => ConsoleLevel::Warn,
        3 => ConsoleLevel::Error,
        4 => ConsoleLevel::Debug,
        _ => ConsoleLevel::Log,
    };
    lines.push(ConsoleLine { level, text: String::from_utf8_lossy(bytes(text, len)).into_owned() });
}

use ffi::Reply;

const CALLBACKS: ffi::Callbacks = ffi::Callbacks { host_call, host_async, console };

/// One V8 isolate with its realms. Stays on the thread that created it.
pub struct V8Isolate {
    raw: NonNull<ffi::Iso>,
    // Dropped after `raw` is freed (see Drop): the shim holds a pointer to it.
    host: Box<HostTable>,
    options: V8Options,
    dead: bool,
    /// Dropped with the isolate: a [`HeapProbe`] reads nothing after that.
    alive: Rc<()>,
    _not_send: PhantomData<*mut ()>,
}

/// Reads the heap of an isolate from where no `&V8Isolate` is at hand (a host function running
/// inside a call, a host op finishing later); reads nothing once the isolate is gone.
#[derive(Clone)]
pub struct HeapProbe {
    raw: NonNull<ffi::Iso>,
    alive: std::rc::Weak<()>,
    limit: usize,
}

impl HeapProbe {
    /// Bytes the isolate may still allocate: the smaller of its heap headroom and its
    /// ArrayBuffer budget left (0 once it is gone).
    pub fn headroom(&self) -> usize {
        if self.alive.upgrade().is_none() {
            return 0;
        }
        let (mut used, mut total, mut limit) = (0, 0, 0);
        // SAFETY: the isolate is alive (its `alive` token is), and a probe, being `!Send`, is on
        // the isolate's thread; GetHeapStatistics may run inside a host callback.
        unsafe { ffi::pst_v8_heap(self.raw.as_ptr(), &mut used, &mut total, &mut limit) };
        let heap = self.limit.min(limit).saturating_sub(used);
        // Host-made bytes become an ArrayBuffer too: they must fit its budget as well.
        let (mut buffers, mut budget, mut refused) = (0, 0, 0);
        // SAFETY: as above.
        unsafe { ffi::pst_v8_array_buffers(self.raw.as_ptr(), &mut buffers, &mut budget, &mut refused) };
        if budget == 0 {
            heap
        } else {
            heap.min(budget.saturating_sub(buffers))
        }
    }
}

impl Drop for V8Isolate {
    fn drop(&mut self) {
        // SAFETY: created by pst_v8_isolate_new, freed once; no deadline is armed (they are
        // scoped to the calls, which borrow self).
        unsafe { ffi::pst_v8_isolate_free(self.raw.as_ptr()) };
    }
}

/// How the shim's error JSON reads.
#[derive(serde::Deserialize)]
struct ErrorJson {
    #[serde(default)]
    name: String,
    #[serde(default)]
    message: String,
    stack: Option<String>,
    #[serde(default)]
    thrown: String,
    #[serde(default)]
    retry: bool,
}

#[derive(serde::Deserialize)]
struct RefusedJson {
    kind: i32,
    claimed: f64,
}

impl V8Isolate {
    /// A new isolate with its main realm (`console` installed).
    pub fn new(options: V8Options) -> Result<V8Isolate, EngineError> {
        init();
        let host = Box::<HostTable>::default();
        let limits = ffi::Limits {
            max_values: options.max_values,
            max_bytes: options.max_bytes,
            max_depth: options.max_depth,
            lenient: u32::from(options.lenient),
            gc_budget: u32::from(options.gc_budget),
        };
        let user = &*host as *const HostTable as *mut c_void;
        // SAFETY: `user` outlives the isolate (freed after it, see Drop).
        let raw = unsafe {
            ffi::pst_v8_isolate_new(
                options.heap_limit_bytes,
                options.array_buffer_limit_bytes,
                options.stack_bytes,
                limits,
                user,
                CALLBACKS,
            )
        };
        let raw = NonNull::new(raw).ok_or(EngineError::Create)?;
        let isolate = V8Isolate { raw, host, options, dead: false, alive: Rc::new(()), _not_send: PhantomData };
        isolate.new_realm()?;
        Ok(isolate)
    }

    fn iso(&self) -> *mut ffi::Iso {
        self.raw.as_ptr()
    }

    /// Another realm (context) in this isolate, with `console` and every host function.
    pub fn new_realm(&self) -> Result<RealmId, EngineError> {
        // SAFETY: a live isolate on its own thread.
        let index = unsafe { ffi::pst_v8_realm_new(self.iso()) };
        u32::try_from(index).map(RealmId).map_err(|_| EngineError::Create)
    }

    /// Defines a global function `name` in every realm that calls `f` synchronously with the
    /// arguments as JSON; an `Err` throws an `Error` with its name and message.
    pub fn register_function(
        &mut self,
        name: &str,
        f: impl Fn(Vec<Value>) -> Result<Value, MetaError> + 'static,
    ) -> Result<(), EngineError> {
        let id = self.host.sync.borrow().len() as u32;
        self.host.sync.borrow_mut().push(Rc::new(f));
        self.define(name, id, false)
    }

    /// Defines a global function `name` in every realm that returns a promise, settled when the
    /// future `f` returns ends (driven by [`V8Isolate::call_async`], or by hand through
    /// [`V8Isolate::take_started_ops`] and [`V8Isolate::settle_op`]).
    pub fn register_async(
        &mut self,
        name: &str,
        f: impl Fn(Vec<Value>) -> HostFuture + 'static,
    ) -> Result<(), EngineError> {
        let id = self.host.asyncs.borrow().len() as u32;
        self.host.asyncs.borrow_mut().push(Rc::new(f));
        self.define(name, id, true)
    }

    fn define(&self, name: &str, id: u32, is_async: bool) -> Result<(), EngineError> {
        // SAFETY: a live isolate; the name is passed with its length.
        let status =
            unsafe { ffi::pst_v8_define_host(self.iso(), name.as_ptr().cast(), name.len(), id, i32::from(is_async)) };
        if status == 0 {
            Ok(())
        } else {
            Err(EngineError::Create)
        }
    }

    /// A reader of this isolate's heap headroom (see [`HeapProbe`]).
    pub fn heap_probe(&self) -> HeapProbe {
        HeapProbe { raw: self.raw, alive: Rc::downgrade(&self.alive), limit: self.options.heap_limit_bytes }
    }

    /// Where JS was when the last deadline interrupted it (`    at f (file:line:column)` lines),
    /// then forgotten; `None` when unknown (the watchdog had to terminate without it).
    pub fn take_term_stack(&mut self) -> Option<String> {
        let mut ptr: *const c_char = std::ptr::null();
        // SAFETY: a live isolate; the text is copied out at once.
        let len = unsafe { ffi::pst_v8_term_stack(self.iso(), &mut ptr) };
        let text = String::from_utf8_lossy(bytes(ptr, len)).into_owned();
        (!text.is_empty()).then_some(text)
    }

    /// Whether the isolate reached its heap limit (it runs nothing more; drop it).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Runs a full GC (for heap figures: what [`V8Isolate::heap`] then says is live data).
    pub fn collect_garbage(&self) {
        if !self.dead {
            // SAFETY: a live isolate on its own thread, not running JS.
            unsafe { ffi::pst_v8_gc(self.iso()) };
        }
    }

    pub fn heap(&self) -> HeapStats {
        let (mut used, mut total, mut limit) = (0, 0, 0);
        // SAFETY: a live isolate; out pointers to locals.
        unsafe { ffi::pst_v8_heap(self.iso(), &mut used, &mut total, &mut limit) };
        HeapStats { used, total, limit }
    }

    /// The isolate's ArrayBuffer memory and its budget.
    pub fn array_buffers(&self) -> ArrayBufferStats {
        let (mut used, mut budget, mut refused) = (0, 0, 0);
        // SAFETY: a live isolate; out pointers to locals.
        unsafe { ffi::pst_v8_array_buffers(self.iso(), &mut used, &mut budget, &mut refused) };
        ArrayBufferStats { used, budget, refused }
    }

    /// Console lines since the last take, and how many were dropped over [`MAX_CONSOLE_LINES`].
    pub fn take_console(&self) -> (Vec<ConsoleLine>, u64) {
        (std::mem::take(&mut *self.host.console.borrow_mut()), self.host.console_dropped.replace(0))
    }

    /// Promises rejected with no handler since the last take (a handler attached later in the
    /// same turn cancels the report, like Node's `unhandledRejection`). Reading an error may run
    /// plugin code (a `stack` getter): it runs under `timeout`.
    pub fn take_unhandled_rejections(&mut self, timeout: Duration) -> Vec<JsError> {
        let mut errors = Vec::new();
        if self.dead {
            return errors;
        }
        let iso = self.iso();
        let armed = watchdog::arm(iso, Instant::now() + timeout);
        // SAFETY: a live isolate; each error is read out before the next take.
        while unsafe { ffi::pst_v8_take_rejection(iso, RealmId::MAIN.0) } == 1 {
            errors.push(self.read_error());
        }
        if armed.disarm() {
            // SAFETY: a live isolate.
            unsafe { ffi::pst_v8_cancel_terminate(iso) };
        }
        errors
    }

    /// Host async ops started by JS since the last take, each with its future.
    pub fn take_started_ops(&self) -> Vec<(OpId, HostFuture)> {
        std::mem::take(&mut *self.host.started.borrow_mut())
    }

    fn out(&self) -> &[u8] {
        let mut ptr: *const c_char = std::ptr::null();
        // SAFETY: a live isolate; the text stays valid until the next call, and `&self` is
        // borrowed for as long as the slice lives.
        let len = unsafe { ffi::pst_v8_out(self.iso(), &mut ptr) };
        bytes(ptr, len)
    }

    /// Runs `op` (an FFI call that may run JS) under the CPU deadline, and reads its status.
    fn run(
        &mut self,
        timeout: Duration,
        op: impl FnOnce(*mut ffi::Iso, &mut u64) -> i32,
    ) -> Result<Outcome, EngineError> {
        if self.dead {
            return Err(EngineError::HeapLimit(self.options.heap_limit_bytes));
        }
        let iso = self.iso();
        let mut call_id = 0u64;
        let armed = watchdog::arm(iso, Instant::now() + timeout);
        let status = op(iso, &mut call_id);
        let fired = armed.disarm();
        if fired {
            // SAFETY: a live isolate; a late termination must not hit the next call.
            unsafe { ffi::pst_v8_cancel_terminate(iso) };
        }
        // SAFETY: a live isolate.
        match unsafe { ffi::pst_v8_oom(iso) } {
            0 => {}
            1 => {
                self.dead = true;
                return Err(EngineError::HeapLimit(self.options.heap_limit_bytes));
            }
            _ => return Err(EngineError::HeapLimit(self.options.heap_limit_bytes)),
        }
        match status {
            ffi::OK => serde_json::from_slice(self.out())
                .map(Outcome::Done)
                .map_err(|e| EngineError::Internal(format!("unreadable result: {e}"))),
            ffi::PENDING => Ok(Outcome::Pending(CallId(call_id))),
            ffi::THROWN => Err(EngineError::Js(self.read_error())),
            ffi::TERMINATED => Err(EngineError::Timeout(timeout)),
            ffi::REFUSED => Err(EngineError::Refused(self.read_refusal())),
            ffi::DEAD => {
                self.dead = true;
                Err(EngineError::HeapLimit(self.options.heap_limit_bytes))
            }
            ffi::NOT_FOUND => Err(EngineError::NotFound(String::new())),
            other => Err(EngineError::Internal(format!("unknown status {other}"))),
        }
    }

    fn read_error(&self) -> JsError {
        match serde_json::from_slice::<ErrorJson>(self.out()) {
            Ok(e) => JsError {
                name: e.name,
                message: e.message,
                stack: e.stack,
                caller: None,
                retry: e.retry,
                thrown: match e.thrown.as_str() {
                    "string" => Thrown::String,
                    "primitive" => Thrown::Primitive,
                    _ => Thrown::Object,
                },
            },
            Err(e) => JsError { name: "Error".into(), message: format!("unreadable error: {e}"), ..JsError::default() },
        }
    }

    fn read_refusal(&self) -> Refused {
        match serde_json::from_slice::<RefusedJson>(self.out()) {
            Ok(RefusedJson { kind: 2, claimed }) => Refused::ArrayTooLong(claimed),
            Ok(RefusedJson { kind: 3, .. }) => Refused::TooManyBytes,
            _ => Refused::TooManyValues,
        }
    }

    /// Compiles and runs `code` in the main realm within `timeout` of CPU time.
    pub fn load(
        &mut self,
        kind: SourceKind,
        code: &str,
        filename: &str,
        timeout: Duration,
    ) -> Result<Outcome, EngineError> {
        self.load_in(RealmId::MAIN, kind, code, filename, timeout)
    }

    /// Compiles and runs `code` in `realm`. A module with top-level await may be `Pending`.
    pub fn load_in(
        &mut self,
        realm: RealmId,
        kind: SourceKind,
        code: &str,
        filename: &str,
        timeout: Duration,
    ) -> Result<Outcome, EngineError> {
        let kind = match kind {
            SourceKind::Script => 0,
            SourceKind::Module => 1,
            SourceKind::FunctionBody => 2,
        };
        self.run(timeout, |iso, call_id| {
            // SAFETY: a live isolate; texts passed with their lengths.
            unsafe {
                ffi::pst_v8_load(
                    iso,
                    realm.0,
                    kind,
                    code.as_ptr().cast(),
                    code.len(),
                    filename.as_ptr().cast(),
                    filename.len(),
                    call_id,
                )
            }
        })
    }

    /// Calls the function `name` of the main realm (its exports first, then its globals).
    pub fn call(&mut self, name: &str, args: &[Value], timeout: Duration) -> Result<Outcome, EngineError> {
        self.call_in(RealmId::MAIN, name, args, timeout)
    }

    /// Calls `name` in `realm` with `args`, runs the promise jobs, and gives its result (or
    /// `Pending` for a promise still waiting, e.g. on a host async op).
    pub fn call_in(
        &mut self,
        realm: RealmId,
        name: &str,
        args: &[Value],
        timeout: Duration,
    ) -> Result<Outcome, EngineError> {
        let args = serde_json::to_string(args).map_err(|e| EngineError::Internal(e.to_string()))?;
        self.call_in_text(realm, name, &args, timeout)
    }

    /// [`V8Isolate::call_in`] with the arguments as the JSON text of an array.
    pub fn call_in_text(
        &mut self,
        realm: RealmId,
        name: &str,
        args: &str,
        timeout: Duration,
    ) -> Result<Outcome, EngineError> {
        self.run(timeout, |iso, call_id| {
            // SAFETY: a live isolate; texts passed with their lengths.
            unsafe {
                ffi::pst_v8_call(
                    iso,
                    realm.0,
                    name.as_ptr().cast(),
                    name.len(),
                    args.as_ptr().cast(),
                    args.len(),
                    call_id,
                )
            }
        })
        .map_err(|e| match e {
            EngineError::NotFound(_) => EngineError::NotFound(name.to_string()),
            other => other,
        })
    }

    /// The state of a pending call (its outcome once settled; then it is forgotten).
    pub fn poll(&mut self, realm: RealmId, call: CallId) -> Result<Outcome, EngineError> {
        // Reading the result may run getters: it runs under a deadline like any call.
        let timeout = Duration::from_secs(1);
        // SAFETY: a live isolate.
        self.run(timeout, |iso, _| unsafe { ffi::pst_v8_poll(iso, realm.0, call.0) })
    }

    /// Stops tracking a pending call.
    pub fn forget(&mut self, call: CallId) {
        // SAFETY: a live isolate.
        unsafe { ffi::pst_v8_forget(self.iso(), call.0) };
    }

    /// Settles a host async op and runs the promise jobs that follow, within `timeout`.
    pub fn settle_op(
        &mut self,
        realm: RealmId,
        op: OpId,
        result: Result<Value, MetaError>,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let (ok, text) = match result {
            Ok(value) => (1, serde_json::to_vec(&value).map_err(|e| EngineError::Internal(e.to_string()))?),
            Err(error) => (0, error_json(&error)),
        };
        self.run(timeout, |iso, _| {
            // SAFETY: a live isolate; the text passed with its length.
            unsafe { ffi::pst_v8_settle_op(iso, realm.0, op.0, ok, text.as_ptr().cast(), text.len()) }
        })
        .map(|_| ())
    }

    /// Calls `name` and waits for its promise: host async ops started by the call are driven
    /// here, each settling runs the promise jobs within `timeout` of CPU time, and the whole wait
    /// ends after `promise_timeout`. Must run on the isolate's thread (a local task).
    pub async fn call_async(
        &mut self,
        realm: RealmId,
        name: &str,
        args: &[Value],
        timeout: Duration,
        promise_timeout: Duration,
    ) -> Result<Value, EngineError> {
        let call = match self.call_in(realm, name, args, timeout) {
            Ok(Outcome::Done(value)) => return Ok(value),
            Ok(Outcome::Pending(call)) => call,
            Err(error) => {
                self.take_started_ops();
                return Err(error);
            }
        };
        let result = self.wait(realm, call, timeout, promise_timeout).await;
        if result.is_err() {
            self.forget(call);
        }
        result
    }

    async fn wait(
        &mut self,
        realm: RealmId,
        call: CallId,
        timeout: Duration,
        promise_timeout: Duration,
    ) -> Result<Value, EngineError> {
        let give_up = tokio::time::Instant::now() + promise_timeout;
        let mut in_flight = FuturesUnordered::new();
        loop {
            for (op, future) in self.take_started_ops() {
                in_flight.push(async move { (op, future.await) });
            }
            if let Outcome::Done(value) = self.poll(realm, call)? {
                return Ok(value);
            }
            if in_flight.is_empty() {
                return Err(EngineError::NeverSettles);
            }
            match tokio::time::timeout_at(give_up, in_flight.next()).await {
                Ok(Some((op, result))) => self.settle_op(realm, op, result, timeout)?,
                Ok(None) => {}
                Err(_) => return Err(EngineError::PromiseTimeout(promise_timeout)),
            }
        }
    }
}
