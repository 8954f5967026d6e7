//! ClickHouse reads what the server writes. The whole server in Kafka mode ingests events that
//! reach every topic ClickHouse consumes (an autocapture with elements, a `$snapshot`, a
//! `$groupidentify`, a merge of two persons, a plugin's `console.log`, a message that is not an
//! event), then ClickHouse's own parsers (chDB: ClickHouse's engine in process, `scripts/chdb`)
//! read a sample of every topic with the column types of PostHog's Kafka tables: `Protobuf` with
//! `events.proto` for `clickhouse_events_proto`, `JSONEachRow` for the others. Every decoded row is
//! checked field by field, against the message as written and against the event that went in.
//!
//! Settings as ClickHouse's Kafka engine reads (`input_format_skip_unknown_fields` on, so fields a
//! table has no column for are skipped: listed in the test's output), with the server's defaults
//! otherwise (`date_time_input_format = 'basic'`) and UTC, as PostHog's ClickHouse runs.

mod common;
mod kafka_mode_support;
mod queues_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use common::TestDb;
use kafka_mode_support::{contains, raw_event, KafkaModeServer};
use queues_support::{consume_topic_to_end, ensure_kafka, produce, topic_end, unique};
use serde_json::{json, Map, Value};

const PLUGIN: &str = r#"
    export function processEvent (event) {
        console.log('processed ' + event.event + ' for ' + event.distinct_id)
        return event
    }
"#;

/// A topic ClickHouse reads, as PostHog's Kafka table for it declares (ee/clickhouse/sql/*.py of the
/// PostHog release the reference was written for; `DateTime64` without a zone is the server's, UTC).
struct Table {
    topic: &'static str,
    format: &'static str,
    columns: &'static [(&'static str, &'static str)],
    /// Columns the server leaves out of the message on purpose (ClickHouse then stores the default).
    absent_ok: &'static [&'static str],
}

const EVENTS: Table = Table {
    topic: "clickhouse_events_proto",
    format: "Protobuf",
    columns: &[
        ("uuid", "UUID"),
        ("event", "String"),
        ("properties", "String"),
        ("timestamp", "DateTime64(6, 'UTC')"),
        ("team_id", "Int64"),
        ("distinct_id", "String"),
        ("elements_chain", "String"),
        ("created_at", "DateTime64(6, 'UTC')"),
    ],
    absent_ok: &[],
};

const JSON_TABLES: &[Table] = &[
    Table {
        topic: "clickhouse_session_recording_events",
        format: "JSONEachRow",
        columns: &[
            ("uuid", "UUID"),
            ("timestamp", "DateTime64(6, 'UTC')"),
            ("team_id", "Int64"),
            ("distinct_id", "String"),
            ("session_id", "String"),
            ("snapshot_data", "String"),
            ("created_at", "DateTime64(6, 'UTC')"),
        ],
        absent_ok: &[],
    },
    Table {
        topic: "clickhouse_person_unique_id",
        format: "JSONEachRow",
        columns: &[
            ("distinct_id", "String"),
            ("person_id", "UUID"),
            ("team_id", "Int64"),
            ("_sign", "Nullable(Int8)"),
            ("is_deleted", "Nullable(Int8)"),
        ],
        // The table's materialized view takes `is_deleted` when `_sign` is null.
        absent_ok: &["_sign"],
    },
    Table {
        topic: "clickhouse_person",
        format: "JSONEachRow",
        columns: &[
            ("id", "UUID"),
            ("created_at", "DateTime64"),
            ("team_id", "Int64"),
            ("properties", "String"),
            ("is_identified", "Bool"),
            ("is_deleted", "Bool"),
        ],
        absent_ok: &[],
    },
    Table {
        topic: "clickhouse_groups",
        format: "JSONEachRow",
        columns: &[
            ("group_type_index", "UInt8"),
            ("group_key", "String"),
            ("created_at", "DateTime64"),
            ("team_id", "Int64"),
            ("group_properties", "String"),
        ],
        absent_ok: &[],
    },
    Table {
        topic: "plugin_log_entries",
        format: "JSONEachRow",
        columns: &[
            ("id", "UUID"),
            ("team_id", "Int64"),
            ("plugin_id", "Int64"),
            ("plugin_config_id", "Int64"),
            ("timestamp", "DateTime64(6, 'UTC')"),
            ("source", "String"),
            ("type", "String"),
            ("message", "String"),
            ("instance_id", "UUID"),
        ],
        absent_ok: &[],
    },
    Table {
        topic: "events_dead_letter_queue",
        format: "JSONEachRow",
        columns: &[
            ("id", "UUID"),
            ("event_uuid", "UUID"),
            ("event", "String"),
            ("properties", "String"),
            ("distinct_id", "String"),
            ("team_id", "Int64"),
            ("elements_chain", "String"),
            ("created_at", "DateTime64(6, 'UTC')"),
            ("ip", "String"),
            ("site_url", "String"),
            ("now", "DateTime64(6, 'UTC')"),
            ("raw_payload", "String"),
            ("error_timestamp", "DateTime64(6, 'UTC')"),
            ("error_location", "String"),
            ("error", "String"),
        ],
        // A message that is not an event has no event name, properties, elements or creation
        // time (the reference's dead letters of events carry no `created_at` either).
        absent_ok: &["event", "properties", "elements_chain", "created_at"],
    },
];

