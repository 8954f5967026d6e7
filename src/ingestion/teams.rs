//! Teams and organizations as ingestion sees them, cached with the reference's 30 s rule, plus
//! the event / property definitions and the team's first-event flag (spec 20 §8.4, §12).
//!
//! Owns the caches and when `posthog_team` / `posthog_organization` are read, the `ingested_event`
//! write and the `posthog_eventdefinition` / `posthog_propertydefinition` inserts happen (the
//! statements are `db::teams`' and `db::events`'). Sending the "first team event
//! ingested" telemetry is delegated to a [`FirstEventTelemetry`] (the metrics room owns the client).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::uuidt::new_uuidt;
use crate::db;
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

/// One team's known definitions, shared by the events that consult and extend them.
type SharedDefinitions = Arc<Mutex<KnownDefinitions>>;

pub struct TeamManager {
    pool: PgPool,
    teams: TtlCache<i32, Team>,
    organizations: TtlCache<Uuid, Organization>,
    /// Loaded once per team: concurrent first events wait for the one load.
    definitions: Mutex<HashMap<i32, Arc<tokio::sync::OnceCell<SharedDefinitions>>>>,
    /// Teams whose first event this process is marking (or has marked): the many events in flight
    /// that all see `ingested_event = false` in the cached team make one write, not one each.
    first_event_claims: Mutex<HashSet<i32>>,
    telemetry: OnceLock<Arc<dyn FirstEventTelemetry>>,
}

impl TeamManager {
    pub fn new(pool: PgPool, telemetry: Option<Arc<dyn FirstEventTelemetry>>) -> Self {
        TeamManager {
            pool,
            teams: TtlCache::new(DEFAULT_MAX_AGE),
            organizations: TtlCache::new(DEFAULT_MAX_AGE),
            definitions: Mutex::new(HashMap::new()),
            first_event_claims: Mutex::new(HashSet::new()),
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
        let team = crate::metrics::catalog::postgres("fetchTeam", db::teams::fetch_team(&self.pool, team_id)).await?;
        self.teams.insert(team_id, team.clone());
        Ok(team)
    }

    /// The organization, cached like teams (hooks need `available_features`).
    pub async fn fetch_organization(&self, organization_id: Uuid) -> Result<Option<Organization>, sqlx::Error> {
        if let Some(organization) = self.organizations.get(&organization_id) {
            return Ok(Some(organization));
        }
        let organization = crate::metrics::catalog::postgres(
            "fetchOrganization",
            db::teams::fetch_organization(&self.pool, organization_id),
        )
        .await?;
        self.organizations.insert(organization_id, organization.clone());
        Ok(organization)
    }

    async fn known_definitions(&self, team_id: i32) -> Result<SharedDefinitions, sqlx::Error> {
        let cell = self
            .definitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(team_id)
            .or_default()
            .clone();
        // A failed load leaves the cell empty: the next event tries again.
        cell.get_or_try_init(|| async {
            let (event_names, property_names) = db::events::fetch_definition_names(&self.pool, team_id).await?;
            Ok(Arc::new(Mutex::new(KnownDefinitions {
                event_names: event_names.into_iter().collect(),
                property_names: property_names.into_iter().collect(),
            })))
        })
        .await
        .cloned()
    }

    /// True for the first caller for `team_id` (until [`Self::release_first_event`]).
    fn claim_first_event(&self, team_id: i32) -> bool {
        self.first_event_claims.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(team_id)
    }

    fn release_first_event(&self, team_id: i32) {
        self.first_event_claims.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&team_id);
    }

    /// Records the event name and top-level property keys as definitions (spec 20 §8.4) and, on the
    /// team's first event, sets `ingested_event` and sends the telemetry. The cached team is
    /// marked too and concurrent events leave it to the first, so this happens once rather than for
    /// 30 s or for every event in flight (REF-BUG 10).
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
        // New names are recorded as known before they are inserted, so the events in flight with
        // the same new name leave the insert to this one; a failed insert forgets them again.
        let (new_event, new_properties) = {
            let mut known = known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let new_event = known.event_names.insert(event.to_string());
            let mut new_properties: Vec<(&String, bool)> = Vec::new();
            for (key, value) in properties {
                if known.property_names.insert(key.clone()) {
                    new_properties.push((key, value.is_number()));
                }
            }
            (new_event, new_properties)
        };
        if new_event {
            let inserted = crate::metrics::catalog::postgres(
                "insertEventDefinition",
                db::events::insert_event_definition(&self.pool, new_uuidt(), event, team.id),
            )
            .await;
            if let Err(error) = inserted {
                known.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).event_names.remove(event);
                return Err(error);
            }
        }
        if !new_properties.is_empty() {
            // One statement for all new keys (the reference sends one per key); rows keep the
            // properties' order.
            let ids: Vec<Uuid> = new_properties.iter().map(|_| new_uuidt()).collect();
            let names: Vec<&str> = new_properties.iter().map(|(name, _)| name.as_str()).collect();
            let numerical: Vec<bool> = new_properties.iter().map(|(_, numerical)| *numerical).collect();
            let inserted = crate::metrics::catalog::postgres(
                "insertPropertyDefinition",
                db::events::insert_property_definitions(&self.pool, &ids, &names, &numerical, team.id),
            )
            .await;
            if let Err(error) = inserted {
                let mut known = known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                for name in names {
                    known.property_names.remove(name);
                }
                return Err(error);
            }
        }
        if !team.ingested_event && self.claim_first_event(team.id) {
            if let Err(error) = self.mark_first_event_ingested(&team, properties).await {
                self.release_first_event(team.id);
                return Err(error);
            }
        }
        Ok(())
    }

    async fn mark_first_event_ingested(&self, team: &Team, properties: &Properties) -> Result<(), sqlx::Error> {
        crate::metrics::catalog::postgres("setTeamIngestedEvent", db::teams::set_ingested_event(&self.pool, team.id))
            .await?;
        self.teams.update(&team.id, |cached| cached.ingested_event = true);
        let Some(telemetry) = self.telemetry.get() else {
            return Ok(());
        };
        let members = crate::metrics::catalog::postgres(
            "posthog_organizationmembership",
            db::teams::fetch_member_distinct_ids(&self.pool, team.organization_id),
        )
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
