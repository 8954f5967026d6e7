//! The scheduler: runEveryMinute/Hour/Day of every loaded plugin config on the reference's cron
//! boundaries, on exactly one server of a cluster (Redis lock `plugin-server:locks:schedule`).
//!
//! It owns the timing, the lock and the "no overlap" rule (a task still running for a config is
//! skipped, not queued, on the next tick). It does not run plugin code: every run goes through a
//! [`ScheduledTaskRunner`], implemented over the plugin pool. A slow or failing task never delays
//! another: each run is its own tokio task.
//!
//! `infra::cron` holds the boundary arithmetic and `infra::redlock` the lock (also used by the job
//! queue consumer).

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::infra::cron;
use crate::infra::redlock::{lock_key, LockState, Redlock, SCHEDULE_LOCK};
use crate::infra::BoxError;
use crate::metrics::catalog::{self, Stage};

/// The three scheduled plugin methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduledTask {
    RunEveryMinute,
    RunEveryHour,
    RunEveryDay,
}

impl ScheduledTask {
    pub const ALL: [ScheduledTask; 3] =
        [ScheduledTask::RunEveryMinute, ScheduledTask::RunEveryHour, ScheduledTask::RunEveryDay];

    /// The plugin method / worker task name (`runEveryMinute`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduledTask::RunEveryMinute => "runEveryMinute",
            ScheduledTask::RunEveryHour => "runEveryHour",
            ScheduledTask::RunEveryDay => "runEveryDay",
        }
    }

    /// The reference's cron period for this task.
    pub fn default_period(self) -> Duration {
        match self {
            ScheduledTask::RunEveryMinute => cron::EVERY_MINUTE,
            ScheduledTask::RunEveryHour => cron::EVERY_HOUR,
            ScheduledTask::RunEveryDay => cron::EVERY_DAY,
        }
    }
}

impl fmt::Display for ScheduledTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which plugin configs have which scheduled task, as the reference's `getPluginSchedule` returns
/// it (`{runEveryMinute: [ids], runEveryHour: [...], runEveryDay: [...]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginSchedule {
    #[serde(rename = "runEveryMinute", default)]
    pub run_every_minute: Vec<i32>,
    #[serde(rename = "runEveryHour", default)]
    pub run_every_hour: Vec<i32>,
    #[serde(rename = "runEveryDay", default)]
    pub run_every_day: Vec<i32>,
}

impl PluginSchedule {
    pub fn configs_for(&self, task: ScheduledTask) -> &[i32] {
        match task {
            ScheduledTask::RunEveryMinute => &self.run_every_minute,
            ScheduledTask::RunEveryHour => &self.run_every_hour,
            ScheduledTask::RunEveryDay => &self.run_every_day,
        }
    }

    pub fn configs_for_mut(&mut self, task: ScheduledTask) -> &mut Vec<i32> {
        match task {
            ScheduledTask::RunEveryMinute => &mut self.run_every_minute,
            ScheduledTask::RunEveryHour => &mut self.run_every_hour,
            ScheduledTask::RunEveryDay => &mut self.run_every_day,
        }
    }
}

/// What the scheduler needs from the plugin side (implemented over the plugin pool).
#[async_trait]
pub trait ScheduledTaskRunner: Send + Sync + 'static {
    /// The current schedule of the loaded plugin configs, or `None` while plugins are still
    /// loading (the reference's `getPluginSchedule` returning `null`).
    async fn plugin_schedule(&self) -> Option<PluginSchedule>;

    /// Runs `task` of one plugin config and resolves when it finished. An error is the plugin's
    /// failure: the runner records it on the config (the reference's `processError`); the
    /// scheduler only logs it.
    async fn run_scheduled_task(&self, task: ScheduledTask, plugin_config_id: i32) -> Result<(), BoxError>;
}

#[derive(Debug, Error)]
pub enum ScheduleError {
    #[error("Could not load plugin schedule in time")]
    LoadTimedOut,
}

/// Timing of the scheduler; [`ScheduleSettings::from_config`] gives the reference's values,
/// tests shorten them.
#[derive(Debug, Clone)]
pub struct ScheduleSettings {
    /// The lock's Redis key (`REDIS_LOCK_PREFIX` + `plugin-server:locks:schedule`).
    pub lock_resource: String,
    /// `SCHEDULE_LOCK_TTL`.
    pub lock_ttl: Duration,
    /// Cron period of each task (one minute / hour / day).
    pub periods: [(ScheduledTask, Duration); 3],
    /// How often and how many times to ask for the schedule while plugins load (200 ms × 2000).
    pub load_interval: Duration,
    pub load_attempts: usize,
}

impl ScheduleSettings {
    pub fn from_config(config: &Config) -> ScheduleSettings {
        ScheduleSettings {
            lock_resource: lock_key(config, SCHEDULE_LOCK),
            lock_ttl: Duration::from_secs_f64(config.SCHEDULE_LOCK_TTL),
            periods: ScheduledTask::ALL.map(|task| (task, task.default_period())),
            load_interval: Duration::from_millis(200),
            load_attempts: 2000,
        }
    }
}

