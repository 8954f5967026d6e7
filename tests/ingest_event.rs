//! The `ingestEvent` task (tests/worker/ingestion/ingest-event.test.ts, tests/postgres/worker.test.ts
//! ingestEvent cases, the e2e action-match case) plus bad input, database failures and the
//! ClickHouse-pipeline calls of the `EventWriter` trait (observed through a recording writer).

mod common;
mod ingest_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use common::{TestDb, TEAM_ID};
use ingest_support::{fetch_events, plugin_event, processor_for, Harness};
use plugin_server::event::PluginEvent;
use plugin_server::ingestion::elements::Element;
use plugin_server::ingestion::persons::{Person, PersonDistinctId};
use plugin_server::ingestion::uuidt::new_uuidt;
use plugin_server::ingestion::{ActionHandler, EventsProcessor, IngestError, IngestOutcome};
use plugin_server::sinks::writer::{EventPayload, GroupPayload, SessionRecordingPayload, WriteError};
use plugin_server::sinks::{EventWriter, PostgresEventWriter};
use serde_json::{json, Value};

const TEAM: i64 = TEAM_ID as i64;

fn event(distinct_id: &str, data: Value) -> PluginEvent {
    let now = Utc::now();
    plugin_event(distinct_id, Some("127.0.0.1"), data, TEAM, now, Some(now), Some(new_uuidt().to_string()))
}

/// Matches action 69 (the fixture's "property foo is exactly bar") the way the real matcher would.
struct FooBarActions;

#[async_trait]
impl ActionHandler for FooBarActions {
    async fn match_and_fire(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        _elements: &[Element],
    ) -> Result<Vec<i32>, String> {
        assert!(person.is_some(), "the person is fetched for matching");
        let foo_value = event.properties.as_ref().and_then(|properties| properties.get("foo"));
        Ok(if foo_value == Some(&json!("bar")) { vec![69] } else { Vec::new() })
    }
}

