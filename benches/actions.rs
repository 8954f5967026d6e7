//! Micro-benchmarks for the actions room: the elements hash and chain of a typical autocapture
//! event, and matching one event against 50 actions of a team (URL contains/regex, property
//! filters with casting, selectors) loaded from a real Postgres (127.0.0.1:5432, as the tests).
//!
//! Run: `cargo bench --bench actions`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use plugin_server::event::PluginEvent;
use plugin_server::ingestion::actions::{ActionManager, ActionMatcher};
use plugin_server::ingestion::elements::{elements_hash, elements_to_chain, extract_elements, Element};
use serde_json::{json, Value};

fn autocapture_elements() -> Vec<Element> {
    let raw: Vec<Value> = (0..10)
        .map(|depth| {
            json!({
                "tag_name": if depth == 0 { "button" } else { "div" },
                "$el_text": if depth == 0 { "Sign up – it's free 💻" } else { "" },
                "attr__class": format!("level-{depth} flex items-center"),
                "attr__data-attr": format!("node-{depth}"),
                "attr__href": "/signup?from=landing",
                "nth_child": depth + 1,
                "nth_of_type": 1,
            })
        })
        .collect();
    extract_elements(&raw)
}

fn elements(c: &mut Criterion) {
    let elements = autocapture_elements();
    c.bench_function("elements_hash (10 elements)", |b| b.iter(|| elements_hash(&elements)));
    c.bench_function("elements_to_chain (10 elements)", |b| b.iter(|| elements_to_chain(&elements)));
}

/// 50 actions: every fifth kind of step, all for team 2.
async fn insert_actions(pool: &sqlx::PgPool) {
    for id in 0..50 {
        let (url, url_matching, selector, properties) = match id % 5 {
            0 => (Some("example.com/%/pricing"), Some("contains"), None, json!([])),
            1 => (Some(r"^https?://example\.com/\d+/"), Some("regex"), None, json!([])),
            2 => (
                None,
                None,
                None,
                json!([{"type": "event", "key": "plan", "value": ["pro", "team"], "operator": "exact"}]),
            ),
            3 => (None, None, Some("div.level-3 > div > button"), json!([])),
            _ => (
                None,
                None,
                None,
                json!([{"type": "event", "key": "price", "value": "10", "operator": "gt"},
                                           {"type": "event", "key": "$browser", "value": "chr", "operator": "icontains"}]),
            ),
        };
        sqlx::query("INSERT INTO posthog_action (id, team_id, name) VALUES ($1, 2, 'bench')")
            .bind(id)
            .execute(pool)
            .await
            .expect("action");
        sqlx::query(
            "INSERT INTO posthog_actionstep (id, action_id, url, url_matching, selector, event, properties)
             VALUES ($1, $1, $2, $3, $4, '$autocapture', $5)",
        )
        .bind(id)
        .bind(url)
        .bind(url_matching)
        .bind(selector)
        .bind(properties)
        .execute(pool)
        .await
        .expect("step");
    }
}

fn matching(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (db, matcher) = runtime.block_on(async {
        let db = common::TestDb::empty().await;
        common::reset_test_database(&db.pool, None, false).await;
        insert_actions(&db.pool).await;
        let manager = Arc::new(ActionManager::new(db.pool.clone()));
        manager.prepare().await.expect("prepare");
        let matcher = ActionMatcher::new(db.pool.clone(), manager);
        (db, matcher)
    });
    let event: PluginEvent = serde_json::from_value(json!({
        "distinct_id": "bench", "team_id": 2, "now": "2021-10-01T00:00:00.000Z", "event": "$autocapture",
        "site_url": "https://example.com",
        "properties": {"$current_url": "https://example.com/42/pricing", "plan": "team", "price": 12, "$browser": "Chrome"},
    }))
    .expect("event");
    let elements = autocapture_elements();
    let matched = runtime.block_on(matcher.matches(&event, None, &elements)).expect("match").len();
    assert_eq!(matched, 50, "every bench action should match");
    c.bench_function("ActionMatcher::matches (50 actions, all match)", |b| {
        b.to_async(&runtime).iter(|| matcher.matches(&event, None, &elements))
    });
    drop(db);
}

criterion_group!(benches, elements, matching);
criterion_main!(benches);
