//! What plugins send out, delivered into the sinks: `posthog.capture` (a Celery task in the Postgres
//! pipeline, a raw event message in the Kafka pipeline) and plugin log entries in the Kafka pipeline.

use std::sync::Arc;

use async_trait::async_trait;

use crate::plugins::extensions::posthog::CapturedEvent;
use crate::plugins::extensions::{CaptureSink, SinkError};
use crate::plugins::log_entries::{PluginLogEntry, PluginLogSink};
use crate::sinks::celery_producer::CeleryProducer;
use crate::sinks::kafka_producer::{KafkaProducerWrapper, KafkaRecord};
use crate::sinks::topics::KAFKA_PLUGIN_LOG_ENTRIES;

/// `posthog.capture` in the Postgres pipeline: a Celery task on `PLUGINS_CELERY_QUEUE`.
pub struct CeleryCapture(pub Arc<CeleryProducer>);

#[async_trait]
impl CaptureSink for CeleryCapture {
    async fn capture(&self, event: CapturedEvent) -> Result<(), SinkError> {
        let data = event.data.as_object().cloned().unwrap_or_default();
        self.0.send_capture(&data, event.team_id).await.map(|_| ()).map_err(|error| SinkError(error.into()))
    }
}

/// `posthog.capture` in the Kafka pipeline: the raw event on `KAFKA_CONSUMPTION_TOPIC`, keyed
/// by its uuid, as the reference produces it.
pub struct KafkaCapture {
    pub producer: Arc<KafkaProducerWrapper>,
    pub topic: String,
}

#[async_trait]
impl CaptureSink for KafkaCapture {
    async fn capture(&self, event: CapturedEvent) -> Result<(), SinkError> {
        let value = event.raw_event_message().to_string().into_bytes();
        let record = KafkaRecord::single(&self.topic, Some(event.uuid().to_string()), value);
        self.producer.queue_message(record).await.map_err(|error| SinkError(error.into()))
    }
}

/// Plugin log entries in the Kafka pipeline: the `plugin_log_entries` topic.
pub struct KafkaLogSink(pub Arc<KafkaProducerWrapper>);

#[async_trait]
impl PluginLogSink for KafkaLogSink {
    async fn queue(&self, entry: PluginLogEntry) {
        let value = entry.to_kafka_json().to_string().into_bytes();
        let record = KafkaRecord::single(KAFKA_PLUGIN_LOG_ENTRIES, Some(entry.id.to_string()), value);
        if let Err(error) = self.0.queue_message(record).await {
            tracing::warn!("🔴 Could not produce a plugin log entry: {error}");
        }
    }

    async fn flush(&self) {
        if let Err(error) = self.0.flush().await {
            tracing::warn!("🔴 Could not flush plugin log entries: {error}");
        }
    }
}
