//! The reference's query timers (`instrumentQuery`: `<name>.total` counted before, `<name>` timed
//! after) around the statements a running server makes too rarely for the operations test to
//! see: person merges (`query.postgres_transation` and `updateDistinctIdPerson`), person updates
//! (`updatePerson`), element groups (`createElementGroup`'s transaction) and the job-queue
//! announce (`query.redisSet`). Read from real UDP datagrams (each test is a process of its own
//! under nextest, so the global client is the test's): removing a timer fails its test.

mod common;
mod ingest_support;

use common::statsd::StatsdListener;
use common::{TestDb, TEAM_ID};
use ingest_support::Harness;
use serde_json::json;

const TRANSACTIONS: &str = "query.postgres_transation.total";

fn listening() -> StatsdListener {
    let statsd = StatsdListener::start();
    statsd.install_global();
    statsd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_merge_is_a_timed_transaction_and_the_distinct_ids_move_is_timed() {
    let statsd = listening();
    let harness = Harness::new().await;
    let into = harness.create_person(TEAM_ID, &["person_0"], json!({})).await;
    let other = harness.create_person(TEAM_ID, &["person_1"], json!({})).await;
    statsd.settle();
    let before = statsd.total(TRANSACTIONS);
    assert_eq!(before, 2, "one transaction per person created: {:?}", statsd.lines());

    harness.processor.merge_people(&into, "person_0", &other, "person_1").await.unwrap();
    assert_eq!(harness.persons().await.len(), 1);

    statsd.settle();
    assert_eq!(statsd.total(TRANSACTIONS), before + 1, "{:?}", statsd.lines());
    assert!(statsd.has_key("query.postgres_transation"));
    assert_eq!(statsd.total("query.postgres.total,queryTag=updateDistinctIdPerson"), 1, "{:?}", statsd.lines());
    assert!(statsd.has_key("query.postgres,queryTag=updateDistinctIdPerson"), "{:?}", statsd.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_a_person_identified_is_a_timed_person_update() {
    let statsd = listening();
    let harness = Harness::new().await;
    // Both ids already one person's: `$identify` only marks it identified.
    harness.create_person(TEAM_ID, &["anonymous-1", "user-1"], json!({})).await;
    harness.identify("anonymous-1", "user-1").await;
    // A new id for a known person: added and marked identified in one transaction.
    harness.create_person(TEAM_ID, &["anonymous-2"], json!({})).await;
    harness.identify("anonymous-2", "user-2").await;
    assert!(harness.persons().await.iter().all(|person| person.is_identified));

    statsd.settle();
    assert_eq!(statsd.total("query.postgres.total,queryTag=updatePerson"), 2, "{:?}", statsd.lines());
    assert!(statsd.has_key("query.postgres,queryTag=updatePerson"), "{:?}", statsd.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_element_group_is_a_timed_transaction() {
    let statsd = listening();
    let harness = Harness::new().await;
    harness.capture("someone", "$pageview", json!({})).await;
    statsd.settle();
    let before = statsd.total(TRANSACTIONS);

    let elements = json!([{"tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn"}]);
    harness.capture("someone", "$autocapture", json!({"$elements": elements})).await;
    let groups: i64 =
        sqlx::query_scalar("SELECT count(*) FROM posthog_elementgroup").fetch_one(harness.pool()).await.unwrap();
    assert_eq!(groups, 1);

    statsd.settle();
    assert_eq!(statsd.total(TRANSACTIONS), before + 1, "{:?}", statsd.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_queue_announce_is_a_timed_redis_set() {
    let statsd = listening();
    let db = TestDb::empty().await;
    let redis = plugin_server::hub::connect_redis(&db.config(&[])).await.unwrap();
    plugin_server::server::announce_job_queues(&redis, "graphile").await.unwrap();

    statsd.settle();
    assert_eq!(statsd.total("query.redisSet.total"), 1, "{:?}", statsd.lines());
    assert!(statsd.has_key("query.redisSet"), "{:?}", statsd.lines());
    let mut connection = redis.get().await.unwrap();
    let announced: Option<String> =
        redis::AsyncCommands::get(&mut connection, plugin_server::server::ENABLED_JOB_QUEUES_KEY).await.unwrap();
    assert_eq!(announced.as_deref(), Some("\"graphile\""));
}
