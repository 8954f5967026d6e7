//! Port of the reference's tests/worker/ingestion/action-manager.test.ts (2 cases) on the standard
//! fixture (action 69 "Test Action" with step 913), plus the pub/sub paths for actions that were
//! not cached yet and the readiness guard.

mod common;

use plugin_server::ingestion::actions::{ActionError, ActionManager};
use serde_json::json;

use common::{TestDb, TEAM_ID};

const TEAM: i64 = TEAM_ID as i64;
const ACTION_ID: i64 = 69;
const ACTION_STEP_ID: i64 = 913;

async fn prepared() -> (TestDb, ActionManager) {
    let db = TestDb::with_fixture(None).await;
    let manager = ActionManager::new(db.pool.clone());
    manager.prepare().await.expect("prepare");
    (db, manager)
}

fn assert_fixture_action(manager: &ActionManager, key: &str) {
    let actions = manager.team_actions(TEAM).expect("ready");
    assert_eq!(actions.len(), 1);
    let action = &actions[0];
    assert_eq!(action.id, ACTION_ID);
    assert_eq!(action.name.as_deref(), Some("Test Action"));
    assert!(!action.deleted);
    // The fixture (like the reference's resetTestDatabase) inserts post_to_slack = true; the
    // reference test's `false` is a stale expectation (spec 00 §6 #18).
    assert!(action.post_to_slack);
    assert_eq!(action.slack_message_format.as_deref(), Some(""));
    assert!(!action.is_calculating);
    assert_eq!(action.steps.len(), 1);
    let step = &action.steps[0];
    assert_eq!(step.id, ACTION_STEP_ID);
    assert_eq!(step.action_id, ACTION_ID);
    for field in
        [&step.tag_name, &step.text, &step.href, &step.selector, &step.url, &step.url_matching, &step.name, &step.event]
    {
        assert_eq!(field, &None);
    }
    assert_eq!(step.properties, Some(json!([{"type": "event", "operator": "exact", "key": key, "value": ["bar"]}])));
}

#[tokio::test]
async fn returns_the_correct_actions_generally() {
    let (db, manager) = prepared().await;
    assert_fixture_action(&manager, "foo");

    sqlx::query("UPDATE posthog_actionstep SET properties = jsonb_set(properties, '{0,key}', '\"baz\"') WHERE id = $1")
        .bind(ACTION_STEP_ID as i32)
        .execute(&db.pool)
        .await
        .expect("update step");
    // Normally dispatched by Django through pub/sub.
    manager.reload_action(TEAM, ACTION_ID).await.expect("reload");
    assert_fixture_action(&manager, "baz");

    manager.drop_action(TEAM, ACTION_ID);
    assert!(manager.team_actions(TEAM).expect("ready").is_empty());
}

#[tokio::test]
async fn returns_the_correct_actions_when_deleted_is_true() {
    let (db, manager) = prepared().await;
    assert_fixture_action(&manager, "foo");

    sqlx::query("UPDATE posthog_action SET deleted = TRUE WHERE id = $1")
        .bind(ACTION_ID as i32)
        .execute(&db.pool)
        .await
        .expect("update action");
    manager.reload_action(TEAM, ACTION_ID).await.expect("reload");
    assert!(manager.team_actions(TEAM).expect("ready").is_empty());
}

#[tokio::test]
async fn not_ready_until_prepared_and_unknown_actions_are_harmless() {
    let db = TestDb::with_fixture(None).await;
    let manager = ActionManager::new(db.pool.clone());
    assert!(!manager.has_team_actions(TEAM));
    let error = manager.team_actions(TEAM).expect_err("not ready");
    assert!(matches!(error, ActionError::NotReady));
    assert_eq!(error.to_string(), "ActionManager is not ready! Run actionManager.prepare() before this");
    manager.prepare().await.expect("prepare");
    assert!(manager.has_team_actions(TEAM));
    assert!(!manager.has_team_actions(999));

    // Unknown ids: nothing in the DB, nothing cached → nothing happens.
    manager.reload_action(TEAM, 12345).await.expect("reload unknown");
    manager.drop_action(TEAM, 12345);
    manager.drop_action(999, ACTION_ID);
    assert_eq!(manager.team_actions(TEAM).expect("ready").len(), 1);
    assert!(manager.team_actions(999).expect("ready").is_empty());

    // A new action appears through reload_action; a full reload sees the same.
    sqlx::query("INSERT INTO posthog_action (id, team_id, name) VALUES (70, $1, 'Second')")
        .bind(TEAM_ID)
        .execute(&db.pool)
        .await
        .expect("insert action");
    manager.reload_action(TEAM, 70).await.expect("reload new");
    let ids: Vec<i64> = manager.team_actions(TEAM).expect("ready").iter().map(|action| action.id).collect();
    assert_eq!(ids, vec![69, 70]);
    manager.drop_action(TEAM, 70);
    manager.reload_all().await.expect("reload all");
    let ids: Vec<i64> = manager.team_actions(TEAM).expect("ready").iter().map(|action| action.id).collect();
    assert_eq!(ids, vec![69, 70]);
}
