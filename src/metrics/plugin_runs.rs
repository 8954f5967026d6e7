//! Each finished plugin call as the reference reports it (spec 30 §6, 40 §6): statsd timings and
//! error counters and Prometheus histograms (`catalog::plugin_call`), and the time added to the
//! hourly status report.

use std::sync::Arc;

use crate::metrics::status_report::{PluginFunction, StatusReport};
use crate::metrics::Metrics;
use crate::plugins::extensions::{PluginRun, RunObserver};

/// The server's [`RunObserver`].
pub struct PluginRunRecorder {
    metrics: Metrics,
    report: Arc<StatusReport>,
}

impl PluginRunRecorder {
    pub fn new(metrics: Metrics, report: Arc<StatusReport>) -> PluginRunRecorder {
        PluginRunRecorder { metrics, report }
    }
}

impl RunObserver for PluginRunRecorder {
    fn plugin_ran(&self, run: &PluginRun<'_>) {
        let function = match run.function {
            "processEvent" => Some(PluginFunction::ProcessEvent),
            "onEvent" => Some(PluginFunction::OnEvent),
            "onSnapshot" => Some(PluginFunction::OnSnapshot),
            "pluginTask" => Some(PluginFunction::PluginTask),
            _ => None,
        };
        if let Some(function) = function {
            // Whole milliseconds, as the reference's Date differences.
            let milliseconds = run.elapsed.as_millis() as f64;
            self.report.add_to_time_spent_running_plugins(run.team_id, milliseconds, function);
        }
        crate::metrics::catalog::plugin_call(
            &self.metrics,
            &crate::metrics::catalog::PluginCall {
                team_id: run.team_id,
                plugin_config_id: run.plugin_config_id,
                plugin_name: run.plugin_name,
                function: run.function,
                elapsed: run.elapsed,
                failed: run.failed,
                task: run.task,
            },
        );
    }
}