fn structure(table: &Table) -> String {
    table.columns.iter().map(|(name, kind)| format!("{name} {kind}")).collect::<Vec<_>>().join(", ")
}

/// Runs SQL in ClickHouse's engine (scripts/chdb), returns the JSONEachRow rows.
fn clickhouse(sql: &str) -> Vec<Map<String, Value>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chdb");
    let output =
        std::process::Command::new("bash").arg(script).arg("query").arg(sql).output().expect("run scripts/chdb");
    assert!(
        output.status.success(),
        "ClickHouse refused to read it:\n{sql}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("a JSONEachRow row"))
        .collect()
}

/// Reads `path` in `table.format` with the table's columns, in file order.
fn decode(table: &Table, path: &Path) -> Vec<Map<String, Value>> {
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/clickhouse/events.proto:Event");
    clickhouse(&format!(
        "SELECT * FROM file('{}', '{}', '{}') SETTINGS format_schema = '{schema}', \
         input_format_skip_unknown_fields = 1, date_time_input_format = 'basic', session_timezone = 'UTC', \
         max_threads = 1, input_format_parallel_parsing = 0, output_format_json_quote_64bit_integers = 0",
        path.display(),
        table.format,
        structure(table).replace('\'', "\\'"),
    ))
}

/// A date-time as ClickHouse stores it, from the text the server wrote or ClickHouse printed.
fn datetime(text: &str) -> NaiveDateTime {
    let trimmed = text.trim_end_matches('Z');
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(trimmed, format).ok())
        .unwrap_or_else(|| panic!("not a date-time: {text:?}"))
}

/// Whether ClickHouse's value of a column is the value the message carried.
fn same_value(kind: &str, written: &Value, decoded: &Value) -> bool {
    match (kind, written) {
        (_, Value::Null) => decoded.is_null() || kind.starts_with("String"),
        (kind, Value::String(text)) if kind.starts_with("DateTime64") => {
            decoded.as_str().is_some_and(|decoded| datetime(decoded) == datetime(text))
        }
        ("UUID", Value::String(text)) => decoded.as_str() == Some(text.to_lowercase().as_str()),
        ("Bool", Value::Bool(flag)) => decoded.as_bool() == Some(*flag),
        ("Bool", Value::Number(number)) => decoded.as_bool() == Some(number.as_i64() != Some(0)),
        (_, Value::Number(number)) => decoded.as_i64() == number.as_i64(),
        (_, Value::String(text)) => decoded.as_str() == Some(text.as_str()),
        _ => false,
    }
}

/// Checks every column of every decoded row against the written message; returns the message
/// fields the table has no column for (ClickHouse skips them).
fn check_rows(table: &Table, written: &[Map<String, Value>], decoded: &[Map<String, Value>]) -> BTreeSet<String> {
    assert_eq!(decoded.len(), written.len(), "{}: every message is one row", table.topic);
    let mut skipped = BTreeSet::new();
    for (message, row) in written.iter().zip(decoded) {
        for (column, kind) in table.columns {
            match message.get(*column) {
                Some(value) => assert!(
                    same_value(kind, value, &row[*column]),
                    "{}.{column} ({kind}): wrote {value}, ClickHouse read {}\nmessage: {message:?}\nrow: {row:?}",
                    table.topic,
                    row[*column]
                ),
                None => assert!(
                    table.absent_ok.contains(column),
                    "{}: the message has no {column}, ClickHouse would store a default\nmessage: {message:?}",
                    table.topic
                ),
            }
        }
        skipped.extend(message.keys().filter(|key| !table.columns.iter().any(|(name, _)| name == key)).cloned());
    }
    skipped
}

