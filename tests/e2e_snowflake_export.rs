//! PostHog's Snowflake export plugin, unmodified (tests/data/plugins), through the whole server
//! against a local stand-in of Snowflake's REST API (`common::http_stub`: login requests, query
//! requests with the session token, token renewal, logout, in snowflake-sdk's shapes) and a local
//! S3 (moto, `tests/common/moto.rs`) as the stage: the plugin creates its table and stage, stages
//! each batch as a CSV object in the bucket and runs `USE WAREHOUSE` + `COPY INTO` for the staged
//! files from `runEveryMinute` and its `copyIntoSnowflakeJob`; the test reads the staged objects
//! back and checks every event arrives once and every staged file is copied. A failing `COPY INTO`
//! is retried by the plugin's own `retryCopyIntoSnowflake` job, with no event lost. (A failed
//! upload is not retried: the plugin's `reject()` carries no error, so its `catch` throws a
//! `TypeError` instead of `RetryError`, on the original server too.) Also the snowflake-sdk
//! surface a plugin author relies on (binds, typed rows, errors, a result fetched later, an
//! expired session renewed, destroy), from a plugin's `processEvent`. Run with nextest (one
//! process per test: the stand-ins' addresses are process-wide).

mod common;
mod export_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http_stub::{http_stub, HttpRequest};
use common::moto::Moto;
use common::{wait_for_up_to, TestDb};
use export_support::{add_config, database_with_plugin, ExportServer, TEAM};
use serde_json::{json, Value};

const ACCOUNT: &str = "xy12345";
const USER: &str = "posthog_exporter";
const PASSWORD: &str = "s3cret-pass";
const BUCKET: &str = "snowflake-stage";
/// The plugin's CSV columns.
const COLUMNS: [&str; 11] = [
    "uuid",
    "event",
    "properties",
    "elements",
    "people_set",
    "people_set_once",
    "distinct_id",
    "team_id",
    "ip",
    "site_url",
    "timestamp",
];

/// A statement as the stub received it.
#[derive(Debug, Clone)]
struct Statement {
    sql: String,
    bindings: Value,
}

/// What the stub has seen and holds.
#[derive(Default)]
struct State {
    /// The query string and body of each login request.
    logins: Vec<(String, Value)>,
    sessions: Vec<String>,
    masters: Vec<String>,
    expired: Vec<String>,
    statements: Vec<Statement>,
    /// `COPY INTO` statements still to fail.
    failing_copies: u32,
    /// The files of each `COPY INTO` that succeeded.
    copied: Vec<Vec<String>>,
    renewals: u32,
    logouts: u32,
    /// Queries answered "in progress" and fetched later, by query id.
    pending: BTreeMap<String, u32>,
    refusals: Vec<String>,
}

fn ok(data: Value) -> (u16, Vec<u8>) {
    (200, json!({"data": data, "code": null, "message": null, "success": true}).to_string().into_bytes())
}

fn failed(code: &str, message: &str, data: Value) -> (u16, Vec<u8>) {
    (200, json!({"data": data, "code": code, "message": message, "success": false}).to_string().into_bytes())
}

/// A query still running, as Snowflake answers it (a success with code 333334 and the URL of its
/// result).
fn in_progress(id: &str) -> (u16, Vec<u8>) {
    let body = json!({"data": {"queryId": id, "getResultUrl": format!("/queries/{id}/result")}, "code": "333334",
        "message": "Asynchronous execution in progress. Use provided query id to perform query monitoring and management.",
        "success": true});
    (200, body.to_string().into_bytes())
}

fn rows(types: &[(&str, &str)], rowset: Value) -> Value {
    let rowtype: Vec<Value> = types
        .iter()
        .map(|(name, kind)| json!({"name": name, "type": kind, "nullable": true, "scale": 0, "precision": 38}))
        .collect();
    let total = rowset.as_array().map_or(0, Vec::len);
    json!({"rowtype": rowtype, "rowset": rowset, "total": total, "returned": total,
        "queryId": uuid::Uuid::new_v4().to_string(), "queryResultFormat": "json"})
}

