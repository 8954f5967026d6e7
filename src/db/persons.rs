//! Person rows in Postgres (written in both pipelines): fetch by distinct id, create with distinct
//! ids, partial updates, adding distinct ids, and the merge transaction (spec 20 §5.3, §8).
//!
//! Also the `posthog_persondistinctid` count behind "is this a new person?" (spec 20 §8.1).
//! When to call what (identify/alias rules, retries) is `ingestion::process_event`'s; announcing
//! changes to ClickHouse is the `EventWriter`'s.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, PgPool, Row};
use thiserror::Error;
use uuid::Uuid;

use crate::event::Properties;
pub use crate::model::Person;

/// A `posthog_persondistinctid` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PersonDistinctId {
    pub id: i64,
    pub team_id: i32,
    pub person_id: i32,
    pub distinct_id: String,
}

/// The columns an `updatePerson` call may change; only the `Some` ones are written.
#[derive(Debug, Clone, Default)]
pub struct PersonUpdate {
    pub created_at: Option<DateTime<Utc>>,
    pub properties: Option<Properties>,
    pub is_identified: Option<bool>,
}

impl PersonUpdate {
    /// The person as it is after this update.
    pub fn applied_to(&self, person: &Person) -> Person {
        let mut updated = person.clone();
        if let Some(created_at) = self.created_at {
            updated.created_at = created_at;
        }
        if let Some(properties) = &self.properties {
            updated.properties = properties.clone();
        }
        if let Some(is_identified) = self.is_identified {
            updated.is_identified = is_identified;
        }
        updated
    }
}

/// Why a merge did not happen.
#[derive(Debug, Error)]
pub enum MergeError {
    #[error("Failed trying to move distinct IDs because target person no longer exists.")]
    TargetGone,
    #[error("Failed trying to move distinct IDs because the source person no longer exists.")]
    SourceGone,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What a committed merge changed, for the writer's messages.
#[derive(Debug, Clone)]
pub struct MergeResult {
    pub merged: Person,
    pub moved: Vec<PersonDistinctId>,
}

const PERSON_COLUMNS: &str = Person::COLUMNS;
const DISTINCT_ID_COLUMNS: &str = "id::int8 AS id, team_id, person_id, distinct_id";

fn person_from_row(row: &PgRow) -> Result<Person, sqlx::Error> {
    Person::from_row(row)
}

fn distinct_id_from_row(row: &PgRow) -> Result<PersonDistinctId, sqlx::Error> {
    Ok(PersonDistinctId {
        id: row.try_get("id")?,
        team_id: row.try_get("team_id")?,
        person_id: row.try_get("person_id")?,
        distinct_id: row.try_get("distinct_id")?,
    })
}

/// `posthog_person`'s columns, qualified, for the queries that join the distinct id table.
const JOINED_PERSON_COLUMNS: &str = "posthog_person.id, posthog_person.created_at, posthog_person.team_id, \
     posthog_person.properties, posthog_person.properties_last_updated_at, posthog_person.properties_last_operation, \
     posthog_person.is_user_id, posthog_person.is_identified, posthog_person.uuid";

/// The person owning distinct id `{distinct_id}` in team `{team_id}` (SQL expressions), looked up
/// through the unique `(team_id, distinct_id)` index and then the person's primary key, whatever
/// the table statistics say. Written as plain joins, a fresh or freshly grown database (no
/// statistics yet) gets plans that read the whole team's persons through `posthog_person_team_id`
/// for each lookup, or hash the whole distinct id table: ~370 person rows read per event in
/// `cargo bench --bench e2e_server`. `OFFSET 0` keeps each lateral subquery from being flattened,
/// so each is planned on its own key. Same rows as the reference's join.
macro_rules! owner_of {
    ($team_id:literal, $distinct_id:literal) => {
        concat!(
            "CROSS JOIN LATERAL (SELECT person_id FROM posthog_persondistinctid \
                 WHERE posthog_persondistinctid.team_id = ",
            $team_id,
            " \
                 AND posthog_persondistinctid.distinct_id = ",
            $distinct_id,
            " OFFSET 0) AS owner \
             CROSS JOIN LATERAL (SELECT * FROM posthog_person WHERE posthog_person.id = owner.person_id OFFSET 0) \
                 AS posthog_person"
        )
    };
}

/// The rows `input` (`$1` team ids, `$2` distinct ids, 1-based `position`) joined to the persons
/// owning them, for lookups of many events' persons in one statement.
const PERSONS_OF_KEYS: &str = concat!(
    "FROM UNNEST($1::int4[], $2::text[]) WITH ORDINALITY AS input(team_id, distinct_id, position) ",
    owner_of!("input.team_id", "input.distinct_id"),
    " WHERE posthog_person.team_id = input.team_id"
);

/// The statements built from the shared pieces above, once.
static FETCH_PERSON_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {JOINED_PERSON_COLUMNS} FROM (SELECT 1) AS one {} WHERE posthog_person.team_id = $1",
        owner_of!("$1", "$2")
    )
});
static FETCH_PERSONS_OF_KEYS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT input.position::int8 AS input_position, {JOINED_PERSON_COLUMNS} {PERSONS_OF_KEYS}")
});
static PERSON_IDS_OF_KEYS_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT input.position::int8, posthog_person.id {PERSONS_OF_KEYS}"));

