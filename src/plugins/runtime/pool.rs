//! The worker pool: `WORKER_CONCURRENCY` OS threads, each with a current-thread tokio runtime and
//! a `LocalSet` (so plugin promises make progress), owning one VM per plugin config, running up
//! to `TASKS_PER_WORKER` tasks at once. The main side sends tasks over bounded channels (the
//! bound is the back-pressure) and awaits a oneshot reply, watching the worker's heartbeat so a
//! stalled thread is reported instead of waited on forever.
//!
//! A stalled thread is replaced and abandoned for good: its `abandoned` flag makes every
//! interrupt check of its VMs fire, so the JS it still runs stops at the next check, its loop
//! takes no more tasks and its VMs are dropped. A call lost with its thread is retried on a
//! healthy one ([`CALL_ATTEMPTS`]); only when that fails too does the caller see
//! [`PluginError::WorkerUnavailable`] (which the orchestration must not treat as a plugin error).
//!
//! **Fair share.** All plugin configs (teams) share the threads, and a synchronous JS stretch
//! (a busy loop up to `TASK_TIMEOUT`) holds its whole thread: every task queued behind it waits.
//! So calls pass an admission step ([`WorkerPool::call`]) that keeps one config from taking the
//! others' threads:
//! * each worker records which config it is polling and since when; a config whose task held
//!   its thread in one stretch longer than [`HEAVY_POLL`] is *heavy* (for [`HEAVY_FOR`] after
//!   the last such stretch, seen live or when it ended);
//! * a thread that another config is blocking right now, or that holds calls of another heavy
//!   config, gets no new calls of this config (they would only wait behind the spin);
//! * a call queued on a thread that another config blocks is taken back before it starts
//!   (the thread and the pool race for its `claim`) and admitted again elsewhere;
//! * a heavy config has at most [`HEAVY_DEPTH`] calls on one thread (a synchronous hog gains
//!   nothing from more; while it is the only config, on the threads it blocks right now); while another config is active (calls in flight or waiting, or
//!   admitted within [`HEAVY_FOR`]) it runs one call at a time, on at most `ceil(threads / 2)`
//!   threads, with a duty cycle of [`HEAVY_DUTY`] (after a call that held its thread for `t`,
//!   its next call waits `3 × t`); while a light config has calls waiting for a thread, heavy
//!   configs get no new calls (so with one thread they take turns);
//! * calls beyond a config's share wait in the pool (re-checked whenever a call ends and every
//!   [`RECHECK`]); they are never dropped, and their `TASK_TIMEOUT` starts only when they run.
//!   The wait is bounded by the heavy config's own pace (its share never drops to nothing) and
//!   the caller's window bounds how many calls wait.
//!
//! With one config active (the common case) none of this applies beyond the per-thread depth of
//! a heavy config on the threads it blocks right now: it may use every thread, and a config that
//! was heavy once (a single long stretch) runs at full depth again as soon as the stretch ended. Building a VM (code and `setupPlugin`) does not
//! count as a long stretch.
//!
//! Not here: the VM internals (`quickjs.rs`), what plugins are loaded when (the orchestration).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use super::engine::{CallArgs, Vm};
use super::quickjs::{is_allowed_import, TEST_CONSOLE_MODULE};
use super::{CallKind, MetaBindings, PluginConfigId, PluginError, PluginExports, PluginVmSpec, PoolOptions};
use crate::plugins::transform::{transform_code, TransformedCode};

/// How often a worker proves it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);
/// How many threads a call is tried on before the pool gives up on it.
pub const CALL_ATTEMPTS: usize = 2;
/// A task that holds its thread in one synchronous stretch longer than this makes its config
/// *heavy* (fair share, see the module docs). A simple `processEvent` takes well under 1 ms.
pub const HEAVY_POLL: Duration = Duration::from_millis(50);
/// How long a config stays heavy after its last long stretch.
pub const HEAVY_FOR: Duration = Duration::from_secs(10);
/// Calls of a heavy config one thread holds at most (one running, one queued behind it).
pub const HEAVY_DEPTH: usize = 2;
/// While another config is active, a heavy config runs one call at a time and after a call
/// that held its thread for `t`, waits `t × (1 / HEAVY_DUTY − 1)` before the next: it gets at
/// most this share of one thread's time (a config that spins until `TASK_TIMEOUT` fails every
/// call anyway; the others keep most of the CPU).
pub const HEAVY_DUTY: f64 = 0.25;
/// How often a call waiting for its share re-checks even when no call ended (blocked threads
/// change state with time alone).
pub const RECHECK: Duration = Duration::from_millis(50);

/// A snapshot of the pool's load.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub threads: usize,
    /// Tasks sent (or being sent) to workers and not answered yet.
    pub in_flight: usize,
    /// Indexes of workers whose heartbeat is late (stuck thread); they get no new tasks.
    pub stalled_workers: Vec<usize>,
    /// Stalled threads that were replaced by fresh ones since the pool started.
    pub replaced_workers: usize,
    /// Calls waiting for their config's fair share of the threads.
    pub waiting_for_share: usize,
}

/// What a worker thread is polling right now (written by the thread, read by the admission).
#[derive(Default)]
struct Polling {
    /// Nanoseconds since the pool started when the current poll began (+1); 0 when idle.
    since_ns: AtomicU64,
    config: AtomicI64,
}

