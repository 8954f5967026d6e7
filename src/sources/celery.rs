//! Celery messages over Redis: decoding what Python Celery (kombu's Redis transport) and the
//! reference push onto `PLUGINS_CELERY_QUEUE`, and producing messages in the reference's exact
//! bytes (10 §1.2–1.5). The consumer loop is `celery_consumer`.
//!
//! Accepted: the kombu JSON envelope (`body` base64, `content-type` `application/json`,
//! `content-encoding` `utf-8`, `properties.body_encoding` `base64`), task protocol 2 (task name in
//! `headers.task`, body `[args, kwargs, embed]`) and protocol 1 (body `{task, id, args, kwargs}`),
//! and kombu ≥ 5.3's tagged values (`{"__type__": "datetime", "__value__": "…"}` and the other
//! tags), which are replaced by their `__value__` (the reference cannot read them).

use base64::Engine;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use thiserror::Error;
use tracing::debug;

use super::decode::plugin_event_from_fields;
use crate::event::PluginEvent;
use crate::ingestion::uuidt::new_uuidt;

/// The task PostHog sends for every captured event in the Postgres pipeline.
pub const PROCESS_EVENT_TASK: &str = "posthog.tasks.process_event.process_event_with_plugins";
/// The task PostHog sends to start a plugin job from its UI.
pub const PLUGIN_JOB_TASK: &str = "posthog.tasks.plugins.plugin_job";

/// Why a queue item is not a task we can run. The message texts are the reference's.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum DecodeError {
    #[error("queue {queue} item: not a JSON object: {reason}")]
    NotJson { queue: String, reason: String },
    #[error("queue {queue} item: unsupported content type {found}")]
    ContentType { queue: String, found: String },
    #[error("queue {queue} item: unsupported body encoding {found}")]
    BodyEncoding { queue: String, found: String },
    #[error("queue {queue} item: unsupported content encoding {found}")]
    ContentEncoding { queue: String, found: String },
    #[error("queue {queue} item: body is not base64-encoded UTF-8 JSON: {reason}")]
    Body { queue: String, reason: String },
    #[error("queue {queue} item: no task name")]
    NoTaskName { queue: String },
    #[error("Missing process handler for task {0}")]
    MissingHandler(String),
    #[error("task {task}: bad arguments: {reason}")]
    Arguments { task: String, reason: String },
}

/// A decoded task message: name, id, positional args and kwargs.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub task: String,
    pub id: Option<String>,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
}

/// A task the server runs.
#[derive(Debug, Clone, PartialEq)]
pub enum CeleryTask {
    /// `process_event_with_plugins`, merged into the event plugins see.
    ProcessEvent(Box<PluginEvent>),
    /// `plugin_job`, as the job the reference enqueues.
    PluginJob(Value),
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn text_or_type(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(other) => json_type_name(other).to_string(),
        None => "undefined".to_string(),
    }
}

/// Replaces kombu's tagged JSON values (`{"__type__": T, "__value__": V}`) by `V`, everywhere.
/// Datetimes thus become their ISO strings, which is what older Celery sent.
pub fn untag_kombu_values(mut value: Value) -> Value {
    untag_in_place(&mut value);
    value
}

/// [`untag_kombu_values`] without rebuilding the maps and arrays it leaves alone.
fn untag_in_place(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            let tagged = fields.len() == 2 && fields.get("__type__").is_some_and(Value::is_string);
            if tagged {
                if let Some(mut inner) = fields.shift_remove("__value__") {
                    untag_in_place(&mut inner);
                    *value = inner;
                    return;
                }
            }
            fields.values_mut().for_each(untag_in_place);
        }
        Value::Array(items) => items.iter_mut().for_each(untag_in_place),
        _ => {}
    }
}

