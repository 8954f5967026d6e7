//! The `ingestEvent` task: everything that happens to an event after the plugins' `processEvent`
//! (spec 20 §1–§9): uuid validation, timestamps, identify/alias/merge, person creation and
//! `$set`/`$set_once`, groups, definitions, session recordings, writing the event, and storing
//! action matches.
//!
//! Owns the *order and rules* of those steps. The statements live in `db` (`db::persons`; teams
//! and definitions behind `teams`, group types behind `groups`), the sinks behind
//! `sinks::EventWriter`; elements come from `elements` and action matching / hooks from whatever
//! implements [`ActionHandler`] (the `actions` room).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{Map, Value};
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use super::action_handler::MatchActionsAndFireHooks;
use super::actions::{ActionMatcher, HookCommander};
use super::elements::{extract_elements, Element};
use super::groups::GroupTypeManager;
use super::person_manager::PersonManager;
use super::properties::{
    apply_person_property_updates, initial_and_utm_entries, is_distinct_id_illegal, merge_objects, object_or_empty,
    parameter_text, sanitize_event_name, Replaced,
};
use super::teams::{FirstEventTelemetry, TeamManager};
use super::timestamp::{handle_timestamp, now_ms, parse_timestamp};
use super::uuidt::new_uuidt;
use crate::db::is_unique_violation;
use crate::db::persons::{self, MergeError, NewPerson, Person, PersonDistinctId, PersonUpdate, PropertyUpdate};
use crate::event::{PluginEvent, Properties};
use crate::hub::Hub;
use crate::infra::batch::{lost_in_batch, Batcher, Unanswered};
use crate::js::is_truthy;
use crate::sinks::writer::{
    EventPayload, EventWriter, GroupPayload, PostgresEventWriter, SessionRecordingPayload, WriteError,
};

/// A merge is retried (re-fetching both persons) until this many attempts failed.
pub const MAX_FAILED_PERSON_MERGE_ATTEMPTS: u32 = 3;

/// Most `$set` / `$set_once` updates applied together (Postgres pipeline).
const MAX_PROPERTY_UPDATE_BATCH: usize = 200;

/// Most person lookups answered by one query (the per-event reads of the ClickHouse pipeline).
const MAX_PERSON_LOOKUP_BATCH: usize = 200;
/// New persons created in one statement at most.
const MAX_PERSON_CREATION_BATCH: usize = 200;

/// Internal events that get no event definition.
const EVENTS_WITHOUT_EVENT_DEFINITION: [&str; 1] = ["$$plugin_metrics"];

/// Why an event could not be ingested. The message is the reference's where it has one.
#[derive(Debug, Error)]
pub enum IngestError {
    #[error("Not a valid UUID: \"{0}\"")]
    InvalidUuid(String),
    #[error("No team found with ID {0}. Can't ingest event.")]
    TeamNotFound(i64),
    #[error("Invalid $elements: expected an array of element objects, got {0}")]
    InvalidElements(String),
    #[error("Could not find person with distinct id \"{distinct_id}\" in team \"{team_id}\" to update properties")]
    PersonNotFoundForUpdate { distinct_id: String, team_id: i32 },
    #[error("Could not find person with distinct id \"{distinct_id}\" in team \"{team_id}\" to identify")]
    PersonNotFoundForIdentify { distinct_id: String, team_id: i32 },
    #[error("{}", database_message(.0))]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// A sink other than Postgres failed (database failures are `Database`).
    #[error(transparent)]
    Sink(crate::sinks::ProduceError),
    /// Ingestion failed for good and the writer stored the event in its dead-letter queue
    /// (`EventWriter::dead_letter` returned `true`): the consumer must not dead-letter it again.
    #[error(transparent)]
    DeadLettered(Box<IngestError>),
    #[error("Action matching failed: {0}")]
    Actions(String),
}

impl IngestError {
    /// Trouble that may pass, so the same event is worth another try: the database connection
    /// (lost, pool exhausted), or a person another server is creating at this instant. Anything
    /// else fails the same way again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            IngestError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)
            ) | IngestError::PersonNotFoundForUpdate { .. }
                | IngestError::PersonNotFoundForIdentify { .. }
        )
    }
}

impl From<WriteError> for IngestError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Database(error) => IngestError::Database(error),
            WriteError::Sink(reason) => IngestError::Sink(reason),
        }
    }
}

