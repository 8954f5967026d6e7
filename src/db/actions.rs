//! `posthog_action` with its `posthog_actionstep`s, `ee_hook` (Zapier REST hooks), and cohort
//! membership as action steps test it: `posthog_cohortpeople` in Postgres, `person_static_cohort`
//! in ClickHouse (the text of that query; the connection is `crate::clickhouse`'s).

use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::ingestion::actions::{Action, ActionStep, Hook};

const ACTION_COLUMNS: &str = "id::bigint AS id, team_id::bigint AS team_id, name, created_at, \
    created_by_id::bigint AS created_by_id, deleted, post_to_slack, slack_message_format, is_calculating, \
    updated_at, last_calculated_at";
const STEP_COLUMNS: &str = "posthog_actionstep.id::bigint AS id, posthog_actionstep.action_id::bigint AS action_id, \
    posthog_actionstep.tag_name, posthog_actionstep.text, posthog_actionstep.href, posthog_actionstep.selector, \
    posthog_actionstep.url, posthog_actionstep.url_matching, posthog_actionstep.name, posthog_actionstep.event, \
    posthog_actionstep.properties";

/// One row read: the caller decides what an unreadable row means (the action cache skips it).
pub type RowResult<T> = Result<T, sqlx::Error>;

/// Every non-deleted action, without steps.
pub async fn fetch_all_actions(pool: &PgPool) -> Result<Vec<RowResult<Action>>, sqlx::Error> {
    let rows = sqlx::query(&format!("SELECT {ACTION_COLUMNS} FROM posthog_action WHERE deleted = FALSE"))
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(action_from_row).collect())
}

/// Every step of a non-deleted action, with its action's team id, in step id order.
pub async fn fetch_all_steps(pool: &PgPool) -> Result<Vec<RowResult<(i64, ActionStep)>>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {STEP_COLUMNS}, posthog_action.team_id::bigint AS step_team_id FROM posthog_actionstep \
         JOIN posthog_action ON (posthog_action.id = posthog_actionstep.action_id) \
         WHERE posthog_action.deleted = FALSE ORDER BY posthog_actionstep.id"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(|row| Ok((row.try_get("step_team_id")?, step_from_row(row)?))).collect())
}

/// The action, if it exists and is not deleted, without steps.
pub async fn fetch_action(pool: &PgPool, action_id: i64) -> Result<Option<RowResult<Action>>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {ACTION_COLUMNS} FROM posthog_action WHERE id = $1 AND deleted = FALSE"))
        .bind(action_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(action_from_row))
}

/// The action's steps in id order.
pub async fn fetch_action_steps(pool: &PgPool, action_id: i64) -> Result<Vec<RowResult<ActionStep>>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {STEP_COLUMNS} FROM posthog_actionstep WHERE action_id = $1 ORDER BY posthog_actionstep.id"
    ))
    .bind(action_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(step_from_row).collect())
}

fn action_from_row(row: &PgRow) -> Result<Action, sqlx::Error> {
    Ok(Action {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        created_by_id: row.try_get("created_by_id")?,
        deleted: row.try_get("deleted")?,
        post_to_slack: row.try_get("post_to_slack")?,
        slack_message_format: row.try_get("slack_message_format")?,
        is_calculating: row.try_get("is_calculating")?,
        updated_at: row.try_get("updated_at")?,
        last_calculated_at: row.try_get("last_calculated_at")?,
        steps: Vec::new(),
    })
}

fn step_from_row(row: &PgRow) -> Result<ActionStep, sqlx::Error> {
    Ok(ActionStep {
        id: row.try_get("id")?,
        action_id: row.try_get("action_id")?,
        tag_name: row.try_get("tag_name")?,
        text: row.try_get("text")?,
        href: row.try_get("href")?,
        selector: row.try_get("selector")?,
        url: row.try_get("url")?,
        url_matching: row.try_get("url_matching")?,
        name: row.try_get("name")?,
        event: row.try_get("event")?,
        properties: row.try_get("properties")?,
    })
}

/// The REST hooks subscribed to `event` of `resource_id` in the team.
pub async fn fetch_rest_hooks(
    pool: &PgPool,
    team_id: i64,
    event: &str,
    resource_id: i64,
) -> Result<Vec<Hook>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, team_id::bigint AS team_id, user_id::bigint AS user_id, resource_id::bigint AS resource_id, \
         event, target FROM ee_hook WHERE team_id = $1 AND event = $2 AND resource_id = $3",
    )
    .bind(team_id)
    .bind(event)
    .bind(resource_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Hook {
                id: row.try_get("id")?,
                team_id: row.try_get("team_id")?,
                user_id: row.try_get("user_id")?,
                resource_id: row.try_get("resource_id")?,
                event: row.try_get("event")?,
                target: row.try_get("target")?,
            })
        })
        .collect()
}

/// Forgets a REST hook (its subscriber is gone).
pub async fn delete_rest_hook(pool: &PgPool, hook_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ee_hook WHERE id = $1").bind(hook_id).execute(pool).await.map(drop)
}

/// Whether the person is in the (dynamic or Postgres-stored static) cohort.
pub async fn is_in_cohort(pool: &PgPool, cohort_id: i64, person_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM posthog_cohortpeople WHERE cohort_id = $1 AND person_id = $2)")
        .bind(cohort_id)
        .bind(person_id)
        .fetch_one(pool)
        .await
}

/// ClickHouse string literal escaping (the reference's `escapeClickHouseString`).
fn escape_clickhouse_string(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The ClickHouse query the reference runs for a static cohort (on one line; the client appends
/// the output format): a row means the person is in the cohort.
pub fn static_cohort_query(team_id: i64, cohort_id: i64, person_uuid: Uuid) -> String {
    format!(
        "SELECT 1 FROM person_static_cohort WHERE team_id = {team_id} AND cohort_id = {cohort_id} \
         AND person_id = '{}' LIMIT 1",
        escape_clickhouse_string(&person_uuid.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_cohort_query_escapes_the_person_id() {
        assert_eq!(escape_clickhouse_string(r"a'b\c"), r"a\'b\\c");
        assert_eq!(
            static_cohort_query(2, 7, Uuid::nil()),
            "SELECT 1 FROM person_static_cohort WHERE team_id = 2 AND cohort_id = 7 \
             AND person_id = '00000000-0000-0000-0000-000000000000' LIMIT 1"
        );
    }
}