/// The person that owns `distinct_id` in the team, if any.
pub async fn fetch_person(pool: &PgPool, team_id: i32, distinct_id: &str) -> Result<Option<Person>, sqlx::Error> {
    let row = crate::metrics::catalog::postgres(
        "fetchPerson",
        sqlx::query(&FETCH_PERSON_SQL).bind(team_id).bind(distinct_id).fetch_optional(pool),
    )
    .await?;
    row.as_ref().map(person_from_row).transpose()
}

/// [`fetch_person`] for many `(team_id, distinct_id)` keys in one query: the owners in input
/// order (`None` where the team has no such distinct id). Repeated keys each get the person.
pub async fn fetch_persons_by_distinct_id(
    pool: &PgPool,
    keys: &[(i32, String)],
) -> Result<Vec<Option<Person>>, sqlx::Error> {
    let team_ids: Vec<i32> = keys.iter().map(|(team_id, _)| *team_id).collect();
    let distinct_ids: Vec<&str> = keys.iter().map(|(_, distinct_id)| distinct_id.as_str()).collect();
    let rows = crate::metrics::catalog::postgres(
        "fetchPerson",
        sqlx::query(&FETCH_PERSONS_OF_KEYS_SQL).bind(&team_ids).bind(&distinct_ids).fetch_all(pool),
    )
    .await?;
    let mut persons: Vec<Option<Person>> = vec![None; keys.len()];
    for row in &rows {
        let position: i64 = row.try_get("input_position")?;
        if let Some(slot) = usize::try_from(position - 1).ok().and_then(|index| persons.get_mut(index)) {
            *slot = Some(person_from_row(row)?);
        }
    }
    Ok(persons)
}

/// Creates a person and its distinct ids (in this order) in one transaction.
pub async fn create_person(
    pool: &PgPool,
    created_at: DateTime<Utc>,
    properties: &Properties,
    team_id: i32,
    is_identified: bool,
    uuid: Uuid,
    distinct_ids: &[&str],
) -> Result<(Person, Vec<PersonDistinctId>), sqlx::Error> {
    let created =
        create_person_in_transaction(pool, created_at, properties, team_id, is_identified, uuid, distinct_ids);
    crate::metrics::catalog::postgres_transaction(created).await
}

/// A person to create for an event unless its team already has the distinct id
/// ([`create_persons_unless_distinct_ids_exist`]).
#[derive(Debug, Clone)]
pub struct NewPerson {
    pub created_at: DateTime<Utc>,
    pub properties: Properties,
    pub team_id: i32,
    pub is_identified: bool,
    pub uuid: Uuid,
    pub distinct_id: String,
}