/// Postgres' own message for database errors (what the reference reports), else sqlx's text.
fn database_message(error: &sqlx::Error) -> String {
    match error.as_database_error() {
        Some(database_error) => database_error.message().to_string(),
        None => error.to_string(),
    }
}

/// What ingesting one event did.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestOutcome {
    /// A standard event was written; `event_id` is its Postgres id (Postgres pipeline).
    Event { event_id: Option<i64>, matched_action_ids: Vec<i32> },
    /// A `$snapshot` went to session recordings (no action matching).
    SessionRecording,
}

/// Action matching and hooks, implemented by the actions room (`ActionMatcher` + `HookCommander`).
#[async_trait]
pub trait ActionHandler: Send + Sync {
    /// Whether the team has any action; when false the person is not even fetched.
    fn team_has_actions(&self, _team_id: i32) -> bool {
        true
    }

    /// Matches the (ingestion-mutated) event against its team's actions, starts the webhooks /
    /// REST hooks of the matches without waiting for them, and returns the matched action ids in
    /// the order the reference matches them.
    async fn match_and_fire(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
    ) -> Result<Vec<i32>, String>;
}

/// A processed standard event (what `processEvent` returns in the reference).
#[derive(Debug, Clone)]
pub struct ProcessedEvent {
    pub team_id: i32,
    /// The event's elements (from `$elements`), for action matching.
    pub elements: Vec<Element>,
    pub event_id: Option<i64>,
}

/// The worker-side ingestion of events (the reference's `EventsProcessor` + `ingestEvent`).
pub struct EventsProcessor {
    pool: PgPool,
    writer: Arc<dyn EventWriter>,
    teams: Arc<TeamManager>,
    persons: PersonManager,
    group_types: GroupTypeManager,
    actions: Option<Arc<dyn ActionHandler>>,
    slow_warning_after: Duration,
    /// Concurrent events' `$set`/`$set_once` share statements and one commit (Postgres pipeline).
    property_updates: Batcher<PropertyUpdate, Result<bool, sqlx::Error>>,
    /// Concurrent events' person reads share one query.
    person_lookups: Batcher<(i32, String), Result<Option<Person>, sqlx::Error>>,
    /// Concurrent events' new persons share one statement.
    person_creations: Batcher<NewPerson, Result<Option<(Person, PersonDistinctId)>, sqlx::Error>>,
}

impl EventsProcessor {
    /// A processor on the hub's Postgres with the given writer (Postgres or ClickHouse pipeline).
    pub fn new(hub: &Hub, writer: Arc<dyn EventWriter>) -> Self {
        EventsProcessor::from_parts(
            hub.postgres.clone(),
            writer,
            hub.config.DISTINCT_ID_LRU_SIZE,
            hub.config.task_timeout(),
        )
    }

    /// A processor for the Postgres pipeline (`KAFKA_ENABLED=false`).
    pub fn postgres(hub: &Hub) -> Self {
        EventsProcessor::new(hub, Arc::new(PostgresEventWriter::new(hub.postgres.clone())))
    }

    /// A processor from its parts (tests, benches).
    pub fn from_parts(
        pool: PgPool,
        writer: Arc<dyn EventWriter>,
        distinct_id_lru_size: usize,
        slow_warning_after: Duration,
    ) -> Self {
        EventsProcessor {
            teams: Arc::new(TeamManager::new(pool.clone(), None)),
            persons: PersonManager::new(distinct_id_lru_size),
            group_types: GroupTypeManager::new(pool.clone()),
            property_updates: Batcher::new(MAX_PROPERTY_UPDATE_BATCH, {
                let pool = pool.clone();
                move |updates| {
                    batch_or_each(pool.clone(), updates, |pool, updates| {
                        Box::pin(persons::apply_property_updates(pool, updates))
                    })
                }
            }),
            person_lookups: Batcher::new(MAX_PERSON_LOOKUP_BATCH, {
                let pool = pool.clone();
                move |keys| {
                    batch_or_each(pool.clone(), keys, |pool, keys| {
                        Box::pin(persons::fetch_persons_by_distinct_id(pool, keys))
                    })
                }
            }),
            person_creations: Batcher::new(MAX_PERSON_CREATION_BATCH, {
                let pool = pool.clone();
                move |persons| {
                    batch_or_each(pool.clone(), persons, |pool, persons| {
                        Box::pin(persons::create_persons_unless_distinct_ids_exist(pool, persons))
                    })
                }
            }),
            pool,
            writer,
            actions: None,
            slow_warning_after,
        }
    }

