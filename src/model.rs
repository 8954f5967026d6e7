//! Row types shared across rooms: teams, organizations and persons as the server reads them from
//! PostHog's tables (explicit column lists, never `SELECT *` order). Rooms with types of their own
//! (elements, actions, plugins) keep them in their own modules.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::FromRow;
use uuid::Uuid;

use crate::event::Properties;

/// The `posthog_team` columns the server reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow)]
pub struct Team {
    pub id: i32,
    pub uuid: Uuid,
    pub organization_id: Uuid,
    pub name: Option<String>,
    pub anonymize_ips: bool,
    pub api_token: Option<String>,
    pub app_urls: Vec<String>,
    pub completed_snippet_onboarding: bool,
    pub opt_out_capture: bool,
    pub slack_incoming_webhook: Option<String>,
    pub session_recording_opt_in: bool,
    pub ingested_event: bool,
}

impl Team {
    /// The explicit column list matching [`Team`]'s fields.
    pub const COLUMNS: &'static str = "id, uuid, organization_id, name, anonymize_ips, api_token, app_urls, \
        completed_snippet_onboarding, opt_out_capture, slack_incoming_webhook, session_recording_opt_in, ingested_event";
}

/// The `posthog_organization` columns the server reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub available_features: Vec<String>,
    pub plugins_access_level: i16,
    pub for_internal_metrics: bool,
}

impl Organization {
    pub const COLUMNS: &'static str = "id, name, available_features, plugins_access_level, for_internal_metrics";
}

/// A `posthog_person` row (the table's exact column set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub id: i32,
    pub created_at: DateTime<Utc>,
    pub properties: Properties,
    pub properties_last_updated_at: Option<Value>,
    pub properties_last_operation: Option<Value>,
    pub team_id: i32,
    pub is_user_id: Option<i32>,
    pub is_identified: bool,
    pub uuid: Uuid,
}

impl Person {
    pub const COLUMNS: &'static str = "id, created_at, properties, properties_last_updated_at, \
        properties_last_operation, team_id, is_user_id, is_identified, uuid";
}

impl<'r> FromRow<'r, sqlx::postgres::PgRow> for Person {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let properties: Value = row.try_get("properties")?;
        Ok(Person {
            id: row.try_get("id")?,
            created_at: row.try_get("created_at")?,
            // A non-object properties value (never written by the server) reads as empty.
            properties: match properties {
                Value::Object(map) => map,
                _ => Properties::new(),
            },
            properties_last_updated_at: row.try_get("properties_last_updated_at")?,
            properties_last_operation: row.try_get("properties_last_operation")?,
            team_id: row.try_get("team_id")?,
            is_user_id: row.try_get("is_user_id")?,
            is_identified: row.try_get("is_identified")?,
            uuid: row.try_get("uuid")?,
        })
    }
}