/// Fair-share bookkeeping of one config.
struct ConfigShare {
    /// Admitted calls not answered yet, per worker thread.
    on_worker: Vec<usize>,
    /// Calls waiting for a thread.
    waiting: usize,
    /// Set by the worker threads too.
    marks: Arc<Marks>,
    /// When a call of this config was last admitted (ns since the pool started).
    last_admitted_ns: u64,
}

/// What the worker threads learn about a config's calls (times in ns since the pool started).
#[derive(Default)]
struct Marks {
    /// Heavy until then.
    heavy_until_ns: AtomicU64,
    /// While another config is active, no call of this heavy config starts before then.
    resume_ns: AtomicU64,
}

impl ConfigShare {
    fn heavy(&self, now: u64) -> bool {
        self.marks.heavy_until_ns.load(Ordering::Relaxed) > now
    }
    fn in_flight(&self) -> usize {
        self.on_worker.iter().sum()
    }
}

impl Fair {
    /// Whether a config other than `id` (which has `mine` calls admitted or waiting) is active:
    /// it has calls admitted or waiting, or had one admitted within [`HEAVY_FOR`] (so a team
    /// between two bursts keeps its threads).
    fn others_active(&self, id: PluginConfigId, mine: usize, now: u64) -> bool {
        let recent = |s: &ConfigShare| now.saturating_sub(s.last_admitted_ns) < HEAVY_FOR.as_nanos() as u64;
        self.active > mine || self.configs.iter().any(|(c, s)| *c != id && recent(s))
    }
}

/// Fair-share bookkeeping of the pool (one lock: admission decides and counts at once).
#[derive(Default)]
struct Fair {
    configs: HashMap<PluginConfigId, ConfigShare>,
    /// Configs seen heavy, pruned when they are no longer.
    heavy: Vec<PluginConfigId>,
    /// Calls admitted or waiting, every config.
    active: usize,
}

/// What a worker needs to (re)build a VM of one config.
#[derive(Clone)]
struct VmRecipe {
    plugin_config_id: PluginConfigId,
    generation: u64,
    code: Arc<TransformedCode>,
    meta: Arc<dyn MetaBindings>,
}

struct Registered {
    recipe: VmRecipe,
    exports: Option<PluginExports>,
    /// Threads that hold (or are building) a VM of this version: calls go there first, so
    /// each config lives on as few threads as its load needs.
    homes: Vec<bool>,
}

enum Task {
    Load {
        recipe: VmRecipe,
        reply: oneshot::Sender<Result<PluginExports, PluginError>>,
    },
    Call {
        recipe: VmRecipe,
        create: bool,
        method: String,
        args: CallArgs,
        kind: CallKind,
        /// The config's heavy mark, set by the thread after a long stretch (fair share).
        heavy: Option<Arc<Marks>>,
        /// Taken by the thread when the call starts, or by the pool when it withdraws the call
        /// before that (fair share): whoever takes it first decides.
        claim: Option<Arc<AtomicBool>>,
        reply: oneshot::Sender<Option<Result<Value, PluginError>>>,
    },
    Unload {
        plugin_config_id: PluginConfigId,
        reply: oneshot::Sender<()>,
    },
    Memory {
        plugin_config_id: PluginConfigId,
        reply: oneshot::Sender<Option<i64>>,
    },
}

struct Worker {
    sender: Mutex<Option<mpsc::Sender<Task>>>,
    /// The current thread's abandon flag (a replaced thread keeps its own, set).
    abandoned: Mutex<Arc<AtomicBool>>,
    in_flight: Arc<AtomicUsize>,
    heartbeat_ns: Arc<AtomicU64>,
    polling: Arc<Polling>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Inner {
    options: PoolOptions,
    workers: Vec<Worker>,
    registry: RwLock<HashMap<PluginConfigId, Registered>>,
    generation: AtomicU64,
    shut_down: AtomicBool,
    started: Instant,
    main: Option<Handle>,
    /// Stalled threads replaced so far.
    replaced: AtomicUsize,
    fair: Mutex<Fair>,
    /// Woken whenever an admitted call ends (waiting calls re-check their share).
    share_freed: Notify,
}

/// The pool of JS worker threads. Cheap to clone; all clones share the threads.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("threads", &self.inner.workers.len()).finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// Starts the threads. Call it inside the main tokio runtime: meta calls and fetches are
    /// spawned onto that runtime (without one they run on the worker threads).
    pub fn new(options: PoolOptions) -> Result<WorkerPool, PluginError> {
        let threads = options.threads.max(1);
        let main = Handle::try_current().ok();
        let started = Instant::now();
        let mut workers = Vec::with_capacity(threads);
        for index in 0..threads {
            let heartbeat_ns = Arc::new(AtomicU64::new(0));
            let abandoned = Arc::new(AtomicBool::new(false));
            let polling = Arc::new(Polling::default());
            let clocks = Clocks { heartbeat: heartbeat_ns.clone(), polling: polling.clone(), started };
            let (sender, thread) = spawn_worker(index, &options, main.clone(), clocks, abandoned.clone())?;
            workers.push(Worker {
                sender: Mutex::new(Some(sender)),
                abandoned: Mutex::new(abandoned),
                in_flight: Arc::new(AtomicUsize::new(0)),
                heartbeat_ns,
                polling,
                thread: Mutex::new(Some(thread)),
            });
        }
        Ok(WorkerPool {
            inner: Arc::new(Inner {
                options,
                workers,
                registry: RwLock::default(),
                generation: AtomicU64::new(1),
                shut_down: AtomicBool::new(false),
                started,
                main,
                replaced: AtomicUsize::new(0),
                fair: Mutex::default(),
                share_freed: Notify::new(),
            }),
        })
    }

