//! Plugin metrics (`meta.metrics`): per plugin config accumulators (`sum` / `max` / `min`) sent
//! every 30 minutes as `$$plugin_metrics` events, then reset (the reference's
//! `PluginMetricsManager`, spec 30 §9).
//!
//! This module owns the arithmetic and the period; declaring and validating a plugin's metrics
//! and capturing the event as that plugin (`posthog.capture`) belong to the plugins side, reached
//! through [`PluginMetricsSender`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::js_number;
use crate::schedule::{cron, BoxError};

/// `*/30 * * * *`.
pub const PLUGIN_METRICS_PERIOD: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricOperation {
    Increment,
    Max,
    Min,
}

#[derive(Debug, Error, PartialEq)]
pub enum PluginMetricsError {
    #[error("Only numbers are allowed for operations on metrics")]
    NotANumber,
}

/// The plugin a config runs, as the `$$plugin_metrics` event names it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginIdentity {
    pub plugin_id: i64,
    pub plugin_name: String,
    pub plugin_tag: Option<String>,
}

struct ConfigMetrics {
    plugin: PluginIdentity,
    metrics: Map<String, Value>,
    values: BTreeMap<String, f64>,
}

/// Captures `$$plugin_metrics` as the given plugin config (the plugins side's `posthog.capture`).
#[async_trait]
pub trait PluginMetricsSender: Send + Sync {
    async fn capture_plugin_metrics(
        &self,
        plugin_config_id: i64,
        properties: Map<String, Value>,
    ) -> Result<(), BoxError>;
}

#[derive(Default)]
pub struct PluginMetricsManager {
    per_config: Mutex<BTreeMap<i64, ConfigMetrics>>,
}

impl PluginMetricsManager {
    pub fn new() -> PluginMetricsManager {
        PluginMetricsManager::default()
    }

    /// Applies one `increment` / `max` / `min`. The first value of a name is stored as is, and so
    /// is any value while the stored one is 0 (the reference treats 0 as unset).
    pub fn update_metric(
        &self,
        plugin_config_id: i64,
        plugin: &PluginIdentity,
        operation: MetricOperation,
        metric_name: &str,
        value: f64,
    ) -> Result<(), PluginMetricsError> {
        if !value.is_finite() {
            return Err(PluginMetricsError::NotANumber);
        }
        let Ok(mut per_config) = self.per_config.lock() else { return Ok(()) };
        let entry = per_config.entry(plugin_config_id).or_insert_with(|| ConfigMetrics {
            plugin: plugin.clone(),
            metrics: Map::new(),
            values: BTreeMap::new(),
        });
        let current = entry.values.get(metric_name).copied().unwrap_or(0.0);
        let next = if current == 0.0 {
            value
        } else {
            match operation {
                MetricOperation::Increment => current + value,
                MetricOperation::Max => current.max(value),
                MetricOperation::Min => current.min(value),
            }
        };
        entry.values.insert(metric_name.to_string(), next);
        entry.metrics.insert(metric_name.to_string(), js_number(next));
        Ok(())
    }

    /// Each config's `$$plugin_metrics` properties (`{...metrics, plugin_name, plugin_id,
    /// plugin_tag}`), resetting every accumulator.
    pub fn take_reports(&self) -> Vec<(i64, Map<String, Value>)> {
        let Ok(mut per_config) = self.per_config.lock() else { return Vec::new() };
        std::mem::take(&mut *per_config)
            .into_iter()
            .map(|(config_id, config)| {
                let mut properties = config.metrics;
                properties.insert("plugin_name".into(), json!(config.plugin.plugin_name));
                properties.insert("plugin_id".into(), json!(config.plugin.plugin_id));
                properties.insert("plugin_tag".into(), json!(config.plugin.plugin_tag));
                (config_id, properties)
            })
            .collect()
    }

    /// Sends every report through `sender` (the reference's `sendPluginMetrics`).
    pub async fn send_plugin_metrics(&self, sender: &dyn PluginMetricsSender) {
        for (config_id, properties) in self.take_reports() {
            if let Err(error) = sender.capture_plugin_metrics(config_id, properties).await {
                warn!("⚠️ Could not send $$plugin_metrics of plugin config {config_id}: {error}");
            }
        }
    }
}

/// Sends plugin metrics every 30 minutes (`*/30 * * * *`) until `shutdown`.
pub async fn run_plugin_metrics(
    manager: Arc<PluginMetricsManager>,
    sender: Arc<dyn PluginMetricsSender>,
    shutdown: CancellationToken,
) {
    cron::run_on_boundaries(PLUGIN_METRICS_PERIOD, shutdown, || {
        let manager = Arc::clone(&manager);
        let sender = Arc::clone(&sender);
        async move { manager.send_plugin_metrics(sender.as_ref()).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_like_the_reference() {
        let manager = PluginMetricsManager::new();
        let plugin = PluginIdentity { plugin_id: 60, plugin_name: "p".into(), plugin_tag: None };
        for value in [100.0, 10.0, -10.0] {
            manager.update_metric(39, &plugin, MetricOperation::Increment, "sum", value).unwrap();
        }
        for value in [5.0, 10.0] {
            manager.update_metric(39, &plugin, MetricOperation::Max, "max", value).unwrap();
        }
        for value in [4.0, 1.0] {
            manager.update_metric(39, &plugin, MetricOperation::Min, "min", value).unwrap();
        }
        let reports = manager.take_reports();
        assert_eq!(reports.len(), 1);
        let properties = Value::Object(reports[0].1.clone());
        assert_eq!(
            properties,
            json!({"sum": 100, "max": 10, "min": 1, "plugin_name": "p", "plugin_id": 60, "plugin_tag": null})
        );
        assert!(manager.take_reports().is_empty());
        assert_eq!(
            manager.update_metric(39, &plugin, MetricOperation::Increment, "sum", f64::NAN),
            Err(PluginMetricsError::NotANumber)
        );
    }
}
