//! The server's lifecycle: the components that run until shutdown, signal handling and graceful
//! shutdown. Which components start, and in what order, is `server`'s wiring.
//!
//! Every long-running part of the server is a *component*: a named task that receives a
//! cancellation token and gets a shutdown budget. Components are stopped in reverse order of
//! start (consumers first, the health ping last). A component that ends on its own before shutdown
//! was asked for (it returns, `Ok` or `Err` alike, or it panics) is a failure: the health ping
//! stops at once (its key is deleted, so `--healthcheck` fails), the failure is logged and the
//! server shuts down with exit code 1 rather than limping on with a dead part.
//!
//! Signals (SIGINT, SIGTERM, SIGHUP): the first starts a graceful shutdown; the next one forces an
//! immediate exit. (The reference needs a third signal to force; a second is what operators expect.)

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health;
use crate::server::ServerError;

/// How long a component gets to stop unless it registers another budget.
pub const DEFAULT_SHUTDOWN_BUDGET: Duration = Duration::from_secs(10);

/// How a component ended on its own.
#[derive(Debug)]
struct Ended {
    name: String,
    /// The panic message, when it panicked.
    panic: Option<String>,
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
    ended_sender: mpsc::UnboundedSender<Ended>,
    ended: mpsc::UnboundedReceiver<Ended>,
    health: health::Liveness,
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
        Lifecycle { shutdown, components: Vec::new(), ended_sender, ended, health: health::Liveness::default() }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether every component is alive: the health ping writes only while it is.
    pub fn liveness(&self) -> health::Liveness {
        self.health.clone()
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
        let (health, own_token) = (self.health.clone(), token.clone());
        let handle = tokio::spawn(async move {
            // A panic is caught here (not in a detached task) so that it is noticed like a return.
            let panic = AssertUnwindSafe(future).catch_unwind().await.err().map(|payload| panic_message(&*payload));
            if !own_token.is_cancelled() {
                // Dead before it was asked to stop: the ping stops now, not after the shutdown.
                health.mark_dead(&component_name);
                let _ = ended_sender.send(Ended { name: component_name, panic });
            }
        });
        self.components.push(Component { name: name.to_string(), budget, token, handle });
    }

    /// Waits until shutdown is requested (`Ok`) or a component ends on its own (`Err`): returning
    /// (`Ok` or `Err` alike) or panicking before its token was cancelled.
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Ok(()),
            Some(ended) = self.ended.recv() => Err(match ended.panic {
                Some(message) => ServerError::ComponentPanicked(ended.name, message),
                None => ServerError::ComponentFailed(ended.name),
            }),
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

/// The text of a panic payload (`panic!("…")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-text panic payload".to_string()
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
