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

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::http_stub::{http_stub, HttpRequest};
use common::{wait_for, wait_for_up_to, TestDb};
use openssl::pkey::{PKey, Private};
use plugin_server::sinks::CeleryProducer;
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

const TEAM: i32 = common::TEAM_ID;
const NOW: &str = "2021-11-01T10:00:00.000Z";
const PROJECT: &str = "proj-1";
const EMAIL: &str = "exporter@proj-1.iam.gserviceaccount.com";
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

fn archive_of(folder: &Path) -> Vec<u8> {
    use std::io::Write;
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default();
        for name in ["index.ts", "plugin.json", "package.json"] {
            zip.start_file(format!("bigquery-plugin/{name}"), options).unwrap();
            zip.write_all(&std::fs::read(folder.join(name)).unwrap()).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

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
    tokens: Vec<String>,
    /// `METHOD path` of every API call (token requests excluded).
    calls: Vec<String>,
    created_with: Option<Value>,
    patched_with: Option<Value>,
    /// What the stub refused and why.
    refusals: Vec<String>,
}

struct BigQueryStub {
    state: Arc<Mutex<State>>,
    root: String,
}

fn google_error(code: u16, message: &str, reason: &str, status: &str) -> (u16, Vec<u8>) {
    let body = json!({"error": {"code": code, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}], "status": status}});
    (code, body.to_string().into_bytes())
}

fn verify_assertion(public: &PKey<openssl::pkey::Public>, jwt: &str, audience: &str) -> Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else { return Err(format!("not a JWT: {jwt}")) };
    let decode = |part: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string());
    let mut verifier = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), public).unwrap();
    verifier.update(format!("{header}.{claims}").as_bytes()).unwrap();
    if !verifier.verify(&decode(signature)?).unwrap_or(false) {
        return Err("bad signature".into());
    }
    let header: Value = serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
    let claims: Value = serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" || header["kid"] != "key-1" {
        return Err(format!("header {header}"));
    }
    let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if claims["iss"] != EMAIL
        || claims["aud"] != audience
        || claims["scope"] != SCOPE
        || exp != iat + 3600
        || iat.abs_diff(now) > 60
    {
        return Err(format!("claims {claims}"));
    }
    Ok(())
}

impl BigQueryStub {
    /// The stub, its token endpoint accepting JWTs signed by `trusted`; the server's BigQuery
    /// requests go to it.
    async fn start(trusted: &PKey<Private>, table: Option<Vec<Value>>, failing_inserts: u32) -> BigQueryStub {
        let dataset = format!("ds_{}", uuid::Uuid::new_v4().simple());
        let state = Arc::new(Mutex::new(State { dataset, table, failing_inserts, ..State::default() }));
        let public = PKey::public_key_from_pem(&trusted.public_key_to_pem().unwrap()).unwrap();
        let shared = Arc::clone(&state);
        let audience = Arc::new(Mutex::new(String::new()));
        let audience_in = Arc::clone(&audience);
        let (address, _requests) = http_stub("127.0.0.1:0", move |request: &HttpRequest| {
            let mut state = shared.lock().unwrap();
            answer(&mut state, &public, &audience_in.lock().unwrap(), request)
        })
        .await;
        let root = format!("http://{address}");
        *audience.lock().unwrap() = format!("{root}/token");
        plugin_server::plugins::extensions::google::set_test_api_root("bigquery", &root);
        BigQueryStub { state, root }
    }

    fn key_json(&self, key: &PKey<Private>) -> Vec<u8> {
        let pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        json!({"type": "service_account", "project_id": PROJECT, "private_key_id": "key-1", "private_key": pem,
            "client_email": EMAIL, "client_id": "1234", "token_uri": format!("{}/token", self.root)})
        .to_string()
        .into_bytes()
    }

