//! The method runners over a loaded set of plugin configs: the `processEvent` chain of a team's
//! plugins (in `order`), `onEvent`/`onSnapshot` (all at once), scheduled tasks and jobs, and
//! teardown. Errors raised by plugin code are recorded on the config and never fail the caller.
//!
//! A `processEvent` the runtime could not run at all (its worker thread lost twice, the pool
//! shutting down) is not a plugin error: the event must not be written without that plugin (it
//! may filter or scrub), so the chain fails with [`PluginUnavailable`] and the caller hands the
//! event back to its queue (retried, then dead-lettered with this reason).

use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use serde_json::Value;
use tracing::{debug, warn};

use super::errors::{process_error, system_log, PluginFailure};
use super::export_events::EXPORT_EVENTS_RETRY_JOB;
use super::extensions::PluginServices;
use super::historical_export;
use super::lazy::{LazyVm, LoadedVm, VmState};
use super::log_entries::LogType;
use super::rows::PluginConfig;
use super::vm_boundary::{event_value, JsError, Method, TaskKind};
use crate::event::PluginEvent;

/// A config in force and its VM.
pub struct ConfigEntry {
    pub config: Arc<PluginConfig>,
    pub vm: Arc<LazyVm>,
}

/// What one plugin's `processEvent` made of the event. `same`: the plugin returned the object it
/// was given (in-place changes only).
enum Step {
    Dropped,
    Kept {
        event: PluginEvent,
        same: bool,
    },
    Failed {
        error: JsError,
        event: PluginEvent,
        same: bool,
    },
    /// The runtime could not run the call (see [`PluginUnavailable`]).
    Unavailable(JsError),
}

/// A plugin of the team's chain could not be run (not a plugin error): the event must go back to
/// its queue instead of being written without that plugin.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("plugin {plugin} (config {plugin_config_id}) could not run processEvent: {reason}")]
pub struct PluginUnavailable {
    pub plugin: String,
    pub plugin_config_id: i32,
    pub reason: String,
}

async fn process_one(loaded: &LoadedVm, event: &PluginEvent) -> Step {
    let team_id = event.team_id;
    match loaded.vm.call_process_event(event).await {
        Ok((value, _)) if !crate::js::is_truthy(&value) => Step::Dropped,
        Ok((mut value, same)) => {
            let team_changed = value.get("team_id").and_then(Value::as_i64) != Some(team_id);
            if team_changed {
                if let Some(object) = value.as_object_mut() {
                    object.insert("team_id".into(), Value::from(team_id));
                }
            }
            match PluginEvent::from_value(value) {
                Ok(returned) if team_changed => Step::Failed {
                    error: JsError::new("IllegalOperationError", "Plugin tried to change event.team_id"),
                    event: returned,
                    same,
                },
                Ok(returned) => Step::Kept { event: returned, same },
                // The pipeline cannot carry something that is not an event: keep the event as it
                // was before this plugin and report the plugin.
                Err(err) => Step::Failed {
                    error: JsError::new("TypeError", format!("processEvent returned an invalid event: {err}")),
                    event: event.clone(),
                    same: true,
                },
            }
        }
        Err(failure) if failure.unavailable => Step::Unavailable(failure.error),
        Err(failure) => {
            // In-place mutations made before the throw are kept (the reference shares the object);
            // after a timeout they are not.
            let mutated = failure
                .args
                .and_then(|args| args.into_iter().next())
                .and_then(|value| PluginEvent::from_value(value).ok())
                .map(|mut mutated| {
                    mutated.team_id = team_id;
                    mutated
                });
            Step::Failed { error: failure.error, event: mutated.unwrap_or_else(|| event.clone()), same: true }
        }
    }
}

