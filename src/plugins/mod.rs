//! Plugins: loading (archive, source, local folder, plugin.json), code transforms, the sandboxed
//! JavaScript runtime on a fixed pool of worker threads (one VM per plugin config per thread), the
//! meta API, and the method runners (processEvent, onEvent, onSnapshot, exportEvents, scheduled
//! tasks, jobs).
//!
//! `runtime` and `transform` hold the JavaScript engine. Everything else here is plain async Rust:
//! which configs are in force ([`rows`]), where their code comes from ([`loader`], [`archive`]),
//! the meta API behind `meta.*`, `console` and `posthog` ([`extensions`]), plugin log entries
//! ([`log_entries`]), error recording ([`errors`]), the VM lifecycle with set-up retries ([`lazy`]),
//! the exportEvents buffer and historical export ([`export_events`], [`historical_export`]), the boundary with the JavaScript runtime ([`vm_boundary`]: what a VM offers) and its implementation over the runtime's worker pool ([`pooled_vm`]) and the
//! [`Plugins`](manager::Plugins) facade the queues, scheduler and job consumer call. [`memory`]
//! holds in-memory stores behind the meta API's seams, on which [`dev`] runs the plugin dev loop
//! (`plugin-server plugin run|check`).

pub mod runtime;
pub mod transform;

pub mod archive;
pub mod dev;
pub mod errors;
pub mod export_events;
pub mod extensions;
pub mod historical_export;
pub mod lazy;
pub mod loader;
pub mod log_entries;
pub mod manager;
pub mod memory;
pub mod past_events;
pub mod pooled_vm;
pub mod rows;
pub mod run;
pub mod vm_boundary;

pub use manager::Plugins;
