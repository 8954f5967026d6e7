//! In-memory implementations of the seams of [`PluginServices`](super::extensions::PluginServices):
//! `meta.storage` ([`MemoryStorage`]), `meta.cache` ([`MemoryCache`]), what the orchestration
//! records about plugins ([`MemoryRecords`]), plugin log entries ([`MemoryLogSink`]),
//! `posthog.capture` ([`MemoryCapture`]) and `meta.jobs` ([`MemoryJobs`]). The plugin dev loop
//! (`plugin-server plugin run`) runs plugins on them without Postgres or Redis, and prints what
//! they hold; each keeps the writes it received in order ([`MemoryStorage::writes`], …).
//!
//! The cache follows Redis' semantics for the commands `meta.cache` sends (integers only where
//! Redis wants them, negative list indexes, `EX` expiry, `WRONGTYPE`); cursor increments add as
//! JavaScript numbers where Postgres adds `numeric`s (`0.1 + 0.2` gives `0.30000000000000004`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::extensions::{
    CacheBackend, CaptureSink, CapturedEvent, EnqueuedJob, JobEnqueuer, SinkError, StorageBackend,
};
use super::log_entries::{PluginLogEntry, PluginLogSink};
use super::rows::PluginRecords;
use super::vm_boundary::JsError;
use crate::js::number_to_string as number_string;

/// One write to a store, as the dev loop prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreWrite {
    /// `set`, `del`, `cursor.init`, `incr`, `lpush`, …
    pub operation: String,
    pub key: String,
    /// The value written (as stored: JSON text, number text, list elements), when there is one.
    pub value: Option<Value>,
}

impl StoreWrite {
    fn new(operation: &str, key: &str, value: Option<Value>) -> StoreWrite {
        StoreWrite { operation: operation.to_string(), key: key.to_string(), value }
    }

    pub fn to_json(&self) -> Value {
        json!({"operation": self.operation, "key": self.key, "value": self.value})
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: keep using it.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `meta.storage` in memory.
#[derive(Default)]
pub struct MemoryStorage {
    values: Mutex<HashMap<(i32, String), Option<String>>>,
    writes: Mutex<Vec<StoreWrite>>,
}

impl MemoryStorage {
    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<StoreWrite> {
        lock(&self.writes).clone()
    }

    fn record(&self, operation: &str, key: &str, value: Option<&str>) {
        let value = value.map(|text| serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())));
        lock(&self.writes).push(StoreWrite::new(operation, key, value));
    }
}

#[async_trait]
impl StorageBackend for MemoryStorage {
    async fn get(&self, config_id: i32, key: &str) -> Result<Option<Option<String>>, JsError> {
        Ok(lock(&self.values).get(&(config_id, key.to_string())).cloned())
    }

    async fn set(&self, config_id: i32, key: &str, value: String) -> Result<(), JsError> {
        self.record("set", key, Some(&value));
        lock(&self.values).insert((config_id, key.to_string()), Some(value));
        Ok(())
    }

    async fn del(&self, config_id: i32, key: &str) -> Result<(), JsError> {
        self.record("del", key, None);
        lock(&self.values).remove(&(config_id, key.to_string()));
        Ok(())
    }

    async fn set_if_absent(&self, config_id: i32, key: &str, value: String) -> Result<(), JsError> {
        let inserted = {
            let mut values = lock(&self.values);
            let entry = values.entry((config_id, key.to_string()));
            match entry {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(Some(value.clone()));
                    true
                }
            }
        };
        if inserted {
            self.record("cursor.init", key, Some(&value));
        }
        Ok(())
    }

    async fn add(&self, config_id: i32, key: &str, by: String) -> Result<Option<String>, JsError> {
        let by_number: f64 = by.parse().map_err(|_| JsError::new("Error", format!("invalid number: {by}")))?;
        let new = {
            let mut values = lock(&self.values);
            let slot = values.entry((config_id, key.to_string())).or_insert(None);
            let new = match slot.as_deref() {
                None => by.clone(),
                Some(current) => {
                    let current: f64 = current.trim().parse().map_err(|_| {
                        JsError::new("Error", format!("invalid input syntax for type numeric: \"{current}\""))
                    })?;
                    number_string(current + by_number)
                }
            };
            *slot = Some(new.clone());
            new
        };
        self.record("cursor.increment", key, Some(&new));
        Ok(Some(new))
    }
}

enum CacheValue {
    Text(String),
    List(VecDeque<String>),
}

struct CacheEntry {
    value: CacheValue,
    expires: Option<Instant>,
}

