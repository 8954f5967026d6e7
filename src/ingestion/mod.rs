//! Ingestion: the queues events arrive on (Celery over Redis, Kafka), the pipeline that runs
//! plugins and then processes each event (persons, identify/alias, groups, elements, definitions,
//! timestamps, actions and hooks), and the writers (Postgres, or Kafka for ClickHouse).

pub mod actions;
pub mod elements;
pub mod queues;

pub mod action_handler;
pub mod batch;
pub mod groups;
pub mod person_manager;
pub mod persons;
pub mod process_event;
pub mod properties;
pub mod teams;
pub mod timestamp;
pub mod ttl_cache;
pub mod uuidt;
pub mod writer;

pub use action_handler::MatchActionsAndFireHooks;
pub use process_event::{ActionHandler, EventsProcessor, IngestError, IngestOutcome};
pub use writer::{EventWriter, PostgresEventWriter};
