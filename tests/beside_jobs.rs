//! Job queues (ports of the reference's tests/jobs.test.ts for graphile and fs, plus the
//! lock-guarded consumer and the fallback rules of the manager).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::TestDb;
use plugin_server::config::NodeEnv;
use plugin_server::infra::BoxError;
use plugin_server::jobs::consumer::{run_job_queue_consumer, JobConsumerSettings};
use plugin_server::jobs::{EnqueuedJob, JobQueueManager, JobQueueOptions, JobRunner};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct RecordingRunner {
    sender: mpsc::UnboundedSender<(EnqueuedJob, Instant)>,
    saturated: AtomicBool,
    fail: bool,
}

#[async_trait]
impl JobRunner for RecordingRunner {
    async fn run_job(&self, job: EnqueuedJob) -> Result<(), BoxError> {
        let _ = self.sender.send((job, Instant::now()));
        if self.fail {
            return Err("job failed".into());
        }
        Ok(())
    }

    fn is_saturated(&self) -> bool {
        self.saturated.load(Ordering::SeqCst)
    }
}

fn recording_runner(fail: bool) -> (Arc<RecordingRunner>, mpsc::UnboundedReceiver<(EnqueuedJob, Instant)>) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (Arc::new(RecordingRunner { sender, saturated: AtomicBool::new(false), fail }), receiver)
}

