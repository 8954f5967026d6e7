//! One plugin config's VM lifecycle (the reference's `LazyPluginVM`): tear down the config's
//! previous VM when this one replaces it, create the VM (which awaits `setupPlugin`), apply the
//! exportEvents upgrade, validate and store metrics, then record success
//! (log entry, cleared error, capabilities) or failure. Every failure is retried after
//! 3·2^(n−1) s; the 10th failure disables the config. While a load is in progress, callers of
//! [`LazyVm::get`] wait (events queue behind set-up); while a retry is pending they get `None`
//! (the plugin is skipped). Teardown cancels a pending retry.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::errors::{clear_error, process_error, system_log, PluginFailure};
use super::export_events::{ExportEvents, ExportSettings, EXPORT_EVENTS_RETRY_JOB};
use super::extensions::metrics::setup_metrics;
use super::extensions::{PluginContext, PluginServices};
use super::historical_export::{self, HistoricalExport};
use super::loader::PluginCode;
use super::log_entries::LogType;
use super::run::{teardown, ConfigEntry};
use super::vm_boundary::{JsError, Method, PluginVm, VmFactory};

/// Set-up attempts before a config is disabled.
pub const MAX_SETUP_ATTEMPTS: u32 = 10;

/// Timing knobs (tests shrink the retry base).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Wait after the first failure; doubles after each further failure (reference: 3 s).
    pub retry_base: Duration,
    /// Test environment: the exportEvents buffer defaults to 600 s.
    pub test_env: bool,
}

impl LoadOptions {
    /// The reference's timing, with the test-environment default of `NODE_ENV`.
    pub fn from_config(config: &crate::config::Config) -> LoadOptions {
        LoadOptions { test_env: config.is_test(), ..LoadOptions::default() }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { retry_base: Duration::from_secs(3), test_env: false }
    }
}

/// A VM ready for calls, with the server's upgrades applied.
pub struct LoadedVm {
    pub vm: Arc<dyn PluginVm>,
    pub context: Arc<PluginContext>,
    /// Methods after upgrades (exportEvents adds `onEvent`, `setupPlugin`, `teardownPlugin`).
    pub methods: Vec<Method>,
    pub scheduled_tasks: Vec<String>,
    /// Jobs after upgrades (exportEvents adds `exportEventsWithRetry`).
    pub jobs: Vec<String>,
    pub export: Option<Arc<ExportEvents>>,
    pub historical: Option<Arc<HistoricalExport>>,
}

impl LoadedVm {
    pub fn has(&self, method: Method) -> bool {
        self.methods.contains(&method)
    }

    /// Whether the plugin's own code defines `method` (as opposed to an upgrade).
    pub fn plugin_has(&self, method: Method) -> bool {
        self.vm.exports().has(method)
    }

    /// `{methods, scheduled_tasks, jobs}` as stored in `posthog_plugin.capabilities`.
    pub fn capabilities(&self) -> Value {
        let methods: Vec<&str> = Method::ALL.iter().filter(|m| self.has(**m)).map(|m| m.name()).collect();
        json!({"methods": methods, "scheduled_tasks": self.scheduled_tasks, "jobs": self.jobs})
    }
}

#[derive(Clone)]
pub enum VmState {
    Loading,
    Ready(Arc<LoadedVm>),
    /// Failed; a retry may be pending.
    Failed,
}

pub struct LazyVm {
    state: watch::Sender<VmState>,
    cancel: CancellationToken,
}

/// The wait before retry `attempt + 1`, and its text in the log lines (`3 s`, `6 s`, …).
fn retry_delay(options: &LoadOptions, attempt: u32) -> Duration {
    options.retry_base * 2_u32.saturating_pow(attempt.saturating_sub(1))
}

fn seconds_text(delay: Duration) -> String {
    crate::js::number_to_string(delay.as_millis() as f64 / 1000.0)
}

impl LazyVm {
    /// Starts loading in the background. `code` is the loader's result: a load failure is
    /// recorded and never retried. `predecessor`, the config's entry this one replaces, is torn
    /// down first (calls wait meanwhile), so its teardown sees the old VM and the new set-up sees
    /// what the teardown stored.
    pub fn start(
        services: Arc<PluginServices>,
        factory: Arc<dyn VmFactory>,
        options: LoadOptions,
        context: Arc<PluginContext>,
        code: Result<PluginCode, PluginFailure>,
        predecessor: Option<Arc<ConfigEntry>>,
    ) -> Arc<LazyVm> {
        let (state, _) = watch::channel(VmState::Loading);
        let lazy = Arc::new(LazyVm { state, cancel: CancellationToken::new() });
        let task_lazy = lazy.clone();
        tokio::spawn(async move {
            if let Some(predecessor) = predecessor {
                teardown(&services, &predecessor, false).await;
            }
            match code {
                Err(failure) => {
                    process_error(&services, &context.config, &failure, None).await;
                    task_lazy.state.send_replace(VmState::Failed);
                }
                Ok(code) => task_lazy.load_with_retries(services, factory, options, context, code).await,
            }
        });
        lazy
    }

    /// The VM once loading settles; `None` when loading failed (or a retry is pending).
    pub async fn get(&self) -> Option<Arc<LoadedVm>> {
        let mut receiver = self.state.subscribe();
        let state = receiver.wait_for(|state| !matches!(state, VmState::Loading)).await.ok()?.clone();
        match state {
            VmState::Ready(vm) => Some(vm),
            _ => None,
        }
    }

    /// The state right now, without waiting.
    pub fn current(&self) -> VmState {
        self.state.borrow().clone()
    }

    /// Cancels a pending set-up retry (teardown, reload).
    pub fn cancel_retry(&self) {
        self.cancel.cancel();
    }