fn token_of(request: &HttpRequest) -> Option<String> {
    let value = request.header("authorization")?.strip_prefix("Snowflake Token=\"")?.strip_suffix('"')?;
    Some(value.to_string())
}

/// The file names of `COPY INTO … FILES = ( 'a','b' ) …`.
fn files_of(sql: &str) -> Vec<String> {
    let Some(start) = sql.find("FILES = (") else { return Vec::new() };
    let rest = &sql[start + "FILES = (".len()..];
    let list = &rest[..rest.find(')').unwrap_or(rest.len())];
    list.split(',').map(|file| file.trim().trim_matches('\'').to_string()).filter(|file| !file.is_empty()).collect()
}

fn answer(state: &mut State, request: &HttpRequest) -> (u16, Vec<u8>) {
    let path = request.target.split('?').next().unwrap_or_default().to_string();
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    if request.method != "POST" && !path.ends_with("/result") {
        state.refusals.push(format!("{} {}", request.method, request.target));
        return (405, b"method".to_vec());
    }
    match path.as_str() {
        "/session/v1/login-request" => {
            state.logins.push((request.target.clone(), body.clone()));
            let data = &body["data"];
            if data["LOGIN_NAME"] != USER || data["ACCOUNT_NAME"] != ACCOUNT || data["CLIENT_APP_ID"] != "JavaScript" {
                state.refusals.push(format!("login {body}"));
                return failed("390100", "Incorrect username or password was specified.", Value::Null);
            }
            if data["PASSWORD"] != PASSWORD {
                return failed("390100", "Incorrect username or password was specified.", Value::Null);
            }
            let n = state.sessions.len();
            let (session, master) = (format!("ST-{n}"), format!("MT-{n}"));
            state.sessions.push(session.clone());
            state.masters.push(master.clone());
            ok(json!({"token": session, "masterToken": master, "validityInSeconds": 3600,
                "masterValidityInSeconds": 14400, "sessionId": 1000 + n, "parameters": [],
                "sessionInfo": {"databaseName": null, "schemaName": null, "warehouseName": null, "roleName": "EXPORTER"}}))
        }
        "/session/token-request" => {
            let master = token_of(request).unwrap_or_default();
            let old = body["oldSessionToken"].as_str().unwrap_or_default().to_string();
            if !state.masters.contains(&master) || body["REQUEST_TYPE"] != "RENEW" || !state.sessions.contains(&old) {
                state.refusals.push(format!("renewal with {master}: {body}"));
                return failed("390114", "Master token expired", Value::Null);
            }
            state.renewals += 1;
            let session = format!("ST-{}-renewed-{}", old, state.renewals);
            state.sessions.push(session.clone());
            ok(
                json!({"sessionToken": session, "validityInSecondsST": 3600, "masterToken": master, "validityInSecondsMT": 14400}),
            )
        }
        "/session/logout-request" => {
            let master = token_of(request).unwrap_or_default();
            if !state.masters.contains(&master) {
                state.refusals.push(format!("logout with {master}"));
                return failed("390111", "Session no longer exists.", Value::Null);
            }
            state.logouts += 1;
            ok(Value::Null)
        }
        query => {
            let token = token_of(request).unwrap_or_default();
            if !state.sessions.contains(&token) {
                state.refusals.push(format!("{} with {token:?}", request.target));
                return (
                    401,
                    json!({"data": null, "code": "390104", "message": "Invalid token", "success": false})
                        .to_string()
                        .into_bytes(),
                );
            }
            if state.expired.contains(&token) {
                return failed("390112", "Session token expired.", Value::Null);
            }
            if let Some(id) = query.strip_prefix("/queries/").and_then(|rest| rest.strip_suffix("/result")) {
                return match state.pending.get_mut(id) {
                    Some(polls) if *polls > 0 => {
                        *polls -= 1;
                        in_progress(id)
                    }
                    Some(_) => ok(rows(&[("ANSWER", "fixed")], json!([["42"]]))),
                    None => failed("000709", "Statement not found.", json!({"queryId": id})),
                };
            }
            if query != "/queries/v1/query-request" || request.query_param("requestId").is_none_or(|id| id.len() != 36)
            {
                state.refusals.push(format!("query {}", request.target));
                return (404, b"not found".to_vec());
            }
            let sql = body["sqlText"].as_str().unwrap_or_default().to_string();
            state.statements.push(Statement { sql: sql.clone(), bindings: body["bindings"].clone() });
            statement_answer(state, &sql, &token, &body["bindings"])
        }
    }
}