static CREATE_PERSONS_SQL: LazyLock<String> = LazyLock::new(|| {
    let returned =
        PERSON_COLUMNS.split(", ").map(|column| format!("new_person.{column}")).collect::<Vec<_>>().join(", ");
    format!(
        "WITH input AS ( \
             SELECT * FROM UNNEST($1::timestamptz[], $2::jsonb[], $3::int[], $4::bool[], $5::uuid[], $6::text[]) \
                 WITH ORDINALITY AS input(created_at, properties, team_id, is_identified, uuid, distinct_id, position) \
         ), fresh AS ( \
             SELECT DISTINCT ON (team_id, distinct_id) * FROM input WHERE NOT EXISTS \
                 (SELECT 1 FROM posthog_persondistinctid existing \
                  WHERE existing.team_id = input.team_id AND existing.distinct_id = input.distinct_id) \
             ORDER BY team_id, distinct_id, position \
         ), new_person AS ( \
             INSERT INTO posthog_person (created_at, properties, properties_last_updated_at, team_id, is_user_id, \
                 is_identified, uuid) \
             SELECT created_at, properties, '{{}}', team_id, NULL, is_identified, uuid FROM fresh ORDER BY position \
             RETURNING {PERSON_COLUMNS} \
         ), new_distinct_id AS ( \
             INSERT INTO posthog_persondistinctid (distinct_id, person_id, team_id) \
             SELECT fresh.distinct_id, new_person.id, new_person.team_id \
             FROM fresh JOIN new_person ON new_person.uuid = fresh.uuid \
             RETURNING id::int8 AS distinct_id_row_id, person_id \
         ) \
         SELECT fresh.position AS input_position, {returned}, new_distinct_id.distinct_id_row_id \
         FROM fresh JOIN new_person ON new_person.uuid = fresh.uuid \
             JOIN new_distinct_id ON new_distinct_id.person_id = new_person.id"
    )
});

/// Events' persons, each created unless its team already has its distinct id (or an earlier entry
/// of `persons` has it), with that distinct id, in one statement: the reference's `pdicount` query
/// and its two-insert transaction per person folded together, with the same outcome. One result per
/// entry, in order: `None` when the distinct id exists. A unique violation when another writer
/// creates one of them at the same moment (nothing is written then; try them one by one).
pub async fn create_persons_unless_distinct_ids_exist(
    pool: &PgPool,
    persons: &[NewPerson],
) -> Result<Vec<Option<(Person, PersonDistinctId)>>, sqlx::Error> {
    let created_at: Vec<DateTime<Utc>> = persons.iter().map(|person| person.created_at).collect();
    let properties: Vec<Value> = persons.iter().map(|person| Value::Object(person.properties.clone())).collect();
    let team_ids: Vec<i32> = persons.iter().map(|person| person.team_id).collect();
    let identified: Vec<bool> = persons.iter().map(|person| person.is_identified).collect();
    let uuids: Vec<Uuid> = persons.iter().map(|person| person.uuid).collect();
    let distinct_ids: Vec<&str> = persons.iter().map(|person| person.distinct_id.as_str()).collect();
    let query = sqlx::query(&CREATE_PERSONS_SQL)
        .bind(&created_at)
        .bind(&properties)
        .bind(&team_ids)
        .bind(&identified)
        .bind(&uuids)
        .bind(&distinct_ids)
        .fetch_all(pool);
    let rows = crate::metrics::catalog::postgres_transaction(query).await?;
    let mut created: Vec<Option<(Person, PersonDistinctId)>> = vec![None; persons.len()];
    for row in &rows {
        let position: i64 = row.try_get("input_position")?;
        let Some(index) = usize::try_from(position - 1).ok().filter(|index| *index < persons.len()) else {
            continue;
        };
        let person = person_from_row(row)?;
        let distinct_id = PersonDistinctId {
            id: row.try_get("distinct_id_row_id")?,
            team_id: person.team_id,
            person_id: person.id,
            distinct_id: persons[index].distinct_id.clone(),
        };
        created[index] = Some((person, distinct_id));
    }
    Ok(created)
}

