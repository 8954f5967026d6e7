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

/// A call's arguments as the pool carries them to a worker thread: values, or the JSON text of
/// the argument array made once by the caller (`processEvent`'s event, serialized straight from
/// the pipeline's event instead of copied into values first). Shared, so a call retried on
/// another thread takes no copy of them.
#[derive(Clone, Debug)]
pub struct CallArgs(Arc<ArgsRepr>);

#[derive(Debug)]
enum ArgsRepr {
    Values(Vec<Value>),
    /// Always a JSON array (`[...]`): only [`CallArgs::json_array`] makes it, from serde's output.
    Json(String),
}

impl CallArgs {
    pub fn values(values: Vec<Value>) -> CallArgs {
        CallArgs(Arc::new(ArgsRepr::Values(values)))
    }

    /// The arguments `[first]`, as JSON text. Serializing cannot fail for the pipeline's types;
    /// should it, the error is the caller's to report.
    pub fn json_array<T: serde::Serialize>(first: &T) -> Result<CallArgs, serde_json::Error> {
        let mut text = Vec::with_capacity(1024);
        text.push(b'[');
        serde_json::to_writer(&mut text, first)?;
        text.push(b']');
        // serde_json writes UTF-8 only.
        let text = String::from_utf8(text).map_err(|e| serde::ser::Error::custom(e.to_string()))?;
        Ok(CallArgs(Arc::new(ArgsRepr::Json(text))))
    }

    /// The arguments as values (a copy; parsed from the text when made as JSON).
    pub fn to_values(&self) -> Vec<Value> {
        match &*self.0 {
            ArgsRepr::Values(values) => values.clone(),
            ArgsRepr::Json(text) => match serde_json::from_str(text) {
                Ok(Value::Array(values)) => values,
                _ => Vec::new(),
            },
        }
    }

    /// The JSON text of the argument array.
    pub fn to_json_array(&self) -> Result<std::borrow::Cow<'_, str>, serde_json::Error> {
        match &*self.0 {
            ArgsRepr::Values(values) => serde_json::to_string(values).map(std::borrow::Cow::Owned),
            ArgsRepr::Json(text) => Ok(std::borrow::Cow::Borrowed(text)),
        }
    }
}

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
    pub async fn call(&self, method: &str, args: CallArgs, kind: CallKind) -> Result<Value, PluginError> {
        match self {
            Vm::QuickJs(vm) => vm.call(method, args.to_values(), kind).await,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::CallArgs;

    #[test]
    fn arguments_made_as_text_are_the_arguments_as_values() {
        let event =
            json!({"event": "é 😀 \"q\"\n", "properties": {"n": 1.5, "big": 9007199254740993u64, "a": [null, true]}});
        let text = CallArgs::json_array(&event).unwrap_or_else(|e| panic!("{e}"));
        let values = CallArgs::values(vec![event.clone()]);
        assert_eq!(text.to_values(), vec![event.clone()]);
        assert_eq!(
            text.to_json_array().map(|t| t.into_owned()).ok(),
            values.to_json_array().map(|t| t.into_owned()).ok()
        );
        // Shared: a retry's copy is the same arguments, not a deep copy.
        let retry = text.clone();
        assert!(std::sync::Arc::ptr_eq(&retry.0, &text.0));
    }
}
