//! Internal metrics (`CAPTURE_INTERNAL_METRICS`): counters such as
//! `$$plugin_server_events_processed`, flushed every minute at second 0 as events of the
//! PostHog team flagged `for_internal_metrics`, straight into ingestion (no plugins).
//!
//! This module owns the counters, the team lookup and the event shape; ingestion itself is an
//! [`EventIngester`] (the ingestEvent task).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map};
use sqlx::PgPool;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::event::PluginEvent;
use crate::infra::{cron, BoxError};

/// The counter the main pipeline increments per event handled.
pub const EVENTS_PROCESSED: &str = "$$plugin_server_events_processed";

/// Ingests one event without running plugins (the reference's `ingestEvent` task).
#[async_trait]
pub trait EventIngester: Send + Sync {
    async fn ingest_event(&self, event: PluginEvent) -> Result<(), BoxError>;
}

/// The counters. Shared as `Arc<InternalMetrics>`; `incr` is cheap.
#[derive(Default)]
pub struct InternalMetrics {
    counters: Mutex<BTreeMap<String, i64>>,
    /// The internal-metrics team, looked up once (also when there is none, as the reference does).
    team_id: OnceCell<Option<i64>>,
}

impl InternalMetrics {
    pub fn new() -> InternalMetrics {
        InternalMetrics::default()
    }

    pub fn incr(&self, metric: &str) {
        if let Ok(mut counters) = self.counters.lock() {
            *counters.entry(metric.to_string()).or_default() += 1;
        }
    }

    /// The current counts (for tests and debugging).
    pub fn snapshot(&self) -> BTreeMap<String, i64> {
        self.counters.lock().map(|counters| counters.clone()).unwrap_or_default()
    }

    async fn team_id(&self, postgres: &PgPool) -> Result<Option<i64>, sqlx::Error> {
        self.team_id
            .get_or_try_init(|| async {
                let row: Option<i64> = sqlx::query_scalar(
                    "SELECT posthog_team.id::bigint AS team_id
                     FROM posthog_team
                     INNER JOIN posthog_organization ON posthog_organization.id = posthog_team.organization_id
                     WHERE for_internal_metrics",
                )
                .fetch_optional(postgres)
                .await?;
                Ok(row)
            })
            .await
            .copied()
    }

    /// Sends one event per counter to the internal-metrics team and resets the counters. Without
    /// such a team nothing is sent and the counters keep counting. Returns the events sent.
    pub async fn flush(&self, postgres: &PgPool, ingester: &dyn EventIngester) -> Result<usize, sqlx::Error> {
        let Some(team_id) = self.team_id(postgres).await? else {
            return Ok(0);
        };
        let counters = match self.counters.lock() {
            Ok(mut counters) => std::mem::take(&mut *counters),
            Err(_) => return Ok(0),
        };
        let events = counters.into_iter().map(|(name, value)| internal_metric_event(team_id, name, value));
        let results = futures::future::join_all(events.map(|event| ingester.ingest_event(event))).await;
        for error in results.iter().filter_map(|result| result.as_ref().err()) {
            warn!("⚠️ Could not ingest an internal metric: {error}");
        }
        Ok(results.len())
    }
}

/// `{event, properties: {value}, distinct_id: 'plugin_server', team_id, ip: null, site_url: '',
/// now, uuid}`. The uuid is time-ordered (v7), as the reference's UUIDT is.
pub fn internal_metric_event(team_id: i64, name: String, value: i64) -> PluginEvent {
    let mut properties = Map::new();
    properties.insert("value".into(), json!(value));
    PluginEvent {
        distinct_id: "plugin_server".into(),
        ip: None,
        site_url: String::new(),
        team_id,
        now: crate::health::iso_now(),
        event: name,
        sent_at: None,
        properties: Some(properties),
        timestamp: None,
        offset: None,
        set: None,
        set_once: None,
        uuid: Some(uuid::Uuid::now_v7().to_string()),
        extra: Map::new(),
    }
}

/// Flushes every minute at second 0 until `shutdown`.
pub async fn run_internal_metrics(
    metrics: Arc<InternalMetrics>,
    postgres: PgPool,
    ingester: Arc<dyn EventIngester>,
    shutdown: CancellationToken,
) {
    run_internal_metrics_every(metrics, postgres, ingester, cron::EVERY_MINUTE, shutdown).await
}

/// [`run_internal_metrics`] with another period (tests).
pub async fn run_internal_metrics_every(
    metrics: Arc<InternalMetrics>,
    postgres: PgPool,
    ingester: Arc<dyn EventIngester>,
    period: Duration,
    shutdown: CancellationToken,
) {
    cron::run_on_boundaries(period, shutdown, || {
        let metrics = Arc::clone(&metrics);
        let postgres = postgres.clone();
        let ingester = Arc::clone(&ingester);
        async move {
            if let Err(error) = metrics.flush(&postgres, ingester.as_ref()).await {
                warn!("⚠️ Could not flush internal metrics: {error}");
            }
        }
    })
    .await
}
