//! [`Plugins`]: the facade the queues, the scheduler, the job consumer and pub/sub call. It owns
//! the loaded set of plugin configs (by id and per team, in `order`), (re)loads it from Postgres
//! (reusing VMs whose config and plugin did not change, tearing down the others, including
//! configs that disappeared — REF-BUG 11 fixed), computes the schedule, and runs methods, tasks
//! and jobs. A reload swaps the whole set at once; work already running keeps the set it started
//! with, so no in-flight event is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use futures::future::join_all;
use serde_json::Value;
use tracing::{error, info};

use super::errors::{PluginFailure, PluginsError};
use super::extensions::{EnqueuedJob, PluginContext, PluginServices};
use super::lazy::{LazyVm, LoadOptions};
use super::loader::{apply_schema_defaults, load_code, schema_is_empty, PluginCode};
use super::pooled_vm::RuntimeVmFactory;
use super::rows::{Attachment, Plugin, PluginConfig, PluginConfigRow};
use super::run::{self, ConfigEntry};
use super::runtime::WorkerPool;
use super::vm_boundary::{Method, TaskKind, VmFactory};
use crate::db::plugins::fetch_in_force;
use crate::event::PluginEvent;
use crate::schedule::{PluginSchedule, ScheduledTask};

/// One loaded set of configs.
#[derive(Default)]
struct Loaded {
    by_id: BTreeMap<i32, Arc<ConfigEntry>>,
    per_team: HashMap<i64, Vec<Arc<ConfigEntry>>>,
}

