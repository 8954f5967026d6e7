//! Teams and organizations as ingestion sees them, cached with the reference's 30 s rule, plus
//! the event / property definitions and the team's first-event flag (spec 20 §8.4, §12).
//!
//! Owns `posthog_team` reads, the `ingested_event` write, `posthog_organization` reads and the
//! `posthog_eventdefinition` / `posthog_propertydefinition` inserts. Sending the "first team event
//! ingested" telemetry is delegated to a [`FirstEventTelemetry`] (the metrics room owns the client).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::uuidt::new_uuidt;
use crate::event::Properties;
use crate::infra::ttl_cache::{TtlCache, DEFAULT_MAX_AGE};
pub use crate::model::{Organization, Team};

/// Receives the "first team event ingested" telemetry (PostHog Cloud client, off in tests).
pub trait FirstEventTelemetry: Send + Sync {
    /// Called once per organization member: identify `member_distinct_id`, then capture
    /// `first team event ingested` with `properties` (`{team, sdk, realm, host}`).
    fn first_team_event_ingested(&self, member_distinct_id: &str, properties: Value);
}

/// Definition names known per team. Loaded once per team and never refreshed (as the reference),
/// appended as this process inserts.
#[derive(Default)]
struct KnownDefinitions {
    event_names: HashSet<String>,
    property_names: HashSet<String>,
}

pub struct TeamManager {
    pool: PgPool,
    teams: TtlCache<i32, Team>,
    organizations: TtlCache<Uuid, Organization>,
    definitions: Mutex<HashMap<i32, Arc<Mutex<KnownDefinitions>>>>,
    telemetry: OnceLock<Arc<dyn FirstEventTelemetry>>,
}

impl TeamManager {
    pub fn new(pool: PgPool, telemetry: Option<Arc<dyn FirstEventTelemetry>>) -> Self {
        TeamManager {
            pool,
            teams: TtlCache::new(DEFAULT_MAX_AGE),
            organizations: TtlCache::new(DEFAULT_MAX_AGE),
            definitions: Mutex::new(HashMap::new()),
            telemetry: telemetry.map(OnceLock::from).unwrap_or_default(),
        }
    }

    /// Sends "first team event ingested" telemetry from now on (the first call wins).
    pub fn set_telemetry(&self, telemetry: Arc<dyn FirstEventTelemetry>) {
        let _ = self.telemetry.set(telemetry);
    }

    /// The team, from a cache of at most 30 s; a missing team is looked up again every time.
    pub async fn fetch_team(&self, team_id: i32) -> Result<Option<Team>, sqlx::Error> {
        if let Some(team) = self.teams.get(&team_id) {
            return Ok(Some(team));
        }
        let sql = format!("SELECT {} FROM posthog_team WHERE id = $1", Team::COLUMNS);
        let team: Option<Team> = sqlx::query_as(&sql).bind(team_id).fetch_optional(&self.pool).await?;
        self.teams.insert(team_id, team.clone());
        Ok(team)
    }

    /// The organization, cached like teams (hooks need `available_features`).
    pub async fn fetch_organization(&self, organization_id: Uuid) -> Result<Option<Organization>, sqlx::Error> {
        if let Some(organization) = self.organizations.get(&organization_id) {
            return Ok(Some(organization));
        }
        let sql = format!("SELECT {} FROM posthog_organization WHERE id = $1", Organization::COLUMNS);
        let organization: Option<Organization> =
            sqlx::query_as(&sql).bind(organization_id).fetch_optional(&self.pool).await?;
        self.organizations.insert(organization_id, organization.clone());
        Ok(organization)
    }

