//! PostHog's GCS export and Pub/Sub export plugins, unmodified (tests/data/plugins), through the
//! whole server against a local stand-in of Cloud Storage's and Pub/Sub's REST APIs and Google's
//! OAuth token endpoint (`common::http_stub`): the stub verifies the service account's RS256 JWT
//! (scopes included) with the key's public half, refuses API calls without the token it issued,
//! and keeps the objects and messages that arrive. GCS: one CSV object per event through
//! `file.createWriteStream()` piped from a `PassThrough`, and a missing bucket as the plugin's
//! "Failed to upload" + `RetryError`. Pub/Sub: the topic created when `getMetadata` says
//! `NOT_FOUND` (a second VM's `ALREADY_EXISTS` ignored), every event published once, a 503 on
//! publish retried as the library retries `UNAVAILABLE`. Run with nextest (one process per test:
//! the API roots are process-wide).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::http_stub::{http_stub, HttpRequest};
use common::{wait_for, TestDb};
use openssl::pkey::{PKey, Private};
use plugin_server::sinks::CeleryProducer;
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

const TEAM: i32 = common::TEAM_ID;
const NOW: &str = "2021-11-01T10:00:00.000Z";
const PROJECT: &str = "proj-1";
const EMAIL: &str = "exporter@proj-1.iam.gserviceaccount.com";

fn archive_of(folder: &Path) -> Vec<u8> {
    use std::io::Write;
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default();
        for name in ["index.ts", "plugin.json", "package.json"] {
            zip.start_file(format!("plugin/{name}"), options).unwrap();
            zip.write_all(&std::fs::read(folder.join(name)).unwrap()).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

fn google_error(code: u16, message: &str, reason: &str, status: &str) -> (u16, Vec<u8>) {
    let body = json!({"error": {"code": code, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}], "status": status}});
    (code, body.to_string().into_bytes())
}

fn verify_assertion(
    public: &PKey<openssl::pkey::Public>,
    jwt: &str,
    audience: &str,
    scope: &str,
) -> Result<(), String> {
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
        || claims["scope"] != scope
        || exp != iat + 3600
        || iat.abs_diff(now) > 60
    {
        return Err(format!("claims {claims}"));
    }
    Ok(())
}

/// What the stub has seen and holds.
#[derive(Default)]
struct State {
    /// `(name, content type, bytes)` of the stored objects.
    objects: Vec<(String, String, Vec<u8>)>,
    topic_exists: bool,
    topic_creations: u32,
    /// The decoded data of published messages.
    messages: Vec<Value>,
    failing_publishes: u32,
    tokens: Vec<String>,
    calls: Vec<String>,
    refusals: Vec<String>,
}

struct GoogleStub {
    state: Arc<Mutex<State>>,
    root: String,
}

