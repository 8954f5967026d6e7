//! What every job queue engine offers (produce, consume) and how consumed jobs reach the plugins:
//! the [`JobRunner`] (implemented over the plugin pool) behind a [`Dispatcher`] that also owns
//! the pause state and the back-pressure check.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::hub::HubError;
use crate::infra::BoxError;
use crate::jobs::job::EnqueuedJob;
use crate::jobs::migrations::MigrationError;

#[derive(Debug, Error)]
pub enum JobQueueError {
    #[error("Unknown job queue \"{0}\"")]
    UnknownQueue(String),
    #[error("Can not use FsQueue outside tests")]
    FsOutsideTests,
    #[error("The s3 job queue is not supported by this server (use graphile)")]
    S3NotSupported,
    #[error("No JobQueue available")]
    NoQueueAvailable,
    #[error("job queue producer is not connected")]
    NotConnected,
    #[error(transparent)]
    Connect(#[from] HubError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("job queue database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("file job queue error at {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("invalid job: {0}")]
    InvalidJob(#[from] serde_json::Error),
}

/// Runs one plugin job (the reference's `runJob` worker task). Implemented over the plugin pool.
#[async_trait]
pub trait JobRunner: Send + Sync + 'static {
    /// Runs `job` and resolves when it finished; an error is logged, the job is not retried
    /// (jobs are at-most-once, as in the reference).
    async fn run_job(&self, job: EnqueuedJob) -> Result<(), BoxError>;

    /// `true` while the plugin pool is saturated: consumers then stop fetching jobs until it is
    /// not (the reference pauses the job queue and resumes it on the pool's drain).
    fn is_saturated(&self) -> bool {
        false
    }
}

/// At most this many dispatched jobs may be waiting for the runner before consumers pause.
pub const MAX_JOBS_IN_FLIGHT: usize = 1000;

/// Hands consumed jobs to the runner. Cloneable; all clones share the pause flag and the
/// in-flight count.
#[derive(Clone)]
pub struct Dispatcher {
    runner: Arc<dyn JobRunner>,
    paused: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    tasks: TaskTracker,
}

impl Dispatcher {
    pub fn new(runner: Arc<dyn JobRunner>, paused: Arc<AtomicBool>) -> Dispatcher {
        Dispatcher { runner, paused, in_flight: Arc::new(AtomicUsize::new(0)), tasks: TaskTracker::new() }
    }

    /// Whether consumers should fetch now: not paused, runner not saturated, not too many
    /// dispatched jobs waiting.
    pub fn ready(&self) -> bool {
        !self.paused.load(Ordering::Relaxed)
            && !self.runner.is_saturated()
            && self.in_flight.load(Ordering::Relaxed) < MAX_JOBS_IN_FLIGHT
    }

    /// Runs `jobs` one after the other, awaiting each (the reference's job callback).
    pub async fn run(&self, jobs: Vec<EnqueuedJob>) {
        for job in jobs {
            let description = format!("{} of plugin config {}", job.job_type, job.plugin_config_id);
            if let Err(error) = self.runner.run_job(job).await {
                warn!("🔴 Plugin job {description} failed: {error}");
            }
        }
    }

    /// Starts running `jobs` in the background and returns at once (graphile hands jobs over
    /// without awaiting them).
    pub fn spawn(&self, jobs: Vec<EnqueuedJob>) {
        let count = jobs.len();
        self.in_flight.fetch_add(count, Ordering::Relaxed);
        let dispatcher = self.clone();
        self.tasks.spawn(async move {
            dispatcher.run(jobs).await;
            dispatcher.in_flight.fetch_sub(count, Ordering::Relaxed);
        });
    }

    /// Waits for every job started with [`Dispatcher::spawn`].
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }
}

/// A queue's running consumer loop: started once, stopped by cancelling its token.
#[derive(Default)]
pub struct ConsumerTask {
    running: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl ConsumerTask {
    pub fn is_running(&self) -> bool {
        self.running.lock().map(|running| running.is_some()).unwrap_or(true)
    }

    /// Spawns `run` with the token that will stop it.
    pub fn start<F>(&self, run: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run(stop.clone()));
        match self.running.lock() {
            Ok(mut running) => *running = Some((stop, handle)),
            Err(_) => stop.cancel(),
        }
    }

    /// Stops the loop and waits for it; returns whether one was running.
    pub async fn stop(&self) -> bool {
        let running = self.running.lock().ok().and_then(|mut running| running.take());
        match running {
            Some((stop, handle)) => {
                stop.cancel();
                let _ = handle.await;
                true
            }
            None => false,
        }
    }
}

/// One job queue engine (`graphile`, `fs`).
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Prepares producing (graphile: connect and run the migrations).
    async fn connect_producer(&self) -> Result<(), JobQueueError>;
    async fn enqueue(&self, job: &EnqueuedJob) -> Result<(), JobQueueError>;
    async fn disconnect_producer(&self);
    /// Starts consuming into `dispatcher` (idempotent while started).
    async fn start_consumer(&self, dispatcher: Dispatcher) -> Result<(), JobQueueError>;
    /// Stops consuming; jobs already handed over keep running.
    async fn stop_consumer(&self);
}
