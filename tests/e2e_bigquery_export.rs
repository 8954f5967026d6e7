//! PostHog's BigQuery export plugin, unmodified (tests/data/plugins), through the whole server
//! against a local stand-in of BigQuery's REST API and Google's OAuth token endpoint
//! (`common::http_stub`): the stub verifies the service account's RS256 JWT with the key's public
//! half, hands out access tokens and refuses API calls without one, answers `tables.get`,
//! `tables.insert`, `tables.patch` and `tabledata.insertAll` in BigQuery's shapes, and keeps the
//! rows that arrive. The plugin creates its table when `getMetadata` says "Not found", adds missing
//! columns with `setMetadata`, and a partial failure of `insertAll` (its `PartialFailureError`)
//! becomes the plugin's `RetryError`, after which the server's export retry delivers every event
//! exactly once. A plugin of the test's own ([`QUERY_PLUGIN`]) runs queries (`query`,
//! `createQueryJob`, jobs, results) and dataset calls against the same stand-in, which also answers
//! `jobs.insert`, `jobs.get`, `jobs.getQueryResults` and datasets' calls and checks their bodies,
//! and inserts with `schema` into a missing table. Run with nextest (one process per test: the API
//! root is process-wide).

mod common;
mod export_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http_stub::HttpRequest;
use common::{wait_for, wait_for_up_to};
use export_support::{
    add_attachment, add_config, archive_of_files, database_with_archive, database_with_plugin, google_error,
    google_key, google_key_json, google_stub, ExportServer, GoogleTokens, GOOGLE_PROJECT as PROJECT, TEAM,
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
    /// The jobs inserted (jobs.insert), by job id.
    jobs: BTreeMap<String, StubJob>,
    /// datasets.insert bodies.
    datasets_created: Vec<Value>,
    /// The tokens handed out, and what the stub refused and why.
    google: GoogleTokens,
}

