//! Port of the reference's tests/worker/ingestion/action-matcher.test.ts (33 cases): action
//! matching against a real Postgres (actions loaded through the ActionManager, cohorts from
//! posthog_cohortpeople), the selector unit cases and the castingCompare vectors.

mod actions_support;
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use plugin_server::clickhouse::{ClickHouse, ClickHouseSettings};
use plugin_server::event::PluginEvent;
use plugin_server::infra::BoxError;
use plugin_server::ingestion::actions::selector::elements_match_selector;
use plugin_server::ingestion::actions::{
    casting_compare, Action, ActionManager, ActionMatcher, CastingOperator, ClickHouseStaticCohorts, StaticCohortLookup,
};
use plugin_server::ingestion::elements::Element;
use plugin_server::model::Person;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use actions_support::{create_person, fetch_person, test_person};
use common::http_stub::{http_stub, next_request};
use common::{TestDb, COMMON_USER_ID, TEAM_ID};

struct Ctx {
    db: TestDb,
    manager: Arc<ActionManager>,
    matcher: ActionMatcher,
    counter: AtomicUsize,
}

impl Ctx {
    async fn new() -> Ctx {
        let db = TestDb::empty().await;
        common::reset_test_database(&db.pool, None, false).await;
        Ctx::on(db).await
    }

    async fn on(db: TestDb) -> Ctx {
        let manager = Arc::new(ActionManager::new(db.pool.clone()));
        manager.prepare().await.expect("prepare");
        let matcher = ActionMatcher::new(db.pool.clone(), manager.clone());
        Ctx { db, manager, matcher, counter: AtomicUsize::new(0) }
    }

    /// `createTestAction`: inserts an action (ids 0, 1, 2… as in the reference) with steps built
    /// from partial step objects, reloads it and returns it as cached.
    async fn action(&self, steps: Value) -> Action {
        let id = self.counter.fetch_add(1, Ordering::SeqCst) as i32;
        sqlx::query(
            "INSERT INTO posthog_action (id, team_id, name, created_at, created_by_id, deleted, post_to_slack,
                slack_message_format, is_calculating, updated_at, last_calculated_at)
             VALUES ($1, $2, 'Test', now(), $3, false, false, '', false, now(), now())",
        )
        .bind(id)
        .bind(TEAM_ID)
        .bind(COMMON_USER_ID)
        .execute(&self.db.pool)
        .await
        .expect("insert action");
        for (index, step) in steps.as_array().cloned().unwrap_or_default().into_iter().enumerate() {
            let field = |name: &str| step.get(name).and_then(Value::as_str).map(str::to_owned);
            sqlx::query(
                "INSERT INTO posthog_actionstep (id, action_id, tag_name, text, href, selector, url, url_matching,
                    name, event, properties) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(id * 100 + index as i32)
            .bind(id)
            .bind(field("tag_name"))
            .bind(field("text"))
            .bind(field("href"))
            .bind(field("selector"))
            .bind(field("url"))
            .bind(field("url_matching"))
            .bind(field("name"))
            .bind(field("event"))
            .bind(step.get("properties").cloned())
            .execute(&self.db.pool)
            .await
            .expect("insert step");
        }
        self.manager.reload_action(i64::from(TEAM_ID), i64::from(id)).await.expect("reload action");
        let cached = self.manager.team_actions(i64::from(TEAM_ID)).expect("ready");
        let action = cached.iter().find(|action| action.id == i64::from(id)).expect("cached action");
        Action::clone(action)
    }

    async fn ids(&self, event: &PluginEvent, person: Option<&Person>, elements: &[Element]) -> Vec<i64> {
        let matches = self.matcher.matches(event, person, elements).await.expect("match");
        matches.iter().map(|action| action.id).collect()
    }

    async fn ids_for(&self, event: &PluginEvent) -> Vec<i64> {
        self.ids(event, None, &[]).await
    }
}

