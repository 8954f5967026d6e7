//! The status report: milliseconds each team spent in plugin functions, sent as
//! `$plugin_running_duration` (one event per team) every hour at minute 0 and once more at
//! shutdown, then reset (the reference's `statusReport`).
//!
//! Where the events go is a [`TelemetryClient`]: [`PostHogCloud`] (the reference's PostHog Cloud
//! client, project key `sTMFPsFhdP1Ssg`, off under `NODE_ENV=test`) or a test's recorder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::NodeEnv;
use crate::infra::cron;
use crate::metrics::js_number;

/// The plugin functions whose time is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginFunction {
    OnEvent,
    ProcessEvent,
    OnSnapshot,
    PluginTask,
}

/// Per-team accumulated milliseconds, in the reference's key order.
#[derive(Debug, Clone, Copy, Default)]
struct Durations {
    total: f64,
    on_event: f64,
    process_event: f64,
    on_snapshot: f64,
    plugin_task: f64,
}

impl Durations {
    fn properties(&self, team_id: i64) -> Value {
        let mut properties = Map::new();
        properties.insert("team".into(), json!(team_id));
        for (name, ms) in [
            ("total", self.total),
            ("onEvent", self.on_event),
            ("processEvent", self.process_event),
            ("onSnapshot", self.on_snapshot),
            ("pluginTask", self.plugin_task),
        ] {
            properties.insert(format!("{name}_time_ms"), js_number(ms));
            // Math.round(ms / 10) / 100: seconds with two decimals.
            properties.insert(format!("{name}_time_seconds"), js_number((ms / 10.0).round() / 100.0));
        }
        Value::Object(properties)
    }
}

/// Where telemetry events go.
#[async_trait]
pub trait TelemetryClient: Send + Sync {
    async fn capture(&self, event: &str, properties: Value);
}

/// The accumulator, shared by every thread that runs plugin functions.
#[derive(Default)]
pub struct StatusReport {
    per_team: Mutex<BTreeMap<i64, Durations>>,
}

impl StatusReport {
    pub fn new() -> StatusReport {
        StatusReport::default()
    }

    /// Adds `milliseconds` spent in `function` for `team_id`.
    pub fn add_to_time_spent_running_plugins(&self, team_id: i64, milliseconds: f64, function: PluginFunction) {
        let Ok(mut per_team) = self.per_team.lock() else { return };
        let durations = per_team.entry(team_id).or_default();
        let slot = match function {
            PluginFunction::OnEvent => &mut durations.on_event,
            PluginFunction::ProcessEvent => &mut durations.process_event,
            PluginFunction::OnSnapshot => &mut durations.on_snapshot,
            PluginFunction::PluginTask => &mut durations.plugin_task,
        };
        *slot += milliseconds;
        durations.total += milliseconds;
    }

    /// The `$plugin_running_duration` properties of every team (by team id), resetting the counts.
    pub fn take_report(&self) -> Vec<Value> {
        let Ok(mut per_team) = self.per_team.lock() else { return Vec::new() };
        std::mem::take(&mut *per_team).into_iter().map(|(team, durations)| durations.properties(team)).collect()
    }

    /// Sends the report through `client`.
    pub async fn capture(&self, client: &dyn TelemetryClient) {
        for properties in self.take_report() {
            client.capture("$plugin_running_duration", properties).await;
        }
    }
}

/// Sends the report every hour at minute 0 (`0 * * * *`) and once more when `shutdown` fires.
pub async fn run_status_report(
    report: Arc<StatusReport>,
    client: Arc<dyn TelemetryClient>,
    shutdown: CancellationToken,
) {
    run_status_report_every(report, client, cron::EVERY_HOUR, shutdown).await
}

/// [`run_status_report`] with another period (tests).
pub async fn run_status_report_every(
    report: Arc<StatusReport>,
    client: Arc<dyn TelemetryClient>,
    period: Duration,
    shutdown: CancellationToken,
) {
    cron::run_on_boundaries(period, shutdown, || {
        let report = Arc::clone(&report);
        let client = Arc::clone(&client);
        async move { report.capture(client.as_ref()).await }
    })
    .await;
    report.capture(client.as_ref()).await;
}

/// The PostHog Cloud project the reference reports to.
pub const POSTHOG_CLOUD_HOST: &str = "https://app.posthog.com";
pub const POSTHOG_CLOUD_PROJECT_KEY: &str = "sTMFPsFhdP1Ssg";

/// The reference's telemetry client (`posthog-js-lite` to PostHog Cloud), opted out in tests.
pub struct PostHogCloud {
    http: reqwest::Client,
    host: String,
    distinct_id: String,
    enabled: bool,
}

impl PostHogCloud {
    /// Sends as `distinct_id` (the server's instance id); disabled under `NODE_ENV=test`.
    pub fn new(node_env: NodeEnv, distinct_id: String) -> PostHogCloud {
        PostHogCloud::with_host(POSTHOG_CLOUD_HOST, node_env != NodeEnv::Test, distinct_id)
    }

    pub fn with_host(host: &str, enabled: bool, distinct_id: String) -> PostHogCloud {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
        PostHogCloud { http, host: host.trim_end_matches('/').to_string(), distinct_id, enabled }
    }
}

#[async_trait]
impl TelemetryClient for PostHogCloud {
    async fn capture(&self, event: &str, properties: Value) {
        if !self.enabled {
            debug!("telemetry opted out: {event}");
            return;
        }
        let body = json!({
            "api_key": POSTHOG_CLOUD_PROJECT_KEY,
            "event": event,
            "distinct_id": self.distinct_id,
            "properties": properties,
            "timestamp": crate::health::iso_now(),
        });
        let sent = self.http.post(format!("{}/capture/", self.host)).json(&body).send().await;
        if let Err(error) = sent.and_then(|response| response.error_for_status()) {
            warn!("⚠️ Could not send telemetry event {event}: {error}");
        }
    }
}