/// The events' time: 11:59:57.792 as sent, moved by the clock skew `now - sent_at` (1 s).
const CORRECTED_TIMESTAMP: &str = "2021-10-28 11:59:58.792";

/// The messages on `topic` from `start` that contain one of `needles`, once `enough` holds for them.
async fn messages_with(
    topic: &str,
    start: rdkafka::Offset,
    needles: &[String],
    enough: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: Vec<Vec<u8>> = consume_topic_to_end(topic, start)
            .await
            .into_iter()
            .filter_map(|(_, value)| value)
            .filter(|value| needles.iter().any(|needle| contains(value, needle)))
            .collect();
        if enough(&found) {
            return found;
        }
        assert!(Instant::now() < deadline, "{topic}: only {} messages with {needles:?}", found.len());
    }
}

/// `enough` for [`messages_with`]: every one of `needles` is in some message.
fn all_of(needles: &[String]) -> impl Fn(&[Vec<u8>]) -> bool + '_ {
    move |found| needles.iter().all(|needle| found.iter().any(|value| contains(value, needle)))
}

fn json_objects(messages: &[Vec<u8>]) -> Vec<Map<String, Value>> {
    messages.iter().map(|message| serde_json::from_slice(message).expect("a JSON object")).collect()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write sample");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_parses_every_topic_the_server_writes() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("plugin_server=info,warn"))
        .with_test_writer()
        .try_init();
    ensure_kafka();
    // Install first: it can take a minute, and is no part of what the server is given time for.
    let install = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chdb"))
        .arg("install")
        .status()
        .expect("run scripts/chdb install");
    assert!(install.success(), "scripts/chdb install failed (chdb from PyPI)");

    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let starts: Vec<(&str, rdkafka::Offset)> = std::iter::once(EVENTS.topic)
        .chain(JSON_TABLES.iter().map(|table| table.topic))
        .map(|topic| (topic, topic_end(topic)))
        .collect();
    let start_of = |topic: &str| starts.iter().find(|(name, _)| *name == topic).map(|(_, start)| *start).unwrap();
    let server = KafkaModeServer::start(&db, "e2e-clickhouse", &[]).await;
    let topic = &server.topic;

    let marker = uuid::Uuid::new_v4().simple().to_string();
    let (user, anonymous) = (format!("user-{marker}"), format!("anonymous-{marker}"));
    // The consumer starts at the latest offset: offer a first event until it comes out.
    let first = uuid::Uuid::now_v7().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        produce(topic, &[raw_event(&anonymous, &first, "first", json!({}))]).await;
        let out = consume_topic_to_end(EVENTS.topic, start_of(EVENTS.topic)).await;
        if out.iter().any(|(_, value)| value.as_ref().is_some_and(|value| contains(value, &first))) {
            break;
        }
        assert!(Instant::now() < deadline, "the server never consumed");
    }

    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let autocapture_properties = json!({
        "marker": marker, "text": "🦔 \"quoted\" back\\slash\nnew line", "nested": {"list": [1, 2.5, null, true]},
        "$elements": [
            {"tag_name": "a", "attr__href": "/pricing", "attr__class": "button primary", "$el_text": "Get \"it\"",
             "nth_child": 1, "nth_of_type": 0},
            {"tag_name": "div", "attr__id": "main", "nth_child": 2, "nth_of_type": 1}
        ]
    });
    let snapshot_properties = json!({"$session_id": format!("session-{marker}"),
        "$snapshot_data": {"type": 2, "data": {"source": 0, "text": "é"}}});
    let group_properties = json!({"$group_type": "organization", "$group_key": format!("org-{marker}"),
        "$group_set": {"name": "Hedgehogs 🦔", "employees": 12}});
    let not_an_event_uuid = uuid::Uuid::now_v7().to_string();
    let not_an_event = json!({"uuid": not_an_event_uuid, "distinct_id": user, "team_id": common::TEAM_ID,
        "ip": "10.1.2.3", "site_url": "", "now": "2021-10-28T12:00:00Z", "data": format!("not json {marker}")});
    produce(
        topic,
        &[
            raw_event(&user, &ids[0], "$autocapture", autocapture_properties.clone()),
            raw_event(&user, &ids[1], "$snapshot", snapshot_properties.clone()),
            raw_event(&user, &ids[2], "$groupidentify", group_properties.clone()),
            not_an_event.to_string().into_bytes(),
        ],
    )
    .await;
    let markers = [marker.clone()];
    messages_with(EVENTS.topic, start_of(EVENTS.topic), &markers, all_of(&[ids[0].clone(), ids[2].clone()])).await;
    // Both persons exist: merge them.
    let merge = uuid::Uuid::now_v7().to_string();
    produce(topic, &[raw_event(&user, &merge, "$identify", json!({"$anon_distinct_id": anonymous}))]).await;
    let events =
        messages_with(EVENTS.topic, start_of(EVENTS.topic), &markers, all_of(std::slice::from_ref(&merge))).await;

    // clickhouse_events_proto: Protobuf, length-delimited, as written.
    let dir = std::env::temp_dir().join(unique("clickhouse-samples"));
    std::fs::create_dir_all(&dir).expect("sample dir");
    let proto_file = write_file(&dir, "events.bin", &events.concat());
    let rows = decode(&EVENTS, &proto_file);
    assert_eq!(rows.len(), events.len(), "every event message is one row");
    let sent: Vec<(&str, &str, Value)> = vec![
        (ids[0].as_str(), "$autocapture", autocapture_properties.clone()),
        (ids[2].as_str(), "$groupidentify", group_properties.clone()),
        (merge.as_str(), "$identify", json!({"$anon_distinct_id": anonymous})),
    ];
    for (uuid, event, properties) in &sent {
        let row = rows.iter().find(|row| row["uuid"] == json!(uuid)).unwrap_or_else(|| panic!("{event} not read"));
        assert_eq!(row["event"], json!(event));
        assert_eq!(row["team_id"], json!(common::TEAM_ID));
        assert_eq!(row["distinct_id"], json!(user));
        assert_eq!(datetime(row["timestamp"].as_str().unwrap()), datetime(CORRECTED_TIMESTAMP));
        let created_at = datetime(row["created_at"].as_str().unwrap());
        let age = chrono::Utc::now().naive_utc() - created_at;
        assert!(
            age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
            "created_at is now: {created_at}"
        );
        let stored: Map<String, Value> = serde_json::from_str(row["properties"].as_str().unwrap()).expect("JSON");
        for (key, value) in properties.as_object().unwrap() {
            if key != "$elements" {
                assert_eq!(stored.get(key), Some(value), "{event}: property {key}");
            }
        }
        assert_eq!(stored.get("$ip"), Some(&json!("10.1.2.3")), "{event}: $ip");
        if *event == "$autocapture" {
            let chain = row["elements_chain"].as_str().unwrap();
            assert!(chain.starts_with("a.button.primary:"), "elements chain: {chain}");
            assert!(chain.contains(r#"attr__href="/pricing""#) && chain.contains(r#"text="Get \"it\"""#), "{chain}");
            assert!(chain.contains(";div:") && chain.contains(r#"attr_id="main""#), "{chain}");
            assert!(!stored.contains_key("$elements"), "elements go to the chain");
        } else {
            assert_eq!(row["elements_chain"], json!(""));
        }
    }

    // The JSON topics: each read with JSONEachRow, checked column by column against the message.
    let mut report = Vec::new();
    let mut person_ids: Vec<String> = Vec::new();
    for table in JSON_TABLES {
        let messages = match table.topic {
            "clickhouse_session_recording_events" => {
                messages_with(table.topic, start_of(table.topic), &markers, all_of(&[ids[1].clone()])).await
            }
            // Both distinct ids added, then one moved (a message that it left its person).
            "clickhouse_person_unique_id" => {
                messages_with(table.topic, start_of(table.topic), &markers, |found| {
                    found.len() >= 4 && found.iter().any(|value| contains(value, r#""is_deleted":1"#))
                })
                .await
            }
            // Persons have no marker of their own: the person ids of the distinct id messages.
            "clickhouse_person" => {
                messages_with(table.topic, start_of(table.topic), &person_ids, |found| {
                    person_ids.iter().all(|id| found.iter().any(|value| contains(value, id)))
                })
                .await
            }
            "clickhouse_groups" => {
                messages_with(table.topic, start_of(table.topic), &markers, |found| !found.is_empty()).await
            }
            "plugin_log_entries" => {
                let logged = format!("processed $autocapture for {user}");
                messages_with(table.topic, start_of(table.topic), &markers, all_of(&[logged])).await
            }
            "events_dead_letter_queue" => {
                let needles = [not_an_event_uuid.clone()];
                messages_with(table.topic, start_of(table.topic), &needles, |found| !found.is_empty()).await
            }
            other => panic!("no sample chosen for {other}"),
        };
        let written = json_objects(&messages);
        let mut lines = messages.join(&b'\n');
        lines.push(b'\n');
        let rows = decode(table, &write_file(&dir, &format!("{}.jsonl", table.topic), &lines));
        let skipped = check_rows(table, &written, &rows);
        report.push(format!("{}: {} rows, fields without a column: {skipped:?}", table.topic, rows.len()));

        match table.topic {
            "clickhouse_session_recording_events" => {
                let row = &rows[0];
                assert_eq!(row["uuid"], json!(ids[1]));
                assert_eq!(row["session_id"], json!(format!("session-{marker}")));
                let data: Value = serde_json::from_str(row["snapshot_data"].as_str().unwrap()).unwrap();
                assert_eq!(data, snapshot_properties["$snapshot_data"]);
                assert_eq!(datetime(row["timestamp"].as_str().unwrap()), datetime(CORRECTED_TIMESTAMP));
            }
            "clickhouse_person_unique_id" => {
                person_ids = rows.iter().filter_map(|row| row["person_id"].as_str().map(str::to_owned)).collect();
                person_ids.sort();
                person_ids.dedup();
                assert_eq!(person_ids.len(), 2, "two persons: {rows:?}");
                let distinct_ids: BTreeSet<&str> = rows.iter().filter_map(|row| row["distinct_id"].as_str()).collect();
                assert_eq!(distinct_ids, BTreeSet::from([user.as_str(), anonymous.as_str()]));
                assert!(
                    rows.iter().any(|row| row["is_deleted"] == json!(1)),
                    "the merge moved a distinct id: {rows:?}"
                );
            }
            "clickhouse_person" => {
                assert!(rows.iter().all(|row| row["team_id"] == json!(common::TEAM_ID)));
                assert!(
                    rows.iter().any(|row| row["is_deleted"] == json!(true)),
                    "the merged person is deleted: {rows:?}"
                );
            }
            "clickhouse_groups" => {
                let row = &rows[0];
                assert_eq!(row["group_key"], json!(format!("org-{marker}")));
                assert_eq!(row["group_type_index"], json!(0));
                let stored: Value = serde_json::from_str(row["group_properties"].as_str().unwrap()).unwrap();
                assert_eq!(stored, group_properties["$group_set"]);
            }
            "plugin_log_entries" => {
                assert!(rows.iter().all(|row| row["plugin_config_id"] == json!(common::PLUGIN_CONFIG_ID)));
                assert!(rows.iter().any(|row| row["message"] == json!(format!("processed $autocapture for {user}"))));
                assert!(rows.iter().all(|row| row["source"] == json!("CONSOLE") && row["type"] == json!("LOG")));
            }
            "events_dead_letter_queue" => {
                let row = &rows[0];
                assert_eq!(row["event_uuid"], json!(not_an_event_uuid));
                assert_eq!(row["distinct_id"], json!(user));
                assert_eq!(row["team_id"], json!(common::TEAM_ID));
                assert_eq!(row["raw_payload"], json!(not_an_event.to_string()));
                assert_eq!(datetime(row["now"].as_str().unwrap()), datetime("2021-10-28 12:00:00"));
            }
            _ => {}
        }
    }
    println!("{}", report.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);

    server.stop().await;
}
