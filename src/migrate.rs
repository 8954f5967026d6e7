//! `--migrate`: brings the job queue's Postgres schema up to date, as the reference's migrate
//! mode does (only the graphile job queue has a schema; PostHog's own tables belong to PostHog's
//! Django migrations and are never touched here).

use thiserror::Error;

use crate::config::Config;
use crate::hub::{connect_postgres_with, postgres_options, postgres_options_from_url, HubError};
use crate::jobs::migrations::{migrate, MigrationError};

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(transparent)]
    Connect(#[from] HubError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("could not get a Postgres connection: {0}")]
    Acquire(#[from] sqlx::Error),
}

/// What `--migrate` did.
#[derive(Debug, PartialEq, Eq)]
pub enum MigrateOutcome {
    /// `graphile` is not among `JOB_QUEUES`.
    NothingToMigrate,
    /// Applied these graphile migrations (empty: already up to date).
    Applied(Vec<i32>),
}

/// Runs the graphile migrations against `JOB_QUEUE_GRAPHILE_URL`, or the main database when it is
/// empty, in `JOB_QUEUE_GRAPHILE_SCHEMA`.
pub async fn run(config: &Config) -> Result<MigrateOutcome, MigrateError> {
    if !config.job_queue_types().iter().any(|kind| kind == "graphile") {
        return Ok(MigrateOutcome::NothingToMigrate);
    }
    tracing::info!("🔗 Attempting to connect to Graphile job queue to run migrations");
    let options = if config.JOB_QUEUE_GRAPHILE_URL.is_empty() {
        postgres_options(config)?
    } else {
        postgres_options_from_url(&config.JOB_QUEUE_GRAPHILE_URL)?
    };
    let pool = connect_postgres_with(options, 1).await?;
    let mut connection = pool.acquire().await?;
    let applied = migrate(&mut connection, &config.JOB_QUEUE_GRAPHILE_SCHEMA).await;
    drop(connection);
    pool.close().await;
    Ok(MigrateOutcome::Applied(applied?))
}
