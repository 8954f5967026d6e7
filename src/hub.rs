//! Shared handles every component uses: the configuration, the Postgres pool, the Redis pool and
//! the instance id, built once at start-up (the reference builds one "hub" per thread; one shared
//! set of pools serves all our threads).
//!
//! This module owns how connections are configured (`DATABASE_URL` vs the discrete `POSTHOG_DB_*`
//! variables, `REDIS_URL` vs `POSTHOG_REDIS_*`) and the fail-fast connectivity checks. It does not
//! own what is done with the connections. Kafka, ClickHouse, statsd and Sentry handles join the hub
//! in the modules that use them.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Pool as RedisPool, Runtime};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use crate::config::Config;

/// How long start-up waits for Postgres or Redis before giving up with a clear error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled Postgres connection idle at least this long is pinged before it is used again.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum HubError {
    #[error("Invalid configuration for Postgres: either DATABASE_URL or POSTHOG_DB_NAME required")]
    MissingPostgresConfig,
    #[error("Invalid Postgres URL {url:?}: {source}")]
    InvalidPostgresUrl { url: String, source: sqlx::Error },
    #[error("Cannot connect to Postgres at {target}: {source}")]
    PostgresUnreachable { target: String, source: sqlx::Error },
    #[error("Invalid Redis configuration {target:?}: {reason}")]
    InvalidRedisConfig { target: String, reason: String },
    #[error("Cannot connect to Redis at {target}: {reason}")]
    RedisUnreachable { target: String, reason: String },
}

/// Everything components share. Cheap to clone (all handles are reference-counted).
#[derive(Clone)]
pub struct Hub {
    pub config: Arc<Config>,
    pub postgres: PgPool,
    pub redis: RedisPool,
    /// Identifies this server process (status reports, Kafka client id, lock values).
    pub instance_id: Uuid,
}

impl Hub {
    /// Connects Postgres and Redis, failing fast (within [`CONNECT_TIMEOUT`]) when either is
    /// unreachable, as the reference's launch does.
    pub async fn connect(config: Config) -> Result<Hub, HubError> {
        let postgres = connect_postgres(&config, postgres_pool_size(&config)).await?;
        let redis = connect_redis(&config).await?;
        Ok(Hub { config: Arc::new(config), postgres, redis, instance_id: Uuid::now_v7() })
    }

    /// A hub whose pools never connect, for the plugin dev loop (`plugin-server plugin run`), where
    /// storage, cache and records live in memory: a query that still reaches Postgres (`posthog.api`
    /// looking up the project's key) fails at once instead of waiting for a database.
    pub fn offline(config: Config) -> Result<Hub, HubError> {
        let options = PgConnectOptions::new().socket("/nonexistent/plugin-server-dev-loop-has-no-database");
        let postgres =
            PgPoolOptions::new().max_connections(1).acquire_timeout(Duration::from_secs(1)).connect_lazy_with(options);
        let target = describe_redis(&config);
        let redis = deadpool_redis::Config::from_url(redis_url(&config))
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|error| HubError::InvalidRedisConfig { target, reason: error.to_string() })?;
        Ok(Hub { config: Arc::new(config), postgres, redis, instance_id: Uuid::now_v7() })
    }

    /// Closes the pools (waits for checked-out Postgres connections to be returned).
    pub async fn close(&self) {
        self.redis.close();
        self.postgres.close().await;
    }
}

/// Connections of the main pool per thread (`WORKER_CONCURRENCY` worker threads plus the main one).
///
/// The reference opens node-postgres' default of ten per thread; fewer serve better here, where
/// concurrent events share statements through the micro-batchers: a statement waiting for a
/// connection gathers more events, and each connection is one more PostgreSQL backend that plans
/// every statement it runs (five custom plans each before a generic one) and competes for the same
/// cores. The side-by-side kit's workload (`benches/side_by_side_breakdown.py none 20000`, 2
/// threads, two runs each, 2026-12-08): 30 connections 5,359 / 5,582 events/s (PostgreSQL 0.161 /
/// 0.155 ms per event), 16: 5,890 / 5,998, 10: 6,339 / 6,007, 6: 7,064 / 6,550 (0.118 / 0.123
/// ms), 4: 6,579 / 6,152; `simple`: 30: 3,897 / 4,350, 6: 4,773 / 4,723. An earlier session
/// measured 10 against 30 in the Kafka pipeline, before person lookups and updates were batched:
/// 4,803 against 4,986 events/s (`BENCH_QUEUE=kafka cargo bench --bench e2e_server`).
const CONNECTIONS_PER_THREAD: u32 = 2;

