//! The plugin tables as this server sees them: which plugin configs are "in force" (enabled, the
//! organization has plugin access, the plugin belongs to the organization or is global), their
//! plugins and attachments, and the few writes the server makes (capabilities, metrics, public
//! jobs, config error, disabling a config). The SQL mirrors the reference's `sql.ts` so the same
//! rows load. What is done with the rows is up to `loader` and `manager`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// A `posthog_plugin` row (the columns the server uses).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PluginRow {
    pub id: i32,
    pub organization_id: Uuid,
    pub plugin_type: Option<String>,
    pub is_global: bool,
    pub name: Option<String>,
    pub url: Option<String>,
    pub config_schema: Value,
    pub tag: Option<String>,
    pub archive: Option<Vec<u8>>,
    pub source: Option<String>,
    pub capabilities: Value,
    pub metrics: Option<Value>,
    pub updated_at: DateTime<Utc>,
}

/// A `posthog_pluginconfig` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PluginConfigRow {
    pub id: i32,
    pub team_id: Option<i32>,
    pub plugin_id: i32,
    pub enabled: bool,
    pub order: Option<i32>,
    pub config: Value,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A `posthog_pluginattachment` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PluginAttachmentRow {
    pub id: i32,
    pub plugin_config_id: Option<i32>,
    pub key: String,
    pub content_type: Option<String>,
    pub file_name: Option<String>,
    pub contents: Option<Vec<u8>>,
}

/// An attachment as `meta.attachments[key]` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub content_type: Option<String>,
    pub file_name: Option<String>,
    pub contents: Vec<u8>,
}

/// A plugin as loaded. Capabilities and metrics are updated in memory when the server writes
/// them, so a reload that finds them equal does not write again.
#[derive(Debug)]
pub struct Plugin {
    pub row: PluginRow,
    pub capabilities: Mutex<Value>,
    pub metrics: Mutex<Map<String, Value>>,
}

impl Plugin {
    pub fn new(row: PluginRow) -> Plugin {
        let capabilities = Mutex::new(row.capabilities.clone());
        let metrics = match &row.metrics {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        };
        Plugin { row, capabilities, metrics: Mutex::new(metrics) }
    }

    pub fn id(&self) -> i32 {
        self.row.id
    }

    /// The name, or `undefined` as the reference's template strings render a missing one.
    pub fn name(&self) -> String {
        self.row.name.clone().unwrap_or_else(|| "undefined".into())
    }

    /// `plugin <name> ID <id> (<extras>)`, the reference's `pluginDigest`.
    pub fn digest(&self, team_id: Option<i32>) -> String {
        let mut extras = Vec::new();
        if let Some(team) = team_id.filter(|team| *team != 0) {
            extras.push(format!("team ID {team}"));
        }
        extras.push(format!("organization ID {}", self.row.organization_id));
        if self.row.is_global {
            extras.push("global".to_string());
        }
        format!("plugin {} ID {} ({})", self.name(), self.row.id, extras.join(" - "))
    }

    /// The declared metrics (name → `sum`/`max`/`min`).
    pub fn declared_metrics(&self) -> Map<String, Value> {
        self.metrics.lock().map(|metrics| metrics.clone()).unwrap_or_default()
    }
}

/// A plugin config in force, with its plugin and attachments.
#[derive(Debug)]
pub struct PluginConfig {
    pub id: i32,
    pub team_id: Option<i32>,
    pub plugin_id: i32,
    pub order: i32,
    /// `meta.config`: the stored config with the plugin's schema defaults filled in.
    pub config: Map<String, Value>,
    /// The error stored when the config was loaded (cleared after a successful load).
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub plugin: Arc<Plugin>,
    pub attachments: Vec<(String, Attachment)>,
}

impl PluginConfig {
    /// The team id as events carry it (0 when the row has none, as the reference's `team_id`).
    pub fn team(&self) -> i64 {
        self.team_id.unwrap_or(0) as i64
    }

    /// `"<plugin name> (<config id>)"`, the entry in `$plugins_succeeded` and friends.
    pub fn label(&self) -> String {
        format!("{} ({})", self.plugin.name(), self.id)
    }
}

/// Everything one (re)load reads from Postgres.
#[derive(Debug, Default)]
pub struct InForceRows {
    pub plugins: Vec<PluginRow>,
    pub configs: Vec<PluginConfigRow>,
    pub attachments: Vec<PluginAttachmentRow>,
}

