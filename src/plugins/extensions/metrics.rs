//! Plugin metrics: the declared metric types (`export const metrics = {name: 'sum'|'max'|'min'}`,
//! validated and stored in `posthog_plugin.metrics` at load), `meta.metrics.<name>.<op>(value)`,
//! the per-config accumulators, and the periodic `$$plugin_metrics` capture that empties them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::warn;

use super::super::js::number_value;
use super::super::rows::{PluginConfig, PluginRecords};
use super::super::vm_boundary::JsError;
use super::posthog::build_capture;
use super::CaptureSink;

/// The metrics every plugin with `exportEvents` gets.
pub const EXPORT_EVENTS_METRICS: [&str; 5] =
    ["events_seen", "events_delivered_successfully", "undelivered_events", "retry_errors", "other_errors"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricOperation {
    Increment,
    Max,
    Min,
}

impl MetricOperation {
    /// The `meta.metrics.<name>` method name.
    pub fn method(self) -> &'static str {
        match self {
            MetricOperation::Increment => "increment",
            MetricOperation::Max => "max",
            MetricOperation::Min => "min",
        }
    }

    pub fn from_method(method: &str) -> Option<MetricOperation> {
        match method {
            "increment" => Some(MetricOperation::Increment),
            "max" => Some(MetricOperation::Max),
            "min" => Some(MetricOperation::Min),
            _ => None,
        }
    }

    /// The operation a declared metric type allows.
    fn for_type(metric_type: &str) -> Option<MetricOperation> {
        match metric_type {
            "sum" => Some(MetricOperation::Increment),
            "max" => Some(MetricOperation::Max),
            "min" => Some(MetricOperation::Min),
            _ => None,
        }
    }
}

struct Accumulated {
    config: Arc<PluginConfig>,
    values: Vec<(String, f64)>,
}

/// The accumulators of all configs (the reference keeps one per worker thread; one per server
/// gives the same totals with fewer events).
#[derive(Default)]
pub struct PluginMetrics {
    per_config: Mutex<HashMap<i32, Accumulated>>,
}

impl PluginMetrics {
    /// `meta.metrics.<name>.<method>(value)` with the reference's checks.
    pub fn apply(&self, config: &Arc<PluginConfig>, name: &str, method: &str, value: &Value) -> Result<(), JsError> {
        let declared = config.plugin.declared_metrics();
        let Some(metric_type) = declared.get(name) else {
            return Err(JsError::new("IllegalOperationError", "Invalid metric name"));
        };
        let allowed = metric_type.as_str().map(str::to_lowercase).and_then(|kind| MetricOperation::for_type(&kind));
        let operation = MetricOperation::from_method(method).filter(|operation| Some(*operation) == allowed);
        let Some(operation) = operation else {
            return Err(JsError::new("TypeError", format!("meta.metrics.{name}.{method} is not a function")));
        };
        let Some(value) = value.as_f64() else {
            return Err(JsError::new("IllegalOperationError", "Only numbers are allowed for operations on metrics"));
        };
        self.update(config, operation, name, value);
        Ok(())
    }

    /// Adds to an accumulator. An unset or zero current value is replaced, as in the reference.
    pub fn update(&self, config: &Arc<PluginConfig>, operation: MetricOperation, name: &str, value: f64) {
        let Ok(mut per_config) = self.per_config.lock() else { return };
        let entry =
            per_config.entry(config.id).or_insert_with(|| Accumulated { config: config.clone(), values: Vec::new() });
        match entry.values.iter_mut().find(|(metric, _)| metric == name) {
            Some((_, current)) if *current != 0.0 && !current.is_nan() => {
                *current = match operation {
                    MetricOperation::Increment => *current + value,
                    MetricOperation::Max => current.max(value),
                    MetricOperation::Min => current.min(value),
                }
            }
            Some((_, current)) => *current = value,
            None => entry.values.push((name.to_string(), value)),
        }
    }

    /// The current values of one config (tests, status).
    pub fn values(&self, config_id: i32) -> Map<String, Value> {
        let Ok(per_config) = self.per_config.lock() else { return Map::new() };
        per_config
            .get(&config_id)
            .map(|entry| entry.values.iter().map(|(name, value)| (name.clone(), number_value(*value))).collect())
            .unwrap_or_default()
    }

    /// Captures one `$$plugin_metrics` event per config with values, then resets everything.
    pub async fn send(&self, capture: &dyn CaptureSink, server_version: &str) {
        let drained: Vec<Accumulated> = match self.per_config.lock() {
            Ok(mut per_config) => per_config.drain().map(|(_, entry)| entry).collect(),
            Err(_) => return,
        };
        for entry in drained {
            let plugin = &entry.config.plugin;
            let mut properties: Map<String, Value> =
                entry.values.iter().map(|(name, value)| (name.clone(), number_value(*value))).collect();
            properties.insert("plugin_name".into(), plugin.row.name.clone().map(Value::String).unwrap_or(Value::Null));
            properties.insert("plugin_id".into(), Value::from(plugin.id()));
            properties.insert("plugin_tag".into(), plugin.row.tag.clone().map(Value::String).unwrap_or(Value::Null));
            let event =
                build_capture(&entry.config, "$$plugin_metrics", Some(&Value::Object(properties)), server_version);
            if let Err(err) = capture.capture(event).await {
                warn!(plugin_config_id = entry.config.id, error = %err, "could not capture plugin metrics");
            }
        }
    }
}

/// Validates the exported metric declarations, adds the exportEvents defaults and stores the
/// result in `posthog_plugin.metrics` (and in memory) when it changed.
pub async fn setup_metrics(
    records: &dyn PluginRecords,
    config: &PluginConfig,
    exported: Option<&Map<String, Value>>,
    export_events: bool,
) -> Result<(), JsError> {
    let mut metrics = Map::new();
    for (name, metric_type) in exported.into_iter().flatten() {
        if let Some(metric_type) = metric_type.as_str() {
            metrics.insert(name.clone(), Value::String(metric_type.to_lowercase()));
        }
    }
    let unsupported: Vec<&str> = metrics
        .values()
        .filter_map(Value::as_str)
        .filter(|metric_type| MetricOperation::for_type(metric_type).is_none())
        .collect();
    if !unsupported.is_empty() {
        return Err(JsError::new(
            "IllegalOperationError",
            format!(
                "Only 'sum', 'max', and 'min' are supported as metric types. Invalid types received: {}",
                unsupported.join(", ")
            ),
        ));
    }
    if export_events {
        for name in EXPORT_EVENTS_METRICS {
            metrics.insert(name.to_string(), Value::String("sum".into()));
        }
    }
    let stored = Value::Object(config.plugin.declared_metrics());
    let new = Value::Object(metrics.clone());
    if stored != new {
        if let Err(err) = records.set_plugin_metrics(config.plugin_id, &new).await {
            warn!(plugin_id = config.plugin_id, error = %err, "could not store plugin metrics");
        }
        if let Ok(mut in_memory) = config.plugin.metrics.lock() {
            *in_memory = metrics;
        }
    }
    Ok(())
}