    fn with<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&self.state.lock().unwrap())
    }

    /// The rows once there are `count` (waiting up to 90 s: a retried batch comes back on the
    /// export retry schedule, which a loaded machine stretches).
    async fn rows(&self, count: usize) -> Vec<Value> {
        // Long: a retried batch waits for the export retry job, which runs only once this server
        // holds the job queue consumer's Redis lock (one key for every server, taken over from
        // servers of earlier tests only when it expires).
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
    if request.target == "/token" {
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body).into_owned().collect();
        let field = |name: &str| form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
        let verdict = match (field("grant_type"), field("assertion")) {
            (Some("urn:ietf:params:oauth:grant-type:jwt-bearer"), Some(jwt)) => verify_assertion(public, jwt, audience),
            _ => Err(format!("form {form:?}")),
        };
        return match verdict {
            Ok(()) => {
                let token = format!("ya29.token-{}", state.tokens.len());
                state.tokens.push(token.clone());
                (
                    200,
                    json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}).to_string().into_bytes(),
                )
            }
            Err(why) => {
                state.refusals.push(why);
                (400, br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#.to_vec())
            }
        };
    }
    let authorized = request
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|token| state.tokens.iter().any(|known| known == token));
    if !authorized {
        state.refusals.push(format!("{} {} without a token", request.method, request.target));
        return google_error(
            401,
            "Request is missing required authentication credential.",
            "required",
            "UNAUTHENTICATED",
        );
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
                    state.refusals.push(format!("row {row}"));
                    return google_error(400, "bad row", "invalid", "INVALID_ARGUMENT");
                }
            }
            state.rows.extend(rows.into_iter().map(|row| row["json"].clone()));
            (200, json!({"kind": "bigquery#tableDataInsertAllResponse"}).to_string().into_bytes())
        }
        _ => google_error(404, &format!("Not found: URL {}", request.target), "notFound", "NOT_FOUND"),
    }
}

struct Server {
    db: TestDb,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), plugin_server::server::ServerError>>,
    producer: CeleryProducer,
}

impl Server {
    /// The standard team, the plugin (id 70), config 80 with `config` and the key file as its
    /// `googleCloudKeyJson` attachment, then the server.
    async fn start(config: Value, key_json: Vec<u8>) -> Server {
        let db = TestDb::empty().await;
        common::reset_test_database(&db.pool, None, false).await;
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plugins/bigquery-plugin");
        let plugin_json: Value = serde_json::from_slice(&std::fs::read(folder.join("plugin.json")).unwrap()).unwrap();
        sqlx::query(
            "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, url, config_schema, tag,
                archive, error, from_json, from_web, is_global, is_preinstalled, capabilities, metrics)
             VALUES (70, $1::uuid, 'custom', $2, '', $3, $4, '0.0.1', $5, NULL, false, false, false, false, '{}', '{}')",
        )
        .bind(common::COMMON_ORGANIZATION_ID)
        .bind(plugin_json["name"].as_str().unwrap())
        .bind(plugin_json["url"].as_str().unwrap())
        .bind(&plugin_json["config"])
        .bind(archive_of(&folder))
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
             VALUES (80, $1, 70, true, 1, $2, NULL, now(), now())",
        )
        .bind(TEAM)
        .bind(&config)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO posthog_pluginattachment (key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
             VALUES ('googleCloudKeyJson', 'application/json', 'key.json', $1, $2, 80, $3)",
        )
        .bind(key_json.len() as i32)
        .bind(key_json)
        .bind(TEAM)
        .execute(&db.pool)
        .await
        .unwrap();
        let queue = common::unique_prefix("bq");
        let default_queue = format!("{queue}-default");
        let config = db.config(&[
            ("WORKER_CONCURRENCY", "2"),
            ("PLUGINS_CELERY_QUEUE", queue.as_str()),
            ("CELERY_DEFAULT_QUEUE", default_queue.as_str()),
            ("LOG_LEVEL", "warn"),
        ]);
        let redis = deadpool_redis::Config::from_url(config.REDIS_URL.clone())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap();
        let producer = CeleryProducer::new(redis, config.PLUGINS_CELERY_QUEUE.clone());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(plugin_server::server::run(config, shutdown.clone()));
        Server { db, shutdown, handle, producer }
    }

    /// `event-{n}` for `n` in `range` (and a `$feature_flag_called`, which the plugin ignores).
    async fn send(&self, range: std::ops::Range<u32>) {
        for n in range {
            let name = if n == 3 { "$feature_flag_called".to_string() } else { format!("event-{n}") };
            let data =
                json!({"event": name, "timestamp": NOW, "$set": {"a": n}, "properties": {"n": n, "text": "zażółć 🦔"}});
            let args = json!(["user-1", "127.0.0.1", "http://127.0.0.1:8000", data, TEAM, NOW, NOW]);
            self.producer.send_task(PROCESS_EVENT_TASK, args.as_array().unwrap(), &Map::new()).await.unwrap();
        }
    }

    async fn log(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT message FROM posthog_pluginlogentry WHERE plugin_config_id = 80 ORDER BY timestamp")
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn wait_for_log(&self, needle: &str) -> Vec<String> {
        wait_for(&format!("the plugin to log {needle:?}"), || async {
            let log = self.log().await;
            log.iter().any(|line| line.contains(needle)).then_some(log)
        })
        .await
    }

    async fn config_error(&self) -> Option<Value> {
        sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = 80")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "server stopped cleanly: {result:?}");
    }
}

