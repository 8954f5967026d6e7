//! The job queue: plugin jobs (`meta.jobs`) and export retries kept in Postgres in graphile-worker
//! 0.11's layout, so jobs queued by a Node plugin server are run by this one and vice versa.
//!
//! `migrations` owns the schema (run by `--migrate` and at start-up).

pub mod migrations;
