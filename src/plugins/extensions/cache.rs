//! `meta.cache`: keys under `@plugin/<plugin_id>/<team_id>/`, with the reference's argument
//! checks, JSON (de)serialization and quirks (`get` returns `null` for a missing key whatever the
//! default; invalid JSON reads as `null`; a slow `GET` is retried once after 5 s). [`Cache`] holds
//! those rules; the commands go to a [`CacheBackend`]: Redis for the server ([`CacheRedis`]), memory
//! for the plugin dev loop (`plugins::memory`).
//!
//! Commands reach Redis in the order plugins issue them: a plugin that does not await
//! `cache.set('counter', n)` reads `n` with the next event's `get`, as with the reference, whose
//! single JavaScript thread writes each command out when it is called. Pooled connections cannot
//! promise that (a command that gets a fresh connection overtakes one that waits for a
//! recycled one), so the cache uses one multiplexed connection ([`CacheRedis`]) that queues
//! commands in issue order and still pipelines many at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use serde_json::Value;
use tokio::sync::OnceCell;

use super::super::js::{as_integer, number_string, string_of, truthy};
use super::super::vm_boundary::JsError;

/// How long a `GET` may take before it is sent once more.
const GET_RETRY_AFTER: Duration = Duration::from_secs(5);
const LPUSH_MAX_ELEMENTS: usize = 1000;

/// The connection every config's cache shares: multiplexed, reconnecting by itself, opened on
/// first use.
#[derive(Clone)]
pub struct CacheRedis {
    url: String,
    manager: Arc<OnceCell<ConnectionManager>>,
}

impl CacheRedis {
    /// For `url` (see `hub::redis_url`).
    pub fn new(url: String) -> CacheRedis {
        CacheRedis { url, manager: Arc::new(OnceCell::new()) }
    }

    async fn connection(&self) -> Result<ConnectionManager, JsError> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.url.as_str())?;
                let config = ConnectionManagerConfig::new().set_connection_timeout(crate::hub::CONNECT_TIMEOUT);
                ConnectionManager::new_with_config(client, config).await
            })
            .await
            .map_err(redis_error)?;
        Ok(manager.clone())
    }
}

/// The Redis commands `meta.cache` uses, on full keys. Numbers are passed as the text ioredis
/// sends (`String(n)`); errors are what the plugin's promise rejects with.
#[async_trait]
pub trait CacheBackend: Send + Sync {
    /// `SET key value [EX ttl]`.
    async fn set(&self, key: &str, value: String, ttl_seconds: Option<String>) -> Result<(), JsError>;
    async fn get(&self, key: &str) -> Result<Option<String>, JsError>;
    async fn incr(&self, key: &str) -> Result<i64, JsError>;
    /// Whether the key existed.
    async fn expire(&self, key: &str, ttl_seconds: String) -> Result<bool, JsError>;
    /// The list's new length.
    async fn lpush(&self, key: &str, elements: Vec<String>) -> Result<i64, JsError>;
    async fn lrange(&self, key: &str, start: String, end: String) -> Result<Vec<String>, JsError>;
    async fn llen(&self, key: &str) -> Result<i64, JsError>;
    async fn lrem(&self, key: &str, count: String, element: String) -> Result<i64, JsError>;
    /// `None` when the key does not exist.
    async fn lpop(&self, key: &str, count: String) -> Result<Option<Vec<String>>, JsError>;
}

#[async_trait]
impl CacheBackend for CacheRedis {
    async fn set(&self, key: &str, value: String, ttl_seconds: Option<String>) -> Result<(), JsError> {
        let mut command = redis::cmd("SET");
        command.arg(key).arg(value);
        if let Some(ttl) = ttl_seconds {
            command.arg("EX").arg(ttl);
        }
        let mut connection = self.connection().await?;
        command.query_async::<()>(&mut connection).await.map_err(redis_error)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, JsError> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(GET_RETRY_AFTER, connection.get(key)).await {
            Ok(result) => result.map_err(redis_error),
            Err(_) => {
                tracing::warn!(key = %key, "Waited 5 sec to get redis key, retrying once!");
                let mut retry = self.connection().await?;
                retry.get(key).await.map_err(redis_error)
            }
        }
    }

    async fn incr(&self, key: &str) -> Result<i64, JsError> {
        let mut connection = self.connection().await?;
        connection.incr(key, 1).await.map_err(redis_error)
    }

    async fn expire(&self, key: &str, ttl_seconds: String) -> Result<bool, JsError> {
        let mut connection = self.connection().await?;
        let result: i64 =
            redis::cmd("EXPIRE").arg(key).arg(ttl_seconds).query_async(&mut connection).await.map_err(redis_error)?;
        Ok(result == 1)
    }

    async fn lpush(&self, key: &str, elements: Vec<String>) -> Result<i64, JsError> {
        let mut connection = self.connection().await?;
        redis::cmd("LPUSH").arg(key).arg(elements).query_async(&mut connection).await.map_err(redis_error)
    }

    async fn lrange(&self, key: &str, start: String, end: String) -> Result<Vec<String>, JsError> {
        let mut connection = self.connection().await?;
        redis::cmd("LRANGE").arg(key).arg(start).arg(end).query_async(&mut connection).await.map_err(redis_error)
    }

