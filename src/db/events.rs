//! `posthog_event` (single and batched inserts, the historical export's reads, a redelivered
//! event's stored copy), `posthog_elementgroup` / `posthog_element`, `posthog_sessionrecordingevent`,
//! `posthog_action_events`, and the definitions `posthog_eventdefinition` /
//! `posthog_propertydefinition`.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::ingestion::elements::Element;

/// Column values of one `posthog_event` row. The JSON columns are held as their text, serialised
/// once from the event (no copy of its property map on the way to the batch).
#[derive(Debug, Clone)]
pub struct EventRow {
    pub created_at: DateTime<Utc>,
    pub event: String,
    pub distinct_id: String,
    pub properties: Box<RawValue>,
    pub team_id: i32,
    pub timestamp: DateTime<Utc>,
    pub elements: Box<RawValue>,
    pub elements_hash: String,
}

/// Inserts one event row; returns its id.
pub async fn insert_event_row(pool: &PgPool, row: &EventRow) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO posthog_event (created_at, event, distinct_id, properties, team_id, timestamp, elements, \
         elements_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id::int8",
    )
    .bind(row.created_at)
    .bind(&row.event)
    .bind(&row.distinct_id)
    .bind(Json(&*row.properties))
    .bind(row.team_id)
    .bind(row.timestamp)
    .bind(Json(&*row.elements))
    .bind(&row.elements_hash)
    .fetch_one(pool)
    .await
}

/// Inserts the rows in one statement; returns their ids in input order (ids are drawn from the
/// table's sequence first, so the mapping does not depend on RETURNING order).
pub async fn insert_event_rows(pool: &PgPool, rows: &[&EventRow]) -> Result<Vec<i64>, sqlx::Error> {
    let created_at: Vec<DateTime<Utc>> = rows.iter().map(|row| row.created_at).collect();
    let event: Vec<&str> = rows.iter().map(|row| row.event.as_str()).collect();
    let distinct_id: Vec<&str> = rows.iter().map(|row| row.distinct_id.as_str()).collect();
    let properties: Vec<Json<&RawValue>> = rows.iter().map(|row| Json(&*row.properties)).collect();
    let team_id: Vec<i32> = rows.iter().map(|row| row.team_id).collect();
    let timestamp: Vec<DateTime<Utc>> = rows.iter().map(|row| row.timestamp).collect();
    let elements: Vec<Json<&RawValue>> = rows.iter().map(|row| Json(&*row.elements)).collect();
    let elements_hash: Vec<&str> = rows.iter().map(|row| row.elements_hash.as_str()).collect();
    let ids: Vec<(i64, i64)> = sqlx::query_as(
        "WITH input AS ( \
            SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::jsonb[], $5::int4[], $6::timestamptz[], \
                $7::jsonb[], $8::text[]) WITH ORDINALITY \
                AS row(created_at, event, distinct_id, properties, team_id, timestamp, elements, elements_hash, position) \
         ), numbered AS MATERIALIZED ( \
            SELECT position, nextval(pg_get_serial_sequence('posthog_event', 'id')) AS id FROM input ORDER BY position \
         ), inserted AS ( \
            INSERT INTO posthog_event (id, created_at, event, distinct_id, properties, team_id, timestamp, elements, \
                elements_hash) \
            SELECT numbered.id, input.created_at, input.event, input.distinct_id, input.properties, input.team_id, \
                input.timestamp, input.elements, input.elements_hash \
            FROM input JOIN numbered USING (position) ORDER BY position \
            RETURNING id \
         ) \
         SELECT position::int8, id::int8 FROM numbered ORDER BY position",
    )
    .bind(&created_at)
    .bind(&event)
    .bind(&distinct_id)
    .bind(&properties)
    .bind(&team_id)
    .bind(&timestamp)
    .bind(&elements)
    .bind(&elements_hash)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(|(_, id)| id).collect())
}

