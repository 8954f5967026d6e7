//! Port of the reference's tests/worker/ingestion/hooks.test.ts (14 cases: webhook type, user and
//! action details, tokens, token values, formatted messages) and of the two hook cases of
//! tests/worker/ingestion/ingest-event.test.ts (webhook and REST hook bodies), fired at a local
//! HTTP listener on 127.0.0.1, plus the REST hook removal on HTTP 410.

mod actions_support;
mod common;

use std::sync::Arc;

use plugin_server::event::PluginEvent;
use plugin_server::ingestion::actions::{
    action_details, determine_webhook_type, formatted_message, tokens, user_details, value_of_token, Action,
    ActionManager, HookCommander, WebhookType,
};
use plugin_server::model::{Organization, Team};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

use actions_support::{create_person, listener, next, test_person};
use common::{TestDb, COMMON_USER_ID, TEAM_ID};

fn event(distinct_id: &str, properties: Value) -> PluginEvent {
    serde_json::from_value(json!({
        "distinct_id": distinct_id, "team_id": TEAM_ID, "now": "2021-10-01T00:00:00.000Z", "event": "xyz",
        "site_url": "", "properties": properties,
    }))
    .expect("test event")
}

fn action(id: i64, name: &str, format: &str) -> Action {
    Action {
        id,
        team_id: i64::from(TEAM_ID),
        name: Some(name.into()),
        post_to_slack: true,
        slack_message_format: Some(format.into()),
        ..Action::default()
    }
}

fn pair(text: &str, markdown: &str) -> (String, String) {
    (text.to_owned(), markdown.to_owned())
}

// determineWebhookType

#[test]
fn webhook_type_slack() {
    assert_eq!(determine_webhook_type("https://hooks.slack.com/services/"), WebhookType::Slack);
}

#[test]
fn webhook_type_discord() {
    assert_eq!(determine_webhook_type("https://discord.com/api/webhooks/"), WebhookType::Discord);
}

#[test]
fn webhook_type_teams() {
    assert_eq!(determine_webhook_type("https://outlook.office.com/webhook/"), WebhookType::Teams);
}

// getUserDetails

#[test]
fn user_details_slack() {
    let person = test_person(json!({"email": "test@posthog.com"}));
    assert_eq!(
        user_details(&event("2", json!({})), Some(&person), "http://localhost:8000", WebhookType::Slack),
        pair("test@posthog.com", "<http://localhost:8000/person/2|test@posthog.com>")
    );
}

#[test]
fn user_details_teams() {
    let person = test_person(json!({"email": "test@posthog.com"}));
    assert_eq!(
        user_details(&event("2", json!({})), Some(&person), "http://localhost:8000", WebhookType::Teams),
        pair("test@posthog.com", "[test@posthog.com](http://localhost:8000/person/2)")
    );
}

// getActionDetails

#[test]
fn action_details_slack() {
    assert_eq!(
        action_details(&action(1, "action1", ""), "http://localhost:8000", WebhookType::Slack),
        pair("action1", "<http://localhost:8000/action/1|action1>")
    );
}

#[test]
fn action_details_teams() {
    assert_eq!(
        action_details(&action(1, "action1", ""), "http://localhost:8000", WebhookType::Teams),
        pair("action1", "[action1](http://localhost:8000/action/1)")
    );
}

// getTokens

#[test]
fn get_tokens_works() {
    let (found, tokenized) = tokens("[action.name] got done by [user.name]");
    assert_eq!(found, vec!["action.name".to_string(), "user.name".to_string()]);
    assert_eq!(tokenized, "%s got done by %s");
}

// getValueOfToken

fn token_value(parts: &[&str]) -> Option<(String, String)> {
    let event = event("2", json!({"$browser": "Chrome"}));
    let person = test_person(json!({}));
    value_of_token(&action(1, "action1", ""), &event, Some(&person), "http://localhost:8000", WebhookType::Teams, parts)
}

#[test]
fn token_value_user_name() {
    assert_eq!(token_value(&["user", "name"]), Some(pair("2", "[2](http://localhost:8000/person/2)")));
}

#[test]
fn token_value_user_prop() {
    assert_eq!(token_value(&["user", "browser"]), Some(pair("Chrome", "Chrome")));
}

#[test]
fn token_value_user_prop_but_missing() {
    assert_eq!(token_value(&["user", "missing_property"]), Some(pair("undefined", "undefined")));
}

// getFormattedMessage

fn formatted(template: &str) -> (String, String) {
    let event = event("2", json!({"$browser": "Chrome", "page_title": "Pricing"}));
    let person = test_person(json!({}));
    formatted_message(
        &action(1, "action1", template),
        &event,
        Some(&person),
        "https://localhost:8000",
        WebhookType::Slack,
    )
}

#[test]
fn formatted_message_custom_format() {
    assert_eq!(
        formatted(
            "[user.name] from [user.browser] on [event.properties.page_title] page with [event.properties.fruit]"
        ),
        pair(
            "2 from Chrome on Pricing page with undefined",
            "<https://localhost:8000/person/2|2> from Chrome on Pricing page with undefined"
        )
    );
}

