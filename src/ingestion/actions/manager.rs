//! The per-process cache of actions: team id → action id → action with its steps, loaded from
//! Postgres. Full reloads replace the whole map at once; `reload_action` / `drop_action` serve the
//! `reload-action` / `drop-action` pub/sub messages. Readers get a cheap snapshot (`Arc`s), so a
//! reload never blocks matching.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Action, ActionError};
use crate::db;

/// How often the whole cache is reloaded (the reference's 5-minute broadcast).
pub const ACTIONS_RELOAD_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Actions of one team, ascending by id (the order the reference iterates them in).
type TeamActions = BTreeMap<i64, Arc<Action>>;

pub struct ActionManager {
    postgres: PgPool,
    ready: AtomicBool,
    cache: RwLock<HashMap<i64, TeamActions>>,
}

impl ActionManager {
    /// An empty, not yet ready manager; call [`ActionManager::prepare`] before matching.
    pub fn new(postgres: PgPool) -> ActionManager {
        ActionManager { postgres, ready: AtomicBool::new(false), cache: RwLock::new(HashMap::new()) }
    }

    /// Initial load; afterwards the manager is ready.
    pub async fn prepare(&self) -> Result<(), ActionError> {
        self.reload_all().await?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// The team's actions in ascending id order.
    pub fn team_actions(&self, team_id: i64) -> Result<Vec<Arc<Action>>, ActionError> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(ActionError::NotReady);
        }
        let cache = self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(cache.get(&team_id).map(|actions| actions.values().cloned().collect()).unwrap_or_default())
    }

    /// Whether the team has any cached action (false before the initial load), so callers can
    /// skip fetching the person for teams without actions.
    pub fn has_team_actions(&self, team_id: i64) -> bool {
        self.ready.load(Ordering::Acquire)
            && self
                .cache
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(&team_id)
                .is_some_and(|actions| !actions.is_empty())
    }

    /// Replaces the cache with every non-deleted action and its steps.
    pub async fn reload_all(&self) -> Result<(), ActionError> {
        let actions = crate::metrics::catalog::postgres("fetchActions", db::actions::fetch_all_actions(&self.postgres))
            .await
            .map_err(|source| ActionError::Database { context: "fetching actions", source })?;
        let steps = crate::metrics::catalog::postgres("fetchActionSteps", db::actions::fetch_all_steps(&self.postgres))
            .await
            .map_err(|source| ActionError::Database { context: "fetching action steps", source })?;

        let mut by_team: HashMap<i64, BTreeMap<i64, Action>> = HashMap::new();
        for row in actions {
            match row {
                Ok(action) => {
                    by_team.entry(action.team_id).or_default().insert(action.id, action);
                }
                Err(error) => warn!(%error, "🍿 skipping an action row that cannot be read"),
            }
        }
        for row in steps {
            match row {
                Ok((team_id, step)) => {
                    if let Some(action) = by_team.get_mut(&team_id).and_then(|actions| actions.get_mut(&step.action_id))
                    {
                        action.steps.push(step);
                    }
                }
                Err(error) => warn!(%error, "🍿 skipping an action step row that cannot be read"),
            }
        }
        let fresh: HashMap<i64, TeamActions> = by_team
            .into_iter()
            .map(|(team, actions)| (team, actions.into_iter().map(|(id, action)| (id, Arc::new(action))).collect()))
            .collect();
        *self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        info!("🍿 Fetched all actions from DB anew");
        Ok(())
    }

    /// Re-reads one action: replaces it in the cache, or removes it if it is gone or deleted.
    pub async fn reload_action(&self, team_id: i64, action_id: i64) -> Result<(), ActionError> {
        let refetched = self.fetch_action(action_id).await?;
        let mut cache = self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let team_actions = cache.entry(team_id).or_default();
        let was_cached = team_actions.contains_key(&action_id);
        match refetched {
            Some(action) => {
                if was_cached {
                    debug!("🍿 Refetched action ID {action_id} (team ID {team_id}) from DB");
                } else {
                    debug!("🍿 Fetched new action ID {action_id} (team ID {team_id}) from DB");
                }
                team_actions.insert(action_id, Arc::new(action));
            }
            None if was_cached => {
                info!("🍿 Tried to fetch action ID {action_id} (team ID {team_id}) from DB, but it wasn't found in DB, so deleted from cache instead");
                team_actions.remove(&action_id);
            }
            None => {
                info!("🍿 Tried to fetch action ID {action_id} (team ID {team_id}) from DB, but it wasn't found in DB or cache, so did nothing instead");
            }
        }
        Ok(())
    }

    /// Removes one action from the cache.
    pub fn drop_action(&self, team_id: i64, action_id: i64) {
        let mut cache = self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match cache.get_mut(&team_id).and_then(|actions| actions.remove(&action_id)) {
            Some(_) => info!("🍿 Deleted action ID {action_id} (team ID {team_id}) from cache"),
            None => info!("🍿 Tried to delete action ID {action_id} (team ID {team_id}) from cache, but it wasn't found in cache, so did nothing instead"),
        }
    }

    /// Reloads everything every [`ACTIONS_RELOAD_INTERVAL`] until cancelled. A failed reload
    /// keeps the previous cache and is retried at the next tick.
    pub async fn run_periodic_reload(&self, interval: Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {
                    if let Err(error) = self.reload_all().await {
                        warn!(%error, "🍿 periodic reload of actions failed; keeping the cached ones");
                    }
                }
            }
        }
    }

    async fn fetch_action(&self, action_id: i64) -> Result<Option<Action>, ActionError> {
        let row =
            crate::metrics::catalog::postgres("fetchActions", db::actions::fetch_action(&self.postgres, action_id))
                .await
                .map_err(|source| ActionError::Database { context: "fetching an action", source })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut action = row.map_err(|source| ActionError::Database { context: "reading an action", source })?;
        let steps = crate::metrics::catalog::postgres(
            "fetchActionSteps",
            db::actions::fetch_action_steps(&self.postgres, action_id),
        )
        .await
        .map_err(|source| ActionError::Database { context: "fetching action steps", source })?;
        for row in steps {
            match row {
                Ok(step) => action.steps.push(step),
                Err(error) => warn!(%error, action_id, "🍿 skipping an action step row that cannot be read"),
            }
        }
        Ok(Some(action))
    }
}
