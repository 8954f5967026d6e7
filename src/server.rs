//! The server's wiring: connects the hub, then starts every component in the reference's start-up
//! order (`startPluginsServer`) on the [`Lifecycle`], and the idle mode. How components run and
//! stop (budgets, signals, a component that dies) is `lifecycle`'s.
//! What each component does lives in its own module; this one only orders them.

use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;
use crate::health;
use crate::hub::{Hub, HubError};
use crate::infra::BoxError;
use crate::lifecycle::{Lifecycle, DEFAULT_SHUTDOWN_BUDGET};

/// Redis key announcing this server's job queue types, JSON-encoded as the reference writes it.
pub const ENABLED_JOB_QUEUES_KEY: &str = "@posthog-plugin-server/enabled-job-queues";

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("Redis error during start-up: {0}")]
    Redis(#[source] BoxError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A component could not start (`what`: which one, in the reference's words where it has them).
    #[error("{what}: {source}")]
    Start { what: &'static str, source: BoxError },
    #[error("component {0} stopped unexpectedly")]
    ComponentFailed(String),
    #[error("component {0} panicked: {1}")]
    ComponentPanicked(String, String),
}

/// The error of a component that could not start, keeping its cause.
fn start_error<E: Into<BoxError>>(what: &'static str) -> impl FnOnce(E) -> ServerError {
    move |error| ServerError::Start { what, source: error.into() }
}

/// Runs the server until `shutdown` is cancelled: connects, starts every component, waits, and
/// stops everything gracefully. Returns an error (exit code 1) when start-up fails or a component
/// dies.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    info!("{} workers, {} tasks per worker", config.worker_threads(), config.tasks_per_worker());
    // Sentry reports until this guard drops at the end of the run; statsd is process-wide.
    let _sentry = crate::metrics::sentry::init(&config);
    let metrics = crate::metrics::Metrics::from_config(&config)?;
    crate::metrics::install(metrics);
    if config.HTTP_SERVER_PORT != 0 {
        crate::metrics::prometheus::install().map_err(start_error("Prometheus exporter"))?;
    }
    let hub = Hub::connect(config).await?;
    let mut lifecycle = Lifecycle::new(shutdown);
    let result = match start_components(&hub, &mut lifecycle).await {
        Ok(()) => {
            info!("🚀 All systems go");
            lifecycle.liveness().set_ready(true);
            lifecycle.wait().await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        error!("💥 {error}");
    }
    lifecycle.liveness().set_ready(false);
    lifecycle.stop().await;
    hub.close().await;
    info!("👋 Over and out!");
    result
}

/// The start-up order of the reference's `startPluginsServer`, one component per service.
async fn start_components(hub: &Hub, lifecycle: &mut Lifecycle) -> Result<(), ServerError> {
    use std::sync::Arc;

    use crate::geoip::GeoIp;
    use crate::infra::pipelined_redis::PipelinedRedis;
    use crate::ingestion::actions::{ActionManager, ActionMatcher, ClickHouseStaticCohorts, HookCommander};
    use crate::ingestion::process_event::EventsProcessor;
    use crate::jobs::consumer::{run_job_queue_consumer, JobConsumerSettings};
    use crate::jobs::manager::{JobQueueManager, JobQueueOptions};
    use crate::jobs::queue::JobRunner;
    use crate::metrics::staleness::ActivityTracker;
    use crate::pipeline::bridges::{GeoIpLookup, JobQueueEnqueuer};
    use crate::pipeline::{Pipeline, PluginTasks};
    use crate::plugins::extensions::CaptureSink;
    use crate::plugins::extensions::PluginServices;
    use crate::plugins::log_entries::PluginLogSink;
    use crate::plugins::log_entries::PostgresLogSink;
    use crate::plugins::runtime::{PoolOptions, WorkerPool};
    use crate::plugins::Plugins;
    use crate::pubsub::PubSub;
    use crate::schedule::{ScheduleSettings, Scheduler};
    use crate::sinks::capture::{CeleryCapture, KafkaCapture, KafkaLogSink};
    use crate::sinks::kafka_writer::KafkaEventWriter;
    use crate::sinks::topics::KAFKA_EVENTS_PLUGIN_INGESTION;
    use crate::sinks::writer::{EventWriter, PostgresEventWriter};
    use crate::sinks::{CeleryProducer, KafkaProducerWrapper};
    use crate::sources::celery_dedupe::MarkingWriter;
    use crate::sources::{CeleryConsumer, CeleryConsumerOptions, KafkaConsumerOptions, KafkaQueue};

    let config = &hub.config;

    // The health ping goes first so that it is stopped (and deleted) last.
    let (redis, liveness) = (hub.redis.clone(), lifecycle.liveness());
    lifecycle.spawn("health ping", DEFAULT_SHUTDOWN_BUDGET, move |token| health::run_ping(redis, liveness, token));
    #[cfg(debug_assertions)]
    spawn_injected_fault(lifecycle);

    // 1. Managers: actions (loaded now, reloaded every 5 minutes), job queues (graphile migrations).
    let actions = Arc::new(ActionManager::new(hub.postgres.clone()));
    actions.prepare().await.map_err(start_error("Could not load actions"))?;
    {
        let actions = Arc::clone(&actions);
        lifecycle.spawn("actions reload", DEFAULT_SHUTDOWN_BUDGET, move |token| async move {
            actions.run_periodic_reload(Duration::from_secs(300), token).await
        });
    }
    let jobs = Arc::new(
        JobQueueManager::new(config, JobQueueOptions::from_config(config)).map_err(start_error("Job queues"))?,
    );
    jobs.connect_producer().await.map_err(start_error("No persistent job queue"))?;
    announce_job_queues(&hub.redis, &jobs.job_queue_types_as_string()).await?;

    // 2. GeoIP, unless disabled.
    let geoip = if config.DISABLE_MMDB {
        None
    } else {
        let geoip = GeoIp::start(hub).await.map_err(start_error("GeoIP"))?;
        let refresher = geoip.clone();
        lifecycle.spawn("geoip refresh", DEFAULT_SHUTDOWN_BUDGET, move |token| refresher.run_refresh(token));
        Some(Arc::new(geoip))
    };

    // Kafka pipeline: ClickHouse (read for static cohorts and the historical export), and one batching producer for events,
    // persons, log entries and plugin captures.
    let (kafka, clickhouse) = if config.KAFKA_ENABLED {
        let clickhouse = connect_clickhouse(config).await?;
        let client_id = crate::infra::kafka_settings::client_id(&hub.instance_id);
        let producer = KafkaProducerWrapper::connect(config, &client_id).map_err(start_error("Kafka producer"))?;
        (Some(producer), Some(clickhouse))
    } else {
        (None, None)
    };

    // 3. The plugin worker threads, and every enabled plugin config loaded on them (their
    // network reach first: ALLOW_INTERNAL_IPS, SITE_URL, the fetch limits).
    crate::plugins::runtime::configure_network(crate::plugins::runtime::NetworkSettings::from_config(config));
    let pool = Arc::new(WorkerPool::new(PoolOptions::from_config(config)).map_err(start_error("Worker pool"))?);
    let (logs, capture): (Arc<dyn PluginLogSink>, Arc<dyn CaptureSink>) = match &kafka {
        Some(producer) => (
            Arc::new(KafkaLogSink(Arc::clone(producer))),
            Arc::new(KafkaCapture {
                producer: Arc::clone(producer),
                topic: config.KAFKA_CONSUMPTION_TOPIC.clone().unwrap_or_else(|| KAFKA_EVENTS_PLUGIN_INGESTION.into()),
            }),
        ),
        None => (
            Arc::new(PostgresLogSink::for_config(hub.postgres.clone(), config)),
            Arc::new(CeleryCapture(Arc::new(CeleryProducer::new(
                hub.redis.clone(),
                config.PLUGINS_CELERY_QUEUE.clone(),
            )))),
        ),
    };
    let mut services = PluginServices::new(
        hub.clone(),
        logs,
        capture,
        Arc::new(JobQueueEnqueuer(Arc::clone(&jobs))),
        geoip.map(|geoip| Arc::new(GeoIpLookup(geoip)) as Arc<dyn crate::plugins::extensions::GeoIpLocator>),
    );
    // Plugin call timings go to statsd and to the hourly `$plugin_running_duration` report.
    let status_report = Arc::new(crate::metrics::status_report::StatusReport::new());
    services.observer = Arc::new(crate::metrics::plugin_runs::PluginRunRecorder::new(
        crate::metrics::global().clone(),
        Arc::clone(&status_report),
    ));
    if let Some(clickhouse) = &clickhouse {
        // The historical export reads ClickHouse's `events` in the Kafka pipeline.
        services.past_events = Arc::new(crate::plugins::past_events::ClickHousePastEvents(clickhouse.clone()));
    }
    let services = Arc::new(services);
    let plugins = Arc::new(Plugins::on_runtime(services, Arc::clone(&pool)));
    plugins.reload().await.map_err(start_error("Could not load plugins"))?;
    {
        let plugins = Arc::clone(&plugins);
        let pool = Arc::clone(&pool);
        // Stopped after the consumers (registered before them): tear the plugins down, then the threads.
        lifecycle.spawn("plugins", Duration::from_secs(10), move |token| async move {
            token.cancelled().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), plugins.teardown_all()).await;
            pool.shutdown(Duration::from_secs(2)).await;
        });
    }
    let tasks = Arc::new(PluginTasks { plugins: Arc::clone(&plugins), actions: Arc::clone(&actions) });

    // 4. The schedule (one server of the cluster runs it): loaded once the plugins are.
    let scheduler = Scheduler::new(tasks.clone(), ScheduleSettings::from_config(config));
    scheduler.reload().await.map_err(start_error("Plugin schedule"))?;
    {
        let scheduler = Arc::clone(&scheduler);
        let client = crate::hub::redis_client(config)?;
        lifecycle.spawn("schedule", Duration::from_secs(30), move |token| scheduler.run(client, token));
    }

    // 5. The job queue consumer (one server of the cluster consumes, under its own lock).
    {
        let (jobs, runner) = (Arc::clone(&jobs), tasks.clone() as Arc<dyn JobRunner>);
        let client = crate::hub::redis_client(config)?;
        let settings = JobConsumerSettings::from_config(config);
        lifecycle.spawn("job queue consumer", Duration::from_secs(30), move |token| async move {
            run_job_queue_consumer(Arc::clone(&jobs), runner, client, settings, token).await;
            jobs.disconnect_producer().await;
        });
    }

    // 6. The ingestion queues: Kafka when enabled (Celery then only carries plugin jobs), else Celery.
    let celery_options = CeleryConsumerOptions::from_config(config);
    let writer: Arc<dyn EventWriter> = match &kafka {
        Some(producer) => Arc::new(KafkaEventWriter::new(Arc::clone(producer))),
        // Events come from Celery: each written event is marked so a redelivery skips it.
        None => Arc::new(MarkingWriter::new(
            Arc::new(PostgresEventWriter::new(hub.postgres.clone())),
            hub.postgres.clone(),
            PipelinedRedis::new(crate::hub::redis_client(config)?, celery_options.response_timeout),
            &celery_options.queue,
            Duration::from_secs(config.PLUGINS_CELERY_DEDUPE_TTL_SECONDS),
            Arc::clone(&celery_options.redelivered),
        )),
    };
    let mut matcher = ActionMatcher::new(hub.postgres.clone(), Arc::clone(&actions));
    if let Some(clickhouse) = clickhouse {
        matcher = matcher.with_static_cohorts(Arc::new(ClickHouseStaticCohorts::new(clickhouse)));
    }
    let matcher = Arc::new(matcher);
    let hooks = Arc::new(HookCommander::new(hub.postgres.clone()));
    let processor = Arc::new(EventsProcessor::new(hub, writer).with_action_matching(matcher, hooks));
    {
        let pool = hub.postgres.clone();
        lifecycle.spawn("persons statistics", DEFAULT_SHUTDOWN_BUDGET, move |token| {
            crate::ingestion::person_manager::collect_missing_statistics(pool, token)
        });
    }
    let activity = Arc::new(ActivityTracker::new());
    let pipeline = Arc::new(Pipeline {
        distinct_ids: Default::default(),
        plugins: Arc::clone(&plugins),
        processor,
        jobs: Arc::clone(&jobs),
        activity: Arc::clone(&activity),
    });
    let pipeline_for_metrics = Arc::clone(&pipeline);
    let celery_queue = celery_options.queue.clone();
    let celery =
        CeleryConsumer::start(&crate::hub::redis_url(config), hub.redis.clone(), pipeline.clone(), celery_options)
            .await
            .map_err(start_error("Celery consumer"))?;
    let mut consumer_stats = vec![("celery", celery.stats())];
    lifecycle.spawn("celery consumer", Duration::from_secs(30), move |token| async move {
        celery.run_until(token).await;
    });
    if let Some(producer) = &kafka {
        let consumer = KafkaQueue::start(
            config,
            KafkaConsumerOptions::from_config(config, &hub.instance_id),
            pipeline,
            Arc::clone(producer),
        )
        .await
        .map_err(start_error("Kafka consumer"))?;
        consumer_stats.push(("kafka", consumer.stats()));
        let producer = Arc::clone(producer);
        lifecycle.spawn("kafka consumer", Duration::from_secs(30), move |token| async move {
            // Ends with the shutdown token, or on its own when the consumer fails (the lifecycle
            // then marks the component dead: the ping stops and the server exits 1).
            if let Err(error) = consumer.run_until(token).await {
                tracing::error!("💥 Kafka consumer stopped: {error}");
            }
            if let Err(error) = producer.flush().await {
                tracing::error!("🔴 Could not flush the Kafka producer: {error}");
            }
        });
    }

    // 8. Reloads over pub/sub.
    let pubsub = PubSub::new(
        crate::hub::redis_client(config)?,
        &config.PLUGINS_RELOAD_PUBSUB_CHANNEL,
        tasks.clone(),
        Some(scheduler),
    );
    lifecycle.spawn("pubsub", DEFAULT_SHUTDOWN_BUDGET, move |token| pubsub.run(token));

    // 10. Observability: statsd gauges, status reports, internal and plugin metrics, staleness.
    start_observability(hub, lifecycle, &pool, &tasks, activity, pipeline_for_metrics, status_report);

    // 11. The HTTP endpoints (/_health, /_ready, /metrics) unless HTTP_SERVER_PORT is 0.
    let gauges = crate::metrics::http::ServerGauges {
        pool,
        plugins,
        consumers: consumer_stats,
        celery_queue: Some((hub.redis.clone(), celery_queue)),
    };
    let http =
        crate::metrics::http::HttpServer::bind(config.HTTP_SERVER_PORT, lifecycle.liveness(), Some(Arc::new(gauges)))
            .await
            .map_err(start_error("HTTP server"))?;
    if let Some(http) = http {
        lifecycle.spawn("http server", DEFAULT_SHUTDOWN_BUDGET, move |token| http.serve(token));
    }
    Ok(())
}

