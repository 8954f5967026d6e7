//! Port of the reference's shared process-event suite (tests/shared/process-event.ts) and the
//! Postgres-only cases (tests/postgres/process-event.test.ts), against real Postgres, one
//! database per test.

mod common;
mod ingest_support;

use chrono::{DateTime, Duration, Utc};
use ingest_support::{EventRow, Harness};
use plugin_server::db::persons::{self, PersonUpdate};
use plugin_server::ingestion::uuidt::new_uuidt;
use serde_json::{json, Value};

use common::TEAM_ID;

const TEAM: i64 = TEAM_ID as i64;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).expect("timestamp").with_timezone(&Utc)
}

fn uuid() -> Option<String> {
    Some(new_uuidt().to_string())
}

async fn only_event(harness: &Harness) -> EventRow {
    let events = harness.events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    events.into_iter().next().expect("one event")
}

#[tokio::test]
async fn merge_people() {
    let harness = Harness::new().await;
    let p0 = harness.create_person(TEAM_ID, &["person_0"], json!({"$os": "Microsoft"})).await;
    let mut connection = harness.pool().acquire().await.unwrap();
    let p0 = persons::update_person(
        &mut connection,
        &p0,
        &PersonUpdate { created_at: Some(at("2020-01-01T00:00:00Z")), ..PersonUpdate::default() },
    )
    .await
    .unwrap();
    let p1 = harness.create_person(TEAM_ID, &["person_1"], json!({"$os": "Chrome", "$browser": "Chrome"})).await;
    let p1 = persons::update_person(
        &mut connection,
        &p1,
        &PersonUpdate { created_at: Some(at("2019-07-01T00:00:00Z")), ..PersonUpdate::default() },
    )
    .await
    .unwrap();
    drop(connection);
    harness.process_simple("person_1", json!({"event": "user signed up", "properties": {}})).await.unwrap();
    assert_eq!(harness.persons().await.len(), 2);

    harness.processor.merge_people(&p0, "person_0", &p1, "person_1").await.unwrap();

    let persons = harness.persons().await;
    assert_eq!(persons.len(), 1);
    assert_eq!(Value::Object(persons[0].properties.clone()), json!({"$os": "Microsoft", "$browser": "Chrome"}));
    assert_eq!(harness.distinct_ids(&persons[0]).await, ["person_0", "person_1"]);
    assert_eq!(persons[0].created_at, at("2019-07-01T00:00:00Z"));
}

fn autocapture_elements() -> Value {
    json!([
        {"tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm"},
        {"tag_name": "div", "nth_child": 1, "nth_of_type": 2, "$el_text": "💻"}
    ])
}

