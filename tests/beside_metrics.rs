//! Observability: statsd datagrams (names, prefix, telegraf tags) on a local UDP socket, the
//! status report, internal metrics, and the staleness restart with its Sentry message.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::TestDb;
use plugin_server::event::PluginEvent;
use plugin_server::infra::BoxError;
use plugin_server::metrics::internal::{EventIngester, InternalMetrics, EVENTS_PROCESSED};
use plugin_server::metrics::staleness::{ActivityTracker, StalenessCheck};
use plugin_server::metrics::status_report::{run_status_report_every, PluginFunction, StatusReport, TelemetryClient};
use plugin_server::metrics::Metrics;
use sentry::SentryFutureExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct StatsdListener {
    socket: std::net::UdpSocket,
}

impl StatsdListener {
    fn new() -> StatsdListener {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        StatsdListener { socket }
    }

    fn port(&self) -> u16 {
        self.socket.local_addr().unwrap().port()
    }

    fn receive(&self, count: usize) -> Vec<String> {
        let mut buffer = [0u8; 2048];
        (0..count)
            .map(|_| {
                let (length, _) = self.socket.recv_from(&mut buffer).expect("a statsd datagram");
                String::from_utf8_lossy(&buffer[..length]).to_string()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_datagrams_carry_the_reference_names_prefix_and_telegraf_tags() {
    let listener = StatsdListener::new();
    let port = listener.port().to_string();
    let config = plugin_server::config::Config::from_pairs(&[
        ("NODE_ENV", "test"),
        ("STATSD_HOST", "127.0.0.1"),
        ("STATSD_PORT", &port),
        ("STATSD_PREFIX", "plugin-server."),
    ])
    .unwrap();
    let metrics = Metrics::from_config(&config).unwrap();
    assert!(metrics.is_enabled());

    metrics.increment("events_added_to_dead_letter_queue", &[]);
    metrics.count("action_matches_found", 3, &[]);
    metrics.timing("kafka_queue.single_save.standard", Duration::from_millis(12), &[("team_id", "2")]);
    metrics.gauge("piscina.utilization", 37.5, &[]);
    metrics.increment("illegal_distinct_ids.total", &[("distinctId", "a:b|c")]);
    let answer = metrics.instrument_query("query.postgres", Some("fetchTeam"), async { 42 }).await;
    assert_eq!(answer, 42);

    let datagrams = listener.receive(7);
    assert_eq!(datagrams[0], "plugin-server.events_added_to_dead_letter_queue:1|c");
    assert_eq!(datagrams[1], "plugin-server.action_matches_found:3|c");
    assert_eq!(datagrams[2], "plugin-server.kafka_queue.single_save.standard,team_id=2:12|ms");
    assert_eq!(datagrams[3], "plugin-server.piscina.utilization:37.5|g");
    assert_eq!(datagrams[4], "plugin-server.illegal_distinct_ids.total,distinctId=a_b_c:1|c");
    assert_eq!(datagrams[5], "plugin-server.query.postgres.total,queryTag=fetchTeam:1|c");
    assert!(datagrams[6].starts_with("plugin-server.query.postgres,queryTag=fetchTeam:"), "{}", datagrams[6]);
    assert!(datagrams[6].ends_with("|ms"));

    // No STATSD_HOST: nothing is sent and nothing fails.
    let disabled = Metrics::from_config(&plugin_server::config::Config::from_pairs(&[]).unwrap()).unwrap();
    assert!(!disabled.is_enabled());
    disabled.increment("x", &[]);
}

#[derive(Default)]
struct RecordingTelemetry {
    captured: Mutex<Vec<(String, Value)>>,
}

#[async_trait]
impl TelemetryClient for RecordingTelemetry {
    async fn capture(&self, event: &str, properties: Value) {
        self.captured.lock().unwrap().push((event.to_string(), properties));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_report_keeps_track_of_plugin_duration_per_team() {
    let report = Arc::new(StatusReport::new());
    let telemetry = Arc::new(RecordingTelemetry::default());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(run_status_report_every(
        report.clone(),
        telemetry.clone(),
        Duration::from_secs(3600),
        shutdown.clone(),
    ));
    report.add_to_time_spent_running_plugins(1, 1200.0, PluginFunction::ProcessEvent);
    report.add_to_time_spent_running_plugins(1, 800.0, PluginFunction::ProcessEvent);
    report.add_to_time_spent_running_plugins(2, 3000.0, PluginFunction::OnEvent);
    report.add_to_time_spent_running_plugins(2, 3000.0, PluginFunction::OnSnapshot);
    // Stopping sends the final report.
    shutdown.cancel();
    running.await.unwrap();

    let captured = telemetry.captured.lock().unwrap().clone();
    assert_eq!(captured.len(), 2);
    assert_eq!(captured[0].0, "$plugin_running_duration");
    assert_eq!(
        captured[0].1,
        json!({
            "onEvent_time_ms": 0, "onEvent_time_seconds": 0,
            "onSnapshot_time_ms": 0, "onSnapshot_time_seconds": 0,
            "pluginTask_time_ms": 0, "pluginTask_time_seconds": 0,
            "processEvent_time_ms": 2000, "processEvent_time_seconds": 2,
            "team": 1, "total_time_ms": 2000, "total_time_seconds": 2,
        })
    );
    assert_eq!(
        captured[1].1,
        json!({
            "onEvent_time_ms": 3000, "onEvent_time_seconds": 3,
            "onSnapshot_time_ms": 3000, "onSnapshot_time_seconds": 3,
            "pluginTask_time_ms": 0, "pluginTask_time_seconds": 0,
            "processEvent_time_ms": 0, "processEvent_time_seconds": 0,
            "team": 2, "total_time_ms": 6000, "total_time_seconds": 6,
        })
    );
    // Reset after sending.
    assert!(report.take_report().is_empty());
    report.add_to_time_spent_running_plugins(3, 1234.0, PluginFunction::PluginTask);
    assert_eq!(report.take_report()[0]["pluginTask_time_seconds"], json!(1.23));
}

#[derive(Default)]
struct RecordingIngester {
    events: Mutex<Vec<PluginEvent>>,
}

#[async_trait]
impl EventIngester for RecordingIngester {
    async fn ingest_event(&self, event: PluginEvent) -> Result<(), BoxError> {
        self.events.lock().unwrap().push(event);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_metrics_are_ingested_for_the_internal_metrics_team() {
    let db = TestDb::with_fixture(None).await;
    let metrics = InternalMetrics::new();
    let ingester = RecordingIngester::default();
    metrics.incr(EVENTS_PROCESSED);
    metrics.incr(EVENTS_PROCESSED);
    metrics.incr("$$other");

    // No internal-metrics organization: nothing is sent (and the answer is remembered, as in
    // the reference).
    assert_eq!(metrics.flush(&db.pool, &ingester).await.unwrap(), 0);
    assert!(ingester.events.lock().unwrap().is_empty());

    let db = TestDb::with_fixture(None).await;
    sqlx::query("UPDATE posthog_organization SET for_internal_metrics = true").execute(&db.pool).await.unwrap();
    let metrics = InternalMetrics::new();
    metrics.incr(EVENTS_PROCESSED);
    metrics.incr(EVENTS_PROCESSED);
    metrics.incr("$$other");
    assert_eq!(metrics.flush(&db.pool, &ingester).await.unwrap(), 2);
    let events = ingester.events.lock().unwrap().clone();
    let processed = events.iter().find(|event| event.event == EVENTS_PROCESSED).unwrap();
    assert_eq!(processed.properties, Some(json!({"value": 2}).as_object().unwrap().clone()));
    assert_eq!(processed.distinct_id, "plugin_server");
    assert_eq!(processed.team_id, common::TEAM_ID as i64);
    assert_eq!(processed.ip, None);
    assert_eq!(processed.site_url, "");
    assert!(processed.uuid.is_some());
    assert!(metrics.snapshot().is_empty());
}

/// Collects what would be sent to Sentry.
#[derive(Default)]
struct CapturingTransport {
    envelopes: Mutex<Vec<sentry::Envelope>>,
}

impl sentry::Transport for CapturingTransport {
    fn send_envelope(&self, envelope: sentry::Envelope) {
        self.envelopes.lock().unwrap().push(envelope);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_server_reports_to_sentry_and_asks_for_a_restart() {
    let transport = Arc::new(CapturingTransport::default());
    let factory = transport.clone();
    let options = sentry::ClientOptions {
        dsn: Some("https://public@sentry.example.com/1".parse().unwrap()),
        transport: Some(Arc::new(move |_: &sentry::ClientOptions| factory.clone() as Arc<dyn sentry::Transport>)),
        ..Default::default()
    };
    let hub = Arc::new(sentry::Hub::new(Some(Arc::new(sentry::Client::from(options))), Default::default()));

    let listener = StatsdListener::new();
    let metrics = Metrics::udp("127.0.0.1", listener.port(), "plugin-server.").unwrap();
    let tracker = Arc::new(ActivityTracker::new());
    let check = StalenessCheck {
        threshold: Duration::from_millis(500),
        instance_id: "instance-1".into(),
        metrics,
        pool_stats: Box::new(|| "{\"utilization\":0}".to_string()),
    };
    assert_eq!(check.message(), "Plugin Server has not ingested events for over 0.5 seconds! Rebooting.");
    let restart = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let started = std::time::Instant::now();
    let watched = restart.clone();
    let stopper = shutdown.clone();
    tokio::spawn(async move {
        watched.cancelled().await;
        stopper.cancel();
    });
    check.run(tracker.clone(), restart.clone(), shutdown.clone()).bind_hub(hub.clone()).await;
    assert!(restart.is_cancelled());
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(1600), "{elapsed:?}");

    let envelopes = transport.envelopes.lock().unwrap();
    let event = envelopes.iter().find_map(|envelope| envelope.event()).expect("a Sentry event");
    assert_eq!(
        event.message.as_deref(),
        Some("Plugin Server has not ingested events for over 0.5 seconds! Rebooting.")
    );
    assert_eq!(event.extra["instanceId"], json!("instance-1"));
    assert_eq!(event.extra["lastActivityType"], json!("serverStart"));
    assert!(event.extra["lastActivity"].as_str().unwrap().ends_with('Z'));
    assert_eq!(event.extra["piscina"], json!("{\"utilization\":0}"));
    assert_eq!(listener.receive(1), vec!["plugin-server.alerts.stale_plugin_server_restarted:1|c".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_activity_keeps_the_server_alive() {
    let tracker = Arc::new(ActivityTracker::new());
    let check = StalenessCheck {
        threshold: Duration::from_millis(400),
        instance_id: "instance-2".into(),
        metrics: Metrics::disabled(),
        pool_stats: Box::new(String::new),
    };
    let restart = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(check.run(tracker.clone(), restart.clone(), shutdown.clone()));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracker.record("processEvent");
    }
    assert!(!restart.is_cancelled());
    assert_eq!(tracker.last().1, "processEvent");
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_loop_lag_and_pool_gauges_are_reported() {
    let listener = StatsdListener::new();
    let metrics = Metrics::udp("127.0.0.1", listener.port(), "plugin-server.").unwrap();
    let shutdown = CancellationToken::new();
    let lag = tokio::spawn(plugin_server::metrics::run_event_loop_lag(metrics.clone(), shutdown.clone()));
    let lag_datagram = listener.receive(1).remove(0);
    assert!(
        lag_datagram.starts_with("plugin-server.event_loop_lag:") && lag_datagram.ends_with("|ms"),
        "{lag_datagram}"
    );
    shutdown.cancel();
    lag.await.unwrap();

    let shutdown = CancellationToken::new();
    let stats: plugin_server::metrics::PoolStats =
        Arc::new(|| vec![("utilization".to_string(), 50.0), ("queue_size".to_string(), 0.0)]);
    let gauges = tokio::spawn(plugin_server::metrics::run_pool_stats_every(
        metrics,
        stats,
        Duration::from_millis(500),
        shutdown.clone(),
    ));
    let datagrams = listener.receive(2);
    assert_eq!(datagrams, vec!["plugin-server.piscina.utilization:50|g", "plugin-server.piscina.queue_size:0|g"]);
    shutdown.cancel();
    gauges.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_calls_become_statsd_timings_error_counters_and_status_report_time() {
    use plugin_server::metrics::plugin_runs::PluginRunRecorder;
    use plugin_server::plugins::extensions::{PluginRun, RunObserver};

    let listener = StatsdListener::new();
    let metrics = Metrics::udp("127.0.0.1", listener.port(), "").unwrap();
    let report = Arc::new(StatusReport::new());
    let marker = metrics.clone();
    let recorder = PluginRunRecorder::new(metrics, report.clone());
    let run =
        |function: &'static str, millis: u64, failed: bool, task: Option<(&'static str, &'static str)>| PluginRun {
            team_id: 2,
            plugin_config_id: 39,
            plugin_name: "geoip",
            function,
            elapsed: Duration::from_millis(millis),
            failed,
            task,
        };
    recorder.plugin_ran(&run("processEvent", 12, false, None));
    recorder.plugin_ran(&run("processEvent", 8, true, None));
    recorder.plugin_ran(&run("onEvent", 5, true, None));
    recorder.plugin_ran(&run("onSnapshot", 3, false, None));
    recorder.plugin_ran(&run("exportEvents", 40, false, None));
    recorder.plugin_ran(&run("exportEvents", 41, true, None));
    recorder.plugin_ran(&run("pluginTask", 100, true, Some(("schedule", "runEveryMinute"))));
    recorder.plugin_ran(&run("pluginTask", 50, false, Some(("job", "retry"))));

    // Nothing for a successful task or a failed export (the retry path counts those): the next
    // datagram is the marker.
    marker.increment("marker", &[]);
    let datagrams = listener.receive(9);
    assert_eq!(
        datagrams,
        [
            "plugin.process_event,plugin=geoip,teamId=2:12|ms",
            "plugin.process_event,plugin=geoip,teamId=2:8|ms",
            "plugin.geoip.process_event.ERROR:1|c",
            "plugin.geoip.on_event:5|ms",
            "plugin.geoip.on_event.ERROR:1|c",
            "plugin.geoip.on_event:3|ms",
            "plugin.export_events.success,plugin=geoip,teamId=2:40|ms",
            "plugin.task.schedule.runEveryMinute.39.ERROR:1|c",
            "marker:1|c",
        ]
    );
    let reports = report.take_report();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["team"], 2);
    assert_eq!(reports[0]["processEvent_time_ms"], 20);
    assert_eq!(reports[0]["onEvent_time_ms"], 5);
    assert_eq!(reports[0]["onSnapshot_time_ms"], 3);
    assert_eq!(reports[0]["pluginTask_time_ms"], 150);
    assert_eq!(reports[0]["total_time_ms"], 178);
}
