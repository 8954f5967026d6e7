//! PostHog's BigQuery export plugin, unmodified (tests/data/plugins), through the whole server
//! against a local stand-in of BigQuery's REST API and Google's OAuth token endpoint
//! (`common::http_stub`): the stub verifies the service account's RS256 JWT with the key's public
//! half, hands out access tokens and refuses API calls without one, answers `tables.get`,
//! `tables.insert`, `tables.patch` and `tabledata.insertAll` in BigQuery's shapes, and keeps the
//! rows that arrive. The plugin creates its table when `getMetadata` says "Not found", adds missing
//! columns with `setMetadata`, and a partial failure of `insertAll` (its `PartialFailureError`)
//! becomes the plugin's `RetryError`, after which the server's export retry delivers every event
//! exactly once. Run with nextest (one process per test: the API root is process-wide).

mod common;
mod export_support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http_stub::HttpRequest;
use common::{wait_for, wait_for_up_to};
use export_support::{
    add_attachment, add_config, database_with_plugin, google_error, google_key, google_key_json, google_stub,
    ExportServer, GoogleTokens, GOOGLE_PROJECT as PROJECT, TEAM,
};
use openssl::pkey::{PKey, Private};
use serde_json::{json, Value};
const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
/// The plugin's `BIG_QUERY_TABLE_FIELDS`, by name.
const FIELDS: [&str; 12] = [
    "uuid",
    "event",
    "properties",
    "elements",
    "set",
    "set_once",
    "distinct_id",
    "team_id",
    "ip",
    "site_url",
    "timestamp",
    "bq_ingested_timestamp",
];

/// What the stub has seen and holds.
#[derive(Default)]
struct State {
    /// The dataset's id (one per test: the plugin caches table metadata in Redis by dataset).
    dataset: String,
    /// The table's columns once it exists.
    table: Option<Vec<Value>>,
    rows: Vec<Value>,
    /// insertAll calls still to answer with insertErrors.
    failing_inserts: u32,
    /// `METHOD path` of every API call (token requests excluded).
    calls: Vec<String>,
    created_with: Option<Value>,
    patched_with: Option<Value>,
    /// The tokens handed out, and what the stub refused and why.
    google: GoogleTokens,
}

struct BigQueryStub {
    state: Arc<Mutex<State>>,
    root: String,
}

impl BigQueryStub {
    /// The stub, its token endpoint accepting JWTs signed by `trusted`; the server's BigQuery
    /// requests go to it.
    async fn start(trusted: &PKey<Private>, table: Option<Vec<Value>>, failing_inserts: u32) -> BigQueryStub {
        let dataset = format!("ds_{}", uuid::Uuid::new_v4().simple());
        let state = Arc::new(Mutex::new(State { dataset, table, failing_inserts, ..State::default() }));
        let shared = Arc::clone(&state);
        let root = google_stub(trusted, &["bigquery"], move |request, public, audience| {
            answer(&mut shared.lock().unwrap(), public, audience, request)
        })
        .await;
        BigQueryStub { state, root }
    }

    fn key_json(&self, key: &PKey<Private>) -> Vec<u8> {
        google_key_json(key, &self.root)
    }

    fn with<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&self.state.lock().unwrap())
    }

    /// The rows once there are `count` (waiting up to 3 minutes: a retried batch comes back on
    /// the export retry schedule, which a loaded machine stretches).
    async fn rows(&self, count: usize) -> Vec<Value> {
        wait_for_up_to(&format!("{count} rows in BigQuery"), Duration::from_secs(180), || async {
            let rows = self.with(|state| state.rows.clone());
            (rows.len() >= count).then_some(rows)
        })
        .await
    }
}

