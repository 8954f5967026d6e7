//! The beside-the-stream components wired the way the server starts them (each a Lifecycle
//! component with a cancellation token): they start, do their work, and stop within their
//! budgets, releasing their Redis locks.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::TestDb;
use plugin_server::config::NodeEnv;
use plugin_server::event::PluginEvent;
use plugin_server::geoip::GeoIp;
use plugin_server::hub::{redis_client, Hub};
use plugin_server::infra::BoxError;
use plugin_server::jobs::consumer::{run_job_queue_consumer, JobConsumerSettings};
use plugin_server::jobs::{EnqueuedJob, JobQueueManager, JobQueueOptions, JobRunner};
use plugin_server::lifecycle::Lifecycle;
use plugin_server::metrics::internal::{run_internal_metrics, EventIngester, InternalMetrics};
use plugin_server::metrics::plugin_metrics::{run_plugin_metrics, PluginMetricsSender};
use plugin_server::metrics::staleness::{ActivityTracker, StalenessCheck};
use plugin_server::metrics::status_report::{
    run_status_report, PluginFunction, PostHogCloud, StatusReport, TelemetryClient,
};
use plugin_server::pubsub::{PubSub, ReloadHandler};
use plugin_server::schedule::{PluginSchedule, ScheduleSettings, ScheduledTask, ScheduledTaskRunner, Scheduler};
use tokio_util::sync::CancellationToken;

/// Stands in for the plugin pool.
#[derive(Default)]
struct FakePool {
    jobs: AtomicUsize,
    reloads: AtomicUsize,
}

#[async_trait]
impl ScheduledTaskRunner for FakePool {
    async fn plugin_schedule(&self) -> Option<PluginSchedule> {
        Some(PluginSchedule { run_every_minute: vec![39], ..PluginSchedule::default() })
    }
    async fn run_scheduled_task(&self, _: ScheduledTask, _: i32) -> Result<(), BoxError> {
        Ok(())
    }
}