async fn create_person_in_transaction(
    pool: &PgPool,
    created_at: DateTime<Utc>,
    properties: &Properties,
    team_id: i32,
    is_identified: bool,
    uuid: Uuid,
    distinct_ids: &[&str],
) -> Result<(Person, Vec<PersonDistinctId>), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let sql = format!(
        "INSERT INTO posthog_person (created_at, properties, properties_last_updated_at, team_id, is_user_id, \
         is_identified, uuid) VALUES ($1, $2, '{{}}', $3, NULL, $4, $5) RETURNING {PERSON_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(created_at)
        .bind(Value::Object(properties.clone()))
        .bind(team_id)
        .bind(is_identified)
        .bind(uuid)
        .fetch_one(&mut *transaction)
        .await?;
    let person = person_from_row(&row)?;
    let mut rows = Vec::with_capacity(distinct_ids.len());
    for distinct_id in distinct_ids {
        rows.push(insert_distinct_id(&mut transaction, &person, distinct_id).await?);
    }
    transaction.commit().await?;
    Ok((person, rows))
}

async fn insert_distinct_id(
    connection: &mut PgConnection,
    person: &Person,
    distinct_id: &str,
) -> Result<PersonDistinctId, sqlx::Error> {
    let sql = format!(
        "INSERT INTO posthog_persondistinctid (distinct_id, person_id, team_id) VALUES ($1, $2, $3) \
         RETURNING {DISTINCT_ID_COLUMNS}"
    );
    let row = sqlx::query(&sql).bind(distinct_id).bind(person.id).bind(person.team_id).fetch_one(connection).await?;
    distinct_id_from_row(&row)
}

/// Adds a distinct id to an existing person; with `identify`, also sets `is_identified` when the
/// person is not identified yet, in the same transaction (returns the updated person then).
pub async fn add_distinct_id(
    pool: &PgPool,
    person: &Person,
    distinct_id: &str,
    identify: bool,
) -> Result<(PersonDistinctId, Option<Person>), sqlx::Error> {
    if !identify || person.is_identified {
        let mut connection = pool.acquire().await?;
        return Ok((insert_distinct_id(&mut connection, person, distinct_id).await?, None));
    }
    let mut transaction = pool.begin().await?;
    let row = insert_distinct_id(&mut transaction, person, distinct_id).await?;
    let update = PersonUpdate { is_identified: Some(true), ..PersonUpdate::default() };
    let identified =
        crate::metrics::catalog::postgres("updatePerson", update_person(&mut transaction, person, &update)).await?;
    transaction.commit().await?;
    Ok((row, Some(identified)))
}

/// `UPDATE posthog_person SET <only the given columns> WHERE id = $n`; returns the updated person.
pub async fn update_person(
    connection: &mut PgConnection,
    person: &Person,
    update: &PersonUpdate,
) -> Result<Person, sqlx::Error> {
    let mut assignments = Vec::new();
    if update.created_at.is_some() {
        assignments.push("\"created_at\"");
    }
    if update.properties.is_some() {
        assignments.push("\"properties\"");
    }
    if update.is_identified.is_some() {
        assignments.push("\"is_identified\"");
    }
    if assignments.is_empty() {
        return Ok(person.clone());
    }
    let set_clause: Vec<String> =
        assignments.iter().enumerate().map(|(index, column)| format!("{column} = ${}", index + 1)).collect();
    let sql = format!("UPDATE posthog_person SET {} WHERE id = ${}", set_clause.join(", "), assignments.len() + 1);
    let mut query = sqlx::query(&sql);
    if let Some(created_at) = update.created_at {
        query = query.bind(created_at);
    }
    if let Some(properties) = &update.properties {
        query = query.bind(Value::Object(properties.clone()));
    }
    if let Some(is_identified) = update.is_identified {
        query = query.bind(is_identified);
    }
    query.bind(person.id).execute(connection).await?;
    Ok(update.applied_to(person))
}

/// Merges `other` into `into` in ONE transaction (the reference moves the distinct ids on a
/// separate connection, REF-BUG 9): update the target, repoint cohort memberships and distinct
/// ids, delete the source. Foreign keys are deferred, so a distinct id added to the source
/// concurrently surfaces as an error at commit and the whole merge rolls back. Timed as the
/// reference times it: the transaction (`query.postgres_transation`) and the distinct ids' move
/// (`query.postgres`, `updateDistinctIdPerson`).
pub async fn merge_people(
    pool: &PgPool,
    into: &Person,
    other: &Person,
    update: &PersonUpdate,
) -> Result<MergeResult, MergeError> {
    crate::metrics::catalog::postgres_transaction(merge_people_in_transaction(pool, into, other, update)).await
}