fn statement_answer(state: &mut State, sql: &str, token: &str, bindings: &Value) -> (u16, Vec<u8>) {
    let done = || ok(rows(&[("status", "text")], json!([["Statement executed successfully."]])));
    if sql.starts_with("COPY INTO") {
        if state.failing_copies > 0 {
            state.failing_copies -= 1;
            return failed(
                "000606",
                "No active warehouse selected in the current session.  Select an active warehouse with the 'use warehouse' command.\n",
                json!({"internalError": false, "errorCode": "000606", "sqlState": "57P03", "queryId": uuid::Uuid::new_v4().to_string()}),
            );
        }
        let files = files_of(sql);
        let rowset: Vec<Value> =
            files.iter().map(|file| json!([format!("s3://{BUCKET}/{file}"), "LOADED", "1", "1"])).collect();
        state.copied.push(files);
        return ok(rows(
            &[("file", "text"), ("status", "text"), ("rows_parsed", "fixed"), ("rows_loaded", "fixed")],
            json!(rowset),
        ));
    }
    match sql {
        "SELECT TYPES" => ok(rows(
            &[
                ("N", "fixed"),
                ("R", "real"),
                ("T", "text"),
                ("B", "boolean"),
                ("V", "variant"),
                ("D", "date"),
                ("TS", "timestamp_ntz"),
                ("BIN", "binary"),
                ("NUL", "text"),
            ],
            json!([
                ["42", "1.5", "zażółć 🦔", "1", "{\"a\":[1,2]}", "18628", "1609459200.123000000", "48656C6C6F", null],
                ["-7", "0", "", "0", "[]", "0", "0.000000000", "", null]
            ]),
        )),
        "SELECT ECHO" => {
            let mut echoed = Vec::new();
            if let Some(map) = bindings.as_object() {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_by_key(|key| key.parse::<u32>().unwrap_or(0));
                for key in keys {
                    let value = match &map[key]["value"] {
                        Value::String(text) => json!(text),
                        Value::Null => Value::Null,
                        other => json!(other.to_string()),
                    };
                    echoed.push(json!([key, map[key]["type"], value]));
                }
            }
            ok(rows(&[("POSITION", "text"), ("TYPE", "text"), ("VALUE", "text")], json!(echoed)))
        }
        "SELECT * FROM MISSING" => failed(
            "002003",
            "SQL compilation error:\nObject 'MISSING' does not exist or not authorized.",
            json!({"internalError": false, "errorCode": "002003", "age": 0, "sqlState": "42S02", "queryId": "q-missing", "line": -1, "pos": -1, "type": "COMPILATION"}),
        ),
        "SELECT SLOW" => {
            let id = uuid::Uuid::new_v4().to_string();
            state.pending.insert(id.clone(), 2);
            in_progress(&id)
        }
        "SELECT EXPIRE" if !state.expired.iter().any(|known| known.starts_with("ST-")) => {
            state.expired.push(token.to_string());
            failed("390112", "Session token expired.", Value::Null)
        }
        _ => done(),
    }
}

struct SnowflakeStub {
    state: Arc<Mutex<State>>,
}

impl SnowflakeStub {
    /// The stub; the server's Snowflake requests go to it.
    async fn start(failing_copies: u32) -> SnowflakeStub {
        let state = Arc::new(Mutex::new(State { failing_copies, ..State::default() }));
        let shared = Arc::clone(&state);
        let (address, _requests) =
            http_stub("127.0.0.1:0", move |request: &HttpRequest| answer(&mut shared.lock().unwrap(), request)).await;
        plugin_server::plugins::extensions::snowflake::set_test_access_url(&format!("http://{address}"));
        SnowflakeStub { state }
    }

