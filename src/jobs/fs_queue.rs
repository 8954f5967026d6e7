//! The `fs` job queue: one JSON job per line in `<cwd>/tmp/fs-queue.txt`, for tests and local
//! development only (the reference refuses it outside tests; we also allow `NODE_ENV=dev`).
//!
//! Producer connect creates/truncates the file; enqueue appends a line. The consumer truncates it
//! on start, then polls: jobs whose timestamp has passed are run as one batch (awaited) and the
//! rest written back; it polls again at once after finding something, else after 10 s (tests
//! shorten this). Stop deletes the file. Not safe across processes, like the reference's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::error;

use crate::config::NodeEnv;
use crate::jobs::job::EnqueuedJob;
use crate::jobs::queue::{ConsumerTask, Dispatcher, JobQueue, JobQueueError};

pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);

pub struct FsQueue {
    file: Arc<QueueFile>,
    poll_interval: Duration,
    consumer: ConsumerTask,
}

/// The file and the lock that serialises its rewrites between this process's producer and
/// consumer.
struct QueueFile {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl FsQueue {
    /// `path` defaults to `<cwd>/tmp/fs-queue.txt`.
    pub fn new(node_env: NodeEnv, path: Option<PathBuf>, poll_interval: Duration) -> Result<FsQueue, JobQueueError> {
        if node_env == NodeEnv::Production {
            return Err(JobQueueError::FsOutsideTests);
        }
        let path = path.unwrap_or_else(|| {
            std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")).join("tmp").join("fs-queue.txt")
        });
        Ok(FsQueue {
            file: Arc::new(QueueFile { path, lock: tokio::sync::Mutex::new(()) }),
            poll_interval,
            consumer: ConsumerTask::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

impl QueueFile {
    fn error(&self, source: std::io::Error) -> JobQueueError {
        JobQueueError::File { path: self.path.clone(), source }
    }

    async fn truncate(&self) -> Result<(), JobQueueError> {
        if let Some(parent) = self.path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|error| self.error(error))?;
        }
        tokio::fs::write(&self.path, "").await.map_err(|error| self.error(error))
    }

    /// Takes the due jobs out of the file. Lines that are not jobs are dropped with a log line.
    async fn take_due(&self) -> Result<Vec<EnqueuedJob>, JobQueueError> {
        let _guard = self.lock.lock().await;
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(self.error(error)),
        };
        let now = chrono::Utc::now().timestamp_millis();
        let (mut due, mut later) = (Vec::new(), Vec::new());
        for line in text.lines().filter(|line| !line.is_empty()) {
            match serde_json::from_str::<EnqueuedJob>(line) {
                Ok(job) if job.timestamp < now => due.push(job),
                Ok(_) => later.push(line),
                Err(parse_error) => error!("🔴 Dropping a line of the file job queue that is not a job: {parse_error}"),
            }
        }
        if !due.is_empty() {
            let rest: String = later.iter().map(|line| format!("{line}\n")).collect();
            tokio::fs::write(&self.path, rest).await.map_err(|error| self.error(error))?;
        }
        Ok(due)
    }
}

#[async_trait]
impl JobQueue for FsQueue {
    async fn connect_producer(&self) -> Result<(), JobQueueError> {
        self.file.truncate().await
    }

    async fn enqueue(&self, job: &EnqueuedJob) -> Result<(), JobQueueError> {
        use tokio::io::AsyncWriteExt;
        let line = format!("{}\n", serde_json::to_string(job)?);
        let _guard = self.file.lock.lock().await;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file.path)
            .await
            .map_err(|error| self.file.error(error))?;
        file.write_all(line.as_bytes()).await.map_err(|error| self.file.error(error))?;
        // tokio writes in the background; the line must be on disk before enqueue returns.
        file.flush().await.map_err(|error| self.file.error(error))
    }

    async fn disconnect_producer(&self) {}

    async fn start_consumer(&self, dispatcher: Dispatcher) -> Result<(), JobQueueError> {
        if self.consumer.is_running() {
            return Ok(());
        }
        self.file.truncate().await?;
        let file = Arc::clone(&self.file);
        let poll_interval = self.poll_interval;
        self.consumer.start(|stop| async move {
            loop {
                let mut found = false;
                if dispatcher.ready() {
                    match file.take_due().await {
                        Ok(jobs) if !jobs.is_empty() => {
                            found = true;
                            dispatcher.run(jobs).await;
                        }
                        Ok(_) => {}
                        Err(error) => error!("🔴 File job queue poll failed: {error}"),
                    }
                }
                let wait = if found { Duration::ZERO } else { poll_interval };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        Ok(())
    }

    async fn stop_consumer(&self) {
        if self.consumer.stop().await {
            let _ = tokio::fs::remove_file(&self.file.path).await;
        }
    }
}
