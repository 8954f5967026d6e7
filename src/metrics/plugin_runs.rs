//! Each finished plugin call as the reference reports it (spec 30 §6, 40 §6): statsd timings and
//! error counters, and the time added to the hourly status report.

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

    /// The reference's statsd keys for one call.
    fn send_statsd(&self, run: &PluginRun<'_>) {
        let team_id = run.team_id.to_string();
        let plugin_and_team = [("plugin", run.plugin_name), ("teamId", team_id.as_str())];
        let name = run.plugin_name;
        match run.function {
            "processEvent" => {
                self.metrics.timing("plugin.process_event", run.elapsed, &plugin_and_team);
                if run.failed {
                    self.metrics.increment(&format!("plugin.{name}.process_event.ERROR"), &[]);
                }
            }
            // onSnapshot shares onEvent's keys in the reference.
            "onEvent" | "onSnapshot" => {
                self.metrics.timing(&format!("plugin.{name}.on_event"), run.elapsed, &[]);
                if run.failed {
                    self.metrics.increment(&format!("plugin.{name}.on_event.ERROR"), &[]);
                }
            }
            "exportEvents" if !run.failed => {
                self.metrics.timing("plugin.export_events.success", run.elapsed, &plugin_and_team);
            }
            "pluginTask" => {
                if let (true, Some((kind, task))) = (run.failed, run.task) {
                    let config_id = run.plugin_config_id;
                    self.metrics.increment(&format!("plugin.task.{kind}.{task}.{config_id}.ERROR"), &[]);
                }
            }
            _ => {}
        }
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
        if self.metrics.is_enabled() {
            self.send_statsd(run);
        }
    }
}
