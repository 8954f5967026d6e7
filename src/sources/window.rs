//! Fair share of a consumer's window between teams (issue 14; the original has one window shared
//! by everyone).
//!
//! A consumer keeps a bounded number of events in memory. Before this, every team shared one
//! window of `WORKER_CONCURRENCY × TASKS_PER_WORKER ×` [`super::EVENTS_IN_FLIGHT_PER_TASK`]
//! events: one team whose plugin hits `TASK_TIMEOUT` on every event soon held the whole window and
//! every other team's events waited behind it. Here the window has three bounds
//! ([`WindowLimits`]):
//! * `in_flight`: events being handled at once, all teams together;
//! * `team_share`: events of **one team** being handled at once (below `in_flight`, so a team at
//!   its share leaves the rest to the others; alone, a team gets as much as before this change);
//! * `held`: events taken from the queue whose team was at its share when they arrived. They wait
//!   in memory, in arrival order per team, and start as soon as their team has room. While this
//!   many are waiting, the consumer takes nothing more from its queue (the memory bound): a slow
//!   team sending more than that slows everyone again, see the README.
//!
//! The share is per **team**, not per plugin config: the consumer knows an event's team from the
//! message alone, a team's whole `processEvent` chain runs for each of its events (so a slow
//! config makes all of its team's events slow), and sharing between the configs of the JS threads
//! is already done by the worker pool (`plugins/runtime/pool.rs`).
//!
//! Nothing is dropped or reordered within a team: a held event keeps its message (Celery: still in
//! the processing list; Kafka: its offset still in hand, so the commit point waits for it, as for
//! any event in flight). Each event held back is counted ([`super::QueueStats::held_back`], statsd
//! `consumer.held_back` tagged `reason:team_share`) and logged (at most every
//! [`LOG_EVERY`] per team); each time the held events fill their bound and intake stops it is
//! counted too ([`super::QueueStats::intake_stalled`], statsd `consumer.intake_stalled`).
//!
//! Used by both consumers: a [`Slot`] is reserved before a message is taken ([`FairWindow::reserve`]),
//! and once the message's team is known it is admitted ([`Slot::admit`]), waiting its turn if its
//! team is at its share. Dropping a slot (done, failed, abandoned) frees its place.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tracing::warn;

use super::QueueStats;

/// Held events the window keeps per event it handles at once (see [`WindowLimits::from_team_share`]).
pub const HELD_PER_EVENT_IN_FLIGHT: usize = 4;

/// How often a team's being held back is logged, at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A team at its share none of whose events finished for this long is *slow*: the consumer takes
/// further messages past its held events (up to the `held` bound). While a team at its share is
/// still moving, at most [`HELD_WHILE_MOVING`] of its events are held and the consumer waits for
/// them as it did before the fair share (no messages taken early for nothing).
pub const SLOW_AFTER: Duration = Duration::from_millis(500);

/// Messages held for, or possibly of, teams at their share that are not slow, beyond which the
/// consumer takes no more messages.
pub const HELD_WHILE_MOVING: usize = 8;

/// The bounds of a consumer's window (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    pub in_flight: usize,
    pub team_share: usize,
    pub held: usize,
}

impl WindowLimits {
    /// A team may have `team_share` events in flight (what all teams shared before); the consumer
    /// twice that, so one team at its share leaves as much to the others; and
    /// [`HELD_PER_EVENT_IN_FLIGHT`] times the in-flight bound may wait for their team's share.
    pub fn from_team_share(team_share: usize) -> WindowLimits {
        let team_share = team_share.max(1);
        WindowLimits { in_flight: team_share * 2, team_share, held: team_share * 2 * HELD_PER_EVENT_IN_FLIGHT }
    }

    /// The limits as given, made usable: nothing zero, a team's share at most the whole.
    pub fn new(in_flight: usize, team_share: usize, held: usize) -> WindowLimits {
        let in_flight = in_flight.max(1);
        WindowLimits { in_flight, team_share: team_share.clamp(1, in_flight), held }
    }
}

