//! Actions: loading each team's actions, matching events against their steps, and firing REST hooks and webhooks.
//!
//! * [`ActionManager`] caches every non-deleted action with its steps per team (full reload, and
//!   targeted reload/drop for the `reload-action` / `drop-action` pub/sub messages).
//! * [`ActionMatcher`] decides which of a team's actions an event matches (steps, URL rules,
//!   property filters with the reference's JavaScript casting rules, selectors, cohorts).
//! * [`HookCommander`] posts to the team's Slack/Discord/Teams webhook and to Zapier REST hooks.
//!
//! Not here: writing `posthog_action_events` rows and fetching the event's person (the ingestion
//! pipeline does both), and element parsing (`ingestion::elements`).

mod hooks;
mod manager;
mod matcher;
pub mod selector;
mod static_cohorts;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

pub use hooks::{
    action_details, determine_webhook_type, formatted_message, rest_hook_payload, tokens, user_details, value_of_token,
    webhook_message, Hook, HookCommander, WebhookType, HOOK_REQUEST_TIMEOUT,
};
pub use manager::{ActionManager, ACTIONS_RELOAD_INTERVAL};
pub use matcher::{casting_compare, ActionMatcher, CastingOperator, StaticCohortLookup};
pub use static_cohorts::ClickHouseStaticCohorts;

/// A `posthog_action` row with its steps (the reference's `Action`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub id: i64,
    pub team_id: i64,
    pub name: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub created_by_id: Option<i64>,
    pub deleted: bool,
    pub post_to_slack: bool,
    pub slack_message_format: Option<String>,
    pub is_calculating: bool,
    pub updated_at: Option<DateTime<Utc>>,
    pub last_calculated_at: Option<DateTime<Utc>>,
    pub steps: Vec<ActionStep>,
}

/// A `posthog_actionstep` row. `properties` holds the property filters as stored (JSON objects
/// `{type, key, value, operator}`); anything malformed simply fails to match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionStep {
    pub id: i64,
    pub action_id: i64,
    pub tag_name: Option<String>,
    pub text: Option<String>,
    pub href: Option<String>,
    pub selector: Option<String>,
    pub url: Option<String>,
    pub url_matching: Option<String>,
    pub name: Option<String>,
    pub event: Option<String>,
    pub properties: Option<Value>,
}

#[derive(Debug, Error)]
pub enum ActionError {
    #[error("ActionManager is not ready! Run actionManager.prepare() before this")]
    NotReady,
    #[error("database error while {context}: {source}")]
    Database { context: &'static str, source: sqlx::Error },
}