/// The plugin schedule and the runs in flight. Share it as `Arc<Scheduler>`: pub/sub calls
/// [`Scheduler::reload`] after a plugin reload.
pub struct Scheduler {
    runner: Arc<dyn ScheduledTaskRunner>,
    settings: ScheduleSettings,
    schedule: RwLock<PluginSchedule>,
    in_flight: Mutex<HashSet<(ScheduledTask, i32)>>,
    runs: TaskTracker,
}

impl Scheduler {
    pub fn new(runner: Arc<dyn ScheduledTaskRunner>, settings: ScheduleSettings) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            runner,
            settings,
            schedule: RwLock::new(PluginSchedule::default()),
            in_flight: Mutex::new(HashSet::new()),
            runs: TaskTracker::new(),
        })
    }

    /// The schedule in use.
    pub fn schedule(&self) -> PluginSchedule {
        self.schedule.read().map(|schedule| schedule.clone()).unwrap_or_default()
    }

    /// Asks the runner for the schedule until it has one (the reference's `loadPluginSchedule`),
    /// and uses it. Call once before [`Scheduler::run`], and after every plugin reload.
    pub async fn reload(&self) -> Result<PluginSchedule, ScheduleError> {
        for attempt in 0..self.settings.load_attempts.max(1) {
            if let Some(schedule) = self.runner.plugin_schedule().await {
                if let Ok(mut current) = self.schedule.write() {
                    *current = schedule.clone();
                }
                return Ok(schedule);
            }
            if attempt + 1 < self.settings.load_attempts {
                tokio::time::sleep(self.settings.load_interval).await;
            }
        }
        Err(ScheduleError::LoadTimedOut)
    }

    /// Starts `task` for every config that has it, skipping configs whose previous run of the
    /// same task is still going (the reference's `runScheduleDebounced`). Returns at once.
    pub fn run_debounced(self: &Arc<Self>, task: ScheduledTask) {
        let configs = self.schedule().configs_for(task).to_vec();
        for plugin_config_id in configs {
            let newly_started = match self.in_flight.lock() {
                Ok(mut in_flight) => in_flight.insert((task, plugin_config_id)),
                Err(_) => false,
            };
            if !newly_started {
                continue;
            }
            let scheduler = Arc::clone(self);
            self.runs.spawn(async move {
                let started = std::time::Instant::now();
                catalog::received(Stage::Schedule, task.as_str(), 1);
                match scheduler.runner.run_scheduled_task(task, plugin_config_id).await {
                    Ok(()) => catalog::handled(Stage::Schedule, task.as_str(), 1),
                    Err(error) => {
                        warn!("🔴 Scheduled task {task} of plugin config {plugin_config_id} failed: {error}");
                        catalog::dropped(Stage::Schedule, "failed", 1);
                    }
                }
                catalog::schedule_run(task.as_str(), plugin_config_id, started.elapsed());
                if let Ok(mut in_flight) = scheduler.in_flight.lock() {
                    in_flight.remove(&(task, plugin_config_id));
                }
            });
        }
    }

    /// Waits for every run started so far to finish.
    pub async fn wait_for_tasks_to_finish(&self) {
        self.runs.close();
        self.runs.wait().await;
        self.runs.reopen();
    }

    /// Runs the schedule until `shutdown`: contends for the schedule lock on its own Redis
    /// connection and, while holding it, starts each task on its boundaries. On shutdown it
    /// stops ticking, releases the lock and waits for the runs in flight.
    pub async fn run(self: Arc<Self>, redis: redis::Client, shutdown: CancellationToken) {
        self.run_with_lock_observer(redis, shutdown, |_| {}).await
    }

    /// [`Scheduler::run`], also telling `on_lock_change` each time the lock is won or lost.
    pub async fn run_with_lock_observer(
        self: Arc<Self>,
        redis: redis::Client,
        shutdown: CancellationToken,
        on_lock_change: impl Fn(bool) + Send + Sync + 'static,
    ) {
        info!("⏰ Starting scheduling service...");
        let lock_shutdown = CancellationToken::new();
        let (lock, lock_task) = Redlock::new(self.settings.lock_resource.clone(), self.settings.lock_ttl)
            .spawn(redis, lock_shutdown.clone());
        let ticking = CancellationToken::new();
        let mut tickers = Vec::new();
        for (task, period) in self.settings.periods {
            let scheduler = Arc::clone(&self);
            let lock = lock.clone();
            tickers.push(tokio::spawn(cron::run_on_boundaries(period, ticking.clone(), move || {
                if lock.held() {
                    scheduler.run_debounced(task);
                }
                std::future::ready(())
            })));
        }
        let held_at_stop = watch_lock(lock, shutdown.clone(), &on_lock_change).await;
        ticking.cancel();
        for ticker in tickers {
            let _ = ticker.await;
        }
        lock_shutdown.cancel();
        let _ = lock_task.await;
        if held_at_stop {
            on_lock_change(false);
        }
        self.wait_for_tasks_to_finish().await;
        info!("⏰ Scheduling service stopped");
    }
}

/// Reports lock changes until `shutdown`; returns whether the lock was held then.
async fn watch_lock(mut lock: LockState, shutdown: CancellationToken, on_change: &impl Fn(bool)) -> bool {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return lock.held(),
            held = lock.changed() => match held {
                Some(held) => on_change(held),
                None => {
                    shutdown.cancelled().await;
                    return false;
                }
            },
        }
    }
}