fn answer(
    state: &mut State,
    public: &PKey<openssl::pkey::Public>,
    audience: &str,
    request: &HttpRequest,
) -> (u16, Vec<u8>) {
    if let Some(answer) = state.google.answer(public, audience, SCOPE, request) {
        return answer;
    }
    if let Err(refusal) = state.google.check_bearer(request) {
        return refusal;
    }
    state.calls.push(format!("{} {}", request.method, request.target));
    let dataset = state.dataset.clone();
    let tables = format!("/bigquery/v2/projects/{PROJECT}/datasets/{dataset}/tables");
    let table = format!("{tables}/events");
    let not_found =
        || google_error(404, &format!("Not found: Table {PROJECT}:{dataset}.events"), "notFound", "NOT_FOUND");
    let metadata = |fields: &[Value]| {
        json!({"kind": "bigquery#table", "id": format!("{PROJECT}:{dataset}.events"),
            "tableReference": {"projectId": PROJECT, "datasetId": dataset, "tableId": "events"},
            "schema": {"fields": fields}})
        .to_string()
        .into_bytes()
    };
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    match (request.method.as_str(), request.target.as_str()) {
        ("GET", target) if target == table => match &state.table {
            Some(fields) => (200, metadata(fields)),
            None => not_found(),
        },
        ("POST", target) if target == tables => {
            if state.table.is_some() {
                return google_error(
                    409,
                    &format!("Already Exists: Table {PROJECT}:{dataset}.events"),
                    "duplicate",
                    "ALREADY_EXISTS",
                );
            }
            let fields = body["schema"]["fields"].as_array().cloned().unwrap_or_default();
            state.table = Some(fields.clone());
            state.created_with = Some(body);
            (200, metadata(&fields))
        }
        ("PATCH", target) if target == table => {
            let fields = body["schema"]["fields"].as_array().cloned().unwrap_or_default();
            state.table = Some(fields.clone());
            state.patched_with = Some(body);
            (200, metadata(&fields))
        }
        ("POST", target) if target == format!("{table}/insertAll") => {
            let Some(fields) = &state.table else { return not_found() };
            let names: BTreeSet<&str> = fields.iter().filter_map(|field| field["name"].as_str()).collect();
            let rows = body["rows"].as_array().cloned().unwrap_or_default();
            if state.failing_inserts > 0 {
                state.failing_inserts -= 1;
                // As BigQuery answers when one row is invalid: nothing is inserted, the other
                // rows are `stopped`.
                let errors: Vec<Value> = (0..rows.len())
                    .map(|index| match index {
                        0 => json!({"index": 0, "errors": [{"reason": "invalid", "location": "nope", "debugInfo": "", "message": "no such field: nope."}]}),
                        _ => json!({"index": index, "errors": [{"reason": "stopped", "location": "", "debugInfo": "", "message": ""}]}),
                    })
                    .collect();
                return (
                    200,
                    json!({"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors})
                        .to_string()
                        .into_bytes(),
                );
            }
            for row in &rows {
                let keys: Vec<&str> =
                    row.as_object().map(|row| row.keys().map(String::as_str).collect()).unwrap_or_default();
                let json = row["json"].as_object();
                let unknown = json.map(|json| json.keys().filter(|key| !names.contains(key.as_str())).count());
                if keys != ["json"] || unknown != Some(0) {
                    state.google.refusals.push(format!("row {row}"));
                    return google_error(400, "bad row", "invalid", "INVALID_ARGUMENT");
                }
            }
            state.rows.extend(rows.into_iter().map(|row| row["json"].clone()));
            (200, json!({"kind": "bigquery#tableDataInsertAllResponse"}).to_string().into_bytes())
        }
        _ => google_error(404, &format!("Not found: URL {}", request.target), "notFound", "NOT_FOUND"),
    }
}

/// The standard team, the plugin (id 70), config 80 with `config` and the key file as its
/// `googleCloudKeyJson` attachment, then the server.
async fn start(config: Value, key_json: Vec<u8>) -> ExportServer {
    let db = database_with_plugin(
        "bigquery-plugin",
        "bigquery-plugin",
        &["index.ts", "plugin.json", "package.json"],
        "0.0.1",
    )
    .await;
    add_config(&db, 80, &config).await;
    add_attachment(&db, 80, "googleCloudKeyJson", "application/json", key_json).await;
    ExportServer::launch(db, "bq", &[])
}

/// The plugin's config for the stub's dataset.
fn plugin_config(stub: &BigQueryStub) -> Value {
    json!({"datasetId": stub.with(|state| state.dataset.clone()), "tableId": "events", "exportEventsToIgnore": "$feature_flag_called",
        "exportEventsBufferSeconds": "1", "exportEventsBufferBytes": "1048576", "exportElementsOnAnyEvent": "No"})
}

/// Each of `count` events but the ignored `n = 3` exactly once, as the plugin maps them.
fn assert_all_once(rows: &[Value], count: u32) {
    let numbers: Vec<u64> = rows
        .iter()
        .map(|row| {
            let properties: Value = serde_json::from_str(row["properties"].as_str().expect("properties JSON")).unwrap();
            properties["n"].as_u64().expect("n")
        })
        .collect();
    let unique: BTreeSet<u64> = numbers.iter().copied().collect();
    let expected: BTreeSet<u64> = (0..u64::from(count)).filter(|n| *n != 3).collect();
    assert_eq!(unique, expected, "every event but the ignored one");
    assert_eq!(numbers.len(), unique.len(), "no event twice: {numbers:?}");
    for row in rows {
        let keys: BTreeSet<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, FIELDS.iter().copied().collect::<BTreeSet<_>>(), "{row}");
        let properties: Value = serde_json::from_str(row["properties"].as_str().unwrap()).unwrap();
        assert_eq!(row["event"], format!("event-{}", properties["n"]));
        assert_eq!(properties["text"], "zażółć 🦔");
        assert_eq!(row["team_id"], TEAM);
        assert_eq!(row["distinct_id"], "user-1");
        assert_eq!(row["elements"], "[]");
        assert_eq!(row["site_url"], "");
        assert_eq!(serde_json::from_str::<Value>(row["set"].as_str().unwrap()).unwrap(), json!({"a": properties["n"]}));
        assert!(row["uuid"].as_str().is_some_and(|uuid| uuid.len() == 36), "{row}");
        assert!(row["bq_ingested_timestamp"].as_str().is_some_and(|ts| ts.ends_with('Z')), "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bigquery_plugin_creates_its_table_and_exports_every_event() {
    let key = google_key();
    let stub = BigQueryStub::start(&key, None, 0).await;
    let server = start(plugin_config(&stub), stub.key_json(&key)).await;
    server.send_numbered(0..30).await;
    let rows = stub.rows(29).await;
    assert_all_once(&rows, 30);
    server.wait_for_log(80, "Inserted ").await;
    let created = stub.with(|state| state.created_with.clone()).expect("tables.insert");
    let dataset = stub.with(|state| state.dataset.clone());
    assert_eq!(created["tableReference"], json!({"datasetId": dataset, "projectId": PROJECT, "tableId": "events"}));
    assert_eq!(created["timePartitioning"], json!({"type": "DAY", "field": "timestamp"}));
    let names: Vec<&str> =
        created["schema"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, FIELDS);
    stub.with(|state| {
        assert!(state.google.refusals.is_empty(), "{:?}", state.google.refusals);
        assert!(state.calls.iter().any(|call| call.starts_with("GET ")), "{:?}", state.calls);
        // Tokens are kept: not one per request.
        assert!(
            state.google.issued.len() < state.calls.len(),
            "{} tokens for {:?}",
            state.google.issued.len(),
            state.calls
        );
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_columns_are_added_and_a_partial_failure_is_retried_without_losing_events() {
    let key = google_key();
    // The table lacks the last two columns; the first insertAll fails for every row.
    let fields: Vec<Value> = FIELDS[..10].iter().map(|name| json!({"name": name, "type": "STRING"})).collect();
    let stub = BigQueryStub::start(&key, Some(fields), 1).await;
    let server = start(plugin_config(&stub), stub.key_json(&key)).await;
    server.send_numbered(0..20).await;
    // The plugin logs the PartialFailureError and throws RetryError; the export retry job runs
    // exportEvents again.
    server.wait_for_log(80, "Error inserting").await;
    let rows = stub.rows(19).await;
    assert_all_once(&rows, 20);
    let patched = stub.with(|state| state.patched_with.clone()).expect("tables.patch");
    let names: Vec<&str> =
        patched["schema"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, FIELDS);
    stub.with(|state| {
        assert!(state.google.refusals.is_empty(), "{:?}", state.google.refusals);
        assert!(state.created_with.is_none());
    });
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_token_endpoint_refuses_fails_set_up_with_googles_message() {
    let stub = BigQueryStub::start(&google_key(), None, 0).await;
    // Signed with another key: the stub's token endpoint refuses the JWT.
    let server = start(plugin_config(&stub), stub.key_json(&google_key())).await;
    let error = wait_for("the config's error", || async { server.config_error(80).await }).await;
    assert!(error.to_string().contains("invalid_grant: Invalid JWT Signature."), "{error}");
    stub.with(|state| {
        assert!(
            !state.google.refusals.is_empty() && state.google.refusals.iter().all(|why| why == "bad signature"),
            "{:?}",
            state.google.refusals
        );
        assert!(state.calls.is_empty(), "{:?}", state.calls);
    });
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_down_is_the_fetch_error_the_plugin_checks_for() {
    let key = google_key();
    let stub = BigQueryStub::start(&key, None, 0).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut key_json: Value = serde_json::from_slice(&stub.key_json(&key)).unwrap();
    key_json["token_uri"] = json!(format!("http://127.0.0.1:{closed}/token"));
    let server = start(plugin_config(&stub), key_json.to_string().into_bytes()).await;
    // node-fetch's FetchError (what google-auth-library's gaxios throws), which the plugin checks
    // with `instanceof FetchError` and turns into RetryError.
    let log = server.wait_for_log(80, "Error encountered in setupPlugin:").await;
    let line = log.iter().find(|line| line.contains("Error encountered in setupPlugin:")).unwrap();
    assert!(line.contains(&format!("FetchError: request to http://127.0.0.1:{closed}/token failed")), "{line}");
    stub.with(|state| assert!(state.calls.is_empty() && state.google.issued.is_empty()));
    server.stop().await;
}
