//! `posthog_team`, `posthog_organization` (with its members) and `posthog_grouptypemapping`.

use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{Organization, Team};

/// The team with id `team_id`.
pub async fn fetch_team(pool: &PgPool, team_id: i32) -> Result<Option<Team>, sqlx::Error> {
    let sql = format!("SELECT {} FROM posthog_team WHERE id = $1", Team::COLUMNS);
    sqlx::query_as(&sql).bind(team_id).fetch_optional(pool).await
}

/// The organization with id `organization_id`.
pub async fn fetch_organization(pool: &PgPool, organization_id: Uuid) -> Result<Option<Organization>, sqlx::Error> {
    let sql = format!("SELECT {} FROM posthog_organization WHERE id = $1", Organization::COLUMNS);
    sqlx::query_as(&sql).bind(organization_id).fetch_optional(pool).await
}

/// Marks the team's first event as ingested.
pub async fn set_ingested_event(pool: &PgPool, team_id: i32) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE posthog_team SET ingested_event = $1 WHERE id = $2")
        .bind(true)
        .bind(team_id)
        .execute(pool)
        .await
        .map(drop)
}

/// The `distinct_id` of every user of the organization (null for users without one).
pub async fn fetch_member_distinct_ids(
    pool: &PgPool,
    organization_id: Uuid,
) -> Result<Vec<Option<String>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT distinct_id FROM posthog_user JOIN posthog_organizationmembership \
         ON posthog_user.id = posthog_organizationmembership.user_id WHERE organization_id = $1",
    )
    .bind(organization_id)
    .fetch_all(pool)
    .await
}

/// The team's project API token and organization (`posthog.api`).
pub async fn fetch_api_token_and_organization(
    pool: &PgPool,
    team_id: i32,
) -> Result<Option<(Option<String>, Uuid)>, sqlx::Error> {
    sqlx::query_as("SELECT api_token, organization_id FROM posthog_team WHERE id = $1")
        .bind(team_id)
        .fetch_optional(pool)
        .await
}

/// The team of an organization marked `for_internal_metrics`, if any.
pub async fn fetch_internal_metrics_team(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT posthog_team.id::bigint AS team_id
         FROM posthog_team
         INNER JOIN posthog_organization ON posthog_organization.id = posthog_team.organization_id
         WHERE for_internal_metrics",
    )
    .fetch_optional(pool)
    .await
}

/// The team's group types with their column indexes.
pub async fn fetch_group_types(pool: &PgPool, team_id: i32) -> Result<Vec<(String, i32)>, sqlx::Error> {
    sqlx::query_as("SELECT group_type, group_type_index::int4 FROM posthog_grouptypemapping WHERE team_id = $1")
        .bind(team_id)
        .fetch_all(pool)
        .await
}

/// Inserts `group_type` at `index` unless the team has it already; returns its index, or `None`
/// when `index` is taken by another type.
pub async fn insert_group_type_at(
    pool: &PgPool,
    team_id: i32,
    group_type: &str,
    index: i32,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH insert_result AS ( \
            INSERT INTO posthog_grouptypemapping (team_id, group_type, group_type_index) VALUES ($1, $2, $3) \
            ON CONFLICT DO NOTHING RETURNING group_type_index \
         ) \
         SELECT group_type_index::int4 FROM insert_result \
         UNION SELECT group_type_index::int4 FROM posthog_grouptypemapping WHERE team_id = $1 AND group_type = $2",
    )
    .bind(team_id)
    .bind(group_type)
    .bind(index)
    .fetch_optional(pool)
    .await
}