/// Runs the team's `processEvent`s in order. `Ok(None)`: a plugin dropped the event; `Err`: a
/// plugin could not be run, the event must not go on.
///
/// `$plugins_succeeded` / `$plugins_failed` / `$plugins_deferred` go where the reference's
/// `run.ts` puts them: on the event object the chain was given. So they are stored only when every
/// plugin handed back that same object (changed in place, or threw); once a plugin returns a new
/// object (`return { ...event }`) the stored event has none, and no property definitions are made
/// for them.
pub async fn run_process_event(
    services: &PluginServices,
    team_configs: &[Arc<ConfigEntry>],
    event: PluginEvent,
) -> Result<Option<PluginEvent>, PluginUnavailable> {
    let mut current = event;
    let mut same_object = true;
    let mut succeeded = Vec::new();
    let mut failed = Vec::new();
    let mut deferred = Vec::new();
    for entry in team_configs {
        let Some(loaded) = entry.vm.get().await else { continue };
        if loaded.has(Method::ProcessEvent) {
            let started = Instant::now();
            let step = process_one(&loaded, &current).await;
            services.observe(
                &entry.config,
                "processEvent",
                started,
                matches!(step, Step::Failed { .. } | Step::Unavailable(_)),
            );
            match step {
                Step::Dropped => return Ok(None),
                Step::Unavailable(error) => {
                    let unavailable = PluginUnavailable {
                        plugin: entry.config.label(),
                        plugin_config_id: entry.config.id,
                        reason: error.message,
                    };
                    tracing::error!(%unavailable, "🔴 event handed back to its queue: a plugin could not run");
                    return Err(unavailable);
                }
                Step::Kept { event, same } => {
                    current = event;
                    same_object &= same;
                    succeeded.push(Value::String(entry.config.label()));
                }
                Step::Failed { error, event, same } => {
                    current = event;
                    same_object &= same;
                    let value = event_value(&current);
                    process_error(services, &entry.config, &PluginFailure::Error(error), Some(&value)).await;
                    debug!(plugin = %entry.config.plugin.name(), "plugin.process_event.ERROR");
                    failed.push(Value::String(entry.config.label()));
                }
            }
        }
        if loaded.has(Method::OnEvent) || loaded.has(Method::OnSnapshot) {
            deferred.push(Value::String(entry.config.label()));
        }
    }
    if same_object && !(succeeded.is_empty() && failed.is_empty() && deferred.is_empty()) {
        let properties = current.properties.get_or_insert_with(Default::default);
        properties.insert("$plugins_succeeded".into(), Value::Array(succeeded));
        properties.insert("$plugins_failed".into(), Value::Array(failed));
        properties.insert("$plugins_deferred".into(), Value::Array(deferred));
    }
    Ok(Some(current))
}

/// Whether a loaded config takes events after ingestion through `method` (`onEvent` or
/// `onSnapshot`): its own method, or the buffered `exportEvents` behind `onEvent`.
fn takes_event_after(loaded: &LoadedVm, method: Method) -> bool {
    loaded.plugin_has(method) || (method == Method::OnEvent && loaded.export.is_some())
}

/// Whether any of the configs may take an event after ingestion through `method`: a VM still
/// loading, or failed and perhaps about to be loaded again, may. Lets the pipeline skip copying
/// the event when no config will read it.
pub fn may_take_event_after(team_configs: &[Arc<ConfigEntry>], method: Method) -> bool {
    team_configs.iter().any(|entry| match entry.vm.current() {
        VmState::Ready(loaded) => takes_event_after(&loaded, method),
        VmState::Loading | VmState::Failed => true,
    })
}

/// Runs `onEvent` (or `onSnapshot`) of all the team's plugins concurrently.
pub async fn run_on_event(
    services: &PluginServices,
    team_configs: &[Arc<ConfigEntry>],
    event: &PluginEvent,
    method: Method,
) {
    let loaded_configs =
        join_all(team_configs.iter().map(|entry| async move { Some((entry, entry.vm.get().await?)) })).await;
    let wanted: Vec<_> =
        loaded_configs.into_iter().flatten().filter(|(_, loaded)| takes_event_after(loaded, method)).collect();
    // The event as JS sees it, made only when some config takes it.
    if wanted.is_empty() {
        return;
    }
    let value = event_value(event);
    join_all(wanted.into_iter().map(|(entry, loaded)| {
        let value = &value;
        async move {
            if method == Method::OnEvent {
                if let Some(export) = &loaded.export {
                    export.on_event(value);
                }
            }
            if !loaded.plugin_has(method) {
                return;
            }
            let started = Instant::now();
            let result = loaded.vm.call(method, vec![value.clone()]).await;
            services.observe(&entry.config, method.name(), started, result.is_err());
            if let Err(failure) = result {
                process_error(services, &entry.config, &PluginFailure::Error(failure.error), Some(value)).await;
                debug!(plugin = %entry.config.plugin.name(), "plugin.on_event.ERROR");
            }
        }
    }))
    .await;
}

