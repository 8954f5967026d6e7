//! The job queue manager: the queues of `JOB_QUEUES` in order, the first that accepts a job
//! wins (the reference's `JobQueueManager`).
//!
//! * `connect_producer` connects every queue concurrently; one that fails is logged and dropped,
//!   unless `CRASH_IF_NO_PERSISTENT_JOB_QUEUE`, when the error is returned (start-up must fail);
//! * `enqueue` tries the queues in order, reporting each failure to Sentry; all failed →
//!   `No JobQueue available`;
//! * consumer start/stop/pause/resume apply to every queue. Pausing is one shared flag that the
//!   consumers check before fetching.
//! * `s3` is recognised but not implemented by this server: its producer fails to connect with a
//!   clear error (so it is dropped, or start-up fails with the crash flag).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{error, info};

use crate::config::{Config, NodeEnv};
use crate::jobs::fs_queue::{FsQueue, DEFAULT_POLL_INTERVAL};
use crate::jobs::graphile::{GraphileQueue, GraphileSettings};
use crate::jobs::job::EnqueuedJob;
use crate::jobs::queue::{Dispatcher, JobQueue, JobQueueError, JobRunner};
use crate::metrics::sentry::capture_error_message;

/// Construction knobs tests and development set; [`JobQueueOptions::from_config`] is production.
#[derive(Debug, Clone)]
pub struct JobQueueOptions {
    pub node_env: NodeEnv,
    /// The `fs` queue's file (default `<cwd>/tmp/fs-queue.txt`).
    pub fs_queue_path: Option<PathBuf>,
    pub fs_poll_interval: Duration,
}

impl JobQueueOptions {
    pub fn from_config(config: &crate::config::Config) -> JobQueueOptions {
        JobQueueOptions { node_env: config.node_env, fs_queue_path: None, fs_poll_interval: DEFAULT_POLL_INTERVAL }
    }
}

/// The `s3` queue type: accepted in `JOB_QUEUES`, never connects.
struct UnsupportedS3Queue;

#[async_trait::async_trait]
impl JobQueue for UnsupportedS3Queue {
    async fn connect_producer(&self) -> Result<(), JobQueueError> {
        Err(JobQueueError::S3NotSupported)
    }
    async fn enqueue(&self, _job: &EnqueuedJob) -> Result<(), JobQueueError> {
        Err(JobQueueError::S3NotSupported)
    }
    async fn disconnect_producer(&self) {}
    async fn start_consumer(&self, _dispatcher: Dispatcher) -> Result<(), JobQueueError> {
        Err(JobQueueError::S3NotSupported)
    }
    async fn stop_consumer(&self) {}
}

pub struct JobQueueManager {
    types: Vec<String>,
    queues: RwLock<Vec<(String, Arc<dyn JobQueue>)>>,
    crash_if_no_persistent_job_queue: bool,
    paused: Arc<AtomicBool>,
    dispatcher: Mutex<Option<Dispatcher>>,
}

impl JobQueueManager {
    /// The queues of `JOB_QUEUES`; an unknown type is an error (`Unknown job queue "<x>"`).
    pub fn new(config: &Config, options: JobQueueOptions) -> Result<JobQueueManager, JobQueueError> {
        let types = config.job_queue_types();
        let mut queues: Vec<(String, Arc<dyn JobQueue>)> = Vec::new();
        for queue_type in &types {
            let queue: Arc<dyn JobQueue> = match queue_type.as_str() {
                "graphile" => Arc::new(GraphileQueue::new(GraphileSettings::from_config(config)?)),
                "fs" => {
                    Arc::new(FsQueue::new(options.node_env, options.fs_queue_path.clone(), options.fs_poll_interval)?)
                }
                "s3" => Arc::new(UnsupportedS3Queue),
                other => return Err(JobQueueError::UnknownQueue(other.to_string())),
            };
            queues.push((queue_type.clone(), queue));
        }
        Ok(JobQueueManager::with_queues(types, queues, config.CRASH_IF_NO_PERSISTENT_JOB_QUEUE))
    }

