//! `meta.storage` (JSON values per plugin config) and `meta.utils.cursor` (numeric cursors in the
//! same key space). [`Storage`] holds the reference's argument rules and JSON handling; where the
//! values live is a [`StorageBackend`]: `posthog_pluginstorage` in Postgres for the server (safe
//! across threads and servers thanks to the `(plugin_config_id, key)` unique constraint), or
//! memory for the plugin dev loop (`plugins::memory`).

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::PgPool;

use super::super::js::truthy;
use super::super::vm_boundary::JsError;

fn db_error(err: sqlx::Error) -> JsError {
    JsError::new("Error", err.to_string())
}

/// Where plugin storage lives: text values (JSON, or a number's text for cursors) per
/// `(plugin config, key)`. Errors are the ones the plugin's promise rejects with.
#[async_trait]
pub trait StorageBackend: Send + Sync {
    /// The stored text; `Some(None)` for a row holding SQL `NULL`, `None` when there is no row.
    async fn get(&self, config_id: i32, key: &str) -> Result<Option<Option<String>>, JsError>;
    async fn set(&self, config_id: i32, key: &str, value: String) -> Result<(), JsError>;
    async fn del(&self, config_id: i32, key: &str) -> Result<(), JsError>;
    /// Sets `value` unless the key exists.
    async fn set_if_absent(&self, config_id: i32, key: &str, value: String) -> Result<(), JsError>;
    /// Adds the number `by` (its text) to the stored number atomically, storing `by` when there is
    /// no row; returns the new text.
    async fn add(&self, config_id: i32, key: &str, by: String) -> Result<Option<String>, JsError>;
}

#[async_trait]
impl StorageBackend for PgPool {
    async fn get(&self, config_id: i32, key: &str) -> Result<Option<Option<String>>, JsError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2 LIMIT 1")
                .bind(config_id)
                .bind(key)
                .fetch_optional(self)
                .await
                .map_err(db_error)?;
        Ok(row.map(|(value,)| value))
    }

    async fn set(&self, config_id: i32, key: &str, value: String) -> Result<(), JsError> {
        sqlx::query(
            "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = $3",
        )
        .bind(config_id)
        .bind(key)
        .bind(value)
        .execute(self)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn del(&self, config_id: i32, key: &str) -> Result<(), JsError> {
        sqlx::query("DELETE FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2")
            .bind(config_id)
            .bind(key)
            .execute(self)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn set_if_absent(&self, config_id: i32, key: &str, value: String) -> Result<(), JsError> {
        sqlx::query(
            "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin_config_id, key) DO NOTHING",
        )
        .bind(config_id)
        .bind(key)
        .bind(value)
        .execute(self)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn add(&self, config_id: i32, key: &str, by: String) -> Result<Option<String>, JsError> {
        let (value,): (Option<String>,) = sqlx::query_as(
            "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin_config_id, key) \
             DO UPDATE SET value = (posthog_pluginstorage.value::numeric + $3::numeric)::text RETURNING value",
        )
        .bind(config_id)
        .bind(key)
        .bind(by)
        .fetch_one(self)
        .await
        .map_err(db_error)?;
        Ok(value)
    }
}

/// One plugin config's storage.
#[derive(Clone)]
pub struct Storage {
    backend: Arc<dyn StorageBackend>,
    config_id: i32,
}

impl Storage {
    pub fn new(backend: Arc<dyn StorageBackend>, config_id: i32) -> Storage {
        Storage { backend, config_id }
    }

    /// The stored value, or `default` when there is no row (a stored `null` reads as `null`).
    pub async fn get(&self, key: &str, default: Value) -> Result<Value, JsError> {
        match self.backend.get(self.config_id, key).await? {
            None => Ok(default),
            Some(None) => Ok(Value::Null),
            Some(Some(text)) => serde_json::from_str(&text)
                .map_err(|err| JsError::new("SyntaxError", format!("Unexpected token in JSON: {err}"))),
        }
    }

    /// `value` `None` (JavaScript `undefined`) deletes the key.
    pub async fn set(&self, key: &str, value: Option<&Value>) -> Result<Value, JsError> {
        let Some(value) = value else {
            return self.del(key).await;
        };
        self.backend.set(self.config_id, key, value.to_string()).await?;
        Ok(Value::Null)
    }

    pub async fn del(&self, key: &str) -> Result<Value, JsError> {
        self.backend.del(self.config_id, key).await?;
        Ok(Value::Null)
    }

    /// `cursor.init(key, initial = 0)`: sets the cursor unless it exists.
    pub async fn cursor_init(&self, key: &str, initial: Option<&Value>) -> Result<Value, JsError> {
        let initial = match initial.filter(|value| truthy(value)) {
            None => 0.0,
            Some(value) => {
                value.as_f64().ok_or_else(|| JsError::new("Error", "The cursor's initial value must be a number!"))?
            }
        };
        self.backend.set_if_absent(self.config_id, key, super::super::js::number_string(initial)).await?;
        Ok(Value::Null)
    }

    /// `cursor.increment(key, by = 1)`: atomically adds and returns the new value.
    pub async fn cursor_increment(&self, key: &str, by: Option<&Value>) -> Result<Value, JsError> {
        let by = match by.filter(|value| truthy(value)) {
            None => 1.0,
            Some(value) => {
                value.as_f64().ok_or_else(|| JsError::new("Error", "The incrementBy value must be a number!"))?
            }
        };
        let value = self.backend.add(self.config_id, key, super::super::js::number_string(by)).await?;
        // `Number(value)`: anything unparsable is NaN, which JSON can only carry as null.
        let number = value.as_deref().and_then(|text| text.trim().parse::<f64>().ok());
        Ok(number.map(super::super::js::number_value).unwrap_or(Value::Null))
    }
}