    /// Matches actions and fires hooks for every ingested standard event.
    pub fn with_actions(mut self, actions: Arc<dyn ActionHandler>) -> Self {
        self.actions = Some(actions);
        self
    }

    /// Matches actions with the actions room's matcher and fires its hooks (the usual wiring).
    pub fn with_action_matching(self, matcher: Arc<ActionMatcher>, hooks: Arc<HookCommander>) -> Self {
        let handler = MatchActionsAndFireHooks::new(matcher, hooks, self.teams.clone());
        self.with_actions(Arc::new(handler))
    }

    /// Sends "first team event ingested" telemetry through `telemetry`.
    pub fn with_telemetry(self, telemetry: Arc<dyn FirstEventTelemetry>) -> Self {
        self.teams.set_telemetry(telemetry);
        self
    }

    /// The cached team / organization lookups (hooks use them too).
    pub fn team_manager(&self) -> &Arc<TeamManager> {
        &self.teams
    }

    /// The group type mapping (with its cache).
    pub fn group_type_manager(&self) -> &GroupTypeManager {
        &self.group_types
    }

    /// The reference's `ingestEvent` task. On failure the event (as mutated so far) is offered to
    /// the writer's dead-letter queue and the error is returned for the caller to log and count.
    /// A transient failure is not dead-lettered: the caller retries it, and dead-letters it
    /// itself if it never succeeds (else a later success would leave a record of a failure).
    pub async fn ingest_event(&self, mut event: PluginEvent) -> Result<IngestOutcome, IngestError> {
        let uuid_for_logs = event.uuid.clone().unwrap_or_default();
        // Boxed: unboxed, this future held the ingestion's state twice (as the local and inside
        // `warn_if_slow`'s future), 8.2 KB per event in flight instead of 1.6 KB + the 3.2 KB box.
        let work = Box::pin(self.ingest_event_inner(&mut event));
        let result = warn_if_slow(work, self.slow_warning_after, &uuid_for_logs).await;
        if let Err(error) = &result {
            tracing::info!(event = %event.event, uuid = ?event.uuid, %error, "🔔 ingestEvent failed");
            if error.is_transient() {
                return result;
            }
            match self.writer.dead_letter(&event, &error.to_string()).await {
                Ok(true) => {
                    crate::metrics::catalog::event_dead_lettered();
                    return result.map_err(|error| IngestError::DeadLettered(Box::new(error)));
                }
                Ok(false) => {}
                Err(dead_letter_error) => tracing::info!(
                    event = %event.event,
                    error = %dead_letter_error,
                    "🔔 Errored trying to add event to dead letter queue"
                ),
            }
        }
        result
    }

    async fn ingest_event_inner(&self, event: &mut PluginEvent) -> Result<IngestOutcome, IngestError> {
        let Some(processed) = self.process_event(event).await? else {
            return Ok(IngestOutcome::SessionRecording);
        };
        let mut matched_action_ids = Vec::new();
        if let Some(actions) = &self.actions {
            let team_id = processed.team_id;
            let matching = Instant::now();
            if actions.team_has_actions(team_id) {
                let person = self.fetch_person_batched(team_id, &event.distinct_id).await?;
                matched_action_ids = actions
                    .match_and_fire(event, person.as_ref(), &processed.elements)
                    .await
                    .map_err(IngestError::Actions)?;
            }
            // As the reference: timed and counted for every matched standard event, 0 included.
            crate::metrics::catalog::action_matching(matching.elapsed(), matched_action_ids.len());
        }
        if let (Some(event_id), false) = (processed.event_id, matched_action_ids.is_empty()) {
            self.writer.register_action_matches(event_id, &matched_action_ids).await?;
        }
        Ok(IngestOutcome::Event { event_id: processed.event_id, matched_action_ids })
    }

    /// The reference's `processEvent`: everything but action matching. `event.properties` is
    /// mutated as the reference mutates it (merged `$set`/`$set_once`, `$ip`, no `$elements`);
    /// returns `None` for `$snapshot` events.
    pub async fn process_event(&self, event: &mut PluginEvent) -> Result<Option<ProcessedEvent>, IngestError> {
        let uuid = validate_uuid(event.uuid.as_deref())?;
        let had_properties = event.properties.is_some();
        let mut properties = event.properties.take().unwrap_or_default();
        let result = self.process_with_properties(event, uuid, &mut properties).await;
        // Without properties the reference works on a fresh object the event never sees.
        if had_properties {
            event.properties = Some(properties);
        }
        result
    }