/// The plugin's config for the stub's dataset.
fn plugin_config(stub: &BigQueryStub) -> Value {
    json!({"datasetId": stub.with(|state| state.dataset.clone()), "tableId": "events", "exportEventsToIgnore": "$feature_flag_called",
        "exportEventsBufferSeconds": "1", "exportEventsBufferBytes": "1048576", "exportElementsOnAnyEvent": "No"})
}

fn key() -> PKey<Private> {
    PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
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
    let key = key();
    let stub = BigQueryStub::start(&key, None, 0).await;
    let server = Server::start(plugin_config(&stub), stub.key_json(&key)).await;
    server.send(0..30).await;
    let rows = stub.rows(29).await;
    assert_all_once(&rows, 30);
    server.wait_for_log("Inserted ").await;
    let created = stub.with(|state| state.created_with.clone()).expect("tables.insert");
    let dataset = stub.with(|state| state.dataset.clone());
    assert_eq!(created["tableReference"], json!({"datasetId": dataset, "projectId": PROJECT, "tableId": "events"}));
    assert_eq!(created["timePartitioning"], json!({"type": "DAY", "field": "timestamp"}));
    let names: Vec<&str> =
        created["schema"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, FIELDS);
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        assert!(state.calls.iter().any(|call| call.starts_with("GET ")), "{:?}", state.calls);
        // Tokens are kept: not one per request.
        assert!(state.tokens.len() < state.calls.len(), "{} tokens for {:?}", state.tokens.len(), state.calls);
    });
    assert_eq!(server.config_error().await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_columns_are_added_and_a_partial_failure_is_retried_without_losing_events() {
    let key = key();
    // The table lacks the last two columns; the first insertAll fails for every row.
    let fields: Vec<Value> = FIELDS[..10].iter().map(|name| json!({"name": name, "type": "STRING"})).collect();
    let stub = BigQueryStub::start(&key, Some(fields), 1).await;
    let server = Server::start(plugin_config(&stub), stub.key_json(&key)).await;
    server.send(0..20).await;
    // The plugin logs the PartialFailureError and throws RetryError; the export retry job runs
    // exportEvents again.
    server.wait_for_log("Error inserting").await;
    let rows = stub.rows(19).await;
    assert_all_once(&rows, 20);
    let patched = stub.with(|state| state.patched_with.clone()).expect("tables.patch");
    let names: Vec<&str> =
        patched["schema"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, FIELDS);
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        assert!(state.created_with.is_none());
    });
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_token_endpoint_refuses_fails_set_up_with_googles_message() {
    let stub = BigQueryStub::start(&key(), None, 0).await;
    // Signed with another key: the stub's token endpoint refuses the JWT.
    let server = Server::start(plugin_config(&stub), stub.key_json(&key())).await;
    let error = wait_for("the config's error", || async { server.config_error().await }).await;
    assert!(error.to_string().contains("invalid_grant: Invalid JWT Signature."), "{error}");
    stub.with(|state| {
        assert!(
            !state.refusals.is_empty() && state.refusals.iter().all(|why| why == "bad signature"),
            "{:?}",
            state.refusals
        );
        assert!(state.calls.is_empty(), "{:?}", state.calls);
    });
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_down_is_the_fetch_error_the_plugin_checks_for() {
    let key = key();
    let stub = BigQueryStub::start(&key, None, 0).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut key_json: Value = serde_json::from_slice(&stub.key_json(&key)).unwrap();
    key_json["token_uri"] = json!(format!("http://127.0.0.1:{closed}/token"));
    let server = Server::start(plugin_config(&stub), key_json.to_string().into_bytes()).await;
    // node-fetch's FetchError (what google-auth-library's gaxios throws), which the plugin checks
    // with `instanceof FetchError` and turns into RetryError.
    let log = server.wait_for_log("Error encountered in setupPlugin:").await;
    let line = log.iter().find(|line| line.contains("Error encountered in setupPlugin:")).unwrap();
    assert!(line.contains(&format!("FetchError: request to http://127.0.0.1:{closed}/token failed")), "{line}");
    stub.with(|state| assert!(state.calls.is_empty() && state.tokens.is_empty()));
    server.stop().await;
}
