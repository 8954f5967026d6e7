//! The HTTP endpoints on `HTTP_SERVER_PORT` (as PostHog's later plugin servers have them; `0`
//! turns the listener off):
//! * `GET /_health`: 200 while every component is alive, 503 naming the dead ones;
//! * `GET /_ready`: 200 once every component started (the consumers are consuming), 503 before,
//!   during shutdown and once a component died;
//! * `GET /metrics`: the Prometheus text format ([`super::prometheus`]); the gauges that describe
//!   the present (queue depth, in-flight work, VM memory) are read at each scrape through a
//!   [`ScrapeGauges`].
//!
//! Answers are small JSON bodies (`{"status":"ok"}`, `{"status":"error","dead":[...]}`); any other
//! path is a 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::MetricsError;
use crate::health::Liveness;

/// How often the histograms' buffers are folded in when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Sets the point-in-time gauges just before `/metrics` renders.
#[async_trait]
pub trait ScrapeGauges: Send + Sync {
    async fn update(&self);
}

/// What the endpoints answer from.
#[derive(Clone)]
pub struct HttpState {
    pub liveness: Liveness,
    pub prometheus: PrometheusHandle,
    pub gauges: Option<Arc<dyn ScrapeGauges>>,
}

/// Binds `0.0.0.0:port` (`port` 0 picks a free port: tests).
pub async fn bind(port: u16) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(("0.0.0.0", port)).await.map_err(|error| MetricsError::Setup {
        target: format!("HTTP server on port {port}"),
        reason: error.to_string(),
    })
}

/// Serves the endpoints on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    if let Ok(address) = listener.local_addr() {
        info!("🌐 Serving /_health, /_ready and /metrics on {address}");
    }
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = upkeep.tick() => state.prometheus.run_upkeep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => spawn_connection(stream, peer, state.clone(), shutdown.clone()),
                Err(error) => {
                    warn!("⚠️ HTTP accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

fn spawn_connection(stream: tokio::net::TcpStream, peer: SocketAddr, state: HttpState, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let service = service_fn(move |request: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(respond(&state, &request).await) }
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            result = connection => if let Err(error) = result {
                debug!("HTTP connection from {peer} ended: {error}");
            },
        }
    });
}

fn answer(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn json_answer(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    answer(status, "application/json", body.to_string())
}

/// The answer to one request.
pub async fn respond<B>(state: &HttpState, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return json_answer(StatusCode::METHOD_NOT_ALLOWED, json!({"status": "error", "error": "GET only"}));
    }
    match request.uri().path() {
        "/_health" => {
            let dead = state.liveness.dead_components();
            if dead.is_empty() {
                json_answer(StatusCode::OK, json!({"status": "ok"}))
            } else {
                json_answer(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "error", "dead": dead}))
            }
        }
        "/_ready" => {
            if state.liveness.is_ready() {
                json_answer(StatusCode::OK, json!({"status": "ok"}))
            } else {
                let dead = state.liveness.dead_components();
                json_answer(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "not ready", "dead": dead}))
            }
        }
        "/metrics" => {
            if let Some(gauges) = &state.gauges {
                gauges.update().await;
            }
            answer(StatusCode::OK, "text/plain; version=0.0.4", state.prometheus.render())
        }
        _ => json_answer(StatusCode::NOT_FOUND, json!({"status": "error", "error": "not found"})),
    }
}

/// The running server's point-in-time gauges: plugin calls in flight and waiting, events in
/// flight per consumer, the Celery list's length, and each plugin config's VM heap.
pub struct ServerGauges {
    pub pool: Arc<crate::plugins::runtime::WorkerPool>,
    pub plugins: Arc<crate::plugins::Plugins>,
    /// `(consumer name, its counters)`: in flight = received − handled − dead-lettered − requeued.
    pub consumers: Vec<(&'static str, Arc<crate::sources::QueueStats>)>,
    /// The Celery list and a connection to read its length.
    pub celery_queue: Option<(deadpool_redis::Pool, String)>,
}

/// How long one scrape waits for the VMs' memory figures (a busy thread answers late).
const MEMORY_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait]
impl ScrapeGauges for ServerGauges {
    async fn update(&self) {
        use super::catalog;

        let stats = self.pool.stats();
        catalog::in_flight("plugin_calls", stats.in_flight as f64);
        catalog::queue_depth("plugin_calls_waiting_for_share", stats.waiting_for_share as f64);
        for (name, counters) in &self.consumers {
            let snapshot = counters.snapshot();
            let done = snapshot.handled + snapshot.dead_lettered + snapshot.requeued;
            catalog::in_flight(name, snapshot.received.saturating_sub(done) as f64);
        }
        if let Some((redis, queue)) = &self.celery_queue {
            if let Ok(mut connection) = redis.get().await {
                let length: Result<i64, _> = redis::cmd("LLEN").arg(queue).query_async(&mut connection).await;
                if let Ok(length) = length {
                    catalog::queue_depth("celery", length as f64);
                }
            }
        }
        for config in self.plugins.configs() {
            let usage = tokio::time::timeout(MEMORY_ANSWER_TIMEOUT, self.pool.memory_usage(i64::from(config.id))).await;
            if let Ok(per_thread) = usage {
                let bytes: i64 = per_thread.iter().sum();
                catalog::plugin_vm_memory(config.team(), config.id, &config.plugin.name(), bytes);
            }
        }
    }
}

/// The bound listener and what it answers from; [`HttpServer::serve`] runs it.
pub struct HttpServer {
    listener: TcpListener,
    state: HttpState,
}

impl HttpServer {
    /// Binds `HTTP_SERVER_PORT` (`None` when it is 0) with the Prometheus recorder installed.
    pub async fn bind(
        port: u16,
        liveness: Liveness,
        gauges: Option<Arc<dyn ScrapeGauges>>,
    ) -> Result<Option<HttpServer>, MetricsError> {
        if port == 0 {
            return Ok(None);
        }
        let prometheus = super::prometheus::install()?;
        let listener = bind(port).await?;
        Ok(Some(HttpServer { listener, state: HttpState { liveness, prometheus, gauges } }))
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub async fn serve(self, shutdown: CancellationToken) {
        serve(self.listener, self.state, shutdown).await
    }
}
