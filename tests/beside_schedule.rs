//! The scheduler and its Redis lock (ports of the reference's tests/schedule.test.ts, plus
//! cluster behaviour: one run per period across servers, takeover when a holder dies).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use plugin_server::infra::redlock::Redlock;
use plugin_server::infra::BoxError;
use plugin_server::schedule::{PluginSchedule, ScheduleSettings, ScheduledTask, ScheduledTaskRunner, Scheduler};
use tokio_util::sync::CancellationToken;

fn redis_client() -> redis::Client {
    redis::Client::open(common::redis_url()).unwrap()
}

fn unique_resource(name: &str) -> String {
    common::unique_prefix(name)
}

/// A runner whose tasks take `delay`, optionally fail, and are recorded with their start time.
struct TestRunner {
    schedule: PluginSchedule,
    delay: Duration,
    /// Only this config is slow (all are when `None`).
    slow_config: Option<i32>,
    fail: bool,
    not_ready_answers: AtomicUsize,
    runs: Mutex<Vec<(ScheduledTask, i32, Instant)>>,
    finished: AtomicUsize,
}

impl TestRunner {
    fn new(delay: Duration, fail: bool) -> Arc<TestRunner> {
        Arc::new(TestRunner {
            schedule: PluginSchedule { run_every_minute: vec![39], run_every_hour: vec![], run_every_day: vec![] },
            delay,
            slow_config: None,
            fail,
            not_ready_answers: AtomicUsize::new(0),
            runs: Mutex::new(Vec::new()),
            finished: AtomicUsize::new(0),
        })
    }

    fn run_count(&self) -> usize {
        self.runs.lock().unwrap().len()
    }
}

