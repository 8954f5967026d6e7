//! Group analytics on events: the per-team group type → column index mapping
//! (`posthog_grouptypemapping`, at most 5 types, cached 30 s) and the `$group_N` properties
//! (spec 20 §6.2–6.4). Writing group properties (`$groupidentify`) is the `EventWriter`'s.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::PgPool;

use crate::event::Properties;
use crate::infra::ttl_cache::{TtlCache, DEFAULT_MAX_AGE};

/// `MAX_GROUP_TYPES_PER_TEAM` of the reference.
pub const MAX_GROUP_TYPES_PER_TEAM: i32 = 5;

/// Group type name → column index.
pub type GroupTypes = HashMap<String, i32>;

pub struct GroupTypeManager {
    pool: PgPool,
    cache: TtlCache<i32, GroupTypes>,
}

impl GroupTypeManager {
    pub fn new(pool: PgPool) -> Self {
        GroupTypeManager { pool, cache: TtlCache::new(DEFAULT_MAX_AGE) }
    }

    /// The team's mapping, from a cache of at most 30 s.
    pub async fn fetch_group_types(&self, team_id: i32) -> Result<GroupTypes, sqlx::Error> {
        if let Some(types) = self.cache.get(&team_id) {
            return Ok(types);
        }
        let types = fetch_group_types(&self.pool, team_id).await?;
        self.cache.insert(team_id, Some(types.clone()));
        Ok(types)
    }

    /// The index of `group_type`, inserting it at the next free index when new; `None` once the
    /// team has 5 types.
    pub async fn fetch_group_type_index(&self, team_id: i32, group_type: &str) -> Result<Option<i32>, sqlx::Error> {
        let types = self.fetch_group_types(team_id).await?;
        if let Some(index) = types.get(group_type) {
            return Ok(Some(*index));
        }
        let inserted = insert_group_type(&self.pool, team_id, group_type, types.len() as i32).await?;
        if inserted.is_some() {
            self.cache.remove(&team_id);
        }
        Ok(inserted)
    }

    /// Adds `$group_<index>: key` for each entry of `properties.$groups` that has an index.
    pub async fn add_group_properties(&self, team_id: i32, properties: &mut Properties) -> Result<(), sqlx::Error> {
        let entries = self.group_entries(team_id, properties).await?;
        properties.extend(entries);
        Ok(())
    }

    /// The entries [`Self::add_group_properties`] sets: `$group_<index>` for each type of
    /// `$groups` the team has an index for.
    pub async fn group_entries(
        &self,
        team_id: i32,
        properties: &Properties,
    ) -> Result<Vec<(String, Value)>, sqlx::Error> {
        let Some(Value::Object(groups)) = properties.get("$groups") else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        for (group_type, group_key) in groups {
            if let Some(index) = self.fetch_group_type_index(team_id, group_type).await? {
                entries.push((format!("$group_{index}"), group_key.clone()));
            }
        }
        Ok(entries)
    }
}

/// The team's mapping straight from Postgres.
pub async fn fetch_group_types(pool: &PgPool, team_id: i32) -> Result<GroupTypes, sqlx::Error> {
    Ok(crate::metrics::catalog::postgres("fetchGroupTypes", crate::db::teams::fetch_group_types(pool, team_id))
        .await?
        .into_iter()
        .collect())
}

/// Inserts `group_type` at `index`, or returns its existing index; when `index` is taken by another
/// type, tries the next one. `None` from index 5 on.
pub async fn insert_group_type(
    pool: &PgPool,
    team_id: i32,
    group_type: &str,
    index: i32,
) -> Result<Option<i32>, sqlx::Error> {
    let mut index = index;
    while index < MAX_GROUP_TYPES_PER_TEAM {
        let found = crate::metrics::catalog::postgres(
            "insertGroupType",
            crate::db::teams::insert_group_type_at(pool, team_id, group_type, index),
        )
        .await?;
        if found.is_some() {
            return Ok(found);
        }
        index += 1;
    }
    Ok(None)
}
