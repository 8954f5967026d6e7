//! `meta.storage` (JSON values in `posthog_pluginstorage`, per plugin config) and
//! `meta.utils.cursor` (numeric cursors in the same table, safe across threads and servers
//! thanks to the `(plugin_config_id, key)` unique constraint).

use serde_json::Value;
use sqlx::PgPool;

use super::super::js::truthy;
use super::super::vm_boundary::JsError;

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
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2 LIMIT 1")
                .bind(self.config_id)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        match row {
            None => Ok(default),
            Some((None,)) => Ok(Value::Null),
            Some((Some(text),)) => serde_json::from_str(&text)
                .map_err(|err| JsError::new("SyntaxError", format!("Unexpected token in JSON: {err}"))),
        }
    }

    /// `value` `None` (JavaScript `undefined`) deletes the key.
    pub async fn set(&self, key: &str, value: Option<&Value>) -> Result<Value, JsError> {
        let Some(value) = value else {
            return self.del(key).await;
        };
        sqlx::query(
            "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = $3",
        )
        .bind(self.config_id)
        .bind(key)
        .bind(value.to_string())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(Value::Null)
    }

    pub async fn del(&self, key: &str) -> Result<Value, JsError> {
        sqlx::query("DELETE FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2")
            .bind(self.config_id)
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
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
        sqlx::query(
            "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin_config_id, key) DO NOTHING",
        )
        .bind(self.config_id)
        .bind(key)
        .bind(super::super::js::number_string(initial))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
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
        let by_text = super::super::js::number_string(by);
        let (value,): (Option<String>,) = sqlx::query_as(
            "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin_config_id, key) \
             DO UPDATE SET value = (posthog_pluginstorage.value::numeric + $3::numeric)::text RETURNING value",
        )
        .bind(self.config_id)
        .bind(key)
        .bind(by_text)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        // `Number(value)`: anything unparsable is NaN, which JSON can only carry as null.
        let number = value.as_deref().and_then(|text| text.trim().parse::<f64>().ok());
        Ok(number.map(super::super::js::number_value).unwrap_or(Value::Null))
    }
}