    /// Puts a fresh thread in place of a stalled one. The stuck thread cannot be stopped while it
    /// is inside one native operation the interrupt handler does not reach (e.g. a huge BigInt's
    /// decimal conversion; regular expressions do poll it since QuickJS-ng 0.10); it is abandoned
    /// for good: its flag makes every later interrupt check fire, so it stops running JS as soon
    /// as that operation returns, takes no more tasks and drops its VMs. The configs' VMs are
    /// rebuilt lazily on the new thread.
    fn replace_stalled(&self, index: usize) {
        let worker = &self.inner.workers[index];
        let Ok(mut sender) = worker.sender.lock() else { return };
        if sender.is_none() || !self.is_stalled(index) {
            return; // shut down, or already replaced by a concurrent caller
        }
        let inner = &self.inner;
        if let Ok(flag) = worker.abandoned.lock() {
            flag.store(true, Ordering::Relaxed);
        }
        let fresh = Arc::new(AtomicBool::new(false));
        let clocks =
            Clocks { heartbeat: worker.heartbeat_ns.clone(), polling: worker.polling.clone(), started: inner.started };
        match spawn_worker(index, &inner.options, inner.main.clone(), clocks, fresh.clone()) {
            Ok((new_sender, thread)) => {
                if let Ok(mut flag) = worker.abandoned.lock() {
                    *flag = fresh;
                }
                // Give the new thread time to start beating.
                worker.heartbeat_ns.store(inner.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                *sender = Some(new_sender);
                if let Ok(mut slot) = worker.thread.lock() {
                    *slot = Some(thread);
                }
                inner.replaced.fetch_add(1, Ordering::Relaxed);
                tracing::error!(worker = index, "replaced a stalled JS worker thread; the stuck thread is abandoned");
            }
            Err(error) => tracing::error!(worker = index, %error, "could not replace a stalled JS worker thread"),
        }
    }

    pub fn options(&self) -> &PoolOptions {
        &self.inner.options
    }

    /// (Re)loads one plugin config: transform, then on one worker thread run the code, discover
    /// the exports and call `setupPlugin` (if exported). Other threads build their own VM (and
    /// run `setupPlugin`) lazily, on their first call for this config; a failure there fails
    /// that call and is retried on the next. VMs of a previous version are dropped everywhere
    /// (not torn down). On failure nothing stays registered for this id.
    pub async fn load(&self, spec: PluginVmSpec) -> Result<PluginExports, PluginError> {
        let source = spec.code;
        let test_module = self.inner.options.test_console_file.is_some();
        let allowed = move |module: &str| is_allowed_import(module) || (test_module && module == TEST_CONSOLE_MODULE);
        let code = tokio::task::spawn_blocking(move || transform_code(&source, &allowed))
            .await
            .map_err(|e| PluginError::Transform(e.to_string()))?
            .map_err(|e| PluginError::Transform(e.to_string()))?;
        let recipe = VmRecipe {
            plugin_config_id: spec.plugin_config_id,
            generation: self.inner.generation.fetch_add(1, Ordering::Relaxed),
            code: Arc::new(code),
            meta: spec.meta,
        };
        let threads = self.inner.workers.len();
        let replaced = self
            .write_registry()
            .insert(
                spec.plugin_config_id,
                Registered { recipe: recipe.clone(), exports: None, homes: vec![false; threads] },
            )
            .is_some();
        if replaced {
            // VMs of the previous version go everywhere (calls still running keep theirs).
            self.drop_vms(spec.plugin_config_id).await;
        }
        // Built and set up on one thread now; the others build theirs on their first call.
        let index = self.pick_worker(None)?;
        let (reply, answer) = oneshot::channel();
        let outcome = self.send(index, Task::Load { recipe: recipe.clone(), reply }, answer).await.and_then(|r| r);
        match &outcome {
            Ok(exports) => {
                if let Some(entry) = self.write_registry().get_mut(&spec.plugin_config_id) {
                    if entry.recipe.generation == recipe.generation {
                        entry.exports = Some(exports.clone());
                        entry.homes[index] = true;
                    }
                }
            }
            Err(_) => {
                let still_ours = {
                    let mut registry = self.write_registry();
                    let ours =
                        registry.get(&spec.plugin_config_id).is_some_and(|r| r.recipe.generation == recipe.generation);
                    if ours {
                        registry.remove(&spec.plugin_config_id);
                    }
                    ours
                };
                if still_ours {
                    self.drop_vms(spec.plugin_config_id).await;
                }
            }
        }
        outcome
    }

    /// The exports found by the last successful [`WorkerPool::load`] of this config.
    pub fn exports(&self, plugin_config_id: PluginConfigId) -> Option<PluginExports> {
        self.read_registry().get(&plugin_config_id).and_then(|r| r.exports.clone())
    }

    /// Calls `method` (an exported function or `jobs.<name>`) of this config's VM on the least
    /// busy worker thread; `meta` is appended to `args`.
    pub async fn call(
        &self,
        plugin_config_id: PluginConfigId,
        method: &str,
        args: Vec<Value>,
        kind: CallKind,
    ) -> Result<Value, PluginError> {
        self.call_with(plugin_config_id, method, CallArgs::values(args), kind).await
    }

    /// [`WorkerPool::call`] with the arguments as [`CallArgs`] (e.g. already JSON text).
    pub async fn call_with(
        &self,
        plugin_config_id: PluginConfigId,
        method: &str,
        args: CallArgs,
        kind: CallKind,
    ) -> Result<Value, PluginError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let recipe = self.recipe(plugin_config_id)?;
            let admitted = self.admit(plugin_config_id).await?;
            let index = admitted.index;
            if let Some(entry) = self.write_registry().get_mut(&plugin_config_id) {
                if entry.recipe.generation == recipe.generation {
                    entry.homes[index] = true;
                }
            }
            let (reply, answer) = oneshot::channel();
            let heavy = Some(admitted.heavy.clone());
            let claim = Arc::new(AtomicBool::new(false));
            let task = Task::Call {
                recipe,
                create: true,
                method: method.to_string(),
                args: args.clone(),
                kind,
                heavy,
                claim: Some(claim.clone()),
                reply,
            };
            let outcome = self.send_call(index, task, answer, Some((plugin_config_id, claim))).await;
            drop(admitted);
            match outcome {
                Ok(Some(result)) => return result.unwrap_or(Err(PluginError::NotLoaded(plugin_config_id))),
                // Withdrawn from behind a blocked thread before it started: admitted again.
                Ok(None) => attempt -= 1,
                // The thread was lost with the call (stalled, exited): try a healthy one.
                Err(error @ PluginError::WorkerUnavailable { .. }) if attempt < CALL_ATTEMPTS => {
                    tracing::warn!(plugin_config_id, method, %error, attempt, "retrying a call lost with its JS worker thread");
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Calls `method` on every thread that holds a VM of this config (e.g. `teardownPlugin`);
    /// one result per such thread.
    pub async fn broadcast(
        &self,
        plugin_config_id: PluginConfigId,
        method: &str,
        args: Vec<Value>,
        kind: CallKind,
    ) -> Vec<Result<Value, PluginError>> {
        let recipe = match self.recipe(plugin_config_id) {
            Ok(recipe) => recipe,
            Err(e) => return vec![Err(e)],
        };
        let args = CallArgs::values(args);
        let mut replies = Vec::new();
        for index in 0..self.inner.workers.len() {
            let (reply, answer) = oneshot::channel();
            let task = Task::Call {
                recipe: recipe.clone(),
                create: false,
                method: method.to_string(),
                args: args.clone(),
                kind,
                heavy: None,
                claim: None,
                reply,
            };
            replies.push(self.send(index, task, answer));
        }
        futures::future::join_all(replies)
            .await
            .into_iter()
            .filter_map(|r| match r {
                Ok(inner) => inner,
                Err(e) => Some(Err(e)),
            })
            .collect()
    }

    /// Forgets this config and drops its VMs on every thread (no teardown call).
    pub async fn unload(&self, plugin_config_id: PluginConfigId) {
        self.write_registry().remove(&plugin_config_id);
        {
            let mut fair = self.fair();
            if fair.configs.get(&plugin_config_id).is_some_and(|s| s.waiting == 0 && s.in_flight() == 0) {
                fair.configs.remove(&plugin_config_id);
                fair.heavy.retain(|id| *id != plugin_config_id);
            }
        }
        self.drop_vms(plugin_config_id).await;
    }

    /// Heap bytes used by this config's VM on each thread that has one (after a GC).
    pub async fn memory_usage(&self, plugin_config_id: PluginConfigId) -> Vec<i64> {
        let mut replies = Vec::new();
        for index in 0..self.inner.workers.len() {
            let (reply, answer) = oneshot::channel();
            replies.push(self.send(index, Task::Memory { plugin_config_id, reply }, answer));
        }
        futures::future::join_all(replies).await.into_iter().filter_map(|r| r.ok().flatten()).collect()
    }

    pub fn stats(&self) -> PoolStats {
        let workers = &self.inner.workers;
        PoolStats {
            threads: workers.len(),
            in_flight: workers.iter().map(|w| w.in_flight.load(Ordering::Relaxed)).sum(),
            stalled_workers: (0..workers.len()).filter(|i| self.is_stalled(*i)).collect(),
            replaced_workers: self.inner.replaced.load(Ordering::Relaxed),
            waiting_for_share: self.fair().configs.values().map(|s| s.waiting).sum(),
        }
    }

    /// Stops accepting tasks, lets the threads finish what they hold and joins them (threads
    /// that are stuck are left behind after `grace`).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shut_down.store(true, Ordering::Relaxed);
        for worker in &self.inner.workers {
            if let Ok(mut sender) = worker.sender.lock() {
                sender.take();
            }
        }
        let threads: Vec<_> =
            self.inner.workers.iter().filter_map(|w| w.thread.lock().ok().and_then(|mut t| t.take())).collect();
        let join = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = tokio::time::timeout(grace, join).await;
    }

    async fn drop_vms(&self, plugin_config_id: PluginConfigId) {
        let mut replies = Vec::new();
        for index in 0..self.inner.workers.len() {
            let (reply, answer) = oneshot::channel();
            replies.push(self.send(index, Task::Unload { plugin_config_id, reply }, answer));
        }
        futures::future::join_all(replies).await;
    }

    fn read_registry(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PluginConfigId, Registered>> {
        self.inner.registry.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_registry(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PluginConfigId, Registered>> {
        self.inner.registry.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn recipe(&self, plugin_config_id: PluginConfigId) -> Result<VmRecipe, PluginError> {
        self.read_registry()
            .get(&plugin_config_id)
            .map(|r| r.recipe.clone())
            .ok_or(PluginError::NotLoaded(plugin_config_id))
    }

    /// Late heartbeat: the thread is stuck in something the CPU deadline did not stop.
    fn is_stalled(&self, index: usize) -> bool {
        let worker = &self.inner.workers[index];
        let beat = worker.heartbeat_ns.load(Ordering::Relaxed);
        let now = self.inner.started.elapsed().as_nanos() as u64;
        let limit = self.stall_limit().as_nanos() as u64;
        // A worker that has never beaten is still starting, unless that takes far too long.
        now.saturating_sub(beat) > limit
    }

    fn stall_limit(&self) -> Duration {
        self.inner.options.stall_after.unwrap_or(self.inner.options.task_timeout * 2 + Duration::from_secs(5))
    }

    /// The thread for a load: the least busy healthy one.
    fn pick_worker(&self, plugin_config_id: Option<PluginConfigId>) -> Result<usize, PluginError> {
        if self.inner.shut_down.load(Ordering::Relaxed) {
            return Err(PluginError::ShutDown);
        }
        let healthy = self.healthy()?;
        Ok(self.pick_among(plugin_config_id, &healthy).unwrap_or(healthy[0]))
    }

    /// Healthy (not stalled) threads; an error when there is none.
    #[allow(clippy::result_large_err)] // PluginError is the pool's error everywhere
    fn healthy(&self) -> Result<Vec<usize>, PluginError> {
        let healthy: Vec<usize> = (0..self.inner.workers.len()).filter(|i| !self.is_stalled(*i)).collect();
        if healthy.is_empty() {
            return Err(PluginError::WorkerUnavailable { worker: 0, reason: "every worker thread is stalled".into() });
        }
        Ok(healthy)
    }

    /// Among `candidates`: for a config, the least busy of the threads that already hold its VM
    /// while one of them has a free task slot; otherwise the least busy thread.
    fn pick_among(&self, plugin_config_id: Option<PluginConfigId>, candidates: &[usize]) -> Option<usize> {
        let load = |i: &usize| self.inner.workers[*i].in_flight.load(Ordering::Relaxed);
        if let Some(id) = plugin_config_id {
            let registry = self.read_registry();
            let homes = registry.get(&id).map(|r| r.homes.as_slice()).unwrap_or_default();
            let home = candidates
                .iter()
                .copied()
                .filter(|i| homes.get(*i).copied().unwrap_or(false))
                .min_by_key(load)
                .filter(|i| load(i) < self.inner.options.tasks_per_worker.max(1));
            if home.is_some() {
                return home;
            }
        }
        candidates.iter().copied().min_by_key(load)
    }

    fn fair(&self) -> std::sync::MutexGuard<'_, Fair> {
        self.inner.fair.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.inner.started.elapsed().as_nanos() as u64
    }

    /// Waits until this config's fair share has room on a thread and takes it (see the module
    /// docs). The returned guard gives the share back when dropped.
    async fn admit(&self, plugin_config_id: PluginConfigId) -> Result<Admitted<'_>, PluginError> {
        let mut waiting = Waiting { pool: self, plugin_config_id, registered: false };
        let mut heavy;
        loop {
            let freed = self.inner.share_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut fair = self.fair();
                if let Some((index, heavy)) = self.try_admit(&mut fair, plugin_config_id)? {
                    if waiting.registered {
                        waiting.registered = false;
                        if let Some(share) = fair.configs.get_mut(&plugin_config_id) {
                            share.waiting -= 1;
                        }
                    } else {
                        fair.active += 1;
                    }
                    if let Some(share) = fair.configs.get_mut(&plugin_config_id) {
                        share.on_worker[index] += 1;
                        share.last_admitted_ns = self.now_ns();
                    }
                    return Ok(Admitted { pool: self, plugin_config_id, index, heavy });
                }
                if !waiting.registered {
                    waiting.registered = true;
                    fair.active += 1;
                    if let Some(share) = fair.configs.get_mut(&plugin_config_id) {
                        share.waiting += 1;
                    }
                }
                // A heavy config's calls last longer than RECHECK: its waiting calls re-check on
                // the timer only, not after every call of the others (that would cost each of
                // their calls a pass over all of them).
                let now = self.now_ns();
                heavy = fair.configs.get(&plugin_config_id).is_some_and(|s| s.heavy(now));
            }
            if heavy {
                tokio::time::sleep(RECHECK).await;
            } else {
                let _ = tokio::time::timeout(RECHECK, freed).await;
            }
        }
    }

    /// The thread this config's next call may go to now, or `None` when it must wait.
    #[allow(clippy::result_large_err)]
    fn try_admit(&self, fair: &mut Fair, id: PluginConfigId) -> Result<Option<(usize, Arc<Marks>)>, PluginError> {
        if self.inner.shut_down.load(Ordering::Relaxed) {
            return Err(PluginError::ShutDown);
        }
        let healthy = self.healthy()?;
        let threads = self.inner.workers.len();
        let now = self.now_ns();
        let heavy_poll = HEAVY_POLL.as_nanos() as u64;
        let mark_until = now + HEAVY_FOR.as_nanos() as u64;
        // Threads another config blocks right now (a long synchronous stretch, seen live), and
        // those this config blocks.
        let mut reserved = vec![false; threads];
        let mut blocked_by_me = vec![false; threads];
        for (index, worker) in self.inner.workers.iter().enumerate() {
            let since = worker.polling.since_ns.load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since - 1) > heavy_poll {
                let config = worker.polling.config.load(Ordering::Relaxed);
                if let Some(share) = fair.configs.get(&config) {
                    share.marks.heavy_until_ns.fetch_max(mark_until, Ordering::Relaxed);
                    if !fair.heavy.contains(&config) {
                        fair.heavy.push(config);
                    }
                }
                reserved[index] = config != id;
                blocked_by_me[index] = config == id;
            }
        }
        let me = fair.configs.entry(id).or_insert_with(|| ConfigShare {
            on_worker: vec![0; threads],
            waiting: 0,
            marks: Arc::default(),
            last_admitted_ns: 0,
        });
        let heavy_me = me.heavy(now);
        let mine = me.in_flight() + me.waiting;
        let my_threads: Vec<bool> = me.on_worker.iter().map(|n| *n > 0).collect();
        let my_depth = me.on_worker.clone();
        let heavy_mark = me.marks.clone();
        if heavy_me && !fair.heavy.contains(&id) {
            fair.heavy.push(id);
        }
        // Threads holding calls of another heavy config.
        let configs = &fair.configs;
        fair.heavy.retain(|h| configs.get(h).is_some_and(|s| s.heavy(now) || s.in_flight() > 0));
        for h in fair.heavy.iter().filter(|h| **h != id) {
            if let Some(share) = fair.configs.get(h).filter(|s| s.heavy(now)) {
                for (index, n) in share.on_worker.iter().enumerate() {
                    if *n > 0 {
                        reserved[index] = true;
                    }
                }
            }
        }
        let mut allowed: Vec<usize> = healthy.into_iter().filter(|i| !reserved[*i]).collect();
        if heavy_me {
            // "Another config is active" lasts [`HEAVY_FOR`] past its last call, so a team
            // between two bursts keeps its threads.
            let others_active = fair.others_active(id, mine, now);
            if others_active {
                let starved = fair.configs.iter().any(|(c, s)| *c != id && s.waiting > 0 && !s.heavy(now));
                if starved {
                    return Ok(None);
                }
                // Over or at the cap: only the first `cap` threads it holds (the others drain).
                let cap = threads.div_ceil(2);
                let kept: Vec<usize> = (0..threads).filter(|i| my_threads[*i]).take(cap).collect();
                if kept.len() >= cap {
                    allowed.retain(|i| kept.contains(i));
                }
                // One call at a time, and [`HEAVY_DUTY`] of a thread's time at most.
                if my_depth.iter().sum::<usize>() > 0 || heavy_mark.resume_ns.load(Ordering::Relaxed) > now {
                    return Ok(None);
                }
                allowed.retain(|i| my_depth[*i] < HEAVY_DEPTH);
            } else {
                // Alone, the depth limit holds only on the threads it blocks right now: one long
                // stretch (a GC pause, page faults, preemption on a loaded machine) must not
                // leave a config that is the only one at two calls per thread for HEAVY_FOR
                // (a simple plugin fell from ~11,000 to ~500 events/s on one thread).
                allowed.retain(|i| my_depth[*i] < HEAVY_DEPTH || !blocked_by_me[*i]);
            }
        }
        let picked = self.pick_among(Some(id), &allowed);
        Ok(picked.map(|index| (index, heavy_mark)))
    }

    /// Sends a task (waiting for room: back-pressure) and awaits its reply while watching the
    /// worker's heartbeat.
    async fn send<T>(&self, index: usize, task: Task, answer: oneshot::Receiver<T>) -> Result<T, PluginError> {
        self.send_call(index, task, answer, None)
            .await?
            .ok_or(PluginError::WorkerUnavailable { worker: index, reason: "the task was withdrawn".into() })
    }

    /// [`WorkerPool::send`]; with `claim` (a call of that config) the task is withdrawn
    /// (`Ok(None)`) when it has not started yet and waits behind a thread that another config
    /// blocks, or that its own config blocks while holding more than [`HEAVY_DEPTH`] calls
    /// there or while another config is active: the caller re-admits it where its share allows
    /// (fair share).
    async fn send_call<T>(
        &self,
        index: usize,
        task: Task,
        answer: oneshot::Receiver<T>,
        claim: Option<(PluginConfigId, Arc<AtomicBool>)>,
    ) -> Result<Option<T>, PluginError> {
        let worker = &self.inner.workers[index];
        let unavailable = |reason: &str| PluginError::WorkerUnavailable { worker: index, reason: reason.to_string() };
        let sender = worker.sender.lock().ok().and_then(|s| s.clone()).ok_or(PluginError::ShutDown)?;
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&worker.in_flight);
        let delivered = async {
            sender.send(task).await.map_err(|_| unavailable("the thread has exited"))?;
            answer.await.map_err(|_| unavailable("the thread dropped the task"))
        };
        let watchdog = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if self.is_stalled(index) {
                    return;
                }
            }
        };
        let withdraw = async {
            let Some((id, claim)) = claim else { return std::future::pending().await };
            loop {
                tokio::time::sleep(RECHECK).await;
                if claim.load(Ordering::Acquire) {
                    return std::future::pending().await; // started: it runs to its end here
                }
                if self.queued_behind_block(index, id) && !claim.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        };
        tokio::select! {
            reply = delivered => reply.map(Some),
            _ = watchdog => {
                tracing::error!(worker = index, "JS worker thread is stalled; its task is abandoned");
                self.replace_stalled(index);
                Err(unavailable("the thread is stalled"))
            }
            _ = withdraw => Ok(None),
        }
    }