#[async_trait]
impl JobRunner for FakePool {
    async fn run_job(&self, _job: EnqueuedJob) -> Result<(), BoxError> {
        self.jobs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl ReloadHandler for FakePool {
    async fn reload_plugins(&self) -> Result<(), BoxError> {
        self.reloads.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn reload_action(&self, _: i64, _: i64) -> Result<(), BoxError> {
        Ok(())
    }
    async fn drop_action(&self, _: i64, _: i64) -> Result<(), BoxError> {
        Ok(())
    }
}

#[async_trait]
impl EventIngester for FakePool {
    async fn ingest_event(&self, _event: PluginEvent) -> Result<(), BoxError> {
        Ok(())
    }
}

#[async_trait]
impl PluginMetricsSender for FakePool {
    async fn send_plugin_metrics(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_start_work_and_stop_within_their_budgets() {
    let db = TestDb::with_fixture(None).await;
    let reload_channel = common::unique_prefix("reload-plugins");
    let config = db.config(&[
        ("JOB_QUEUES", "graphile"),
        ("SCHEDULE_LOCK_TTL", "2"),
        ("PLUGINS_RELOAD_PUBSUB_CHANNEL", &reload_channel),
    ]);
    let hub = Hub::connect(config).await.unwrap();
    let pool = Arc::new(FakePool::default());

    let geoip = GeoIp::start(&hub).await.unwrap();
    assert!(!geoip.is_available(), "DISABLE_MMDB defaults to true in tests");

    let jobs = Arc::new(JobQueueManager::new(&hub.config, JobQueueOptions::from_env()).unwrap());
    jobs.connect_producer().await.unwrap();

    let mut schedule_settings = ScheduleSettings::from_config(&hub.config);
    schedule_settings.lock_resource = common::unique_prefix("schedule-lock");
    let scheduler = Scheduler::new(pool.clone(), schedule_settings.clone());
    scheduler.reload().await.unwrap();

    let mut consumer_settings = JobConsumerSettings::from_config(&hub.config);
    consumer_settings.lock_resource = common::unique_prefix("job-queue-consumer-lock");

    let shutdown = CancellationToken::new();
    let mut lifecycle = Lifecycle::new(shutdown.clone());
    let budget = Duration::from_secs(5);
    {
        let client = redis_client(&hub.config).unwrap();
        let scheduler = Arc::clone(&scheduler);
        lifecycle.spawn("schedule", budget, move |token| scheduler.run(client, token));
    }
    {
        let client = redis_client(&hub.config).unwrap();
        let (jobs, runner) = (Arc::clone(&jobs), pool.clone() as Arc<dyn JobRunner>);
        lifecycle.spawn("job queue consumer", budget, move |token| {
            run_job_queue_consumer(jobs, runner, client, consumer_settings, token)
        });
    }
    {
        let client = redis_client(&hub.config).unwrap();
        let pubsub = PubSub::new(client, &reload_channel, pool.clone(), Some(Arc::clone(&scheduler)));
        lifecycle.spawn("pubsub", budget, move |token| pubsub.run(token));
    }
    {
        let geoip = geoip.clone();
        lifecycle.spawn("mmdb refresh", budget, move |token| geoip.run_refresh(token));
    }

    // The observability components (telemetry opted out under NODE_ENV=test).
    let metrics = plugin_server::metrics::Metrics::from_config(&hub.config).unwrap();
    {
        let metrics = metrics.clone();
        lifecycle
            .spawn("event loop lag", budget, move |token| plugin_server::metrics::run_event_loop_lag(metrics, token));
    }
    {
        let stats: plugin_server::metrics::PoolStats = Arc::new(Vec::new);
        let metrics = metrics.clone();
        lifecycle
            .spawn("pool stats", budget, move |token| plugin_server::metrics::run_pool_stats(metrics, stats, token));
    }
    let report = Arc::new(StatusReport::new());
    report.add_to_time_spent_running_plugins(2, 10.0, PluginFunction::OnEvent);
    {
        let telemetry: Arc<dyn TelemetryClient> =
            Arc::new(PostHogCloud::new(NodeEnv::Test, hub.instance_id.to_string()));
        let report = Arc::clone(&report);
        lifecycle.spawn("status report", budget, move |token| run_status_report(report, telemetry, token));
    }
    {
        let internal = Arc::new(InternalMetrics::new());
        let (postgres, ingester) = (hub.postgres.clone(), pool.clone() as Arc<dyn EventIngester>);
        lifecycle
            .spawn("internal metrics", budget, move |token| run_internal_metrics(internal, postgres, ingester, token));
    }
    {
        let sender = pool.clone() as Arc<dyn PluginMetricsSender>;
        lifecycle.spawn("plugin metrics", budget, move |token| run_plugin_metrics(sender, token));
    }
    {
        let tracker = Arc::new(ActivityTracker::new());
        let check = StalenessCheck {
            threshold: Duration::from_secs_f64(hub.config.STALENESS_RESTART_SECONDS),
            instance_id: hub.instance_id.to_string(),
            metrics: metrics.clone(),
            pool_stats: Box::new(String::new),
        };
        let restart = lifecycle.shutdown_token();
        lifecycle.spawn("staleness", budget, move |token| check.run(tracker, restart, token));
    }

    jobs.enqueue(EnqueuedJob {
        job_type: "logReply".into(),
        payload: serde_json::json!({"text": "runNow"}),
        timestamp: chrono::Utc::now().timestamp_millis(),
        plugin_config_id: common::PLUGIN_CONFIG_ID as i64,
        plugin_config_team: common::TEAM_ID as i64,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg(&reload_channel).arg("").query_async(&mut connection).await.unwrap();
    for _ in 0..100 {
        if pool.jobs.load(Ordering::SeqCst) == 1 && pool.reloads.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.jobs.load(Ordering::SeqCst), 1);
    assert_eq!(pool.reloads.load(Ordering::SeqCst), 1);
    let held: Option<String> =
        redis::cmd("GET").arg(&schedule_settings.lock_resource).query_async(&mut connection).await.unwrap();
    assert!(held.is_some(), "the only server holds the schedule lock");

    let stopping = std::time::Instant::now();
    lifecycle.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(3), "stopping took {:?}", stopping.elapsed());
    let held: Option<String> =
        redis::cmd("GET").arg(&schedule_settings.lock_resource).query_async(&mut connection).await.unwrap();
    assert_eq!(held, None, "the schedule lock is released on shutdown");
    // The final status report went out on stop and reset the counters.
    assert!(report.take_report().is_empty());
    jobs.disconnect_producer().await;
    hub.close().await;
}

/// A component that ends on its own before shutdown (a panic, or a return) is a failure: `wait`
/// reports it, and the health ping deletes its key at once and writes it no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_component_fails_the_server_and_stops_the_health_ping() {
    use plugin_server::health::{run_ping, PING_KEY};
    use plugin_server::server::ServerError;
    // Redis database 9, used by no other test: the ping key is global by design, and a server of
    // another test (beside_clickhouse uses 13) would write it while this test expects it gone.
    let url = format!("{}/9", common::redis_url());
    let pool =
        deadpool_redis::Config::from_url(url.as_str()).create_pool(Some(deadpool_redis::Runtime::Tokio1)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let ping_exists = |mut connection: redis::aio::MultiplexedConnection| async move {
        redis::cmd("EXISTS").arg(PING_KEY).query_async::<i64>(&mut connection).await.unwrap() == 1
    };
    for (fault, panics) in [("panic", true), ("return", false)] {
        let _: () = redis::cmd("DEL").arg(PING_KEY).query_async(&mut connection).await.unwrap();
        let mut lifecycle = Lifecycle::new(CancellationToken::new());
        {
            let (pool, liveness) = (pool.clone(), lifecycle.liveness());
            lifecycle.spawn("health ping", Duration::from_secs(5), move |token| run_ping(pool, liveness, token));
        }
        lifecycle.spawn("doomed", Duration::from_secs(5), move |_token| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if panics {
                panic!("boom");
            }
        });
        lifecycle.spawn("healthy", Duration::from_secs(5), |token| async move { token.cancelled().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(ping_exists(connection.clone()).await, "{fault}: the ping is written while all live");
        let error = tokio::time::timeout(Duration::from_secs(5), lifecycle.wait()).await.expect("noticed").unwrap_err();
        match (&error, panics) {
            (ServerError::ComponentPanicked(name, message), true) => {
                assert_eq!((name.as_str(), message.as_str()), ("doomed", "boom"))
            }
            (ServerError::ComponentFailed(name), false) => assert_eq!(name, "doomed"),
            _ => panic!("{fault}: unexpected {error:?}"),
        }
        assert!(!lifecycle.liveness().is_alive());
        // The key goes at once and stays gone while the server winds down.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while ping_exists(connection.clone()).await {
            assert!(std::time::Instant::now() < deadline, "{fault}: the ping key is still there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(5500)).await;
        assert!(!ping_exists(connection.clone()).await, "{fault}: the ping came back");
        lifecycle.stop().await;
    }
}