impl GoogleStub {
    async fn start(trusted: &PKey<Private>, scope: &'static str, failing_publishes: u32) -> GoogleStub {
        let state = Arc::new(Mutex::new(State { failing_publishes, ..State::default() }));
        let public = PKey::public_key_from_pem(&trusted.public_key_to_pem().unwrap()).unwrap();
        let shared = Arc::clone(&state);
        let audience = Arc::new(Mutex::new(String::new()));
        let audience_in = Arc::clone(&audience);
        let (address, _requests) = http_stub("127.0.0.1:0", move |request: &HttpRequest| {
            let mut state = shared.lock().unwrap();
            answer(&mut state, &public, &audience_in.lock().unwrap(), scope, request)
        })
        .await;
        let root = format!("http://{address}");
        *audience.lock().unwrap() = format!("{root}/token");
        plugin_server::plugins::extensions::google::set_test_api_root("storage", &root);
        plugin_server::plugins::extensions::google::set_test_api_root("pubsub", &root);
        GoogleStub { state, root }
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
}

const STORAGE_SCOPE: &str = "https://www.googleapis.com/auth/iam https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/devstorage.full_control";
const PUBSUB_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/pubsub";

fn answer(
    state: &mut State,
    public: &PKey<openssl::pkey::Public>,
    audience: &str,
    scope: &str,
    request: &HttpRequest,
) -> (u16, Vec<u8>) {
    if request.target == "/token" {
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body).into_owned().collect();
        let field = |name: &str| form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
        let verdict = match (field("grant_type"), field("assertion")) {
            (Some("urn:ietf:params:oauth:grant-type:jwt-bearer"), Some(jwt)) => {
                verify_assertion(public, jwt, audience, scope)
            }
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
    let path = request.target.split('?').next().unwrap_or_default().to_string();
    let topic = format!("/v1/projects/{PROJECT}/topics/events");
    match (request.method.as_str(), path.as_str()) {
        ("POST", "/upload/storage/v1/b/exports/o") => {
            if request.query_param("uploadType").as_deref() != Some("media") {
                state.refusals.push(format!("upload {}", request.target));
                return google_error(400, "bad upload", "invalid", "INVALID_ARGUMENT");
            }
            let name = request.query_param("name").unwrap_or_default();
            let content_type = request.header("content-type").unwrap_or_default().to_string();
            state.objects.push((name.clone(), content_type, request.body.clone()));
            (200, json!({"kind": "storage#object", "bucket": "exports", "name": name, "size": request.body.len().to_string()}).to_string().into_bytes())
        }
        ("POST", upload) if upload.starts_with("/upload/storage/v1/b/") => {
            google_error(404, "The specified bucket does not exist.", "notFound", "NOT_FOUND")
        }
        ("GET", path) if path == topic => {
            if state.topic_exists {
                (200, json!({"name": format!("projects/{PROJECT}/topics/events")}).to_string().into_bytes())
            } else {
                (404, json!({"error": {"code": 404, "message": "Resource not found (resource=events).", "status": "NOT_FOUND"}}).to_string().into_bytes())
            }
        }
        ("PUT", path) if path == topic => {
            state.topic_creations += 1;
            if state.topic_exists {
                return (409, json!({"error": {"code": 409, "message": "Resource already exists in the project (resource=events).", "status": "ALREADY_EXISTS"}}).to_string().into_bytes());
            }
            state.topic_exists = true;
            (200, json!({"name": format!("projects/{PROJECT}/topics/events")}).to_string().into_bytes())
        }
        ("POST", path) if path == format!("{topic}:publish") => {
            if !state.topic_exists {
                return (404, json!({"error": {"code": 404, "message": "Resource not found (resource=events).", "status": "NOT_FOUND"}}).to_string().into_bytes());
            }
            if state.failing_publishes > 0 {
                state.failing_publishes -= 1;
                return (503, json!({"error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}}).to_string().into_bytes());
            }
            let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            let mut ids = Vec::new();
            for message in body["messages"].as_array().cloned().unwrap_or_default() {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(message["data"].as_str().unwrap_or_default())
                    .unwrap_or_default();
                state.messages.push(serde_json::from_slice(&data).unwrap_or(Value::Null));
                ids.push(state.messages.len().to_string());
            }
            (200, json!({"messageIds": ids}).to_string().into_bytes())
        }
        _ => google_error(404, &format!("Not found: URL {}", request.target), "notFound", "NOT_FOUND"),
    }
}

fn key() -> PKey<Private> {
    PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
}

/// The event numbers `0..count` but the ignored 3.
fn expected(count: u64) -> BTreeSet<u64> {
    (0..count).filter(|n| *n != 3).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gcs_plugin_stores_one_csv_object_per_event() {
    let key = key();
    let stub = GoogleStub::start(&key, STORAGE_SCOPE, 0).await;
    let configs = vec![
        (json!({"bucketName": "exports", "exportEventsToIgnore": "$feature_flag_called"}), stub.key_json(&key)),
        (json!({"bucketName": "missing", "exportEventsToIgnore": "$feature_flag_called"}), stub.key_json(&key)),
    ];
    let server = Server::start("gcs-plugin", configs).await;
    server.send(0..12).await;
    // Config 81's bucket does not exist: the library's ApiError, the plugin's log line and RetryError.
    server.wait_for_log(81, "Failed to upload 1 event to GCS. Retrying later.").await;
    let objects = wait_for("11 objects", || async {
        let objects = stub.with(|state| state.objects.clone());
        (objects.len() >= 11).then_some(objects)
    })
    .await;
    let mut numbers = Vec::new();
    for (name, content_type, body) in &objects {
        let (day, file) = name.split_once('/').unwrap_or_else(|| panic!("{name}: day folder"));
        assert_eq!(day.len(), 10, "{name}");
        assert!(file.ends_with(".csv") && file.starts_with(&day.replace('-', "")), "{name}");
        assert_eq!(content_type, "application/octet-stream");
        let text = String::from_utf8(body.clone()).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("uuid,event,properties,elements,people_set,people_set_once,distinct_id,team_id,ip,site_url,timestamp")
        );
        let row = lines.next().unwrap_or_else(|| panic!("{text}"));
        let (uuid, rest) = row.split_once(',').unwrap();
        assert_eq!(uuid.len(), 36, "{row}");
        let (event, _) = rest.split_once(',').unwrap();
        let n: u64 = event.strip_prefix("event-").unwrap_or_else(|| panic!("{row}")).parse().unwrap();
        numbers.push(n);
        assert!(row.contains(&format!(r#"{{"n":{n},"text":"zażółć 🦔""#)), "{row}");
        assert!(row.contains(&format!(r#"[],{{"a":{n}}},{{}},user-1,{TEAM},"#)), "{row}");
        assert!(row.ends_with(NOW), "{row}");
    }
    assert_eq!(numbers.iter().copied().collect::<BTreeSet<_>>(), expected(12));
    assert_eq!(numbers.len(), 11, "no event twice: {numbers:?}");
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        assert!(
            state.tokens.len() < state.calls.len(),
            "{} tokens for {} calls",
            state.tokens.len(),
            state.calls.len()
        );
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pubsub_plugin_creates_its_topic_and_publishes_every_event_once() {
    let key = key();
    // The first publish answers 503 UNAVAILABLE: retried, as the library retries it.
    let stub = GoogleStub::start(&key, PUBSUB_SCOPE, 1).await;
    let config = json!({"topicId": "events", "exportEventsToIgnore": "$feature_flag_called"});
    let server = Server::start("pubsub-plugin", vec![(config, stub.key_json(&key))]).await;
    server.send(0..12).await;
    let messages = wait_for("12 messages", || async {
        let messages = stub.with(|state| state.messages.clone());
        (messages.len() >= 12).then_some(messages)
    })
    .await;
    // The plugin ignores nothing itself (its exportEventsToIgnore is for exportEvents).
    let numbers: Vec<u64> = messages.iter().map(|m| m["properties"]["n"].as_u64().expect("n")).collect();
    assert_eq!(numbers.iter().copied().collect::<BTreeSet<_>>(), (0..12).collect::<BTreeSet<_>>());
    assert_eq!(numbers.len(), 12, "no event twice: {numbers:?}");
    for message in &messages {
        let n = &message["properties"]["n"];
        if n != 3 {
            assert_eq!(message["event"], format!("event-{n}"));
        }
        assert_eq!(message["people_set"], json!({"a": n}));
        assert_eq!(message["team_id"], TEAM);
        assert_eq!(message["distinct_id"], "user-1");
        assert_eq!(message["elements"], json!([]));
        assert_eq!(message["timestamp"], NOW);
    }
    stub.with(|state| {
        assert!(state.refusals.is_empty(), "{:?}", state.refusals);
        assert!(state.topic_exists && state.topic_creations >= 1);
        assert_eq!(state.failing_publishes, 0);
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

struct Server {
    db: TestDb,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), plugin_server::server::ServerError>>,
    producer: CeleryProducer,
}

impl Server {
    /// The standard team, the plugin in `folder` (id 70), configs 80, 81, … with each config and
    /// its key file as the `googleCloudKeyJson` attachment, then the server.
    async fn start(folder: &str, configs: Vec<(Value, Vec<u8>)>) -> Server {
        let db = TestDb::empty().await;
        common::reset_test_database(&db.pool, None, false).await;
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plugins").join(folder);
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
        for (index, (config, key_json)) in configs.into_iter().enumerate() {
            let id = 80 + index as i32;
            sqlx::query(
                "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
                 VALUES ($1, $2, 70, true, $1, $3, NULL, now(), now())",
            )
            .bind(id)
            .bind(TEAM)
            .bind(&config)
            .execute(&db.pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO posthog_pluginattachment (key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
                 VALUES ('googleCloudKeyJson', 'application/json', 'key.json', $1, $2, $3, $4)",
            )
            .bind(key_json.len() as i32)
            .bind(key_json)
            .bind(id)
            .bind(TEAM)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        let queue = common::unique_prefix("gcp");
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

    async fn log(&self, config_id: i32) -> Vec<String> {
        sqlx::query_scalar("SELECT message FROM posthog_pluginlogentry WHERE plugin_config_id = $1 ORDER BY timestamp")
            .bind(config_id)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn wait_for_log(&self, config_id: i32, needle: &str) -> Vec<String> {
        wait_for(&format!("config {config_id} to log {needle:?}"), || async {
            let log = self.log(config_id).await;
            log.iter().any(|line| line.contains(needle)).then_some(log)
        })
        .await
    }

    async fn config_error(&self, config_id: i32) -> Option<Value> {
        sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = $1")
            .bind(config_id)
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