    /// Whether a call of `id` that has not started on thread `index` waits behind a long
    /// synchronous stretch it should not wait for (see [`WorkerPool::send_call`]).
    fn queued_behind_block(&self, index: usize, id: PluginConfigId) -> bool {
        let polling = &self.inner.workers[index].polling;
        let since = polling.since_ns.load(Ordering::Relaxed);
        if since == 0 || self.now_ns().saturating_sub(since - 1) <= HEAVY_POLL.as_nanos() as u64 {
            return false;
        }
        if polling.config.load(Ordering::Relaxed) != id {
            return true;
        }
        // Behind its own config: past the depth of a heavy config, or at all while another
        // config is active (then it runs one call at a time).
        let fair = self.fair();
        let now = self.now_ns();
        fair.configs
            .get(&id)
            .is_some_and(|s| s.on_worker[index] > HEAVY_DEPTH || fair.others_active(id, s.in_flight() + s.waiting, now))
    }
}

/// A call's place in its config's share; given back (and waiting calls woken) on drop.
struct Admitted<'a> {
    pool: &'a WorkerPool,
    plugin_config_id: PluginConfigId,
    index: usize,
    heavy: Arc<Marks>,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        {
            let mut fair = self.pool.fair();
            fair.active = fair.active.saturating_sub(1);
            if let Some(share) = fair.configs.get_mut(&self.plugin_config_id) {
                share.on_worker[self.index] = share.on_worker[self.index].saturating_sub(1);
            }
        }
        self.pool.inner.share_freed.notify_waiters();
    }
}

