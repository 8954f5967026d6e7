//! Differential check of event property filters against the reference's
//! `checkPropertiesAgainstFilter` run in Node: 1500 recorded cases of random properties (every
//! JSON type, absent keys), operators (all ten, unknown, empty, null, missing), and values
//! (scalars, arrays, objects, missing, regular expressions including an invalid one). The oracle
//! used JavaScript's RegExp where the reference uses RE2; the patterns were chosen to behave the
//! same in both. A step that throws counts as no match, as in the reference.

use std::sync::Arc;

use plugin_server::event::PluginEvent;
use plugin_server::ingestion::actions::{Action, ActionManager, ActionMatcher, ActionStep};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;

fn action_with_filter(filter: &Value) -> Action {
    let step = ActionStep { id: 1, action_id: 1, properties: Some(json!([filter])), ..ActionStep::default() };
    Action { id: 1, team_id: 2, name: Some("filter".into()), steps: vec![step], ..Action::default() }
}

#[tokio::test]
async fn property_filters_agree_with_the_reference() {
    // Event filters never touch the database; the pool is never connected.
    let pool = PgPoolOptions::new().connect_lazy("postgres://postgres@127.0.0.1:1/unused").expect("lazy pool");
    let matcher = ActionMatcher::new(pool.clone(), Arc::new(ActionManager::new(pool)));
    let cases: Vec<(Value, Value, bool)> =
        serde_json::from_str(include_str!("actions_support/property_cases.json")).expect("recorded cases");
    assert_eq!(cases.len(), 1500);
    let mut mismatches = Vec::new();
    for (properties, filter, expected) in &cases {
        let event: PluginEvent = serde_json::from_value(json!({
            "distinct_id": "d", "team_id": 2, "now": "2021-10-01T00:00:00.000Z", "event": "e", "properties": properties,
        }))
        .expect("event");
        let matched = matcher.check_action(&event, None, &[], &action_with_filter(filter)).await;
        if matched != *expected {
            mismatches.push(format!("{properties} with {filter}: expected {expected}"));
        }
    }
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}
