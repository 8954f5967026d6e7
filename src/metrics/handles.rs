//! Handles kept once resolved, so that recording a metric on the event path neither builds a
//! `metrics::Key` (label vectors, number-to-text labels) nor looks the key up in the recorder's
//! registry: a fixed metric keeps its handle in a `OnceLock`, a metric labelled per team, plugin
//! config or query keeps one handle per label values in a [`Handles`] map keyed by the raw values
//! (integers and `&'static str`). The statsd client keeps key numbers the same way
//! (`statsd::KeyCache`).
//!
//! The recorder is installed at most once per process, before the first recording
//! ([`super::prometheus::install`]; the catalog records nothing until then), so a handle resolved
//! once stays valid.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{PoisonError, RwLock};

use rustc_hash::FxBuildHasher;

/// One handle (a `metrics::Counter`, `Histogram`, or a small struct of them) per key.
pub struct Handles<K, T> {
    map: RwLock<HashMap<K, T, FxBuildHasher>>,
}

impl<K, T> Handles<K, T> {
    pub const fn new() -> Handles<K, T> {
        Handles { map: RwLock::new(HashMap::with_hasher(FxBuildHasher)) }
    }
}

impl<K, T> Default for Handles<K, T> {
    fn default() -> Handles<K, T> {
        Handles::new()
    }
}

impl<K: Hash + Eq, T> Handles<K, T> {
    /// Runs `use_it` on the handle of `key`, made by `make` the first time.
    pub fn with<R>(&self, key: K, make: impl FnOnce() -> T, use_it: impl FnOnce(&T) -> R) -> R {
        self.with_valid(key, |_| true, make, use_it)
    }

    /// [`Handles::with`], making the handle again when `still_valid` says the kept one no longer
    /// fits (a plugin config whose plugin was renamed).
    pub fn with_valid<R>(
        &self,
        key: K,
        still_valid: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
        use_it: impl FnOnce(&T) -> R,
    ) -> R {
        {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(found) = map.get(&key).filter(|found| still_valid(found)) {
                return use_it(found);
            }
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let handle = match map.entry(key) {
            Entry::Occupied(mut occupied) => {
                if !still_valid(occupied.get()) {
                    occupied.insert(make());
                }
                occupied.into_mut()
            }
            Entry::Vacant(vacant) => vacant.insert(make()),
        };
        use_it(handle)
    }
}