    async fn llen(&self, key: &str) -> Result<i64, JsError> {
        let mut connection = self.connection().await?;
        connection.llen(key).await.map_err(redis_error)
    }

    async fn lrem(&self, key: &str, count: String, element: String) -> Result<i64, JsError> {
        let mut connection = self.connection().await?;
        redis::cmd("LREM").arg(key).arg(count).arg(element).query_async(&mut connection).await.map_err(redis_error)
    }

    async fn lpop(&self, key: &str, count: String) -> Result<Option<Vec<String>>, JsError> {
        let mut connection = self.connection().await?;
        redis::cmd("LPOP").arg(key).arg(count).query_async(&mut connection).await.map_err(redis_error)
    }
}

/// One plugin config's cache.
#[derive(Clone)]
pub struct Cache {
    backend: Arc<dyn CacheBackend>,
    prefix: String,
}

fn redis_error(err: impl std::fmt::Display) -> JsError {
    JsError::new("Error", err.to_string())
}

/// A Redis argument for a JS number (`String(n)` as ioredis sends it).
fn number_arg(value: &Value) -> String {
    as_integer(value).map(|n| n.to_string()).unwrap_or_else(|| value.as_f64().map(number_string).unwrap_or_default())
}

/// `options.jsonSerialize`, default true.
fn json_serialize(options: Option<&Value>) -> bool {
    options.and_then(|options| options.get("jsonSerialize")).map(truthy).unwrap_or(true)
}

impl Cache {
    /// `team_id` `None` gives the reference's `@all` key space.
    pub fn new(backend: Arc<dyn CacheBackend>, plugin_id: i32, team_id: Option<i64>) -> Cache {
        let team = team_id.map(|team| team.to_string()).unwrap_or_else(|| "@all".into());
        Cache { backend, prefix: format!("@plugin/{plugin_id}/{team}/") }
    }

    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn set(
        &self,
        key: &str,
        value: &Value,
        ttl_seconds: Option<&Value>,
        options: Option<&Value>,
    ) -> Result<Value, JsError> {
        let serialized = if json_serialize(options) { value.to_string() } else { string_of(value) };
        let ttl = ttl_seconds.filter(|ttl| truthy(ttl)).map(number_arg);
        self.backend.set(&self.key(key), serialized, ttl).await?;
        Ok(Value::Null)
    }

    pub async fn get(&self, key: &str, options: Option<&Value>) -> Result<Value, JsError> {
        Ok(match self.backend.get(&self.key(key)).await? {
            None => Value::Null,
            Some(text) if text.is_empty() => Value::Null,
            Some(text) if json_serialize(options) => serde_json::from_str(&text).unwrap_or(Value::Null),
            Some(text) => Value::String(text),
        })
    }

    pub async fn incr(&self, key: &str) -> Result<Value, JsError> {
        Ok(Value::from(self.backend.incr(&self.key(key)).await?))
    }

    pub async fn expire(&self, key: &str, ttl_seconds: &Value) -> Result<Value, JsError> {
        Ok(Value::Bool(self.backend.expire(&self.key(key), number_arg(ttl_seconds)).await?))
    }

    pub async fn lpush(&self, key: &str, element_or_array: &Value) -> Result<Value, JsError> {
        let elements: Vec<String> = match element_or_array {
            Value::String(text) => vec![text.clone()],
            Value::Array(items) => {
                if items.len() > LPUSH_MAX_ELEMENTS {
                    return Err(JsError::new(
                        "IllegalOperationError",
                        "Too many elements in array for cache.lpush. Maximum: 1000",
                    ));
                }
                items.iter().map(string_of).collect()
            }
            _ => return Err(JsError::new("Error", "cache.lpush expects a string value or an array of strings")),
        };
        Ok(Value::from(self.backend.lpush(&self.key(key), elements).await?))
    }

    pub async fn lrange(&self, key: &str, start: &Value, end: &Value) -> Result<Value, JsError> {
        if !start.is_number() || !end.is_number() {
            return Err(JsError::new("Error", "cache.lrange expects a number for the start and end indexes"));
        }
        Ok(Value::from(self.backend.lrange(&self.key(key), number_arg(start), number_arg(end)).await?))
    }

    pub async fn llen(&self, key: &str) -> Result<Value, JsError> {
        Ok(Value::from(self.backend.llen(&self.key(key)).await?))
    }

    pub async fn lrem(&self, key: &str, count: &Value, element: &Value) -> Result<Value, JsError> {
        if !count.is_number() {
            return Err(JsError::new("Error", "cache.lrem expects a number for the \"count\" argument"));
        }
        Ok(Value::from(self.backend.lrem(&self.key(key), number_arg(count), string_of(element)).await?))
    }

    pub async fn lpop(&self, key: &str, count: &Value) -> Result<Value, JsError> {
        if !count.is_number() {
            return Err(JsError::new("Error", "cache.lpop expects a number for the \"count\" argument"));
        }
        let popped = self.backend.lpop(&self.key(key), number_arg(count)).await?;
        Ok(popped.map(Value::from).unwrap_or(Value::Null))
    }
}