/// A call waiting for its share (counted while it waits, also when its caller gives up).
struct Waiting<'a> {
    pool: &'a WorkerPool,
    plugin_config_id: PluginConfigId,
    registered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.registered {
            let mut fair = self.pool.fair();
            fair.active = fair.active.saturating_sub(1);
            if let Some(share) = fair.configs.get_mut(&self.plugin_config_id) {
                share.waiting = share.waiting.saturating_sub(1);
            }
        }
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The VMs of one worker thread.
#[derive(Default)]
struct Vms {
    vms: HashMap<PluginConfigId, (u64, Vm)>,
    /// Serializes creation per config so concurrent calls don't build it twice.
    creating: HashMap<PluginConfigId, Rc<tokio::sync::Mutex<()>>>,
}

/// What a worker thread reports about itself: its heartbeat and what it is polling.
struct Clocks {
    heartbeat: Arc<AtomicU64>,
    polling: Arc<Polling>,
    started: Instant,
}

fn spawn_worker(
    index: usize,
    options: &PoolOptions,
    main: Option<Handle>,
    clocks: Clocks,
    abandoned: Arc<AtomicBool>,
) -> Result<(mpsc::Sender<Task>, std::thread::JoinHandle<()>), PluginError> {
    let (sender, receiver) = mpsc::channel(options.tasks_per_worker.max(1));
    let options = options.clone();
    let thread = std::thread::Builder::new()
        .name(format!("js-worker-{index}"))
        // Room for the VM's own stack limit plus Rust frames around it.
        .stack_size(options.max_stack_bytes.max(1 << 20) * 4 + (8 << 20))
        .spawn(move || worker_main(receiver, options, main, clocks, abandoned))
        .map_err(|e| PluginError::WorkerUnavailable { worker: index, reason: e.to_string() })?;
    Ok((sender, thread))
}