#[tokio::test]
async fn capture_new_person() {
    let harness = Harness::new().await;
    assert!(harness.event_definitions().await.is_empty());
    assert!(harness.property_definitions().await.is_empty());
    let now = Utc::now();
    let first = json!({"event": "$autocapture", "properties": {
        "distinct_id": 2, "token": "THIS IS NOT A TOKEN FOR TEAM 2", "$browser": "Chrome",
        "$current_url": "https://test.com", "$os": "Mac OS X", "$browser_version": false,
        "$initial_referring_domain": "https://google.com", "$initial_referrer_url": "https://google.com/?q=posthog",
        "utm_medium": "twitter", "gclid": "GOOGLE ADS ID", "$elements": autocapture_elements()
    }});
    harness.process("2", Some("127.0.0.1"), first, TEAM, now, Some(now), uuid()).await.unwrap();

    let persons = harness.persons().await;
    assert_eq!(
        Value::Object(persons[0].properties.clone()),
        json!({
            "$initial_browser": "Chrome", "$initial_browser_version": false, "$initial_utm_medium": "twitter",
            "$initial_current_url": "https://test.com", "$initial_os": "Mac OS X", "utm_medium": "twitter",
            "$initial_gclid": "GOOGLE ADS ID", "gclid": "GOOGLE ADS ID"
        })
    );
    let events = harness.events().await;
    assert_eq!(
        events[0].properties,
        json!({
            "$ip": "127.0.0.1", "$os": "Mac OS X", "$set": {"utm_medium": "twitter", "gclid": "GOOGLE ADS ID"},
            "token": "THIS IS NOT A TOKEN FOR TEAM 2", "$browser": "Chrome",
            "$set_once": {
                "$initial_os": "Mac OS X", "$initial_browser": "Chrome", "$initial_utm_medium": "twitter",
                "$initial_current_url": "https://test.com", "$initial_browser_version": false,
                "$initial_gclid": "GOOGLE ADS ID"
            },
            "utm_medium": "twitter", "distinct_id": 2, "$current_url": "https://test.com", "$browser_version": false,
            "gclid": "GOOGLE ADS ID", "$initial_referrer_url": "https://google.com/?q=posthog",
            "$initial_referring_domain": "https://google.com"
        })
    );

    let second = json!({"event": "$autocapture", "properties": {
        "distinct_id": 2, "token": "THIS IS NOT A TOKEN FOR TEAM 2", "utm_medium": "instagram",
        "$current_url": "https://test.com/pricing", "$browser_version": 80, "$browser": "Firefox",
        "$elements": autocapture_elements()
    }});
    let now = Utc::now();
    harness.process("2", Some("127.0.0.1"), second, TEAM, now, Some(now), uuid()).await.unwrap();
    let events = harness.events().await;
    let persons = harness.persons().await;
    assert_eq!(events.len(), 2);
    assert_eq!(persons.len(), 1);
    assert_eq!(persons[0].properties["utm_medium"], json!("instagram"));
    assert_eq!(persons[0].properties["$initial_browser"], json!("Chrome"));
    assert_eq!(persons[0].properties["$initial_browser_version"], json!(false));
    assert_eq!(events[1].properties["$set"], json!({"utm_medium": "instagram"}));
    assert_eq!(
        events[1].properties["$set_once"],
        json!({
            "$initial_browser": "Firefox", "$initial_browser_version": 80, "$initial_utm_medium": "instagram",
            "$initial_current_url": "https://test.com/pricing"
        })
    );
    assert_eq!(harness.distinct_ids(&persons[0]).await, ["2"]);
    assert_eq!(events[0].distinct_id, "2");
    assert_eq!(events[0].event, "$autocapture");

    type ElementRow = (Option<String>, Option<Vec<String>>, Option<i32>, Option<String>);
    let elements: Vec<ElementRow> =
        sqlx::query_as("SELECT tag_name, attr_class, \"order\", text FROM posthog_element ORDER BY \"order\"")
            .fetch_all(harness.pool())
            .await
            .unwrap();
    assert_eq!(elements.len(), 2, "one element group for identical elements");
    assert_eq!(elements[0].0.as_deref(), Some("a"));
    assert_eq!(elements[0].1, Some(vec!["btn".to_string(), "btn-sm".to_string()]));
    assert_eq!(elements[1].2, Some(1));
    assert_eq!(elements[1].3.as_deref(), Some("💻"));
    assert_eq!(events[0].elements_hash, "0679137c0cd2408a2906839143e7a71f");

    let third = json!({"event": "$autocapture", "properties": {
        "distinct_id": 2, "token": "THIS IS NOT A TOKEN FOR TEAM 2", "utm_medium": "instagram",
        "$current_url": "https://test.com/pricing", "$browser": "Firefox", "$elements": autocapture_elements()
    }});
    harness.process_simple("2", third).await.unwrap();
    let events = harness.events().await;
    assert_eq!(events[2].properties["$set"], json!({"utm_medium": "instagram"}));
    assert_eq!(
        events[2].properties["$set_once"],
        json!({"$initial_browser": "Firefox", "$initial_utm_medium": "instagram", "$initial_current_url": "https://test.com/pricing"})
    );

    assert_eq!(harness.event_definitions().await, ["$autocapture"]);
    let expected: Vec<(String, bool)> = [
        ("distinct_id", true),
        ("token", false),
        ("$browser", false),
        ("$current_url", false),
        ("$os", false),
        ("$browser_version", false),
        ("$initial_referring_domain", false),
        ("$initial_referrer_url", false),
        ("utm_medium", false),
        ("gclid", false),
        ("$ip", false),
    ]
    .iter()
    .map(|(name, numerical)| (name.to_string(), *numerical))
    .collect();
    assert_eq!(harness.property_definitions().await, expected);
    let definition: (i32, Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT team_id, volume_30_day, query_usage_30_day FROM posthog_propertydefinition LIMIT 1")
            .fetch_one(harness.pool())
            .await
            .unwrap();
    assert_eq!(definition, (TEAM_ID, None, None));
}

#[tokio::test]
async fn initial_current_domain_regression() {
    let harness = Harness::new().await;
    let data = json!({"event": "$pageview", "properties": {"distinct_id": 2, "token": "t", "$current_url": "https://test.com"}});
    harness.process_simple("2", data).await.unwrap();
    let persons = harness.persons().await;
    assert_eq!(Value::Object(persons[0].properties.clone()), json!({"$initial_current_url": "https://test.com"}));
}

#[tokio::test]
async fn capture_bad_team() {
    let harness = Harness::new().await;
    let now = Utc::now();
    let data = json!({"event": "$pageview", "properties": {"distinct_id": "asdfasdfasdf"}});
    let error = harness.process("asdfasdfasdf", None, data, 1337, now, Some(now), uuid()).await.unwrap_err();
    assert_eq!(error.to_string(), "No team found with ID 1337. Can't ingest event.");
}

#[tokio::test]
async fn capture_no_element() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["asdfasdfasdf"], json!({})).await;
    harness
        .process_simple("asdfasdfasdf", json!({"event": "$pageview", "properties": {"distinct_id": "asdfasdfasdf"}}))
        .await
        .unwrap();
    let persons = harness.persons().await;
    assert_eq!(harness.distinct_ids(&persons[0]).await, ["asdfasdfasdf"]);
    let event = only_event(&harness).await;
    assert_eq!(event.event, "$pageview");
    assert_eq!(event.elements_hash, "");
    assert_eq!(event.elements, json!([]));
}