/// The plugin configs in force and everything that runs them.
pub struct Plugins {
    services: Arc<PluginServices>,
    factory: Arc<dyn VmFactory>,
    options: LoadOptions,
    loaded: RwLock<Arc<Loaded>>,
    reload_lock: tokio::sync::Mutex<()>,
    schedule: Arc<Mutex<Option<PluginSchedule>>>,
    schedule_generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Plugins {
    /// An empty set; call [`Plugins::reload`] to load the configs.
    pub fn new(services: Arc<PluginServices>, factory: Arc<dyn VmFactory>, options: LoadOptions) -> Plugins {
        Plugins {
            services,
            factory,
            options,
            loaded: RwLock::new(Arc::new(Loaded::default())),
            reload_lock: tokio::sync::Mutex::new(()),
            schedule: Arc::new(Mutex::new(None)),
            schedule_generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// The production wiring: VMs on the QuickJS worker pool, the reference's timing.
    pub fn on_runtime(services: Arc<PluginServices>, pool: Arc<WorkerPool>) -> Plugins {
        let options = LoadOptions::from_config(&services.hub.config);
        Plugins::new(services, Arc::new(RuntimeVmFactory::new(pool)), options)
    }

    pub fn services(&self) -> &Arc<PluginServices> {
        &self.services
    }

    fn snapshot(&self) -> Arc<Loaded> {
        self.loaded.read().map(|loaded| loaded.clone()).unwrap_or_default()
    }

    fn team_configs(&self, team_id: i64) -> (Arc<Loaded>, Vec<Arc<ConfigEntry>>) {
        let loaded = self.snapshot();
        let configs = loaded.per_team.get(&team_id).cloned().unwrap_or_default();
        (loaded, configs)
    }

    /// Whether a config of the team may take the team's events after ingestion (`onEvent`, or
    /// `onSnapshot` for a snapshot; `exportEvents`): the pipeline copies the event only then.
    pub fn team_takes_events_after_ingestion(&self, team_id: i64, snapshot: bool) -> bool {
        let method = if snapshot { Method::OnSnapshot } else { Method::OnEvent };
        self.snapshot().per_team.get(&team_id).is_some_and(|configs| run::may_take_event_after(configs, method))
    }

    /// The loaded config, if in force.
    pub fn config(&self, config_id: i32) -> Option<Arc<PluginConfig>> {
        self.snapshot().by_id.get(&config_id).map(|entry| entry.config.clone())
    }

    /// Every config in force.
    pub fn configs(&self) -> Vec<Arc<PluginConfig>> {
        self.snapshot().by_id.values().map(|entry| entry.config.clone()).collect()
    }

    /// Config ids of a team, in run order.
    pub fn team_order(&self, team_id: i64) -> Vec<(i32, i32)> {
        self.team_configs(team_id).1.iter().map(|entry| (entry.config.id, entry.config.order)).collect()
    }

    /// Waits for a config's VM to settle and returns its capabilities (`None`: not in force or
    /// failed to load).
    pub async fn capabilities(&self, config_id: i32) -> Option<Value> {
        let entry = self.snapshot().by_id.get(&config_id).cloned()?;
        entry.vm.get().await.map(|loaded| loaded.capabilities())
    }

    /// (Re)loads the configs in force: unchanged configs keep their VM; changed, new ones get a
    /// new VM (set up in the background); replaced and removed ones are torn down in the
    /// background. Then the schedule is recomputed in the background.
    pub async fn reload(&self) -> Result<(), PluginsError> {
        let _guard = self.reload_lock.lock().await;
        let rows = fetch_in_force(&self.services.hub.postgres).await?;
        let previous = self.snapshot();
        let mut attachments = rows.attachments_by_config();
        let plugins: HashMap<i32, Arc<Plugin>> =
            rows.plugins.into_iter().map(|row| (row.id, Arc::new(Plugin::new(row)))).collect();
        let mut next = Loaded::default();
        let mut removed = Vec::new();
        for row in rows.configs {
            let Some(plugin) = plugins.get(&row.plugin_id) else { continue };
            let reused = previous.by_id.get(&row.id).filter(|prev| {
                prev.config.updated_at == row.updated_at && prev.config.plugin.row.updated_at == plugin.row.updated_at
            });
            let entry = match reused {
                Some(prev) => prev.clone(),
                None => {
                    let (config, code) = config_in_force(
                        &self.services.hub.config.BASE_DIR,
                        plugin,
                        &row,
                        attachments.remove(&row.id).unwrap_or_default(),
                    );
                    let context = Arc::new(PluginContext::new(self.services.clone(), config.clone()));
                    let vm = LazyVm::start(
                        self.services.clone(),
                        self.factory.clone(),
                        self.options.clone(),
                        context,
                        code,
                        previous.by_id.get(&row.id).cloned(),
                    );
                    Arc::new(ConfigEntry { config, vm })
                }
            };
            next.by_id.insert(row.id, entry.clone());
            match row.team_id.filter(|team| *team != 0) {
                Some(team) => next.per_team.entry(team as i64).or_default().push(entry),
                None => error!("🔴 PluginConfig(id={}) without team_id!", row.id),
            }
        }
        for configs in next.per_team.values_mut() {
            configs.sort_by_key(|entry| entry.config.order);
        }
        // REF-BUG 11 fixed: configs no longer in force are torn down too. (Replaced configs are
        // torn down by their successor before it loads.)
        for (id, prev) in &previous.by_id {
            if !next.by_id.contains_key(id) {
                removed.push(prev.clone());
            }
        }
        if let Ok(mut loaded) = self.loaded.write() {
            *loaded = Arc::new(next);
        }
        for entry in removed {
            let services = self.services.clone();
            tokio::spawn(async move { run::teardown(&services, &entry, true).await });
        }
        self.spawn_schedule_reload();
        Ok(())
    }

    /// Recomputes the schedule in the background (`schedule()` is `None` meanwhile).
    pub fn spawn_schedule_reload(&self) {
        let generation = self.schedule_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if let Ok(mut schedule) = self.schedule.lock() {
            *schedule = None;
        }
        let loaded = self.snapshot();
        let schedule = self.schedule.clone();
        let generations = self.schedule_generation.clone();
        tokio::spawn(async move {
            let computed = compute_schedule(&loaded).await;
            // A newer reload started meanwhile: its computation wins.
            if generations.load(std::sync::atomic::Ordering::SeqCst) == generation {
                if let Ok(mut schedule) = schedule.lock() {
                    *schedule = Some(computed);
                }
            }
        });
    }

    /// The schedule, `None` while it is being computed.
    pub fn schedule(&self) -> Option<PluginSchedule> {
        self.schedule.lock().ok().and_then(|schedule| schedule.clone())
    }

    /// Computes the schedule now (waits for every VM to settle).
    pub async fn wait_for_schedule(&self) -> PluginSchedule {
        let computed = compute_schedule(&self.snapshot()).await;
        if let Ok(mut schedule) = self.schedule.lock() {
            *schedule = Some(computed.clone());
        }
        computed
    }

    /// The `processEvent` chain of the event's team. `None`: a plugin dropped the event.
    pub async fn run_process_event(&self, event: PluginEvent) -> Result<Option<PluginEvent>, run::PluginUnavailable> {
        let (_loaded, configs) = self.team_configs(event.team_id);
        run::run_process_event(&self.services, &configs, event).await
    }

    /// All of the team's `onEvent`s (and the exportEvents buffers).
    pub async fn run_on_event(&self, event: &PluginEvent) {
        let (_loaded, configs) = self.team_configs(event.team_id);
        run::run_on_event(&self.services, &configs, event, Method::OnEvent).await
    }

    /// All of the team's `onSnapshot`s.
    pub async fn run_on_snapshot(&self, event: &PluginEvent) {
        let (_loaded, configs) = self.team_configs(event.team_id);
        run::run_on_event(&self.services, &configs, event, Method::OnSnapshot).await
    }

    /// A scheduled task of one config; its return value, or `None` when it failed or is missing.
    pub async fn run_scheduled(&self, task: ScheduledTask, config_id: i32) -> Option<Value> {
        let loaded = self.snapshot();
        run::run_plugin_task(&self.services, loaded.by_id.get(&config_id), TaskKind::Schedule, task.as_str(), None)
            .await
    }

    /// A job from the job queue.
    pub async fn run_job(&self, job: EnqueuedJob) -> Option<Value> {
        let loaded = self.snapshot();
        let payload = Some(job.payload).filter(crate::js::is_truthy);
        // A config id that does not fit the table's int column names no loaded config.
        let entry = i32::try_from(job.plugin_config_id).ok().and_then(|id| loaded.by_id.get(&id));
        run::run_plugin_task(&self.services, entry, TaskKind::Job, &job.job_type, payload).await
    }

    /// Tears every loaded config down (shutdown) and flushes the log sink.
    pub async fn teardown_all(&self) {
        let loaded = self.snapshot();
        join_all(loaded.by_id.values().map(|entry| run::teardown(&self.services, entry, true))).await;
        self.services.logs.flush().await;
    }

    /// Captures the accumulated `$$plugin_metrics` events and resets the accumulators.
    pub async fn send_plugin_metrics(&self) {
        self.services.metrics.send(self.services.capture.as_ref(), crate::VERSION).await;
    }
}

/// A config row in force as the server runs it: its plugin's code found (`loader`), and
/// `meta.config` with the schema defaults filled in (the plugin row's schema, else plugin.json's).
pub fn config_in_force(
    base_dir: &str,
    plugin: &Arc<Plugin>,
    row: &PluginConfigRow,
    attachments: Vec<(String, Attachment)>,
) -> (Arc<PluginConfig>, Result<PluginCode, PluginFailure>) {
    let code = load_code(base_dir, plugin);
    let mut config_map = match &row.config {
        Value::Object(map) => map.clone(),
        _ => Default::default(),
    };
    apply_schema_defaults(&mut config_map, &plugin.row.config_schema);
    if schema_is_empty(&plugin.row.config_schema) {
        if let Some(schema) = code.as_ref().ok().and_then(|code| code.json_config_schema.as_ref()) {
            apply_schema_defaults(&mut config_map, schema);
        }
    }
    let config = Arc::new(PluginConfig {
        id: row.id,
        team_id: row.team_id,
        plugin_id: row.plugin_id,
        order: row.order.unwrap_or(0),
        config: config_map,
        error: row.error.clone(),
        created_at: row.created_at,
        updated_at: row.updated_at,
        plugin: plugin.clone(),
        attachments,
    });
    (config, code)
}

async fn compute_schedule(loaded: &Loaded) -> PluginSchedule {
    let mut schedule = PluginSchedule::default();
    let mut count = 0;
    for (id, entry) in &loaded.by_id {
        let Some(vm) = entry.vm.get().await else { continue };
        for task in ScheduledTask::ALL {
            if vm.scheduled_tasks.iter().any(|name| name == task.as_str()) {
                schedule.configs_for_mut(task).push(*id);
                count += 1;
            }
        }
    }
    if count > 0 {
        info!("🔌 Loaded {count} scheduled tasks");
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_serializes_like_get_plugin_schedule() {
        let schedule = PluginSchedule { run_every_day: vec![39], ..PluginSchedule::default() };
        assert_eq!(
            serde_json::to_string(&schedule).unwrap(),
            r#"{"runEveryMinute":[],"runEveryHour":[],"runEveryDay":[39]}"#
        );
    }
}
