//! The reference's `getByAge` caches: a value is served while it is at most 30 s old; a cached
//! "not found" is never served (the lookup runs again), exactly like a falsy cached value there.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Freshness window of the team, organization and group-type caches.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30);

pub struct TtlCache<K, V> {
    max_age: Duration,
    entries: Mutex<HashMap<K, (Option<V>, Instant)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(max_age: Duration) -> Self {
        TtlCache { max_age, entries: Mutex::new(HashMap::new()) }
    }

    /// The cached value if it is present, found and fresh.
    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match entries.get(key) {
            Some((Some(value), stored_at)) if stored_at.elapsed() <= self.max_age => Some(value.clone()),
            _ => None,
        }
    }

    pub fn insert(&self, key: K, value: Option<V>) {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, (value, Instant::now()));
    }

    /// Changes a cached value in place without refreshing its age.
    pub fn update(&self, key: &K, change: impl FnOnce(&mut V)) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((Some(value), _)) = entries.get_mut(key) {
            change(value);
        }
    }

    pub fn remove(&self, key: &K) {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_fresh_found_values_only() {
        let cache = TtlCache::new(Duration::from_millis(50));
        cache.insert(1, Some("a"));
        cache.insert(2, None);
        assert_eq!(cache.get(&1), Some("a"));
        assert_eq!(cache.get(&2), None);
        cache.update(&1, |value| *value = "b");
        assert_eq!(cache.get(&1), Some("b"));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&1), None);
    }
}
