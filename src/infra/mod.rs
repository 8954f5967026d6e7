//! Shared infrastructure that serves several rooms and belongs to none: the cron boundaries and the
//! Redis lock (schedule, job queue, metrics, geoip), pipelined Redis commands, librdkafka client
//! settings (consumer and producer), micro-batching of writes, a TTL cache, bounded Redis calls
//! and their error (`redis_call`), and [`BoxError`].

pub mod batch;
pub mod cron;
pub mod kafka_settings;
pub mod pipelined_redis;
pub mod redis_call;
pub mod redlock;
pub mod ttl_cache;

/// Errors a runner or the plugins behind it report; logged by the caller, recorded by the runner.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
