//! Ingestion: the processing rules applied to each event once the plugins have run (persons,
//! identify/alias, groups, elements, definitions, timestamps, actions and hooks). Events arrive
//! from `sources`; what ingestion writes goes through `sinks::EventWriter`.

pub mod actions;
pub mod elements;

pub mod action_handler;
pub mod groups;
pub mod person_manager;
pub mod persons;
pub mod process_event;
pub mod properties;
pub mod teams;
pub mod timestamp;
pub mod uuidt;

pub use action_handler::MatchActionsAndFireHooks;
pub use process_event::{ActionHandler, EventsProcessor, IngestError, IngestOutcome};
