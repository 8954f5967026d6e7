//! Shared by the queue benchmarks: a counting handler with an optional simulated pipeline latency,
//! peak RSS, and the reference's summary line.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::event::PluginEvent;
use plugin_server::sources::{EventHandler, HandleError};

/// `BENCH_EVENTS` (default 3000, the reference benchmark's count).
pub fn event_count() -> usize {
    std::env::var("BENCH_EVENTS").ok().and_then(|value| value.parse().ok()).unwrap_or(3000)
}

/// `BENCH_HANDLER_MS`: simulated time the pipeline takes per event (default 0).
pub fn handler_latency() -> Duration {
    Duration::from_millis(std::env::var("BENCH_HANDLER_MS").ok().and_then(|value| value.parse().ok()).unwrap_or(0))
}

/// `BENCH_CONCURRENCY`: events in flight (default 40 = 4 workers × 10 tasks, the reference's).
pub fn concurrency() -> usize {
    std::env::var("BENCH_CONCURRENCY").ok().and_then(|value| value.parse().ok()).unwrap_or(40)
}

#[derive(Default)]
pub struct CountingHandler {
    pub events: AtomicUsize,
    pub latency: Duration,
}

#[async_trait]
impl EventHandler for CountingHandler {
    async fn handle_event(&self, event: PluginEvent) -> Result<(), HandleError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        std::hint::black_box(event);
        self.events.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn handle_plugin_job(&self, _job: serde_json::Value) -> Result<(), HandleError> {
        Ok(())
    }
}

impl CountingHandler {
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.events.load(Ordering::Relaxed) < count {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

/// Peak resident set size of this process in MiB (`VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The reference benchmark's line, plus peak RSS.
pub fn report(label: &str, events: usize, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "[{label}] Ingested {events} events in {seconds:.2}s ({:.0} events/sec, {:.3} ms per event); peak RSS {:.1} MiB",
        events as f64 / seconds,
        seconds * 1000.0 / events as f64,
        peak_rss_mib()
    );
}