/// The id of a stored row with the same team, time, distinct id, name and properties, if any.
pub async fn find_stored_copy(
    pool: &PgPool,
    team_id: i32,
    timestamp: DateTime<Utc>,
    distinct_id: &str,
    event: &str,
    properties: &Value,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar::<_, i64>(
        "SELECT id::int8 FROM posthog_event WHERE team_id = $1 AND timestamp = $2 AND distinct_id = $3 \
         AND event = $4 AND properties = $5 LIMIT 1",
    )
    .bind(team_id)
    .bind(timestamp)
    .bind(distinct_id)
    .bind(event)
    .bind(properties)
    .fetch_optional(pool)
    .await
}

/// The team's first and last event time.
pub async fn fetch_timestamp_range(
    pool: &PgPool,
    team_id: i32,
) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as("SELECT min(timestamp), max(timestamp) FROM posthog_event WHERE team_id = $1")
        .bind(team_id)
        .fetch_one(pool)
        .await
}

/// A stored event as the historical export reads it: `(event, properties, timestamp, team_id,
/// distinct_id, created_at)`.
pub type StoredEvent = (Option<String>, Value, DateTime<Utc>, i32, String, Option<DateTime<Utc>>);

/// The team's events with `lower <= timestamp < upper`, in id order, `limit` from `offset`.
pub async fn fetch_events_between(
    pool: &PgPool,
    team_id: i32,
    lower: DateTime<Utc>,
    upper: DateTime<Utc>,
    limit: i64,
    offset: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event, properties, timestamp, team_id, distinct_id, created_at FROM posthog_event \
         WHERE team_id = $1 AND timestamp >= $2 AND timestamp < $3 ORDER BY id LIMIT $4 OFFSET $5",
    )
    .bind(team_id)
    .bind(lower)
    .bind(upper)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await
}

/// ClickHouse's `min`/`max` of the team's `_timestamp` (the Kafka message time), as text
/// (`yyyy-MM-dd HH:mm:ss`), as the reference's `fetchTimestampBoundariesForTeam` reads them.
pub fn clickhouse_timestamp_range_query(team_id: i64) -> String {
    format!("SELECT toString(min(_timestamp)), toString(max(_timestamp)) FROM events WHERE team_id = {team_id}")
}

/// A ClickHouse `events` row as the historical export reads it. `timestamp` and `created_at` are
/// the text ClickHouse prints for them (`2021-10-01 10:00:00.000000` for PostHog's
/// `DateTime64(6, 'UTC')`), which the reference hands to the plugin as it is.
#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
pub struct ClickHouseStoredEvent {
    pub event: String,
    pub properties: String,
    pub timestamp: String,
    pub team_id: i64,
    pub distinct_id: String,
    pub created_at: String,
}

/// The reference's `fetchEventsForInterval` in the ClickHouse pipeline: the team's events with
/// `lower <= _timestamp < upper` (second precision, UTC), in `_offset` order, `limit` from
/// `offset`. Only the columns the plugin event is made of are read, in [`ClickHouseStoredEvent`]'s
/// order (`RowBinary` is read by position; no alias shadows a column, which old servers refuse).
pub fn clickhouse_events_between_query(
    team_id: i64,
    lower: DateTime<Utc>,
    upper: DateTime<Utc>,
    limit: i64,
    offset: i64,
) -> String {
    let second = |time: DateTime<Utc>| time.format("%Y-%m-%d %H:%M:%S").to_string();
    format!(
        "SELECT event, properties, toString(timestamp), toInt64(team_id), distinct_id, toString(created_at) \
         FROM events WHERE team_id = {team_id} AND _timestamp >= '{}' AND _timestamp < '{}' \
         ORDER BY _offset LIMIT {limit} OFFSET {offset}",
        second(lower),
        second(upper)
    )
}