#[test]
fn formatted_message_default_format() {
    assert_eq!(
        formatted(""),
        pair(
            "action1 was triggered by 2",
            "<https://localhost:8000/action/1|action1> was triggered by <https://localhost:8000/person/2|2>"
        )
    );
}

#[test]
fn formatted_message_not_quite_correct_format() {
    assert_eq!(
        formatted("[user.name] did thing from browser [user.brauzer]"),
        pair(
            "2 did thing from browser undefined",
            "<https://localhost:8000/person/2|2> did thing from browser undefined"
        )
    );
}

#[test]
fn formatted_message_with_unknown_token_reports_the_error() {
    assert_eq!(
        formatted("[foo.bar] by [user.name]"),
        pair(
            "⚠ Error: There are one or more formatting errors in the message template for action \"action1\".",
            "*⚠ Error: There are one or more formatting errors in the message template for action \"<https://localhost:8000/action/1|action1>\".*"
        )
    );
}

async fn team_and_organization(pool: &PgPool) -> (Team, Organization) {
    let team: Team = sqlx::query_as(&format!("SELECT {} FROM posthog_team WHERE id = $1", Team::COLUMNS))
        .bind(TEAM_ID)
        .fetch_one(pool)
        .await
        .expect("team");
    let organization: Organization =
        sqlx::query_as(&format!("SELECT {} FROM posthog_organization WHERE id = $1", Organization::COLUMNS))
            .bind(team.organization_id)
            .fetch_one(pool)
            .await
            .expect("organization");
    (team, organization)
}

/// The fixture's action 69 ("Test Action", step `foo` exact `bar`) as matched, and an event for it.
async fn fixture_match(pool: &PgPool) -> (Vec<Arc<Action>>, PluginEvent) {
    let manager = ActionManager::new(pool.clone());
    manager.prepare().await.expect("prepare");
    let matches = manager.team_actions(i64::from(TEAM_ID)).expect("ready");
    let event: PluginEvent = serde_json::from_value(json!({
        "event": "xyz", "properties": {"foo": "bar"}, "timestamp": "2021-10-01T00:00:00.000Z",
        "now": "2021-10-01T00:00:00.000Z", "team_id": TEAM_ID, "distinct_id": "abc", "ip": null,
        "site_url": "https://example.com", "uuid": Uuid::now_v7().to_string(),
    }))
    .expect("event");
    (matches, event)
}

#[tokio::test]
async fn fires_a_webhook() {
    let db = TestDb::with_fixture(None).await;
    let (base, mut received) = listener(200, "").await;
    sqlx::query("UPDATE posthog_team SET slack_incoming_webhook = $1")
        .bind(format!("{base}/webhook"))
        .execute(&db.pool)
        .await
        .expect("update");
    let (team, organization) = team_and_organization(&db.pool).await;
    let (matches, event) = fixture_match(&db.pool).await;
    let person = create_person(&db.pool, "abc", false).await;
    let commander = Arc::new(HookCommander::new(db.pool.clone()));

    let handle = commander
        .find_and_fire_hooks(&event, Some(&person), "https://example.com", &team, Some(&organization), &matches)
        .expect("hooks to fire");
    handle.await.expect("hook task");

    let request = next(&mut received).await;
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/webhook");
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        request.body,
        "{\n    \"text\": \"[Test Action](https://example.com/action/69) was triggered by [abc](https://example.com/person/abc)\"\n}"
    );
}

