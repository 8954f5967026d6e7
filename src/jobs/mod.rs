//! The job queue: plugin jobs (`meta.jobs`) and export retries kept in Postgres in graphile-worker
//! 0.11's layout, so jobs queued by a Node plugin server are run by this one and vice versa.
//!
//! `migrations` owns the schema (run by `--migrate` and at start-up); `job` the stored job shape;
//! `queue` the engine interface and the [`JobRunner`](queue::JobRunner) the plugins side
//! implements; `graphile` and `fs_queue` the engines; `manager` the `JOB_QUEUES` fallback list;
//! `consumer` the lock-guarded consumer component.

pub mod consumer;
pub mod fs_queue;
pub mod graphile;
pub mod job;
pub mod manager;
pub mod migrations;
pub mod queue;

pub use job::EnqueuedJob;
pub use manager::{JobQueueManager, JobQueueOptions};
pub use queue::{JobQueueError, JobRunner};