/// `meta.cache` in memory, with Redis' semantics for the commands it uses.
#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<HashMap<String, CacheEntry>>,
    writes: Mutex<Vec<StoreWrite>>,
}

const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
const WRONG_TYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

fn redis_integer(text: &str) -> Result<i64, JsError> {
    text.parse::<i64>().map_err(|_| JsError::new("ReplyError", NOT_AN_INTEGER))
}

fn wrong_type() -> JsError {
    JsError::new("ReplyError", WRONG_TYPE)
}

/// Redis' `LRANGE` index window over a list of `len` items: `(first, last)` inclusive, or `None`.
fn list_window(len: usize, start: i64, end: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let start = if start < 0 { (len + start).max(0) } else { start };
    let end = if end < 0 { len + end } else { end.min(len - 1) };
    (start <= end && start < len).then_some((start as usize, end as usize))
}

impl MemoryCache {
    /// Every write so far (keys without the `@plugin/<id>/<team>/` prefix), in order.
    pub fn writes(&self) -> Vec<StoreWrite> {
        lock(&self.writes).clone()
    }

    fn record(&self, operation: &str, key: &str, value: Option<Value>) {
        let short = key.splitn(4, '/').nth(3).unwrap_or(key);
        lock(&self.writes).push(StoreWrite::new(operation, short, value));
    }

    /// Runs `f` on the live entries (expired ones removed first).
    fn with_entries<T>(&self, key: &str, f: impl FnOnce(&mut HashMap<String, CacheEntry>) -> T) -> T {
        let mut entries = lock(&self.entries);
        if entries.get(key).and_then(|entry| entry.expires).is_some_and(|expires| expires <= Instant::now()) {
            entries.remove(key);
        }
        f(&mut entries)
    }

    fn list_mut<'a>(
        entries: &'a mut HashMap<String, CacheEntry>,
        key: &str,
    ) -> Result<Option<&'a mut VecDeque<String>>, JsError> {
        match entries.get_mut(key) {
            None => Ok(None),
            Some(CacheEntry { value: CacheValue::List(list), .. }) => Ok(Some(list)),
            Some(_) => Err(wrong_type()),
        }
    }
}

