//! Where events and what comes of them go: the [`EventWriter`] interface with its Postgres
//! implementation (`writer`) and its Kafka one for ClickHouse (`kafka_writer`), the batching Kafka
//! producer, the exact messages it writes and their topics (protobuf events, persons, distinct ids,
//! groups, session recordings, plugin log entries, raw events, dead letters), the Celery producer,
//! and the sinks of what plugins send out (`capture`).

pub mod capture;
pub mod celery_producer;
pub mod kafka_producer;
pub mod kafka_writer;
pub mod messages;
pub mod topics;
pub mod writer;

pub use celery_producer::CeleryProducer;
pub use kafka_producer::{KafkaMessage, KafkaProducerWrapper, KafkaRecord, ProduceError};
pub use kafka_writer::KafkaEventWriter;
pub use writer::{EventWriter, PostgresEventWriter};
