//! Kafka consumer faults against the real broker (Tansu on loopback, started by scripts/kafka):
//! a message whose handling kills the process is dead-lettered after `KAFKA_MAX_DELIVERY_ATTEMPTS`
//! crashes (real processes: this test binary runs itself as the consumer, which aborts), and a
//! clean rebalance between two consumers of one group hands partitions over without duplicates.

mod queues_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugin_server::sinks::KafkaProducerWrapper;
use plugin_server::sources::retry::RetryPolicy;
use plugin_server::sources::{EventHandler, HandleError, KafkaConsumerOptions, KafkaQueue};
use queues_support::*;
use serde_json::{json, Value};

fn raw_event(distinct_id: &str) -> Vec<u8> {
    let data =
        json!({"event": "e", "properties": {}, "distinct_id": distinct_id, "timestamp": "2021-10-28T11:59:57.792Z"});
    json!({"distinct_id": distinct_id, "ip": "127.0.0.1", "site_url": "", "team_id": 2, "uuid": uuid::Uuid::new_v4().to_string(),
        "data": data.to_string(), "now": "2021-10-28T12:00:00Z", "sent_at": "2021-10-28T11:59:59Z"})
    .to_string()
    .into_bytes()
}

fn options(config: &plugin_server::config::Config, group: &str, concurrency: usize) -> KafkaConsumerOptions {
    KafkaConsumerOptions {
        group_id: group.to_string(),
        concurrency,
        offset_reset: "earliest".into(),
        session_timeout: Duration::from_secs(6),
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        max_delivery_attempts: 3,
        ..KafkaConsumerOptions::from_config(config, &uuid::Uuid::new_v4())
    }
}

/// Handles events like the pipeline would, except the poison one, which kills the process.
struct PoisonHandler {
    poison: String,
}

#[async_trait::async_trait]
impl EventHandler for PoisonHandler {
    async fn handle_event(&self, event: plugin_server::event::PluginEvent) -> Result<(), HandleError> {
        if event.distinct_id == self.poison {
            println!("ABORTING on {}", event.distinct_id);
            std::process::abort();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        println!("HANDLED {}", event.distinct_id);
        Ok(())
    }
    async fn handle_plugin_job(&self, _job: Value) -> Result<(), HandleError> {
        Ok(())
    }
}

/// The consumer process of `a_message_that_crashes_the_process_is_dead_lettered_after_three_crashes`
/// (does nothing unless that test runs it): consumes until it dead-lettered something, or for 45 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_child_process() {
    let (Ok(topic), Ok(group), Ok(poison)) =
        (std::env::var("POISON_TOPIC"), std::env::var("POISON_GROUP"), std::env::var("POISON_DISTINCT_ID"))
    else {
        return;
    };
    let config = test_config(&[("KAFKA_CONSUMPTION_TOPIC", &topic)]);
    let producer = KafkaProducerWrapper::connect(&config, "poison-child").unwrap();
    let queue = KafkaQueue::start(&config, options(&config, &group, 4), Arc::new(PoisonHandler { poison }), producer)
        .await
        .unwrap();
    println!("JOINED");
    let dead_lettered =
        eventually(Duration::from_secs(45), || async { queue.stats().snapshot().dead_lettered >= 1 }).await;
    if dead_lettered {
        // Let the rest of the topic through, then commit.
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("DEAD-LETTERED");
    }
    queue.stop().await;
}

/// A message whose handling kills the process (here `abort()`, as a panic=abort, the OOM killer or
/// a segfault would) is consumed again after every restart. Its handling is counted in Redis
/// before it starts: after 3 crashes, the 4th consumer dead-letters it instead of handling it,
/// and every other event of the topic is handled.
#[tokio::test]
async fn a_message_that_crashes_the_process_is_dead_lettered_after_three_crashes() {
    let topic = unique("poison");
    let group = unique("poison-group");
    create_topics(&[&topic, "events_dead_letter_queue"], 1).await;
    let dead_letters_start = topic_end("events_dead_letter_queue");
    let marker = unique("p");
    let poison = format!("{marker}-poison");
    let normal: Vec<String> = (0..5).map(|index| format!("{marker}-{index}")).collect();
    let mut values: Vec<Vec<u8>> = normal[..2].iter().map(|id| raw_event(id)).collect();
    values.push(raw_event(&poison));
    values.extend(normal[2..].iter().map(|id| raw_event(id)));
    produce(&topic, &values).await;

    let mut aborted_runs = 0;
    let mut handled: Vec<String> = Vec::new();
    let mut finished = false;
    for run in 0..6 {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "poison_child_process", "--nocapture", "--test-threads=1"])
            .env("POISON_TOPIC", &topic)
            .env("POISON_GROUP", &group)
            .env("POISON_DISTINCT_ID", &poison)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&child.stdout);
        handled.extend(stdout.lines().filter_map(|line| line.strip_prefix("HANDLED ")).map(str::to_string));
        let aborted = stdout.contains("ABORTING");
        eprintln!("run {run}: status {:?}, aborted {aborted}", child.status);
        if aborted {
            assert!(!child.status.success());
            aborted_runs += 1;
        } else {
            assert!(child.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&child.stderr));
            if stdout.contains("DEAD-LETTERED") {
                finished = true;
                break;
            }
        }
    }
    assert!(finished, "the crash loop never ended");
    assert_eq!(aborted_runs, 3, "handled (and crashed on) exactly KAFKA_MAX_DELIVERY_ATTEMPTS times");
    handled.sort();
    handled.dedup();
    assert_eq!(handled, normal, "every other event was handled");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let row = loop {
        let found = consume_topic_to_end("events_dead_letter_queue", dead_letters_start)
            .await
            .into_iter()
            .filter_map(|(_, value)| serde_json::from_slice::<Value>(&value?).ok())
            .find(|row| row["distinct_id"] == json!(poison));
        if let Some(row) = found {
            break row;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter for the poison event");
    };
    assert_eq!(row["error_location"], "plugin_server_kafka_consumer");
    assert!(row["error"].as_str().unwrap().contains("started 3 times without finishing"), "{row}");
    assert_eq!(row["team_id"], 2);
}