/// The main pool's size: [`CONNECTIONS_PER_THREAD`] for the main thread and each worker thread.
fn postgres_pool_size(config: &Config) -> u32 {
    let threads = u32::try_from(config.worker_threads()).unwrap_or(u32::MAX);
    CONNECTIONS_PER_THREAD.saturating_mul(threads.saturating_add(1))
}

/// Connection options for the main database: `DATABASE_URL` when set, otherwise the discrete
/// `POSTHOG_DB_NAME/USER/PASSWORD` and `POSTHOG_POSTGRES_HOST/PORT`. With `DYNO` set (Heroku) the
/// connection uses TLS without certificate verification, as the reference does; otherwise TLS is
/// used only when asked for (see [`postgres_options_from_url`]).
pub fn postgres_options(config: &Config) -> Result<PgConnectOptions, HubError> {
    let options = match (&config.DATABASE_URL, &config.POSTHOG_DB_NAME) {
        (Some(url), _) => postgres_options_from_url(url)?,
        (None, Some(name)) => without_unrequested_tls(
            PgConnectOptions::new()
                .host(&config.POSTHOG_POSTGRES_HOST)
                .port(config.POSTHOG_POSTGRES_PORT)
                .username(&config.POSTHOG_DB_USER)
                .password(&config.POSTHOG_DB_PASSWORD)
                .database(name),
            false,
        ),
        (None, None) => return Err(HubError::MissingPostgresConfig),
    };
    Ok(if std::env::var_os("DYNO").is_some() { options.ssl_mode(PgSslMode::Require) } else { options })
}

/// Options for an explicit URL (for example `JOB_QUEUE_GRAPHILE_URL`). TLS as node-postgres (the
/// reference's client) does it: only when the URL's `sslmode` or `PGSSLMODE` asks for it. sqlx
/// would otherwise *prefer* TLS and, against a server with TLS on (Debian's default), encrypt every
/// loopback query for nothing (measured: a tenth of the server's CPU under load).
pub fn postgres_options_from_url(url: &str) -> Result<PgConnectOptions, HubError> {
    let options = url
        .parse::<PgConnectOptions>()
        .map_err(|source| HubError::InvalidPostgresUrl { url: url.to_string(), source })?;
    Ok(without_unrequested_tls(options, url.contains("sslmode=")))
}

/// Disables TLS unless the URL (`url_sets_mode`) or `PGSSLMODE` chose a mode.
fn without_unrequested_tls(options: PgConnectOptions, url_sets_mode: bool) -> PgConnectOptions {
    if url_sets_mode || std::env::var_os("PGSSLMODE").is_some() {
        options
    } else {
        options.ssl_mode(PgSslMode::Disable)
    }
}

