//! The pipeline: what happens to one event between the queue it arrived on and the sinks, in the
//! reference's order (00 §1.3):
//! 1. unless it is a `$snapshot`, the team's `processEvent` chain (plugins may change or drop it);
//! 2. then, in parallel and each with its own copy, the ingestion write and `onEvent`
//!    (`onSnapshot` for snapshots, which also feed the exportEvents buffers).
//!
//! It also answers the calls that come from beside the stream — scheduled tasks, jobs, reloads —
//! by handing them to the plugins and the action cache. It owns no state of its own beyond the
//! handles: the rooms it calls own theirs.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use serde_json::Value;
use tracing::warn;

use crate::event::PluginEvent;
use crate::infra::BoxError;
use crate::ingestion::actions::ActionManager;
use crate::ingestion::process_event::{EventsProcessor, IngestError};
use crate::jobs::job::EnqueuedJob;
use crate::jobs::manager::JobQueueManager;
use crate::jobs::queue::JobRunner;
use crate::metrics::catalog::{self, EventStep, Stage};
use crate::metrics::staleness::ActivityTracker;
use crate::plugins::Plugins;
use crate::pubsub::ReloadHandler;
use crate::schedule::{PluginSchedule, ScheduledTask, ScheduledTaskRunner};
use crate::sources::{EventHandler, HandleError};

/// How many locks the distinct ids of concurrent events are spread over.
const DISTINCT_ID_STRIPES: usize = 1024;

/// Orders the ingestion of events that share a distinct id. Persons are created, merged and updated
/// by several statements per event; two events of one new user ingested at once would race (the
/// reference loses such events). Each distinct id maps to one of a fixed set of locks; an event holds
/// the locks of every distinct id it touches (identify and alias touch two), taken in index order so
/// two events can never wait on each other.
pub struct DistinctIdLocks {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl Default for DistinctIdLocks {
    fn default() -> Self {
        DistinctIdLocks { stripes: (0..DISTINCT_ID_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect() }
    }
}

impl DistinctIdLocks {
    fn stripe(team_id: i64, distinct_id: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (team_id, distinct_id).hash(&mut hasher);
        (hasher.finish() % DISTINCT_ID_STRIPES as u64) as usize
    }

    /// The distinct ids an event's person processing touches.
    fn touched(event: &PluginEvent) -> Vec<String> {
        let mut ids = vec![event.distinct_id.clone()];
        let other = match event.event.as_str() {
            "$identify" => "$anon_distinct_id",
            "$create_alias" => "alias",
            _ => return ids,
        };
        if let Some(value) = event.properties.as_ref().and_then(|properties| properties.get(other)) {
            ids.push(match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            });
        }
        ids
    }

    /// The locks of the distinct ids an event touches, in the order they are taken.
    pub fn stripes_of(&self, event: &PluginEvent) -> Vec<usize> {
        let mut stripes: Vec<usize> = Self::touched(event).iter().map(|id| Self::stripe(event.team_id, id)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
    }

    /// Holds the locks `stripes` ([`DistinctIdLocks::stripes_of`]) while `work` runs.
    pub async fn run<T>(&self, stripes: Vec<usize>, work: impl std::future::Future<Output = T>) -> T {
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.stripes[stripe].lock().await);
        }
        work.await
    }
}

/// Events in, plugins and ingestion out.
pub struct Pipeline {
    pub distinct_ids: DistinctIdLocks,
    pub plugins: Arc<Plugins>,
    pub processor: Arc<EventsProcessor>,
    pub jobs: Arc<JobQueueManager>,
    pub activity: Arc<ActivityTracker>,
}