/// `createTestEvent(overrides)`.
fn event(overrides: Value) -> PluginEvent {
    let url =
        overrides.pointer("/properties/$current_url").and_then(Value::as_str).unwrap_or("http://example.com/foo/");
    let mut base = json!({
        "distinct_id": "my_id", "ip": "127.0.0.1", "site_url": url, "team_id": TEAM_ID,
        "now": "2021-10-01T00:00:00.000Z", "event": "$pageview", "properties": {"$current_url": url},
    });
    for (key, value) in overrides.as_object().cloned().unwrap_or_default() {
        base[key] = value;
    }
    serde_json::from_value(base).expect("test event")
}

fn props(properties: Value) -> PluginEvent {
    event(json!({ "properties": properties }))
}

/// The property values every operator test runs against, in the reference's order:
/// bar, bar+pol, baR, baz, barabara, rabarbar, 7, (nothing), fig 999, true, null.
fn standard_values() -> Vec<Value> {
    vec![
        json!({"foo": "bar"}),
        json!({"foo": "bar", "pol": "pot"}),
        json!({"foo": "baR"}),
        json!({"foo": "baz"}),
        json!({"foo": "barabara"}),
        json!({"foo": "rabarbar"}),
        json!({"foo": 7}),
        Value::Null,
        json!({"fig": 999}),
        json!({"foo": true}),
        json!({"foo": null}),
    ]
}

fn standard_events() -> Vec<PluginEvent> {
    standard_values()
        .into_iter()
        .map(|properties| if properties.is_null() { event(json!({})) } else { props(properties) })
        .collect()
}

/// Runs every standard event and compares the matched action ids with `expected` (one list per event).
async fn expect_standard(ctx: &Ctx, expected: &[&[i64]]) {
    for (index, (event, expected)) in standard_events().iter().zip(expected).enumerate() {
        assert_eq!(ctx.ids_for(event).await, expected.to_vec(), "standard event #{index}: {:?}", event.properties);
    }
}

fn filter(kind: &str, key: &str, value: Value, operator: Option<&str>) -> Value {
    let mut filter = json!({"type": kind, "key": key, "value": value});
    if let Some(operator) = operator {
        filter["operator"] = json!(operator);
    }
    filter
}

fn with_filters(filters: Value) -> Value {
    json!([{ "properties": filters }])
}

#[tokio::test]
async fn returns_no_match_if_action_has_no_steps() {
    let ctx = Ctx::new().await;
    ctx.action(json!([])).await;
    assert!(ctx.ids_for(&event(json!({}))).await.is_empty());
}

#[tokio::test]
async fn event_property_operator_exact() {
    let ctx = Ctx::new().await;
    let exact = ctx.action(with_filters(json!([filter("event", "foo", json!("bar"), Some("exact"))]))).await.id;
    let undefined = ctx.action(with_filters(json!([filter("event", "foo", json!("bar"), None)]))).await.id;
    let both: &[i64] = &[exact, undefined];
    expect_standard(&ctx, &[both, both, &[], &[], &[], &[], &[], &[], &[], &[], &[]]).await;
}

#[tokio::test]
async fn event_property_operator_is_not() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([filter("event", "foo", json!("bar"), Some("is_not"))]))).await.id;
    let yes: &[i64] = &[a];
    expect_standard(&ctx, &[&[], &[], yes, yes, yes, yes, yes, yes, yes, yes, yes]).await;
}

#[tokio::test]
async fn event_property_operator_contains() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([filter("event", "foo", json!("bar"), Some("icontains"))]))).await.id;
    let yes: &[i64] = &[a];
    expect_standard(&ctx, &[yes, yes, yes, &[], yes, yes, &[], &[], &[], &[], &[]]).await;
}

#[tokio::test]
async fn event_property_operator_does_not_contain() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([filter("event", "foo", json!("bar"), Some("not_icontains"))]))).await.id;
    let yes: &[i64] = &[a];
    expect_standard(&ctx, &[&[], &[], &[], yes, &[], &[], yes, yes, yes, yes, yes]).await;
}

#[tokio::test]
async fn event_property_operator_regex() {
    let ctx = Ctx::new().await;
    let r1 = ctx.action(with_filters(json!([filter("event", "foo", json!("^bar"), Some("regex"))]))).await.id;
    let r2 =
        ctx.action(with_filters(json!([filter("event", "foo", json!("(?:.+bar|[A-Z])"), Some("regex"))]))).await.id;
    expect_standard(&ctx, &[&[r1], &[r1], &[r2], &[], &[r1, r2], &[r2], &[], &[], &[], &[], &[]]).await;
}