async fn merge_people_in_transaction(
    pool: &PgPool,
    into: &Person,
    other: &Person,
    update: &PersonUpdate,
) -> Result<MergeResult, MergeError> {
    let mut transaction = pool.begin().await?;
    let merged = update_person(&mut transaction, into, update).await?;
    sqlx::query("UPDATE posthog_cohortpeople SET person_id = $1 WHERE person_id = $2")
        .bind(into.id)
        .bind(other.id)
        .execute(&mut *transaction)
        .await?;
    let sql = format!(
        "UPDATE posthog_persondistinctid SET person_id = $1 WHERE person_id = $2 AND team_id = $3 \
         RETURNING {DISTINCT_ID_COLUMNS}"
    );
    let moved_rows = crate::metrics::catalog::postgres(
        "updateDistinctIdPerson",
        sqlx::query(&sql).bind(into.id).bind(other.id).bind(into.team_id).fetch_all(&mut *transaction),
    )
    .await;
    let moved_rows = match moved_rows {
        Ok(rows) => rows,
        Err(error) if is_distinct_id_foreign_key_violation(&error) => return Err(MergeError::TargetGone),
        Err(error) => return Err(error.into()),
    };
    if moved_rows.is_empty() {
        return Err(MergeError::SourceGone);
    }
    let moved = moved_rows.iter().map(distinct_id_from_row).collect::<Result<Vec<_>, _>>()?;
    sqlx::query("DELETE FROM posthog_person WHERE team_id = $1 AND id = $2")
        .bind(other.team_id)
        .bind(other.id)
        .execute(&mut *transaction)
        .await?;
    match transaction.commit().await {
        Ok(()) => Ok(MergeResult { merged, moved }),
        Err(error) if is_distinct_id_foreign_key_violation(&error) => Err(MergeError::TargetGone),
        Err(error) => Err(error.into()),
    }
}

fn is_distinct_id_foreign_key_violation(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|database_error| {
        database_error.is_foreign_key_violation() && database_error.table() == Some("posthog_persondistinctid")
    })
}

/// Whether PostgreSQL has planner statistics on `posthog_persondistinctid.team_id` (none when the
/// table was never analyzed: autovacuum off, or not run yet), and the table's size in bytes (0 when
/// it is not there). The table is the one the server's statements reach (the search path's).
pub async fn distinct_id_statistics(pool: &PgPool) -> Result<(bool, i64), sqlx::Error> {
    sqlx::query_as(
        "WITH target AS (SELECT to_regclass('posthog_persondistinctid') AS oid) \
         SELECT EXISTS (SELECT 1 FROM pg_stats JOIN pg_class ON pg_class.relname = pg_stats.tablename \
                 JOIN pg_namespace ON pg_namespace.oid = pg_class.relnamespace \
                     AND pg_namespace.nspname = pg_stats.schemaname \
                 WHERE pg_class.oid = target.oid AND pg_stats.attname = 'team_id'), \
             COALESCE(pg_relation_size(target.oid), 0)::int8 \
         FROM target",
    )
    .fetch_one(pool)
    .await
}

/// `ANALYZE posthog_persondistinctid` (PostgreSQL only warns when the role does not own it).
pub async fn analyze_distinct_ids(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("ANALYZE posthog_persondistinctid").execute(pool).await.map(drop)
}

/// How many rows the team has for `distinct_id` (0 or 1).
pub async fn count_distinct_id(pool: &PgPool, team_id: i32, distinct_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COUNT(*) AS pdicount FROM posthog_persondistinctid WHERE team_id = $1 AND distinct_id = $2",
    )
    .bind(team_id)
    .bind(distinct_id)
    .fetch_one(pool)
    .await
}