/// Fault injection for the process-level lifecycle tests, compiled only into debug builds (the
/// test profile; release builds never read the variable): `PLUGIN_SERVER_TEST_FAULT=panic` or
/// `=exit` starts a component that panics, or returns, 500 ms after start.
#[cfg(debug_assertions)]
fn spawn_injected_fault(lifecycle: &mut Lifecycle) {
    let Ok(fault) = std::env::var("PLUGIN_SERVER_TEST_FAULT") else { return };
    tracing::warn!("🧪 Injecting fault {fault:?} (debug build)");
    lifecycle.spawn("injected fault", DEFAULT_SHUTDOWN_BUDGET, move |token| async move {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if fault == "panic" {
                    panic!("injected panic");
                }
            }
        }
    });
}

/// The Kafka pipeline's ClickHouse client, after the reference's start-up `SELECT 1`.
///
/// DELIBERATE DEVIATION: the reference does not start when ClickHouse does not answer. We log the
/// error and go on: only static-cohort matching and the historical export read ClickHouse, so
/// ingestion keeps flowing and those reads fail one by one (the step does not match, the export
/// chunk is retried) until ClickHouse answers. The check is
/// bounded by [`STARTUP_CHECK_TIMEOUT`] so an absent ClickHouse barely delays start-up. An unreadable
/// or invalid `CLICKHOUSE_CA` still stops start-up, as in the reference: that is a configuration error.
async fn connect_clickhouse(config: &Config) -> Result<crate::clickhouse::ClickHouse, ServerError> {
    use crate::clickhouse::{ClickHouse, STARTUP_CHECK_TIMEOUT};

    let clickhouse = ClickHouse::from_config(config).map_err(start_error("ClickHouse"))?;
    match clickhouse.check_connection(STARTUP_CHECK_TIMEOUT).await {
        Ok(()) => info!("✅ Connected to ClickHouse at {}", clickhouse.url()),
        Err(error) => error!(
            "🔴 ClickHouse at {} did not answer SELECT 1: {error}. Starting anyway; static cohorts in action \
             matching fail until it answers.",
            clickhouse.url()
        ),
    }
    Ok(clickhouse)
}