#[derive(Default)]
struct TeamState {
    /// Events running, by id, with when they started; and the same ordered by start.
    running: HashMap<u64, Instant>,
    by_start: BTreeSet<(Instant, u64)>,
    /// Events waiting for this team's share, oldest first: their id and how to wake them.
    held: VecDeque<(u64, oneshot::Sender<()>)>,
    /// When one of its events last finished.
    last_progress: Option<Instant>,
}

impl TeamState {
    fn start(&mut self, id: u64, now: Instant) {
        self.running.insert(id, now);
        self.by_start.insert((now, id));
    }

    fn finish(&mut self, id: u64) {
        if let Some(started) = self.running.remove(&id) {
            self.by_start.remove(&(started, id));
            self.last_progress = Some(Instant::now());
        }
    }

    fn in_flight(&self) -> usize {
        self.running.len()
    }

    /// Whether none of its events finished for [`SLOW_AFTER`] (and one did before: the first
    /// calls of a team also load its plugins): its held events may wait long, so the consumer
    /// looks past them. (Not the age of its oldest event: with a full share on a busy machine a
    /// healthy team's events take over a second too, but they keep finishing.)
    fn is_slow(&self, now: Instant) -> bool {
        self.last_progress.is_some_and(|last| now.duration_since(last) >= SLOW_AFTER)
    }

    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.held.is_empty()
    }
}

#[derive(Default)]
struct State {
    /// Slots reserved or running, all teams together (at most `in_flight`).
    taken: usize,
    held: usize,
    teams: HashMap<i64, TeamState>,
    next_id: u64,
    /// When each team's being held back was last logged.
    logged: HashMap<i64, Instant>,
    /// Whether the held events filled their bound (counted once per stall).
    stalled: bool,
}

/// The window of one consumer. Cheap to share (`Arc`).
pub struct FairWindow {
    limits: WindowLimits,
    state: Mutex<State>,
    /// Woken whenever room may have been made (a slot released, an event held).
    changed: Notify,
    stats: Arc<QueueStats>,
    /// Names the consumer in logs and metrics (`celery`, `kafka`).
    consumer: &'static str,
}

impl FairWindow {
    pub fn new(limits: WindowLimits, stats: Arc<QueueStats>, consumer: &'static str) -> Arc<FairWindow> {
        Arc::new(FairWindow { limits, state: Mutex::default(), changed: Notify::new(), stats, consumer })
    }

    pub fn limits(&self) -> WindowLimits {
        self.limits
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Events in memory: reserved, running or held.
    pub fn in_hand(&self) -> usize {
        let state = self.state();
        state.taken + state.held
    }

    /// Events held back right now, waiting for their team's share.
    pub fn held(&self) -> usize {
        self.state().held
    }

    /// A slot for one more message, if the window has room: a free place in flight, and the held
    /// events below their bound.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Slot> {
        let mut state = self.state();
        let now = Instant::now();
        // A team at its share that keeps finishing: its next events will start soon, so take
        // only a few messages past them (as before the fair share), counting those not yet
        // admitted, which may be its too.
        let share = self.limits.team_share;
        let running: usize = state.teams.values().map(TeamState::in_flight).sum();
        let unadmitted = state.taken.saturating_sub(running);
        let crowded = state.teams.values().any(|entry| {
            !entry.is_slow(now) && entry.in_flight() + entry.held.len() + unadmitted >= share + HELD_WHILE_MOVING
        });
        if crowded {
            return None;
        }
        if state.held >= self.limits.held.max(1) {
            if !state.stalled {
                state.stalled = true;
                QueueStats::bump(&self.stats.intake_stalled);
                crate::metrics::catalog::intake_stalled(self.consumer);
                warn!(
                    "⏳ {} consumer: {} events are held back waiting for their team's share of the window; taking no \
                     more messages until they move",
                    self.consumer, state.held
                );
            }
            return None;
        }
        state.stalled = false;
        if state.taken >= self.limits.in_flight {
            return None;
        }
        state.taken += 1;
        Some(Slot { window: Arc::clone(self), place: Place::Reserved })
    }

