//! The graphile-worker 0.11.1 schema migrations, vendored verbatim under `migrations/graphile/`
//! (MIT, see the LICENSE there) and applied the way graphile-worker applies them, so an existing
//! deployment's `<schema>.migrations` state is honoured and continued:
//! * when `<schema>.migrations` does not exist (SQLSTATE 42P01), install `pgcrypto`, the schema and
//!   the migrations table;
//! * apply, in order, each migration numbered above the highest recorded id, each in its own
//!   transaction together with its `migrations` row;
//! * `:GRAPHILE_WORKER_SCHEMA` in the SQL is replaced by the quoted schema name.
//!
//! A Postgres advisory lock serialises concurrent migrators (several servers deploying at once),
//! which graphile-worker 0.11 did not do.

use sqlx::{Connection, PgConnection};
use thiserror::Error;

/// The vendored SQL, in order: (number, text).
pub const GRAPHILE_MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/graphile/000001.sql")),
    (2, include_str!("../../migrations/graphile/000002.sql")),
    (3, include_str!("../../migrations/graphile/000003.sql")),
    (4, include_str!("../../migrations/graphile/000004.sql")),
    (5, include_str!("../../migrations/graphile/000005.sql")),
    (6, include_str!("../../migrations/graphile/000006.sql")),
    (7, include_str!("../../migrations/graphile/000007.sql")),
    (8, include_str!("../../migrations/graphile/000008.sql")),
];

/// Arbitrary, fixed key for `pg_advisory_lock` while migrating.
const MIGRATION_LOCK_KEY: i64 = 0x706c_7567_696e_6a71; // "pluginjq"

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("invalid job queue schema name {0:?}")]
    InvalidSchemaName(String),
    #[error("graphile migration {number} failed: {source}")]
    Migration { number: i32, source: sqlx::Error },
    #[error("could not prepare the graphile schema: {0}")]
    Database(#[from] sqlx::Error),
}

/// The schema name as a quoted SQL identifier (graphile's `escapeIdentifier`).
pub fn quote_identifier(name: &str) -> Result<String, MigrationError> {
    if name.is_empty() || name.contains('\0') {
        return Err(MigrationError::InvalidSchemaName(name.to_string()));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Brings `schema` up to date. Returns the migration numbers applied (empty when up to date).
pub async fn migrate(connection: &mut PgConnection, schema: &str) -> Result<Vec<i32>, MigrationError> {
    let quoted = quote_identifier(schema)?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK_KEY).execute(&mut *connection).await?;
    let result = migrate_locked(connection, &quoted).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK_KEY).execute(&mut *connection).await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn migrate_locked(connection: &mut PgConnection, quoted: &str) -> Result<Vec<i32>, MigrationError> {
    let latest_query = format!("SELECT id FROM {quoted}.migrations ORDER BY id DESC LIMIT 1");
    let latest: Option<i32> = match sqlx::query_scalar::<_, i32>(&latest_query).fetch_optional(&mut *connection).await {
        Ok(latest) => latest,
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P01") => {
            install_schema(connection, quoted).await?;
            None
        }
        Err(error) => return Err(error.into()),
    };
    let mut applied = Vec::new();
    for (number, sql) in GRAPHILE_MIGRATIONS {
        if latest.is_some_and(|latest| *number <= latest) {
            continue;
        }
        run_migration(connection, quoted, *number, sql)
            .await
            .map_err(|source| MigrationError::Migration { number: *number, source })?;
        applied.push(*number);
    }
    Ok(applied)
}

async fn install_schema(connection: &mut PgConnection, quoted: &str) -> Result<(), sqlx::Error> {
    let sql = format!(
        "CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public;
         CREATE SCHEMA IF NOT EXISTS {quoted};
         CREATE TABLE {quoted}.migrations(id int PRIMARY KEY, ts timestamptz DEFAULT now() NOT NULL);"
    );
    sqlx::raw_sql(&sql).execute(&mut *connection).await?;
    Ok(())
}

async fn run_migration(connection: &mut PgConnection, quoted: &str, number: i32, sql: &str) -> Result<(), sqlx::Error> {
    let text = replace_schema_placeholder(sql, quoted);
    let mut transaction = connection.begin().await?;
    sqlx::raw_sql(&text).execute(&mut *transaction).await?;
    sqlx::query(&format!("INSERT INTO {quoted}.migrations (id) VALUES ($1)"))
        .bind(number)
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await
}

/// Replaces `:GRAPHILE_WORKER_SCHEMA` where it ends at a word boundary (graphile's `\b`).
fn replace_schema_placeholder(sql: &str, quoted: &str) -> String {
    const PLACEHOLDER: &str = ":GRAPHILE_WORKER_SCHEMA";
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(position) = rest.find(PLACEHOLDER) {
        let after = &rest[position + PLACEHOLDER.len()..];
        let at_boundary = !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&rest[..position]);
        out.push_str(if at_boundary { quoted } else { PLACEHOLDER });
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_is_replaced_only_at_word_boundaries() {
        let sql = "create table :GRAPHILE_WORKER_SCHEMA.jobs; :GRAPHILE_WORKER_SCHEMAX";
        assert_eq!(replace_schema_placeholder(sql, "\"gw\""), "create table \"gw\".jobs; :GRAPHILE_WORKER_SCHEMAX");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("graphile_worker").unwrap(), "\"graphile_worker\"");
        assert_eq!(quote_identifier("we\"ird").unwrap(), "\"we\"\"ird\"");
        assert!(quote_identifier("").is_err());
    }
}
