//! Observability: statsd metrics, Sentry, the status report, internal metrics, plugin metrics and
//! the staleness restart.
//!
//! This file owns the statsd client's face, [`Metrics`]: UDP to `STATSD_HOST:STATSD_PORT`, every
//! name prefixed with `STATSD_PREFIX` exactly as hot-shots does (plain concatenation), tags in
//! the telegraf format the reference uses (`prefix.name,tag=value:1|c`). Without `STATSD_HOST`
//! every call is a no-op. Install one client with [`install`] at start-up; any module records
//! through [`global`] without plumbing. A call only queues a sample; `statsd` (the wire) formats,
//! packs and sends them from a thread of its own at least every [`FLUSH_EVERY`]. The metric names
//! live in `catalog` (the only module that names metrics; every call site calls one of its
//! functions).
//!
//! Submodules: `catalog` (every metric, statsd and Prometheus), `statsd` (keys, queue, datagrams),
//! `handles` (Prometheus handles kept once resolved), `prometheus` (the `/metrics` recorder),
//! `http` (`/_health`, `/_ready`, `/metrics` on `HTTP_SERVER_PORT`), `sentry` (init and capture
//! helpers), `status_report` (`$plugin_running_duration`), `internal` (`CAPTURE_INTERNAL_METRICS`),
//! `plugin_metrics` (`$$plugin_metrics`), `staleness` (`STALENESS_RESTART_SECONDS`).

pub mod catalog;
pub mod handles;
pub mod http;
pub mod internal;
pub mod plugin_metrics;
pub mod plugin_runs;
pub mod prometheus;
pub mod sentry;
pub mod staleness;
pub mod statsd;
pub mod status_report;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
pub use statsd::{StatsdKey, DATAGRAM_BYTES, FLUSH_EVERY};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("Cannot set up StatsD at {target}: {reason}")]
    Setup { target: String, reason: String },
}

/// The statsd client. Cheap to clone; a disabled one does nothing.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<statsd::Statsd>>,
}

impl Metrics {
    /// Sends to `STATSD_HOST:STATSD_PORT` with `STATSD_PREFIX`; disabled when `STATSD_HOST` is unset.
    pub fn from_config(config: &Config) -> Result<Metrics, MetricsError> {
        let Some(host) = &config.STATSD_HOST else {
            return Ok(Metrics::disabled());
        };
        let metrics = Metrics::udp(host, config.STATSD_PORT, &config.STATSD_PREFIX)?;
        info!("🪵 Sending metrics to StatsD at {host}:{}, prefix: \"{}\"", config.STATSD_PORT, config.STATSD_PREFIX);
        Ok(metrics)
    }

    /// A client sending datagrams to `host:port`.
    pub fn udp(host: &str, port: u16, prefix: &str) -> Result<Metrics, MetricsError> {
        let statsd = statsd::Statsd::udp(host, port, prefix)
            .map_err(|reason| MetricsError::Setup { target: format!("{host}:{port}"), reason })?;
        Ok(Metrics { inner: Some(statsd) })
    }

