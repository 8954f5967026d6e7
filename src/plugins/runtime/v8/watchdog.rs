//! The CPU deadline of V8 calls: one process-wide thread that interrupts an isolate whose armed
//! deadline passed (the interrupt records where JS was, for the loop-timeout message, and calls
//! `TerminateExecution`; if it is not served within `GRACE`, the watchdog terminates directly) (V8 checks for it at loop back-edges, function entries and
//! inside the regexp engine's backtracking, so `for(;;){}` and a regex bomb both stop).
//!
//! Invariant: the watchdog touches an isolate only under its lock and only while the isolate's
//! deadline is armed; disarming takes the same lock, so once [`Armed::disarm`] returned the
//! isolate may be freed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::ffi;

struct Target {
    iso: *mut ffi::Iso,
    fired: Arc<AtomicBool>,
    /// The second stage: the interrupt asked for at the deadline was not served (a native
    /// stretch that checks only for termination), so terminate outright.
    hard: bool,
}

/// How long the interrupt at the deadline (which records where JS was) may take before the
/// watchdog terminates without it.
const GRACE: Duration = Duration::from_millis(250);

// SAFETY: the pointer is only used for `pst_v8_terminate`, which V8 allows from any thread, and
// only while the owner keeps the isolate alive (it disarms before freeing it, under the lock).
unsafe impl Send for Target {}

#[derive(Default)]
struct Targets {
    targets: BTreeMap<(Instant, u64), Target>,
    /// When the sleeping watchdog wakes by itself: arming a later deadline need not wake it (a
    /// wake-up per call would cost a context switch per call).
    wakes_at: Option<Instant>,
}

/// How long the watchdog sleeps with nothing armed.
const IDLE_NAP: Duration = Duration::from_secs(1);

struct Watchdog {
    state: Mutex<Targets>,
    wake: Condvar,
    next: AtomicU64,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let dog: &'static Watchdog =
            Box::leak(Box::new(Watchdog { state: Mutex::default(), wake: Condvar::new(), next: AtomicU64::new(0) }));
        let spawned = std::thread::Builder::new().name("v8-watchdog".into()).spawn(move || dog.run());
        if let Err(error) = spawned {
            // Without the thread no deadline fires; calls still end, but a loop would not.
            tracing::error!(%error, "could not start the V8 watchdog thread");
        }
        dog
    })
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, Targets> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run(&self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let first = state.targets.keys().next().copied();
            state = match first {
                Some(key) if key.0 <= now => {
                    if let Some(target) = state.targets.remove(&key) {
                        target.fired.store(true, Ordering::SeqCst);
                        if target.hard {
                            // SAFETY: armed targets are alive (see the module invariant).
                            unsafe { ffi::pst_v8_terminate(target.iso) };
                        } else {
                            // SAFETY: as above.
                            unsafe { ffi::pst_v8_interrupt(target.iso) };
                            let later = (key.0 + GRACE, key.1);
                            state.targets.insert(later, Target { hard: true, ..target });
                        }
                    }
                    state
                }
                other => {
                    let until = other.map_or(now + IDLE_NAP, |key| key.0);
                    state.wakes_at = Some(until);
                    let mut state = match self.wake.wait_timeout(state, until - now) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                    state.wakes_at = None;
                    state
                }
            };
        }
    }
}

/// A deadline armed for one isolate; [`Armed::disarm`] tells whether it fired.
pub struct Armed {
    key: (Instant, u64),
    fired: Arc<AtomicBool>,
    done: bool,
}

/// Arms `deadline` for `iso` (alive until the returned value is disarmed or dropped).
pub fn arm(iso: *mut ffi::Iso, deadline: Instant) -> Armed {
    let dog = watchdog();
    let key = (deadline, dog.next.fetch_add(1, Ordering::Relaxed));
    let fired = Arc::new(AtomicBool::new(false));
    let mut state = dog.lock();
    state.targets.insert(key, Target { iso, fired: fired.clone(), hard: false });
    if state.wakes_at.is_none_or(|at| deadline < at) {
        dog.wake.notify_one();
    }
    drop(state);
    Armed { key, fired, done: false }
}

impl Armed {
    /// Disarms; true when the deadline fired (the isolate was asked to terminate).
    pub fn disarm(mut self) -> bool {
        self.remove();
        self.fired.load(Ordering::SeqCst)
    }

    fn remove(&mut self) {
        if !self.done {
            let mut state = watchdog().lock();
            state.targets.remove(&self.key);
            state.targets.remove(&(self.key.0 + GRACE, self.key.1));
            self.done = true;
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.remove();
    }
}