/// `posthog_elementgroup` with `hash` and its `posthog_element` rows, in one transaction, when
/// the team has no such group yet.
pub async fn insert_element_group(
    pool: &PgPool,
    elements: &[Element],
    team_id: i32,
    hash: &str,
) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let group_id: Option<i32> = sqlx::query_scalar(
        "INSERT INTO posthog_elementgroup (hash, team_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(hash)
    .bind(team_id)
    .fetch_optional(&mut *transaction)
    .await?;
    if let Some(group_id) = group_id {
        let mut insert: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO posthog_element (text, tag_name, href, attr_id, nth_child, nth_of_type, attributes, \
             \"order\", event_id, attr_class, group_id) ",
        );
        insert.push_values(elements.iter().enumerate(), |mut row, (order, element)| {
            row.push_bind(element.text.clone())
                .push_bind(element.tag_name.clone())
                .push_bind(element.href.clone())
                .push_bind(element.attr_id.clone())
                .push_bind(element.nth_child.and_then(|value| i32::try_from(value).ok()))
                .push_bind(element.nth_of_type.and_then(|value| i32::try_from(value).ok()))
                .push_bind(Value::Object(element.attributes.clone().unwrap_or_default()))
                .push_bind(order as i32)
                .push_bind(element.event_id.and_then(|value| i32::try_from(value).ok()))
                .push_bind(element.attr_class.clone())
                .push_bind(group_id);
        });
        insert.build().execute(&mut *transaction).await?;
    }
    transaction.commit().await
}

/// A `posthog_sessionrecordingevent` row (`created_at` is the snapshot's time, as the reference writes).
pub async fn insert_session_recording_event(
    pool: &PgPool,
    team_id: i32,
    distinct_id: &str,
    session_id: Option<&str>,
    timestamp: DateTime<Utc>,
    snapshot_data: Option<&Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO posthog_sessionrecordingevent (created_at, team_id, distinct_id, session_id, timestamp, \
         snapshot_data) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(timestamp)
    .bind(team_id)
    .bind(distinct_id)
    .bind(session_id)
    .bind(timestamp)
    .bind(snapshot_data)
    .execute(pool)
    .await
    .map(drop)
}

/// `posthog_action_events` rows for the event's matched actions, in order.
pub async fn insert_action_matches(pool: &PgPool, event_id: i64, action_ids: &[i32]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO posthog_action_events (event_id, action_id) \
         SELECT $1, action_id FROM UNNEST($2::int4[]) WITH ORDINALITY AS matched(action_id, position) ORDER BY position",
    )
    .bind(event_id)
    .bind(action_ids)
    .execute(pool)
    .await
    .map(drop)
}

/// The names of the team's event definitions and of its property definitions.
pub async fn fetch_definition_names(pool: &PgPool, team_id: i32) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    let event_names: Vec<String> = crate::metrics::catalog::postgres(
        "fetchEventDefinitions",
        sqlx::query_scalar("SELECT name FROM posthog_eventdefinition WHERE team_id = $1").bind(team_id).fetch_all(pool),
    )
    .await?;
    let property_names: Vec<String> = crate::metrics::catalog::postgres(
        "fetchPropertyDefinitions",
        sqlx::query_scalar("SELECT name FROM posthog_propertydefinition WHERE team_id = $1")
            .bind(team_id)
            .fetch_all(pool),
    )
    .await?;
    Ok((event_names, property_names))
}

/// An event definition, unless the team has it.
pub async fn insert_event_definition(pool: &PgPool, id: Uuid, name: &str, team_id: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO posthog_eventdefinition (id, name, volume_30_day, query_usage_30_day, team_id) \
         VALUES ($1, $2, NULL, NULL, $3) ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(name)
    .bind(team_id)
    .execute(pool)
    .await
    .map(drop)
}

/// Property definitions `(id, name, is_numerical)`, in order, in one statement; existing ones are kept.
pub async fn insert_property_definitions(
    pool: &PgPool,
    ids: &[Uuid],
    names: &[&str],
    numerical: &[bool],
    team_id: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO posthog_propertydefinition (id, name, is_numerical, volume_30_day, query_usage_30_day, team_id) \
         SELECT id, name, is_numerical, NULL, NULL, $4 FROM UNNEST($1::uuid[], $2::text[], $3::bool[]) \
         WITH ORDINALITY AS new_definition(id, name, is_numerical, position) ORDER BY position \
         ON CONFLICT DO NOTHING",
    )
    .bind(ids)
    .bind(names)
    .bind(numerical)
    .bind(team_id)
    .execute(pool)
    .await
    .map(drop)
}