async fn assert_skew_corrected(timestamp: &str, sent_at: DateTime<Utc>, now: DateTime<Utc>) {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["asdfasdfasdf"], json!({})).await;
    let data = json!({"event": "$pageview", "timestamp": timestamp, "properties": {"distinct_id": "asdfasdfasdf"}});
    harness.process("movie played", None, data, TEAM, now, Some(sent_at), uuid()).await.unwrap();
    let event = only_event(&harness).await;
    let seconds_before_now = (now - event.timestamp).num_milliseconds() as f64 / 1000.0;
    assert!(seconds_before_now > 590.0 && seconds_before_now < 610.0, "{seconds_before_now}");
}

#[tokio::test]
async fn capture_sent_at() {
    let now = Utc::now();
    let tomorrow = now + Duration::days(1) + Duration::hours(2);
    let tomorrow_sent_at = tomorrow + Duration::minutes(10);
    assert_skew_corrected(&ingest_support::iso(tomorrow), tomorrow_sent_at, now).await;
}

#[tokio::test]
async fn capture_sent_at_other_timezone() {
    let now = Utc::now();
    let tomorrow = now + Duration::days(1) + Duration::hours(2);
    let plus_four = chrono::FixedOffset::east_opt(4 * 3600).unwrap();
    let text = tomorrow.with_timezone(&plus_four).format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string();
    assert_skew_corrected(&text, tomorrow + Duration::minutes(10), now).await;
}

#[tokio::test]
async fn capture_no_sent_at() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["asdfasdfasdf"], json!({})).await;
    let now = Utc::now();
    let tomorrow = now + Duration::days(1) + Duration::hours(2);
    let data = json!({"event": "$pageview", "timestamp": ingest_support::iso(tomorrow), "properties": {}});
    harness.process("movie played", None, data, TEAM, now, None, uuid()).await.unwrap();
    let event = only_event(&harness).await;
    assert!((tomorrow - event.timestamp).num_milliseconds().abs() < 1000);
}

async fn ip_case(ip: Option<&str>, properties: Value, anonymize: bool) -> Value {
    let harness = Harness::new().await;
    if anonymize {
        sqlx::query("UPDATE posthog_team SET anonymize_ips = $1").bind(true).execute(harness.pool()).await.unwrap();
    }
    harness.create_person(TEAM_ID, &["asdfasdfasdf"], json!({})).await;
    let now = Utc::now();
    let data = json!({"event": "$pageview", "properties": properties});
    harness.process("asdfasdfasdf", ip, data, TEAM, now, Some(now), uuid()).await.unwrap();
    only_event(&harness).await.properties
}

#[tokio::test]
async fn ip_none() {
    let properties = ip_case(None, json!({"distinct_id": "asdfasdfasdf"}), false).await;
    assert!(properties.get("$ip").is_none());
}

#[tokio::test]
async fn ip_capture() {
    let properties = ip_case(Some("11.12.13.14"), json!({"distinct_id": "asdfasdfasdf"}), false).await;
    assert_eq!(properties["$ip"], json!("11.12.13.14"));
}

#[tokio::test]
async fn ip_override() {
    let properties =
        ip_case(Some("11.12.13.14"), json!({"$ip": "1.0.0.1", "distinct_id": "asdfasdfasdf"}), false).await;
    assert_eq!(properties["$ip"], json!("1.0.0.1"));
}

#[tokio::test]
async fn anonymized_ip_capture() {
    let properties = ip_case(Some("11.12.13.14"), json!({"distinct_id": "asdfasdfasdf"}), true).await;
    assert!(properties.get("$ip").is_none());
}

fn create_alias(distinct_id: &str, alias: &str) -> Value {
    json!({"event": "$create_alias", "properties": {"distinct_id": distinct_id, "token": "t", "alias": alias}})
}

async fn single_person_ids(harness: &Harness) -> Vec<String> {
    let persons = harness.persons().await;
    assert_eq!(persons.len(), 1);
    harness.distinct_ids(&persons[0]).await
}

#[tokio::test]
async fn alias() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["old_distinct_id"], json!({})).await;
    harness.process_simple("new_distinct_id", create_alias("new_distinct_id", "old_distinct_id")).await.unwrap();
    assert_eq!(harness.events().await.len(), 1);
    assert_eq!(single_person_ids(&harness).await, ["old_distinct_id", "new_distinct_id"]);
}

#[tokio::test]
async fn alias_reverse() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["old_distinct_id"], json!({})).await;
    harness.process_simple("old_distinct_id", create_alias("old_distinct_id", "new_distinct_id")).await.unwrap();
    assert_eq!(harness.events().await.len(), 1);
    assert_eq!(single_person_ids(&harness).await, ["old_distinct_id", "new_distinct_id"]);
}

#[tokio::test]
async fn alias_twice() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["old_distinct_id"], json!({})).await;
    harness.process_simple("new_distinct_id", create_alias("new_distinct_id", "old_distinct_id")).await.unwrap();
    assert_eq!(single_person_ids(&harness).await, ["old_distinct_id", "new_distinct_id"]);
    harness.create_person(TEAM_ID, &["old_distinct_id_2"], json!({})).await;
    assert_eq!(harness.persons().await.len(), 2);
    harness.process_simple("new_distinct_id", create_alias("new_distinct_id", "old_distinct_id_2")).await.unwrap();
    assert_eq!(harness.events().await.len(), 2);
    assert_eq!(single_person_ids(&harness).await, ["old_distinct_id", "new_distinct_id", "old_distinct_id_2"]);
}