/// A query job the stub has: its jobs.insert body and how often it was read.
#[derive(Default, Clone)]
struct StubJob {
    body: Value,
    /// jobs.get calls so far (the first answers RUNNING).
    gets: u32,
    /// jobs.getQueryResults calls so far (the first for the named query answers `jobComplete: false`).
    result_calls: u32,
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
    if let Some(answer) = answer_jobs_and_datasets(state, request) {
        return answer;
    }
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
                // `insertId` as the library makes it (a UUID) unless the plugin asks for none.
                let insert_id_ok = match row.get("insertId") {
                    None => true,
                    Some(id) => id.as_str().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()),
                };
                let known_keys = keys.contains(&"json") && keys.iter().all(|key| matches!(*key, "json" | "insertId"));
                if !known_keys || !insert_id_ok || unknown != Some(0) {
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

/// The named-parameter query of the query plugin ([`QUERY_PLUGIN`]).
const NAMED_QUERY: &str = "SELECT name, visits, ratio, active, seen, day, amount, tags, address FROM people \
    WHERE team = @team AND seen > @since AND name IN UNNEST(@names) AND ratio > @ratio AND active = @active \
    AND address.city = @place.city AND day = @day";
const POSITIONAL_QUERY: &str = "SELECT ? AS greeting, ? AS n";
const FAILING_QUERY: &str = "SELECT nope";

/// The schema and the two pages of the named query's results, in BigQuery's REST shapes.
fn named_results(page: u32) -> Value {
    let schema = json!({"fields": [
        {"name": "name", "type": "STRING", "mode": "NULLABLE"},
        {"name": "visits", "type": "INTEGER", "mode": "NULLABLE"},
        {"name": "ratio", "type": "FLOAT", "mode": "NULLABLE"},
        {"name": "active", "type": "BOOLEAN", "mode": "NULLABLE"},
        {"name": "seen", "type": "TIMESTAMP", "mode": "NULLABLE"},
        {"name": "day", "type": "DATE", "mode": "NULLABLE"},
        {"name": "amount", "type": "NUMERIC", "mode": "NULLABLE"},
        {"name": "tags", "type": "STRING", "mode": "REPEATED"},
        {"name": "address", "type": "RECORD", "mode": "NULLABLE", "fields": [
            {"name": "city", "type": "STRING", "mode": "NULLABLE"},
            {"name": "zip", "type": "INTEGER", "mode": "NULLABLE"}]}]});
    let row = |name: &str,
               visits: Value,
               ratio: &str,
               active: &str,
               seen: Value,
               amount: &str,
               tags: &[&str],
               city: &str,
               zip: Value| {
        json!({"f": [{"v": name}, {"v": visits}, {"v": ratio}, {"v": active}, {"v": seen}, {"v": "2021-11-01"},
            {"v": amount}, {"v": tags.iter().map(|tag| json!({"v": tag})).collect::<Vec<_>>()},
            {"v": {"f": [{"v": city}, {"v": zip}]}}]})
    };
    let (rows, token) = if page == 1 {
        (
            vec![
                row(
                    "ann",
                    json!("42"),
                    "0.5",
                    "true",
                    json!("1.6357608E9"),
                    "123.450",
                    &["a", "b"],
                    "Łódź",
                    json!("90"),
                ),
                row("bob", json!("7"), "1.25", "false", json!("1.6357644E9"), "-0.5", &[], "Kraków", Value::Null),
            ],
            Some("page-2"),
        )
    } else {
        (vec![row("cat", Value::Null, "2", "false", Value::Null, "1e-9", &["c"], "Gdańsk", json!("80"))], None)
    };
    let mut answer = json!({"kind": "bigquery#getQueryResultsResponse", "schema": schema, "rows": rows,
        "totalRows": "3", "jobComplete": true, "cacheHit": false});
    if let Some(token) = token {
        answer["pageToken"] = json!(token);
    }
    answer
}

/// jobs.insert, jobs.get, jobs.getQueryResults and the datasets' calls; `None` for the other
/// requests.
fn answer_jobs_and_datasets(state: &mut State, request: &HttpRequest) -> Option<(u16, Vec<u8>)> {
    let project = format!("/bigquery/v2/projects/{PROJECT}");
    let path = request.target.split('?').next().unwrap_or_default().to_string();
    let rest = path.strip_prefix(&project)?.to_string();
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let dataset = state.dataset.clone();
    let ok = |value: Value| (200, value.to_string().into_bytes());
    let job_resource = |job: &StubJob, status: Value| {
        let reference = &job.body["jobReference"];
        let location = reference["location"].as_str().unwrap_or("US");
        json!({"kind": "bigquery#job", "id": format!("{PROJECT}:{location}.{}", reference["jobId"].as_str().unwrap_or_default()),
            "jobReference": {"projectId": PROJECT, "jobId": reference["jobId"], "location": location},
            "configuration": job.body["configuration"], "status": status})
    };
    let query_text =
        |job: &StubJob| job.body["configuration"]["query"]["query"].as_str().unwrap_or_default().to_string();
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["jobs"]) => {
            let Some(id) = body["jobReference"]["jobId"].as_str().map(str::to_string) else {
                return Some(google_error(400, "Job id missing", "invalid", "INVALID_ARGUMENT"));
            };
            let job = StubJob { body, ..StubJob::default() };
            let answer = job_resource(&job, json!({"state": "RUNNING"}));
            state.jobs.insert(id, job);
            Some(ok(answer))
        }
        ("GET", ["jobs", id]) => {
            let Some(job) = state.jobs.get_mut(*id) else {
                return Some(google_error(404, &format!("Not found: Job {PROJECT}:{id}"), "notFound", "NOT_FOUND"));
            };
            job.gets += 1;
            let job = job.clone();
            let status = if query_text(&job) == FAILING_QUERY {
                let error = json!({"reason": "invalidQuery", "location": "query", "message": "Unrecognized name: nope at [1:8]"});
                json!({"state": "DONE", "errorResult": error, "errors": [error]})
            } else if job.gets == 1 {
                json!({"state": "RUNNING"})
            } else {
                json!({"state": "DONE"})
            };
            Some(ok(job_resource(&job, status)))
        }
        ("GET", ["queries", id]) => {
            let Some(job) = state.jobs.get_mut(*id) else {
                return Some(google_error(404, &format!("Not found: Job {PROJECT}:{id}"), "notFound", "NOT_FOUND"));
            };
            job.result_calls += 1;
            let job = job.clone();
            let reference = json!({"projectId": PROJECT, "jobId": id});
            Some(match query_text(&job).as_str() {
                NAMED_QUERY if job.result_calls == 1 => ok(json!({"kind": "bigquery#getQueryResultsResponse",
                    "jobReference": reference, "jobComplete": false})),
                NAMED_QUERY => {
                    ok(named_results(if request.query_param("pageToken").as_deref() == Some("page-2") { 2 } else { 1 }))
                }
                POSITIONAL_QUERY => ok(json!({"kind": "bigquery#getQueryResultsResponse", "jobReference": reference,
                    "schema": {"fields": [{"name": "greeting", "type": "STRING"}, {"name": "n", "type": "INTEGER"}]},
                    "rows": [{"f": [{"v": "hello"}, {"v": "3"}]}], "totalRows": "1", "jobComplete": true})),
                _ => google_error(400, "Unrecognized name: nope at [1:8]", "invalidQuery", "INVALID_ARGUMENT"),
            })
        }
        ("POST", ["datasets"]) => {
            let id = body["datasetReference"]["datasetId"].clone();
            let location = body["location"].clone();
            state.datasets_created.push(body);
            Some(ok(json!({"kind": "bigquery#dataset", "id": format!("{PROJECT}:{}", id.as_str().unwrap_or_default()),
                "datasetReference": {"projectId": PROJECT, "datasetId": id}, "location": location})))
        }
        ("GET", ["datasets"]) => {
            let mut datasets =
                vec![json!({"datasetReference": {"projectId": PROJECT, "datasetId": dataset}, "location": "EU"})];
            datasets.extend(state.datasets_created.iter().map(
                |created| json!({"datasetReference": created["datasetReference"], "location": created["location"]}),
            ));
            Some(ok(json!({"kind": "bigquery#datasetList", "datasets": datasets})))
        }
        ("GET", ["datasets", id, "tables"]) if *id == dataset => {
            let table = |name: &str| json!({"kind": "bigquery#table", "tableReference": {"projectId": PROJECT, "datasetId": dataset, "tableId": name}, "type": "TABLE"});
            Some(ok(if request.query_param("pageToken").as_deref() == Some("tables-2") {
                json!({"kind": "bigquery#tableList", "tables": [table("visits")], "totalItems": 2})
            } else {
                json!({"kind": "bigquery#tableList", "tables": [table("people")], "nextPageToken": "tables-2", "totalItems": 2})
            }))
        }
        ("DELETE", ["datasets", "made_here"]) => Some((204, Vec::new())),
        _ => None,
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

/// A plugin of this test's own that queries BigQuery (`query` with named parameters, a dataset's
/// `createQueryJob` with positional ones and the job's `promise` and `getQueryResults`, a failing
/// job), manages datasets, then inserts into a missing table with `insert`'s `schema` option; it
/// logs what it got as `QUERIES {…}` and `INSERTED {…}`.
const QUERY_PLUGIN: &str = r#"
import { BigQuery, Job } from '@google-cloud/bigquery'

// A value as [its type (class name for objects), what it holds].
const shape = (value) => {
    if (value === null) return ['null', null]
    if (Array.isArray(value)) return ['Array', value.map(shape)]
    if (typeof value !== 'object') return [typeof value, value]
    const name = value.constructor.name
    if (name === 'Object') return ['Object', Object.fromEntries(Object.entries(value).map(([key, v]) => [key, shape(v)]))]
    return [name, String(value.value !== undefined ? value.value : value)]
}

export async function setupPlugin({ attachments, config }) {
    const credentials = JSON.parse(attachments.googleCloudKeyJson.contents.toString())
    const bigquery = new BigQuery({ projectId: credentials.project_id, credentials })
    const dataset = bigquery.dataset(config.datasetId)
    const out = {}
    const [rows] = await bigquery.query({
        query: config.namedQuery,
        params: { team: 2, since: new Date('2021-11-01T00:00:00.000Z'), names: ['ann', 'bob'], ratio: 0.25, active: true, place: { city: 'Łódź' }, day: BigQuery.date('2021-11-01') },
        location: 'EU',
    })
    out.named = rows.map((row) => shape(row)[1])
    const [job] = await dataset.createQueryJob({ query: config.positionalQuery, params: ['hello', 3], jobPrefix: 'positional_' })
    out.job = { isJob: job instanceof Job, prefixed: job.id.startsWith('positional_'), location: job.location }
    const [metadata] = await job.promise()
    out.state = metadata.status.state
    const [positional] = await bigquery.job(job.id).getQueryResults()
    out.positional = positional.map((row) => shape(row)[1])
    try {
        const [failing] = await bigquery.createQueryJob(config.failingQuery)
        await failing.promise()
        out.failed = 'no error'
    } catch (error) {
        out.failed = { name: error.constructor.name, message: error.message, reason: error.errors && error.errors[0].reason }
    }
    const [created] = await bigquery.createDataset('made_here', { location: 'EU' })
    out.created = created.id
    out.tables = (await dataset.getTables())[0].map((table) => table.id)
    out.datasets = (await bigquery.getDatasets())[0].map((ds) => [ds.id, ds.location])
    out.deleted = (await created.delete({ force: true })).length
    console.log('QUERIES ' + JSON.stringify(out))
    const [inserted] = await dataset.table('events').insert([{ uuid: 'u-1', event: 'inserted', team_id: 2 }], { schema: 'uuid:string, event:string, team_id:integer' })
    console.log('INSERTED ' + JSON.stringify(inserted))
}
"#;

/// Queries with parameters, their results read as the library reads them, jobs, datasets, and an
/// insert that creates its missing table (`schema`) and inserts a minute later, as the library does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_jobs_datasets_and_an_insert_that_creates_its_table() {
    let key = google_key();
    let stub = BigQueryStub::start(&key, None, 0).await;
    let dataset = stub.with(|state| state.dataset.clone());
    let plugin_json = json!({"name": "BigQuery queries", "url": "https://example.com/bigquery-queries", "main": "index.js",
        "config": [{"key": "googleCloudKeyJson", "type": "attachment"}, {"key": "datasetId", "type": "string"}]});
    let archive = archive_of_files(
        "plugin",
        &[("index.js", QUERY_PLUGIN.as_bytes().to_vec()), ("plugin.json", plugin_json.to_string().into_bytes())],
    );
    let db = database_with_archive(&plugin_json, archive, "0.0.1").await;
    let config = json!({"datasetId": dataset, "namedQuery": NAMED_QUERY, "positionalQuery": POSITIONAL_QUERY,
        "failingQuery": FAILING_QUERY});
    add_config(&db, 80, &config).await;
    add_attachment(&db, 80, "googleCloudKeyJson", "application/json", stub.key_json(&key)).await;
    // setupPlugin waits a minute after creating the table.
    let server = ExportServer::launch(db, "bqq", &[("TASK_TIMEOUT", "150")]);

    let log = server.wait_long_for_log(80, "QUERIES ", 60).await;
    let line = log.iter().find_map(|line| line.split_once("QUERIES ").map(|(_, json)| json.to_string())).unwrap();
    let out: Value = serde_json::from_str(&line).unwrap();
    let s = |text: &str| json!(["string", text]);
    let n = |number: Value| json!(["number", number]);
    let address = |city: &str, zip: Value| json!(["Object", {"city": s(city), "zip": zip}]);
    let day = json!(["BigQueryDate", "2021-11-01"]);
    assert_eq!(
        out["named"],
        json!([
            {"name": s("ann"), "visits": n(json!(42)), "ratio": n(json!(0.5)), "active": ["boolean", true],
                "seen": ["BigQueryTimestamp", "2021-11-01T10:00:00.000Z"], "day": day, "amount": ["Big", "123.45"],
                "tags": ["Array", [s("a"), s("b")]], "address": address("Łódź", n(json!(90)))},
            {"name": s("bob"), "visits": n(json!(7)), "ratio": n(json!(1.25)), "active": ["boolean", false],
                "seen": ["BigQueryTimestamp", "2021-11-01T11:00:00.000Z"], "day": day, "amount": ["Big", "-0.5"],
                "tags": ["Array", []], "address": address("Kraków", json!(["null", null]))},
            {"name": s("cat"), "visits": ["null", null], "ratio": n(json!(2)), "active": ["boolean", false],
                "seen": ["null", null], "day": day, "amount": ["Big", "1e-9"],
                "tags": ["Array", [s("c")]], "address": address("Gdańsk", n(json!(80)))},
        ])
    );
    assert_eq!(out["job"], json!({"isJob": true, "prefixed": true, "location": "US"}));
    assert_eq!(out["state"], "DONE");
    assert_eq!(out["positional"], json!([{"greeting": s("hello"), "n": n(json!(3))}]));
    assert_eq!(
        out["failed"],
        json!({"name": "ApiError", "message": "Unrecognized name: nope at [1:8]", "reason": "invalidQuery"})
    );
    assert_eq!(out["created"], "made_here");
    assert_eq!(out["tables"], json!(["people", "visits"]));
    assert_eq!(out["datasets"], json!([[dataset, "EU"], ["made_here", "EU"]]));
    assert_eq!(out["deleted"], 1);

    stub.with(|state| {
        let job_of = |text: &str| {
            state.jobs.values().find(|job| job.body["configuration"]["query"]["query"] == text).unwrap().body.clone()
        };
        // The library's jobs.insert bodies (@google-cloud/bigquery 5.9.1 makes the same for the same
        // calls): typed parameters, standard SQL, the location in the job reference.
        let named = job_of(NAMED_QUERY);
        let parameter = |name: &str, kind: Value, value: Value| json!({"name": name, "parameterType": kind, "parameterValue": value});
        assert_eq!(
            named["configuration"],
            json!({"query": {"useLegacySql": false, "query": NAMED_QUERY, "parameterMode": "named", "queryParameters": [
                parameter("team", json!({"type": "INT64"}), json!({"value": 2})),
                parameter("since", json!({"type": "TIMESTAMP"}), json!({"value": "2021-11-01T00:00:00.000Z"})),
                parameter("names", json!({"type": "ARRAY", "arrayType": {"type": "STRING"}}),
                    json!({"arrayValues": [{"value": "ann"}, {"value": "bob"}]})),
                parameter("ratio", json!({"type": "FLOAT64"}), json!({"value": 0.25})),
                parameter("active", json!({"type": "BOOL"}), json!({"value": true})),
                parameter("place", json!({"type": "STRUCT", "structTypes": [{"name": "city", "type": {"type": "STRING"}}]}),
                    json!({"structValues": {"city": {"value": "Łódź"}}})),
                parameter("day", json!({"type": "DATE"}), json!({"value": "2021-11-01"})),
            ]}})
        );
        assert_eq!(named["jobReference"]["projectId"], PROJECT);
        assert_eq!(named["jobReference"]["location"], "EU");
        assert!(named["jobReference"]["jobId"].as_str().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()), "{named}");
        let positional = job_of(POSITIONAL_QUERY);
        assert_eq!(
            positional["configuration"],
            json!({"query": {"useLegacySql": false, "query": POSITIONAL_QUERY, "defaultDataset": {"datasetId": dataset},
                "parameterMode": "positional", "queryParameters": [
                    {"parameterType": {"type": "STRING"}, "parameterValue": {"value": "hello"}},
                    {"parameterType": {"type": "INT64"}, "parameterValue": {"value": 3}}]}})
        );
        // Results polled while the job runs, then read page by page, in the job's location.
        let named_id = named["jobReference"]["jobId"].as_str().unwrap();
        let result_calls: Vec<&String> =
            state.calls.iter().filter(|call| call.starts_with(&format!("GET /bigquery/v2/projects/{PROJECT}/queries/{named_id}"))).collect();
        assert_eq!(result_calls.len(), 3, "{result_calls:?}");
        assert!(result_calls.iter().all(|call| call.contains("location=EU")), "{result_calls:?}");
        assert!(result_calls[2].contains("pageToken=page-2"), "{result_calls:?}");
        assert_eq!(state.datasets_created, vec![json!({"location": "EU", "datasetReference": {"datasetId": "made_here"}})]);
        assert!(state.calls.iter().any(|call| call.starts_with(&format!("DELETE /bigquery/v2/projects/{PROJECT}/datasets/made_here?deleteContents=true"))), "{:?}", state.calls);
        assert!(state.google.refusals.is_empty(), "{:?}", state.google.refusals);
    });

    // The insert: not found, the table created with the schema, the insert again a minute later.
    let log = server.wait_long_for_log(80, "INSERTED ", 150).await;
    let line = log.iter().find(|line| line.contains("INSERTED ")).unwrap();
    assert!(line.contains("bigquery#tableDataInsertAllResponse"), "{line}");
    stub.with(|state| {
        let created = state.created_with.clone().expect("tables.insert");
        assert_eq!(
            created["schema"]["fields"],
            json!([{"name": "uuid", "type": "STRING"}, {"name": "event", "type": "STRING"}, {"name": "team_id", "type": "INTEGER"}])
        );
        assert_eq!(created["tableReference"]["tableId"], "events");
        assert_eq!(state.rows, vec![json!({"uuid": "u-1", "event": "inserted", "team_id": 2})]);
        let table_calls: Vec<&str> = state
            .calls
            .iter()
            .filter(|call| call.starts_with("POST ") && call.contains("/tables"))
            .map(|call| call.split(&dataset).nth(1).unwrap_or_default())
            .filter(|rest| rest.starts_with("/tables/events") || *rest == "/tables")
            .collect();
        assert_eq!(table_calls, ["/tables/events/insertAll", "/tables", "/tables/events/insertAll"]);
        assert!(state.google.refusals.is_empty(), "{:?}", state.google.refusals);
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}