/// Where a set of options points, for error messages (never includes the password).
pub fn describe_postgres(options: &PgConnectOptions) -> String {
    format!("{}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or_default())
}

/// A pool on the main database, checked with `SELECT 1`.
pub async fn connect_postgres(config: &Config, max_connections: u32) -> Result<PgPool, HubError> {
    connect_postgres_with(postgres_options(config)?, max_connections).await
}

/// A pool for the given options, checked with `SELECT 1` within [`CONNECT_TIMEOUT`].
pub async fn connect_postgres_with(options: PgConnectOptions, max_connections: u32) -> Result<PgPool, HubError> {
    let target = describe_postgres(&options);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .idle_timeout(Duration::from_secs(60))
        // sqlx pings every connection it hands out (a round trip to PostgreSQL per checkout, 4% of
        // the server's CPU under load); node-postgres's pool, the reference's, never does. A
        // connection idle for a while is still pinged, so one that died meanwhile (PostgreSQL
        // restarted) is replaced instead of failing a statement; a busy one is used as is, and
        // if it breaks the statement fails as a transient error and is retried.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        })
        // A connection's buffers keep the size of the largest statement it ever carried (a batch
        // of 500 event rows is over a megabyte) for as long as it lives, so each connection of
        // the pool that once carried a large batch held its megabytes for good. Given back on
        // release (a no-op for a connection that carried nothing large).
        .after_release(|connection, _meta| {
            sqlx::Connection::shrink_buffers(connection);
            Box::pin(async { Ok(true) })
        })
        .connect_lazy_with(options);
    let check = tokio::time::timeout(CONNECT_TIMEOUT, crate::db::ping(&pool)).await;
    match check {
        Ok(Ok(_)) => Ok(pool),
        Ok(Err(source)) => Err(HubError::PostgresUnreachable { target, source }),
        Err(_) => Err(HubError::PostgresUnreachable { target, source: sqlx::Error::PoolTimedOut }),
    }
}

/// The Redis URL every connection uses: `POSTHOG_REDIS_HOST` (with `POSTHOG_REDIS_PORT` and
/// `POSTHOG_REDIS_PASSWORD`) when set, otherwise `REDIS_URL`.
pub fn redis_url(config: &Config) -> String {
    if config.POSTHOG_REDIS_HOST.is_empty() {
        config.REDIS_URL.clone()
    } else {
        let auth = if config.POSTHOG_REDIS_PASSWORD.is_empty() {
            String::new()
        } else {
            format!(":{}@", percent_encode_userinfo(&config.POSTHOG_REDIS_PASSWORD))
        };
        format!("redis://{auth}{}:{}", config.POSTHOG_REDIS_HOST, config.POSTHOG_REDIS_PORT)
    }
}

fn percent_encode_userinfo(raw: &str) -> String {
    raw.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Redis URL with any password hidden, for messages.
pub fn describe_redis(config: &Config) -> String {
    let url = redis_url(config);
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}://***@{}", &url[..scheme_end], &url[at + 1..]),
        _ => url,
    }
}

/// A single Redis client for the configuration (pub/sub, locks, healthcheck).
pub fn redis_client(config: &Config) -> Result<redis::Client, HubError> {
    redis::Client::open(redis_url(config))
        .map_err(|error| HubError::InvalidRedisConfig { target: describe_redis(config), reason: error.to_string() })
}

/// The shared Redis pool, checked with `PING`. The reference sizes its pool per thread
/// (`REDIS_POOL_MAX_SIZE`, default 3); one pool serves all our threads, so it gets that many
/// connections per worker thread plus one set for the main side.
pub async fn connect_redis(config: &Config) -> Result<RedisPool, HubError> {
    let target = describe_redis(config);
    let max_size = config.REDIS_POOL_MAX_SIZE.max(1) * (config.worker_threads() + 1);
    let mut pool_config = deadpool_redis::Config::from_url(redis_url(config));
    let mut pool_settings = deadpool_redis::PoolConfig::new(max_size);
    pool_settings.timeouts.wait = Some(CONNECT_TIMEOUT);
    pool_settings.timeouts.create = Some(CONNECT_TIMEOUT);
    pool_settings.timeouts.recycle = Some(CONNECT_TIMEOUT);
    pool_config.pool = Some(pool_settings);
    let pool = pool_config
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|error| HubError::InvalidRedisConfig { target: target.clone(), reason: error.to_string() })?;
    let check = async {
        let mut connection = pool.get().await.map_err(|error| error.to_string())?;
        redis::cmd("PING").query_async::<String>(&mut connection).await.map_err(|error| error.to_string())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, check).await {
        Ok(Ok(_)) => Ok(pool),
        Ok(Err(reason)) => Err(HubError::RedisUnreachable { target, reason }),
        Err(_) => Err(HubError::RedisUnreachable { target, reason: "timed out".into() }),
    }
}