#[tokio::test]
async fn alias_before_person() {
    let harness = Harness::new().await;
    harness.process_simple("new_distinct_id", create_alias("new_distinct_id", "old_distinct_id")).await.unwrap();
    assert_eq!(harness.events().await.len(), 1);
    assert_eq!(single_person_ids(&harness).await, ["new_distinct_id", "old_distinct_id"]);
    assert!(!harness.persons().await[0].is_identified);
}

#[tokio::test]
async fn alias_both_existing() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["old_distinct_id"], json!({})).await;
    harness.create_person(TEAM_ID, &["new_distinct_id"], json!({})).await;
    harness.process_simple("new_distinct_id", create_alias("new_distinct_id", "old_distinct_id")).await.unwrap();
    assert_eq!(harness.events().await.len(), 1);
    assert_eq!(single_person_ids(&harness).await, ["old_distinct_id", "new_distinct_id"]);
}

#[tokio::test]
async fn alias_merge_properties() {
    let harness = Harness::new().await;
    harness
        .create_person(
            TEAM_ID,
            &["old_distinct_id"],
            json!({"key_on_both": "old value both", "key_on_old": "old value"}),
        )
        .await;
    harness
        .create_person(
            TEAM_ID,
            &["new_distinct_id"],
            json!({"key_on_both": "new value both", "key_on_new": "new value"}),
        )
        .await;
    harness.process_simple("new_distinct_id", create_alias("new_distinct_id", "old_distinct_id")).await.unwrap();
    assert_eq!(single_person_ids(&harness).await, ["old_distinct_id", "new_distinct_id"]);
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"key_on_both": "new value both", "key_on_new": "new value", "key_on_old": "old value"})
    );
}

#[tokio::test]
async fn alias_without_alias_property_is_ignored() {
    let harness = Harness::new().await;
    harness.process_simple("someone", json!({"event": "$create_alias", "properties": {}})).await.unwrap();
    assert_eq!(single_person_ids(&harness).await, ["someone"]);
}

#[tokio::test]
async fn offset_timestamp() {
    for sent_at in [true, false] {
        let harness = Harness::new().await;
        let now = at("2020-01-01T12:00:05.200Z");
        let data = json!({"offset": 150, "event": "$autocapture", "distinct_id": "distinct_id1"});
        harness.process("distinct_id1", None, data, TEAM, now, sent_at.then_some(now), uuid()).await.unwrap();
        let event = only_event(&harness).await;
        assert_eq!(ingest_support::iso(event.timestamp), "2020-01-01T12:00:05.050Z");
    }
}

#[tokio::test]
async fn long_htext() {
    let harness = Harness::new().await;
    let data = json!({"event": "$autocapture", "properties": {"distinct_id": "new_distinct_id", "$elements": [{
        "tag_name": "a", "$el_text": "a".repeat(2050), "attr__href": "a".repeat(2050),
        "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm"
    }]}});
    harness.process_simple("new_distinct_id", data).await.unwrap();
    let event = only_event(&harness).await;
    let (href, text): (String, String) =
        sqlx::query_as("SELECT href, text FROM posthog_element").fetch_one(harness.pool()).await.unwrap();
    assert_eq!(href.len(), 2048);
    assert_eq!(text.len(), 400);
    assert_eq!(event.elements_hash, "c2659b28e72835706835764cf7f63c2a");
}

#[tokio::test]
async fn snapshot_event_stored_as_session_recording_event() {
    let harness = Harness::new().await;
    let data =
        json!({"event": "$snapshot", "properties": {"$session_id": "abcf-efg", "$snapshot_data": {"timestamp": 123}}});
    let result = harness.process_simple("some-id", data).await.unwrap();
    assert!(result.is_none());
    assert!(harness.events().await.is_empty());
    type RecordingRow = (String, String, Value, DateTime<Utc>, Option<DateTime<Utc>>);
    let rows: Vec<RecordingRow> = sqlx::query_as(
        "SELECT session_id, distinct_id, snapshot_data, timestamp, created_at FROM posthog_sessionrecordingevent",
    )
    .fetch_all(harness.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "abcf-efg");
    assert_eq!(rows[0].1, "some-id");
    assert_eq!(rows[0].2, json!({"timestamp": 123}));
    assert_eq!(Some(rows[0].3), rows[0].4);
    // The snapshot creates the person.
    assert_eq!(single_person_ids(&harness).await, ["some-id"]);
}

#[tokio::test]
async fn snapshot_with_string_data() {
    let harness = Harness::new().await;
    let data = json!({"event": "$snapshot", "properties": {"$session_id": "1234abc", "$snapshot_data": "yes way"}});
    harness.process_simple("some-id", data).await.unwrap();
    let snapshot: Value = sqlx::query_scalar("SELECT snapshot_data FROM posthog_sessionrecordingevent")
        .fetch_one(harness.pool())
        .await
        .unwrap();
    assert_eq!(snapshot, json!("yes way"));
}

fn identify_with(distinct_id: &str, extra: Value) -> Value {
    let mut properties = json!({"token": "t", "distinct_id": distinct_id});
    if let (Some(properties), Some(extra)) = (properties.as_object_mut(), extra.as_object()) {
        properties.extend(extra.clone());
    }
    json!({"event": "$identify", "properties": properties})
}

