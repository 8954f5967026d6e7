//! The Prometheus recorder behind `/metrics`: the `metrics` facade with
//! `metrics-exporter-prometheus`, installed once per process when `HTTP_SERVER_PORT` is not 0.
//! Until then (and with the port at 0) every Prometheus call in [`super::catalog`] is skipped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::catalog::DURATION_BUCKETS;
use super::MetricsError;

static ENABLED: AtomicBool = AtomicBool::new(false);
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether the recorder is installed.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let setup = |reason: String| MetricsError::Setup { target: "Prometheus".into(), reason };
    let builder = PrometheusBuilder::new().set_buckets(DURATION_BUCKETS).map_err(|error| setup(error.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|error| setup(error.to_string()))?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(handle)
}
