//! The plugin tables as this server sees them: which plugin configs are "in force" (enabled, the
//! organization has plugin access, the plugin belongs to the organization or is global), their
//! plugins and attachments. The statements that read them and the few writes the server makes
//! (capabilities, metrics, public jobs, config error, disabling a config) are `db::plugins`'.
//! What is done with the rows is up to `loader` and `manager`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
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

/// What the plugin orchestration records about plugins beside loading them: capabilities, declared
/// metrics, a config's error, disabling a config and the historical export's public job. The
/// server's is Postgres (`impl for PgPool`, through `db::plugins`); the plugin dev loop keeps them in
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
}

#[async_trait::async_trait]
impl PluginRecords for sqlx::PgPool {
    async fn set_plugin_capabilities(&self, plugin_id: i32, capabilities: &Value) -> Result<(), sqlx::Error> {
        crate::metrics::catalog::postgres(
            "setPluginCapabilities",
            crate::db::plugins::set_plugin_capabilities(self, plugin_id, capabilities),
        )
        .await
    }

    async fn set_plugin_metrics(&self, plugin_id: i32, metrics: &Value) -> Result<(), sqlx::Error> {
        crate::metrics::catalog::postgres(
            "setPluginMetrics",
            crate::db::plugins::set_plugin_metrics(self, plugin_id, metrics),
        )
        .await
    }

    async fn set_config_error(&self, config_id: i32, error: Option<&Value>) -> Result<(), sqlx::Error> {
        crate::metrics::catalog::postgres(
            "updatePluginConfigError",
            crate::db::plugins::set_config_error(self, config_id, error),
        )
        .await
    }

    async fn clear_config_error(&self, config_id: i32) -> Result<(), sqlx::Error> {
        crate::metrics::catalog::postgres(
            "updatePluginConfigError",
            crate::db::plugins::clear_config_error(self, config_id),
        )
        .await
    }

    async fn disable_plugin_config(&self, config_id: i32) -> Result<(), sqlx::Error> {
        crate::metrics::catalog::postgres("disablePlugin", crate::db::plugins::disable_plugin_config(self, config_id))
            .await
    }

    async fn add_public_job(&self, plugin_id: i32) {
        super::historical_export::add_public_job(self, plugin_id).await
    }
}
