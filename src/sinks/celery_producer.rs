//! Celery tasks sent over Redis (`LPUSH`), in the reference's exact bytes (10 §1.2–1.5): plugins'
//! `posthog.capture` in the Postgres pipeline. Decoding what arrives is `sources::celery`'s.

use base64::Engine;
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::sources::celery::PROCESS_EVENT_TASK;

/// The list item for a task, byte for byte what the reference's Celery client (protocol 2) pushes:
/// `{"body","content-type","content-encoding","headers":{lang,task,id},"properties":{body_encoding,
/// delivery_info,delivery_mode,delivery_tag,correlationId,replyTo}}`, compact JSON.
pub fn encode_task_message(
    queue: &str,
    task: &str,
    task_id: &str,
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> String {
    let body = json!([args, kwargs, {}]).to_string();
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.as_bytes()),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"lang": "js", "task": task, "id": task_id},
        "properties": {
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "delivery_mode": 2,
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
            "correlationId": task_id,
            "replyTo": "",
        },
    })
    .to_string()
}

#[derive(Debug, Error)]
#[error("Celery send to {queue} failed: {reason}")]
pub struct SendError {
    pub queue: String,
    pub reason: String,
}

/// Sends Celery tasks to a queue (`LPUSH`), as the reference's Celery client does.
#[derive(Clone)]
pub struct CeleryProducer {
    redis: deadpool_redis::Pool,
    queue: String,
}

impl CeleryProducer {
    /// A producer for `queue` (plugins' `posthog.capture` uses `PLUGINS_CELERY_QUEUE`).
    pub fn new(redis: deadpool_redis::Pool, queue: impl Into<String>) -> CeleryProducer {
        CeleryProducer { redis, queue: queue.into() }
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Sends a task with a new random (v4) task id, which it returns.
    pub async fn send_task(
        &self,
        task: &str,
        args: &[Value],
        kwargs: &Map<String, Value>,
    ) -> Result<String, SendError> {
        let task_id = uuid::Uuid::new_v4().to_string();
        let message = encode_task_message(&self.queue, task, &task_id, args, kwargs);
        let error = |reason: String| SendError { queue: self.queue.clone(), reason };
        let mut connection = self.redis.get().await.map_err(|failure| error(failure.to_string()))?;
        redis::cmd("LPUSH")
            .arg(&self.queue)
            .arg(message)
            .query_async::<i64>(&mut connection)
            .await
            .map_err(|failure| error(failure.to_string()))?;
        Ok(task_id)
    }

    /// `posthog.capture` in the Postgres pipeline: `process_event_with_plugins` with args
    /// `[data.distinct_id, null, null, data, team_id, data.timestamp, data.timestamp]`, where `data`
    /// is the capture payload `{distinct_id, event, timestamp, properties, team_id, uuid}`.
    pub async fn send_capture(&self, data: &Map<String, Value>, team_id: i64) -> Result<String, SendError> {
        let field = |key: &str| data.get(key).cloned().unwrap_or(Value::Null);
        let args = [
            field("distinct_id"),
            Value::Null,
            Value::Null,
            Value::Object(data.clone()),
            json!(team_id),
            field("timestamp"),
            field("timestamp"),
        ];
        self.send_task(PROCESS_EVENT_TASK, &args, &Map::new()).await
    }
}