impl Pipeline {
    /// processEvent, then ingestion beside onEvent/onSnapshot, each step timed and counted.
    async fn run_event(&self, event: PluginEvent) -> Result<(), HandleError> {
        let is_snapshot = event.event == "$snapshot";
        let event = if is_snapshot {
            event
        } else {
            self.activity.record("processEvent");
            catalog::received(Stage::Plugins, "processEvent", 1);
            let started = Instant::now();
            // Boxed, as ingestion below: the event's future holds a pointer instead of the whole
            // plugin call's state (see there).
            let processed = Box::pin(self.plugins.run_process_event(event)).await;
            catalog::event_step(EventStep::ProcessEvent, started.elapsed());
            match processed {
                Ok(Some(event)) => {
                    catalog::handled(Stage::Plugins, "processEvent", 1);
                    event
                }
                // A plugin dropped it: done.
                Ok(None) => {
                    catalog::dropped(Stage::Plugins, "plugin_dropped", 1);
                    return Ok(());
                }
                // A plugin could not run (not its error): the event must not be written without
                // it, so it goes back to the consumer's retries, then to the dead-letter queue.
                Err(unavailable) => {
                    catalog::dropped(Stage::Plugins, "plugin_unavailable", 1);
                    return Err(HandleError::Retryable(unavailable.into()));
                }
            }
        };
        self.activity.record("ingestEvent");
        // Ingestion takes its own copy only when a plugin may see the event after it (a config
        // with `onEvent`/`onSnapshot` or `exportEvents`, or one not loaded yet).
        let (to_ingest, event) = if self.plugins.team_takes_events_after_ingestion(event.team_id, is_snapshot) {
            (event.clone(), Some(event))
        } else {
            (event, None)
        };
        let event_name = to_ingest.event.clone();
        // The plugin calls after ingestion are boxed too (only teams with plugins make them).
        let after_ingestion = async {
            let Some(event) = &event else { return };
            let started = Instant::now();
            if is_snapshot {
                self.activity.record("onSnapshot");
                Box::pin(self.plugins.run_on_snapshot(event)).await;
                catalog::event_step(EventStep::OnSnapshot, started.elapsed());
            } else {
                self.activity.record("onEvent");
                Box::pin(self.plugins.run_on_event(event)).await;
                catalog::event_step(EventStep::OnEvent, started.elapsed());
            }
        };
        let ingestion = async {
            catalog::received(Stage::Ingestion, "event", 1);
            let started = Instant::now();
            let locked = self.distinct_ids.stripes_of(&to_ingest);
            // Boxed: an `async fn` keeps its argument and the future it awaits side by side, so
            // unboxed the ingestion state sat in every event's future twice. heaptrack showed
            // 21 KB per event in flight (400 of them with 2 workers), 6 KB boxed.
            let ingested = self.distinct_ids.run(locked, Box::pin(self.processor.ingest_event(to_ingest))).await;
            catalog::event_step(EventStep::Ingestion, started.elapsed());
            match &ingested {
                Ok(_) => catalog::handled(Stage::Ingestion, "event", 1),
                Err(error) if error.is_transient() => catalog::dropped(Stage::Ingestion, "transient_failure", 1),
                Err(_) => catalog::dropped(Stage::Ingestion, "failed", 1),
            }
            ingested
        };
        let (ingested, ()) = tokio::join!(ingestion, after_ingestion);
        match ingested {
            Ok(_) => Ok(()),
            // The writer produced the dead-letter record (with the event as ingestion left it, as
            // the reference does): the consumer must not dead-letter it a second time.
            Err(IngestError::DeadLettered(reason)) => {
                warn!("🔔 Event {event_name} went to the dead-letter queue: {reason}");
                Ok(())
            }
            Err(error) => Err(classify(error)),
        }
    }
}