    async fn process_with_properties(
        &self,
        event: &PluginEvent,
        uuid: Uuid,
        properties: &mut Properties,
    ) -> Result<Option<ProcessedEvent>, IngestError> {
        let single_save = Instant::now();
        let team_id = i32::try_from(event.team_id).map_err(|_| IngestError::TeamNotFound(event.team_id))?;
        let now = parse_timestamp(&event.now).unwrap_or_else(now_ms);
        let sent_at = event.sent_at.as_deref().and_then(parse_timestamp);
        if let Some(set) = &event.set {
            let merged = merge_objects(properties.get("$set"), set);
            properties.insert("$set".to_string(), merged);
        }
        if let Some(set_once) = &event.set_once {
            let merged = merge_objects(properties.get("$set_once"), set_once);
            properties.insert("$set_once".to_string(), merged);
        }
        let person_uuid = new_uuidt();
        let timestamp = handle_timestamp(event.timestamp.as_ref(), event.offset.as_ref(), now, sent_at);

        if let Err(error) = self.handle_identify_or_alias(&event.event, properties, &event.distinct_id, team_id).await {
            // As the reference: identify/alias failures never fail the event.
            tracing::error!(%error, distinct_id = %event.distinct_id, team_id, "handleIdentifyOrAlias failed");
        }

        if event.event == "$snapshot" {
            self.create_session_recording(uuid, team_id, &event.distinct_id, properties, timestamp, person_uuid)
                .await?;
            crate::metrics::catalog::single_save(true, event.team_id, single_save);
            return Ok(None);
        }
        let capture = Capture {
            uuid,
            person_uuid,
            ip: event.ip.as_ref(),
            team_id,
            distinct_id: &event.distinct_id,
            timestamp,
            sent_at,
        };
        let processed = self.capture(capture, &event.event, properties).await?;
        crate::metrics::catalog::single_save(false, event.team_id, single_save);
        Ok(Some(processed))
    }

    async fn capture(
        &self,
        capture: Capture<'_>,
        event_name: &str,
        properties: &mut Properties,
    ) -> Result<ProcessedEvent, IngestError> {
        let event_name = sanitize_event_name(event_name);
        let elements = take_elements(properties)?;
        let team =
            self.teams.fetch_team(capture.team_id).await?.ok_or(IngestError::TeamNotFound(capture.team_id.into()))?;

        // `if (ip && …)`: any truthy value, stored as sent.
        if let Some(ip) = capture.ip.filter(|ip| is_truthy(ip)) {
            if !team.anonymize_ips && !properties.contains_key("$ip") {
                properties.insert("$ip".to_string(), ip.clone());
            }
        }
        if !EVENTS_WITHOUT_EVENT_DEFINITION.contains(&event_name.as_str()) {
            self.teams.update_event_names_and_properties(capture.team_id, &event_name, properties).await?;
        }
        let person_created_at = capture.sent_at.unwrap_or_else(now_ms);
        self.create_person_if_distinct_id_is_new(
            capture.team_id,
            capture.distinct_id,
            person_created_at,
            capture.person_uuid,
        )
        .await?;

        // The row's properties are the reference's copy (`personInitialAndUTMProperties`, then
        // `addGroupProperties`): `properties` itself with those entries set while the row is
        // written, put back for the event afterwards, whatever happened in between.
        let mut replaced = Replaced::default();
        for (key, value) in initial_and_utm_entries(properties) {
            replaced.set(properties, key, value);
        }
        let processed = self.write_row(capture, event_name, elements, properties, &mut replaced).await;
        replaced.restore(properties);
        processed
    }

