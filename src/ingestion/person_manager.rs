//! "Have we seen this distinct id?" — the `DISTINCT_ID_LRU_SIZE` LRU in front of the
//! `posthog_persondistinctid` count that decides whether an event creates a person (spec 20 §8.1).
//!
//! Also [`collect_missing_statistics`]: planner statistics for the distinct-id lookups on a
//! database that never analyzed `posthog_persondistinctid` (not in the reference).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

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

/// How often [`collect_missing_statistics`] looks at the table while it is small (a query on
/// the catalog; it stops once the table has statistics).
const STATISTICS_CHECK_EVERY: Duration = Duration::from_millis(250);
/// From this size on (2 pages, a few hundred distinct ids) the table is analyzed: a sample that
/// small already tells the planner how the distinct ids spread over the teams, the `ANALYZE`
/// costs a few milliseconds (it samples at most 30,000 rows, whatever the size), and each lookup
/// without statistics reads all the team's distinct ids.
pub const STATISTICS_MIN_BYTES: i64 = 16 * 1024;

/// Analyzes `posthog_persondistinctid` once if PostgreSQL has no statistics on it, then waits for
/// `token` (a server component). Done at once on a database autovacuum looks after.
///
/// Why: every event's person is looked up by `(team_id, distinct_id)`, which the unique index
/// answers in one descent. Without statistics (a table never analyzed: autovacuum off, or not
/// run yet on a fresh install) the planner takes the team's 0.5% share of a table it assumes
/// small and picks the smaller `team_id` index instead, then filters every distinct id of the team
/// for each lookup; a connection keeps that plan for as long as it lives. Measured on the
/// side-by-side kit (`benches/side_by_side_breakdown.py none`, a table of 1,871 distinct ids): the
/// batched lookup 13 ms per 71 keys instead of under 1 ms, PostgreSQL's CPU per event nearly
/// doubled in the runs whose connections planned early. Statistics survive `TRUNCATE`, and
/// `ANALYZE` invalidates the cached plans.
///
/// One attempt per process: a role that does not own the table only gets PostgreSQL's warning.
pub async fn collect_missing_statistics(pool: PgPool, token: CancellationToken) {
    analyze_distinct_ids_unless_planned(&pool, &token).await;
    token.cancelled().await;
}

/// [`collect_missing_statistics`]'s work: returns once the table has statistics, was analyzed
/// (or that failed), or `token` is cancelled.
pub async fn analyze_distinct_ids_unless_planned(pool: &PgPool, token: &CancellationToken) {
    loop {
        match crate::db::persons::distinct_id_statistics(pool).await {
            Ok((true, _)) => return,
            Ok((false, bytes)) if bytes >= STATISTICS_MIN_BYTES => {
                let started = Instant::now();
                match crate::db::persons::analyze_distinct_ids(pool).await {
                    Ok(()) => tracing::info!(
                        bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "📊 posthog_persondistinctid had no planner statistics: analyzed it"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "📊 posthog_persondistinctid has no planner statistics and ANALYZE failed")
                    }
                }
                return;
            }
            Ok((false, _)) => {}
            Err(error) => tracing::debug!(%error, "could not read posthog_persondistinctid's statistics"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(STATISTICS_CHECK_EVERY) => {}
        }
    }
}