    /// A manager over queues built elsewhere.
    pub fn with_queues(
        types: Vec<String>,
        queues: Vec<(String, Arc<dyn JobQueue>)>,
        crash_if_no_persistent_job_queue: bool,
    ) -> JobQueueManager {
        JobQueueManager {
            types,
            queues: RwLock::new(queues),
            crash_if_no_persistent_job_queue,
            paused: Arc::new(AtomicBool::new(false)),
            dispatcher: Mutex::new(None),
        }
    }

    fn queues(&self) -> Vec<(String, Arc<dyn JobQueue>)> {
        self.queues.read().map(|queues| queues.clone()).unwrap_or_default()
    }

    /// The queues still in use, by type.
    pub fn active_queue_types(&self) -> Vec<String> {
        self.queues().into_iter().map(|(queue_type, _)| queue_type).collect()
    }

    /// The configured types joined by `,` (including queues dropped at connect).
    pub fn job_queue_types_as_string(&self) -> String {
        self.types.join(",")
    }

    /// Connects every queue's producer (graphile also migrates).
    pub async fn connect_producer(&self) -> Result<(), JobQueueError> {
        let queues = self.queues();
        let results = futures::future::join_all(queues.iter().map(|(_, queue)| queue.connect_producer())).await;
        let mut failed = Vec::new();
        for ((queue_type, _), result) in queues.iter().zip(results) {
            match result {
                Ok(()) => info!("🚶 Connected to job queue producer \"{queue_type}\""),
                Err(connect_error) => {
                    let message = format!("Can not start job queue producer \"{queue_type}\": {connect_error}");
                    error!("🔴 {message}");
                    capture_error_message(&message);
                    if self.crash_if_no_persistent_job_queue {
                        return Err(connect_error);
                    }
                    failed.push(queue_type.clone());
                }
            }
        }
        if !failed.is_empty() {
            if let Ok(mut queues) = self.queues.write() {
                queues.retain(|(queue_type, _)| !failed.contains(queue_type));
            }
        }
        Ok(())
    }

    /// Queues `job` on the first queue that takes it.
    pub async fn enqueue(&self, job: EnqueuedJob) -> Result<(), JobQueueError> {
        for (queue_type, queue) in self.queues() {
            match queue.enqueue(&job).await {
                Ok(()) => return Ok(()),
                Err(enqueue_error) => {
                    let message = format!("Could not enqueue a job on job queue \"{queue_type}\": {enqueue_error}");
                    error!("🔴 {message}");
                    capture_error_message(&message);
                }
            }
        }
        Err(JobQueueError::NoQueueAvailable)
    }

    pub async fn disconnect_producer(&self) {
        futures::future::join_all(self.queues().iter().map(|(_, queue)| queue.disconnect_producer())).await;
    }

    /// Starts every queue's consumer, handing jobs to `runner`.
    pub async fn start_consumer(&self, runner: Arc<dyn JobRunner>) -> Result<(), JobQueueError> {
        let dispatcher = Dispatcher::new(runner, Arc::clone(&self.paused));
        if let Ok(mut current) = self.dispatcher.lock() {
            *current = Some(dispatcher.clone());
        }
        let queues = self.queues();
        let results =
            futures::future::join_all(queues.iter().map(|(_, queue)| queue.start_consumer(dispatcher.clone()))).await;
        results.into_iter().collect::<Result<Vec<()>, _>>().map(|_| ())
    }

    /// Stops every consumer and waits for the jobs already handed over.
    pub async fn stop_consumer(&self) {
        futures::future::join_all(self.queues().iter().map(|(_, queue)| queue.stop_consumer())).await;
        let dispatcher = self.dispatcher.lock().ok().and_then(|mut dispatcher| dispatcher.take());
        if let Some(dispatcher) = dispatcher {
            dispatcher.wait().await;
        }
    }

    pub fn pause_consumer(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume_consumer(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    pub fn is_consumer_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
}