#[tokio::test]
async fn event_property_operator_not_regex() {
    let ctx = Ctx::new().await;
    let r1 = ctx.action(with_filters(json!([filter("event", "foo", json!("^bar"), Some("not_regex"))]))).await.id;
    let r2 =
        ctx.action(with_filters(json!([filter("event", "foo", json!("(?:.+bar|[A-Z])"), Some("not_regex"))]))).await.id;
    let both: &[i64] = &[r1, r2];
    expect_standard(&ctx, &[&[r2], &[r2], &[r1], both, &[], &[r1], both, both, both, both, both]).await;
}

#[tokio::test]
async fn event_property_operator_is_set() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([{"type": "event", "key": "foo", "operator": "is_set"}]))).await.id;
    let yes: &[i64] = &[a];
    expect_standard(&ctx, &[yes, yes, yes, yes, yes, yes, yes, &[], &[], yes, yes]).await;
}

#[tokio::test]
async fn event_property_operator_is_not_set() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([{"type": "event", "key": "foo", "operator": "is_not_set"}]))).await.id;
    let yes: &[i64] = &[a];
    expect_standard(&ctx, &[&[], &[], &[], &[], &[], &[], &[], yes, yes, &[], &[]]).await;
}

/// bar, bar+pol, baR, baz, barabara, rabarbar, -1, 5, 9999999, (nothing), fig 999, true, null.
fn numeric_events() -> Vec<PluginEvent> {
    let mut events = standard_events();
    let tail = events.split_off(6);
    events.extend([props(json!({"foo": -1})), props(json!({"foo": 5})), props(json!({"foo": 9999999}))]);
    events.extend(tail.into_iter().skip(1));
    events
}

#[tokio::test]
async fn event_property_operator_greater_than() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([filter("event", "foo", json!(5), Some("gt"))]))).await.id;
    let expected: [&[i64]; 13] = [&[], &[], &[], &[], &[], &[], &[], &[], &[a], &[], &[], &[], &[]];
    for (event, expected) in numeric_events().iter().zip(expected) {
        assert_eq!(ctx.ids_for(event).await, expected.to_vec(), "{:?}", event.properties);
    }
}

#[tokio::test]
async fn event_property_operator_less_than() {
    let ctx = Ctx::new().await;
    let a = ctx.action(with_filters(json!([filter("event", "foo", json!(5), Some("lt"))]))).await.id;
    // true is a 1
    let expected: [&[i64]; 13] = [&[], &[], &[], &[], &[], &[], &[a], &[], &[], &[], &[], &[a], &[]];
    for (event, expected) in numeric_events().iter().zip(expected) {
        assert_eq!(ctx.ids_for(event).await, expected.to_vec(), "{:?}", event.properties);
    }
}

fn at_url(url: &str) -> PluginEvent {
    props(json!({ "$current_url": url }))
}

#[tokio::test]
async fn url_contains_page_view() {
    let ctx = Ctx::new().await;
    let a = ctx.action(json!([{"url": "example.com", "url_matching": "contains", "event": "$pageview"}])).await.id;
    let b = ctx.action(json!([{"url": "example.com", "url_matching": "", "event": "$pageview"}])).await.id;
    assert_eq!(ctx.ids_for(&at_url("http://posthog.com/pricing")).await, Vec::<i64>::new());
    assert_eq!(ctx.ids_for(&at_url("https://example.com/")).await, vec![a, b]);
}

#[tokio::test]
async fn url_contains_page_views_with_percent_and_underscore() {
    let ctx = Ctx::new().await;
    let a =
        ctx.action(json!([{"url": "exampl_.com/%.html", "url_matching": "contains", "event": "$pageview"}])).await.id;
    let b = ctx.action(json!([{"url": "exampl_.com/%.html", "url_matching": "", "event": "$pageview"}])).await.id;
    assert_eq!(ctx.ids_for(&at_url("https://example.com/")).await, Vec::<i64>::new());
    assert_eq!(ctx.ids_for(&at_url("https://example.com/index.html")).await, vec![a, b]);
}