    /// [`Self::capture`] from the row's properties on: groups, person properties, the row.
    async fn write_row(
        &self,
        capture: Capture<'_>,
        event_name: String,
        elements: Vec<Element>,
        properties: &mut Properties,
        replaced: &mut Replaced,
    ) -> Result<ProcessedEvent, IngestError> {
        for (key, value) in self.group_types.group_entries(capture.team_id, properties).await? {
            replaced.set(properties, key, value);
        }
        if event_name == "$groupidentify" {
            self.upsert_group(capture.team_id, properties).await?;
        } else {
            let set = properties.get("$set");
            let set_once = properties.get("$set_once");
            if set.is_some_and(is_truthy) || set_once.is_some_and(is_truthy) {
                let (set, set_once) = (object_or_empty(set), object_or_empty(set_once));
                self.update_person_properties(capture.team_id, capture.distinct_id, set, set_once).await?;
            }
        }

        let payload = EventPayload {
            uuid: capture.uuid,
            event: event_name,
            properties: std::mem::take(properties),
            timestamp: capture.timestamp,
            team_id: capture.team_id,
            distinct_id: capture.distinct_id.to_string(),
            created_at: now_ms(),
            elements,
        };
        let written = self.writer.write_event(&payload).await;
        let EventPayload { properties: row_properties, team_id, elements, .. } = payload;
        *properties = row_properties;
        Ok(ProcessedEvent { team_id, elements, event_id: written? })
    }

    async fn create_session_recording(
        &self,
        uuid: Uuid,
        team_id: i32,
        distinct_id: &str,
        properties: &Properties,
        timestamp: DateTime<Utc>,
        person_uuid: Uuid,
    ) -> Result<(), IngestError> {
        self.create_person_if_distinct_id_is_new(team_id, distinct_id, now_ms(), person_uuid).await?;
        let recording = SessionRecordingPayload {
            uuid,
            team_id,
            distinct_id: distinct_id.to_string(),
            session_id: properties.get("$session_id").filter(|value| !value.is_null()).map(parameter_text),
            snapshot_data: properties.get("$snapshot_data").cloned(),
            timestamp,
        };
        self.writer.write_session_recording(&recording).await?;
        Ok(())
    }

    async fn create_person_if_distinct_id_is_new(
        &self,
        team_id: i32,
        distinct_id: &str,
        created_at: DateTime<Utc>,
        person_uuid: Uuid,
    ) -> Result<(), IngestError> {
        if !self.persons.first_sighting(team_id, distinct_id) {
            return Ok(());
        }
        let person = NewPerson {
            created_at,
            properties: Map::new(),
            team_id,
            is_identified: false,
            uuid: person_uuid,
            distinct_id: distinct_id.to_string(),
        };
        let created = match self.person_creations.submit(person.clone()).await {
            Ok(created) => created,
            // The batching task is gone (shutting down), or its answer: on its own (creating a
            // person only where the distinct id is still new, so a second try is harmless).
            Err(_) => persons::create_persons_unless_distinct_ids_exist(&self.pool, std::slice::from_ref(&person))
                .await
                .map(|created| created.into_iter().next().flatten()),
        };
        match created {
            Ok(Some((person, distinct_id))) => self.writer.person_created(&person, &[distinct_id]).await?,
            Ok(None) => {}
            // Someone created this distinct id between the check and the insert.
            Err(error) if is_unique_violation(&error) => {}
            Err(error) => {
                tracing::error!(error = %database_message(&error), team_id, distinct_id, "Failed to create person");
            }
        }
        Ok(())
    }

    async fn update_person_properties(
        &self,
        team_id: i32,
        distinct_id: &str,
        set: Properties,
        set_once: Properties,
    ) -> Result<(), IngestError> {
        let not_found = || IngestError::PersonNotFoundForUpdate { distinct_id: distinct_id.to_string(), team_id };
        if !self.writer.is_clickhouse_pipeline() {
            let update = PropertyUpdate { team_id, distinct_id: distinct_id.to_string(), set, set_once };
            let applied = match self.property_updates.submit(update).await {
                Ok(result) => result?,
                // The batching task is gone (shutting down): on its own.
                Err(Unanswered::NotTaken(update)) => {
                    persons::apply_property_updates(&self.pool, &[update]).await?.first().copied().unwrap_or(false)
                }
                Err(Unanswered::Lost) => return Err(lost_in_batch().into()),
            };
            return if applied { Ok(()) } else { Err(not_found()) };
        }
        // ClickHouse pipeline: each event announces the person as it is after its own update.
        let person = self.fetch_person_batched(team_id, distinct_id).await?.ok_or_else(not_found)?;
        match apply_person_property_updates(&person.properties, &set, &set_once) {
            Some(properties) => {
                let update = PersonUpdate { properties: Some(properties), ..PersonUpdate::default() };
                self.update_person(&person, update).await
            }
            // The reference re-emits the person even when nothing changed, and first rewrites the
            // row with the same values. That rewrite changes nothing anyone can read (the row has
            // no version column), so it is skipped: only the message goes out.
            None => Ok(self.writer.person_updated(&person).await?),
        }
    }