/// Every person (tests and benchmarks), in id order.
pub async fn fetch_persons(pool: &PgPool) -> Result<Vec<Person>, sqlx::Error> {
    let sql = format!("SELECT {PERSON_COLUMNS} FROM posthog_person ORDER BY id");
    sqlx::query(&sql).fetch_all(pool).await?.iter().map(person_from_row).collect()
}

/// A person's distinct ids in insertion order.
pub async fn fetch_distinct_ids(pool: &PgPool, person: &Person) -> Result<Vec<String>, sqlx::Error> {
    crate::metrics::catalog::postgres(
        "fetchDistinctIds",
        sqlx::query_scalar(
            "SELECT distinct_id FROM posthog_persondistinctid WHERE person_id = $1 AND team_id = $2 ORDER BY id",
        )
        .bind(person.id)
        .bind(person.team_id)
        .fetch_all(pool),
    )
    .await
}

/// One `$set` / `$set_once` for the person owning `distinct_id` in `team_id`.
#[derive(Debug, Clone)]
pub struct PropertyUpdate {
    pub team_id: i32,
    pub distinct_id: String,
    pub set: Properties,
    pub set_once: Properties,
}

/// Applies property updates in order with two statements for the whole batch: find the persons,
/// then one UPDATE. Per person the result is `set_once || properties || set` (JSON objects,
/// top-level keys): `$set_once` only fills absent keys, `$set` overrides, which is what the
/// reference computes in JavaScript; a row whose properties would not change is not written.
/// Several updates of one person compose in order. Returns, per update, whether its person exists.
pub async fn apply_property_updates(pool: &PgPool, updates: &[PropertyUpdate]) -> Result<Vec<bool>, sqlx::Error> {
    let team_ids: Vec<i32> = updates.iter().map(|update| update.team_id).collect();
    let distinct_ids: Vec<&str> = updates.iter().map(|update| update.distinct_id.as_str()).collect();
    let found: Vec<(i64, i32)> = crate::metrics::catalog::postgres(
        "fetchPerson",
        sqlx::query_as(&PERSON_IDS_OF_KEYS_SQL).bind(&team_ids).bind(&distinct_ids).fetch_all(pool),
    )
    .await?;
    let mut person_of_update: Vec<Option<i32>> = vec![None; updates.len()];
    for (position, person_id) in found {
        if let Some(slot) = usize::try_from(position - 1).ok().and_then(|index| person_of_update.get_mut(index)) {
            *slot = Some(person_id);
        }
    }
    // Per person, in first-seen order: set_once earlier-wins, set later-wins.
    let mut person_ids: Vec<i32> = Vec::new();
    let mut composed: std::collections::HashMap<i32, (Properties, Properties)> = std::collections::HashMap::new();
    for (update, person_id) in updates.iter().zip(&person_of_update) {
        let Some(person_id) = person_id else { continue };
        let (set_once, set) = composed.entry(*person_id).or_insert_with(|| {
            person_ids.push(*person_id);
            (Properties::new(), Properties::new())
        });
        for (key, value) in &update.set_once {
            set_once.entry(key.clone()).or_insert_with(|| value.clone());
        }
        for (key, value) in &update.set {
            set.insert(key.clone(), value.clone());
        }
    }
    if !person_ids.is_empty() {
        let (set_onces, sets): (Vec<Value>, Vec<Value>) = person_ids
            .iter()
            .filter_map(|person_id| composed.remove(person_id))
            .map(|(set_once, set)| (Value::Object(set_once), Value::Object(set)))
            .unzip();
        crate::metrics::catalog::postgres(
            "updatePerson",
            sqlx::query(
                "UPDATE posthog_person SET properties = input.set_once || posthog_person.properties || input.set \
             FROM UNNEST($1::int4[], $2::jsonb[], $3::jsonb[]) AS input(id, set_once, set) \
             WHERE posthog_person.id = input.id \
             AND posthog_person.properties IS DISTINCT FROM (input.set_once || posthog_person.properties || input.set)",
            )
            .bind(&person_ids)
            .bind(&set_onces)
            .bind(&sets)
            .execute(pool),
        )
        .await?;
    }
    Ok(person_of_update.iter().map(Option::is_some).collect())
}