    pub fn disabled() -> Metrics {
        Metrics { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Counter +1 (hot-shots `increment(name, tags)`).
    pub fn increment(&self, name: &str, tags: &[(&str, &str)]) {
        self.count(name, 1, tags);
    }

    /// Counter + `value`.
    pub fn count(&self, name: &str, value: i64, tags: &[(&str, &str)]) {
        self.record(&[name], tags, statsd::Value::Count(value));
    }

    /// Timing in whole milliseconds.
    pub fn timing(&self, name: &str, elapsed: Duration, tags: &[(&str, &str)]) {
        self.record(&[name], tags, millis(elapsed));
    }

    /// Timing since `start` (hot-shots `timing(name, date)`).
    pub fn timing_since(&self, name: &str, start: Instant, tags: &[(&str, &str)]) {
        self.timing(name, start.elapsed(), tags);
    }

    pub fn gauge(&self, name: &str, value: f64, tags: &[(&str, &str)]) {
        self.record(&[name], tags, statsd::Value::Gauge(value));
    }

    /// One metric named by the concatenation of `name` (no `format!` for templated names).
    pub fn record(&self, name: &[&str], tags: &[(&str, &str)], value: statsd::Value) {
        if let Some(statsd) = &self.inner {
            statsd.record(name, tags, value);
        }
    }

    /// One metric of a fixed name and tags (its key looked up once).
    pub fn record_key(&self, key: &StatsdKey, value: statsd::Value) {
        if let Some(statsd) = &self.inner {
            statsd.record_key(key, value);
        }
    }

    /// One metric whose key number `cache` keeps under `key` (see [`statsd::KeyCache`]).
    pub fn record_cached<K: std::hash::Hash + Eq>(
        &self,
        cache: &statsd::KeyCache<K>,
        key: K,
        name: &[&str],
        tags: &[(&str, &str)],
        value: statsd::Value,
    ) {
        if let Some(statsd) = &self.inner {
            statsd.record_cached(cache, key, name, tags, value);
        }
    }

    /// Sends the queued lines now.
    pub fn flush(&self) {
        if let Some(statsd) = &self.inner {
            statsd.flush();
        }
    }
}

/// A duration as statsd's whole milliseconds.
pub fn millis(elapsed: Duration) -> statsd::Value {
    statsd::Value::Millis(elapsed.as_millis() as u64)
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// Makes `metrics` the process-wide client returned by [`global`]. Only the first call counts.
pub fn install(metrics: Metrics) {
    let _ = GLOBAL.set(metrics);
}

/// The installed client, or a disabled one.
pub fn global() -> &'static Metrics {
    static DISABLED: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get().unwrap_or_else(|| DISABLED.get_or_init(Metrics::disabled))
}

/// Reports `event_loop_lag` every 2 s: how late a freshly spawned task starts on the runtime (the
/// tokio counterpart of the reference's setImmediate lag).
pub async fn run_event_loop_lag(metrics: Metrics, shutdown: CancellationToken) {
    if !metrics.is_enabled() && !prometheus::enabled() {
        return shutdown.cancelled().await;
    }
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {
                let start = Instant::now();
                let _ = tokio::spawn(async move { start.elapsed() }).await.map(|lag| catalog::event_loop_lag(&metrics, lag));
            }
        }
    }
}

/// Worker pool statistics as `(name, value)` pairs (`utilization`, `threads`, `queue_size`,
/// `waitTime.p99`, ...), supplied by the pool.
pub type PoolStats = Arc<dyn Fn() -> Vec<(String, f64)> + Send + Sync>;

/// Every 10 s (`*/10 * * * * *`) reports each pool statistic as the gauge `piscina.<name>`, as
/// the reference does for its Piscina pool.
pub async fn run_pool_stats(metrics: Metrics, stats: PoolStats, shutdown: CancellationToken) {
    run_pool_stats_every(metrics, stats, Duration::from_secs(10), shutdown).await
}

/// [`run_pool_stats`] with another period (tests).
pub async fn run_pool_stats_every(metrics: Metrics, stats: PoolStats, period: Duration, shutdown: CancellationToken) {
    crate::infra::cron::run_on_boundaries(period, shutdown, || {
        for (name, value) in stats() {
            catalog::pool_stat(&metrics, &name, value);
        }
        std::future::ready(())
    })
    .await
}

/// A JavaScript-style number: whole values become JSON integers (`2`, not `2.0`), as
/// `JSON.stringify` writes them.
pub fn js_number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0 {
        Value::from(value as i64)
    } else {
        serde_json::Number::from_f64(value).map(Value::Number).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_numbers() {
        assert_eq!(js_number(2.0).to_string(), "2");
        assert_eq!(js_number(2.5).to_string(), "2.5");
    }
}
