//! The C ABI of native/v8_shim.cc (compiled and linked by build.rs against Debian's libnode).
//!
//! Contract: an `Iso` is used by one thread at a time (the one that owns its `V8Isolate`), except
//! `pst_v8_terminate`, which any thread may call while the isolate is alive. Text passed in is
//! UTF-8 with a length (no terminator); `pst_v8_out` reads the text of the last result, valid
//! until the next call on the same isolate.

use std::ffi::{c_char, c_void};

/// An isolate of the shim (opaque).
#[repr(C)]
pub struct Iso {
    _private: [u8; 0],
}

pub const OK: i32 = 0;
pub const THROWN: i32 = 1;
pub const PENDING: i32 = 2;
pub const TERMINATED: i32 = 3;
pub const REFUSED: i32 = 4;
pub const NOT_FOUND: i32 = 5;
pub const DEAD: i32 = 6;

/// What a sync host function answers: status 0 with the result as JSON text, 1 with the error
/// as JSON `{name, message}`, 2 with a string of chars below U+0100 as one byte per char. The bytes stay owned by Rust (copied by the shim at once).
#[repr(C)]
pub struct Reply {
    pub status: i32,
    pub ptr: *const c_char,
    pub len: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Callbacks {
    pub host_call: extern "C" fn(user: *mut c_void, fn_id: u32, args: *const c_char, len: usize, reply: *mut Reply),
    pub host_async: extern "C" fn(user: *mut c_void, fn_id: u32, op_id: u64, args: *const c_char, len: usize),
    pub console: extern "C" fn(user: *mut c_void, level: u32, text: *const c_char, len: usize),
}

/// The budget of one value read out of JS.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Limits {
    pub max_values: usize,
    pub max_bytes: usize,
    pub max_depth: u32,
    /// Nonzero: read values as QuickJS does (throwing members hidden, BigInt as its string).
    pub lenient: u32,
    /// Nonzero: a full GC leaving the heap 90% full ends the call as out of memory, and the
    /// isolate lives on (`pst_v8_oom` answers 2 once).
    pub gc_budget: u32,
}

extern "C" {
    pub fn pst_v8_init(flags: *const c_char);
    pub fn pst_v8_version() -> *const c_char;
    pub fn pst_v8_isolate_new(
        heap_limit: usize,
        array_buffer_limit: usize,
        stack_bytes: usize,
        limits: Limits,
        user: *mut c_void,
        callbacks: Callbacks,
    ) -> *mut Iso;
    pub fn pst_v8_isolate_free(iso: *mut Iso);
    pub fn pst_v8_terminate(iso: *mut Iso);
    pub fn pst_v8_interrupt(iso: *mut Iso);
    pub fn pst_v8_term_stack(iso: *mut Iso, ptr: *mut *const c_char) -> usize;
    pub fn pst_v8_cancel_terminate(iso: *mut Iso);
    pub fn pst_v8_oom(iso: *mut Iso) -> i32;
    pub fn pst_v8_gc(iso: *mut Iso);
    pub fn pst_v8_heap(iso: *mut Iso, used: *mut usize, total: *mut usize, limit: *mut usize);
    pub fn pst_v8_array_buffers(iso: *mut Iso, used: *mut usize, budget: *mut usize, refused: *mut u64);
    pub fn pst_v8_out(iso: *mut Iso, ptr: *mut *const c_char) -> usize;
    pub fn pst_v8_define_host(iso: *mut Iso, name: *const c_char, name_len: usize, fn_id: u32, is_async: i32) -> i32;
    pub fn pst_v8_realm_new(iso: *mut Iso) -> i64;
    #[allow(clippy::too_many_arguments)]
    pub fn pst_v8_load(
        iso: *mut Iso,
        realm: u32,
        kind: i32,
        code: *const c_char,
        code_len: usize,
        filename: *const c_char,
        filename_len: usize,
        call_id: *mut u64,
    ) -> i32;
    pub fn pst_v8_call(
        iso: *mut Iso,
        realm: u32,
        name: *const c_char,
        name_len: usize,
        args: *const c_char,
        args_len: usize,
        call_id: *mut u64,
    ) -> i32;
    pub fn pst_v8_poll(iso: *mut Iso, realm: u32, call_id: u64) -> i32;
    pub fn pst_v8_forget(iso: *mut Iso, call_id: u64);
    pub fn pst_v8_take_rejection(iso: *mut Iso, realm: u32) -> i32;
    pub fn pst_v8_settle_op(iso: *mut Iso, realm: u32, op_id: u64, ok: i32, json: *const c_char, len: usize) -> i32;
}
