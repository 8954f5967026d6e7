//! Pub/sub reloads: the three channels reach the handler, the schedule reloads after plugins,
//! malformed messages are skipped, and the subscriber survives them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use plugin_server::infra::BoxError;
use plugin_server::pubsub::{PubSub, ReloadHandler, DROP_ACTION_CHANNEL, RELOAD_ACTION_CHANNEL};
use plugin_server::schedule::{PluginSchedule, ScheduleSettings, ScheduledTask, ScheduledTaskRunner, Scheduler};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    schedule_loads: Mutex<usize>,
}

#[async_trait]
impl ReloadHandler for Recorder {
    async fn reload_plugins(&self) -> Result<(), BoxError> {
        self.calls.lock().unwrap().push("reload_plugins".into());
        Ok(())
    }
    async fn reload_action(&self, team_id: i64, action_id: i64) -> Result<(), BoxError> {
        self.calls.lock().unwrap().push(format!("reload_action {team_id} {action_id}"));
        Ok(())
    }
    async fn drop_action(&self, team_id: i64, action_id: i64) -> Result<(), BoxError> {
        self.calls.lock().unwrap().push(format!("drop_action {team_id} {action_id}"));
        Err("handlers may fail".into())
    }
}

#[async_trait]
impl ScheduledTaskRunner for Recorder {
    async fn plugin_schedule(&self) -> Option<PluginSchedule> {
        *self.schedule_loads.lock().unwrap() += 1;
        self.calls.lock().unwrap().push("schedule".into());
        Some(PluginSchedule::default())
    }
    async fn run_scheduled_task(&self, _: ScheduledTask, _: i32) -> Result<(), BoxError> {
        Ok(())
    }
}

async fn publish(channel: &str, message: &str) {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg(channel).arg(message).query_async(&mut connection).await.unwrap();
}

async fn wait_for(recorder: &Recorder, predicate: impl Fn(&[String]) -> bool) {
    for _ in 0..100 {
        if predicate(&recorder.calls.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("calls never matched: {:?}", recorder.calls.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_messages_reach_the_handler() {
    let recorder = Arc::new(Recorder::default());
    let reload_channel = common::unique_prefix("reload-plugins");
    let settings = ScheduleSettings::from_config(&plugin_server::config::Config::from_pairs(&[]).unwrap());
    let scheduler = Scheduler::new(recorder.clone(), settings);
    let client = redis::Client::open(common::redis_url()).unwrap();
    let pubsub = PubSub::new(client, &reload_channel, recorder.clone(), Some(scheduler));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(pubsub.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    publish(&reload_channel, "anything").await;
    wait_for(&recorder, |calls| calls.contains(&"schedule".to_string())).await;
    assert_eq!(recorder.calls.lock().unwrap().clone(), vec!["reload_plugins".to_string(), "schedule".to_string()]);

    publish(RELOAD_ACTION_CHANNEL, "not json").await;
    publish(RELOAD_ACTION_CHANNEL, r#"{"teamId": 2, "actionId": 69}"#).await;
    publish(DROP_ACTION_CHANNEL, r#"{"teamId": 2, "actionId": 70}"#).await;
    publish(&reload_channel, "").await;
    wait_for(&recorder, |calls| calls.iter().filter(|call| *call == "schedule").count() == 2).await;
    let calls = recorder.calls.lock().unwrap().clone();
    assert!(calls.contains(&"reload_action 2 69".to_string()), "{calls:?}");
    assert!(calls.contains(&"drop_action 2 70".to_string()), "{calls:?}");
    assert_eq!(*recorder.schedule_loads.lock().unwrap(), 2);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap();
}
