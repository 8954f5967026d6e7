//! What the export-plugin tests (`e2e_*_export.rs`) share: one of PostHog's plugins installed from
//! `tests/data/plugins` as PostHog stores it, the whole server in process on its own Celery queue,
//! events sent as Celery tasks, the plugin's log and config error read back; and Google's OAuth
//! token endpoint as the Google stand-ins answer it (the service account's RS256 JWT verified with
//! the key's public half, tokens handed out and checked). Needs `mod common;` beside it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use openssl::pkey::{PKey, Private, Public};
use plugin_server::sinks::CeleryProducer;
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use serde_json::{json, Map, Value};

use crate::common::http_stub::{http_stub, HttpRequest};
use crate::common::in_process::{self, InProcessServer};
use crate::common::{self, wait_for, TestDb};

pub const TEAM: i32 = common::TEAM_ID;
pub const NOW: &str = "2021-11-01T10:00:00.000Z";
/// The plugin's id in `posthog_plugin`; its configs are 80, 81, ….
pub const PLUGIN_ID: i32 = 70;

/// `tests/data/plugins/<name>`.
pub fn plugin_folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plugins").join(name)
}

/// The plugin folder as PostHog stores a plugin: a zip archive of `files` under `root/`.
pub fn archive_of(folder: &Path, root: &str, files: &[&str]) -> Vec<u8> {
    let contents: Vec<(&str, Vec<u8>)> =
        files.iter().map(|name| (*name, std::fs::read(folder.join(name)).unwrap())).collect();
    archive_of_files(root, &contents)
}

