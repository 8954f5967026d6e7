//! "Have we seen this distinct id?" — the `DISTINCT_ID_LRU_SIZE` LRU in front of the
//! `posthog_persondistinctid` count that decides whether an event creates a person (spec 20 §8.1).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use sqlx::PgPool;

/// Entries older than this are forgotten; reading an entry refreshes its age.
const MAX_AGE: Duration = Duration::from_secs(60 * 60);

pub struct PersonManager {
    seen: Mutex<LruCache<String, Instant>>,
}

impl PersonManager {
    pub fn new(lru_size: usize) -> Self {
        let capacity = NonZeroUsize::new(lru_size).unwrap_or(NonZeroUsize::MIN);
        PersonManager { seen: Mutex::new(LruCache::new(capacity)) }
    }

    /// True the first time the process sees the key (or when it was forgotten): the event may
    /// create a person. The key is remembered at once, so concurrent events for one new id make
    /// one creation attempt.
    pub fn first_sighting(&self, team_id: i32, distinct_id: &str) -> bool {
        let key = format!("{team_id}::{distinct_id}");
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        match seen.get_mut(&key) {
            Some(seen_at) if now.duration_since(*seen_at) <= MAX_AGE => {
                *seen_at = now;
                false
            }
            _ => {
                seen.put(key, now);
                true
            }
        }
    }

    /// True when the team has no such distinct id: [`Self::first_sighting`], then the reference's
    /// `pdicount` query. (Ingestion folds that query into the person's creation instead.)
    pub async fn is_new_person(&self, pool: &PgPool, team_id: i32, distinct_id: &str) -> Result<bool, sqlx::Error> {
        if !self.first_sighting(team_id, distinct_id) {
            return Ok(false);
        }
        Ok(crate::metrics::catalog::postgres(
            "pdicount",
            crate::db::persons::count_distinct_id(pool, team_id, distinct_id),
        )
        .await?
            == 0)
    }
}