    /// Waits for a slot (cancel-safe: nothing is reserved unless it returns). Re-checks every
    /// quarter of [`SLOW_AFTER`] too: a team turning slow makes room without any event ending.
    pub async fn reserve(self: &Arc<Self>) -> Slot {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = self.try_reserve() {
                return slot;
            }
            let _ = tokio::time::timeout(SLOW_AFTER / 4, changed).await;
        }
    }

    /// Waits until nothing is reserved, running or held.
    pub async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.in_hand() == 0 {
                return;
            }
            changed.await;
        }
    }

    /// Frees a place in flight (of `team`, if it ran for one) and starts held events that now fit,
    /// oldest team first in no particular order across teams, in arrival order within a team.
    fn release(&self, running: Option<(i64, u64)>) {
        let mut state = self.state();
        state.taken = state.taken.saturating_sub(1);
        if let Some((team, id)) = running {
            if let Some(entry) = state.teams.get_mut(&team) {
                entry.finish(id);
            }
        }
        self.start_held(&mut state);
        state.teams.retain(|_, entry| !entry.is_idle());
        drop(state);
        self.changed.notify_waiters();
    }

    fn start_held(&self, state: &mut State) {
        let State { taken, held, teams, .. } = state;
        let now = Instant::now();
        for entry in teams.values_mut() {
            while *taken < self.limits.in_flight && entry.in_flight() < self.limits.team_share {
                let Some((id, waker)) = entry.held.pop_front() else { break };
                *held -= 1;
                // Counted as running even if its waiter is gone: its slot, when dropped, releases
                // a running place (it is no longer among the held).
                let _ = waker.send(());
                entry.start(id, now);
                *taken += 1;
            }
        }
    }

    /// Forgets a held event that gave up waiting; `false` if it was started meanwhile.
    fn withdraw(&self, team: i64, id: u64) -> bool {
        let mut state = self.state();
        let Some(entry) = state.teams.get_mut(&team) else { return false };
        let Some(position) = entry.held.iter().position(|(held, _)| *held == id) else { return false };
        entry.held.remove(position);
        state.held -= 1;
        state.teams.retain(|_, entry| !entry.is_idle());
        drop(state);
        self.changed.notify_waiters();
        true
    }
}

enum Place {
    /// Taken from the queue, team not known yet: holds a place in flight.
    Reserved,
    /// Handled for this team (id of its admission).
    Running(i64, u64),
    /// Waiting for this team's share (id of the wait).
    Held(i64, u64),
    /// Already given back.
    Released,
}

/// One message's place in the window; released when dropped.
pub struct Slot {
    window: Arc<FairWindow>,
    place: Place,
}

