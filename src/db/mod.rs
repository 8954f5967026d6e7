//! Every SQL statement the server runs against PostHog's Postgres tables, in one place that can be
//! read and audited at once (the server does not own that schema: PostHog's Django migrations do).
//! Typed functions per table family; the rooms call them and never write SQL themselves
//! (`tests/foundation_sql.rs` fails if one does). The graphile job queue (`jobs/`) keeps its own
//! statements: it owns its schema.
//!
//! * [`persons`] — `posthog_person`, `posthog_persondistinctid`, `posthog_cohortpeople` on merges;
//! * [`teams`] — `posthog_team`, `posthog_organization` (and its members), `posthog_grouptypemapping`;
//! * [`plugins`] — `posthog_plugin`, `posthog_pluginconfig`, `posthog_pluginattachment`,
//!   `posthog_pluginstorage`;
//! * [`actions`] — `posthog_action`, `posthog_actionstep`, `ee_hook`, cohort membership
//!   (`posthog_cohortpeople`, and ClickHouse's `person_static_cohort`);
//! * [`events`] — `posthog_event`, `posthog_element(group)`, `posthog_sessionrecordingevent`,
//!   `posthog_action_events`, `posthog_eventdefinition`, `posthog_propertydefinition`;
//! * [`users`] — `posthog_user`, `posthog_organizationmembership`, `posthog_personalapikey`;
//! * [`logs`] — `posthog_pluginlogentry`.

pub mod actions;
pub mod events;
pub mod logs;
pub mod persons;
pub mod plugins;
pub mod teams;
pub mod users;

/// `SELECT 1`: whether the pool reaches the database.
pub async fn ping(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(drop)
}

/// Whether a database error is a unique violation (SQLSTATE 23505).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|database_error| database_error.is_unique_violation())
}