/// A plugin job message that is not a job.
#[derive(Debug, thiserror::Error)]
#[error("invalid plugin job: {0}")]
struct InvalidPluginJob(#[source] serde_json::Error);

/// Transient failures are retried by the consumer; the rest go to the dead-letter queue.
fn classify(error: IngestError) -> HandleError {
    if error.is_transient() {
        HandleError::Retryable(error.into())
    } else {
        HandleError::Rejected(error.into())
    }
}

#[async_trait]
impl EventHandler for Pipeline {
    async fn handle_event(&self, event: PluginEvent) -> Result<(), HandleError> {
        let started = Instant::now();
        let result = self.run_event(event).await;
        // As the reference: not for an event whose handling threw.
        if result.is_ok() {
            catalog::each_event(started.elapsed());
        }
        result
    }

    async fn handle_plugin_job(&self, job: Value) -> Result<(), HandleError> {
        let job: EnqueuedJob =
            serde_json::from_value(job).map_err(|error| HandleError::Rejected(InvalidPluginJob(error).into()))?;
        self.jobs.enqueue(job).await.map_err(|error| HandleError::Retryable(error.into()))
    }
}

/// Internal metrics are events of the server's own, ingested like any other.
#[async_trait]
impl crate::metrics::internal::EventIngester for Pipeline {
    async fn ingest_event(&self, event: PluginEvent) -> Result<(), BoxError> {
        self.handle_event(event).await.map_err(|error| Box::new(error) as BoxError)
    }
}

/// Scheduled tasks, jobs and reloads, answered by the plugins and the action cache.
pub struct PluginTasks {
    pub plugins: Arc<Plugins>,
    pub actions: Arc<ActionManager>,
}

#[async_trait]
impl ScheduledTaskRunner for PluginTasks {
    async fn plugin_schedule(&self) -> Option<PluginSchedule> {
        let started = Instant::now();
        let schedule = self.plugins.schedule();
        catalog::task("getPluginSchedule", started.elapsed());
        schedule
    }

    async fn run_scheduled_task(&self, task: ScheduledTask, plugin_config_id: i32) -> Result<(), BoxError> {
        // Failures are recorded on the config by the plugins themselves.
        self.plugins.run_scheduled(task, plugin_config_id).await;
        Ok(())
    }
}

#[async_trait]
impl JobRunner for PluginTasks {
    async fn run_job(&self, job: EnqueuedJob) -> Result<(), BoxError> {
        self.plugins.run_job(job).await;
        Ok(())
    }
}

/// `$$plugin_metrics` events, captured as the plugin configs they describe.
#[async_trait]
impl crate::metrics::plugin_metrics::PluginMetricsSender for PluginTasks {
    async fn send_plugin_metrics(&self) {
        let started = Instant::now();
        self.plugins.send_plugin_metrics().await;
        catalog::task("sendPluginMetrics", started.elapsed());
    }
}

#[async_trait]
impl ReloadHandler for PluginTasks {
    async fn reload_plugins(&self) -> Result<(), BoxError> {
        let started = Instant::now();
        let reloaded = self.plugins.reload().await;
        catalog::task("reloadPlugins", started.elapsed());
        reloaded.map_err(|error| {
            warn!("🔴 Plugin reload failed: {error}");
            Box::new(error) as BoxError
        })?;
        self.plugins.spawn_schedule_reload();
        Ok(())
    }

    async fn reload_action(&self, team_id: i64, action_id: i64) -> Result<(), BoxError> {
        let started = Instant::now();
        let reloaded = self.actions.reload_action(team_id, action_id).await;
        catalog::task("reloadAction", started.elapsed());
        reloaded.map_err(|error| Box::new(error) as BoxError)
    }

    async fn drop_action(&self, team_id: i64, action_id: i64) -> Result<(), BoxError> {
        let started = Instant::now();
        self.actions.drop_action(team_id, action_id);
        catalog::task("dropAction", started.elapsed());
        Ok(())
    }
}

/// Bridges between rooms that do not know each other: each turns one room's handle into the
/// interface another room asks for.
pub mod bridges {
    use std::sync::Arc;

    use async_trait::async_trait;
    use serde_json::Value;

    use crate::geoip::GeoIp;
    use crate::jobs::job::EnqueuedJob;
    use crate::jobs::manager::JobQueueManager;
    use crate::plugins::extensions::{GeoIpLocator, JobEnqueuer, SinkError};
    use crate::plugins::vm_boundary::JsError;

    /// `meta.jobs` and export retries into the job queue manager.
    pub struct JobQueueEnqueuer(pub Arc<JobQueueManager>);

    #[async_trait]
    impl JobEnqueuer for JobQueueEnqueuer {
        async fn enqueue(&self, job: EnqueuedJob) -> Result<(), SinkError> {
            self.0.enqueue(job).await.map_err(|error| SinkError(error.into()))
        }
    }

    /// `meta.geoip.locate` over the shared MMDB reader.
    pub struct GeoIpLookup(pub Arc<GeoIp>);

    #[async_trait]
    impl GeoIpLocator for GeoIpLookup {
        async fn locate(&self, ip: &str) -> Result<Value, JsError> {
            match self.0.locate(ip) {
                Ok(found) => Ok(found.unwrap_or(Value::Null)),
                Err(error) => Err(JsError::new("Error", error.to_string())),
            }
        }
    }
}