#[tokio::test]
async fn fires_a_rest_hook() {
    let db = TestDb::with_fixture(None).await;
    let (base, mut received) = listener(200, "").await;
    sqlx::query("UPDATE posthog_organization SET available_features = '{\"zapier\"}'")
        .execute(&db.pool)
        .await
        .expect("update");
    insert_hook(&db.pool, "abc", &format!("{base}/rest-hooks")).await;
    let (team, organization) = team_and_organization(&db.pool).await;
    let (matches, event) = fixture_match(&db.pool).await;
    let person = create_person(&db.pool, "abc", false).await;
    let commander = Arc::new(HookCommander::new(db.pool.clone()));

    commander
        .find_and_fire_hooks(&event, Some(&person), "https://example.com", &team, Some(&organization), &matches)
        .expect("hooks to fire")
        .await
        .expect("hook task");

    let request = next(&mut received).await;
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/rest-hooks");
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    assert!(request.body.starts_with("{\n    \"hook\": {\n        \"id\": \"abc\","), "{}", request.body);
    let body: Value = serde_json::from_str(&request.body).expect("json body");
    let data = &body["data"];
    assert_eq!(body["hook"], json!({"id": "abc", "event": "action_performed", "target": format!("{base}/rest-hooks")}));
    for (key, value) in [
        ("event", json!("xyz")),
        ("properties", json!({"foo": "bar"})),
        ("team_id", json!(TEAM_ID)),
        ("distinct_id", json!("abc")),
        ("ip", Value::Null),
        ("site_url", json!("https://example.com")),
    ] {
        assert_eq!(data[key], value, "{key}");
    }
    assert!(data["timestamp"].is_string() && data["now"].is_string() && data["uuid"].is_string());
    let mut expected_keys =
        ["event", "properties", "timestamp", "now", "team_id", "distinct_id", "ip", "site_url", "uuid", "person"];
    let mut keys: Vec<&str> = data.as_object().expect("object").keys().map(String::as_str).collect();
    keys.sort();
    expected_keys.sort();
    assert_eq!(keys, expected_keys);
    let person_payload = &data["person"];
    assert_eq!(person_payload["id"], json!(person.id));
    assert!(person_payload["created_at"].as_str().is_some_and(|at| at.ends_with('Z') && at.len() == 24));
    assert_eq!(person_payload["uuid"], json!(person.uuid.to_string()));
    let mut without_variable = person_payload.clone();
    for key in ["id", "created_at", "uuid"] {
        without_variable.as_object_mut().expect("object").remove(key);
    }
    assert_eq!(
        without_variable,
        json!({
            "team_id": 2, "properties": {}, "properties_last_updated_at": {}, "properties_last_operation": null,
            "is_user_id": null, "is_identified": false, "persondistinctid__team_id": 2,
            "persondistinctid__distinct_id": "abc",
        })
    );
}

async fn insert_hook(pool: &PgPool, id: &str, target: &str) {
    sqlx::query(
        "INSERT INTO ee_hook (id, team_id, user_id, resource_id, event, target, created, updated)
         VALUES ($1, $2, $3, 69, 'action_performed', $4, now(), now())",
    )
    .bind(id)
    .bind(TEAM_ID)
    .bind(COMMON_USER_ID)
    .bind(target)
    .execute(pool)
    .await
    .expect("insert hook");
}

#[tokio::test]
async fn rest_hook_answering_410_is_deleted_and_webhooks_are_not_sent_without_zapier_or_url() {
    let db = TestDb::with_fixture(None).await;
    let (base, mut received) = listener(410, "").await;
    let (team, organization) = team_and_organization(&db.pool).await;
    let (matches, event) = fixture_match(&db.pool).await;
    insert_hook(&db.pool, "gone", &format!("{base}/gone")).await;
    let commander = Arc::new(HookCommander::new(db.pool.clone()));
    // No webhook URL and no zapier feature: nothing to fire.
    assert!(commander
        .find_and_fire_hooks(&event, None, "https://example.com", &team, Some(&organization), &matches)
        .is_none());

    sqlx::query("UPDATE posthog_organization SET available_features = '{\"zapier\"}'")
        .execute(&db.pool)
        .await
        .expect("update");
    let (team, organization) = team_and_organization(&db.pool).await;
    commander
        .find_and_fire_hooks(&event, None, "https://example.com", &team, Some(&organization), &matches)
        .expect("hooks to fire")
        .await
        .expect("hook task");
    let request = next(&mut received).await;
    assert_eq!(request.path, "/gone");
    let body: Value = serde_json::from_str(&request.body).expect("json body");
    assert!(body["data"].get("person").is_none(), "no person → no person key");
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ee_hook").fetch_one(&db.pool).await.expect("count");
    assert_eq!(left, 0);
}

#[tokio::test]
async fn slack_webhook_gets_text_and_blocks_and_unreachable_targets_do_not_block() {
    let db = TestDb::with_fixture(None).await;
    let (team, organization) = team_and_organization(&db.pool).await;
    let (matches, event) = fixture_match(&db.pool).await;
    let commander = Arc::new(HookCommander::new(db.pool.clone()));
    // A closed port: the request fails, is logged, and the task still ends.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_url = format!("http://{}/hooks.slack.com", closed.local_addr().expect("address"));
    drop(closed);
    let unreachable = Team { slack_incoming_webhook: Some(closed_url), ..team.clone() };
    commander
        .find_and_fire_hooks(&event, None, "https://example.com", &unreachable, Some(&organization), &matches)
        .expect("hooks to fire")
        .await
        .expect("hook task");

    let (base, mut received) = listener(200, "").await;
    let slack = Team { slack_incoming_webhook: Some(format!("{base}/services/hooks.slack.com")), ..team };
    let person = create_person(&db.pool, "abc", false).await;
    commander
        .find_and_fire_hooks(&event, Some(&person), "https://example.com", &slack, Some(&organization), &matches)
        .expect("hooks to fire")
        .await
        .expect("hook task");
    let body: Value = serde_json::from_str(&next(&mut received).await.body).expect("json body");
    assert_eq!(
        body,
        json!({
            "text": "Test Action was triggered by abc",
            "blocks": [{"type": "section", "text": {"type": "mrkdwn",
                "text": "<https://example.com/action/69|Test Action> was triggered by <https://example.com/person/abc|abc>"}}],
        })
    );
}