#[tokio::test]
async fn identify_set() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["distinct_id1"], json!({})).await;
    let data = identify_with("distinct_id1", json!({"$set": {"a_prop": "test-1", "c_prop": "test-1"}}));
    harness.process_simple("distinct_id1", data).await.unwrap();
    let event = only_event(&harness).await;
    assert_eq!(event.properties["$set"], json!({"a_prop": "test-1", "c_prop": "test-1"}));
    let person = &harness.persons().await[0];
    assert_eq!(harness.distinct_ids(person).await, ["distinct_id1"]);
    assert_eq!(Value::Object(person.properties.clone()), json!({"a_prop": "test-1", "c_prop": "test-1"}));
    assert!(!person.is_identified);

    let data = identify_with("distinct_id1", json!({"$set": {"a_prop": "test-2", "b_prop": "test-2b"}}));
    harness.process_simple("distinct_id1", data).await.unwrap();
    assert_eq!(harness.events().await.len(), 2);
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"a_prop": "test-2", "b_prop": "test-2b", "c_prop": "test-1"})
    );
}

#[tokio::test]
async fn identify_set_once() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["distinct_id1"], json!({})).await;
    let data = identify_with("distinct_id1", json!({"$set_once": {"a_prop": "test-1", "c_prop": "test-1"}}));
    harness.process_simple("distinct_id1", data).await.unwrap();
    assert_eq!(only_event(&harness).await.properties["$set_once"], json!({"a_prop": "test-1", "c_prop": "test-1"}));
    let data = identify_with("distinct_id1", json!({"$set_once": {"a_prop": "test-2", "b_prop": "test-2b"}}));
    harness.process_simple("distinct_id1", data).await.unwrap();
    let person = &harness.persons().await[0];
    assert_eq!(
        Value::Object(person.properties.clone()),
        json!({"a_prop": "test-1", "b_prop": "test-2b", "c_prop": "test-1"})
    );
    assert!(!person.is_identified);
}

#[tokio::test]
async fn identify_with_illegal_generic_id() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["im an anonymous id"], json!({})).await;
    let mut expected_persons = 1;
    for (distinct_id, merges) in [
        ("distinctId", false),
        ("  ", false),
        ("NaN", false),
        ("undefined", false),
        ("None", false),
        ("0", false),
        ("Nan", true),
    ] {
        harness.create_person(TEAM_ID, &[distinct_id], json!({})).await;
        let data = identify_with(distinct_id, json!({"$anon_distinct_id": "im an anonymous id"}));
        harness.process_simple(distinct_id, data).await.unwrap();
        if !merges {
            expected_persons += 1;
        }
        assert_eq!(harness.persons().await.len(), expected_persons, "after {distinct_id:?}");
    }
}

#[tokio::test]
async fn distinct_with_anonymous_id() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["anonymous_id"], json!({})).await;
    let data =
        identify_with("new_distinct_id", json!({"$anon_distinct_id": "anonymous_id", "$set": {"a_prop": "test"}}));
    harness.process_simple("new_distinct_id", data.clone()).await.unwrap();
    assert_eq!(only_event(&harness).await.properties["$set"], json!({"a_prop": "test"}));
    let person = &harness.persons().await[0];
    assert_eq!(harness.distinct_ids(person).await, ["anonymous_id", "new_distinct_id"]);
    assert_eq!(Value::Object(person.properties.clone()), json!({"a_prop": "test"}));
    assert!(person.is_identified);
    // The same call can happen again without errors.
    harness.process_simple("new_distinct_id", data).await.unwrap();
}

#[tokio::test]
async fn distinct_with_anonymous_id_which_was_already_created() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["anonymous_id"], json!({})).await;
    harness.create_person(TEAM_ID, &["new_distinct_id"], json!({"email": "someone@gmail.com"})).await;
    let data = identify_with("new_distinct_id", json!({"$anon_distinct_id": "anonymous_id"}));
    harness.process_simple("new_distinct_id", data).await.unwrap();
    assert_eq!(single_person_ids(&harness).await, ["anonymous_id", "new_distinct_id"]);
    let person = &harness.persons().await[0];
    assert_eq!(person.properties["email"], json!("someone@gmail.com"));
    assert!(person.is_identified);
}

#[tokio::test]
async fn identify_with_the_same_distinct_id_as_anon_distinct_id() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["anonymous_id"], json!({})).await;
    let data = identify_with("anonymous_id", json!({"$anon_distinct_id": "anonymous_id"}));
    harness.process_simple("anonymous_id", data).await.unwrap();
    assert_eq!(single_person_ids(&harness).await, ["anonymous_id"]);
    assert!(!harness.persons().await[0].is_identified);
}

