//! `posthog_user`, `posthog_organizationmembership` and `posthog_personalapikey`: the
//! organization's bot user behind `posthog.api` and its personal API key.

use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// A user whose email matches the `LIKE` pattern.
pub async fn fetch_user_id_by_email_like(pool: &PgPool, pattern: &str) -> Result<Option<i32>, sqlx::Error> {
    let user: Option<(i32,)> =
        sqlx::query_as("SELECT id FROM posthog_user WHERE email LIKE $1").bind(pattern).fetch_optional(pool).await?;
    Ok(user.map(|(id,)| id))
}

/// The user's personal API key, if it has a non-empty one.
pub async fn fetch_personal_api_key(pool: &PgPool, user_id: i32) -> Result<Option<String>, sqlx::Error> {
    let existing: Option<(Option<String>,)> =
        sqlx::query_as("SELECT value FROM posthog_personalapikey WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(pool)
            .await?;
    Ok(existing.and_then(|(value,)| value).filter(|value| !value.is_empty()))
}

/// A new, active, non-staff user, made a member (level 1) of `organization`, in one transaction.
pub struct NewMember<'a> {
    pub password: &'a str,
    pub first_name: &'a str,
    pub email: &'a str,
    pub distinct_id: &'a str,
    pub organization: Uuid,
}

/// Creates the user and its membership (timed as the reference's `createUser` and
/// `createOrganizationMembership`); returns the user id.
pub async fn create_member(pool: &PgPool, member: &NewMember<'_>) -> Result<i32, sqlx::Error> {
    let now = Utc::now();
    let mut transaction = pool.begin().await?;
    let user = sqlx::query_as(
        "INSERT INTO posthog_user (uuid, password, first_name, last_name, email, distinct_id, is_staff, \
         is_active, date_joined, events_column_config) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(member.password)
    .bind(member.first_name)
    .bind("")
    .bind(member.email)
    .bind(member.distinct_id)
    .bind(false)
    .bind(true)
    .bind(now)
    .bind(json!({"active": "DEFAULT"}))
    .fetch_one(&mut *transaction);
    let (id,): (i32,) = crate::metrics::catalog::postgres("createUser", user).await?;
    let membership = sqlx::query(
        "INSERT INTO posthog_organizationmembership (id, organization_id, user_id, level, joined_at, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(Uuid::now_v7())
    .bind(member.organization)
    .bind(id)
    .bind(1_i16)
    .bind(now)
    .bind(now)
    .execute(&mut *transaction);
    crate::metrics::catalog::postgres("createOrganizationMembership", membership).await?;
    transaction.commit().await?;
    Ok(id)
}

/// Stores a personal API key for the user; returns its value.
pub async fn insert_personal_api_key(
    pool: &PgPool,
    id: &str,
    user_id: i32,
    label: &str,
    value: &str,
) -> Result<String, sqlx::Error> {
    let (value,): (String,) = sqlx::query_as(
        "INSERT INTO posthog_personalapikey (id, user_id, label, value, created_at) VALUES ($1, $2, $3, $4, $5) \
         RETURNING value",
    )
    .bind(id)
    .bind(user_id)
    .bind(label)
    .bind(value)
    .bind(Utc::now())
    .fetch_one(pool)
    .await?;
    Ok(value)
}