/// The members `names` of the JSON object `raw` as their JSON text, borrowed from `raw` (`None`
/// where absent); other members are skipped unread. Of a repeated member the last counts, as
/// with `JSON.parse`. An error when `raw` is not a JSON object.
fn members<'a, const N: usize>(
    raw: &'a str,
    names: [&'static str; N],
) -> Result<[Option<&'a RawValue>; N], serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Object<const N: usize>([&'static str; N]);
    struct Key<const N: usize>([&'static str; N]);

    impl<'de, const N: usize> DeserializeSeed<'de> for Key<N> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(self)
        }
    }
    impl<'de, const N: usize> Visitor<'de> for Key<N> {
        type Value = Option<usize>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a member name")
        }
        fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
            Ok(self.0.iter().position(|name| *name == key))
        }
    }
    impl<'de, const N: usize> Visitor<'de> for Object<N> {
        type Value = [Option<&'de RawValue>; N];
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None; N];
            while let Some(key) = map.next_key_seed(Key(self.0))? {
                match key.and_then(|index| found.get_mut(index)) {
                    Some(slot) => *slot = Some(map.next_value::<&'de RawValue>()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(raw);
    let found = deserializer.deserialize_map(Object(names))?;
    deserializer.end()?;
    Ok(found)
}

/// Decodes one Redis list item into its task message, checking the envelope as the reference does.
pub fn decode_envelope(queue: &str, raw: &str) -> Result<TaskMessage, DecodeError> {
    // Each member kept as its JSON text, borrowed from the message, and read only when needed:
    // the headers alone (kombu's `argsrepr` repeats the arguments) are as big as the body.
    let [content_type, properties, content_encoding, body, headers] =
        members(raw, ["content-type", "properties", "content-encoding", "body", "headers"])
            .map_err(|error| DecodeError::NotJson { queue: queue.into(), reason: error.to_string() })?;
    let member = |raw: Option<&RawValue>| raw.and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok());
    let content_type = member(content_type);
    if content_type.as_ref().and_then(Value::as_str) != Some("application/json") {
        return Err(DecodeError::ContentType { queue: queue.into(), found: text_or_type(content_type.as_ref()) });
    }
    let body_encoding =
        member(properties).and_then(|mut properties| properties.get_mut("body_encoding").map(Value::take));
    if body_encoding.as_ref().and_then(Value::as_str) != Some("base64") {
        return Err(DecodeError::BodyEncoding { queue: queue.into(), found: text_or_type(body_encoding.as_ref()) });
    }
    let content_encoding = member(content_encoding);
    if content_encoding.as_ref().and_then(Value::as_str) != Some("utf-8") {
        return Err(DecodeError::ContentEncoding {
            queue: queue.into(),
            found: text_or_type(content_encoding.as_ref()),
        });
    }
    let body_error = |reason: String| DecodeError::Body { queue: queue.into(), reason };
    let body_text = body
        .and_then(|raw| serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()).ok())
        .ok_or_else(|| body_error("missing body".into()))?;
    let body_bytes = base64::engine::general_purpose::STANDARD
        .decode(body_text.trim())
        .map_err(|error| body_error(error.to_string()))?;
    let body: Value = serde_json::from_slice(&body_bytes).map_err(|error| body_error(error.to_string()))?;
    let body = untag_kombu_values(body);
    // Headers that are not an object are no headers.
    let [header_task, header_id] = headers.and_then(|raw| members(raw.get(), ["task", "id"]).ok()).unwrap_or_default();
    let header = |raw: Option<&RawValue>| serde_json::from_str::<Value>(raw?.get()).ok()?.as_str().map(str::to_string);
    let header_task = header(header_task).filter(|task| !task.is_empty());

    let message = match header_task {
        // Protocol 2: `[args, kwargs, embed]`.
        Some(task) => {
            let id = header(header_id);
            let Value::Array(parts) = body else {
                return Err(body_error(format!("protocol 2 body must be an array, got {}", json_type_name(&body))));
            };
            let mut parts = parts.into_iter();
            let (args, kwargs) = (parts.next(), parts.next());
            TaskMessage { task, id, args: as_args(args, &body_error)?, kwargs: as_kwargs(kwargs, &body_error)? }
        }
        // Protocol 1: `{task, id, args, kwargs}`.
        None => {
            let Value::Object(mut fields) = body else {
                return Err(body_error(format!("protocol 1 body must be an object, got {}", json_type_name(&body))));
            };
            let task = match fields.shift_remove("task") {
                Some(Value::String(task)) if !task.is_empty() => task,
                _ => return Err(DecodeError::NoTaskName { queue: queue.into() }),
            };
            let id = fields.shift_remove("id").and_then(|id| id.as_str().map(str::to_string));
            TaskMessage {
                task,
                id,
                args: as_args(fields.shift_remove("args"), &body_error)?,
                kwargs: as_kwargs(fields.shift_remove("kwargs"), &body_error)?,
            }
        }
    };
    // Written out only when debug logs are on (it is a second copy of the event).
    if tracing::enabled!(tracing::Level::DEBUG) {
        let (args, kwargs) = (serde_json::to_string(&message.args), serde_json::to_string(&message.kwargs));
        let task_id = message.id.as_deref().unwrap_or("null");
        debug!(
            "celery.node Received task: {}[{task_id}], args: {}, kwargs: {}",
            message.task,
            args.unwrap_or_default(),
            kwargs.unwrap_or_default()
        );
    }
    Ok(message)
}

fn as_args(value: Option<Value>, error: &dyn Fn(String) -> DecodeError) -> Result<Vec<Value>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(args)) => Ok(args),
        Some(other) => Err(error(format!("args must be an array, got {}", json_type_name(&other)))),
    }
}

fn as_kwargs(value: Option<Value>, error: &dyn Fn(String) -> DecodeError) -> Result<Map<String, Value>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(kwargs)) => Ok(kwargs),
        Some(other) => Err(error(format!("kwargs must be an object, got {}", json_type_name(&other)))),
    }
}