#[async_trait]
impl CacheBackend for MemoryCache {
    async fn set(&self, key: &str, value: String, ttl_seconds: Option<String>) -> Result<(), JsError> {
        let expires = match &ttl_seconds {
            Some(ttl) => {
                let seconds = redis_integer(ttl)?;
                if seconds <= 0 {
                    return Err(JsError::new("ReplyError", "ERR invalid expire time in 'set' command"));
                }
                Some(Instant::now() + Duration::from_secs(seconds as u64))
            }
            None => None,
        };
        let mut written = json!(value);
        if let Some(ttl) = ttl_seconds {
            written = json!({"value": value, "ttl_seconds": ttl});
        }
        self.record("set", key, Some(written));
        lock(&self.entries).insert(key.to_string(), CacheEntry { value: CacheValue::Text(value), expires });
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<String>, JsError> {
        self.with_entries(key, |entries| match entries.get(key) {
            None => Ok(None),
            Some(CacheEntry { value: CacheValue::Text(text), .. }) => Ok(Some(text.clone())),
            Some(_) => Err(wrong_type()),
        })
    }

    async fn incr(&self, key: &str) -> Result<i64, JsError> {
        let value = self.with_entries(key, |entries| {
            let entry = entries
                .entry(key.to_string())
                .or_insert(CacheEntry { value: CacheValue::Text("0".into()), expires: None });
            match &mut entry.value {
                CacheValue::Text(text) => {
                    let next = redis_integer(text)?
                        .checked_add(1)
                        .ok_or_else(|| JsError::new("ReplyError", "ERR increment or decrement would overflow"))?;
                    *text = next.to_string();
                    Ok(next)
                }
                CacheValue::List(_) => Err(wrong_type()),
            }
        })?;
        self.record("incr", key, Some(json!(value)));
        Ok(value)
    }

    async fn expire(&self, key: &str, ttl_seconds: String) -> Result<bool, JsError> {
        let seconds = redis_integer(&ttl_seconds)?;
        let existed = self.with_entries(key, |entries| {
            if seconds <= 0 {
                return entries.remove(key).is_some();
            }
            match entries.get_mut(key) {
                Some(entry) => {
                    entry.expires = Some(Instant::now() + Duration::from_secs(seconds as u64));
                    true
                }
                None => false,
            }
        });
        self.record("expire", key, Some(json!(seconds)));
        Ok(existed)
    }

    async fn lpush(&self, key: &str, elements: Vec<String>) -> Result<i64, JsError> {
        let length = self.with_entries(key, |entries| {
            let entry = entries
                .entry(key.to_string())
                .or_insert(CacheEntry { value: CacheValue::List(VecDeque::new()), expires: None });
            match &mut entry.value {
                CacheValue::List(list) => {
                    for element in &elements {
                        list.push_front(element.clone());
                    }
                    Ok(list.len() as i64)
                }
                CacheValue::Text(_) => Err(wrong_type()),
            }
        })?;
        self.record("lpush", key, Some(json!(elements)));
        Ok(length)
    }

    async fn lrange(&self, key: &str, start: String, end: String) -> Result<Vec<String>, JsError> {
        let (start, end) = (redis_integer(&start)?, redis_integer(&end)?);
        self.with_entries(key, |entries| {
            let Some(list) = Self::list_mut(entries, key)? else { return Ok(Vec::new()) };
            Ok(match list_window(list.len(), start, end) {
                Some((first, last)) => list.range(first..=last).cloned().collect(),
                None => Vec::new(),
            })
        })
    }

    async fn llen(&self, key: &str) -> Result<i64, JsError> {
        self.with_entries(key, |entries| Ok(Self::list_mut(entries, key)?.map_or(0, |list| list.len() as i64)))
    }

    async fn lrem(&self, key: &str, count: String, element: String) -> Result<i64, JsError> {
        let count = redis_integer(&count)?;
        let removed = self.with_entries(key, |entries| {
            let Some(list) = Self::list_mut(entries, key)? else { return Ok(0) };
            let limit = if count == 0 { usize::MAX } else { count.unsigned_abs() as usize };
            let mut positions: Vec<usize> = (0..list.len()).filter(|index| list[*index] == element).collect();
            if count < 0 {
                positions.reverse();
            }
            positions.truncate(limit);
            positions.sort_unstable();
            for index in positions.iter().rev() {
                list.remove(*index);
            }
            if list.is_empty() {
                entries.remove(key);
            }
            Ok(positions.len() as i64)
        })?;
        self.record("lrem", key, Some(json!({"count": count, "element": element, "removed": removed})));
        Ok(removed)
    }

    async fn lpop(&self, key: &str, count: String) -> Result<Option<Vec<String>>, JsError> {
        let count = redis_integer(&count)?;
        if count < 0 {
            return Err(JsError::new("ReplyError", "ERR value is out of range, must be positive"));
        }
        let popped = self.with_entries(key, |entries| {
            let Some(list) = Self::list_mut(entries, key)? else { return Ok(None) };
            let popped: Vec<String> = (0..count).map_while(|_| list.pop_front()).collect();
            if list.is_empty() {
                entries.remove(key);
            }
            Ok(Some(popped))
        })?;
        if let Some(popped) = &popped {
            self.record("lpop", key, Some(json!(popped)));
        }
        Ok(popped)
    }
}

/// What the orchestration recorded about the plugin, in memory.
#[derive(Default)]
pub struct MemoryRecords {
    /// Every error recorded for a config (`posthog_pluginconfig.error` JSON), in order.
    errors: Mutex<Vec<Value>>,
    capabilities: Mutex<Option<Value>>,
    metrics: Mutex<Option<Value>>,
    disabled: Mutex<bool>,
}

impl MemoryRecords {
    pub fn errors(&self) -> Vec<Value> {
        lock(&self.errors).clone()
    }

    pub fn capabilities(&self) -> Option<Value> {
        lock(&self.capabilities).clone()
    }

    pub fn metrics(&self) -> Option<Value> {
        lock(&self.metrics).clone()
    }

    pub fn disabled(&self) -> bool {
        *lock(&self.disabled)
    }
}

#[async_trait]
impl PluginRecords for MemoryRecords {
    async fn set_plugin_capabilities(&self, _plugin_id: i32, capabilities: &Value) -> Result<(), sqlx::Error> {
        *lock(&self.capabilities) = Some(capabilities.clone());
        Ok(())
    }

    async fn set_plugin_metrics(&self, _plugin_id: i32, metrics: &Value) -> Result<(), sqlx::Error> {
        *lock(&self.metrics) = Some(metrics.clone());
        Ok(())
    }

    async fn set_config_error(&self, _config_id: i32, error: Option<&Value>) -> Result<(), sqlx::Error> {
        if let Some(error) = error {
            lock(&self.errors).push(error.clone());
        }
        Ok(())
    }

    async fn clear_config_error(&self, _config_id: i32) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn disable_plugin_config(&self, _config_id: i32) -> Result<(), sqlx::Error> {
        *lock(&self.disabled) = true;
        Ok(())
    }