    async fn load_with_retries(
        &self,
        services: Arc<PluginServices>,
        factory: Arc<dyn VmFactory>,
        options: LoadOptions,
        context: Arc<PluginContext>,
        code: PluginCode,
    ) {
        let config = context.config.clone();
        let instance = services.hub.instance_id;
        let mut attempt = 1;
        loop {
            self.state.send_replace(VmState::Loading);
            match initialize(&services, &factory, &options, &context, &code.code).await {
                Ok(loaded) => {
                    system_log(&services, &config, LogType::Info, format!("Plugin loaded (instance ID {instance})."))
                        .await;
                    info!("🔌 Loaded {}", code.log_info);
                    clear_error(&services, &config).await;
                    infer_capabilities(&services, &loaded).await;
                    self.state.send_replace(VmState::Ready(loaded));
                    return;
                }
                Err(error) => {
                    warn!("⚠️ {}", error.message);
                    system_log(&services, &config, LogType::Error, error.message.clone()).await;
                    process_error(&services, &config, &PluginFailure::Error(error), None).await;
                    if attempt < MAX_SETUP_ATTEMPTS {
                        let delay = retry_delay(&options, attempt);
                        let text = seconds_text(delay);
                        warn!("⚠️ Failed to load {}. Retrying in {text} s.", code.log_info);
                        let message = format!("Plugin failed to load (instance ID {instance}). Retrying in {text} s.");
                        system_log(&services, &config, LogType::Error, message).await;
                        self.state.send_replace(VmState::Failed);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.cancel.cancelled() => return,
                        }
                        attempt += 1;
                    } else {
                        let plural = if attempt > 1 { "s" } else { "" };
                        let context_message = format!(
                            "Disabling it due to too many retries – tried to load it {attempt} time{plural} before giving up."
                        );
                        warn!("⚠️ Failed to load {}. {context_message}", code.log_info);
                        let message = format!("Plugin failed to load (instance ID {instance}). {context_message}");
                        system_log(&services, &config, LogType::Error, message).await;
                        if let Err(err) = services.records.disable_plugin_config(config.id).await {
                            warn!(plugin_config_id = config.id, error = %err, "could not disable plugin config");
                        }
                        self.state.send_replace(VmState::Failed);
                        return;
                    }
                }
            }
        }
    }
}

/// One attempt: create (with `setupPlugin`), upgrade, metrics.
async fn initialize(
    services: &Arc<PluginServices>,
    factory: &Arc<dyn VmFactory>,
    options: &LoadOptions,
    context: &Arc<PluginContext>,
    code: &str,
) -> Result<Arc<LoadedVm>, JsError> {
    let vm = factory.create(context.clone(), code.to_string()).await?;
    let exports = vm.exports().clone();
    let mut methods = exports.methods.clone();
    let mut jobs = exports.jobs.clone();
    let export_events = exports.has(Method::ExportEvents);
    let export = if export_events {
        for method in [Method::SetupPlugin, Method::TeardownPlugin, Method::OnEvent] {
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        for job in [EXPORT_EVENTS_RETRY_JOB, historical_export::CHUNK_JOB, historical_export::INTERFACE_JOB] {
            if !jobs.iter().any(|existing| existing == job) {
                jobs.push(job.to_string());
            }
        }
        let settings = ExportSettings::from_config(&context.config.config, options.test_env);
        Some(ExportEvents::new(settings, vm.clone(), context.clone()))
    } else {
        None
    };
    let historical = if export_events {
        let records = services.records.clone();
        let plugin_id = context.config.plugin_id;
        tokio::spawn(async move { records.add_public_job(plugin_id).await });
        // Events from here on reach exportEvents through onEvent: the historical export stops at
        // the last event stored before this set-up.
        // DELIBERATE DEVIATION: in the reference a failed read fails the set-up (and ten of them
        // disable the config); here the export is still set up and reads them when it starts.
        let boundaries = match services.past_events.timestamp_boundaries(context.config.team()).await {
            Ok(boundaries) => Some(boundaries),
            Err(err) => {
                warn!(plugin_config_id = context.config.id, error = %err, "could not read the team's first and last event time for the historical export; it reads them when it starts");
                None
            }
        };
        Some(Arc::new(HistoricalExport::new(vm.clone(), context.clone(), boundaries)))
    } else {
        None
    };
    if let Err(error) =
        setup_metrics(services.records.as_ref(), &context.config, exports.metrics.as_ref(), export_events).await
    {
        vm.dispose().await;
        return Err(error);
    }
    Ok(Arc::new(LoadedVm {
        vm,
        context: context.clone(),
        methods,
        scheduled_tasks: exports.scheduled_tasks,
        jobs,
        export,
        historical,
    }))
}

/// Stores the VM's capabilities in `posthog_plugin` when they differ from what the plugin row
/// says (the in-memory copy is updated too, so other configs of the plugin do not write again).
async fn infer_capabilities(services: &PluginServices, loaded: &LoadedVm) {
    let plugin = &loaded.context.config.plugin;
    let capabilities = loaded.capabilities();
    let changed = match plugin.capabilities.lock() {
        Ok(mut current) if *current != capabilities => {
            *current = capabilities.clone();
            true
        }
        _ => false,
    };
    if changed {
        if let Err(err) = services.records.set_plugin_capabilities(plugin.id(), &capabilities).await {
            warn!(plugin_id = plugin.id(), error = %err, "could not store plugin capabilities");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_schedule_matches_the_reference() {
        let options = LoadOptions::default();
        let texts: Vec<String> = (1..10).map(|attempt| seconds_text(retry_delay(&options, attempt))).collect();
        assert_eq!(texts, ["3", "6", "12", "24", "48", "96", "192", "384", "768"]);
    }
}
