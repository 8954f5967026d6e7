//! The `graphile` job queue: graphile-worker 0.11's tables and functions in
//! `JOB_QUEUE_GRAPHILE_SCHEMA`, so a Node plugin server and this one can share queued jobs.
//!
//! * producer: a pool on `JOB_QUEUE_GRAPHILE_URL` (or the main database), migrated on connect;
//!   enqueue is `add_job(identifier => 'pluginJob', payload => <job JSON>, run_at => <timestamp>,
//!   max_attempts => 1, ...)` exactly as graphile-worker's `addJob` calls it;
//! * consumer: a graphile-style worker (id `worker-<18 hex>`, concurrency 1) that polls
//!   `get_job` every 100 ms and on `jobs:insert` notifications, hands each job over without
//!   awaiting it and marks it complete at once (at-most-once, as in the reference). A payload
//!   that is not a job is failed with `fail_job` (kept in the table for inspection, never run).

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::hub::{
    connect_postgres_with, describe_postgres, postgres_options, postgres_options_from_url, HubError, CONNECT_TIMEOUT,
};
use crate::jobs::job::EnqueuedJob;
use crate::jobs::migrations::{migrate, quote_identifier};
use crate::jobs::queue::{ConsumerTask, Dispatcher, JobQueue, JobQueueError};

/// The task identifier every plugin job is queued under.
pub const TASK_IDENTIFIER: &str = "pluginJob";
/// graphile-worker's `pollInterval` as the reference configures it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The channel graphile's insert trigger notifies.
pub const JOBS_INSERT_CHANNEL: &str = "jobs:insert";

/// Where and how the queue talks to Postgres.
#[derive(Debug, Clone)]
pub struct GraphileSettings {
    pub options: PgConnectOptions,
    pub schema: String,
    pub prepared_statements: bool,
    pub poll_interval: Duration,
}

impl GraphileSettings {
    /// `JOB_QUEUE_GRAPHILE_URL` when set, otherwise the main database configuration.
    pub fn from_config(config: &Config) -> Result<GraphileSettings, JobQueueError> {
        let options = if config.JOB_QUEUE_GRAPHILE_URL.is_empty() {
            postgres_options(config)?
        } else {
            postgres_options_from_url(&config.JOB_QUEUE_GRAPHILE_URL)?
        };
        Ok(GraphileSettings {
            options,
            schema: config.JOB_QUEUE_GRAPHILE_SCHEMA.clone(),
            prepared_statements: config.JOB_QUEUE_GRAPHILE_PREPARED_STATEMENTS,
            poll_interval: POLL_INTERVAL,
        })
    }
}

pub struct GraphileQueue {
    settings: GraphileSettings,
    producer: tokio::sync::Mutex<Option<PgPool>>,
    consumer: ConsumerTask,
}

impl GraphileQueue {
    pub fn new(settings: GraphileSettings) -> GraphileQueue {
        GraphileQueue { settings, producer: tokio::sync::Mutex::new(None), consumer: ConsumerTask::default() }
    }

    fn quoted_schema(&self) -> Result<String, JobQueueError> {
        Ok(quote_identifier(&self.settings.schema)?)
    }

    async fn producer_pool(&self) -> Result<PgPool, JobQueueError> {
        let mut producer = self.producer.lock().await;
        if let Some(pool) = producer.as_ref() {
            return Ok(pool.clone());
        }
        probe(&self.settings.options).await?;
        let pool = connect_postgres_with(self.settings.options.clone(), 3).await?;
        *producer = Some(pool.clone());
        Ok(pool)
    }

    /// Runs the graphile migrations on the producer pool.
    pub async fn migrate(&self) -> Result<(), JobQueueError> {
        let pool = self.producer_pool().await?;
        migrate_on(pool, self.settings.schema.clone()).await
    }
}

#[async_trait]
impl JobQueue for GraphileQueue {
    async fn connect_producer(&self) -> Result<(), JobQueueError> {
        self.migrate().await
    }

    async fn enqueue(&self, job: &EnqueuedJob) -> Result<(), JobQueueError> {
        let schema = self.quoted_schema()?;
        let pool = self.producer_pool().await?;
        let sql = format!(
            "SELECT id FROM {schema}.add_job(identifier => $1::text, payload => $2::json, queue_name => null, \
             run_at => $3::timestamptz, max_attempts => 1, job_key => null, priority => null, flags => null, \
             job_key_mode => null)"
        );
        sqlx::query(&sql)
            .persistent(self.settings.prepared_statements)
            .bind(TASK_IDENTIFIER)
            .bind(serde_json::to_string(job)?)
            .bind(job.run_at())
            .execute(&pool)
            .await?;
        Ok(())
    }