#[tokio::test]
async fn url_matches_regex_page_views() {
    let ctx = Ctx::new().await;
    let a = ctx
        .action(json!([{
            "url": r"^https?:\/\/example\.com\/\d+(\/[a-r]*\/?)?$", "url_matching": "regex", "event": "$pageview",
        }]))
        .await
        .id;
    for ok in ["https://example.com/23/hello", "https://example.com/3/abc/"] {
        assert_eq!(ctx.ids_for(&at_url(ok)).await, vec![a], "{ok}");
    }
    for bad in [
        "https://example.com/3/xyz/",
        "https://example.com/",
        "https://example.com/uno/dos/",
        "https://example.com/1foo/",
    ] {
        assert_eq!(ctx.ids_for(&at_url(bad)).await, Vec::<i64>::new(), "{bad}");
    }
}

#[tokio::test]
async fn url_matches_exactly_page_views() {
    let ctx = Ctx::new().await;
    let a = ctx
        .action(json!([{"url": "https://www.mozilla.org/de/", "url_matching": "exact", "event": "$pageview"}]))
        .await
        .id;
    assert_eq!(ctx.ids_for(&at_url("https://www.mozilla.org/de/")).await, vec![a]);
    assert_eq!(ctx.ids_for(&at_url("https://www.mozilla.org/de")).await, Vec::<i64>::new());
    assert_eq!(ctx.ids_for(&at_url("https://www.mozilla.org/de/firefox/")).await, Vec::<i64>::new());
}

#[tokio::test]
async fn exact_event_name() {
    let ctx = Ctx::new().await;
    let a = ctx.action(json!([{"event": "meow"}])).await.id;
    assert_eq!(ctx.ids_for(&event(json!({"event": "meow"}))).await, vec![a]);
    assert_eq!(ctx.ids_for(&event(json!({"event": "$meow"}))).await, Vec::<i64>::new());
    assert_eq!(ctx.ids_for(&event(json!({"event": "WOOF"}))).await, Vec::<i64>::new());
}

#[tokio::test]
async fn exact_event_name_and_url_contains() {
    let ctx = Ctx::new().await;
    let a = ctx.action(json!([{"event": "meow", "url_matching": "contains", "url": "pets.com/"}])).await.id;
    let at = |name: &str, url: &str| event(json!({"event": name, "properties": {"$current_url": url}}));
    assert_eq!(ctx.ids_for(&at("meow", "http://www.pets.com/")).await, vec![a]);
    assert_eq!(ctx.ids_for(&at("meow", "https://pets.com/food")).await, vec![a]);
    assert_eq!(ctx.ids_for(&at("$meow", "https://xyz.pets.com/")).await, Vec::<i64>::new());
    assert_eq!(ctx.ids_for(&at("meow", "https://www.pets.com.de/")).await, Vec::<i64>::new());
    assert_eq!(ctx.ids_for(&at("meow", "https://www.pets.co")).await, Vec::<i64>::new());
}

#[tokio::test]
async fn person_property_operator_exact() {
    let ctx = Ctx::new().await;
    let exact = ctx.action(with_filters(json!([filter("person", "foo", json!("bar"), Some("exact"))]))).await.id;
    let undefined = ctx.action(with_filters(json!([filter("person", "foo", json!("bar"), None)]))).await.id;
    let event = event(json!({}));
    let expected: [&[i64]; 11] =
        [&[exact, undefined], &[exact, undefined], &[], &[], &[], &[], &[], &[], &[], &[], &[]];
    for (properties, expected) in standard_values().into_iter().zip(expected) {
        let person = test_person(if properties.is_null() { json!({}) } else { properties.clone() });
        assert_eq!(ctx.ids(&event, Some(&person), &[]).await, expected.to_vec(), "{properties}");
    }
}

