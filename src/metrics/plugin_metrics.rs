//! The plugin-metrics period: every 30 minutes (`*/30 * * * *`, the reference's
//! `sendPluginMetrics` cron) the accumulated `meta.metrics` values go out as `$$plugin_metrics`
//! events and the accumulators reset.
//!
//! The accumulators themselves, and capturing as the plugin config, are the plugins side's
//! (`plugins::extensions::metrics`), reached through [`PluginMetricsSender`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::infra::cron;

/// `*/30 * * * *`.
pub const PLUGIN_METRICS_PERIOD: Duration = Duration::from_secs(30 * 60);

/// Whatever holds the accumulators (the plugins).
#[async_trait]
pub trait PluginMetricsSender: Send + Sync {
    /// Captures one `$$plugin_metrics` event per config with values, then resets them all.
    async fn send_plugin_metrics(&self);
}

/// Sends plugin metrics every 30 minutes, on the wall clock's boundaries, until `shutdown`.
pub async fn run_plugin_metrics(sender: Arc<dyn PluginMetricsSender>, shutdown: CancellationToken) {
    run_plugin_metrics_every(PLUGIN_METRICS_PERIOD, sender, shutdown).await
}

/// [`run_plugin_metrics`] with another period (tests).
pub async fn run_plugin_metrics_every(
    period: Duration,
    sender: Arc<dyn PluginMetricsSender>,
    shutdown: CancellationToken,
) {
    cron::run_on_boundaries(period, shutdown, || {
        let sender = Arc::clone(&sender);
        async move { sender.send_plugin_metrics().await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl PluginMetricsSender for Counting {
        async fn send_plugin_metrics(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn sends_on_each_boundary_until_shutdown() {
        let sender = Arc::new(Counting::default());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(run_plugin_metrics_every(
            Duration::from_millis(200),
            sender.clone() as Arc<dyn PluginMetricsSender>,
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        shutdown.cancel();
        running.await.unwrap();
        let sent = sender.0.load(Ordering::SeqCst);
        assert!((4..=6).contains(&sent), "sent {sent} times in 1.1 s at a 200 ms period");
    }
}