#[tokio::test]
async fn distinct_with_multiple_anonymous_ids_which_were_already_created() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["anonymous_id"], json!({})).await;
    harness.create_person(TEAM_ID, &["new_distinct_id"], json!({"email": "someone@gmail.com"})).await;
    harness
        .process_simple(
            "new_distinct_id",
            identify_with("new_distinct_id", json!({"$anon_distinct_id": "anonymous_id"})),
        )
        .await
        .unwrap();
    assert_eq!(single_person_ids(&harness).await, ["anonymous_id", "new_distinct_id"]);
    harness.create_person(TEAM_ID, &["anonymous_id_2"], json!({})).await;
    harness
        .process_simple(
            "new_distinct_id",
            identify_with("new_distinct_id", json!({"$anon_distinct_id": "anonymous_id_2"})),
        )
        .await
        .unwrap();
    assert_eq!(single_person_ids(&harness).await, ["anonymous_id", "new_distinct_id", "anonymous_id_2"]);
    let person = &harness.persons().await[0];
    assert_eq!(person.properties["email"], json!("someone@gmail.com"));
    assert!(person.is_identified);
}

#[tokio::test]
async fn distinct_team_leakage() {
    let harness = Harness::new().await;
    common::create_user_team_and_organization(
        harness.pool(),
        3,
        1002,
        "a73fc995-a63f-4e4e-bf65-2a5e9f93b2b1",
        "01774e2f-0d01-0000-ee94-9a238640c6ee",
        "0174f81e-36f5-0000-7ef8-cc26c1fbab1c",
    )
    .await;
    harness.create_person(3, &["2"], json!({"email": "team2@gmail.com"})).await;
    harness.create_person(TEAM_ID, &["1", "2"], json!({})).await;
    harness.process_simple("2", identify_with("2", json!({"$anon_distinct_id": "1"}))).await.unwrap();
    let mut people = harness.persons().await;
    people.sort_by_key(|person| -person.team_id);
    assert_eq!(people.len(), 2);
    assert_eq!(people[1].team_id, TEAM_ID);
    assert!(people[1].properties.is_empty());
    assert_eq!(harness.distinct_ids(&people[1]).await, ["1", "2"]);
    assert_eq!(people[0].team_id, 3);
    assert_eq!(harness.distinct_ids(&people[0]).await, ["2"]);
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|value| value.to_string()).collect()
}

#[tokio::test]
async fn identify_does_not_alias_already_identified_users() {
    let harness = Harness::new().await;
    harness.capture("anonymous_id", "event 1", json!({})).await;
    harness.identify("anonymous_id", "initial_distinct_id").await;
    harness.capture("initial_distinct_id", "event 2", json!({})).await;
    harness.capture("p2_distinct_id", "event 3", json!({})).await;
    harness.identify("p2_distinct_id", "new_distinct_id").await;
    harness.capture("new_distinct_id", "event 4", json!({})).await;
    // Switching back to the first identity must not merge either.
    harness.identify("new_distinct_id", "initial_distinct_id").await;

    assert_eq!(
        harness.events_by_person().await,
        vec![
            (
                strings(&["anonymous_id", "initial_distinct_id"]),
                strings(&["event 1", "$identify", "event 2", "$identify"])
            ),
            (strings(&["p2_distinct_id", "new_distinct_id"]), strings(&["event 3", "$identify", "event 4"])),
        ]
    );
    let identified: Vec<bool> = harness.persons().await.iter().map(|person| person.is_identified).collect();
    assert_eq!(identified, [true, true]);
}

#[tokio::test]
async fn identify_does_not_alias_already_identified_users_without_anonymous_event() {
    let harness = Harness::new().await;
    harness.identify("anonymous_id", "initial_distinct_id").await;
    harness.capture("initial_distinct_id", "event 2", json!({})).await;
    harness.capture("p2_distinct_id", "event 3", json!({})).await;
    harness.identify("p2_distinct_id", "new_distinct_id").await;
    harness.capture("new_distinct_id", "event 4", json!({})).await;
    harness.identify("new_distinct_id", "initial_distinct_id").await;
    assert_eq!(
        harness.events_by_person().await,
        vec![
            (strings(&["initial_distinct_id", "anonymous_id"]), strings(&["$identify", "event 2", "$identify"])),
            (strings(&["p2_distinct_id", "new_distinct_id"]), strings(&["event 3", "$identify", "event 4"])),
        ]
    );
    let identified: Vec<bool> = harness.persons().await.iter().map(|person| person.is_identified).collect();
    assert_eq!(identified, [true, true]);
}

/// The reference interleaves a second `$identify` right after the first one created its person;
/// the outcome must be two identified persons.
#[tokio::test]
async fn identify_interleaved_keeps_consistent_state() {
    let harness = Harness::new().await;
    assert!(harness.persons().await.is_empty());
    harness.capture("new-distinct-id", "some event", json!({})).await;
    harness.identify("anonymous_id", "initial-distinct-id").await;
    harness.identify("initial-distinct-id", "new-distinct-id").await;
    let persons = harness.persons().await;
    assert_eq!(persons.len(), 2);
    assert!(persons.iter().all(|person| person.is_identified));
}

