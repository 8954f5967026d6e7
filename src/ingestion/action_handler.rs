//! The [`ActionHandler`] over the actions room: match the event with `ActionMatcher`, then hand
//! the matches to `HookCommander` (which fires webhooks / REST hooks on its own task), with the
//! team and organization from ingestion's caches.
//!
//! Owns only this glue; matching and hook rules live in `actions`.

use std::sync::Arc;

use async_trait::async_trait;

use super::actions::{ActionMatcher, HookCommander};
use super::elements::Element;
use super::process_event::ActionHandler;
use super::teams::TeamManager;
use crate::event::PluginEvent;
use crate::model::Person;

pub struct MatchActionsAndFireHooks {
    matcher: Arc<ActionMatcher>,
    hooks: Arc<HookCommander>,
    teams: Arc<TeamManager>,
}

impl MatchActionsAndFireHooks {
    pub fn new(matcher: Arc<ActionMatcher>, hooks: Arc<HookCommander>, teams: Arc<TeamManager>) -> Self {
        MatchActionsAndFireHooks { matcher, hooks, teams }
    }
}

#[async_trait]
impl ActionHandler for MatchActionsAndFireHooks {
    fn team_has_actions(&self, team_id: i32) -> bool {
        // Before the manager is ready, let `match_and_fire` report its error.
        self.matcher.manager().team_actions(team_id.into()).map(|actions| !actions.is_empty()).unwrap_or(true)
    }

    async fn match_and_fire(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
    ) -> Result<Vec<i32>, String> {
        let matches = self.matcher.matches(event, person, elements).await.map_err(|error| error.to_string())?;
        if matches.is_empty() {
            return Ok(Vec::new());
        }
        let team_id = i32::try_from(event.team_id).map_err(|_| format!("invalid team id {}", event.team_id))?;
        // As the reference: without a team no hooks fire.
        if let Some(team) = self.teams.fetch_team(team_id).await.map_err(|error| error.to_string())? {
            let organization =
                self.teams.fetch_organization(team.organization_id).await.map_err(|error| error.to_string())?;
            self.hooks.find_and_fire_hooks(event, person, &event.site_url, &team, organization.as_ref(), &matches);
        }
        matches
            .iter()
            .map(|action| i32::try_from(action.id).map_err(|_| format!("invalid action id {}", action.id)))
            .collect()
    }
}
