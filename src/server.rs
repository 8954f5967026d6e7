//! The server's lifecycle: start-up order, the components that run until shutdown, signal
//! handling and graceful shutdown.
//!
//! Every long-running part of the server is a *component*: a named task that receives a
//! cancellation token and gets a shutdown budget. Components are stopped in reverse order of
//! start (consumers first, the health ping last). A component that ends on its own before shutdown
//! was asked for is a failure: it is logged and the server shuts down with exit code 1 rather than
//! limping on with a dead part.
//!
//! Signals (SIGINT, SIGTERM, SIGHUP): the first starts a graceful shutdown; the next one forces an
//! immediate exit. (The reference needs a third signal to force; a second is what operators expect.)
//! What each component does lives in its own module; this one only orders them.

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::health;
use crate::hub::{Hub, HubError};

/// Redis key announcing this server's job queue types, JSON-encoded as the reference writes it.
pub const ENABLED_JOB_QUEUES_KEY: &str = "@posthog-plugin-server/enabled-job-queues";

/// How long a component gets to stop unless it registers another budget.
pub const DEFAULT_SHUTDOWN_BUDGET: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("Redis error during start-up: {0}")]
    Redis(String),
    #[error("component {0} stopped unexpectedly")]
    ComponentFailed(String),
}

struct Component {
    name: String,
    budget: Duration,
    token: CancellationToken,
    handle: JoinHandle<()>,
}

/// The running components and the token that asks them all to stop.
pub struct Lifecycle {
    shutdown: CancellationToken,
    components: Vec<Component>,
    ended_sender: mpsc::UnboundedSender<String>,
    ended: mpsc::UnboundedReceiver<String>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new(CancellationToken::new())
    }
}

impl Lifecycle {
    /// `shutdown` is cancelled by the signal handler (or a test) to start the graceful shutdown.
    pub fn new(shutdown: CancellationToken) -> Self {
        let (ended_sender, ended) = mpsc::unbounded_channel();
        Lifecycle { shutdown, components: Vec::new(), ended_sender, ended }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts a component. `run` gets a token cancelled when the component must stop; it should
    /// then finish its in-flight work and return within `budget`.
    pub fn spawn<F, Fut>(&mut self, name: &str, budget: Duration, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let token = CancellationToken::new();
        let future = run(token.clone());
        let ended_sender = self.ended_sender.clone();
        let component_name = name.to_string();
        let handle = tokio::spawn(async move {
            future.await;
            let _ = ended_sender.send(component_name);
        });
        self.components.push(Component { name: name.to_string(), budget, token, handle });
    }

    /// Waits until shutdown is requested (`Ok`) or a component ends on its own (`Err`).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Ok(()),
            Some(name) = self.ended.recv() => Err(ServerError::ComponentFailed(name)),
        }
    }

    /// Stops every component, last started first, each within its budget; one that overruns is
    /// aborted and reported.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for component in self.components.into_iter().rev() {
            component.token.cancel();
            let mut handle = component.handle;
            match tokio::time::timeout(component.budget, &mut handle).await {
                Ok(Ok(())) => {}
                Ok(Err(join_error)) => error!("💥 Component {} failed while stopping: {join_error}", component.name),
                Err(_) => {
                    warn!("⌛ Component {} did not stop within {:?}; aborting it", component.name, component.budget);
                    handle.abort();
                }
            }
        }
    }
}

/// Installs the SIGINT/SIGTERM/SIGHUP handler: the first signal cancels `shutdown`, the next one
/// exits the process at once.
pub fn handle_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
                _ = hangup.recv() => "SIGHUP",
            };
            received += 1;
            if received == 1 {
                info!("💤 Received {name}, shutting down gracefully (send another signal to force)");
                shutdown.cancel();
            } else {
                warn!("❗️ Received {name} again: shutting down forcibly!");
                std::process::exit(0);
            }
        }
    });
    Ok(())
}

/// Runs the server until `shutdown` is cancelled: connects, starts every component, waits, and
/// stops everything gracefully. Returns an error (exit code 1) when start-up fails or a component
/// dies.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    info!("{} workers, {} tasks per worker", config.worker_threads(), config.tasks_per_worker());
    let hub = Hub::connect(config).await?;
    let mut lifecycle = Lifecycle::new(shutdown);
    let result = match start_components(&hub, &mut lifecycle).await {
        Ok(()) => {
            info!("🚀 All systems go");
            lifecycle.wait().await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        error!("💥 {error}");
    }
    lifecycle.stop().await;
    hub.close().await;
    info!("👋 Over and out!");
    result
}

/// The start-up order of the reference's `startPluginsServer`, one component per service.
async fn start_components(hub: &Hub, lifecycle: &mut Lifecycle) -> Result<(), ServerError> {
    announce_job_queues(hub).await?;
    let redis = hub.redis.clone();
    // The ping goes first so that it is stopped (and deleted) last.
    lifecycle.spawn("health ping", DEFAULT_SHUTDOWN_BUDGET, move |token| health::run_ping(redis, token));
    Ok(())
}

/// Writes the enabled job queue types, JSON-encoded (`"graphile"`), as the reference does.
async fn announce_job_queues(hub: &Hub) -> Result<(), ServerError> {
    let value = serde_json::Value::String(hub.config.job_queue_types().join(",")).to_string();
    let mut connection = hub.redis.get().await.map_err(|error| ServerError::Redis(error.to_string()))?;
    redis::cmd("SET")
        .arg(ENABLED_JOB_QUEUES_KEY)
        .arg(value)
        .query_async::<()>(&mut connection)
        .await
        .map_err(|error| ServerError::Redis(error.to_string()))
}

/// `PLUGIN_SERVER_IDLE` / `--idle`: stays up doing nothing, saying so every 30 s, until a signal.
pub async fn run_idle(shutdown: CancellationToken) {
    info!("💤 Disengaging this plugin server instance due to the PLUGIN_SERVER_IDLE env var...");
    let mut interval = tokio::time::interval(Duration::from_secs(30));
    interval.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => info!("💤 Plugin server still disengaged with PLUGIN_SERVER_IDLE..."),
        }
    }
    info!("👋 Over and out!");
}