    /// [`persons::fetch_person`] through the lookup batcher: one query serves the events that
    /// ask at the same time. Only for reads that need not see a write this event has not made
    /// (identify/alias read directly).
    async fn fetch_person_batched(&self, team_id: i32, distinct_id: &str) -> Result<Option<Person>, sqlx::Error> {
        match self.person_lookups.submit((team_id, distinct_id.to_string())).await {
            Ok(result) => result,
            // The batching task is gone (shutting down), or its answer: read on its own.
            Err(_) => persons::fetch_person(&self.pool, team_id, distinct_id).await,
        }
    }

    async fn update_person(&self, person: &Person, update: PersonUpdate) -> Result<(), IngestError> {
        let mut connection = self.pool.acquire().await?;
        let updated =
            crate::metrics::catalog::postgres("updatePerson", persons::update_person(&mut connection, person, &update))
                .await?;
        drop(connection);
        self.writer.person_updated(&updated).await?;
        Ok(())
    }

    async fn upsert_group(&self, team_id: i32, properties: &Properties) -> Result<(), IngestError> {
        let (Some(group_type), Some(group_key)) = (properties.get("$group_type"), properties.get("$group_key")) else {
            return Ok(());
        };
        if !is_truthy(group_type) || !is_truthy(group_key) {
            return Ok(());
        }
        let Some(group_type_index) =
            self.group_types.fetch_group_type_index(team_id, &parameter_text(group_type)).await?
        else {
            return Ok(());
        };
        let group = GroupPayload {
            team_id,
            group_type_index,
            group_key: parameter_text(group_key),
            group_properties: object_or_empty(properties.get("$group_set")),
            created_at: now_ms(),
        };
        self.writer.group_identified(&group).await?;
        Ok(())
    }