    async fn known_definitions(&self, team_id: i32) -> Result<Arc<Mutex<KnownDefinitions>>, sqlx::Error> {
        if let Some(known) = self.definitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&team_id) {
            return Ok(known.clone());
        }
        let event_names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM posthog_eventdefinition WHERE team_id = $1")
                .bind(team_id)
                .fetch_all(&self.pool)
                .await?;
        let property_names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM posthog_propertydefinition WHERE team_id = $1")
                .bind(team_id)
                .fetch_all(&self.pool)
                .await?;
        let loaded = KnownDefinitions {
            event_names: event_names.into_iter().collect(),
            property_names: property_names.into_iter().collect(),
        };
        let mut definitions = self.definitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(definitions.entry(team_id).or_insert_with(|| Arc::new(Mutex::new(loaded))).clone())
    }

    /// Records the event name and top-level property keys as definitions (spec 20 §8.4) and, on the
    /// team's first event, sets `ingested_event` and sends the telemetry. The cached team is
    /// marked too, so this happens once rather than for 30 s (REF-BUG 10).
    pub async fn update_event_names_and_properties(
        &self,
        team_id: i32,
        event: &str,
        properties: &Properties,
    ) -> Result<(), sqlx::Error> {
        let Some(team) = self.fetch_team(team_id).await? else {
            return Ok(());
        };
        let known = self.known_definitions(team.id).await?;
        let (new_event, new_properties) = {
            let known = known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let new_event = !known.event_names.contains(event);
            let new_properties: Vec<(&String, bool)> = properties
                .iter()
                .filter(|(key, _)| !known.property_names.contains(*key))
                .map(|(key, value)| (key, value.is_number()))
                .collect();
            (new_event, new_properties)
        };
        if new_event {
            sqlx::query(
                "INSERT INTO posthog_eventdefinition (id, name, volume_30_day, query_usage_30_day, team_id) \
                 VALUES ($1, $2, NULL, NULL, $3) ON CONFLICT DO NOTHING",
            )
            .bind(new_uuidt())
            .bind(event)
            .bind(team.id)
            .execute(&self.pool)
            .await?;
            known.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).event_names.insert(event.to_string());
        }
        if !new_properties.is_empty() {
            // One statement for all new keys (the reference sends one per key); rows keep the
            // properties' order.
            let ids: Vec<Uuid> = new_properties.iter().map(|_| new_uuidt()).collect();
            let names: Vec<&str> = new_properties.iter().map(|(name, _)| name.as_str()).collect();
            let numerical: Vec<bool> = new_properties.iter().map(|(_, numerical)| *numerical).collect();
            sqlx::query(
                "INSERT INTO posthog_propertydefinition (id, name, is_numerical, volume_30_day, query_usage_30_day, team_id) \
                 SELECT id, name, is_numerical, NULL, NULL, $4 FROM UNNEST($1::uuid[], $2::text[], $3::bool[]) \
                 WITH ORDINALITY AS new_definition(id, name, is_numerical, position) ORDER BY position \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&ids)
            .bind(&names)
            .bind(&numerical)
            .bind(team.id)
            .execute(&self.pool)
            .await?;
            let mut known = known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            known.property_names.extend(names.iter().map(|name| name.to_string()));
        }
        if !team.ingested_event {
            self.mark_first_event_ingested(&team, properties).await?;
        }
        Ok(())
    }

    async fn mark_first_event_ingested(&self, team: &Team, properties: &Properties) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE posthog_team SET ingested_event = $1 WHERE id = $2")
            .bind(true)
            .bind(team.id)
            .execute(&self.pool)
            .await?;
        self.teams.update(&team.id, |cached| cached.ingested_event = true);
        let Some(telemetry) = self.telemetry.get() else {
            return Ok(());
        };
        let members: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT distinct_id FROM posthog_user JOIN posthog_organizationmembership \
             ON posthog_user.id = posthog_organizationmembership.user_id WHERE organization_id = $1",
        )
        .bind(team.organization_id)
        .fetch_all(&self.pool)
        .await?;
        // Absent keys are left out, as JSON serialization of `undefined` does.
        let mut telemetry_properties = Map::new();
        telemetry_properties.insert("team".to_string(), Value::String(team.uuid.to_string()));
        for (name, key) in [("sdk", "$lib"), ("realm", "realm"), ("host", "$host")] {
            if let Some(value) = properties.get(key) {
                telemetry_properties.insert(name.to_string(), value.clone());
            }
        }
        let telemetry_properties = Value::Object(telemetry_properties);
        for distinct_id in members.into_iter().flatten() {
            telemetry.first_team_event_ingested(&distinct_id, telemetry_properties.clone());
        }
        Ok(())
    }
}