async fn create_cohort(pool: &PgPool, is_static: bool) -> i32 {
    sqlx::query_scalar(
        "INSERT INTO posthog_cohort (name, deleted, groups, team_id, created_at, created_by_id, is_calculating,
            errors_calculating, is_static) VALUES ('Test', false, '[]', $1, now(), $2, false, 0, $3) RETURNING id",
    )
    .bind(TEAM_ID)
    .bind(COMMON_USER_ID)
    .bind(is_static)
    .fetch_one(pool)
    .await
    .expect("create cohort")
}

#[tokio::test]
async fn cohort_match() {
    let ctx = Ctx::new().await;
    let pool = &ctx.db.pool;
    let cohort = create_cohort(pool, false).await;
    let in_cohort = ctx.action(with_filters(json!([{"type": "cohort", "key": "id", "value": cohort}]))).await.id;
    let all_users = ctx.action(with_filters(json!([{"type": "cohort", "key": "id", "value": "all"}]))).await.id;
    let person_id = create_person(pool, "cohort", true).await.id;
    create_person(pool, "random", true).await;
    sqlx::query("INSERT INTO posthog_cohortpeople (cohort_id, person_id) VALUES ($1, $2)")
        .bind(cohort)
        .bind(person_id)
        .execute(pool)
        .await
        .expect("add to cohort");

    for (distinct_id, expected) in
        [("cohort", vec![in_cohort, all_users]), ("random", vec![all_users]), ("unknown", vec![all_users])]
    {
        let event = event(json!({"event": "meow", "distinct_id": distinct_id}));
        let person = fetch_person(pool, distinct_id).await;
        assert_eq!(ctx.ids(&event, person.as_ref(), &[]).await, expected, "{distinct_id}");
    }
}

/// Stands in for ClickHouse's person_static_cohort: answers from a script, then "no".
struct ScriptedStaticCohorts(std::sync::Mutex<Vec<bool>>);

#[async_trait]
impl StaticCohortLookup for ScriptedStaticCohorts {
    async fn is_in_static_cohort(&self, _team_id: i64, _cohort_id: i64, _person_uuid: Uuid) -> Result<bool, BoxError> {
        let mut answers = self.0.lock().map_err(|error| error.to_string())?;
        Ok(if answers.is_empty() { false } else { answers.remove(0) })
    }
}

#[tokio::test]
async fn clickhouse_static_cohort_match() {
    let db = TestDb::empty().await;
    common::reset_test_database(&db.pool, None, false).await;
    let mut ctx = Ctx::on(db).await;
    let lookup = Arc::new(ScriptedStaticCohorts(std::sync::Mutex::new(vec![true, false])));
    ctx.matcher = ActionMatcher::new(ctx.db.pool.clone(), ctx.manager.clone()).with_static_cohorts(lookup);
    let cohort = create_cohort(&ctx.db.pool, true).await;
    let a = ctx.action(with_filters(json!([{"type": "cohort", "key": "id", "value": cohort}]))).await.id;
    create_person(&ctx.db.pool, "static_cohort_person", true).await;
    let event = event(json!({"event": "trigger a webhook", "distinct_id": "static_cohort_person"}));
    let person = fetch_person(&ctx.db.pool, "static_cohort_person").await;
    assert_eq!(ctx.ids(&event, person.as_ref(), &[]).await, vec![a]);
    assert_eq!(ctx.ids(&event, person.as_ref(), &[]).await, Vec::<i64>::new());
}