/// A zip archive of `files` (name, contents) under `root/`, as PostHog stores a plugin.
pub fn archive_of_files(root: &str, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default();
        for (name, contents) in files {
            zip.start_file(format!("{root}/{name}"), options).unwrap();
            zip.write_all(contents).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

/// A database with the standard team and the plugin in `tests/data/plugins/<folder>` (id 70,
/// version `tag`), zipped from `files` under `root/`.
pub async fn database_with_plugin(folder: &str, root: &str, files: &[&str], tag: &str) -> TestDb {
    let folder = plugin_folder(folder);
    let plugin_json: Value = serde_json::from_slice(&std::fs::read(folder.join("plugin.json")).unwrap()).unwrap();
    database_with_archive(&plugin_json, archive_of(&folder, root, files), tag).await
}

/// A database with the standard team and the plugin `plugin_json` describes, stored as `archive`
/// (id 70, version `tag`).
pub async fn database_with_archive(plugin_json: &Value, archive: Vec<u8>, tag: &str) -> TestDb {
    let db = TestDb::empty().await;
    common::reset_test_database(&db.pool, None, false).await;
    sqlx::query(
        "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, url, config_schema, tag,
            archive, error, from_json, from_web, is_global, is_preinstalled, capabilities, metrics)
         VALUES ($1, $2::uuid, 'custom', $3, '', $4, $5, $6, $7, NULL, false, false, false, false, '{}', '{}')",
    )
    .bind(PLUGIN_ID)
    .bind(common::COMMON_ORGANIZATION_ID)
    .bind(plugin_json["name"].as_str().unwrap())
    .bind(plugin_json["url"].as_str().unwrap())
    .bind(&plugin_json["config"])
    .bind(tag)
    .bind(archive)
    .execute(&db.pool)
    .await
    .unwrap();
    db
}

/// An enabled config `id` of the plugin for the standard team, run in order `id`.
pub async fn add_config(db: &TestDb, id: i32, config: &Value) {
    sqlx::query(
        "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
         VALUES ($1, $2, $3, true, $1, $4, NULL, now(), now())",
    )
    .bind(id)
    .bind(TEAM)
    .bind(PLUGIN_ID)
    .bind(config)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// An attachment `key` (`meta.attachments[key]`) of config `config_id`.
pub async fn add_attachment(db: &TestDb, config_id: i32, key: &str, content_type: &str, contents: Vec<u8>) {
    sqlx::query(
        "INSERT INTO posthog_pluginattachment (key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(key)
    .bind(content_type)
    .bind(format!("{key}.json"))
    .bind(contents.len() as i32)
    .bind(contents)
    .bind(config_id)
    .bind(TEAM)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// The whole server, in process, on `db` and a Celery queue of its own.
pub struct ExportServer {
    pub db: TestDb,
    server: InProcessServer,
}

impl ExportServer {
    /// The server on `db`: 2 worker threads, queues named after `queue_prefix`, warnings logged;
    /// `extra` settings win over these.
    pub fn launch(db: TestDb, queue_prefix: &str, extra: &[(&str, &str)]) -> ExportServer {
        let server = InProcessServer::start(in_process::celery_config(&db, queue_prefix, extra));
        ExportServer { db, server }
    }

    /// A producer of Celery tasks for the server's queue.
    pub fn producer(&self) -> &CeleryProducer {
        &self.server.producer
    }

    /// `process_event_with_plugins` for `data` (`event`, `properties`, …) from `user-1`.
    pub async fn send_event(&self, data: Value) {
        let args = json!(["user-1", "127.0.0.1", "http://127.0.0.1:8000", data, TEAM, NOW, NOW]);
        self.server.producer.send_task(PROCESS_EVENT_TASK, args.as_array().unwrap(), &Map::new()).await.unwrap();
    }

    /// `event-{n}` for `n` in `range` at [`NOW`], with `$set` `{a: n}` and properties `n` and a
    /// non-ASCII `text`; `n = 3` is a `$feature_flag_called` (which the export plugins are set to
    /// ignore).
    pub async fn send_numbered(&self, range: std::ops::Range<u32>) {
        for n in range {
            let name = if n == 3 { "$feature_flag_called".to_string() } else { format!("event-{n}") };
            self.send_event(
                json!({"event": name, "timestamp": NOW, "$set": {"a": n}, "properties": {"n": n, "text": "zażółć 🦔"}}),
            )
            .await;
        }
    }

    /// The messages config `config_id` logged.
    pub async fn log(&self, config_id: i32) -> Vec<String> {
        sqlx::query_scalar("SELECT message FROM posthog_pluginlogentry WHERE plugin_config_id = $1 ORDER BY timestamp")
            .bind(config_id)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    pub async fn wait_for_log(&self, config_id: i32, needle: &str) -> Vec<String> {
        wait_for(&format!("config {config_id} to log {needle:?}"), || async {
            let log = self.log(config_id).await;
            log.iter().any(|line| line.contains(needle)).then_some(log)
        })
        .await
    }

    /// [`ExportServer::wait_for_log`] for up to `seconds`.
    pub async fn wait_long_for_log(&self, config_id: i32, needle: &str, seconds: u64) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        loop {
            let log = self.log(config_id).await;
            if log.iter().any(|line| line.contains(needle)) {
                return log;
            }
            assert!(std::time::Instant::now() < deadline, "config {config_id} did not log {needle:?}: {log:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn config_error(&self, config_id: i32) -> Option<Value> {
        sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = $1")
            .bind(config_id)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// The properties of the stored event called `name`.
    pub async fn event_properties(&self, name: &str) -> Value {
        wait_for(&format!("the {name} row"), || async {
            sqlx::query_scalar::<_, Value>("SELECT properties FROM posthog_event WHERE event = $1")
                .bind(name)
                .fetch_optional(&self.db.pool)
                .await
                .unwrap()
        })
        .await
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}

// ---------------------------------------------------------------- Google's token endpoint

pub const GOOGLE_PROJECT: &str = "proj-1";
pub const GOOGLE_EMAIL: &str = "exporter@proj-1.iam.gserviceaccount.com";

/// A Google stand-in on a loopback port, serving `services` (`set_test_api_root`) and its own
/// token endpoint: `respond` answers each request given the public half of `trusted` (which signs
/// the assertions it accepts) and the token audience (the stand-in's `/token`). Its root URL.
pub async fn google_stub<F>(trusted: &PKey<Private>, services: &[&str], respond: F) -> String
where
    F: Fn(&HttpRequest, &PKey<Public>, &str) -> (u16, Vec<u8>) + Send + Sync + 'static,
{
    let public = PKey::public_key_from_pem(&trusted.public_key_to_pem().unwrap()).unwrap();
    let audience = Arc::new(Mutex::new(String::new()));
    let audience_in = Arc::clone(&audience);
    let (address, _requests) = http_stub("127.0.0.1:0", move |request: &HttpRequest| {
        let audience = audience_in.lock().unwrap().clone();
        respond(request, &public, &audience)
    })
    .await;
    let root = format!("http://{address}");
    *audience.lock().unwrap() = format!("{root}/token");
    for service in services {
        plugin_server::plugins::extensions::google::set_test_api_root(service, &root);
    }
    root
}

/// A fresh RSA key for a service account.
pub fn google_key() -> PKey<Private> {
    PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
}

/// The service account's key file (`key-1`), its token URL on the stub at `root`.
pub fn google_key_json(key: &PKey<Private>, root: &str) -> Vec<u8> {
    let pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    json!({"type": "service_account", "project_id": GOOGLE_PROJECT, "private_key_id": "key-1", "private_key": pem,
        "client_email": GOOGLE_EMAIL, "client_id": "1234", "token_uri": format!("{root}/token")})
    .to_string()
    .into_bytes()
}

/// A Google API error body.
pub fn google_error(code: u16, message: &str, reason: &str, status: &str) -> (u16, Vec<u8>) {
    let body = json!({"error": {"code": code, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}], "status": status}});
    (code, body.to_string().into_bytes())
}

/// Checks a gtoken assertion: signed by `public`, for `audience` and `scope`, one hour long.
pub fn verify_assertion(public: &PKey<Public>, jwt: &str, audience: &str, scope: &str) -> Result<(), String> {
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
    if claims["iss"] != GOOGLE_EMAIL
        || claims["aud"] != audience
        || claims["scope"] != scope
        || exp != iat + 3600
        || iat.abs_diff(now) > 60
    {
        return Err(format!("claims {claims}"));
    }
    Ok(())
}

/// What a Google stand-in's token endpoint hands out and refuses.
#[derive(Default)]
pub struct GoogleTokens {
    pub issued: Vec<String>,
    pub refusals: Vec<String>,
}

impl GoogleTokens {
    /// The token endpoint's answer when `request` is for it (`POST /token`: a token for an
    /// assertion [`verify_assertion`] accepts, gtoken's `invalid_grant` otherwise), else `None`.
    pub fn answer(
        &mut self,
        public: &PKey<Public>,
        audience: &str,
        scope: &str,
        request: &HttpRequest,
    ) -> Option<(u16, Vec<u8>)> {
        if request.target != "/token" {
            return None;
        }
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&request.body).into_owned().collect();
        let field = |name: &str| form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
        let verdict = match (field("grant_type"), field("assertion")) {
            (Some("urn:ietf:params:oauth:grant-type:jwt-bearer"), Some(jwt)) => {
                verify_assertion(public, jwt, audience, scope)
            }
            _ => Err(format!("form {form:?}")),
        };
        Some(match verdict {
            Ok(()) => {
                let token = format!("ya29.token-{}", self.issued.len());
                self.issued.push(token.clone());
                (
                    200,
                    json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}).to_string().into_bytes(),
                )
            }
            Err(why) => {
                self.refusals.push(why);
                (400, br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#.to_vec())
            }
        })
    }

    /// Whether `request` carries a token this endpoint issued; the refusal (Google's 401) when not.
    pub fn check_bearer(&mut self, request: &HttpRequest) -> Result<(), (u16, Vec<u8>)> {
        let authorized = request
            .header("authorization")
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|token| self.issued.iter().any(|known| known == token));
        if authorized {
            return Ok(());
        }
        self.refusals.push(format!("{} {} without a token", request.method, request.target));
        Err(google_error(401, "Request is missing required authentication credential.", "required", "UNAUTHENTICATED"))
    }
}