fn worker_main(
    mut receiver: mpsc::Receiver<Task>,
    options: PoolOptions,
    main: Option<Handle>,
    clocks: Clocks,
    abandoned: Arc<AtomicBool>,
) {
    let Clocks { heartbeat, polling, started } = clocks;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "could not start a JS worker thread's runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let beat = heartbeat.clone();
        let ticker = tokio::task::spawn_local(async move {
            loop {
                beat.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        });
        let vms: Rc<RefCell<Vms>> = Rc::default();
        let permits = Arc::new(Semaphore::new(options.tasks_per_worker.max(1)));
        let options = Rc::new(options);
        while let Some(task) = receiver.recv().await {
            if abandoned.load(Ordering::Relaxed) {
                break; // replaced: the task's sender sees it dropped and retries elsewhere
            }
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let vms = vms.clone();
            let options = options.clone();
            let main = main.clone();
            let abandoned = abandoned.clone();
            let tracked = Tracked {
                polling: polling.clone(),
                started,
                config: task.plugin_config_id(),
                heavy: task.heavy_mark(),
                busy: Duration::ZERO,
                task: Box::pin(async move {
                    run_task(task, &vms, &options, main, abandoned).await;
                    drop(permit);
                }),
            };
            tokio::task::spawn_local(tracked);
        }
        receiver.close();
        // Channel closed: let running tasks finish, then drop the VMs on this thread.
        let _ = permits.acquire_many(options.tasks_per_worker.max(1) as u32).await;
        ticker.abort();
        vms.borrow_mut().vms.clear();
    });
}

