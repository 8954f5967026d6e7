//! `posthog_plugin`, `posthog_pluginconfig`, `posthog_pluginattachment` and `posthog_pluginstorage`:
//! which plugin configs are in force (the reference's `sql.ts`, so the same rows load), the few
//! writes the server makes to them, the global MMDB attachment, and `meta.storage` rows.

use serde_json::Value;
use sqlx::PgPool;

use crate::plugins::rows::{InForceRows, PluginAttachmentRow, PluginConfigRow, PluginRow};

/// The in-force condition, selecting `column` of `posthog_pluginconfig`.
fn in_force(column: &str) -> String {
    format!(
        "SELECT posthog_pluginconfig.{column} FROM posthog_pluginconfig \
         LEFT JOIN posthog_team ON posthog_team.id = posthog_pluginconfig.team_id \
         LEFT JOIN posthog_organization ON posthog_organization.id = posthog_team.organization_id \
         LEFT JOIN posthog_plugin ON posthog_plugin.id = posthog_pluginconfig.plugin_id \
         WHERE (posthog_pluginconfig.enabled = 't' AND posthog_organization.plugins_access_level > 0 \
         AND (posthog_plugin.organization_id = posthog_organization.id OR posthog_plugin.is_global))"
    )
}

/// Reads the in-force plugins, attachments and configs (the reference's three queries).
pub async fn fetch_in_force(pool: &PgPool) -> Result<InForceRows, sqlx::Error> {
    let plugins = crate::metrics::catalog::postgres(
        "getPluginRows",
        sqlx::query_as::<_, PluginRow>(&format!(
        "SELECT id, organization_id, plugin_type, is_global, name, url, config_schema, tag, archive, source, \
         capabilities, metrics, updated_at FROM posthog_plugin WHERE id IN ({} GROUP BY posthog_pluginconfig.plugin_id)",
        in_force("plugin_id")
    ))
    .fetch_all(pool),
    )
    .await?;
    let attachments = crate::metrics::catalog::postgres(
        "getPluginAttachmentRows",
        sqlx::query_as::<_, PluginAttachmentRow>(&format!(
            "SELECT id, plugin_config_id, key, content_type, file_name, contents FROM posthog_pluginattachment \
         WHERE plugin_config_id IN ({})",
            in_force("id")
        ))
        .fetch_all(pool),
    )
    .await?;
    let configs = crate::metrics::catalog::postgres(
        "getPluginConfigRows",
        sqlx::query_as::<_, PluginConfigRow>(&format!(
            "SELECT id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at \
         FROM posthog_pluginconfig WHERE id IN ({}) ORDER BY id",
            in_force("id")
        ))
        .fetch_all(pool),
    )
    .await?;
    Ok(InForceRows { plugins, configs, attachments })
}

/// Runs `UPDATE … SET <json column> = $1 WHERE id = $2`.
async fn set_json(pool: &PgPool, sql: &str, value: Option<&Value>, id: i32) -> Result<(), sqlx::Error> {
    sqlx::query(sql).bind(value).bind(id).execute(pool).await.map(|_| ())
}

pub async fn set_plugin_capabilities(pool: &PgPool, plugin_id: i32, capabilities: &Value) -> Result<(), sqlx::Error> {
    set_json(pool, "UPDATE posthog_plugin SET capabilities = $1 WHERE id = $2", Some(capabilities), plugin_id).await
}

pub async fn set_plugin_metrics(pool: &PgPool, plugin_id: i32, metrics: &Value) -> Result<(), sqlx::Error> {
    set_json(pool, "UPDATE posthog_plugin SET metrics = $1 WHERE id = $2", Some(metrics), plugin_id).await
}

/// Writes (or clears, with `None`) `posthog_pluginconfig.error`.
pub async fn set_config_error(pool: &PgPool, config_id: i32, error: Option<&Value>) -> Result<(), sqlx::Error> {
    set_json(pool, "UPDATE posthog_pluginconfig SET error = $1 WHERE id = $2", error, config_id).await
}

/// Runs an update whose only parameter is the row id.
async fn update_by_id(pool: &PgPool, sql: &str, id: i32) -> Result<(), sqlx::Error> {
    sqlx::query(sql).bind(id).execute(pool).await.map(|_| ())
}

/// Clears `posthog_pluginconfig.error` when set.
pub async fn clear_config_error(pool: &PgPool, config_id: i32) -> Result<(), sqlx::Error> {
    update_by_id(pool, "UPDATE posthog_pluginconfig SET error = NULL WHERE id = $1 AND error IS NOT NULL", config_id)
        .await
}

