//! The staleness restart (`STALENESS_RESTART_SECONDS`): when no event has been dispatched for
//! longer than the threshold, report to Sentry
//! (`Plugin Server has not ingested events for over <N> seconds! Rebooting.` with `instanceId`,
//! `lastActivity`, `lastActivityType`, `piscina`), count `alerts.stale_plugin_server_restarted`
//! and ask the server to stop so the process manager restarts it.
//!
//! [REF-BUG 3 fixed] the reference checks every `min(seconds, 10000)` *milliseconds*; this checks
//! every `min(seconds, 10)` seconds, with the same trigger.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sentry::protocol::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::metrics::sentry::capture_message_with_extra;
use crate::metrics::{js_number, Metrics};

/// When the main pipeline last did something, and what (`serverStart`, `processEvent`, ...).
pub struct ActivityTracker {
    last: Mutex<(DateTime<Utc>, String)>,
}

impl Default for ActivityTracker {
    fn default() -> Self {
        ActivityTracker::new()
    }
}

impl ActivityTracker {
    /// Starts at "now", type `serverStart`.
    pub fn new() -> ActivityTracker {
        ActivityTracker { last: Mutex::new((Utc::now(), "serverStart".into())) }
    }

    /// Records activity of `kind` (`onEvent`, `onSnapshot`, `processEvent`, `ingestEvent`).
    pub fn record(&self, kind: &str) {
        if let Ok(mut last) = self.last.lock() {
            *last = (Utc::now(), kind.to_string());
        }
    }

    pub fn last(&self) -> (DateTime<Utc>, String) {
        self.last.lock().map(|last| last.clone()).unwrap_or_else(|_| (Utc::now(), String::new()))
    }
}

/// What the check needs besides the tracker.
pub struct StalenessCheck {
    pub threshold: Duration,
    pub instance_id: String,
    pub metrics: Metrics,
    /// The worker pool's statistics as JSON text, for the report's `piscina` field.
    pub pool_stats: Box<dyn Fn() -> String + Send + Sync>,
}

impl StalenessCheck {
    /// The Sentry message for a threshold, with the reference's wording.
    pub fn message(&self) -> String {
        format!(
            "Plugin Server has not ingested events for over {} seconds! Rebooting.",
            js_number(self.threshold.as_secs_f64())
        )
    }

    /// Runs until `shutdown`; when stale, reports once and cancels `restart` (the server's
    /// shutdown token), then returns.
    pub async fn run(self, tracker: Arc<ActivityTracker>, restart: CancellationToken, shutdown: CancellationToken) {
        if self.threshold.is_zero() {
            return shutdown.cancelled().await;
        }
        let mut interval = tokio::time::interval(self.threshold.min(Duration::from_secs(10)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let (last_activity, last_type) = tracker.last();
            let idle = (Utc::now() - last_activity).to_std().unwrap_or(Duration::ZERO);
            if idle <= self.threshold {
                continue;
            }
            let message = self.message();
            let mut extra = Map::new();
            extra.insert("instanceId".into(), Value::String(self.instance_id.clone()));
            extra.insert(
                "lastActivity".into(),
                Value::String(last_activity.to_rfc3339_opts(SecondsFormat::Millis, true)),
            );
            extra.insert("lastActivityType".into(), Value::String(last_type));
            extra.insert("piscina".into(), Value::String((self.pool_stats)()));
            capture_message_with_extra(&message, sentry::Level::Error, extra);
            error!("🕰 {message}");
            crate::metrics::catalog::stale_restart(&self.metrics);
            restart.cancel();
            // Ending now would look like a crashed component; wait for the shutdown we asked for.
            return shutdown.cancelled().await;
        }
    }
}
