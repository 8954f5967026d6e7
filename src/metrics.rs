//! Observability: statsd metrics, Sentry, the status report, internal metrics, plugin metrics and
//! the staleness restart.
//!
//! This file owns the statsd client: cadence over UDP to `STATSD_HOST:STATSD_PORT`, every name
//! prefixed with `STATSD_PREFIX` exactly as hot-shots does (plain concatenation), tags in the
//! telegraf format the reference uses (`prefix.name,tag=value:1|c`). Without `STATSD_HOST`
//! every call is a no-op. Install one client with [`install`] at start-up; any module records
//! through [`global`] without plumbing. The metric names are the reference's (spec 40 §6.4);
//! each call site chooses its own.
//!
//! Submodules: `sentry` (init and capture helpers), `status_report` (`$plugin_running_duration`),
//! `internal` (`CAPTURE_INTERNAL_METRICS`), `plugin_metrics` (`$$plugin_metrics`), `staleness`
//! (`STALENESS_RESTART_SECONDS`).

pub mod internal;
pub mod plugin_metrics;
pub mod plugin_runs;
pub mod sentry;
pub mod staleness;
pub mod status_report;

use std::future::Future;
use std::io;
use std::net::UdpSocket;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cadence::prelude::*;
use cadence::{Metric, MetricBuilder, MetricSink, StatsdClient, UdpMetricSink};
use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("Cannot set up StatsD at {target}: {reason}")]
    Setup { target: String, reason: String },
}

/// The statsd client. Cheap to clone; a disabled one does nothing.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Statsd>>,
}

struct Statsd {
    client: StatsdClient,
    prefix: String,
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
        let target = format!("{host}:{port}");
        let setup_error = |reason: String| MetricsError::Setup { target: target.clone(), reason };
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|error| setup_error(error.to_string()))?;
        socket.set_nonblocking(true).map_err(|error| setup_error(error.to_string()))?;
        let sink = UdpMetricSink::from((host, port), socket).map_err(|error| setup_error(error.to_string()))?;
        Ok(Metrics::with_sink(TelegrafSink(sink), prefix))
    }

    /// A client over any cadence sink (the sink receives telegraf-formatted lines when wrapped
    /// in [`TelegrafSink`]).
    pub fn with_sink<S: MetricSink + Send + Sync + std::panic::RefUnwindSafe + 'static>(
        sink: S,
        prefix: &str,
    ) -> Metrics {
        let client =
            StatsdClient::builder("", sink).with_error_handler(|error| warn!("⚠️ StatsD error: {error}")).build();
        Metrics { inner: Some(Arc::new(Statsd { client, prefix: prefix.to_string() })) }
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
        self.emit(name, tags, |client, key| client.count_with_tags(key, value));
    }

    /// Timing in whole milliseconds.
    pub fn timing(&self, name: &str, elapsed: Duration, tags: &[(&str, &str)]) {
        let millis = elapsed.as_millis() as u64;
        self.emit(name, tags, |client, key| client.time_with_tags(key, millis));
    }

    /// Timing since `start` (hot-shots `timing(name, date)`).
    pub fn timing_since(&self, name: &str, start: Instant, tags: &[(&str, &str)]) {
        self.timing(name, start.elapsed(), tags);
    }

    pub fn gauge(&self, name: &str, value: f64, tags: &[(&str, &str)]) {
        self.emit(name, tags, |client, key| client.gauge_with_tags(key, value));
    }

    /// Prefixes the name, adds the sanitised tags and sends one metric.
    fn emit<T>(
        &self,
        name: &str,
        tags: &[(&str, &str)],
        build: impl for<'a> FnOnce(&'a StatsdClient, &'a str) -> MetricBuilder<'a, 'a, T>,
    ) where
        T: Metric + From<String>,
    {
        let Some(statsd) = &self.inner else { return };
        let key = statsd.key(name);
        let tags = sanitize_tags(tags);
        let mut builder = build(&statsd.client, &key);
        for (tag, tag_value) in &tags {
            builder = builder.with_tag(tag, tag_value);
        }
        builder.send();
    }

    /// The reference's `instrumentQuery`: `<name>.total` counter before, `<name>` timing after,
    /// both tagged `queryTag` when a tag is given.
    pub async fn instrument_query<T, F: Future<Output = T>>(&self, name: &str, tag: Option<&str>, query: F) -> T {
        let tags: Vec<(&str, &str)> = tag.map(|tag| vec![("queryTag", tag)]).unwrap_or_default();
        self.increment(&format!("{name}.total"), &tags);
        let start = Instant::now();
        let result = query.await;
        self.timing_since(name, start, &tags);
        result
    }
}

impl Statsd {
    fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }
}

/// hot-shots' telegraf sanitising: `:` and `|` in tag keys and values become `_`. We also replace
/// `,` (it would split the tag list).
fn sanitize_tags(tags: &[(&str, &str)]) -> Vec<(String, String)> {
    let clean = |text: &str| text.replace([':', '|', ','], "_");
    tags.iter().map(|(key, value)| (clean(key), clean(value))).collect()
}

/// Rewrites cadence's DogStatsD tag suffix into telegraf's form:
/// `name:1|c|#k:v,k2:v2` → `name,k=v,k2=v2:1|c`.
pub struct TelegrafSink<S>(pub S);

/// The telegraf form of one cadence line (see [`TelegrafSink`]).
pub fn to_telegraf(line: &str) -> String {
    let Some((body, tags)) = line.split_once("|#") else {
        return line.to_string();
    };
    let Some((name, rest)) = body.split_once(':') else {
        return line.to_string();
    };
    let tags: Vec<String> = tags
        .split(',')
        .filter(|tag| !tag.is_empty())
        .map(|tag| match tag.split_once(':') {
            Some((key, value)) => format!("{key}={value}"),
            None => tag.to_string(),
        })
        .collect();
    if tags.is_empty() {
        format!("{name}:{rest}")
    } else {
        format!("{name},{}:{rest}", tags.join(","))
    }
}

impl<S: MetricSink> MetricSink for TelegrafSink<S> {
    fn emit(&self, metric: &str) -> io::Result<usize> {
        self.0.emit(&to_telegraf(metric))
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
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
    if !metrics.is_enabled() {
        return shutdown.cancelled().await;
    }
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {
                let start = Instant::now();
                let _ = tokio::spawn(async move { start.elapsed() }).await.map(|lag| {
                    metrics.timing("event_loop_lag", lag, &[]);
                });
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
            metrics.gauge(&format!("piscina.{name}"), value, &[]);
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
    fn telegraf_lines() {
        assert_eq!(
            to_telegraf("p.query.postgres:5|ms|#queryTag:fetchTeam"),
            "p.query.postgres,queryTag=fetchTeam:5|ms"
        );
        assert_eq!(to_telegraf("p.a:1|c|#a:1,b:2"), "p.a,a=1,b=2:1|c");
        assert_eq!(to_telegraf("p.a:1|c"), "p.a:1|c");
    }

    #[test]
    fn js_numbers() {
        assert_eq!(js_number(2.0).to_string(), "2");
        assert_eq!(js_number(2.5).to_string(), "2.5");
    }
}