impl Task {
    fn plugin_config_id(&self) -> PluginConfigId {
        match self {
            Task::Load { recipe, .. } | Task::Call { recipe, .. } => recipe.plugin_config_id,
            Task::Unload { plugin_config_id, .. } | Task::Memory { plugin_config_id, .. } => *plugin_config_id,
        }
    }

    fn heavy_mark(&self) -> Option<Arc<Marks>> {
        match self {
            Task::Call { heavy, .. } => heavy.clone(),
            _ => None,
        }
    }
}

/// A task future that publishes each poll (which config, since when) in the thread's
/// [`Polling`], and marks its config heavy after a poll longer than [`HEAVY_POLL`].
struct Tracked {
    polling: Arc<Polling>,
    started: Instant,
    config: PluginConfigId,
    heavy: Option<Arc<Marks>>,
    /// Time spent inside this task's polls so far.
    busy: Duration,
    task: Pin<Box<dyn Future<Output = ()>>>,
}

impl Future for Tracked {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let began = self.started.elapsed();
        let building_before = BUILDING.with(Cell::get);
        self.polling.config.store(self.config, Ordering::Relaxed);
        self.polling.since_ns.store(began.as_nanos() as u64 + 1, Ordering::Relaxed);
        let outcome = self.task.as_mut().poll(cx);
        let ended = self.started.elapsed();
        self.polling.since_ns.store(0, Ordering::Relaxed);
        // Building a VM (its code and `setupPlugin`, slow in a debug build) is not the call's
        // own work: it does not make a config heavy.
        let building = BUILDING.with(Cell::get).saturating_sub(building_before);
        let took = ended.saturating_sub(began).saturating_sub(building);
        self.busy += took;
        if let Some(marks) = &self.heavy {
            if took > HEAVY_POLL {
                marks.heavy_until_ns.fetch_max((ended + HEAVY_FOR).as_nanos() as u64, Ordering::Relaxed);
            }
            if outcome.is_ready() && self.busy > HEAVY_POLL {
                let pause = self.busy.mul_f64(1.0 / HEAVY_DUTY - 1.0);
                marks.resume_ns.fetch_max((ended + pause).as_nanos() as u64, Ordering::Relaxed);
            }
        }
        outcome
    }
}

