//! Ports of the reference's team-manager, organization-manager, person-manager,
//! group-type-manager and groups tests (tests/worker/ingestion/*.test.ts, tests/shared/db.test.ts
//! group types), against real Postgres. Query counts are asserted through their observable
//! effect: a cached answer is still given after the database changed underneath.

mod common;
mod ingest_support;

use std::sync::{Arc, Mutex};

use common::{TestDb, TEAM_ID};
use plugin_server::ingestion::groups::{fetch_group_types, insert_group_type, GroupTypeManager};
use plugin_server::ingestion::person_manager::PersonManager;
use plugin_server::ingestion::teams::{FirstEventTelemetry, TeamManager};
use serde_json::{json, Map, Value};
use uuid::Uuid;

fn properties(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

#[tokio::test]
async fn team_is_cached_and_unknown_team_is_none() {
    let db = TestDb::with_fixture(None).await;
    let manager = TeamManager::new(db.pool.clone(), None);
    let team = manager.fetch_team(TEAM_ID).await.unwrap().expect("team 2");
    assert_eq!(team.name.as_deref(), Some("TEST PROJECT"));
    sqlx::query("UPDATE posthog_team SET name = 'Updated Name!' WHERE id = $1")
        .bind(TEAM_ID)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(manager.fetch_team(TEAM_ID).await.unwrap().unwrap().name.as_deref(), Some("TEST PROJECT"));
    // A fresh manager (an expired cache) sees the change.
    let fresh = TeamManager::new(db.pool.clone(), None);
    assert_eq!(fresh.fetch_team(TEAM_ID).await.unwrap().unwrap().name.as_deref(), Some("Updated Name!"));
    assert!(manager.fetch_team(-1).await.unwrap().is_none());
}

#[tokio::test]
async fn organization_is_cached_and_unknown_is_none() {
    let db = TestDb::with_fixture(None).await;
    let manager = TeamManager::new(db.pool.clone(), None);
    let organization_id: Uuid = common::COMMON_ORGANIZATION_ID.parse().unwrap();
    let organization = manager.fetch_organization(organization_id).await.unwrap().expect("organization");
    assert_eq!(organization.name, "TEST ORG");
    sqlx::query("UPDATE posthog_organization SET name = 'Updated Name!'").execute(&db.pool).await.unwrap();
    assert_eq!(manager.fetch_organization(organization_id).await.unwrap().unwrap().name, "TEST ORG");
    assert!(manager.fetch_organization(Uuid::nil()).await.unwrap().is_none());
}

#[tokio::test]
async fn definitions_are_inserted_once_and_cached() {
    let db = TestDb::with_fixture(None).await;
    sqlx::query(
        "INSERT INTO posthog_eventdefinition (id, name, volume_30_day, query_usage_30_day, team_id) \
         VALUES ($1, '$pageview', 3, 2, $2)",
    )
    .bind(Uuid::new_v4())
    .bind(TEAM_ID)
    .execute(&db.pool)
    .await
    .unwrap();
    let manager = TeamManager::new(db.pool.clone(), None);
    let event_properties =
        properties(json!({"property_name": "efg", "number": 4, "numeric_string": "4", "flag": true}));
    manager.update_event_names_and_properties(TEAM_ID, "new-event", &event_properties).await.unwrap();
    manager.update_event_names_and_properties(TEAM_ID, "$pageview", &event_properties).await.unwrap();

    let events: Vec<(String, Option<i32>, Option<i32>)> =
        sqlx::query_as("SELECT name, volume_30_day, query_usage_30_day FROM posthog_eventdefinition ORDER BY name")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(events, [("$pageview".to_string(), Some(3), Some(2)), ("new-event".to_string(), None, None)]);
    let definitions: Vec<(String, bool)> =
        sqlx::query_as("SELECT name, is_numerical FROM posthog_propertydefinition").fetch_all(&db.pool).await.unwrap();
    let expected: Vec<(String, bool)> =
        [("property_name", false), ("number", true), ("numeric_string", false), ("flag", false)]
            .iter()
            .map(|(name, numerical)| (name.to_string(), *numerical))
            .collect();
    assert_eq!(definitions, expected);

    // With warm caches nothing is written again: rows deleted underneath stay deleted.
    sqlx::query("DELETE FROM posthog_propertydefinition").execute(&db.pool).await.unwrap();
    sqlx::query("DELETE FROM posthog_eventdefinition WHERE name = 'new-event'").execute(&db.pool).await.unwrap();
    manager.update_event_names_and_properties(TEAM_ID, "new-event", &event_properties).await.unwrap();
    let count: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM posthog_propertydefinition").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 0);

    // A new key is inserted even though the cache was loaded before.
    manager
        .update_event_names_and_properties(TEAM_ID, "new-event", &properties(json!({"another": 1.5})))
        .await
        .unwrap();
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM posthog_propertydefinition").fetch_all(&db.pool).await.unwrap();
    assert_eq!(names, ["another"]);
}

#[derive(Default)]
struct RecordingTelemetry {
    calls: Mutex<Vec<(String, Value)>>,
}

impl FirstEventTelemetry for RecordingTelemetry {
    fn first_team_event_ingested(&self, member_distinct_id: &str, properties: Value) {
        self.calls.lock().unwrap().push((member_distinct_id.to_string(), properties));
    }
}

#[tokio::test]
async fn first_team_event_sets_flag_and_sends_telemetry_once() {
    let db = TestDb::with_fixture(None).await;
    sqlx::query("UPDATE posthog_team SET ingested_event = $1 WHERE id = $2")
        .bind(false)
        .bind(TEAM_ID)
        .execute(&db.pool)
        .await
        .unwrap();
    let telemetry = Arc::new(RecordingTelemetry::default());
    let manager = TeamManager::new(db.pool.clone(), Some(telemetry.clone()));
    let team_uuid = manager.fetch_team(TEAM_ID).await.unwrap().unwrap().uuid;
    for _ in 0..3 {
        manager
            .update_event_names_and_properties(TEAM_ID, "$autocapture", &properties(json!({"distinct_id": 1})))
            .await
            .unwrap();
    }
    let ingested: bool = sqlx::query_scalar("SELECT ingested_event FROM posthog_team WHERE id = $1")
        .bind(TEAM_ID)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(ingested);
    // Once, not for every event of the next 30 s (REF-BUG 10).
    assert_eq!(
        *telemetry.calls.lock().unwrap(),
        vec![("plugin_test_user_distinct_id_1001".to_string(), json!({"team": team_uuid.to_string()}))]
    );
}

/// Many events in flight at once all see `ingested_event = false` in the cached team: one of
/// them marks the team and sends the telemetry, not each.
#[tokio::test]
async fn concurrent_first_events_mark_the_team_once() {
    let db = TestDb::with_fixture(None).await;
    sqlx::query("UPDATE posthog_team SET ingested_event = false WHERE id = $1")
        .bind(TEAM_ID)
        .execute(&db.pool)
        .await
        .unwrap();
    let telemetry = Arc::new(RecordingTelemetry::default());
    let manager = Arc::new(TeamManager::new(db.pool.clone(), Some(telemetry.clone())));
    manager.fetch_team(TEAM_ID).await.unwrap();
    let calls = (0..40).map(|index| {
        let manager = manager.clone();
        tokio::spawn(async move {
            let event = format!("concurrent-{}", index % 4);
            manager.update_event_names_and_properties(TEAM_ID, &event, &properties(json!({"k": index}))).await
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap().unwrap();
    }
    assert_eq!(telemetry.calls.lock().unwrap().len(), 1, "one telemetry call for 40 concurrent first events");
    let ingested: bool = sqlx::query_scalar("SELECT ingested_event FROM posthog_team WHERE id = $1")
        .bind(TEAM_ID)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(ingested);
    let definitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM posthog_eventdefinition WHERE name LIKE 'concurrent-%'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(definitions, 4);
}

#[tokio::test]
async fn first_team_event_through_the_processor() {
    let harness = ingest_support::Harness::new().await;
    sqlx::query("UPDATE posthog_team SET ingested_event = false").execute(harness.pool()).await.unwrap();
    let data = json!({"event": "$autocapture", "properties": {
        "distinct_id": 1, "$elements": [{"tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm"}]
    }});
    harness.process_simple("2", data).await.unwrap();
    let ingested: bool =
        sqlx::query_scalar("SELECT ingested_event FROM posthog_team").fetch_one(harness.pool()).await.unwrap();
    assert!(ingested);
    assert_eq!(harness.events().await[0].elements_hash, "a89021a60b3497d24e93ae181fba01aa");
}

#[tokio::test]
async fn is_new_person_uses_the_lru() {
    let db = TestDb::with_fixture(None).await;
    let harness_person = |ids: &'static [&'static str]| {
        let pool = db.pool.clone();
        async move {
            plugin_server::db::persons::create_person(
                &pool,
                chrono::Utc::now(),
                &Map::new(),
                TEAM_ID,
                false,
                Uuid::new_v4(),
                ids,
            )
            .await
            .unwrap();
        }
    };
    harness_person(&["1234"]).await;
    harness_person(&["567"]).await;
    let manager = PersonManager::new(10);
    assert!(!manager.is_new_person(&db.pool, TEAM_ID, "1234").await.unwrap());
    assert!(!manager.is_new_person(&db.pool, TEAM_ID, "567").await.unwrap());
    assert!(manager.is_new_person(&db.pool, TEAM_ID, "new-id").await.unwrap());
    // Remembered before the query: the second look answers from the LRU even though no person exists.
    assert!(!manager.is_new_person(&db.pool, TEAM_ID, "new-id").await.unwrap());
    // Per team.
    assert!(manager.is_new_person(&db.pool, 3, "1234").await.unwrap());
    // A tiny LRU forgets.
    let small = PersonManager::new(1);
    assert!(small.is_new_person(&db.pool, TEAM_ID, "a").await.unwrap());
    assert!(small.is_new_person(&db.pool, TEAM_ID, "b").await.unwrap());
    assert!(small.is_new_person(&db.pool, TEAM_ID, "a").await.unwrap());
}

#[tokio::test]
async fn persons_are_looked_up_many_at_once_in_input_order() {
    use plugin_server::db::persons::{create_person, fetch_person, fetch_persons_by_distinct_id};
    let db = TestDb::with_fixture(None).await;
    let create = |ids: &'static [&'static str], properties: Value| {
        let pool = db.pool.clone();
        async move {
            let properties = properties.as_object().cloned().unwrap_or_default();
            create_person(&pool, chrono::Utc::now(), &properties, TEAM_ID, false, Uuid::new_v4(), ids).await.unwrap().0
        }
    };
    let anna = create(&["anna", "anna-2"], json!({"name": "Anna"})).await;
    let bob = create(&["bob"], json!({"name": "Bob"})).await;
    let keys: Vec<(i32, String)> = [
        (TEAM_ID, "bob"),
        (TEAM_ID, "nobody"),
        (TEAM_ID, "anna-2"),
        (TEAM_ID + 1, "anna"),
        (TEAM_ID, "anna"),
        (TEAM_ID, "bob"),
    ]
    .iter()
    .map(|(team_id, distinct_id)| (*team_id, distinct_id.to_string()))
    .collect();
    let found = fetch_persons_by_distinct_id(&db.pool, &keys).await.unwrap();
    let expected = vec![Some(bob.clone()), None, Some(anna.clone()), None, Some(anna.clone()), Some(bob.clone())];
    assert_eq!(found, expected);
    // The same rows as one lookup at a time.
    for ((team_id, distinct_id), person) in keys.iter().zip(&found) {
        assert_eq!(&fetch_person(&db.pool, *team_id, distinct_id).await.unwrap(), person);
    }
    assert!(fetch_persons_by_distinct_id(&db.pool, &[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn new_persons_are_created_many_at_once_unless_their_distinct_id_exists() {
    use plugin_server::db::persons::{
        create_person, create_persons_unless_distinct_ids_exist, fetch_person, NewPerson,
    };
    let db = TestDb::with_fixture(None).await;
    create_person(&db.pool, chrono::Utc::now(), &Map::new(), TEAM_ID, false, Uuid::new_v4(), &["known"]).await.unwrap();
    let new = |team_id: i32, distinct_id: &str| NewPerson {
        created_at: chrono::Utc::now(),
        properties: properties(json!({"first": distinct_id})),
        team_id,
        is_identified: false,
        uuid: Uuid::new_v4(),
        distinct_id: distinct_id.to_string(),
    };
    // A known distinct id, the same new one twice (the first entry wins).
    let batch = [new(TEAM_ID, "u1"), new(TEAM_ID, "known"), new(TEAM_ID, "u2"), new(TEAM_ID, "u1"), new(TEAM_ID, "u3")];
    let created = create_persons_unless_distinct_ids_exist(&db.pool, &batch).await.unwrap();
    let created_for: Vec<Option<&str>> =
        created.iter().map(|entry| entry.as_ref().map(|(_, distinct_id)| distinct_id.distinct_id.as_str())).collect();
    assert_eq!(created_for, [Some("u1"), None, Some("u2"), None, Some("u3")]);
    for (entry, wanted) in created.iter().zip(&batch) {
        let Some((person, distinct_id)) = entry else { continue };
        assert_eq!(
            (person.uuid, person.team_id, &person.properties),
            (wanted.uuid, wanted.team_id, &wanted.properties)
        );
        assert_eq!((distinct_id.person_id, distinct_id.team_id), (person.id, wanted.team_id));
        // As stored.
        assert_eq!(fetch_person(&db.pool, wanted.team_id, &wanted.distinct_id).await.unwrap().as_ref(), Some(person));
    }
    // Again: everything exists now.
    let again = create_persons_unless_distinct_ids_exist(&db.pool, &batch).await.unwrap();
    assert!(again.iter().all(Option::is_none), "{again:?}");
    assert!(create_persons_unless_distinct_ids_exist(&db.pool, &[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn group_types_insert_and_conflicts() {
    let db = TestDb::with_fixture(None).await;
    assert!(fetch_group_types(&db.pool, TEAM_ID).await.unwrap().is_empty());
    assert_eq!(insert_group_type(&db.pool, TEAM_ID, "g0", 0).await.unwrap(), Some(0));
    assert_eq!(insert_group_type(&db.pool, TEAM_ID, "g1", 1).await.unwrap(), Some(1));
    let types = fetch_group_types(&db.pool, TEAM_ID).await.unwrap();
    assert_eq!(types.len(), 2);
    assert_eq!((types["g0"], types["g1"]), (0, 1));
    // Conflicts by index: each new name moves to the next free index, until 5.
    for (name, expected) in [("g2", Some(2)), ("g3", Some(3)), ("g4", Some(4)), ("g5", None), ("g6", None)] {
        assert_eq!(insert_group_type(&db.pool, TEAM_ID, name, 0).await.unwrap(), expected, "{name}");
    }
    // Conflicts by name: the existing index.
    assert_eq!(insert_group_type(&db.pool, TEAM_ID, "g3", 0).await.unwrap(), Some(3));
    assert_eq!(insert_group_type(&db.pool, TEAM_ID, "g3", 4).await.unwrap(), Some(3));
}

#[tokio::test]
async fn group_type_manager_caches_and_discovers() {
    let db = TestDb::with_fixture(None).await;
    let manager = GroupTypeManager::new(db.pool.clone());
    assert!(manager.fetch_group_types(TEAM_ID).await.unwrap().is_empty());
    assert_eq!(manager.fetch_group_type_index(TEAM_ID, "foo").await.unwrap(), Some(0));
    assert_eq!(manager.fetch_group_type_index(TEAM_ID, "bar").await.unwrap(), Some(1));
    // Another server took index 2 meanwhile: the next type lands on 3, and "other" is seen after a refetch.
    insert_group_type(&db.pool, TEAM_ID, "other", 2).await.unwrap();
    assert_eq!(manager.fetch_group_type_index(TEAM_ID, "baz").await.unwrap(), Some(3));
    assert_eq!(manager.fetch_group_types(TEAM_ID).await.unwrap().len(), 4);
    assert_eq!(manager.fetch_group_type_index(TEAM_ID, "qux").await.unwrap(), Some(4));
    assert_eq!(manager.fetch_group_type_index(TEAM_ID, "sixth").await.unwrap(), None);
    // A mapping cached as empty stays cached within the TTL.
    sqlx::query("DELETE FROM posthog_grouptypemapping").execute(&db.pool).await.unwrap();
    assert_eq!(manager.fetch_group_types(TEAM_ID).await.unwrap().len(), 5);
}

#[tokio::test]
async fn add_group_properties() {
    let db = TestDb::with_fixture(None).await;
    let manager = GroupTypeManager::new(db.pool.clone());
    for (index, name) in ["organization", "project", "x2", "x3", "x4"].iter().enumerate() {
        insert_group_type(&db.pool, TEAM_ID, name, index as i32).await.unwrap();
    }
    let mut without_groups = properties(json!({"foo": "bar"}));
    manager.add_group_properties(TEAM_ID, &mut without_groups).await.unwrap();
    assert_eq!(Value::Object(without_groups), json!({"foo": "bar"}));

    let groups = json!({"organization": "PostHog", "project": "web", "foobar": "afsafa"});
    let mut with_groups = properties(json!({"foo": "bar", "$groups": groups}));
    manager.add_group_properties(TEAM_ID, &mut with_groups).await.unwrap();
    assert_eq!(
        Value::Object(with_groups),
        json!({"foo": "bar", "$groups": groups, "$group_0": "PostHog", "$group_1": "web"})
    );
}

/// The lookup plan PostgreSQL makes for one distinct id of team 2.
async fn distinct_id_lookup_plan(pool: &sqlx::PgPool) -> String {
    let rows: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT person_id FROM posthog_persondistinctid WHERE team_id = 2 AND distinct_id = 'distinct-7'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn distinct_ids_never_analyzed_get_statistics_once_the_table_grows() {
    use plugin_server::ingestion::person_manager::analyze_distinct_ids_unless_planned;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    let db = TestDb::with_fixture(None).await;
    // PostHog's schema has the team index Django makes for the foreign key: the planner's wrong pick.
    sqlx::query("CREATE INDEX IF NOT EXISTS posthog_persondistinctid_team_id ON posthog_persondistinctid (team_id)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM pg_statistic WHERE starelid = 'posthog_persondistinctid'::regclass")
        .execute(&db.pool)
        .await
        .unwrap();
    let analyzed = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE tablename = 'posthog_persondistinctid' AND attname = 'team_id')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };

    // A small table is left alone: the task keeps looking until it is stopped.
    let token = CancellationToken::new();
    let stopper = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stopper.cancel();
    });
    tokio::time::timeout(Duration::from_secs(10), analyze_distinct_ids_unless_planned(&db.pool, &token))
        .await
        .expect("stops when cancelled");
    assert!(!analyzed().await);

    // Grown past the threshold (3,000 distinct ids of one team), it is analyzed once, at once.
    sqlx::query(
        "WITH persons AS (
             INSERT INTO posthog_person (created_at, properties, team_id, is_identified, uuid)
             SELECT now(), '{}', 2, false, gen_random_uuid() FROM generate_series(1, 3000) RETURNING id)
         INSERT INTO posthog_persondistinctid (distinct_id, person_id, team_id)
         SELECT 'distinct-' || id, id, 2 FROM persons",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before = distinct_id_lookup_plan(&db.pool).await;
    let token = CancellationToken::new();
    tokio::time::timeout(Duration::from_secs(10), analyze_distinct_ids_unless_planned(&db.pool, &token))
        .await
        .expect("analyzes without waiting for a cancellation");
    assert!(analyzed().await, "no statistics after the task (plan before: {before})");
    let after = distinct_id_lookup_plan(&db.pool).await;
    assert!(after.contains("unique distinct_id for team"), "plan before: {before}\nplan after: {after}");

    // With statistics there, nothing more to do.
    tokio::time::timeout(Duration::from_secs(2), analyze_distinct_ids_unless_planned(&db.pool, &token))
        .await
        .expect("returns at once when the table has statistics");
}
