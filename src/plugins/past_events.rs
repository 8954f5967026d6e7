//! The stored events the historical export reads (reference `historical-export/utils.ts`): a team's
//! first and last event time, and one interval's events, `limit` from `offset`, as the plugin
//! events `exportEvents` receives. The Postgres pipeline reads `posthog_event`; the ClickHouse
//! pipeline (`KAFKA_ENABLED`) reads ClickHouse's `events` table, bounded and ordered by the Kafka
//! columns `_timestamp` and `_offset`, as the reference does. The dev loop stores no events.
//!
//! Owns the choice of source and the row → plugin event conversion; the statements are `db::events`'.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tracing::warn;

use super::historical_export::TimestampBoundaries;
use crate::clickhouse::{ClickHouse, ClickHouseError};
use crate::db;
use crate::js::{is_truthy, iso, iso_now};

#[derive(Debug, thiserror::Error)]
pub enum PastEventsError {
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("ClickHouse at {url}: {source}")]
    ClickHouse { url: String, source: ClickHouseError },
}

/// Where past events are read from.
#[async_trait]
pub trait PastEvents: Send + Sync {
    /// The team's first and last event time (`None` for each when it has no events).
    async fn timestamp_boundaries(&self, team_id: i64) -> Result<TimestampBoundaries, PastEventsError>;

    /// The team's events with `lower <= time < upper`, in storage order, `limit` from `offset`, as
    /// plugin events.
    async fn fetch_interval(
        &self,
        team_id: i64,
        lower: DateTime<Utc>,
        upper: DateTime<Utc>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Value>, PastEventsError>;
}

/// The reference's `convertDatabaseEventToPluginEvent`: `timestamp` and `sent_at` (the row's
/// `created_at`) are passed as the store gives them.
fn plugin_event(
    event: String,
    properties: Value,
    timestamp: Value,
    team_id: i64,
    distinct_id: String,
    sent_at: Value,
) -> Value {
    // `properties?.['$ip'] || ''`
    let ip = properties.get("$ip").filter(|ip| is_truthy(ip)).cloned().unwrap_or_else(|| json!(""));
    let mut plugin_event = Map::new();
    plugin_event.insert("team_id".into(), Value::from(team_id));
    plugin_event.insert("distinct_id".into(), Value::String(distinct_id));
    plugin_event.insert("properties".into(), properties);
    plugin_event.insert("timestamp".into(), timestamp);
    plugin_event.insert("now".into(), Value::String(iso_now()));
    plugin_event.insert("event".into(), Value::String(event));
    plugin_event.insert("ip".into(), ip);
    plugin_event.insert("site_url".into(), Value::String(String::new()));
    plugin_event.insert("sent_at".into(), sent_at);
    Value::Object(plugin_event)
}

/// `posthog_event` (the Postgres pipeline).
pub struct PostgresPastEvents(pub PgPool);

#[async_trait]
impl PastEvents for PostgresPastEvents {
    async fn timestamp_boundaries(&self, team_id: i64) -> Result<TimestampBoundaries, PastEventsError> {
        let (min, max) = crate::metrics::catalog::postgres(
            "fetchTimestampBoundariesForTeam",
            db::events::fetch_timestamp_range(&self.0, team_id as i32),
        )
        .await?;
        Ok(TimestampBoundaries { min, max })
    }

    async fn fetch_interval(
        &self,
        team_id: i64,
        lower: DateTime<Utc>,
        upper: DateTime<Utc>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Value>, PastEventsError> {
        let rows = crate::metrics::catalog::postgres(
            "fetchEventsForInterval",
            db::events::fetch_events_between(&self.0, team_id as i32, lower, upper, limit, offset),
        )
        .await?;
        Ok(rows
            .into_iter()
            .map(|(event, properties, timestamp, team_id, distinct_id, created_at)| {
                plugin_event(
                    event.unwrap_or_default(),
                    properties,
                    Value::String(iso(&timestamp)),
                    team_id.into(),
                    distinct_id,
                    created_at.map(|time| Value::String(iso(&time))).unwrap_or(Value::Null),
                )
            })
            .collect())
    }
}

/// ClickHouse's `events` table (the ClickHouse pipeline).
pub struct ClickHousePastEvents(pub ClickHouse);

impl ClickHousePastEvents {
    fn error(&self, source: ClickHouseError) -> PastEventsError {
        PastEventsError::ClickHouse { url: self.0.url().to_string(), source }
    }
}

/// A `_timestamp` as ClickHouse prints a `DateTime` (`yyyy-MM-dd HH:mm:ss`), read as UTC. The
/// reference reads it in the process's zone (UTC in its images) and treats the epoch, which is
/// what `min`/`max` give for a team without events (`0000-00-00 00:00:00` on old servers), as none.
fn clickhouse_boundary(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|time| time.and_utc())
        .filter(|time| time.timestamp_millis() != 0)
}

#[async_trait]
impl PastEvents for ClickHousePastEvents {
    async fn timestamp_boundaries(&self, team_id: i64) -> Result<TimestampBoundaries, PastEventsError> {
        let rows = self
            .0
            .fetch_all::<(String, String)>(&db::events::clickhouse_timestamp_range_query(team_id))
            .await
            .map_err(|error| self.error(error))?;
        let Some((min, max)) = rows.into_iter().next() else {
            return Ok(TimestampBoundaries::default());
        };
        Ok(TimestampBoundaries { min: clickhouse_boundary(&min), max: clickhouse_boundary(&max) })
    }

    async fn fetch_interval(
        &self,
        team_id: i64,
        lower: DateTime<Utc>,
        upper: DateTime<Utc>,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Value>, PastEventsError> {
        let query = db::events::clickhouse_events_between_query(team_id, lower, upper, limit, offset);
        let rows =
            self.0.fetch_all::<db::events::ClickHouseStoredEvent>(&query).await.map_err(|error| self.error(error))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                // `JSON.parse(event.properties || '{}')`. DELIBERATE DEVIATION: the reference's parse
                // throws for a row whose properties are not JSON, failing the whole chunk on every
                // retry; that one event is exported with empty properties instead.
                let properties = if row.properties.is_empty() {
                    Value::Object(Map::new())
                } else {
                    serde_json::from_str(&row.properties).unwrap_or_else(|error| {
                        warn!(team_id, distinct_id = %row.distinct_id, %error, "a ClickHouse event's properties are not JSON; exporting it without them");
                        Value::Object(Map::new())
                    })
                };
                plugin_event(
                    row.event,
                    properties,
                    Value::String(row.timestamp),
                    row.team_id,
                    row.distinct_id,
                    Value::String(row.created_at),
                )
            })
            .collect())
    }
}

/// No stored events (the plugin dev loop): a historical export has nothing to export.
pub struct NoPastEvents;

#[async_trait]
impl PastEvents for NoPastEvents {
    async fn timestamp_boundaries(&self, _team_id: i64) -> Result<TimestampBoundaries, PastEventsError> {
        Ok(TimestampBoundaries::default())
    }

    async fn fetch_interval(
        &self,
        _team_id: i64,
        _lower: DateTime<Utc>,
        _upper: DateTime<Utc>,
        _limit: i64,
        _offset: i64,
    ) -> Result<Vec<Value>, PastEventsError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_boundaries() {
        assert_eq!(clickhouse_boundary("2021-10-01 10:00:01").map(|time| time.timestamp()), Some(1_633_082_401));
        assert_eq!(clickhouse_boundary("1970-01-01 00:00:00"), None);
        assert_eq!(clickhouse_boundary("0000-00-00 00:00:00"), None);
        assert_eq!(clickhouse_boundary(""), None);
    }
}