/// Truly concurrent `$identify` calls over the same ids never leave a distinct id without a
/// person, two persons sharing one, or an error.
#[tokio::test]
async fn concurrent_identify_calls_stay_consistent() {
    let harness = Harness::new().await;
    for round in 0..5 {
        let anonymous = format!("anon-{round}");
        let user = format!("user-{round}");
        harness.capture(&anonymous, "pageview", json!({})).await;
        let other = format!("other-{round}");
        tokio::join!(
            harness.identify(&anonymous, &user),
            harness.identify(&user, &other),
            harness.identify(&anonymous, &other),
        );
        for distinct_id in [&anonymous, &user, &other] {
            let owners: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM posthog_persondistinctid WHERE team_id = $1 AND distinct_id = $2",
            )
            .bind(TEAM_ID)
            .bind(distinct_id)
            .fetch_one(harness.pool())
            .await
            .unwrap();
            assert_eq!(owners, 1, "{distinct_id}");
        }
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM posthog_person WHERE NOT EXISTS \
         (SELECT 1 FROM posthog_persondistinctid WHERE person_id = posthog_person.id)",
    )
    .fetch_one(harness.pool())
    .await
    .unwrap();
    assert_eq!(orphans, 0);
}

#[tokio::test]
async fn create_alias_identified_to_identified() {
    let harness = Harness::new().await;
    harness.identify("anonymous_id", "identified_id1").await;
    harness.capture("identified_id1", "some event", json!({})).await;
    harness.identify("identified_id1", "identified_id2").await;
    harness.alias("identified_id2", "identified_id1").await;
    let by_person = harness.events_by_person().await;
    assert_eq!(by_person.len(), 1);
    let mut ids = by_person[0].0.clone();
    ids.sort();
    assert_eq!(ids, strings(&["anonymous_id", "identified_id1", "identified_id2"]));
    assert_eq!(by_person[0].1, strings(&["$identify", "some event", "$identify", "$create_alias"]));
    let identified: Vec<bool> = harness.persons().await.iter().map(|person| person.is_identified).collect();
    assert_eq!(identified, [true]);
}

#[tokio::test]
async fn create_alias_anonymous_to_identified() {
    let harness = Harness::new().await;
    harness.identify("anonymous_id", "initial_distinct_id").await;
    harness.capture("anonymous_id", "anonymous event", json!({})).await;
    harness.alias("initial_distinct_id", "anonymous_id").await;
    assert_eq!(
        harness.events_by_person().await,
        vec![(
            strings(&["initial_distinct_id", "anonymous_id"]),
            strings(&["$identify", "anonymous event", "$create_alias"])
        )]
    );
    assert!(harness.persons().await[0].is_identified);
}

#[tokio::test]
async fn create_alias_identified_to_anonymous() {
    let harness = Harness::new().await;
    harness.identify("anonymous_id", "initial_distinct_id").await;
    harness.capture("anonymous_id", "anonymous event", json!({})).await;
    harness.alias("anonymous_id", "initial_distinct_id").await;
    assert_eq!(
        harness.events_by_person().await,
        vec![(
            strings(&["initial_distinct_id", "anonymous_id"]),
            strings(&["$identify", "anonymous event", "$create_alias"])
        )]
    );
    assert!(harness.persons().await[0].is_identified);
}

#[tokio::test]
async fn create_alias_anonymous_to_anonymous() {
    let harness = Harness::new().await;
    harness.capture("anonymous-1", "anonymous event 1", json!({})).await;
    harness.capture("anonymous-2", "anonymous event 2", json!({})).await;
    harness.alias("anonymous-2", "anonymous-1").await;
    assert_eq!(
        harness.events_by_person().await,
        vec![(
            strings(&["anonymous-1", "anonymous-2"]),
            strings(&["anonymous event 1", "anonymous event 2", "$create_alias"])
        )]
    );
    assert!(!harness.persons().await[0].is_identified);
}

#[tokio::test]
async fn create_alias_two_non_existent_persons() {
    let harness = Harness::new().await;
    harness.alias("anonymous-1", "anonymous-2").await;
    assert_eq!(
        harness.events_by_person().await,
        vec![(strings(&["anonymous-1", "anonymous-2"]), strings(&["$create_alias"]))]
    );
    assert!(!harness.persons().await[0].is_identified);
}

#[tokio::test]
async fn team_event_properties() {
    let harness = Harness::new().await;
    let now = Utc::now();
    let data = json!({"event": "purchase", "properties": {"price": 299.99, "name": "AirPods Pro"}});
    harness.process("xxx", Some("127.0.0.1"), data, TEAM, now, Some(now), uuid()).await.unwrap();
    assert_eq!(harness.event_definitions().await, ["purchase"]);
    assert_eq!(
        harness.property_definitions().await,
        vec![("price".to_string(), true), ("name".to_string(), false), ("$ip".to_string(), false)]
    );
}

#[tokio::test]
async fn long_event_name_substr() {
    let harness = Harness::new().await;
    harness.process_simple("xxx", json!({"event": "E".repeat(300), "properties": {"price": 299.99}})).await.unwrap();
    assert_eq!(only_event(&harness).await.event.len(), 200);
}

#[tokio::test]
async fn throws_with_bad_uuid() {
    let harness = Harness::new().await;
    let now = Utc::now();
    let data = json!({"event": "E", "properties": {"price": 299.99, "name": "AirPods Pro"}});
    let error = harness
        .process("xxx", None, data.clone(), TEAM, now, Some(now), Some("this is not an uuid".into()))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "Not a valid UUID: \"this is not an uuid\"");
    let error = harness.process("xxx", None, data, TEAM, now, Some(now), None).await.unwrap_err();
    assert_eq!(error.to_string(), "Not a valid UUID: \"undefined\"");
    assert!(harness.events().await.is_empty());
}

