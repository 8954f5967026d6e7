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
mod export_support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::http_stub::HttpRequest;
use common::wait_for;
use export_support::{
    add_attachment, add_config, database_with_plugin, google_error, google_key, google_key_json, google_stub,
    ExportServer, GoogleTokens, GOOGLE_PROJECT as PROJECT, NOW, TEAM,
};
use openssl::pkey::{PKey, Private};
use serde_json::{json, Value};

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
    calls: Vec<String>,
    /// The tokens handed out, and what the stub refused and why.
    google: GoogleTokens,
}

struct GoogleStub {
    state: Arc<Mutex<State>>,
    root: String,
}

impl GoogleStub {
    async fn start(trusted: &PKey<Private>, scope: &'static str, failing_publishes: u32) -> GoogleStub {
        let state = Arc::new(Mutex::new(State { failing_publishes, ..State::default() }));
        let shared = Arc::clone(&state);
        let root = google_stub(trusted, &["storage", "pubsub"], move |request, public, audience| {
            answer(&mut shared.lock().unwrap(), public, audience, scope, request)
        })
        .await;
        GoogleStub { state, root }
    }

    fn key_json(&self, key: &PKey<Private>) -> Vec<u8> {
        google_key_json(key, &self.root)
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
    if let Some(answer) = state.google.answer(public, audience, scope, request) {
        return answer;
    }
    if let Err(refusal) = state.google.check_bearer(request) {
        return refusal;
    }
    state.calls.push(format!("{} {}", request.method, request.target));
    let path = request.target.split('?').next().unwrap_or_default().to_string();
    let topic = format!("/v1/projects/{PROJECT}/topics/events");
    match (request.method.as_str(), path.as_str()) {
        ("POST", "/upload/storage/v1/b/exports/o") => {
            if request.query_param("uploadType").as_deref() != Some("media") {
                state.google.refusals.push(format!("upload {}", request.target));
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

/// The event numbers `0..count` but the ignored 3.
fn expected(count: u64) -> BTreeSet<u64> {
    (0..count).filter(|n| *n != 3).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gcs_plugin_stores_one_csv_object_per_event() {
    let key = google_key();
    let stub = GoogleStub::start(&key, STORAGE_SCOPE, 0).await;
    let configs = vec![
        (json!({"bucketName": "exports", "exportEventsToIgnore": "$feature_flag_called"}), stub.key_json(&key)),
        (json!({"bucketName": "missing", "exportEventsToIgnore": "$feature_flag_called"}), stub.key_json(&key)),
    ];
    let server = start("gcs-plugin", configs).await;
    server.send_numbered(0..12).await;
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
        assert!(state.google.refusals.is_empty(), "{:?}", state.google.refusals);
        assert!(
            state.google.issued.len() < state.calls.len(),
            "{} tokens for {} calls",
            state.google.issued.len(),
            state.calls.len()
        );
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pubsub_plugin_creates_its_topic_and_publishes_every_event_once() {
    let key = google_key();
    // The first publish answers 503 UNAVAILABLE: retried, as the library retries it.
    let stub = GoogleStub::start(&key, PUBSUB_SCOPE, 1).await;
    let config = json!({"topicId": "events", "exportEventsToIgnore": "$feature_flag_called"});
    let server = start("pubsub-plugin", vec![(config, stub.key_json(&key))]).await;
    server.send_numbered(0..12).await;
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
        assert!(state.google.refusals.is_empty(), "{:?}", state.google.refusals);
        assert!(state.topic_exists && state.topic_creations >= 1);
        assert_eq!(state.failing_publishes, 0);
    });
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

/// The standard team, the plugin in `folder` (id 70), configs 80, 81, … with each config and
/// its key file as the `googleCloudKeyJson` attachment, then the server.
async fn start(folder: &str, configs: Vec<(Value, Vec<u8>)>) -> ExportServer {
    let db = database_with_plugin(folder, "plugin", &["index.ts", "plugin.json", "package.json"], "0.0.1").await;
    for (index, (config, key_json)) in configs.into_iter().enumerate() {
        let id = 80 + index as i32;
        add_config(&db, id, &config).await;
        add_attachment(&db, id, "googleCloudKeyJson", "application/json", key_json).await;
    }
    ExportServer::launch(db, "gcp", &[])
}
