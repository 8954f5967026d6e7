//! `meta.storage` (JSON values in `posthog_pluginstorage`, per plugin config) and
//! `meta.utils.cursor` (numeric cursors in the same table, safe across threads and servers
//! thanks to the `(plugin_config_id, key)` unique constraint).

use serde_json::Value;
use sqlx::PgPool;

use super::super::vm_boundary::JsError;
use crate::db;
use crate::js::{self, is_truthy};

fn db_error(err: sqlx::Error) -> JsError {
    JsError::new("Error", err.to_string())
}

/// One plugin config's storage.
#[derive(Clone)]
pub struct Storage {
    pool: PgPool,
    config_id: i32,
}

impl Storage {
    pub fn new(pool: PgPool, config_id: i32) -> Storage {
        Storage { pool, config_id }
    }

    /// The stored value, or `default` when there is no row (a stored `null` reads as `null`).
    pub async fn get(&self, key: &str, default: Value) -> Result<Value, JsError> {
        match db::plugins::storage_get(&self.pool, self.config_id, key).await.map_err(db_error)? {
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
        db::plugins::storage_set(&self.pool, self.config_id, key, &value.to_string()).await.map_err(db_error)?;
        Ok(Value::Null)
    }

    pub async fn del(&self, key: &str) -> Result<Value, JsError> {
        db::plugins::storage_delete(&self.pool, self.config_id, key).await.map_err(db_error)?;
        Ok(Value::Null)
    }

    /// `cursor.init(key, initial = 0)`: sets the cursor unless it exists.
    pub async fn cursor_init(&self, key: &str, initial: Option<&Value>) -> Result<Value, JsError> {
        let initial = match initial.filter(|value| is_truthy(value)) {
            None => 0.0,
            Some(value) => {
                value.as_f64().ok_or_else(|| JsError::new("Error", "The cursor's initial value must be a number!"))?
            }
        };
        db::plugins::storage_insert_absent(&self.pool, self.config_id, key, &js::number_to_string(initial))
            .await
            .map_err(db_error)?;
        Ok(Value::Null)
    }

    /// `cursor.increment(key, by = 1)`: atomically adds and returns the new value.
    pub async fn cursor_increment(&self, key: &str, by: Option<&Value>) -> Result<Value, JsError> {
        let by = match by.filter(|value| is_truthy(value)) {
            None => 1.0,
            Some(value) => {
                value.as_f64().ok_or_else(|| JsError::new("Error", "The incrementBy value must be a number!"))?
            }
        };
        let value = db::plugins::storage_increment(&self.pool, self.config_id, key, &js::number_to_string(by))
            .await
            .map_err(db_error)?;
        // `Number(value)`: anything unparsable is NaN, which JSON can only carry as null.
        let number = value.as_deref().and_then(|text| text.trim().parse::<f64>().ok());
        Ok(number.map(js::number_to_json).unwrap_or(Value::Null))
    }
}
