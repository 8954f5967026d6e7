//! plugin-server: a drop-in Rust replacement for the PostHog Plugin Server 1.10.x.
//!
//! See `ARCHITECTURE.md` for the data path from queue to sink. Each module says in its first
//! lines what it owns.

pub mod clickhouse;
pub mod config;
pub mod event;
pub mod geoip;
pub mod health;
pub mod hub;
pub mod infra;
pub mod ingestion;
pub mod jobs;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod pipeline;
pub mod plugins;
pub mod pubsub;
pub mod schedule;
pub mod server;
pub mod sinks;
pub mod sources;

/// The reference version this server is compatible with, reported by `--version`, written to
/// `@posthog-plugin-server/version` and used in client ids.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