    async fn disconnect_producer(&self) {
        if let Some(pool) = self.producer.lock().await.take() {
            pool.close().await;
        }
    }

    async fn start_consumer(&self, dispatcher: Dispatcher) -> Result<(), JobQueueError> {
        if self.consumer.is_running() {
            return Ok(());
        }
        let schema = self.quoted_schema()?;
        // A listener connection plus one for queries, as graphile's runner pool.
        let pool = connect_postgres_with(self.settings.options.clone(), 2).await?;
        let worker = Worker {
            pool,
            schema,
            worker_id: worker_id(),
            dispatcher,
            prepared: self.settings.prepared_statements,
            poll_interval: self.settings.poll_interval,
        };
        self.consumer.start(|stop| worker.run(stop));
        Ok(())
    }

    async fn stop_consumer(&self) {
        self.consumer.stop().await;
    }
}

/// Runs the migrations on a blocking-pool thread: the future of `migrations::migrate` is not
/// provably `Send` (higher-ranked executor lifetimes), which `async_trait` methods require, and
/// `block_on` does not need it to be.
async fn migrate_on(pool: PgPool, schema: String) -> Result<(), JobQueueError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async move {
            let mut connection = pool.acquire().await?;
            migrate(&mut connection, &schema).await?;
            Ok(())
        })
    })
    .await
    .map_err(|_| JobQueueError::Database(sqlx::Error::WorkerCrashed))?
}

/// One direct connection attempt: a refused connection fails at once, where a pool would keep
/// retrying until its acquire timeout (the reference's `select 1` check also fails at once).
async fn probe(options: &PgConnectOptions) -> Result<(), JobQueueError> {
    let target = describe_postgres(options);
    let attempt = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await;
    match attempt {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(source)) => Err(HubError::PostgresUnreachable { target, source }.into()),
        Err(_) => Err(HubError::PostgresUnreachable { target, source: sqlx::Error::PoolTimedOut }.into()),
    }
}

/// graphile-worker's worker id: `worker-` and 9 random bytes in hex.
fn worker_id() -> String {
    let bytes: [u8; 9] = rand::random();
    format!("worker-{}", bytes.iter().map(|byte| format!("{byte:02x}")).collect::<String>())
}

struct Worker {
    pool: PgPool,
    schema: String,
    worker_id: String,
    dispatcher: Dispatcher,
    prepared: bool,
    poll_interval: Duration,
}

impl Worker {
    async fn run(self, stop: CancellationToken) {
        info!("🔄 Graphile job queue worker {} started", self.worker_id);
        let mut listener = self.listen().await;
        loop {
            while self.dispatcher.ready() && !stop.is_cancelled() {
                match self.take_one().await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(error) => {
                        error!("🔴 Graphile job queue poll failed: {error}");
                        break;
                    }
                }
            }
            let notified = async {
                match listener.as_mut() {
                    Some(listener) => listener.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.poll_interval) => {}
                received = notified => if let Err(error) = received {
                    debug!("jobs:insert listener lost ({error}); polling only until it is back");
                    listener = None;
                },
            }
            if listener.is_none() {
                listener = self.listen().await;
            }
        }
        // The listener holds a pooled connection: `close` waits for it to come back.
        drop(listener);
        self.pool.close().await;
        info!("🔄 Graphile job queue worker {} stopped", self.worker_id);
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(JOBS_INSERT_CHANNEL).await.ok()?;
        Some(listener)
    }

    /// Takes one due job, if any: hand it over, then complete it. Returns whether there was one.
    async fn take_one(&self) -> Result<bool, sqlx::Error> {
        let schema = &self.schema;
        let row: (Option<i64>, Option<String>) =
            sqlx::query_as(&format!("SELECT id, payload::text FROM {schema}.get_job($1, $2::text[])"))
                .persistent(self.prepared)
                .bind(&self.worker_id)
                .bind(vec![super::graphile::TASK_IDENTIFIER])
                .fetch_one(&self.pool)
                .await?;
        let (Some(id), payload) = row else { return Ok(false) };
        match serde_json::from_str::<EnqueuedJob>(payload.as_deref().unwrap_or("null")) {
            Ok(job) => {
                self.dispatcher.spawn(vec![job]);
                sqlx::query(&format!("SELECT id FROM {schema}.complete_job($1, $2)"))
                    .persistent(self.prepared)
                    .bind(&self.worker_id)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
            }
            Err(parse_error) => {
                warn!("🔴 Graphile job {id} is not a plugin job ({parse_error}); marking it failed");
                sqlx::query(&format!("SELECT id FROM {schema}.fail_job($1, $2, $3)"))
                    .persistent(self.prepared)
                    .bind(&self.worker_id)
                    .bind(id)
                    .bind(format!("invalid plugin job payload: {parse_error}"))
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(true)
    }
}