/// The same path through the ClickHouse client against a stand-in for ClickHouse's HTTP interface:
/// a row (RowBinary `0x01`) matches without Postgres; no row falls through to posthog_cohortpeople
/// (no row there → no match); a ClickHouse exception makes the step fail (no match), as a throwing
/// query does in the reference.
#[tokio::test]
async fn clickhouse_static_cohort_over_http() {
    let mut ctx = Ctx::new().await;
    let cohort = create_cohort(&ctx.db.pool, true).await;
    let a = ctx.action(with_filters(json!([{"type": "cohort", "key": "id", "value": cohort}]))).await.id;
    let person = create_person(&ctx.db.pool, "static_cohort_person", true).await;
    let event = event(json!({"event": "trigger a webhook", "distinct_id": "static_cohort_person"}));
    for (status, body, expected) in [
        (200, &b"\x01"[..], vec![a]),
        (200, &b""[..], vec![]),
        (500, &b"Code: 60. DB::Exception: Table posthog_test.person_static_cohort doesn't exist"[..], vec![]),
    ] {
        let (address, mut requests) = http_stub("127.0.0.1:0", move |_| (status, body.to_vec())).await;
        let clickhouse = ClickHouse::new(&ClickHouseSettings {
            url: format!("http://{address}"),
            database: "posthog_test".into(),
            user: "default".into(),
            password: Some("pw".into()),
            ca: None,
        })
        .unwrap();
        let lookup = Arc::new(ClickHouseStaticCohorts::new(clickhouse));
        ctx.matcher = ActionMatcher::new(ctx.db.pool.clone(), ctx.manager.clone()).with_static_cohorts(lookup);
        assert_eq!(ctx.ids(&event, Some(&person), &[]).await, expected, "status {status}");
        let request = next_request(&mut requests).await;
        assert_eq!(request.query_param("database").as_deref(), Some("posthog_test"));
        assert_eq!(request.header("X-ClickHouse-User"), Some("default"));
        assert_eq!(request.header("X-ClickHouse-Key"), Some("pw"));
        let query = format!(
            "SELECT 1 FROM person_static_cohort WHERE team_id = 2 AND cohort_id = {cohort} AND person_id = '{}' \
             LIMIT 1 FORMAT RowBinary",
            person.uuid
        );
        assert_eq!(request.query_param("query"), Some(query));
    }
}

fn element(tag: &str) -> Element {
    Element { tag_name: Some(tag.into()), ..Element::default() }
}

fn with_class(tag: &str, class: &str) -> Element {
    Element { attr_class: Some(vec![class.into()]), ..element(tag) }
}

fn with_href(tag: &str, href: &str) -> Element {
    Element { href: Some(href.into()), ..element(tag) }
}

fn with_text(element: Element, text: &str) -> Element {
    Element { text: Some(text.into()), ..element }
}

#[tokio::test]
async fn element_href_equals() {
    let ctx = Ctx::new().await;
    let a = ctx.action(json!([{"href": "https://example.com/"}])).await.id;
    let event = event(json!({}));
    let outer = [with_class("h1", "headline"), with_href("a", "https://example.com/"), element("main")];
    let inner = [with_href("a", "https://example.com/"), with_class("h1", "headline"), element("main")];
    let none = [element("span"), with_class("h1", "headline"), element("main")];
    assert_eq!(ctx.ids(&event, None, &outer).await, vec![a]);
    assert_eq!(ctx.ids(&event, None, &inner).await, vec![a]);
    assert_eq!(ctx.ids(&event, None, &none).await, Vec::<i64>::new());
}

#[tokio::test]
async fn element_text_and_tag_name_equals() {
    let ctx = Ctx::new().await;
    let a = ctx.action(json!([{"tag_name": "h1", "text": "Hallo!"}])).await.id;
    let event = event(json!({}));
    let link = with_href("a", "https://example.com/");
    let proper = [with_text(with_class("h1", "headline"), "Hallo!"), link.clone(), element("main")];
    let wrong_tag = [with_text(with_class("h3", "headline"), "Hallo!"), link.clone(), element("main")];
    let wrong_text = [with_text(with_class("h3", "headline"), "Auf Wiedersehen!"), link.clone(), element("main")];
    let wrong_level =
        [with_text(with_class("i", "headline"), "Auf Wiedersehen!"), element("h1"), link.clone(), element("main")];
    assert_eq!(ctx.ids(&event, None, &proper).await, vec![a]);
    assert_eq!(ctx.ids(&event, None, &wrong_tag).await, Vec::<i64>::new());
    assert_eq!(ctx.ids(&event, None, &wrong_text).await, Vec::<i64>::new());
    assert_eq!(ctx.ids(&event, None, &wrong_level).await, Vec::<i64>::new());
}