    async fn add_public_job(&self, _plugin_id: i32) {}
}

/// Plugin log entries, kept in order.
#[derive(Default)]
pub struct MemoryLogSink {
    entries: Mutex<Vec<PluginLogEntry>>,
}

impl MemoryLogSink {
    pub fn entries(&self) -> Vec<PluginLogEntry> {
        lock(&self.entries).clone()
    }
}

#[async_trait]
impl PluginLogSink for MemoryLogSink {
    async fn queue(&self, entry: PluginLogEntry) {
        lock(&self.entries).push(entry);
    }

    async fn flush(&self) {}
}

/// `posthog.capture` events, kept in order.
#[derive(Default)]
pub struct MemoryCapture {
    events: Mutex<Vec<CapturedEvent>>,
}

impl MemoryCapture {
    pub fn events(&self) -> Vec<CapturedEvent> {
        lock(&self.events).clone()
    }
}

#[async_trait]
impl CaptureSink for MemoryCapture {
    async fn capture(&self, event: CapturedEvent) -> Result<(), SinkError> {
        lock(&self.events).push(event);
        Ok(())
    }
}

/// `meta.jobs` enqueued, kept in order (never run).
#[derive(Default)]
pub struct MemoryJobs {
    jobs: Mutex<Vec<EnqueuedJob>>,
}

impl MemoryJobs {
    pub fn jobs(&self) -> Vec<EnqueuedJob> {
        lock(&self.jobs).clone()
    }
}

#[async_trait]
impl JobEnqueuer for MemoryJobs {
    async fn enqueue(&self, job: EnqueuedJob) -> Result<(), SinkError> {
        lock(&self.jobs).push(job);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_windows_follow_redis() {
        assert_eq!(list_window(5, 0, -1), Some((0, 4)));
        assert_eq!(list_window(5, -2, -1), Some((3, 4)));
        assert_eq!(list_window(5, 1, 100), Some((1, 4)));
        assert_eq!(list_window(5, 3, 1), None);
        assert_eq!(list_window(0, 0, -1), None);
        assert_eq!(list_window(5, -100, 0), Some((0, 0)));
    }

    #[tokio::test]
    async fn storage_and_cursors_behind_the_meta_api_rules() {
        let backend = std::sync::Arc::new(MemoryStorage::default());
        let storage = super::super::extensions::Storage::new(backend.clone(), 7);
        assert_eq!(storage.get("missing", json!("default")).await, Ok(json!("default")));
        storage.set("k", Some(&json!({"a": 1}))).await.unwrap();
        assert_eq!(storage.get("k", Value::Null).await, Ok(json!({"a": 1})));
        storage.set("k", None).await.unwrap();
        assert_eq!(storage.get("k", json!(0)).await, Ok(json!(0)));
        storage.cursor_init("c", Some(&json!(5))).await.unwrap();
        storage.cursor_init("c", Some(&json!(9))).await.unwrap();
        assert_eq!(storage.cursor_increment("c", None).await, Ok(json!(6)));
        assert_eq!(storage.cursor_increment("c", Some(&json!(2.5))).await, Ok(json!(8.5)));
        assert_eq!(storage.cursor_increment("fresh", Some(&json!(3))).await, Ok(json!(3)));
        let operations: Vec<String> = backend.writes().into_iter().map(|write| write.operation).collect();
        assert_eq!(
            operations,
            ["set", "del", "cursor.init", "cursor.increment", "cursor.increment", "cursor.increment"]
        );
    }

    #[tokio::test]
    async fn cache_commands_follow_redis() {
        let cache = MemoryCache::default();
        let key = "@plugin/1/2/list";
        assert_eq!(cache.lpush(key, vec!["a".into(), "b".into(), "a".into()]).await, Ok(3));
        assert_eq!(cache.lrange(key, "0".into(), "-1".into()).await, Ok(vec!["a".into(), "b".into(), "a".into()]));
        assert_eq!(cache.lrem(key, "-1".into(), "a".into()).await, Ok(1));
        assert_eq!(cache.lpop(key, "5".into()).await, Ok(Some(vec!["a".into(), "b".into()])));
        assert_eq!(cache.lpop(key, "1".into()).await, Ok(None));
        assert_eq!(cache.incr("@plugin/1/2/n").await, Ok(1));
        assert!(cache.incr(key).await.is_ok());
        cache.set("@plugin/1/2/text", "\"x\"".into(), None).await.unwrap();
        assert_eq!(cache.incr("@plugin/1/2/text").await.map_err(|error| error.message), Err(NOT_AN_INTEGER.into()));
        assert_eq!(cache.writes()[0].key, "list");
    }
}