/// Drops `vm` from this thread if it was discarded (it runs no more JS; the next call of its
/// config builds a fresh one).
fn forget_if_discarded(vms: &Rc<RefCell<Vms>>, vm: &Vm) {
    if vm.is_discarded() {
        let mut vms = vms.borrow_mut();
        if vms.vms.get(&vm.plugin_config_id()).is_some_and(|(_, held)| held.same(vm)) {
            vms.vms.remove(&vm.plugin_config_id());
        }
    }
}

async fn run_task(
    task: Task,
    vms: &Rc<RefCell<Vms>>,
    options: &PoolOptions,
    main: Option<Handle>,
    abandoned: Arc<AtomicBool>,
) {
    match task {
        Task::Load { recipe, reply } => {
            vms.borrow_mut().vms.remove(&recipe.plugin_config_id);
            let result = vm_for(vms, &recipe, options, main, abandoned).await.map(|vm| vm.exports());
            let _ = reply.send(result);
        }
        Task::Call { recipe, create, method, args, kind, reply, claim, .. } => {
            if claim.is_some_and(|claim| claim.swap(true, Ordering::AcqRel)) {
                return; // withdrawn by the pool before it started: admitted elsewhere
            }
            let existing = {
                let vms = vms.borrow();
                // A newer VM (a reload raced this call) serves it too; an older one never does,
                // nor a discarded one.
                vms.vms
                    .get(&recipe.plugin_config_id)
                    .filter(|(g, vm)| *g >= recipe.generation && !vm.is_discarded())
                    .map(|(_, vm)| vm.clone())
            };
            let vm = match existing {
                Some(vm) => Some(Ok(vm)),
                None if create => Some(vm_for(vms, &recipe, options, main, abandoned).await),
                None => None,
            };
            let result = match vm {
                Some(Ok(vm)) => {
                    let result = vm.call(&method, args, kind).await;
                    forget_if_discarded(vms, &vm);
                    Some(result)
                }
                Some(Err(e)) => Some(Err(e)),
                None => None,
            };
            let _ = reply.send(result);
        }
        Task::Unload { plugin_config_id, reply } => {
            let removed = vms.borrow_mut().vms.remove(&plugin_config_id);
            drop(removed);
            let _ = reply.send(());
        }
        Task::Memory { plugin_config_id, reply } => {
            let vm = vms.borrow().vms.get(&plugin_config_id).map(|(_, vm)| vm.clone());
            let _ = reply.send(vm.map(|vm| vm.memory_used()));
        }
    }
}

thread_local! {
    /// Time this thread spent building VMs (see [`Tracked`]).
    static BUILDING: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Adds the time from its creation to its drop to [`BUILDING`].
struct Building(Instant);

impl Drop for Building {
    fn drop(&mut self) {
        BUILDING.with(|b| b.set(b.get() + self.0.elapsed()));
    }
}

/// This thread's VM for `recipe`, built (code + `setupPlugin`) if missing or outdated.
async fn vm_for(
    vms: &Rc<RefCell<Vms>>,
    recipe: &VmRecipe,
    options: &PoolOptions,
    main: Option<Handle>,
    abandoned: Arc<AtomicBool>,
) -> Result<Vm, PluginError> {
    let id = recipe.plugin_config_id;
    let lock = vms.borrow_mut().creating.entry(id).or_default().clone();
    let _guard = lock.lock().await;
    if let Some((generation, vm)) = vms.borrow().vms.get(&id) {
        if *generation >= recipe.generation && !vm.is_discarded() {
            return Ok(vm.clone());
        }
    }
    let building = Building(Instant::now());
    let vm = Vm::create(id, &recipe.code, recipe.meta.clone(), options, main, abandoned).await?;
    if vm.exports().has("setupPlugin") {
        vm.call("setupPlugin", CallArgs::values(Vec::new()), CallKind::Method).await?;
    }
    drop(building);
    let mut vms = vms.borrow_mut();
    if let Some((_, newer)) = vms.vms.get(&id).filter(|(g, _)| *g > recipe.generation) {
        // A reload finished while this one was being set up: keep the newer VM.
        return Ok(newer.clone());
    }
    vms.vms.insert(id, (recipe.generation, vm.clone()));
    Ok(vm)
}
