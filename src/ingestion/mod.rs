//! Ingestion: the queues events arrive on (Celery over Redis, Kafka), the pipeline that runs
//! plugins and then processes each event (persons, identify/alias, groups, elements, definitions,
//! timestamps, actions and hooks), and the writers (Postgres, or Kafka for ClickHouse).

pub mod actions;
pub mod elements;
pub mod queues;