/// Which tasks a consumer runs: `plugin_job` always, `process_event_with_plugins` only in the
/// Postgres pipeline (with `KAFKA_ENABLED` the Celery queue is only for plugin jobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSet {
    pub process_events: bool,
}

impl TaskMessage {
    /// Turns the message into a task, building the event or job exactly as the reference does.
    pub fn into_task(self, tasks: TaskSet) -> Result<CeleryTask, DecodeError> {
        match self.task.as_str() {
            PROCESS_EVENT_TASK if tasks.process_events => {
                process_event_task(self.args).map(|event| CeleryTask::ProcessEvent(Box::new(event)))
            }
            PLUGIN_JOB_TASK => plugin_job_task(self.args).map(CeleryTask::PluginJob),
            _ => Err(DecodeError::MissingHandler(self.task)),
        }
    }
}

fn arguments_error(task: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Arguments { task: task.to_string(), reason: reason.into() }
}

/// `process_event_with_plugins(distinct_id, ip, site_url, data, team_id, now, sent_at?)`: the
/// envelope fields and a fresh UUIDT, overlaid by every key of `data`, `distinct_id` a string.
///
/// The reference passes the kwargs object as an extra trailing argument, so a six-argument call
/// gets `sent_at = {}`; here `sent_at` is only ever the seventh argument.
fn process_event_task(args: Vec<Value>) -> Result<PluginEvent, DecodeError> {
    if args.len() < 6 {
        return Err(arguments_error(PROCESS_EVENT_TASK, format!("expected at least 6 arguments, got {}", args.len())));
    }
    let mut args = args.into_iter();
    let mut next = || args.next().unwrap_or(Value::Null);
    let (distinct_id, ip, site_url, data, team_id, now, sent_at) =
        (next(), next(), next(), next(), next(), next(), next());
    let Value::Object(data) = data else {
        return Err(arguments_error(
            PROCESS_EVENT_TASK,
            format!("data must be an object, got {}", json_type_name(&data)),
        ));
    };
    let mut fields = Map::new();
    fields.insert("distinct_id".into(), distinct_id);
    fields.insert("ip".into(), ip);
    fields.insert("site_url".into(), site_url);
    fields.insert("team_id".into(), team_id);
    fields.insert("now".into(), now);
    if !sent_at.is_null() {
        fields.insert("sent_at".into(), sent_at);
    }
    fields.insert("uuid".into(), Value::String(new_uuidt().to_string()));
    fields.extend(data);
    plugin_event_from_fields(fields).map_err(|error| arguments_error(PROCESS_EVENT_TASK, error.to_string()))
}

/// `plugin_job(team_id, plugin_config_id, job_type, operation, payload)` → the reference's job
/// `{type, payload: {...payload, $operation}, pluginConfigId, pluginConfigTeam, timestamp}`.
fn plugin_job_task(args: Vec<Value>) -> Result<Value, DecodeError> {
    if args.len() < 5 {
        return Err(arguments_error(PLUGIN_JOB_TASK, format!("expected 5 arguments, got {}", args.len())));
    }
    let mut args = args.into_iter();
    let mut next = || args.next().unwrap_or(Value::Null);
    let (team_id, plugin_config_id, job_type, operation, payload) = (next(), next(), next(), next(), next());
    let mut payload = match payload {
        Value::Object(payload) => payload,
        Value::Null => Map::new(),
        other => {
            return Err(arguments_error(
                PLUGIN_JOB_TASK,
                format!("payload must be an object, got {}", json_type_name(&other)),
            ))
        }
    };
    payload.insert("$operation".into(), operation);
    Ok(json!({
        "type": job_type,
        "payload": payload,
        "pluginConfigId": plugin_config_id,
        "pluginConfigTeam": team_id,
        "timestamp": chrono::Utc::now().timestamp_millis(),
    }))
}

/// Decodes a raw queue item all the way to a task.
pub fn decode_task(queue: &str, raw: &str, tasks: TaskSet) -> Result<CeleryTask, DecodeError> {
    decode_envelope(queue, raw)?.into_task(tasks)
}

#[cfg(test)]
mod tests {
    use super::members;

    #[test]
    fn members_are_borrowed_and_the_last_of_a_repeated_one_counts() {
        let raw = r#"{"a": 1, "skip": {"deep": [1, "x"]}, "a": [3], "c\u0061": "escaped name"}"#;
        let [a, ca, absent] = members(raw, ["a", "ca", "absent"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.map(|raw| raw.get()), Some("[3]"), "as JSON.parse: the last one");
        assert_eq!(ca.map(|raw| raw.get()), Some(r#""escaped name""#));
        assert!(absent.is_none());
        assert!(members("[1, 2]", ["a"]).is_err(), "not an object");
        assert!(members(r#"{"a": 1} trailing"#, ["a"]).is_err(), "not JSON");
    }
}
