//! `posthog_pluginlogentry`: plugin log entries, inserted many at a time.

use sqlx::PgPool;

use crate::plugins::log_entries::PluginLogEntry;

/// Inserts the entries in one multi-row statement (the reference's `PostgresLogsWrapper` batch).
pub async fn insert_plugin_log_entries(pool: &PgPool, entries: Vec<PluginLogEntry>) -> Result<(), sqlx::Error> {
    let count = entries.len();
    let mut ids = Vec::with_capacity(count);
    let mut teams = Vec::with_capacity(count);
    let mut plugins = Vec::with_capacity(count);
    let mut configs = Vec::with_capacity(count);
    let mut timestamps = Vec::with_capacity(count);
    let mut sources = Vec::with_capacity(count);
    let mut types = Vec::with_capacity(count);
    let mut messages = Vec::with_capacity(count);
    let mut instances = Vec::with_capacity(count);
    for entry in entries {
        ids.push(entry.id);
        teams.push(entry.team_id);
        plugins.push(entry.plugin_id);
        configs.push(entry.plugin_config_id);
        timestamps.push(entry.timestamp);
        sources.push(entry.source.as_str().to_string());
        types.push(entry.log_type.as_str().to_string());
        messages.push(entry.message);
        instances.push(entry.instance_id);
    }
    sqlx::query(
        "INSERT INTO posthog_pluginlogentry \
         (id, team_id, plugin_id, plugin_config_id, timestamp, source, type, message, instance_id) \
         SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::int[], $4::int[], $5::timestamptz[], $6::text[], \
         $7::text[], $8::text[], $9::uuid[])",
    )
    .bind(ids)
    .bind(teams)
    .bind(plugins)
    .bind(configs)
    .bind(timestamps)
    .bind(sources)
    .bind(types)
    .bind(messages)
    .bind(instances)
    .execute(pool)
    .await
    .map(drop)
}