impl InForceRows {
    /// Attachments grouped by config id, keyed by attachment key.
    pub fn attachments_by_config(&self) -> HashMap<i32, Vec<(String, Attachment)>> {
        let mut grouped: HashMap<i32, Vec<(String, Attachment)>> = HashMap::new();
        for row in &self.attachments {
            let Some(config_id) = row.plugin_config_id else { continue };
            let attachment = Attachment {
                content_type: row.content_type.clone(),
                file_name: row.file_name.clone(),
                contents: row.contents.clone().unwrap_or_default(),
            };
            let entries = grouped.entry(config_id).or_default();
            // A later row with the same key replaces the earlier one, as assigning into an object does.
            match entries.iter_mut().find(|(key, _)| *key == row.key) {
                Some(entry) => entry.1 = attachment,
                None => entries.push((row.key.clone(), attachment)),
            }
        }
        grouped
    }
}

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
    let plugins = sqlx::query_as::<_, PluginRow>(&format!(
        "SELECT id, organization_id, plugin_type, is_global, name, url, config_schema, tag, archive, source, \
         capabilities, metrics, updated_at FROM posthog_plugin WHERE id IN ({} GROUP BY posthog_pluginconfig.plugin_id)",
        in_force("plugin_id")
    ))
    .fetch_all(pool)
    .await?;
    let attachments = sqlx::query_as::<_, PluginAttachmentRow>(&format!(
        "SELECT id, plugin_config_id, key, content_type, file_name, contents FROM posthog_pluginattachment \
         WHERE plugin_config_id IN ({})",
        in_force("id")
    ))
    .fetch_all(pool)
    .await?;
    let configs = sqlx::query_as::<_, PluginConfigRow>(&format!(
        "SELECT id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at \
         FROM posthog_pluginconfig WHERE id IN ({}) ORDER BY id",
        in_force("id")
    ))
    .fetch_all(pool)
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

/// What the plugin orchestration records about plugins beside loading them: capabilities, declared
/// metrics, a config's error, disabling a config, the historical export's public job, and the one
/// read it makes of events (a team's first and last event time, for the historical export). The
/// server's is Postgres (`impl for PgPool`, the functions above); the plugin dev loop keeps them in
/// memory (`plugins::memory::MemoryRecords`) and prints them.
#[async_trait::async_trait]
pub trait PluginRecords: Send + Sync {
    async fn set_plugin_capabilities(&self, plugin_id: i32, capabilities: &Value) -> Result<(), sqlx::Error>;
    async fn set_plugin_metrics(&self, plugin_id: i32, metrics: &Value) -> Result<(), sqlx::Error>;
    /// Writes (or clears, with `None`) the config's error.
    async fn set_config_error(&self, config_id: i32, error: Option<&Value>) -> Result<(), sqlx::Error>;
    /// Clears the config's error when set.
    async fn clear_config_error(&self, config_id: i32) -> Result<(), sqlx::Error>;
    async fn disable_plugin_config(&self, config_id: i32) -> Result<(), sqlx::Error>;
    /// Makes the historical export job visible in PostHog's interface (once per plugin).
    async fn add_public_job(&self, plugin_id: i32);
    async fn timestamp_boundaries(
        &self,
        team_id: i64,
    ) -> Result<super::historical_export::TimestampBoundaries, sqlx::Error>;
}

#[async_trait::async_trait]
impl PluginRecords for PgPool {
    async fn set_plugin_capabilities(&self, plugin_id: i32, capabilities: &Value) -> Result<(), sqlx::Error> {
        set_plugin_capabilities(self, plugin_id, capabilities).await
    }

    async fn set_plugin_metrics(&self, plugin_id: i32, metrics: &Value) -> Result<(), sqlx::Error> {
        set_plugin_metrics(self, plugin_id, metrics).await
    }

    async fn set_config_error(&self, config_id: i32, error: Option<&Value>) -> Result<(), sqlx::Error> {
        set_config_error(self, config_id, error).await
    }

    async fn clear_config_error(&self, config_id: i32) -> Result<(), sqlx::Error> {
        clear_config_error(self, config_id).await
    }

    async fn disable_plugin_config(&self, config_id: i32) -> Result<(), sqlx::Error> {
        disable_plugin_config(self, config_id).await
    }

    async fn add_public_job(&self, plugin_id: i32) {
        super::historical_export::add_public_job(self, plugin_id).await
    }

    async fn timestamp_boundaries(
        &self,
        team_id: i64,
    ) -> Result<super::historical_export::TimestampBoundaries, sqlx::Error> {
        super::historical_export::fetch_timestamp_boundaries(self, team_id).await
    }
}