#[tokio::test]
async fn element_selector() {
    let ctx = Ctx::new().await;
    let any_descendant = ctx.action(json!([{"selector": "main h1.headline"}])).await.id;
    let direct_descendant = ctx.action(json!([{"selector": "main > h1.headline"}])).await.id;
    let direct_href = ctx.action(json!([{"selector": "main > a[href=\"https://example.com/\"]"}])).await.id;
    let array_prop = ctx
        .action(with_filters(json!([{"type": "element", "key": "selector", "value": ["main h1.headline"]}])))
        .await
        .id;
    ctx.action(with_filters(json!([{"type": "element", "key": "selector", "value": ""}]))).await;
    ctx.action(with_filters(json!([{"type": "element", "key": "selector", "value": null}]))).await;

    let event = event(json!({}));
    let headline = with_text(with_class("h1", "headline"), "Hallo!");
    let link = with_href("a", "https://example.com/");
    let proper_nondirect = [headline.clone(), link.clone(), element("main")];
    let wrong_class_nondirect = [with_text(with_class("h1", "oof"), "Hallo!"), link, element("main")];
    let proper_direct = [headline, element("main")];
    assert_eq!(ctx.ids(&event, None, &proper_nondirect).await, vec![any_descendant, direct_href, array_prop]);
    assert_eq!(ctx.ids(&event, None, &wrong_class_nondirect).await, vec![direct_href]);
    assert_eq!(ctx.ids(&event, None, &proper_direct).await, vec![any_descendant, direct_descendant, array_prop]);
}

#[tokio::test]
async fn filter_value_casting_with_multiple_match_groups() {
    let ctx = Ctx::new().await;
    let a = ctx
        .action(json!([
            {"event": "tenet"},
            {"properties": [
                {"key": "insight", "type": "event", "value": ["STICKINESS"], "operator": "exact"},
                {"key": "total_event_action_filters_count", "type": "event", "value": "0", "operator": "exact"},
                {"key": "total_event_actions_count", "type": "event", "value": "0", "operator": "gt"},
            ]},
        ]))
        .await
        .id;
    let event = event(json!({
        "event": "meow",
        "properties": {"insight": "STICKINESS", "total_event_action_filters_count": 0, "total_event_actions_count": 4},
    }));
    assert_eq!(ctx.ids_for(&event).await, vec![a]);
}

// #checkElementsAgainstSelector()

fn selector_check(elements: &[Element], selector: &str) -> bool {
    elements_match_selector(elements, selector)
}

#[test]
fn selector_with_attribute() {
    let mut h1 = with_class("h1", "headline");
    h1.attributes = json!({"attr__data-attr": "xyz"}).as_object().cloned();
    let elements = [h1, with_class("div", "top"), element("div"), element("main")];
    for ok in [
        "[data-attr='xyz']",
        "h1[data-attr='xyz']",
        ".headline[data-attr='xyz']",
        "main [data-attr='xyz']",
        ".top [data-attr='xyz']",
    ] {
        assert!(selector_check(&elements, ok), "{ok}");
    }
    for bad in ["[data-attr='foo']", "main[data-attr='xyz']", "div[data-attr='xyz']"] {
        assert!(!selector_check(&elements, bad), "{bad}");
    }
}

#[test]
fn selector_any_descendant() {
    let elements = [with_class("h1", "headline"), with_class("div", "top"), element("main")];
    for ok in ["main h1", "main .headline", "main div", "main .top", "div h1", "div .headline"] {
        assert!(selector_check(&elements, ok), "{ok}");
    }
    for bad in ["h1 div", ".top main"] {
        assert!(!selector_check(&elements, bad), "{bad}");
    }
}

#[test]
fn selector_direct_descendant() {
    let elements = [with_class("h1", "headline"), with_class("div", "top"), element("main")];
    for ok in ["main > .top > h1", "main > div", "main > .top", "div > h1", "div > .headline"] {
        assert!(selector_check(&elements, ok), "{ok}");
    }
    for bad in ["main > h1", "main > .headline", "h1 > div", ".top > main"] {
        assert!(!selector_check(&elements, bad), "{bad}");
    }
}