impl Slot {
    /// Runs the message for `team` once the team is below its share (and no older event of that
    /// team is waiting). Until then the message is *held back*: it gives its place in flight to
    /// other teams and waits in memory. Cancel-safe: dropping the future gives up the wait.
    pub async fn admit(mut self, team: i64) -> Slot {
        let window = Arc::clone(&self.window);
        let waiting = {
            let mut state = window.state();
            let limits = window.limits;
            let id = state.next_id;
            state.next_id += 1;
            let entry = state.teams.entry(team).or_default();
            if entry.in_flight() < limits.team_share && entry.held.is_empty() {
                entry.start(id, Instant::now());
                self.place = Place::Running(team, id);
                None
            } else {
                let (waker, wait) = oneshot::channel();
                entry.held.push_back((id, waker));
                let running = entry.in_flight();
                state.held += 1;
                state.taken = state.taken.saturating_sub(1);
                // The place given up may start another team's held event.
                window.start_held(&mut state);
                self.place = Place::Held(team, id);
                QueueStats::bump(&window.stats.held_back);
                let consumer = window.consumer;
                crate::metrics::catalog::held_back(consumer);
                let now = Instant::now();
                let log = state.logged.get(&team).is_none_or(|last| now.duration_since(*last) >= LOG_EVERY);
                if log {
                    if state.logged.len() > 10_000 {
                        state.logged.retain(|_, last| now.duration_since(*last) < LOG_EVERY);
                    }
                    state.logged.insert(team, now);
                    warn!(
                        "⏳ {consumer} consumer: team {team} has {running} events in flight, its share of the window \
                         ({}): its next events are held back until they finish ({} held in all)",
                        limits.team_share, state.held
                    );
                }
                Some(wait)
            }
        };
        if let Some(wait) = waiting {
            window.changed.notify_waiters();
            // The sender is dropped only if the window itself goes away: then just run.
            let _ = wait.await;
            if let Place::Held(team, id) = self.place {
                self.place = Place::Running(team, id);
            }
        }
        self
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.place, Place::Released) {
            Place::Released => {}
            Place::Reserved => self.window.release(None),
            Place::Running(team, id) => self.window.release(Some((team, id))),
            Place::Held(team, id) => {
                // Started meanwhile (the wake raced with the drop): it holds a running place.
                if !self.window.withdraw(team, id) {
                    self.window.release(Some((team, id)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(in_flight: usize, team_share: usize, held: usize) -> Arc<FairWindow> {
        FairWindow::new(WindowLimits::new(in_flight, team_share, held), Arc::default(), "test")
    }

    #[tokio::test]
    async fn a_team_at_its_share_leaves_the_rest_to_the_others() {
        let window = window(4, 2, 10);
        let a1 = window.try_reserve().unwrap().admit(1).await;
        let _a2 = window.try_reserve().unwrap().admit(1).await;
        // A's third event is held: it gives its place back.
        let a3 = tokio::spawn(window.try_reserve().unwrap().admit(1));
        tokio::task::yield_now().await;
        assert_eq!(window.held(), 1);
        let _b1 = window.try_reserve().unwrap().admit(2).await;
        let _b2 = window.try_reserve().unwrap().admit(2).await;
        assert!(window.try_reserve().is_none(), "the window is full");
        assert_eq!(window.stats.held_back.load(std::sync::atomic::Ordering::Relaxed), 1);
        drop(a1);
        let a3 = tokio::time::timeout(Duration::from_secs(1), a3).await.unwrap().unwrap();
        assert_eq!(window.held(), 0);
        assert!(matches!(a3.place, Place::Running(1, _)));
        assert_eq!(window.in_hand(), 4);
    }

    #[tokio::test]
    async fn held_events_start_in_arrival_order() {
        let window = window(10, 1, 10);
        let first = window.try_reserve().unwrap().admit(1).await;
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        for index in 0..3 {
            let slot = window.try_reserve().unwrap();
            let order_tx = order_tx.clone();
            tokio::spawn(async move {
                let slot = slot.admit(1).await;
                order_tx.send(index).unwrap();
                drop(slot);
            });
            tokio::task::yield_now().await;
        }
        drop(first);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(tokio::time::timeout(Duration::from_secs(1), order.recv()).await.unwrap().unwrap());
        }
        assert_eq!(seen, vec![0, 1, 2]);
        window.drained().await;
    }

    #[tokio::test]
    async fn intake_stops_while_the_held_events_fill_their_bound() {
        let window = window(4, 1, 2);
        let _running = window.try_reserve().unwrap().admit(1).await;
        let waits: Vec<_> = (0..2).map(|_| tokio::spawn(window.try_reserve().unwrap().admit(1))).collect();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(window.held(), 2);
        assert!(window.try_reserve().is_none());
        assert_eq!(window.stats.intake_stalled.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A held wait given up frees its place.
        waits[0].abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while window.held() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(window.try_reserve().is_some());
    }
}
