//! The sandbox's `posthog` global: `posthog.capture` (the event a plugin sends back into the
//! pipeline; delivering it is the queues module's job behind [`CaptureSink`](super::CaptureSink))
//! and `posthog.api.*` (the request to PostHog's API, including the auto-provisioned personal API
//! key of the organization's bot user). The runtime performs the actual `fetch`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::super::js::{form_urlencode, iso_now, random_token, string_of, truthy};
use super::super::rows::PluginConfig;
use super::super::vm::JsError;

/// The Celery task a captured event is sent as in the Postgres pipeline.
pub const CAPTURE_CELERY_TASK: &str = "posthog.tasks.process_event.process_event_with_plugins";
const DEFAULT_API_HOST: &str = "https://app.posthog.com";
const BOT_USER_EMAIL_DOMAIN: &str = "posthogbot.user";
const API_KEY_CACHE_AGE: Duration = Duration::from_secs(30);

/// An event captured by a plugin (the reference's `InternalData`).
#[derive(Debug, Clone, PartialEq)]
pub struct CapturedEvent {
    /// `{distinct_id, event, timestamp, properties, team_id, uuid}` in that order.
    pub data: Value,
    pub team_id: i64,
}

impl CapturedEvent {
    pub fn distinct_id(&self) -> &Value {
        &self.data["distinct_id"]
    }

    pub fn timestamp(&self) -> &Value {
        &self.data["timestamp"]
    }

    pub fn uuid(&self) -> &str {
        self.data["uuid"].as_str().unwrap_or_default()
    }

    /// Celery args of [`CAPTURE_CELERY_TASK`]: `[distinct_id, null, null, data, team_id,
    /// timestamp, timestamp]` (kwargs are `{}`).
    pub fn celery_args(&self) -> Value {
        json!([self.distinct_id(), null, null, self.data, self.team_id, self.timestamp(), self.timestamp()])
    }

    /// The Kafka `RawEventMessage` for `KAFKA_CONSUMPTION_TOPIC` (message key: the uuid).
    pub fn raw_event_message(&self) -> Value {
        json!({
            "distinct_id": self.distinct_id(),
            "ip": "",
            "site_url": "",
            "data": self.data.to_string(),
            "team_id": self.team_id,
            "now": self.timestamp(),
            "sent_at": self.timestamp(),
            "uuid": self.uuid(),
        })
    }
}

/// `posthog.capture(event, properties = {})` as `config`.
pub fn build_capture(config: &PluginConfig, event: &str, properties: Option<&Value>, version: &str) -> CapturedEvent {
    let mut other = match properties {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    };
    // Destructuring defaults apply to missing keys only: an explicit `null` is kept.
    let default_distinct_id = match &config.plugin.row.name {
        Some(name) if !name.is_empty() => name.clone(),
        _ => format!("plugin-id-{}", config.plugin_id),
    };
    let distinct_id = other.shift_remove("distinct_id").unwrap_or(Value::String(default_distinct_id));
    let timestamp = other.shift_remove("timestamp").unwrap_or_else(|| Value::String(iso_now()));
    let mut props = Map::new();
    props.insert("$lib".into(), Value::String("posthog-plugin-server".into()));
    props.insert("$lib_version".into(), Value::String(version.to_string()));
    props.insert("distinct_id".into(), distinct_id.clone());
    for (key, value) in other {
        props.insert(key, value);
    }
    let data = json!({
        "distinct_id": distinct_id,
        "event": event,
        "timestamp": timestamp,
        "properties": props,
        "team_id": config.team(),
        "uuid": Uuid::now_v7().to_string(),
    });
    CapturedEvent { data, team_id: config.team() }
}

/// A request for the runtime's `fetch`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