#[tokio::test]
async fn any_event_can_set_on_props_user_exists() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["distinct_id1"], json!({})).await;
    let data = json!({"event": "some_event", "properties": {"distinct_id": "distinct_id1", "$set": {"a_prop": "test-1", "c_prop": "test-1"}}});
    harness.process_simple("distinct_id1", data).await.unwrap();
    assert_eq!(only_event(&harness).await.properties["$set"], json!({"a_prop": "test-1", "c_prop": "test-1"}));
    assert_eq!(single_person_ids(&harness).await, ["distinct_id1"]);
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"a_prop": "test-1", "c_prop": "test-1"})
    );
}

#[tokio::test]
async fn any_event_can_set_on_props_new_user() {
    let harness = Harness::new().await;
    let data = json!({"event": "some_event", "properties": {"distinct_id": "distinct_id1", "$set": {"a_prop": "test-1", "c_prop": "test-1"}}});
    harness.process_simple("distinct_id1", data).await.unwrap();
    assert_eq!(single_person_ids(&harness).await, ["distinct_id1"]);
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"a_prop": "test-1", "c_prop": "test-1"})
    );
}

#[tokio::test]
async fn any_event_can_set_once_on_props() {
    let harness = Harness::new().await;
    harness.create_person(TEAM_ID, &["distinct_id1"], json!({})).await;
    let data = json!({"event": "some_event", "properties": {"$set_once": {"a_prop": "test-1", "c_prop": "test-1"}}});
    harness.process_simple("distinct_id1", data).await.unwrap();
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"a_prop": "test-1", "c_prop": "test-1"})
    );
    let data =
        json!({"event": "some_other_event", "properties": {"$set_once": {"a_prop": "test-2", "b_prop": "test-2b"}}});
    harness.process_simple("distinct_id1", data).await.unwrap();
    assert_eq!(harness.events().await.len(), 2);
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"a_prop": "test-1", "b_prop": "test-2b", "c_prop": "test-1"})
    );
}

#[tokio::test]
async fn set_and_set_once_merge_with_properties() {
    let harness = Harness::new().await;
    let data = json!({
        "event": "some_event",
        "$set": {"key1": "value1", "key2": "value2"},
        "$set_once": {"key1_once": "value1", "key2_once": "value2"},
        "properties": {
            "distinct_id": "distinct_id1",
            "$set": {"key2": "value3", "key3": "value4"},
            "$set_once": {"key2_once": "value3", "key3_once": "value4"}
        }
    });
    harness.process_simple("distinct_id1", data).await.unwrap();
    let event = only_event(&harness).await;
    assert_eq!(event.properties["$set"], json!({"key1": "value1", "key2": "value2", "key3": "value4"}));
    assert_eq!(
        event.properties["$set_once"],
        json!({"key1_once": "value1", "key2_once": "value2", "key3_once": "value4"})
    );
    assert_eq!(
        Value::Object(harness.persons().await[0].properties.clone()),
        json!({"key1": "value1", "key2": "value2", "key3": "value4", "key1_once": "value1", "key2_once": "value2", "key3_once": "value4"})
    );
}

/// tests/postgres/process-event.test.ts: element groups are shared per team by hash.
#[tokio::test]
async fn element_group_per_team_by_hash() {
    let harness = Harness::new().await;
    common::create_user_team_and_organization(
        harness.pool(),
        3,
        1002,
        "a73fc995-a63f-4e4e-bf65-2a5e9f93b2b1",
        "01774e2f-0d01-0000-ee94-9a238640c6ee",
        "0174f81e-36f5-0000-7ef8-cc26c1fbab1c",
    )
    .await;
    let elements = json!([{"tag_name": "button", "$el_text": "Sign up!"}, {"tag_name": "div"}]);
    let with_unknown_key = json!([{"tag_name": "button", "$el_text": "Sign up!", "event": "x"}, {"tag_name": "div"}]);
    let now = Utc::now();
    for (team, elements) in [(TEAM, &elements), (TEAM, &with_unknown_key), (3, &elements)] {
        let data = json!({"event": "$autocapture", "properties": {"$elements": elements}});
        harness.process("someone", None, data, team, now, Some(now), uuid()).await.unwrap();
    }
    let tags: Vec<Option<String>> =
        sqlx::query_scalar("SELECT tag_name FROM posthog_element ORDER BY id").fetch_all(harness.pool()).await.unwrap();
    assert_eq!(tags, [Some("button".into()), Some("div".into()), Some("button".into()), Some("div".into())]);
    let hashes: Vec<String> = sqlx::query_scalar("SELECT hash FROM posthog_elementgroup ORDER BY id")
        .fetch_all(harness.pool())
        .await
        .unwrap();
    assert_eq!(hashes.len(), 2);
    assert_eq!(hashes[0], hashes[1]);
    let event_hashes: Vec<String> = harness.events().await.into_iter().map(|event| event.elements_hash).collect();
    assert!(event_hashes.iter().all(|hash| hash == &hashes[0]));
}