/// Records what a consumer handled; each event takes a while, so that some are in hand when a
/// rebalance comes.
#[derive(Default)]
struct SlowRecorder {
    handled: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl EventHandler for SlowRecorder {
    async fn handle_event(&self, event: plugin_server::event::PluginEvent) -> Result<(), HandleError> {
        tokio::time::sleep(Duration::from_millis(150)).await;
        self.handled.lock().unwrap().push(event.distinct_id);
        Ok(())
    }
    async fn handle_plugin_job(&self, _job: Value) -> Result<(), HandleError> {
        Ok(())
    }
}

/// Two consumers in one group on a topic of four partitions, events arriving all along: when the
/// second joins, the first's partitions are revoked while it has events in hand. The revoke
/// finishes them and commits before the partitions move, so no event is handled twice (the
/// consumer used to do nothing on a revoke: the new owner re-handled the whole window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_rebalance_hands_partitions_over_without_duplicates() {
    let topic = unique("rebalance");
    let group = unique("rebalance-group");
    create_topics(&[&topic], 4).await;
    let config = test_config(&[("KAFKA_CONSUMPTION_TOPIC", &topic)]);

    // Events keep coming while the consumers join and rebalance.
    let producing = Arc::new(AtomicBool::new(true));
    let produced = Arc::new(Mutex::new(Vec::<String>::new()));
    let producer_task = {
        let (producing, produced, topic) = (producing.clone(), produced.clone(), topic.clone());
        tokio::spawn(async move {
            let mut index = 0;
            while producing.load(Ordering::SeqCst) {
                let id = format!("r-{index}");
                produce(&topic, &[raw_event(&id)]).await;
                produced.lock().unwrap().push(id);
                index += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let first = Arc::new(SlowRecorder::default());
    let first_queue = KafkaQueue::start(
        &config,
        options(&config, &group, 4),
        first.clone(),
        KafkaProducerWrapper::connect(&config, "first").unwrap(),
    )
    .await
    .unwrap();
    assert!(eventually(Duration::from_secs(30), || async { first.handled.lock().unwrap().len() >= 10 }).await);
    let second = Arc::new(SlowRecorder::default());
    let second_queue = KafkaQueue::start(
        &config,
        options(&config, &group, 4),
        second.clone(),
        KafkaProducerWrapper::connect(&config, "second").unwrap(),
    )
    .await
    .unwrap();
    // Both consume for a while after the rebalance.
    assert!(
        eventually(Duration::from_secs(60), || async { second.handled.lock().unwrap().len() >= 10 }).await,
        "the second consumer got partitions"
    );
    let first_before = first.handled.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    producing.store(false, Ordering::SeqCst);
    producer_task.await.unwrap();
    let produced = produced.lock().unwrap().clone();
    let all_seen = || {
        let mut seen: Vec<String> =
            first.handled.lock().unwrap().iter().chain(second.handled.lock().unwrap().iter()).cloned().collect();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    assert!(
        eventually(Duration::from_secs(60), || async { all_seen() == produced.len() }).await,
        "saw {} of {}",
        all_seen(),
        produced.len()
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in first.handled.lock().unwrap().iter().chain(second.handled.lock().unwrap().iter()) {
        *counts.entry(id.clone()).or_default() += 1;
    }
    let duplicates: Vec<(&String, &usize)> = counts.iter().filter(|(_, count)| **count > 1).collect();
    eprintln!(
        "{} events; first handled {} ({} before the second joined), second {}",
        produced.len(),
        first.handled.lock().unwrap().len(),
        first_before,
        second.handled.lock().unwrap().len()
    );
    assert!(duplicates.is_empty(), "handled twice: {duplicates:?}");
    let (a, b) = (first_queue.stop(), second_queue.stop());
    tokio::join!(a, b);
}