#[tokio::test]
async fn action_matches_are_stored() {
    let db = TestDb::with_fixture(None).await;
    let processor = processor_for(&db.pool).with_actions(Arc::new(FooBarActions));
    let outcome =
        processor.ingest_event(event("abc", json!({"event": "xyz", "properties": {"foo": "bar"}}))).await.unwrap();
    let event_id = match outcome {
        IngestOutcome::Event { event_id: Some(event_id), matched_action_ids } => {
            assert_eq!(matched_action_ids, [69]);
            event_id
        }
        other => panic!("unexpected outcome {other:?}"),
    };
    processor.ingest_event(event("abc", json!({"event": "xyz", "properties": {"foo": "baz"}}))).await.unwrap();
    let matches: Vec<(i64, i32)> = sqlx::query_as("SELECT event_id::int8, action_id FROM posthog_action_events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(matches, [(event_id, 69)]);
}

struct FailingActions;

#[async_trait]
impl ActionHandler for FailingActions {
    async fn match_and_fire(&self, _: &PluginEvent, _: Option<&Person>, _: &[Element]) -> Result<Vec<i32>, String> {
        Err("step failed".into())
    }
}

#[tokio::test]
async fn action_matching_failure_fails_the_task() {
    let db = TestDb::with_fixture(None).await;
    let processor = processor_for(&db.pool).with_actions(Arc::new(FailingActions));
    let error = processor.ingest_event(event("abc", json!({"event": "xyz"}))).await.unwrap_err();
    assert_eq!(error.to_string(), "Action matching failed: step failed");
}

#[tokio::test]
async fn ingest_event_without_uuid_is_an_error_with_the_reference_message() {
    let db = TestDb::with_fixture(None).await;
    let processor = processor_for(&db.pool);
    let mut without_uuid = event("abc", json!({"event": "xyz"}));
    without_uuid.uuid = None;
    let error = processor.ingest_event(without_uuid).await.unwrap_err();
    assert_eq!(error.to_string(), "Not a valid UUID: \"undefined\"");
    let outcome = processor.ingest_event(event("abc", json!({"event": "xyz"}))).await.unwrap();
    assert!(matches!(outcome, IngestOutcome::Event { event_id: Some(_), .. }));
    let snapshot = event("abc", json!({"event": "$snapshot", "properties": {"$session_id": "s", "$snapshot_data": 1}}));
    assert_eq!(processor.ingest_event(snapshot).await.unwrap(), IngestOutcome::SessionRecording);
}

#[tokio::test]
async fn bad_input_gives_typed_errors_not_panics() {
    let harness = Harness::new().await;
    let processor = &harness.processor;

    let long_id = "x".repeat(500);
    let error = processor.ingest_event(event(&long_id, json!({"event": "e"}))).await.unwrap_err();
    assert!(matches!(error, IngestError::Database(_)), "{error}");
    assert!(error.to_string().contains("too long"), "{error}");

    let error = processor
        .ingest_event(event("a", json!({"event": "e", "properties": {"text": "nul \u{0} byte"}})))
        .await
        .unwrap_err();
    assert!(matches!(error, IngestError::Database(_)), "{error}");

    let error = processor
        .ingest_event(event("a", json!({"event": "e", "properties": {"$elements": "<a>"}})))
        .await
        .unwrap_err();
    assert!(matches!(error, IngestError::InvalidElements(_)), "{error}");

    let mut huge_team = event("a", json!({"event": "e"}));
    huge_team.team_id = i64::MAX;
    let error = processor.ingest_event(huge_team).await.unwrap_err();
    assert_eq!(error.to_string(), format!("No team found with ID {}. Can't ingest event.", i64::MAX));

    // Oddly typed values that the reference tolerates are tolerated here too.
    let odd = json!({"event": "e", "timestamp": "not a time", "offset": 5, "properties": {
        "$set": "not an object", "$set_once": 5, "$groups": ["a"], "$elements": [1, "x", null],
        "$anon_distinct_id": {"an": "object"}, "alias": 3
    }});
    processor.ingest_event(event("a", odd.clone())).await.unwrap();
    let identify = json!({"event": "$identify", "properties": {"$anon_distinct_id": {"an": "object"}}});
    processor.ingest_event(event("b", identify)).await.unwrap();
    let alias = json!({"event": "$create_alias", "properties": {"alias": 3}});
    processor.ingest_event(event("c", alias)).await.unwrap();
    let events = harness.events().await;
    assert_eq!(events.len(), 3);
    // An unparseable timestamp means "now".
    assert!((Utc::now() - events[0].timestamp).num_seconds().abs() < 60);
}

#[tokio::test]
async fn database_failure_is_an_error() {
    let db = TestDb::with_fixture(None).await;
    let processor = processor_for(&db.pool);
    db.pool.close().await;
    let error = processor.ingest_event(event("a", json!({"event": "e"}))).await.unwrap_err();
    assert!(matches!(error, IngestError::Database(_)), "{error}");
}

/// Records what the ClickHouse pipeline would be asked to emit, writing events to Postgres.
struct RecordingWriter {
    postgres: PostgresEventWriter,
    calls: Mutex<Vec<String>>,
}

impl RecordingWriter {
    fn new(pool: &sqlx::PgPool) -> Arc<RecordingWriter> {
        Arc::new(RecordingWriter { postgres: PostgresEventWriter::new(pool.clone()), calls: Mutex::new(Vec::new()) })
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

#[async_trait]
impl EventWriter for RecordingWriter {
    fn is_clickhouse_pipeline(&self) -> bool {
        true
    }
    async fn write_event(&self, event: &EventPayload) -> Result<Option<i64>, WriteError> {
        self.record(format!("event {}", event.event));
        self.postgres.write_event(event).await.map(|_| None)
    }
    async fn write_session_recording(&self, recording: &SessionRecordingPayload) -> Result<(), WriteError> {
        self.record(format!("recording {:?}", recording.session_id));
        Ok(())
    }
    async fn register_action_matches(&self, _event_id: i64, _action_ids: &[i32]) -> Result<(), WriteError> {
        self.record("action matches".into());
        Ok(())
    }
    async fn person_created(&self, person: &Person, distinct_ids: &[PersonDistinctId]) -> Result<(), WriteError> {
        let ids: Vec<&str> = distinct_ids.iter().map(|row| row.distinct_id.as_str()).collect();
        self.record(format!("person created {} {:?}", person.is_identified, ids));
        Ok(())
    }
    async fn person_updated(&self, person: &Person) -> Result<(), WriteError> {
        self.record(format!("person updated {} {}", person.is_identified, Value::Object(person.properties.clone())));
        Ok(())
    }
    async fn distinct_id_added(&self, _person: &Person, distinct_id: &PersonDistinctId) -> Result<(), WriteError> {
        self.record(format!("distinct id added {}", distinct_id.distinct_id));
        Ok(())
    }
    async fn people_merged(
        &self,
        merged: &Person,
        moved: &[PersonDistinctId],
        deleted: &Person,
    ) -> Result<(), WriteError> {
        let ids: Vec<&str> = moved.iter().map(|row| row.distinct_id.as_str()).collect();
        assert_ne!(merged.uuid, deleted.uuid);
        self.record(format!("merged {ids:?}"));
        Ok(())
    }
    async fn group_identified(&self, group: &GroupPayload) -> Result<(), WriteError> {
        self.record(format!(
            "group {} {} {}",
            group.group_type_index,
            group.group_key,
            Value::Object(group.group_properties.clone())
        ));
        Ok(())
    }
    async fn dead_letter(&self, event: &PluginEvent, error: &str) -> Result<bool, WriteError> {
        self.record(format!("dead letter {} {error}", event.event));
        Ok(true)
    }
}

#[tokio::test]
async fn clickhouse_pipeline_calls() {
    let db = TestDb::with_fixture(None).await;
    let writer = RecordingWriter::new(&db.pool);
    let processor = EventsProcessor::from_parts(db.pool.clone(), writer.clone(), 100, Duration::from_secs(30))
        .with_actions(Arc::new(FooBarActions));

    processor
        .ingest_event(event("anon", json!({"event": "$pageview", "properties": {"foo": "bar", "$set": {"a": 1}}})))
        .await
        .unwrap();
    assert_eq!(
        writer.take(),
        [r#"person created false ["anon"]"#, r#"person updated false {"a":1}"#, "event $pageview"],
        "no action matches are stored without an event id"
    );

    // Nothing changes, yet the ClickHouse pipeline re-emits the person (as the reference).
    processor
        .ingest_event(event("anon", json!({"event": "$pageview", "properties": {"$set": {"a": 1}}})))
        .await
        .unwrap();
    assert_eq!(writer.take(), [r#"person updated false {"a":1}"#, "event $pageview"]);

    processor
        .ingest_event(event("user", json!({"event": "$identify", "properties": {"$anon_distinct_id": "anon"}})))
        .await
        .unwrap();
    assert_eq!(writer.take(), ["distinct id added user", r#"person updated true {"a":1}"#, "event $identify"]);

    processor.ingest_event(event("other", json!({"event": "$pageview"}))).await.unwrap();
    writer.take();
    processor
        .ingest_event(event("other", json!({"event": "$create_alias", "properties": {"alias": "user"}})))
        .await
        .unwrap();
    assert_eq!(writer.take(), [r#"merged ["anon", "user"]"#, "event $create_alias"]);

    let group = json!({"event": "$groupidentify", "properties": {
        "$group_type": "organization", "$group_key": "org::5", "$group_set": {"foo": "bar"}, "$set": {"ignored": true}
    }});
    processor.ingest_event(event("other", group)).await.unwrap();
    assert_eq!(writer.take(), [r#"group 0 org::5 {"foo":"bar"}"#, "event $groupidentify"]);

    let snapshot = json!({"event": "$snapshot", "properties": {"$session_id": "abc", "$snapshot_data": {}}});
    processor.ingest_event(event("new-recorder", snapshot)).await.unwrap();
    assert_eq!(writer.take(), [r#"person created false ["new-recorder"]"#, r#"recording Some("abc")"#]);

    let error = processor
        .ingest_event(event("a", json!({"event": "broken", "properties": {"$elements": "x"}})))
        .await
        .unwrap_err();
    assert_eq!(writer.take(), [format!("dead letter broken {error}")]);

    let persons = fetch_events(&db.pool).await;
    assert_eq!(persons.len(), 6);
}

#[tokio::test]
async fn a_transient_failure_is_left_to_the_caller_to_retry_not_dead_lettered() {
    let db = TestDb::with_fixture(None).await;
    let writer = RecordingWriter::new(&db.pool);
    let processor = EventsProcessor::from_parts(db.pool.clone(), writer.clone(), 100, Duration::from_secs(30));
    // A permanent failure is dead-lettered by ingestion itself.
    let broken = json!({"event": "e", "properties": {"$elements": "x"}});
    let error = processor.ingest_event(event("a", broken)).await.unwrap_err();
    assert!(!error.is_transient());
    assert_eq!(writer.take(), [format!("dead letter e {error}")]);
    // The database going away is worth a retry: no record of a failure that may yet succeed.
    db.pool.close().await;
    let error = processor.ingest_event(event("a", json!({"event": "e"}))).await.unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(writer.take().is_empty());
}

/// Event rows of concurrent tasks are inserted together; a bad row fails alone and every other
/// event gets its own id.
#[tokio::test]
async fn concurrent_events_are_batched_and_a_bad_one_fails_alone() {
    let harness = Harness::new().await;
    let long_id = "x".repeat(300);
    let distinct_ids: Vec<String> =
        (0..60).map(|index| if index == 17 { long_id.clone() } else { format!("user-{}", index % 7) }).collect();
    let results = futures::future::join_all(
        distinct_ids
            .iter()
            .map(|distinct_id| harness.processor.ingest_event(event(distinct_id, json!({"event": "batched"})))),
    )
    .await;
    let mut ids = Vec::new();
    for (index, result) in results.into_iter().enumerate() {
        match (index, result) {
            (17, Err(IngestError::Database(_))) => {}
            (17, other) => panic!("the long distinct id must fail: {other:?}"),
            (_, Ok(IngestOutcome::Event { event_id: Some(id), .. })) => ids.push(id),
            (_, other) => panic!("unexpected {other:?}"),
        }
    }
    let events = harness.events().await;
    assert_eq!(events.len(), 59);
    let mut stored: Vec<i64> = events.iter().map(|event| event.id).collect();
    stored.sort();
    ids.sort();
    assert_eq!(ids, stored);
    for event in &events {
        assert!(event.distinct_id.starts_with("user-"));
    }
}

/// The e2e "action matches" case with the real matcher: the fixture's action 69 (event property
/// `foo` exactly `bar`) matches `xyz` with `{foo: 'bar'}`.
#[tokio::test]
async fn action_matches_with_the_actions_room() {
    use plugin_server::ingestion::actions::{ActionManager, ActionMatcher, HookCommander};
    let db = TestDb::with_fixture(None).await;
    let manager = Arc::new(ActionManager::new(db.pool.clone()));
    manager.prepare().await.unwrap();
    let matcher = Arc::new(ActionMatcher::new(db.pool.clone(), manager));
    let hooks = Arc::new(HookCommander::new(db.pool.clone()));
    let processor = processor_for(&db.pool).with_action_matching(matcher, hooks);
    processor.ingest_event(event("abc", json!({"event": "xyz", "properties": {"foo": "bar"}}))).await.unwrap();
    processor.ingest_event(event("abc", json!({"event": "xyz", "properties": {"foo": "nope"}}))).await.unwrap();
    let matches: Vec<(i64, i32)> = sqlx::query_as("SELECT event_id::int8, action_id FROM posthog_action_events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let first_event = fetch_events(&db.pool).await[0].id;
    assert_eq!(matches, [(first_event, 69)]);
}

/// `$set` / `$set_once` of concurrent events share statements: all keys land, `$set_once` keeps
/// the first value, and an update whose person vanished fails alone with the reference's message.
#[tokio::test]
async fn concurrent_property_updates_compose_and_a_missing_person_fails_alone() {
    let harness = Harness::new().await;
    let processor = &harness.processor;
    for distinct_id in ["busy", "ghost"] {
        processor.ingest_event(event(distinct_id, json!({"event": "first"}))).await.unwrap();
    }
    // The LRU still knows "ghost", so no new person is created for it.
    sqlx::query("DELETE FROM posthog_persondistinctid WHERE distinct_id = 'ghost'")
        .execute(harness.pool())
        .await
        .unwrap();
    let events: Vec<PluginEvent> = (0..40)
        .map(|index| {
            let distinct_id = if index == 25 { "ghost" } else { "busy" };
            let properties =
                json!({"$set": {format!("key_{index}"): index, "last": "same"}, "$set_once": {"once": "kept"}});
            event(distinct_id, json!({"event": "update", "properties": properties}))
        })
        .collect();
    let results = futures::future::join_all(events.into_iter().map(|event| processor.ingest_event(event))).await;
    for (index, result) in results.iter().enumerate() {
        match (index, result) {
            (25, Err(error)) => {
                assert_eq!(
                    error.to_string(),
                    "Could not find person with distinct id \"ghost\" in team \"2\" to update properties"
                )
            }
            (25, Ok(_)) => panic!("the ghost update must fail"),
            (_, result) => assert!(result.is_ok(), "{result:?}"),
        }
    }
    let persons = harness.persons().await;
    let busy = persons.iter().find(|person| person.properties.contains_key("once")).expect("busy person");
    assert_eq!(busy.properties.len(), 39 + 2);
    assert_eq!(busy.properties["once"], json!("kept"));
    assert_eq!(busy.properties["key_39"], json!(39));
}