/// The periodic reporting components (the reference's cron jobs beside the stream).
fn start_observability(
    hub: &Hub,
    lifecycle: &mut Lifecycle,
    pool: &std::sync::Arc<crate::plugins::runtime::WorkerPool>,
    tasks: &std::sync::Arc<crate::pipeline::PluginTasks>,
    activity: std::sync::Arc<crate::metrics::staleness::ActivityTracker>,
    pipeline: std::sync::Arc<crate::pipeline::Pipeline>,
    report: std::sync::Arc<crate::metrics::status_report::StatusReport>,
) {
    use std::sync::Arc;

    use crate::metrics::internal::{run_internal_metrics, EventIngester, InternalMetrics};
    use crate::metrics::plugin_metrics::{run_plugin_metrics, PluginMetricsSender};
    use crate::metrics::staleness::StalenessCheck;
    use crate::metrics::status_report::{run_status_report, PostHogCloud, TelemetryClient};

    let config = &hub.config;
    let metrics = crate::metrics::global().clone();
    {
        let metrics = metrics.clone();
        lifecycle.spawn("event loop lag", DEFAULT_SHUTDOWN_BUDGET, move |token| {
            crate::metrics::run_event_loop_lag(metrics, token)
        });
    }
    let pool_stats = {
        let pool = Arc::clone(pool);
        move || {
            let stats = pool.stats();
            vec![
                ("threads".to_string(), stats.threads as f64),
                ("queue_size".to_string(), stats.in_flight as f64),
                ("stalled_threads".to_string(), stats.stalled_workers.len() as f64),
                ("replaced_threads".to_string(), stats.replaced_workers as f64),
            ]
        }
    };
    {
        let metrics = metrics.clone();
        let stats: crate::metrics::PoolStats = Arc::new(pool_stats.clone());
        lifecycle.spawn("pool stats", DEFAULT_SHUTDOWN_BUDGET, move |token| {
            crate::metrics::run_pool_stats(metrics, stats, token)
        });
    }
    {
        let telemetry: Arc<dyn TelemetryClient> =
            Arc::new(PostHogCloud::new(hub.config.node_env, hub.instance_id.to_string()));
        lifecycle
            .spawn("status report", DEFAULT_SHUTDOWN_BUDGET, move |token| run_status_report(report, telemetry, token));
    }
    if config.CAPTURE_INTERNAL_METRICS {
        let internal = Arc::new(InternalMetrics::new());
        let (postgres, ingester) = (hub.postgres.clone(), pipeline as Arc<dyn EventIngester>);
        lifecycle.spawn("internal metrics", DEFAULT_SHUTDOWN_BUDGET, move |token| {
            run_internal_metrics(internal, postgres, ingester, token)
        });
    }
    {
        let sender = Arc::clone(tasks) as Arc<dyn PluginMetricsSender>;
        lifecycle.spawn("plugin metrics", DEFAULT_SHUTDOWN_BUDGET, move |token| run_plugin_metrics(sender, token));
    }
    if config.STALENESS_RESTART_SECONDS > 0.0 {
        let check = StalenessCheck {
            threshold: Duration::from_secs_f64(config.STALENESS_RESTART_SECONDS),
            instance_id: hub.instance_id.to_string(),
            metrics,
            pool_stats: Box::new(move || serde_json::to_string(&pool_stats()).unwrap_or_default()),
        };
        let restart = lifecycle.shutdown_token();
        lifecycle.spawn("staleness", DEFAULT_SHUTDOWN_BUDGET, move |token| check.run(activity, restart, token));
    }
}

/// Writes the enabled job queue types, JSON-encoded (`"graphile"`), as the reference does (its
/// `redisSet`, timed as `query.redisSet`).
pub async fn announce_job_queues(redis: &deadpool_redis::Pool, types: &str) -> Result<(), ServerError> {
    let value = serde_json::Value::String(types.to_string()).to_string();
    let announce = async {
        let mut connection = redis.get().await.map_err(|error| ServerError::Redis(error.into()))?;
        redis::cmd("SET")
            .arg(ENABLED_JOB_QUEUES_KEY)
            .arg(value)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| ServerError::Redis(error.into()))
    };
    crate::metrics::catalog::instrument_query(crate::metrics::catalog::statsd::REDIS_SET, None, announce).await
}

/// `PLUGIN_SERVER_IDLE` / `--idle`: stays up doing nothing, saying so every 30 s, until a signal.
pub async fn run_idle(shutdown: CancellationToken) {
    info!("💤 Disengaging this plugin server instance due to the PLUGIN_SERVER_IDLE env var...");
    let mut interval = tokio::time::interval(Duration::from_secs(30));
    interval.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => info!("💤 Plugin server still disengaged with PLUGIN_SERVER_IDLE..."),
        }
    }
    info!("👋 Over and out!");
}