    fn with<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&self.state.lock().unwrap())
    }

    fn statements(&self) -> Vec<String> {
        self.with(|state| state.statements.iter().map(|statement| statement.sql.clone()).collect())
    }
}

/// Clears the plugin's `lastRun` (its `meta.cache` key: one Redis for all tests).
async fn forget_last_run() {
    let pool = deadpool_redis::Config::from_url(common::redis_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let mut connection = pool.get().await.unwrap();
    let _: i64 = deadpool_redis::redis::cmd("DEL")
        .arg(format!("@plugin/{}/{TEAM}/lastRun", export_support::PLUGIN_ID))
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// The plugin's config (plugin.json keys) for the stub and `moto`'s bucket; the stage is flushed
/// after 1 s and copied at most once a minute.
fn plugin_config(moto: &Moto) -> Value {
    json!({
        "account": ACCOUNT, "username": USER, "password": PASSWORD, "database": "posthog_db", "dbschema": "public",
        "table": "events", "stage": "posthog_stage", "warehouse": "export_wh", "role": "exporter",
        "copyCadenceMinutes": "1", "stageToUse": "S3", "bucketName": BUCKET, "bucketPath": "/exports",
        "purgeFromStage": "No", "awsAccessKeyId": moto.access_key_id, "awsSecretAccessKey": moto.secret_access_key,
        "awsRegion": "us-east-1", "eventsToIgnore": "$feature_flag_called", "retryCopyIntoOperations": "Yes",
        "debug": "OFF", "forceCopy": "No", "exportEventsBufferSeconds": "1",
    })
}

async fn start_server(moto: &Moto) -> ExportServer {
    plugin_server::plugins::extensions::aws::set_test_endpoint(&moto.endpoint);
    forget_last_run().await;
    let db = database_with_plugin(
        "snowflake-export-plugin",
        "snowflake-export-plugin",
        &["index.ts", "plugin.json", "package.json", "LICENSE"],
        "0.2.0",
    )
    .await;
    add_config(&db, 80, &plugin_config(moto)).await;
    // One worker thread: the plugin keeps its list of staged files with a read and a write of
    // `meta.storage`, which two VMs flushing at once could interleave (as on the reference's
    // worker threads).
    ExportServer::launch(db, "snowflake", &[("WORKER_CONCURRENCY", "1")])
}

/// The staged objects under `exports/` once they hold `count` rows: `(key, rows)` with each row
/// a map of the plugin's columns (up to 3 minutes: a batch whose upload failed comes back on the
/// export retry schedule).
async fn staged(moto: &Moto, count: usize) -> Vec<(String, Vec<BTreeMap<String, String>>)> {
    wait_for_up_to(&format!("{count} staged rows"), Duration::from_secs(180), || async {
        let mut files = Vec::new();
        let mut total = 0;
        for (key, body) in moto.objects(BUCKET).await {
            let text = String::from_utf8(body).expect("utf-8 CSV");
            let mut lines = text.split('\n');
            assert_eq!(lines.next(), Some(COLUMNS.join("|$|").as_str()), "{key}: header");
            let rows: Vec<BTreeMap<String, String>> = lines
                .map(|line| {
                    let fields: Vec<&str> = line.split("|$|").collect();
                    assert_eq!(fields.len(), COLUMNS.len(), "{key}: {line}");
                    COLUMNS.iter().zip(fields).map(|(column, field)| (column.to_string(), field.to_string())).collect()
                })
                .collect();
            total += rows.len();
            files.push((key, rows));
        }
        (total >= count).then_some(files)
    })
    .await
}

/// Each of `count` events but the ignored `n = 3` exactly once, as the plugin writes them.
fn assert_all_once(files: &[(String, Vec<BTreeMap<String, String>>)], count: u32) {
    let mut numbers = Vec::new();
    for (key, rows) in files {
        assert!(key.starts_with("exports/snowflake-export-") && key.ends_with(".csv"), "{key}");
        for row in rows {
            let properties: Value = serde_json::from_str(&row["properties"]).expect("properties JSON");
            let n = properties["n"].as_u64().expect("n");
            numbers.push(n);
            assert_eq!(row["event"], format!("event-{n}"));
            assert_eq!(properties["text"], "zażółć 🦔");
            assert_eq!(row["team_id"], TEAM.to_string());
            assert_eq!(row["distinct_id"], "user-1");
            assert_eq!(row["elements"], "[]");
            assert_eq!(serde_json::from_str::<Value>(&row["people_set"]).unwrap(), json!({"a": n}), "{row:?}");
            assert_eq!(row["people_set_once"], "{}");
            assert_eq!(row["uuid"].len(), 36, "{row:?}");
            assert!(row["timestamp"].starts_with("2021-11-01T10:00:00"), "{row:?}");
        }
    }
    let unique: BTreeSet<u64> = numbers.iter().copied().collect();
    let expected: BTreeSet<u64> = (0..u64::from(count)).filter(|n| *n != 3).collect();
    assert_eq!(unique, expected, "every event but the ignored one");
    assert_eq!(numbers.len(), unique.len(), "no event twice: {numbers:?}");
}

/// Waits until every staged file has been named by a `COPY INTO` that succeeded (up to 4
/// minutes: copies run at most once a minute, from `runEveryMinute` and the jobs it enqueues).
async fn wait_until_copied(stub: &SnowflakeStub, keys: &BTreeSet<String>) -> BTreeSet<String> {
    wait_for_up_to("every staged file copied into the table", Duration::from_secs(240), || async {
        let copied: BTreeSet<String> = stub.with(|state| state.copied.iter().flatten().cloned().collect());
        keys.is_subset(&copied).then_some(copied)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snowflake_plugin_stages_batches_in_s3_and_copies_them_into_its_table() {
    let moto = Moto::start(&[BUCKET]).await;
    let stub = SnowflakeStub::start(0).await;
    let server = start_server(&moto).await;
    server.send_numbered(0..25).await;
    let files = staged(&moto, 24).await;
    assert_all_once(&files, 25);
    let keys: BTreeSet<String> = files.iter().map(|(key, _)| key.clone()).collect();
    let copied = wait_until_copied(&stub, &keys).await;
    assert_eq!(copied, keys, "only staged files are copied");
    server.wait_for_log(80, "COPY INTO ran successfully").await;
    let statements = stub.statements();
    // setupPlugin: the table and the stage (with the S3 key the plugin was given).
    let create = statements.iter().find(|sql| sql.starts_with("CREATE TABLE")).expect("CREATE TABLE");
    assert_eq!(
        create,
        "CREATE TABLE IF NOT EXISTS \"POSTHOG_DB\".\"PUBLIC\".\"EVENTS\" (\"UUID\" STRING, \"EVENT\" STRING, \
         \"PROPERTIES\" VARIANT, \"ELEMENTS\" VARIANT, \"PEOPLE_SET\" VARIANT, \"PEOPLE_SET_ONCE\" VARIANT, \
         \"DISTINCT_ID\" STRING, \"TEAM_ID\" INTEGER, \"IP\" STRING, \"SITE_URL\" STRING, \"TIMESTAMP\" TIMESTAMP)"
    );
    let stage = statements.iter().find(|sql| sql.starts_with("CREATE STAGE")).expect("CREATE STAGE");
    assert!(stage.contains("\"POSTHOG_DB\".\"PUBLIC\".\"POSTHOG_STAGE\""), "{stage}");
    assert!(stage.contains(&format!("URL='s3://{BUCKET}/'")), "{stage}");
    assert!(stage.contains(&format!("aws_key_id='{}'", moto.access_key_id)), "{stage}");
    assert!(stage.contains("FIELD_DELIMITER = '|$|'"), "{stage}");
    // Each copy: the warehouse first, then COPY INTO from the stage.
    for (index, sql) in statements.iter().enumerate() {
        if sql.starts_with("COPY INTO") {
            assert!(statements[..index].iter().any(|sql| sql == "USE WAREHOUSE EXPORT_WH;"), "{statements:?}");
            assert!(sql.starts_with("COPY INTO \"POSTHOG_DB\".\"PUBLIC\".\"EVENTS\"\n"), "{sql}");
            assert!(sql.contains("FROM @\"POSTHOG_DB\".\"PUBLIC\".POSTHOG_STAGE"), "{sql}");
            assert!(sql.contains("ON_ERROR = 'skip_file'") && sql.contains("PURGE = false;"), "{sql}");
        }
    }
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        let (target, body) = &state.logins[0];
        assert!(target.contains("roleName=exporter"), "{target}");
        assert_eq!(body["data"]["PASSWORD"], PASSWORD);
        // One pooled connection per VM: a login, not one per statement.
        assert!(state.logins.len() < state.statements.len(), "{} logins", state.logins.len());
    });
    let log = server.log(80).await;
    assert!(
        log.iter().any(|line| line.starts_with("Uploaded ") && line.ends_with(&format!("to bucket {BUCKET}"))),
        "{log:?}"
    );
    assert!(log.iter().all(|line| !line.contains("Error")), "{log:?}");
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_copies_are_retried_by_the_plugins_own_job_and_no_event_is_lost() {
    let moto = Moto::start(&[BUCKET]).await;
    // The first COPY INTO and the first retry fail (Snowflake's "no active warehouse" error).
    let stub = SnowflakeStub::start(2).await;
    let server = start_server(&moto).await;
    server.send_numbered(0..15).await;
    let files = staged(&moto, 14).await;
    assert_all_once(&files, 15);
    let keys: BTreeSet<String> = files.iter().map(|(key, _)| key.clone()).collect();
    wait_until_copied(&stub, &keys).await;
    // copyIntoSnowflake logged the failure and enqueued retryCopyIntoSnowflake, which failed once
    // more and enqueued itself again, then copied the same files.
    let log = server.wait_for_log(80, "COPY INTO ran successfully").await;
    let failures: Vec<&String> =
        log.iter().filter(|line| line.starts_with("Failed to copy exports/snowflake-export-")).collect();
    assert_eq!(failures.len(), 2, "{log:?}");
    assert!(
        failures.iter().all(|line| line.ends_with("from object storage into Snowflake. Retrying in 3s.")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|line| line.contains("Error executing Snowflake query") && line.contains("No active warehouse")),
        "{log:?}"
    );
    let copies: Vec<String> = stub.statements().into_iter().filter(|sql| sql.starts_with("COPY INTO")).collect();
    let first = files_of(&copies[0]);
    let same = copies.iter().filter(|sql| files_of(sql) == first).count();
    assert_eq!(same, 3, "the failed files copied again by each retry: {copies:?}");
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        assert_eq!(state.failing_copies, 0);
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

/// snowflake-sdk as plugin authors use it, from `processEvent`.
const SURFACE: &str = r#"
    import * as snowflake from 'snowflake-sdk'
    const describe = (err) => ({ name: err.name, code: err.code, message: err.message, sqlState: err.sqlState, data: err.data, isError: err instanceof Error })
    const run = (connection, sqlText, binds, extra) => new Promise((resolve) => {
        let returned
        returned = connection.execute(Object.assign({ sqlText, binds, complete: (err, stmt, rows) => {
            if (err) return resolve({ error: describe(err), same: stmt === returned })
            resolve({ rows, same: stmt === returned, text: stmt.getSqlText(), id: typeof stmt.getStatementId(), n: stmt.getNumRows(),
                columns: stmt.getColumns().map((c) => [c.getName(), c.getType(), c.isNumber()]), status: stmt.getStatus() })
        } }, extra || {}))
    })
    export async function processEvent(event) {
        snowflake.configure({ insecureConnect: true })
        const connection = snowflake.createConnection({ account: 'ACCOUNT', username: 'USER', password: 'PASSWORD',
            database: 'POSTHOG_DB', schema: 'PUBLIC', warehouse: 'EXPORT_WH', role: 'EXPORTER' })
        const before = connection.isUp()
        const id = await new Promise((resolve, reject) => connection.connect((err, conn) => err ? reject(err) : resolve(conn === connection && conn.getId())))
        const types = await run(connection, 'SELECT TYPES')
        types.rows = types.rows.map((row) => Object.assign({}, row, { D: row.D.toISOString(), TS: row.TS.toISOString(),
            BIN: Buffer.isBuffer(row.BIN) ? row.BIN.toString() : 'not a buffer', NUL: row.NUL === null ? 'null' : row.NUL }))
        const strings = await run(connection, 'SELECT TYPES', undefined, { fetchAsString: ['Number', 'Date'] })
        const echoed = await run(connection, 'SELECT ECHO', [1, 1.5, 'text', true, { a: [1] }, null, new Date(Date.UTC(2021, 0, 1))])
        const arrays = await run(connection, 'SELECT ECHO', [[1, 'a'], [2, 'b']])
        const missing = await run(connection, 'SELECT * FROM MISSING')
        const slow = await run(connection, 'SELECT SLOW')
        const renewed = await run(connection, 'SELECT EXPIRE')
        const after = await run(connection, 'SELECT 1')
        let thrown
        try { connection.execute({ complete: () => {} }) } catch (e) { thrown = describe(e) }
        let noPassword
        try { snowflake.createConnection({ account: 'ACCOUNT', username: 'USER' }) } catch (e) { noPassword = describe(e) }
        const badPassword = await new Promise((resolve) =>
            snowflake.createConnection({ account: 'ACCOUNT', username: 'USER', password: 'wrong' }).connect((err) => resolve(describe(err))))
        const again = await new Promise((resolve) => connection.connect((err) => resolve(describe(err))))
        const destroyed = await new Promise((resolve) => connection.destroy((err, conn) => resolve(err ? describe(err) : conn === connection)))
        const afterDestroy = await run(connection, 'SELECT 1')
        event.properties.snowflake = { before, id: typeof id, up: connection.isUp(), types, strings, echoed, arrays, missing, slow, renewed,
            after, thrown, noPassword, badPassword, again, destroyed, afterDestroy }
        return event
    }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_uses_snowflake_sdk_as_its_authors_do() {
    let stub = SnowflakeStub::start(0).await;
    let code = SURFACE
        .replace("'ACCOUNT'", &format!("'{ACCOUNT}'"))
        .replace("'USER'", &format!("'{USER}'"))
        .replace("'PASSWORD'", &format!("'{PASSWORD}'"));
    let server = ExportServer::launch(TestDb::with_fixture(Some(&code)).await, "snowflake-sdk", &[]);
    server.send_event(json!({"event": "snowflake", "properties": {}})).await;
    let out = server.event_properties("snowflake").await["snowflake"].clone();
    assert_eq!(out["before"], false, "{out}");
    assert_eq!(out["id"], "string");
    assert_eq!(out["up"], false, "destroyed");
    let types = &out["types"];
    assert_eq!(types["same"], true, "{types}");
    assert_eq!(types["text"], "SELECT TYPES");
    assert_eq!(types["id"], "string");
    assert_eq!(types["n"], 2);
    assert_eq!(types["status"], "complete");
    assert_eq!(types["columns"][0], json!(["N", "fixed", true]));
    assert_eq!(types["columns"][6], json!(["TS", "timestamp_ntz", false]));
    assert_eq!(
        types["rows"][0],
        json!({"N": 42, "R": 1.5, "T": "zażółć 🦔", "B": true, "V": {"a": [1, 2]}, "D": "2021-01-01T00:00:00.000Z",
               "TS": "2021-01-01T00:00:00.123Z", "BIN": "Hello", "NUL": "null"})
    );
    assert_eq!(types["rows"][1]["N"], -7);
    assert_eq!(types["rows"][1]["B"], false);
    assert_eq!(types["rows"][1]["V"], json!([]));
    assert_eq!(out["strings"]["rows"][0]["N"], "42");
    assert_eq!(out["strings"]["rows"][0]["D"], "18628");
    assert_eq!(out["strings"]["rows"][0]["B"], true);
    // snowflake-sdk's bindings map: a type per value, values as text (null kept).
    assert_eq!(
        out["echoed"]["rows"],
        json!([
            {"POSITION": "1", "TYPE": "FIXED", "VALUE": "1"},
            {"POSITION": "2", "TYPE": "REAL", "VALUE": "1.5"},
            {"POSITION": "3", "TYPE": "TEXT", "VALUE": "text"},
            {"POSITION": "4", "TYPE": "BOOLEAN", "VALUE": "true"},
            {"POSITION": "5", "TYPE": "VARIANT", "VALUE": "{\"a\":[1]}"},
            {"POSITION": "6", "TYPE": "TEXT", "VALUE": null},
            {"POSITION": "7", "TYPE": "TEXT", "VALUE": "2021-01-01T00:00:00.000Z"},
        ])
    );
    assert_eq!(
        out["arrays"]["rows"],
        json!([
            {"POSITION": "1", "TYPE": "FIXED", "VALUE": "[\"1\",\"2\"]"},
            {"POSITION": "2", "TYPE": "TEXT", "VALUE": "[\"a\",\"b\"]"},
        ])
    );
    assert_eq!(
        out["missing"]["error"],
        json!({"name": "OperationFailedError", "code": "002003", "isError": true, "sqlState": "42S02",
               "message": "SQL compilation error:\nObject 'MISSING' does not exist or not authorized.",
               "data": {"internalError": false, "errorCode": "002003", "age": 0, "sqlState": "42S02", "queryId": "q-missing",
                        "line": -1, "pos": -1, "type": "COMPILATION"}})
    );
    assert_eq!(out["missing"]["same"], true);
    assert_eq!(out["slow"]["rows"], json!([{"ANSWER": 42}]), "{}", out["slow"]);
    assert_eq!(out["renewed"]["rows"], json!([{"status": "Statement executed successfully."}]), "{}", out["renewed"]);
    assert_eq!(out["after"]["status"], "complete");
    assert_eq!(out["thrown"]["name"], "MissingParameterError");
    assert_eq!(out["thrown"]["code"], 409003);
    assert_eq!(out["thrown"]["message"], "A sqlText value must be specified.");
    assert_eq!(out["noPassword"]["code"], 404005);
    assert_eq!(out["badPassword"]["name"], "OperationFailedError");
    assert_eq!(out["badPassword"]["code"], "390100");
    assert_eq!(out["badPassword"]["message"], "Incorrect username or password was specified.");
    assert_eq!(
        out["again"],
        json!({"name": "ClientError", "code": 405502, "message": "Already connected.", "sqlState": "08002", "isError": true})
    );
    assert_eq!(out["destroyed"], true);
    assert_eq!(out["afterDestroy"]["error"]["code"], 407002);
    assert_eq!(out["afterDestroy"]["error"]["message"], "Unable to perform operation using terminated connection.");
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        assert_eq!(state.renewals, 1);
        assert_eq!(state.logouts, 1);
        assert_eq!(state.logins.len(), 2, "the connection and the one with the wrong password");
        let echo = state.statements.iter().find(|statement| statement.sql == "SELECT ECHO").expect("SELECT ECHO");
        assert_eq!(echo.bindings["1"], json!({"type": "FIXED", "value": "1"}));
        assert_eq!(echo.bindings["6"], json!({"type": "TEXT", "value": null}));
        let (target, _) = &state.logins[0];
        for part in
            ["warehouse=EXPORT_WH", "databaseName=POSTHOG_DB", "schemaName=PUBLIC", "roleName=EXPORTER", "requestId="]
        {
            assert!(target.contains(part), "{target}");
        }
    });
    server.stop().await;
}