/// Disables a config after too many failed set-up attempts.
pub async fn disable_plugin_config(pool: &PgPool, config_id: i32) -> Result<(), sqlx::Error> {
    update_by_id(pool, "UPDATE posthog_pluginconfig SET enabled = 'f' WHERE id = $1 AND enabled = 't'", config_id).await
}

/// Adds `{job: {}}` to the plugin's `public_jobs` unless the job is there already.
pub async fn add_public_job(pool: &PgPool, plugin_id: i32, job: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE posthog_plugin SET public_jobs = COALESCE(public_jobs, '{}'::jsonb) || $1::jsonb \
         WHERE id = $2 AND (public_jobs -> $3) IS NULL",
    )
    .bind(serde_json::json!({ job: {} }))
    .bind(plugin_id)
    .bind(job)
    .execute(pool)
    .await
    .map(drop)
}

/// The first global attachment (no config, no team) with `key`, by file name: `(id, file_name,
/// contents)`.
pub async fn fetch_global_attachment(
    pool: &PgPool,
    key: &str,
) -> Result<Option<(i64, String, Option<Vec<u8>>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id::bigint, file_name, contents FROM posthog_pluginattachment
         WHERE key = $1 AND plugin_config_id IS NULL AND team_id IS NULL
         ORDER BY file_name ASC LIMIT 1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// Stores a global attachment with `key` and deletes every other row with that key, in one
/// transaction. The one global attachment is the MMDB: the statements are timed as the
/// reference's `insertGeoIpAttachment` and `deleteGeoIpAttachment`.
pub async fn replace_global_attachment(
    pool: &PgPool,
    key: &str,
    content_type: &str,
    file_name: &str,
    contents: &[u8],
) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let insert = sqlx::query_scalar(
        "INSERT INTO posthog_pluginattachment
            (key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
         VALUES ($1, $2, $3, $4, $5, NULL, NULL) RETURNING id::bigint",
    )
    .bind(key)
    .bind(content_type)
    .bind(file_name)
    .bind(contents.len() as i32)
    .bind(contents)
    .fetch_one(&mut *transaction);
    let id: i64 = crate::metrics::catalog::postgres("insertGeoIpAttachment", insert).await?;
    let delete = sqlx::query("DELETE FROM posthog_pluginattachment WHERE key = $1 AND id <> $2")
        .bind(key)
        .bind(id)
        .execute(&mut *transaction);
    crate::metrics::catalog::postgres("deleteGeoIpAttachment", delete).await?;
    transaction.commit().await
}

/// A stored value: `None` when there is no row, `Some(None)` for a stored SQL null.
pub async fn storage_get(pool: &PgPool, config_id: i32, key: &str) -> Result<Option<Option<String>>, sqlx::Error> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2 LIMIT 1")
            .bind(config_id)
            .bind(key)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(value,)| value))
}

/// Inserts or replaces a stored value.
pub async fn storage_set(pool: &PgPool, config_id: i32, key: &str, value: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
         ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = $3",
    )
    .bind(config_id)
    .bind(key)
    .bind(value)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn storage_delete(pool: &PgPool, config_id: i32, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2")
        .bind(config_id)
        .bind(key)
        .execute(pool)
        .await
        .map(drop)
}

/// Stores `value` unless the key exists.
pub async fn storage_insert_absent(pool: &PgPool, config_id: i32, key: &str, value: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
         ON CONFLICT (plugin_config_id, key) DO NOTHING",
    )
    .bind(config_id)
    .bind(key)
    .bind(value)
    .execute(pool)
    .await
    .map(drop)
}

/// Adds `by` (a numeric text) to the stored number, atomically (a missing key starts at `by`);
/// returns the new stored text.
pub async fn storage_increment(
    pool: &PgPool,
    config_id: i32,
    key: &str,
    by: &str,
) -> Result<Option<String>, sqlx::Error> {
    let (value,): (Option<String>,) = sqlx::query_as(
        "INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3) \
         ON CONFLICT (plugin_config_id, key) \
         DO UPDATE SET value = (posthog_pluginstorage.value::numeric + $3::numeric)::text RETURNING value",
    )
    .bind(config_id)
    .bind(key)
    .bind(by)
    .fetch_one(pool)
    .await?;
    Ok(value)
}
