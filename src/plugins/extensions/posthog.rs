//! The sandbox's `posthog` global: `posthog.capture` (the event a plugin sends back into the
//! pipeline; delivering it is the queues module's job behind [`CaptureSink`](super::CaptureSink))
//! and `posthog.api.*` (the request to PostHog's API, including the auto-provisioned personal API
//! key of the organization's bot user). The runtime performs the actual `fetch`.
//!
//! The bot user's key never enters the plugin's VM: the request handed to the runtime carries a
//! single-use sealed handle in its `Authorization` header, which [`ApiKeyManager::unseal`] swaps
//! for the key just before the request leaves, and only when it goes to the configured PostHog
//! host (`SITE_URL`, else the reference's `https://app.posthog.com`). A plugin can no more send
//! the key elsewhere through `options.host` (refused) than through a redirect (the fetch drops
//! credentials on a cross-host hop).

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
use super::super::runtime::{network_settings, FetchError, FetchRequest, MetaError};
use super::super::vm_boundary::JsError;

/// The Celery task a captured event is sent as in the Postgres pipeline.
pub const CAPTURE_CELERY_TASK: &str = "posthog.tasks.process_event.process_event_with_plugins";
const BOT_USER_EMAIL_DOMAIN: &str = "posthogbot.user";
const API_KEY_CACHE_AGE: Duration = Duration::from_secs(30);
/// How a sealed bot key handle starts (`Bearer <prefix><token>`).
const SEALED_PREFIX: &str = "phx_sealed_";
/// A sealed handle not used within this time is forgotten.
const SEALED_MAX_AGE: Duration = Duration::from_secs(600);

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
    let posthog_host = network_settings().posthog_host.clone();
    let mut host = option("host").map(string_of).unwrap_or(posthog_host);
    if host.ends_with('/') {
        host.pop();
    }
    let path = path.strip_prefix('/').unwrap_or(path);
    let (token, api_key) = match (project, personal) {
        (Some(project), Some(personal)) => (string_of(project), string_of(personal)),
        _ => {
            let configured = network_settings().posthog_origin();
            let requested = url::Url::parse(&host).ok().map(|url| url.origin().ascii_serialization());
            if requested.is_none() || requested != configured {
                return Err(JsError::new(
                    "Error",
                    format!(
                        "posthog.api sends this project's API key only to the configured PostHog host ({}), not to \
                         {host}; pass projectApiKey and personalApiKey to call another host",
                        configured.unwrap_or_default()
                    ),
                ));
            }
            let team: Option<(Option<String>, Uuid)> =
                sqlx::query_as("SELECT api_token, organization_id FROM posthog_team WHERE id = $1")
                    .bind(team_id.unwrap_or(0))
                    .fetch_optional(pool)
                    .await
                    .map_err(|err| JsError::new("Error", err.to_string()))?;
            let (token, organization) = team.ok_or_else(|| JsError::new("Error", "Unable to determine project"))?;
            // A team without a token gives `token=undefined`, as the reference's template does.
            let key = keys.fetch_or_create(pool, organization).await?;
            (token.unwrap_or_else(|| "undefined".into()), keys.seal(key, requested.unwrap_or_default()))
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
    /// Sealed handle → (key, the origin it may go to, when sealed).
    sealed: Mutex<HashMap<String, (String, String, Instant)>>,
}

impl ApiKeyManager {
    /// A single-use handle standing in for `key` in the request given to the plugin's VM; only
    /// [`ApiKeyManager::unseal`] turns it back into the key, for a request to `origin`.
    pub fn seal(&self, key: String, origin: String) -> String {
        let handle = format!("{SEALED_PREFIX}{}", random_token());
        if let Ok(mut sealed) = self.sealed.lock() {
            sealed.retain(|_, (_, _, at)| at.elapsed() <= SEALED_MAX_AGE);
            sealed.insert(handle.clone(), (key, origin, Instant::now()));
        }
        handle
    }

    /// Replaces a sealed handle in `request`'s `Authorization` header by the key it stands for.
    /// A request to any other origin than the one the handle was sealed for is refused (a fetch
    /// error); a request without a handle passes unchanged.
    pub fn unseal(&self, mut request: FetchRequest) -> Result<FetchRequest, MetaError> {
        let origin = url::Url::parse(&request.url).ok().map(|url| url.origin().ascii_serialization());
        for (name, value) in request.headers.iter_mut() {
            let Some(handle) = value.strip_prefix("Bearer ").filter(|v| v.starts_with(SEALED_PREFIX)) else {
                continue;
            };
            if !name.eq_ignore_ascii_case("authorization") {
                continue;
            }
            let entry = self.sealed.lock().ok().and_then(|mut sealed| sealed.remove(handle));
            let Some((key, allowed, _)) = entry.filter(|(_, _, at)| at.elapsed() <= SEALED_MAX_AGE) else {
                return Err(
                    FetchError::refused(&request.url, "the posthog.api credentials are spent or unknown").into()
                );
            };
            if origin.as_deref() != Some(allowed.as_str()) {
                return Err(FetchError::refused(
                    &request.url,
                    &format!("the PostHog API key may only be sent to {allowed}"),
                )
                .into());
            }
            *value = format!("Bearer {key}");
        }
        Ok(request)
    }

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