#[test]
fn selector_direct_descendant_edge_cases_1() {
    let elements =
        [with_class("h1", "headline"), with_class("div", "inner"), with_class("div", "outer"), element("main")];
    for ok in ["main > .outer > .inner > h1", "main > div", "main > .outer", "div > h1", ".inner > .headline"] {
        assert!(selector_check(&elements, ok), "{ok}");
    }
    for bad in ["main > h1", "main > .inner", "main > .inner > h1", "main > .outer > h1", "h1 > div", "outer > main"] {
        assert!(!selector_check(&elements, bad), "{bad}");
    }
}

#[test]
fn selector_direct_descendant_edge_cases_2() {
    let elements: Vec<Element> =
        ["span", "div", "a", "div", "div", "aside", "section"].into_iter().map(element).collect();
    assert!(selector_check(&elements, "aside div > span"));
}

#[test]
fn selector_direct_descendant_edge_cases_3() {
    let span = Element { nth_child: Some(2), nth_of_type: Some(1), ..element("span") };
    let elements = [span, element("section")];
    assert!(selector_check(&elements, "section > span:nth-child(2):nth-of-type(1)"));
    assert!(!selector_check(&elements, "section > span:nth-child(1):nth-of-type(1)"));
    assert!(!selector_check(&elements, "section > span:nth-child(2):nth-of-type(3)"));
}

// castingCompare

/// Asserts `castingCompare(a, b, operator) == expected` for every pair.
fn expect_compare(operator: CastingOperator, expected: bool, pairs: &[(Value, Value)]) {
    for (a, b) in pairs {
        assert_eq!(casting_compare(Some(a), Some(b), operator), expected, "{a} {operator:?} {b}");
    }
}

#[test]
fn casting_compare_exact() {
    let pairs =
        [(json!(2), json!("2")), (json!("2"), json!(2)), (json!(true), json!("true")), (json!(true), json!(true))];
    expect_compare(CastingOperator::Exact, true, &pairs);
    expect_compare(CastingOperator::Exact, true, &[(json!("90"), json!("90")), (json!("1"), json!(true))]);
    let pairs = [
        (json!("1"), json!("true")),
        (json!("1"), json!(false)),
        (json!(false), json!("1")),
        (json!(false), json!("true")),
    ];
    expect_compare(CastingOperator::Exact, false, &pairs);
}

#[test]
fn casting_compare_less_than() {
    let pairs =
        [(json!(2), json!("2")), (json!("2"), json!(2)), (json!("1"), json!("true")), (json!(true), json!("true"))];
    expect_compare(CastingOperator::LessThan, false, &pairs);
    let pairs =
        [(json!(true), json!(true)), (json!("90"), json!("90")), (json!("1"), json!(true)), (json!("1"), json!(false))];
    expect_compare(CastingOperator::LessThan, false, &pairs);
    expect_compare(CastingOperator::Exact, false, &[(json!("0"), json!("true"))]);
    let pairs = [
        (json!(false), json!("1")),
        (json!(false), json!("true")),
        (json!("2"), json!(3)),
        (json!("445.3"), json!(9099.2)),
    ];
    expect_compare(CastingOperator::LessThan, true, &pairs);
}

#[test]
fn casting_compare_greater_than() {
    let pairs =
        [(json!(2), json!("2")), (json!("2"), json!(2)), (json!("1"), json!("true")), (json!(true), json!("true"))];
    expect_compare(CastingOperator::GreaterThan, false, &pairs);
    let pairs = [(json!(true), json!(true)), (json!("90"), json!("90")), (json!("1"), json!(true))];
    expect_compare(CastingOperator::GreaterThan, false, &pairs);
    let pairs = [
        (json!(false), json!("1")),
        (json!(false), json!("true")),
        (json!("2"), json!(3)),
        (json!("445.3"), json!(9099.2)),
    ];
    expect_compare(CastingOperator::GreaterThan, false, &pairs);
    expect_compare(CastingOperator::Exact, false, &[(json!("1"), json!("false"))]);
    let pairs =
        [(json!("1"), json!(false)), (json!(true), json!("-1")), (json!(1), json!("false")), (json!(333), json!("2"))];
    expect_compare(CastingOperator::GreaterThan, true, &pairs);
    expect_compare(CastingOperator::GreaterThan, true, &[(json!("9032.3"), json!(-1.2))]);
}