/// Runs a scheduled task or job of one config; errors are recorded and give `None`.
pub async fn run_plugin_task(
    services: &PluginServices,
    entry: Option<&Arc<ConfigEntry>>,
    kind: TaskKind,
    name: &str,
    payload: Option<Value>,
) -> Option<Value> {
    let started = Instant::now();
    let loaded = match entry {
        Some(entry) => entry.vm.get().await,
        None => None,
    };
    let result = match &loaded {
        Some(loaded) => match host_job(loaded, kind, name, payload.clone()).await {
            Some(result) => result,
            None if has_task(loaded, kind, name) => {
                loaded.vm.run_task(kind, name, payload).await.map_err(|failure| failure.error)
            }
            None => Err(task_not_found(entry, name)),
        },
        None => Err(task_not_found(entry, name)),
    };
    if let Some(entry) = entry {
        services.observe_task(&entry.config, kind.as_str(), name, started, result.is_err());
    }
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            match entry {
                Some(entry) => process_error(services, &entry.config, &PluginFailure::Error(error), None).await,
                None => warn!("Tried to process error for nonexistent plugin config! {error}"),
            }
            None
        }
    }
}

fn task_not_found(entry: Option<&Arc<ConfigEntry>>, name: &str) -> JsError {
    let plugin_name = entry.map(|entry| entry.config.plugin.name()).unwrap_or_else(|| "undefined".into());
    // The reference renders the config object with String(), hence `[object Object]`.
    let config = if entry.is_some() { "[object Object]" } else { "undefined" };
    JsError::new("Error", format!("Task \"{name}\" not found for plugin \"{plugin_name}\" with config id {config}"))
}

/// Jobs the server adds to exportEvents plugins, run here rather than in the VM.
async fn host_job(
    loaded: &LoadedVm,
    kind: TaskKind,
    name: &str,
    payload: Option<Value>,
) -> Option<Result<Value, JsError>> {
    if kind != TaskKind::Job {
        return None;
    }
    let result = match (name, &loaded.export, &loaded.historical) {
        (EXPORT_EVENTS_RETRY_JOB, Some(export), _) => export.export_with_retry(payload.unwrap_or(Value::Null)).await,
        (historical_export::INTERFACE_JOB, _, Some(historical)) => historical.start(payload).await,
        (historical_export::CHUNK_JOB, _, Some(historical)) => {
            historical.export_chunk(payload.unwrap_or(Value::Null)).await
        }
        _ => return None,
    };
    Some(result.map_err(|failure| failure.error))
}

fn has_task(loaded: &LoadedVm, kind: TaskKind, name: &str) -> bool {
    match kind {
        TaskKind::Schedule => loaded.scheduled_tasks.iter().any(|task| task == name),
        TaskKind::Job => loaded.jobs.iter().any(|job| job == name),
    }
}

/// Tears one config down: cancels a pending retry, flushes the export buffer and runs
/// `teardownPlugin` concurrently, logs the outcome, and with `dispose` releases the VM (not when
/// a successor with the same id is about to replace it).
pub async fn teardown(services: &PluginServices, entry: &ConfigEntry, dispose: bool) {
    entry.vm.cancel_retry();
    let Some(loaded) = entry.vm.get().await else { return };
    let instance = services.hub.instance_id;
    let flush = async {
        if let Some(export) = &loaded.export {
            export.flush().await;
        }
    };
    let own_teardown = async {
        if loaded.plugin_has(Method::TeardownPlugin) {
            loaded.vm.call(Method::TeardownPlugin, Vec::new()).await.map(|_| ())
        } else {
            Ok(())
        }
    };
    let ((), result) = tokio::join!(flush, own_teardown);
    match result {
        Ok(()) => {
            system_log(services, &entry.config, LogType::Info, format!("Plugin unloaded (instance ID {instance})."))
                .await
        }
        Err(failure) => {
            process_error(services, &entry.config, &PluginFailure::Error(failure.error), None).await;
            system_log(
                services,
                &entry.config,
                LogType::Error,
                format!("Plugin failed to unload (instance ID {instance})."),
            )
            .await;
        }
    }
    if dispose {
        loaded.vm.dispose().await;
    }
}
