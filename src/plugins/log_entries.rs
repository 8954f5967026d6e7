//! Plugin log entries (`posthog_pluginlogentry` rows, or `plugin_log_entries` Kafka messages):
//! their shape, the [`PluginLogSink`] they are queued into, and the Postgres sink, which batches
//! inserts like the reference's `PostgresLogsWrapper` (one multi-row insert per second, or
//! immediately in the test environment). The Kafka sink is `sinks::capture::KafkaLogSink`; it
//! only needs [`PluginLogEntry::to_kafka_json`]. The insert statement is `db::logs`'.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use tracing::{error, warn};
use uuid::Uuid;

use super::rows::PluginConfig;

/// How long the Postgres sink gathers entries before one insert.
pub const POSTGRES_LOGS_FLUSH_INTERVAL: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    System,
    Plugin,
    Console,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::System => "SYSTEM",
            LogSource::Plugin => "PLUGIN",
            LogSource::Console => "CONSOLE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogType {
    Debug,
    Log,
    Info,
    Warn,
    Error,
}

impl LogType {
    pub fn as_str(self) -> &'static str {
        match self {
            LogType::Debug => "DEBUG",
            LogType::Log => "LOG",
            LogType::Info => "INFO",
            LogType::Warn => "WARN",
            LogType::Error => "ERROR",
        }
    }

    /// The type for a `console.<method>` name.
    pub fn from_console_method(method: &str) -> Option<LogType> {
        match method {
            "debug" => Some(LogType::Debug),
            "log" => Some(LogType::Log),
            "info" => Some(LogType::Info),
            "warn" => Some(LogType::Warn),
            "error" => Some(LogType::Error),
            _ => None,
        }
    }
}

/// One log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginLogEntry {
    pub id: Uuid,
    pub team_id: Option<i32>,
    pub plugin_id: i32,
    pub plugin_config_id: i32,
    pub timestamp: DateTime<Utc>,
    pub source: LogSource,
    pub log_type: LogType,
    pub message: String,
    pub instance_id: Uuid,
}

impl PluginLogEntry {
    /// An entry for `config`, stamped now unless `timestamp` is given; counted as created
    /// (`logs.entries_created`, the reference's `queuePluginLogEntry`: every entry made is queued).
    pub fn new(
        config: &PluginConfig,
        source: LogSource,
        log_type: LogType,
        message: String,
        instance_id: Uuid,
        timestamp: Option<DateTime<Utc>>,
    ) -> PluginLogEntry {
        crate::metrics::catalog::log_entry_created(source.as_str(), config.team(), i64::from(config.plugin_id));
        PluginLogEntry {
            id: Uuid::now_v7(),
            team_id: config.team_id,
            plugin_id: config.plugin_id,
            plugin_config_id: config.id,
            timestamp: timestamp.unwrap_or_else(Utc::now),
            source,
            log_type,
            message,
            instance_id,
        }
    }

    /// The timestamp as the reference writes it: ISO with `T` → space and no `Z`.
    pub fn timestamp_string(&self) -> String {
        self.timestamp.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
    }

    /// The JSON value of a `plugin_log_entries` Kafka message (same keys and order as the
    /// reference).
    pub fn to_kafka_json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "team_id": self.team_id,
            "plugin_id": self.plugin_id,
            "plugin_config_id": self.plugin_config_id,
            "timestamp": self.timestamp_string(),
            "source": self.source.as_str(),
            "type": self.log_type.as_str(),
            "message": self.message,
            "instance_id": self.instance_id.to_string(),
        })
    }
}

/// Where log entries go. Queuing never fails the caller: a sink that cannot deliver logs the
/// problem itself (the reference reports to Sentry and goes on).
#[async_trait]
pub trait PluginLogSink: Send + Sync {
    async fn queue(&self, entry: PluginLogEntry);
    /// Delivers everything queued so far (shutdown, tests).
    async fn flush(&self);
}

/// Batched inserts into `posthog_pluginlogentry`.
pub struct PostgresLogSink {
    pool: PgPool,
    immediate: bool,
    state: Arc<Mutex<SinkState>>,
}

#[derive(Default)]
struct SinkState {
    entries: Vec<PluginLogEntry>,
    timer_running: bool,
}

impl PostgresLogSink {
    /// `immediate`: insert each entry at once (the reference does so in the test environment).
    pub fn new(pool: PgPool, immediate: bool) -> PostgresLogSink {
        PostgresLogSink { pool, immediate, state: Arc::new(Mutex::new(SinkState::default())) }
    }

    /// Immediate in the test environment (`NODE_ENV=test`), batched otherwise.
    pub fn for_config(pool: PgPool, config: &crate::config::Config) -> PostgresLogSink {
        PostgresLogSink::new(pool, config.is_test())
    }

    fn take(state: &Mutex<SinkState>) -> Vec<PluginLogEntry> {
        match state.lock() {
            Ok(mut state) => {
                state.timer_running = false;
                std::mem::take(&mut state.entries)
            }
            Err(_) => Vec::new(),
        }
    }

    async fn insert(pool: &PgPool, entries: Vec<PluginLogEntry>) {
        if entries.is_empty() {
            return;
        }
        let count = entries.len();
        let result = crate::metrics::catalog::postgres(
            "insertPluginLogEntries",
            crate::db::logs::insert_plugin_log_entries(pool, entries),
        )
        .await;
        if let Err(err) = result {
            error!(entries = count, error = %err, "could not insert plugin log entries");
        }
    }
}

#[async_trait]
impl PluginLogSink for PostgresLogSink {
    async fn queue(&self, entry: PluginLogEntry) {
        if self.immediate {
            Self::insert(&self.pool, vec![entry]).await;
            return;
        }
        let start_timer = match self.state.lock() {
            Ok(mut state) => {
                state.entries.push(entry);
                !std::mem::replace(&mut state.timer_running, true)
            }
            Err(_) => {
                warn!("plugin log buffer poisoned; entry dropped");
                false
            }
        };
        if start_timer {
            let state = self.state.clone();
            let pool = self.pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(POSTGRES_LOGS_FLUSH_INTERVAL).await;
                Self::insert(&pool, Self::take(&state)).await;
            });
        }
    }

    async fn flush(&self) {
        Self::insert(&self.pool, Self::take(&self.state)).await;
    }
}