fn job_at(timestamp: i64, payload: serde_json::Value) -> EnqueuedJob {
    EnqueuedJob { job_type: "pluginJob".into(), payload, timestamp, plugin_config_id: 2, plugin_config_team: 3 }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn test_options() -> JobQueueOptions {
    JobQueueOptions { node_env: NodeEnv::Test, fs_queue_path: None, fs_poll_interval: Duration::from_millis(100) }
}

async fn graphile_manager(db: &TestDb, extra: &[(&str, &str)]) -> Arc<JobQueueManager> {
    let mut pairs = vec![("JOB_QUEUES", "graphile")];
    pairs.extend_from_slice(extra);
    let manager = JobQueueManager::new(&db.config(&pairs), test_options()).unwrap();
    manager.connect_producer().await.unwrap();
    Arc::new(manager)
}

fn consumer_settings(ttl: Duration) -> JobConsumerSettings {
    JobConsumerSettings {
        lock_resource: common::unique_prefix("job-queue-consumer-lock"),
        lock_ttl: ttl,
        crash_if_no_persistent_job_queue: false,
    }
}

fn redis_client() -> redis::Client {
    redis::Client::open(common::redis_url()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_calls_add_job_as_graphile_worker_does() {
    let db = TestDb::empty().await;
    let manager = graphile_manager(&db, &[]).await;
    let job = job_at(1_600_000_000_123, json!({"key": "value"}));
    manager.enqueue(job.clone()).await.unwrap();
    let (task, payload, max_attempts, attempts, queue_name, run_at_ms): (
        String,
        String,
        i32,
        i32,
        Option<String>,
        f64,
    ) = sqlx::query_as(
        "SELECT task_identifier, payload::text, max_attempts, attempts, queue_name,
                    extract(epoch from run_at)::float8 * 1000 FROM graphile_worker.jobs",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(task, "pluginJob");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&payload).unwrap(), serde_json::to_value(&job).unwrap());
    assert_eq!((max_attempts, attempts, queue_name), (1, 0, None));
    assert_eq!(run_at_ms.round() as i64, job.timestamp);
    assert_eq!(manager.job_queue_types_as_string(), "graphile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_for_two_seconds_runs_once_after_two_seconds() {
    let db = TestDb::empty().await;
    let manager = graphile_manager(&db, &[]).await;
    let (runner, mut ran) = recording_runner(false);
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(run_job_queue_consumer(
        Arc::clone(&manager),
        runner,
        redis_client(),
        consumer_settings(Duration::from_secs(2)),
        shutdown.clone(),
    ));
    let enqueued_at = Instant::now();
    let job = job_at(now_ms() + 2000, json!({"key": "value"}));
    manager.enqueue(job.clone()).await.unwrap();
    let (consumed, at) = tokio::time::timeout(Duration::from_secs(10), ran.recv()).await.unwrap().unwrap();
    assert_eq!(consumed, job);
    let waited = at - enqueued_at;
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_millis(3000), "ran after {waited:?}");
    // Completed on dispatch: gone from the table, and never run again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ran.try_recv().is_err());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM graphile_worker.jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(left, 0);
    shutdown.cancel();
    consumer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_consume_each_job_once() {
    let db = TestDb::empty().await;
    let manager_a = graphile_manager(&db, &[]).await;
    let manager_b = graphile_manager(&db, &[]).await;
    let (runner, mut ran) = recording_runner(false);
    let settings = consumer_settings(Duration::from_secs(2));
    let shutdown = CancellationToken::new();
    let consumers = [manager_a.clone(), manager_b.clone()].map(|manager| {
        tokio::spawn(run_job_queue_consumer(
            manager,
            runner.clone(),
            redis_client(),
            settings.clone(),
            shutdown.clone(),
        ))
    });
    for index in 0..5 {
        manager_a.enqueue(job_at(now_ms(), json!({"index": index}))).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let (job, _) = tokio::time::timeout(Duration::from_secs(10), ran.recv()).await.unwrap().unwrap();
        seen.push(job.payload["index"].as_i64().unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ran.try_recv().is_err(), "a job ran twice");
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    shutdown.cancel();
    for consumer in consumers {
        consumer.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_or_saturated_consumer_fetches_nothing_until_resumed() {
    let db = TestDb::empty().await;
    let manager = graphile_manager(&db, &[]).await;
    let (runner, mut ran) = recording_runner(true);
    manager.start_consumer(runner.clone()).await.unwrap();
    manager.pause_consumer();
    assert!(manager.is_consumer_paused());
    manager.enqueue(job_at(now_ms(), json!({"n": 1}))).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(600), ran.recv()).await.is_err());
    runner.saturated.store(true, Ordering::SeqCst);
    manager.resume_consumer();
    assert!(tokio::time::timeout(Duration::from_millis(600), ran.recv()).await.is_err());
    runner.saturated.store(false, Ordering::SeqCst);
    let (job, _) = tokio::time::timeout(Duration::from_secs(5), ran.recv()).await.unwrap().unwrap();
    assert_eq!(job.payload, json!({"n": 1}));
    // A failing job does not stop consumption.
    manager.enqueue(job_at(now_ms(), json!({"n": 2}))).await.unwrap();
    let (job, _) = tokio::time::timeout(Duration::from_secs(5), ran.recv()).await.unwrap().unwrap();
    assert_eq!(job.payload, json!({"n": 2}));
    manager.stop_consumer().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_a_job_is_failed_not_run() {
    let db = TestDb::empty().await;
    let manager = graphile_manager(&db, &[]).await;
    sqlx::query("SELECT graphile_worker.add_job('pluginJob', '{\"not\": \"a job\"}'::json, max_attempts => 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    let (runner, mut ran) = recording_runner(false);
    manager.start_consumer(runner).await.unwrap();
    manager.enqueue(job_at(now_ms(), json!({"after": true}))).await.unwrap();
    let (job, _) = tokio::time::timeout(Duration::from_secs(5), ran.recv()).await.unwrap().unwrap();
    assert_eq!(job.payload, json!({"after": true}));
    manager.stop_consumer().await;
    let (attempts, last_error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM graphile_worker.jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(attempts, 1);
    assert!(last_error.unwrap().contains("invalid plugin job payload"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_queue_runs_due_jobs_and_keeps_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let options = JobQueueOptions { fs_queue_path: Some(dir.path().join("fs-queue.txt")), ..test_options() };
    let db = TestDb::empty().await;
    let manager = JobQueueManager::new(&db.config(&[("JOB_QUEUES", "fs")]), options).unwrap();
    manager.connect_producer().await.unwrap();
    let (runner, mut ran) = recording_runner(false);
    manager.start_consumer(runner).await.unwrap();
    let start = Instant::now();
    for (delay, kind) in [(1000, "runIn"), (0, "runNow"), (-5, "runAt")] {
        manager.enqueue(job_at(now_ms() + delay, json!({"type": kind}))).await.unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..3 {
        let (job, at) = tokio::time::timeout(Duration::from_secs(5), ran.recv()).await.unwrap().unwrap();
        order.push((job.payload["type"].as_str().unwrap().to_string(), at - start));
    }
    assert_eq!(order[2].0, "runIn");
    assert!(order[2].1 >= Duration::from_millis(950));
    let kinds: Vec<&str> = order[..2].iter().map(|(kind, _)| kind.as_str()).collect();
    assert!(kinds.contains(&"runNow") && kinds.contains(&"runAt"));
    manager.stop_consumer().await;
    assert!(!dir.path().join("fs-queue.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_graphile_is_dropped_unless_the_crash_flag_is_set() {
    let db = TestDb::empty().await;
    let unreachable = [("JOB_QUEUES", "graphile"), ("JOB_QUEUE_GRAPHILE_URL", "postgres://0.0.0.0:9212/database")];
    let manager = JobQueueManager::new(&db.config(&unreachable), test_options()).unwrap();
    manager.connect_producer().await.unwrap();
    assert!(manager.active_queue_types().is_empty());
    assert_eq!(manager.job_queue_types_as_string(), "graphile");
    let error = manager.enqueue(job_at(now_ms(), json!({}))).await.unwrap_err();
    assert_eq!(error.to_string(), "No JobQueue available");

    let mut crash = unreachable.to_vec();
    crash.push(("CRASH_IF_NO_PERSISTENT_JOB_QUEUE", "true"));
    let manager = JobQueueManager::new(&db.config(&crash), test_options()).unwrap();
    assert!(manager.connect_producer().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphile_falls_back_to_the_next_queue() {
    let dir = tempfile::tempdir().unwrap();
    let options = JobQueueOptions { fs_queue_path: Some(dir.path().join("fs-queue.txt")), ..test_options() };
    let db = TestDb::empty().await;
    // A graphile schema that does not exist: connect (migrate) would create it, so skip connect
    // and enqueue straight away; add_job fails and the fs queue takes the job.
    let config = db.config(&[("JOB_QUEUES", "graphile, fs"), ("JOB_QUEUE_GRAPHILE_SCHEMA", "missing_schema")]);
    let manager = JobQueueManager::new(&config, options).unwrap();
    assert_eq!(manager.active_queue_types(), vec!["graphile".to_string(), "fs".to_string()]);
    manager.enqueue(job_at(now_ms(), json!({"fell": "back"}))).await.unwrap();
    let line = std::fs::read_to_string(dir.path().join("fs-queue.txt")).unwrap();
    assert!(line.contains("\"fell\":\"back\""), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_types_are_validated() {
    let db = TestDb::empty().await;
    let unknown = JobQueueManager::new(&db.config(&[("JOB_QUEUES", "graphile,redis")]), test_options());
    assert_eq!(unknown.err().unwrap().to_string(), "Unknown job queue \"redis\"");

    let production = JobQueueOptions { node_env: NodeEnv::Production, ..test_options() };
    let fs = JobQueueManager::new(&db.config(&[("JOB_QUEUES", "fs")]), production);
    assert_eq!(fs.err().unwrap().to_string(), "Can not use FsQueue outside tests");

    let s3 = JobQueueManager::new(
        &db.config(&[("JOB_QUEUES", "s3"), ("CRASH_IF_NO_PERSISTENT_JOB_QUEUE", "true")]),
        test_options(),
    )
    .unwrap();
    let error = s3.connect_producer().await.unwrap_err();
    assert!(error.to_string().contains("not supported"), "{error}");
}

/// A queue whose consumer cannot start (a database that went away after start-up).
#[derive(Default)]
struct BrokenConsumerQueue {
    start_attempts: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl plugin_server::jobs::queue::JobQueue for BrokenConsumerQueue {
    async fn connect_producer(&self) -> Result<(), plugin_server::jobs::JobQueueError> {
        Ok(())
    }
    async fn enqueue(&self, _job: &EnqueuedJob) -> Result<(), plugin_server::jobs::JobQueueError> {
        Ok(())
    }
    async fn disconnect_producer(&self) {}
    async fn start_consumer(
        &self,
        _dispatcher: plugin_server::jobs::queue::Dispatcher,
    ) -> Result<(), plugin_server::jobs::JobQueueError> {
        self.start_attempts.fetch_add(1, Ordering::SeqCst);
        Err(plugin_server::jobs::JobQueueError::NotConnected)
    }
    async fn stop_consumer(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_cannot_start_stops_the_server_only_with_the_crash_flag() {
    for crash in [false, true] {
        let broken = Arc::new(BrokenConsumerQueue::default());
        let queue: Arc<dyn plugin_server::jobs::queue::JobQueue> = broken.clone();
        let manager =
            Arc::new(JobQueueManager::with_queues(vec!["broken".into()], vec![("broken".into(), queue)], crash));
        let (runner, _ran) = recording_runner(false);
        let settings = JobConsumerSettings {
            crash_if_no_persistent_job_queue: crash,
            ..consumer_settings(Duration::from_secs(1))
        };
        let shutdown = CancellationToken::new();
        let mut consumer =
            tokio::spawn(run_job_queue_consumer(manager, runner, redis_client(), settings, shutdown.clone()));
        let ended_alone = tokio::time::timeout(Duration::from_millis(1500), &mut consumer).await.is_ok();
        assert_eq!(ended_alone, crash, "crash flag {crash}");
        // Without the flag the start is retried every TTL while the lock is held.
        let attempts = broken.start_attempts.load(Ordering::SeqCst);
        assert!(if crash { attempts == 1 } else { attempts >= 2 }, "crash flag {crash}: {attempts} attempts");
        shutdown.cancel();
        if !ended_alone {
            consumer.await.unwrap();
        }
    }
}
