//! The engine boundary: the one VM type the pool holds, a QuickJS VM (`quickjs.rs`) or a V8 VM
//! (`v8/vm.rs`), chosen per pool by `PoolOptions::engine` (`JS_ENGINE`). Both keep the same
//! contract (sandbox, exports, calls with `meta`, CPU deadline, heap limit, promise timeouts,
//! the reference's error texts), so nothing outside this module knows which one runs.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde_json::Value;
use tokio::runtime::Handle;

use super::{quickjs, v8, CallKind, MetaBindings, PluginConfigId, PluginError, PluginExports, PoolOptions};
use crate::config::JsEngine;
use crate::plugins::transform::TransformedCode;

/// One plugin config's VM on one worker thread.
#[derive(Clone)]
pub enum Vm {
    QuickJs(quickjs::Vm),
    V8(v8::vm::Vm),
}

impl Vm {
    /// Builds the VM of `options.engine` and runs the plugin code (not `setupPlugin`). Must run
    /// inside the worker's `LocalSet`.
    pub async fn create(
        plugin_config_id: PluginConfigId,
        code: &Arc<TransformedCode>,
        meta: Arc<dyn MetaBindings>,
        options: &PoolOptions,
        main: Option<Handle>,
        abandoned: Arc<AtomicBool>,
    ) -> Result<Vm, PluginError> {
        Ok(match options.engine {
            JsEngine::QuickJs => {
                Vm::QuickJs(quickjs::VmInner::create(plugin_config_id, code, meta, options, main, abandoned).await?)
            }
            JsEngine::V8 => {
                Vm::V8(v8::vm::VmInner::create(plugin_config_id, code, meta, options, main, abandoned).await?)
            }
        })
    }

    pub fn plugin_config_id(&self) -> PluginConfigId {
        match self {
            Vm::QuickJs(vm) => vm.plugin_config_id,
            Vm::V8(vm) => vm.plugin_config_id,
        }
    }

    /// What the plugin exports.
    pub fn exports(&self) -> PluginExports {
        match self {
            Vm::QuickJs(vm) => vm.exports.borrow().clone(),
            Vm::V8(vm) => vm.exports.borrow().clone(),
        }
    }

    /// Calls an exported function (or `jobs.<name>`, or a pseudo-method) with `args` and `meta`.
    pub async fn call(&self, method: &str, args: Vec<Value>, kind: CallKind) -> Result<Value, PluginError> {
        match self {
            Vm::QuickJs(vm) => vm.call(method, args, kind).await,
            Vm::V8(vm) => vm.call(method, args, kind).await,
        }
    }

    /// Whether this VM runs no more JS (the pool then builds a fresh one).
    pub fn is_discarded(&self) -> bool {
        match self {
            Vm::QuickJs(vm) => vm.is_discarded(),
            Vm::V8(vm) => vm.is_discarded(),
        }
    }

    /// Heap used in bytes.
    pub fn memory_used(&self) -> i64 {
        match self {
            Vm::QuickJs(vm) => vm.memory_used(),
            Vm::V8(vm) => vm.memory_used(),
        }
    }

    /// Whether both are the same VM.
    pub fn same(&self, other: &Vm) -> bool {
        match (self, other) {
            (Vm::QuickJs(a), Vm::QuickJs(b)) => std::rc::Rc::ptr_eq(a, b),
            (Vm::V8(a), Vm::V8(b)) => std::rc::Rc::ptr_eq(a, b),
            _ => false,
        }
    }
}