#[async_trait]
impl ScheduledTaskRunner for TestRunner {
    async fn plugin_schedule(&self) -> Option<PluginSchedule> {
        if self.not_ready_answers.load(Ordering::SeqCst) > 0 {
            self.not_ready_answers.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(self.schedule.clone())
    }

    async fn run_scheduled_task(&self, task: ScheduledTask, plugin_config_id: i32) -> Result<(), BoxError> {
        self.runs.lock().unwrap().push((task, plugin_config_id, Instant::now()));
        if self.slow_config.is_none_or(|slow| slow == plugin_config_id) {
            tokio::time::sleep(self.delay).await;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err("lol".into());
        }
        Ok(())
    }
}

fn settings(resource: &str, ttl: Duration, minute: Duration) -> ScheduleSettings {
    ScheduleSettings {
        lock_resource: resource.to_string(),
        lock_ttl: ttl,
        periods: [
            (ScheduledTask::RunEveryMinute, minute),
            (ScheduledTask::RunEveryHour, Duration::from_secs(3600)),
            (ScheduledTask::RunEveryDay, Duration::from_secs(86_400)),
        ],
        load_interval: Duration::from_millis(20),
        load_attempts: 50,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_debounced_skips_a_config_whose_previous_run_is_in_flight() {
    let runner = TestRunner::new(Duration::from_millis(500), false);
    let scheduler = Scheduler::new(runner.clone(), settings("unused", Duration::from_secs(3), Duration::from_secs(60)));
    let schedule = scheduler.reload().await.unwrap();
    assert_eq!(schedule, PluginSchedule { run_every_minute: vec![39], run_every_hour: vec![], run_every_day: vec![] });

    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runner.finished.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runner.finished.load(Ordering::SeqCst), 1);
    scheduler.wait_for_tasks_to_finish().await;
    assert_eq!(runner.run_count(), 1);

    // Once the run settled, the next tick starts a new one.
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    scheduler.wait_for_tasks_to_finish().await;
    assert_eq!(runner.run_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_task_never_delays_the_others() {
    let runner = Arc::new(TestRunner {
        schedule: PluginSchedule { run_every_minute: vec![39, 40], run_every_hour: vec![41], run_every_day: vec![] },
        delay: Duration::from_secs(2),
        slow_config: Some(39),
        fail: false,
        not_ready_answers: AtomicUsize::new(0),
        runs: Mutex::new(Vec::new()),
        finished: AtomicUsize::new(0),
    });
    let scheduler = Scheduler::new(runner.clone(), settings("unused", Duration::from_secs(3), Duration::from_secs(60)));
    scheduler.reload().await.unwrap();
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    scheduler.run_debounced(ScheduledTask::RunEveryHour);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 40 and 41 finished while 39 is still running; the next tick re-runs 40 but not 39.
    assert_eq!(runner.finished.load(Ordering::SeqCst), 2);
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(runner.finished.load(Ordering::SeqCst), 3);
    let started: Vec<i32> = runner.runs.lock().unwrap().iter().map(|(_, config, _)| *config).collect();
    assert_eq!(started.iter().filter(|config| **config == 39).count(), 1);
    assert_eq!(started.iter().filter(|config| **config == 40).count(), 2);
    scheduler.wait_for_tasks_to_finish().await;
    assert_eq!(runner.finished.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_does_not_crash_anything() {
    let statsd = common::statsd::StatsdListener::start();
    statsd.install_global();
    let prometheus = plugin_server::metrics::prometheus::install().unwrap();
    let runner = TestRunner::new(Duration::ZERO, true);
    let scheduler = Scheduler::new(runner.clone(), settings("unused", Duration::from_secs(3), Duration::from_secs(60)));
    scheduler.reload().await.unwrap();
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    scheduler.wait_for_tasks_to_finish().await;
    scheduler.run_debounced(ScheduledTask::RunEveryMinute);
    scheduler.wait_for_tasks_to_finish().await;
    assert_eq!(runner.run_count(), 2);
    // Each run is timed as the reference's worker task, and the failures are counted.
    statsd.wait_for_line("piscina_task.runEveryMinute:", Duration::from_secs(3));
    statsd.wait_for_line("events_dropped,stage=schedule,reason=failed:", Duration::from_secs(3));
    statsd.settle();
    assert_eq!(statsd.total("events_dropped,stage=schedule,reason=failed"), 2, "{:?}", statsd.lines());
    let scraped = prometheus.render();
    assert!(
        scraped.contains(r#"plugin_server_schedule_runs_total{task="runEveryMinute",plugin_config_id="39"} 2"#),
        "{scraped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_the_schedule_waits_until_plugins_are_loaded() {
    let runner = TestRunner::new(Duration::ZERO, false);
    runner.not_ready_answers.store(3, Ordering::SeqCst);
    let scheduler = Scheduler::new(runner.clone(), settings("unused", Duration::from_secs(3), Duration::from_secs(60)));
    let schedule = scheduler.reload().await.unwrap();
    assert_eq!(schedule.run_every_minute, vec![39]);
    assert_eq!(scheduler.schedule(), schedule);

    runner.not_ready_answers.store(1000, Ordering::SeqCst);
    let error = scheduler.reload().await.unwrap_err();
    assert_eq!(error.to_string(), "Could not load plugin schedule in time");
    // A failed reload keeps the schedule in use.
    assert_eq!(scheduler.schedule(), schedule);
}

/// Starts a scheduler whose lock changes are sent to `events` tagged with `index`.
fn start_scheduler(
    index: usize,
    runner: Arc<TestRunner>,
    settings: ScheduleSettings,
    events: tokio::sync::mpsc::UnboundedSender<(usize, bool)>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let scheduler = Scheduler::new(runner, settings);
    let shutdown = CancellationToken::new();
    let loading = Arc::clone(&scheduler);
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move {
        loading.reload().await.unwrap();
        scheduler
            .run_with_lock_observer(redis_client(), stop, move |held| {
                let _ = events.send((index, held));
            })
            .await
    });
    (shutdown, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_passes_from_one_scheduler_to_the_next() {
    let resource = unique_resource("schedule");
    let runner = TestRunner::new(Duration::ZERO, false);
    let ttl = Duration::from_secs(1);
    let (events_sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut schedulers = Vec::new();
    schedulers.push(start_scheduler(
        0,
        runner.clone(),
        settings(&resource, ttl, Duration::from_secs(60)),
        events_sender.clone(),
    ));
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(first, (0, true));
    for index in 1..3 {
        schedulers.push(start_scheduler(
            index,
            runner.clone(),
            settings(&resource, ttl, Duration::from_secs(60)),
            events_sender.clone(),
        ));
    }
    // Nobody else gets the lock while the first holds it (it renews every ttl/2).
    let unexpected = tokio::time::timeout(Duration::from_millis(1500), events.recv()).await;
    assert!(unexpected.is_err(), "unexpected lock event {unexpected:?}");

    let mut holder = 0;
    let mut remaining: Vec<usize> = vec![1, 2];
    while !remaining.is_empty() {
        let (shutdown, handle) = &mut schedulers[holder];
        shutdown.cancel();
        handle.await.unwrap();
        let stopped = Instant::now();
        // The stopped holder reports the loss and exactly one other acquires it (either order).
        let mut pair = Vec::new();
        for _ in 0..2 {
            pair.push(tokio::time::timeout(Duration::from_secs(3), events.recv()).await.unwrap().unwrap());
        }
        assert!(pair.contains(&(holder, false)), "{pair:?}");
        let (next, _) = *pair.iter().find(|(index, held)| *held && remaining.contains(index)).expect("a new holder");
        // A released lock is taken within the retry period (ttl/10), well within a TTL.
        assert!(stopped.elapsed() < ttl, "takeover took {:?}", stopped.elapsed());
        remaining.retain(|index| *index != next);
        holder = next;
    }
    schedulers[holder].0.cancel();
    (&mut schedulers[holder].1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_redis_run_each_task_once_per_period() {
    let resource = unique_resource("schedule");
    let runner = TestRunner::new(Duration::from_millis(50), false);
    let (events_sender, _events) = tokio::sync::mpsc::unbounded_channel();
    let period = Duration::from_secs(1);
    let a =
        start_scheduler(0, runner.clone(), settings(&resource, Duration::from_secs(2), period), events_sender.clone());
    let b = start_scheduler(1, runner.clone(), settings(&resource, Duration::from_secs(2), period), events_sender);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(4300)).await;
    let elapsed = started.elapsed();
    for (shutdown, handle) in [a, b] {
        shutdown.cancel();
        handle.await.unwrap();
    }
    let runs = runner.runs.lock().unwrap().clone();
    // One run per boundary: 4 boundaries pass in 4.3 s (the first may fall before the lock is won).
    assert!((3..=5).contains(&runs.len()), "{} runs in {elapsed:?}", runs.len());
    for pair in runs.windows(2) {
        let gap = pair[1].2 - pair[0].2;
        assert!(gap > Duration::from_millis(800), "two runs {gap:?} apart");
    }
    assert!(runs.iter().all(|(task, config, _)| *task == ScheduledTask::RunEveryMinute && *config == 39));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_moves_when_its_holder_stops_renewing() {
    let resource = unique_resource("lock");
    let ttl = Duration::from_millis(1000);
    let (mut first, first_task) = Redlock::new(resource.clone(), ttl).spawn(redis_client(), CancellationToken::new());
    assert!(tokio::time::timeout(Duration::from_secs(3), first.wait_until_held()).await.unwrap());
    // The holder dies without releasing (no graceful stop): its key stays until it expires.
    first_task.abort();
    let died = Instant::now();
    let shutdown = CancellationToken::new();
    let (mut second, second_task) = Redlock::new(resource.clone(), ttl).spawn(redis_client(), shutdown.clone());
    assert!(tokio::time::timeout(Duration::from_secs(3), second.wait_until_held()).await.unwrap());
    let takeover = died.elapsed();
    assert!(takeover <= ttl + Duration::from_millis(150), "takeover after {takeover:?}");
    shutdown.cancel();
    second_task.await.unwrap();
    assert!(!second.held());
    // Released on graceful stop: the key is gone.
    let mut connection = redis_client().get_multiplexed_async_connection().await.unwrap();
    let exists: bool = redis::cmd("EXISTS").arg(&resource).query_async(&mut connection).await.unwrap();
    assert!(!exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_over_by_someone_else_is_reported_lost() {
    let resource = unique_resource("lock");
    let ttl = Duration::from_millis(600);
    let shutdown = CancellationToken::new();
    let (mut lock, task) = Redlock::new(resource.clone(), ttl).spawn(redis_client(), shutdown.clone());
    assert!(tokio::time::timeout(Duration::from_secs(3), lock.wait_until_held()).await.unwrap());
    // Someone overwrites the key (e.g. after a Redis failover): the next extension fails and the
    // holder must stop acting on the lock at once (REF-BUG 14).
    let mut connection = redis_client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&resource)
        .arg("someone-else")
        .arg("PX")
        .arg(5000)
        .query_async(&mut connection)
        .await
        .unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(2), lock.changed()).await.unwrap();
    assert_eq!(lost, Some(false));
    shutdown.cancel();
    task.await.unwrap();
    let value: String = redis::cmd("GET").arg(&resource).query_async(&mut connection).await.unwrap();
    assert_eq!(value, "someone-else", "stopping must not release someone else's lock");
    let _: () = redis::cmd("DEL").arg(&resource).query_async(&mut connection).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_never_grants_the_lock_and_stops_cleanly() {
    let unreachable = redis::Client::open("redis://127.0.0.1:1").unwrap();
    let shutdown = CancellationToken::new();
    let (mut lock, task) =
        Redlock::new(unique_resource("lock"), Duration::from_millis(400)).spawn(unreachable, shutdown.clone());
    // It keeps retrying (REF-BUG 14: the reference gave up after the first non-lock error).
    assert!(tokio::time::timeout(Duration::from_millis(1200), lock.wait_until_held()).await.is_err());
    assert!(!task.is_finished());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await.unwrap().unwrap();
}