    async fn handle_identify_or_alias(
        &self,
        event_name: &str,
        properties: &Properties,
        distinct_id: &str,
        team_id: i32,
    ) -> Result<(), IngestError> {
        if is_distinct_id_illegal(distinct_id) {
            crate::metrics::catalog::illegal_distinct_id(distinct_id);
            return Ok(());
        }
        match event_name {
            "$create_alias" => match properties.get("alias") {
                // Without an alias the reference's inserts fail and it gives up silently.
                None | Some(Value::Null) => Ok(()),
                Some(alias) => {
                    self.alias(parameter_text(alias), distinct_id.to_string(), team_id, false, true, 0).await
                }
            },
            "$identify" => match properties.get("$anon_distinct_id") {
                Some(anon_distinct_id) if is_truthy(anon_distinct_id) => {
                    self.alias(parameter_text(anon_distinct_id), distinct_id.to_string(), team_id, true, true, 0).await
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Links `previous` and `current` (spec 20 §5.2): add the missing distinct id to the existing
    /// person, create a person for both, or merge two persons.
    fn alias(
        &self,
        previous: String,
        current: String,
        team_id: i32,
        should_identify: bool,
        retry_if_failed: bool,
        merge_attempts: u32,
    ) -> BoxFuture<'_, Result<(), IngestError>> {
        async move {
            // posthog-js-lite aliases a person to itself when updating properties.
            if previous == current {
                return Ok(());
            }
            let old_person = persons::fetch_person(&self.pool, team_id, &previous).await?;
            let new_person = persons::fetch_person(&self.pool, team_id, &current).await?;
            let retry = || self.alias(previous.clone(), current.clone(), team_id, should_identify, false, 0);
            // Whether `current`'s person is known to be identified already, sparing the final lookup.
            let mut identified = false;
            match (&old_person, &new_person) {
                // Adding the missing distinct id and marking the person identified share one
                // transaction (the reference uses two statements on separate connections).
                (Some(person), None) | (None, Some(person)) => {
                    let missing = if old_person.is_some() { &current } else { &previous };
                    match self.add_distinct_id(person, missing, should_identify).await {
                        Ok(()) => identified = should_identify,
                        // Someone added it meanwhile: look again (merging if needed), once.
                        Err(_) if retry_if_failed => retry().await?,
                        // As the reference: a second failure is swallowed.
                        Err(error) => tracing::warn!(%error, "adding a distinct id failed twice"),
                    }
                }
                (None, None) => {
                    let created = persons::create_person(
                        &self.pool,
                        now_ms(),
                        &Map::new(),
                        team_id,
                        should_identify,
                        new_uuidt(),
                        &[current.as_str(), previous.as_str()],
                    )
                    .await;
                    match created {
                        Ok((person, distinct_ids)) => {
                            self.writer.person_created(&person, &distinct_ids).await?;
                            identified = should_identify;
                        }
                        // Another event created one of them meanwhile: one of the others applies now.
                        Err(_) if retry_if_failed => retry().await?,
                        Err(error) => {
                            tracing::warn!(error = %database_message(&error), "creating an aliased person failed twice")
                        }
                    }
                }
                (Some(old_person), Some(new_person)) if old_person.id != new_person.id => {
                    // `$create_alias` merges anything; `$identify` never merges an identified person away.
                    if should_identify && old_person.is_identified {
                        tracing::warn!("🤔 refused to merge an already identified user via an $identify call");
                    } else {
                        self.merge_people_attempt(
                            new_person,
                            &current,
                            old_person,
                            &previous,
                            merge_attempts,
                            should_identify,
                        )
                        .await?;
                    }
                }
                _ => {}
            }
            if should_identify && !identified {
                self.set_is_identified(team_id, &current).await?;
            }
            Ok(())
        }
        .boxed()
    }

    /// Adds `distinct_id` to the person and, with `identify`, marks it identified (one transaction).
    async fn add_distinct_id(&self, person: &Person, distinct_id: &str, identify: bool) -> Result<(), IngestError> {
        let (row, identified) = persons::add_distinct_id(&self.pool, person, distinct_id, identify).await?;
        self.writer.distinct_id_added(person, &row).await?;
        if let Some(identified) = identified {
            self.writer.person_updated(&identified).await?;
        }
        Ok(())
    }

    async fn set_is_identified(&self, team_id: i32, distinct_id: &str) -> Result<(), IngestError> {
        let person = persons::fetch_person(&self.pool, team_id, distinct_id)
            .await?
            .ok_or_else(|| IngestError::PersonNotFoundForIdentify { distinct_id: distinct_id.to_string(), team_id })?;
        if !person.is_identified {
            self.update_person(&person, PersonUpdate { is_identified: Some(true), ..PersonUpdate::default() }).await?;
        }
        Ok(())
    }

    /// Merges `other` into `into` (spec 20 §5.3): properties of `into` win, the earliest
    /// `created_at` is kept, distinct ids and cohort memberships move, `other` is deleted.
    pub async fn merge_people(
        &self,
        into: &Person,
        into_distinct_id: &str,
        other: &Person,
        other_distinct_id: &str,
    ) -> Result<(), IngestError> {
        self.merge_people_attempt(into, into_distinct_id, other, other_distinct_id, 0, true).await
    }

    async fn merge_people_attempt(
        &self,
        into: &Person,
        into_distinct_id: &str,
        other: &Person,
        other_distinct_id: &str,
        failed_attempts: u32,
        should_identify: bool,
    ) -> Result<(), IngestError> {
        let mut properties = other.properties.clone();
        for (key, value) in &into.properties {
            properties.insert(key.clone(), value.clone());
        }
        let update = PersonUpdate {
            created_at: Some(into.created_at.min(other.created_at)),
            properties: Some(properties),
            is_identified: Some(into.is_identified || other.is_identified),
        };
        match persons::merge_people(&self.pool, into, other, &update).await {
            Ok(result) => {
                self.writer.people_merged(&result.merged, &result.moved, other).await?;
                Ok(())
            }
            Err(error) => {
                // A concurrent change to either person: look both up again and retry, a bounded
                // number of times (the whole merge is one transaction, so nothing half-happened).
                let failed_attempts = failed_attempts + 1;
                tracing::warn!(%error, failed_attempts, "person merge failed");
                if failed_attempts >= MAX_FAILED_PERSON_MERGE_ATTEMPTS {
                    return Err(error.into());
                }
                self.alias(
                    other_distinct_id.to_string(),
                    into_distinct_id.to_string(),
                    into.team_id,
                    should_identify,
                    false,
                    failed_attempts,
                )
                .await
            }
        }
    }
}

/// Runs a batched statement over `items` (one result per item, in order); when that fails, one
/// item at a time so each gets its own error. A missing result reads as `R::default()`.
async fn batch_or_each<T, R: Default>(
    pool: PgPool,
    items: Vec<T>,
    run: impl for<'a> Fn(&'a PgPool, &'a [T]) -> BoxFuture<'a, Result<Vec<R>, sqlx::Error>>,
) -> Vec<Result<R, sqlx::Error>> {
    if items.len() > 1 {
        if let Ok(results) = run(&pool, &items).await {
            return results.into_iter().map(Ok).collect();
        }
    }
    let mut results = Vec::with_capacity(items.len());
    for item in &items {
        let result = run(&pool, std::slice::from_ref(item)).await;
        results.push(result.map(|found| found.into_iter().next().unwrap_or_default()));
    }
    results
}

/// The per-event values `capture` needs besides the name and properties.
struct Capture<'a> {
    uuid: Uuid,
    person_uuid: Uuid,
    ip: Option<&'a Value>,
    team_id: i32,
    distinct_id: &'a str,
    timestamp: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

/// Removes a non-empty `$elements` array from the properties and converts it. An empty array
/// stays (as in the reference); a string cannot be elements (the reference crashes on it).
fn take_elements(properties: &mut Properties) -> Result<Vec<Element>, IngestError> {
    match properties.get("$elements") {
        Some(Value::Array(raw)) if !raw.is_empty() => {
            let raw = match properties.remove("$elements") {
                Some(Value::Array(raw)) => raw,
                _ => Vec::new(),
            };
            Ok(extract_elements(&raw))
        }
        Some(Value::String(text)) if !text.is_empty() => {
            Err(IngestError::InvalidElements(format!("a string of {} characters", text.chars().count())))
        }
        _ => Ok(Vec::new()),
    }
}

/// The event's uuid if it is a hyphenated hex uuid (any case); the error renders the value the way
/// the reference's template string does (`undefined` when absent).
pub fn validate_uuid(uuid: Option<&str>) -> Result<Uuid, IngestError> {
    let Some(text) = uuid else {
        return Err(IngestError::InvalidUuid("undefined".to_string()));
    };
    let well_formed = text.len() == 36
        && text.char_indices().all(|(index, character)| match index {
            8 | 13 | 18 | 23 => character == '-',
            _ => character.is_ascii_hexdigit(),
        });
    match (well_formed, Uuid::parse_str(text)) {
        (true, Ok(parsed)) => Ok(parsed),
        _ => Err(IngestError::InvalidUuid(text.to_string())),
    }
}

/// Runs `work`, logging a warning (never aborting) when it takes longer than `after`.
async fn warn_if_slow<T>(work: impl std::future::Future<Output = T>, after: Duration, uuid: &str) -> T {
    tokio::pin!(work);
    tokio::select! {
        output = &mut work => output,
        _ = tokio::time::sleep(after) => {
            tracing::warn!(uuid, "Still ingesting event inside worker. Timeout warning after {} sec!", after.as_secs());
            work.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ingest_event` boxes its work: unboxed, its future held the ingestion's state twice (as the
    /// local and inside `warn_if_slow`'s future), and every event in flight carried both.
    #[tokio::test]
    async fn the_ingestion_future_holds_its_work_boxed() {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1/none").unwrap();
        let writer: Arc<dyn EventWriter> = Arc::new(crate::sinks::writer::PostgresEventWriter::new(pool.clone()));
        let processor = EventsProcessor::from_parts(pool, writer, 100, Duration::from_secs(1));
        let event: PluginEvent =
            serde_json::from_value(serde_json::json!({"distinct_id": "a", "team_id": 2, "event": "x"})).unwrap();
        let mut copy = event.clone();
        let outer = std::mem::size_of_val(&processor.ingest_event(event));
        let inner = std::mem::size_of_val(&processor.ingest_event_inner(&mut copy));
        assert!(outer < inner, "ingest_event's future is {outer} bytes, its work's {inner}");
    }

    #[test]
    fn uuid_validation() {
        assert!(validate_uuid(Some("99aBcDeF-1234-4321-0000-dcba87654321")).is_ok());
        let message = |value: Option<&str>| validate_uuid(value).unwrap_err().to_string();
        assert_eq!(message(None), "Not a valid UUID: \"undefined\"");
        assert_eq!(message(Some("this is not an uuid")), "Not a valid UUID: \"this is not an uuid\"");
        assert_eq!(
            message(Some("99abcdef123443210000dcba87654321")),
            "Not a valid UUID: \"99abcdef123443210000dcba87654321\""
        );
        assert!(validate_uuid(Some(" 99abcdef-1234-4321-0000-dcba87654321")).is_err());
    }
}