/// Builds `posthog.api.<method>(path, options)`. `method` is `get`, `post`, `put` or `delete`.
pub async fn api_request(
    pool: &PgPool,
    keys: &ApiKeyManager,
    team_id: Option<i32>,
    method: &str,
    path: &str,
    options: Option<&Value>,
) -> Result<ApiRequest, JsError> {
    let method = method.to_uppercase();
    let option = |name: &str| options.and_then(|options| options.get(name)).filter(|value| !value.is_null());
    let personal = option("personalApiKey").filter(|value| truthy(value));
    let project = option("projectApiKey").filter(|value| truthy(value));
    if personal.is_some() != project.is_some() {
        return Err(JsError::new(
            "Error",
            "You must specify a personalApiKey if you specify a projectApiKey and vice-versa!",
        ));
    }
    let mut host = option("host").map(string_of).unwrap_or_else(|| DEFAULT_API_HOST.to_string());
    if host.ends_with('/') {
        host.pop();
    }
    let path = path.strip_prefix('/').unwrap_or(path);
    let (token, api_key) = match (project, personal) {
        (Some(project), Some(personal)) => (string_of(project), string_of(personal)),
        _ => {
            let team: Option<(Option<String>, Uuid)> =
                sqlx::query_as("SELECT api_token, organization_id FROM posthog_team WHERE id = $1")
                    .bind(team_id.unwrap_or(0))
                    .fetch_optional(pool)
                    .await
                    .map_err(|err| JsError::new("Error", err.to_string()))?;
            let (token, organization) = team.ok_or_else(|| JsError::new("Error", "Unable to determine project"))?;
            // A team without a token gives `token=undefined`, as the reference's template does.
            (token.unwrap_or_else(|| "undefined".into()), keys.fetch_or_create(pool, organization).await?)
        }
    };
    // REF-BUG 15 kept: the reference meant GET and DELETE to carry `data` in the query, but only
    // GET does.
    let mut query: Map<String, Value> = Map::new();
    if method == "GET" {
        if let Some(Value::Object(data)) = option("data") {
            query = data.clone();
        }
    }
    query.insert("token".into(), Value::String(token));
    let pairs: Vec<(String, String)> = query.iter().map(|(key, value)| (key.clone(), string_of(value))).collect();
    let separator = if path.contains('?') { '&' } else { '?' };
    let url = format!("{host}/{path}{separator}{}", form_urlencode(&pairs));
    let headers = vec![("Authorization".to_string(), format!("Bearer {api_key}"))];
    let body = match method.as_str() {
        "GET" | "DELETE" => None,
        _ => Some(option("data").filter(|data| truthy(data)).cloned().unwrap_or_else(|| json!({})).to_string()),
    };
    Ok(ApiRequest { url, method, headers, body })
}

/// Finds or provisions the personal API key `posthog.api` uses, cached per organization for
/// 30 s. REF-BUG 19 kept: the bot user is looked up across all organizations, as the reference
/// does, so a self-hosted instance keeps using the key it already made.
#[derive(Default)]
pub struct ApiKeyManager {
    cache: Mutex<HashMap<Uuid, (String, Instant)>>,
}

impl ApiKeyManager {
    pub async fn fetch_or_create(&self, pool: &PgPool, organization: Uuid) -> Result<String, JsError> {
        if let Ok(cache) = self.cache.lock() {
            if let Some((key, at)) = cache.get(&organization) {
                if at.elapsed() <= API_KEY_CACHE_AGE {
                    return Ok(key.clone());
                }
            }
        }
        let key = self.provision(pool, organization).await.map_err(|err| JsError::new("Error", err.to_string()))?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(organization, (key.clone(), Instant::now()));
        }
        Ok(key)
    }

    async fn provision(&self, pool: &PgPool, organization: Uuid) -> Result<String, sqlx::Error> {
        let user: Option<(i32,)> = sqlx::query_as("SELECT id FROM posthog_user WHERE email LIKE $1")
            .bind(format!("%@{BOT_USER_EMAIL_DOMAIN}"))
            .fetch_optional(pool)
            .await?;
        let user_id = match user {
            Some((id,)) => {
                let existing: Option<(Option<String>,)> =
                    sqlx::query_as("SELECT value FROM posthog_personalapikey WHERE user_id = $1")
                        .bind(id)
                        .fetch_optional(pool)
                        .await?;
                if let Some((Some(value),)) =
                    existing.filter(|(value,)| value.as_deref().is_some_and(|v| !v.is_empty()))
                {
                    return Ok(value);
                }
                id
            }
            None => {
                let email_id: u32 = rand::rng().random_range(0..=100_000_000);
                let now = Utc::now();
                let mut transaction = pool.begin().await?;
                let (id,): (i32,) = sqlx::query_as(
                    "INSERT INTO posthog_user (uuid, password, first_name, last_name, email, distinct_id, is_staff, \
                     is_active, date_joined, events_column_config) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     RETURNING id",
                )
                .bind(Uuid::now_v7())
                .bind(random_token())
                .bind("Plugins API User [Bot]")
                .bind("")
                .bind(format!("{email_id}@{BOT_USER_EMAIL_DOMAIN}"))
                .bind(random_token())
                .bind(false)
                .bind(true)
                .bind(now)
                .bind(json!({"active": "DEFAULT"}))
                .fetch_one(&mut *transaction)
                .await?;
                sqlx::query(
                    "INSERT INTO posthog_organizationmembership (id, organization_id, user_id, level, joined_at, \
                     updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(Uuid::now_v7())
                .bind(organization)
                .bind(id)
                .bind(1_i16)
                .bind(now)
                .bind(now)
                .execute(&mut *transaction)
                .await?;
                transaction.commit().await?;
                id
            }
        };
        let (value,): (String,) = sqlx::query_as(
            "INSERT INTO posthog_personalapikey (id, user_id, label, value, created_at) VALUES ($1, $2, $3, $4, $5) \
             RETURNING value",
        )
        .bind(random_token())
        .bind(user_id)
        .bind("autogen")
        .bind(format!("phx_{}", random_token()))
        .bind(Utc::now())
        .fetch_one(pool)
        .await?;
        Ok(value)
    }
}
