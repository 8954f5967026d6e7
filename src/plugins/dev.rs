//! The plugin dev loop: `plugin-server plugin run PATH --event FILE.json` and
//! `plugin-server plugin check PATH`.
//!
//! `run` loads a plugin (a folder with plugin.json, or a .zip/.tgz archive) the way the server
//! does (`loader`, `manager::config_in_force`: `main`, the config schema's defaults, TypeScript and
//! the import allow-list through `transform`), sets it up through the same `LazyVm` on the same
//! `WorkerPool` (one thread, `TASK_TIMEOUT` and the VM memory limit of production), runs the
//! pipeline's steps on each event of the file (`processEvent` unless `$snapshot`, then `onEvent` /
//! `onSnapshot`, through `run`), the scheduled tasks asked for, and the teardown (which flushes an
//! exportEvents buffer). Storage, cache, log entries, captures, jobs and the config's recorded errors
//! live in memory (`plugins::memory`): no Postgres or Redis. `fetch` is refused unless
//! `--allow-fetch`. It prints, per step, the calls with their time and the VM's heap after them,
//! the log lines, the errors, the storage/cache writes, captures and jobs, then the resulting
//! events; `--json` prints the same as one JSON document. Exit code 0 when every call succeeded.
//!
//! `check` validates plugin.json (name, config schema, the main file) and the code (parse,
//! TypeScript, the import allow-list) and lists every problem; exit code 0 when there is none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::archive::file_from_archive;
use super::extensions::{PluginContext, PluginRun, PluginServices, RunObserver};
use super::lazy::{LazyVm, LoadOptions};
use super::loader::load_code;
use super::manager::config_in_force;
use super::memory::{MemoryCache, MemoryCapture, MemoryJobs, MemoryLogSink, MemoryRecords, MemoryStorage};
use super::pooled_vm::{Fetcher, RuntimeVmFactory};
use super::rows::{Attachment, Plugin, PluginConfigRow, PluginRow};
use super::run::{self, ConfigEntry};
use super::runtime::{self, FetchError, FetchRequest, FetchResponse, MetaError, PoolOptions, WorkerPool};
use super::vm_boundary::{Method, TaskKind};
use crate::config::Config;
use crate::event::PluginEvent;
use crate::hub::Hub;

/// `writeln!` into a `String` (which cannot fail).
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// `plugin-server plugin …`
#[derive(Parser, Debug)]
#[command(name = "plugin-server plugin", about = "Run or check a plugin locally, without Postgres or Redis")]
struct PluginCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load a plugin as the server does, set it up, run it on the events of a file and print what
    /// it did. Exit code 0 when every call succeeded, 1 otherwise.
    Run(RunArgs),
    /// Validate plugin.json and the code (parse, TypeScript, imports). Exit code 0 when valid.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The plugin: a folder with plugin.json, or a .zip / .tgz archive.
    path: PathBuf,
    /// A JSON file holding one event or an array of events (capture's `{event, properties, …}`).
    #[arg(long, value_name = "FILE.json")]
    event: Option<PathBuf>,
    /// A config value (`meta.config.KEY`); plugin.json's defaults fill the keys not given.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// An attachment (`meta.attachments.KEY`) read from FILE.
    #[arg(long = "attachment", value_name = "KEY=FILE")]
    attachments: Vec<String>,
    /// Let the plugin's `fetch` reach the network (refused by default).
    #[arg(long)]
    allow_fetch: bool,
    /// Run a scheduled task (runEveryMinute, runEveryHour, runEveryDay) after the events.
    #[arg(long = "run-task", value_name = "NAME")]
    tasks: Vec<String>,
    /// The team id of events that have none.
    #[arg(long, default_value_t = 2)]
    team_id: i64,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The plugin: a folder with plugin.json, or a .zip / .tgz archive.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Why the dev loop could not start (a problem with its input, not with the plugin's calls).
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not JSON: {source}")]
    NotJson { path: String, source: serde_json::Error },
    #[error("event {index} of {path}: {reason}")]
    BadEvent { path: String, index: usize, reason: String },
    #[error("{0}: expected KEY=VALUE")]
    BadPair(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    /// The worker pool's error, as text (`PluginError` is large).
    #[error("cannot start the JavaScript worker: {0}")]
    Pool(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs `plugin-server plugin <args…>` (`args` without the program name and `plugin`) and returns
/// the exit code: 0 when everything succeeded, 1 when a call failed or the plugin is invalid, 2
/// for a usage error.
pub fn main(args: Vec<String>) -> i32 {
    let cli = match PluginCli::try_parse_from(std::iter::once("plugin-server plugin".to_string()).chain(args)) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(DevError::Runtime)
            .and_then(|runtime| runtime.block_on(run_command(args))),
        Command::Check(args) => Ok(check_command(&args)),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("plugin-server plugin: {error}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

/// The plugin's files as the loader sees them.
enum Source {
    Folder(PathBuf),
    Archive(Vec<u8>),
}

impl Source {
    fn open(path: &Path) -> Result<Source, DevError> {
        if path.is_dir() {
            let absolute = std::fs::canonicalize(path).map_err(|source| read_error(path, source))?;
            Ok(Source::Folder(absolute))
        } else {
            std::fs::read(path).map(Source::Archive).map_err(|source| read_error(path, source))
        }
    }

    /// A file of the plugin: `Ok(None)` when absent, `Err` when the archive cannot be read.
    fn file(&self, name: &str) -> Result<Option<String>, String> {
        match self {
            Source::Folder(folder) => Ok(std::fs::read_to_string(folder.join(name)).ok()),
            Source::Archive(bytes) => file_from_archive(bytes, name).map_err(|error| error.to_string()),
        }
    }

    /// plugin.json parsed: `Ok(None)` when absent.
    fn plugin_json(&self) -> Result<Option<Value>, String> {
        match self.file("plugin.json")? {
            None => Ok(None),
            Some(text) => {
                serde_json::from_str(&text).map(Some).map_err(|error| format!("plugin.json is not JSON: {error}"))
            }
        }
    }

    /// The `posthog_plugin` row the server would have for it.
    fn plugin_row(&self, name: Option<String>) -> PluginRow {
        let (plugin_type, url, archive) = match self {
            Source::Folder(folder) => ("local", Some(format!("file:{}", folder.display())), None),
            Source::Archive(bytes) => ("custom", None, Some(bytes.clone())),
        };
        PluginRow {
            id: 1,
            organization_id: Uuid::nil(),
            plugin_type: Some(plugin_type.into()),
            is_global: false,
            name,
            url,
            config_schema: Value::Object(Map::new()),
            tag: None,
            archive,
            source: None,
            capabilities: json!({}),
            metrics: None,
            updated_at: Utc::now(),
        }
    }
}

fn read_error(path: &Path, source: std::io::Error) -> DevError {
    DevError::Read { path: path.display().to_string(), source }
}

fn split_pair(pair: &str) -> Result<(String, String), DevError> {
    match pair.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(DevError::BadPair(pair.to_string())),
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|extension| extension.to_str()).unwrap_or_default() {
        "json" => "application/json",
        "csv" => "text/csv",
        "txt" => "text/plain",
        "html" => "text/html",
        "js" => "application/javascript",
        _ => "application/octet-stream",
    }
}

fn read_attachment(pair: &str) -> Result<(String, Attachment), DevError> {
    let (key, file) = split_pair(pair)?;
    let path = PathBuf::from(file);
    let contents = std::fs::read(&path).map_err(|source| read_error(&path, source))?;
    let file_name = path.file_name().map(|name| name.to_string_lossy().into_owned());
    Ok((key, Attachment { content_type: Some(content_type(&path).into()), file_name, contents }))
}

/// The events of the file, filled as capture and the queues fill them before plugins see them:
/// `team_id` (from `--team-id`), `uuid` (a new UUIDT), `now` and `timestamp` (now), `site_url`,
/// `ip` and `distinct_id` (from `properties.distinct_id` as capture takes it).
fn read_events(path: &Path, team_id: i64) -> Result<Vec<PluginEvent>, DevError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| read_error(path, source))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|source| DevError::NotJson { path: name.clone(), source })?;
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    let now = crate::js::iso_now();
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let bad = |reason: String| DevError::BadEvent { path: name.clone(), index: index + 1, reason };
            let Value::Object(mut fields) = item else { return Err(bad("not a JSON object".into())) };
            if !fields.contains_key("event") {
                return Err(bad("no \"event\" name".into()));
            }
            let from_properties =
                fields.get("properties").and_then(|properties| properties.get("distinct_id")).cloned();
            if let (false, Some(distinct_id)) = (fields.contains_key("distinct_id"), from_properties) {
                fields.insert("distinct_id".into(), distinct_id);
            }
            let defaults = [
                ("team_id", json!(team_id)),
                ("uuid", json!(crate::ingestion::uuidt::new_uuidt().to_string())),
                ("now", json!(now)),
                ("timestamp", json!(now)),
                ("site_url", json!("")),
                ("ip", Value::Null),
            ];
            for (key, default) in defaults {
                if !fields.contains_key(key) {
                    fields.insert(key.into(), default);
                }
            }
            if fields.get("site_url").is_some_and(Value::is_null) {
                fields.insert("site_url".into(), json!(""));
            }
            serde_json::from_value(Value::Object(fields)).map_err(|error| bad(error.to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running

/// Every plugin call the runners report, in order.
#[derive(Default)]
struct CallLog {
    calls: Mutex<Vec<Call>>,
}

#[derive(Debug, Clone)]
struct Call {
    function: String,
    elapsed: Duration,
    failed: bool,
    heap_bytes: Option<i64>,
}

impl CallLog {
    fn len(&self) -> usize {
        self.calls.lock().map(|calls| calls.len()).unwrap_or(0)
    }

    fn since(&self, start: usize) -> Vec<Call> {
        self.calls.lock().map(|calls| calls.get(start..).unwrap_or_default().to_vec()).unwrap_or_default()
    }

    fn push(&self, call: Call) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }

    /// Sets the heap size on the calls from `start` on.
    fn set_heap(&self, start: usize, heap_bytes: Option<i64>) {
        if let Ok(mut calls) = self.calls.lock() {
            for call in calls.iter_mut().skip(start) {
                call.heap_bytes = call.heap_bytes.or(heap_bytes);
            }
        }
    }
}

struct Recorder(Arc<CallLog>);

impl RunObserver for Recorder {
    fn plugin_ran(&self, run: &PluginRun<'_>) {
        let function = match run.task {
            Some((_, name)) => name.to_string(),
            None => run.function.to_string(),
        };
        self.0.push(Call { function, elapsed: run.elapsed, failed: run.failed, heap_bytes: None });
    }
}

/// The default `fetch` of the dev loop: refused, with a message saying how to allow it.
struct RefuseFetch;

#[async_trait]
impl Fetcher for RefuseFetch {
    async fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, MetaError> {
        Err(FetchError::refused(&request.url, "fetch is off in the plugin dev loop (run it with --allow-fetch)").into())
    }
}

/// How long no new console line must arrive for a step's lines to count as complete.
const CONSOLE_QUIET: std::time::Duration = std::time::Duration::from_millis(25);
/// The longest a step waits for its console lines.
const CONSOLE_SETTLE_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// The in-memory stores and where each stood when a step began.
struct Stores {
    storage: Arc<MemoryStorage>,
    cache: Arc<MemoryCache>,
    records: Arc<MemoryRecords>,
    logs: Arc<MemoryLogSink>,
    capture: Arc<MemoryCapture>,
    jobs: Arc<MemoryJobs>,
    calls: Arc<CallLog>,
}

#[derive(Clone, Copy)]
struct Mark {
    storage: usize,
    cache: usize,
    errors: usize,
    logs: usize,
    captured: usize,
    jobs: usize,
    calls: usize,
}

impl Stores {
    fn mark(&self) -> Mark {
        Mark {
            storage: self.storage.writes().len(),
            cache: self.cache.writes().len(),
            errors: self.records.errors().len(),
            logs: self.logs.entries().len(),
            captured: self.capture.events().len(),
            jobs: self.jobs.jobs().len(),
            calls: self.calls.len(),
        }
    }

    /// Waits until the plugin's console lines of the step just run have arrived: `console.*` is
    /// an asynchronous host call that the plugin does not await, so its line may reach the log
    /// sink just after the call returned. Settled once no new line came for [`CONSOLE_QUIET`],
    /// and never longer than [`CONSOLE_SETTLE_MAX`].
    async fn settle(&self) {
        let started = std::time::Instant::now();
        let mut seen = self.logs.entries().len();
        while started.elapsed() < CONSOLE_SETTLE_MAX {
            tokio::time::sleep(CONSOLE_QUIET).await;
            let now = self.logs.entries().len();
            if now == seen {
                return;
            }
            seen = now;
        }
    }

    /// What happened since `mark`, as one step of the report (after [`Self::settle`]).
    async fn step(&self, name: String, mark: Mark) -> Step {
        self.settle().await;
        fn after<T: Clone>(items: Vec<T>, start: usize) -> Vec<T> {
            items.get(start..).unwrap_or_default().to_vec()
        }
        Step {
            name,
            calls: self.calls.since(mark.calls),
            errors: after(self.records.errors(), mark.errors),
            logs: after(self.logs.entries(), mark.logs)
                .iter()
                .map(|entry| {
                    json!({
                        "timestamp": entry.timestamp_string(),
                        "source": entry.source.as_str(),
                        "type": entry.log_type.as_str(),
                        "message": entry.message,
                    })
                })
                .collect(),
            storage_writes: after(self.storage.writes(), mark.storage).iter().map(|write| write.to_json()).collect(),
            cache_writes: after(self.cache.writes(), mark.cache).iter().map(|write| write.to_json()).collect(),
            captured: after(self.capture.events(), mark.captured).into_iter().map(|event| event.data).collect(),
            jobs: after(self.jobs.jobs(), mark.jobs)
                .iter()
                .map(|job| serde_json::to_value(job).unwrap_or(Value::Null))
                .collect(),
            input: None,
            output: None,
            failed: false,
        }
    }
}

/// One step of the run: set-up, one event, one task, teardown.
struct Step {
    name: String,
    calls: Vec<Call>,
    errors: Vec<Value>,
    logs: Vec<Value>,
    storage_writes: Vec<Value>,
    cache_writes: Vec<Value>,
    captured: Vec<Value>,
    jobs: Vec<Value>,
    input: Option<Value>,
    /// `Some(null)`: the event was dropped.
    output: Option<Value>,
    /// Failed beyond its calls (the plugin could not be loaded or run).
    failed: bool,
}

impl Step {
    fn ok(&self) -> bool {
        !self.failed && self.errors.is_empty() && self.calls.iter().all(|call| !call.failed)
    }

    fn to_json(&self) -> Value {
        let calls: Vec<Value> = self
            .calls
            .iter()
            .map(|call| {
                json!({
                    "function": call.function,
                    "ok": !call.failed,
                    "duration_ms": call.elapsed.as_secs_f64() * 1000.0,
                    "heap_bytes": call.heap_bytes,
                })
            })
            .collect();
        let mut step = json!({
            "step": self.name,
            "ok": self.ok(),
            "calls": calls,
            "errors": self.errors,
            "logs": self.logs,
            "storage_writes": self.storage_writes,
            "cache_writes": self.cache_writes,
            "captured": self.captured,
            "jobs": self.jobs,
        });
        if let (Some(object), Some(input)) = (step.as_object_mut(), &self.input) {
            object.insert("input".into(), input.clone());
            object.insert("output".into(), self.output.clone().unwrap_or(Value::Null));
            object.insert("dropped".into(), Value::Bool(self.output.as_ref().is_some_and(Value::is_null)));
        }
        step
    }
}

const CONFIG_ID: i32 = 1;

async fn run_command(args: RunArgs) -> Result<i32, DevError> {
    let source = Source::open(&args.path)?;
    let events = match &args.event {
        Some(path) => read_events(path, args.team_id)?,
        None => Vec::new(),
    };
    let mut config = Map::new();
    for pair in &args.config {
        let (key, value) = split_pair(pair)?;
        config.insert(key, Value::String(value));
    }
    let attachments = args.attachments.iter().map(|pair| read_attachment(pair)).collect::<Result<Vec<_>, _>>()?;

    // Production limits: TASK_TIMEOUT and the VM memory limit of the server, on one thread.
    let server_config = Config::from_env()?;
    runtime::configure_network(runtime::NetworkSettings::from_config(&server_config));
    let pool = Arc::new(
        WorkerPool::new(PoolOptions { threads: 1, ..PoolOptions::from_config(&server_config) })
            .map_err(|error| DevError::Pool(error.to_string()))?,
    );
    let hub = Hub::offline(server_config)?;
    let stores = Stores {
        storage: Arc::default(),
        cache: Arc::default(),
        records: Arc::default(),
        logs: Arc::default(),
        capture: Arc::default(),
        jobs: Arc::default(),
        calls: Arc::default(),
    };
    let mut services = PluginServices::new(hub, stores.logs.clone(), stores.capture.clone(), stores.jobs.clone(), None);
    services.storage = stores.storage.clone();
    services.cache = stores.cache.clone();
    services.records = stores.records.clone();
    // No events are stored: a historical export has nothing to export.
    services.past_events = Arc::new(crate::plugins::past_events::NoPastEvents);
    services.observer = Arc::new(Recorder(stores.calls.clone()));
    services.echo_console = false;
    let services = Arc::new(services);
    let factory = if args.allow_fetch {
        RuntimeVmFactory::new(pool.clone())
    } else {
        RuntimeVmFactory::with_fetcher(pool.clone(), Arc::new(RefuseFetch))
    };

    let plugin_json = source.plugin_json().ok().flatten();
    let name = plugin_json.as_ref().and_then(|json| json.get("name")).and_then(Value::as_str).map(str::to_string);
    let plugin = Arc::new(Plugin::new(source.plugin_row(name.or_else(|| default_name(&args.path)))));
    let now = Utc::now();
    let row = PluginConfigRow {
        id: CONFIG_ID,
        team_id: i32::try_from(args.team_id).ok(),
        plugin_id: plugin.id(),
        enabled: true,
        order: Some(0),
        config: Value::Object(config),
        error: None,
        created_at: now,
        updated_at: now,
    };
    let (config, code) = config_in_force(".", &plugin, &row, attachments);
    let mut steps = Vec::new();

    // Load and set up (the server's LazyVm: transform, evaluate, setupPlugin, metrics).
    let mark = stores.mark();
    let started = Instant::now();
    let context = Arc::new(PluginContext::new(services.clone(), config.clone()));
    // The server's timing, so the log says what the server would ("Retrying in 3 s"); the retry
    // itself is cancelled: one attempt is what a dev loop wants to see.
    let vm = LazyVm::start(services.clone(), Arc::new(factory), LoadOptions::default(), context, code, None);
    let loaded = vm.get().await;
    vm.cancel_retry();
    let entry = Arc::new(ConfigEntry { config: config.clone(), vm });
    let heap = heap_bytes(&pool).await;
    let has_setup = loaded.as_ref().is_some_and(|loaded| loaded.plugin_has(Method::SetupPlugin));
    stores.calls.push(Call {
        // Loading alone when the plugin has no setupPlugin (or could not be loaded).
        function: if has_setup { "setupPlugin" } else { "load" }.into(),
        elapsed: started.elapsed(),
        failed: loaded.is_none(),
        heap_bytes: heap,
    });
    let mut setup = stores.step("load and setupPlugin".into(), mark).await;
    setup.failed = loaded.is_none();
    steps.push(setup);

    if loaded.is_some() {
        let entries = [entry.clone()];
        for (index, event) in events.into_iter().enumerate() {
            let mark = stores.mark();
            let input = serde_json::to_value(&event).unwrap_or(Value::Null);
            let is_snapshot = event.event == "$snapshot";
            let mut unavailable = None;
            let output = if is_snapshot {
                Some(event)
            } else {
                match run::run_process_event(&services, &entries, event).await {
                    Ok(output) => output,
                    Err(error) => {
                        unavailable = Some(error.to_string());
                        None
                    }
                }
            };
            stores.calls.set_heap(mark.calls, heap_bytes(&pool).await);
            if let Some(output) = &output {
                let method = if is_snapshot { Method::OnSnapshot } else { Method::OnEvent };
                run::run_on_event(&services, &entries, output, method).await;
            }
            stores.calls.set_heap(mark.calls, heap_bytes(&pool).await);
            let label = input.get("event").map(crate::js::string_of).unwrap_or_default();
            let mut step = stores.step(format!("event {}: {label}", index + 1), mark).await;
            step.input = Some(input);
            step.output =
                Some(output.map(|event| serde_json::to_value(event).unwrap_or(Value::Null)).unwrap_or(Value::Null));
            if let Some(message) = unavailable {
                step.errors.push(json!({ "message": message }));
                step.failed = true;
            }
            steps.push(step);
        }
        for task in &args.tasks {
            let mark = stores.mark();
            let result = run::run_plugin_task(&services, Some(&entry), TaskKind::Schedule, task, None).await;
            stores.calls.set_heap(mark.calls, heap_bytes(&pool).await);
            let mut step = stores.step(format!("task {task}"), mark).await;
            step.failed = result.is_none();
            steps.push(step);
        }
        // Teardown: teardownPlugin, and the exportEvents buffer flushed.
        let mark = stores.mark();
        run::teardown(&services, &entry, true).await;
        steps.push(stores.step("teardown".into(), mark).await);
    }
    pool.shutdown(Duration::from_secs(2)).await;

    let ok = steps.iter().all(Step::ok);
    let report = json!({
        "plugin": {
            "name": config.plugin.name(),
            "path": args.path.display().to_string(),
            "config": Value::Object(config.config.clone()),
            "capabilities": stores.records.capabilities(),
            "metrics": stores.records.metrics(),
        },
        "steps": steps.iter().map(Step::to_json).collect::<Vec<_>>(),
        "ok": ok,
    });
    if args.json {
        let mut out = String::new();
        emit!(out, "{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        print_out(&out);
    } else {
        print_out(&render_report(&report));
    }
    Ok(if ok { 0 } else { 1 })
}

fn default_name(path: &Path) -> Option<String> {
    path.file_stem().map(|name| name.to_string_lossy().into_owned())
}

async fn heap_bytes(pool: &WorkerPool) -> Option<i64> {
    pool.memory_usage(i64::from(CONFIG_ID)).await.into_iter().max()
}

// ---------------------------------------------------------------------------------------------
// Text output

/// Writes the output at once; a closed pipe (`| head`) is not an error worth a panic.
fn print_out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

fn kib(bytes: &Value) -> String {
    bytes.as_f64().map(|bytes| format!("heap {:.0} KiB", bytes / 1024.0)).unwrap_or_default()
}

fn render_report(report: &Value) -> String {
    let mut out = String::new();
    let plugin = &report["plugin"];
    emit!(out, "Plugin {} ({})", crate::js::string_of(&plugin["name"]), crate::js::string_of(&plugin["path"]));
    emit!(out, "  config: {}", plugin["config"]);
    if !plugin["capabilities"].is_null() {
        emit!(out, "  capabilities: {}", plugin["capabilities"]);
    }
    for step in report["steps"].as_array().into_iter().flatten() {
        out.push('\n');
        emit!(out, "== {}", crate::js::string_of(&step["step"]));
        if let Some(input) = step.get("input") {
            emit!(out, "  in:  {input}");
        }
        for call in step["calls"].as_array().into_iter().flatten() {
            let mark = if call["ok"] == Value::Bool(true) { "ok    " } else { "FAILED" };
            let ms = call["duration_ms"].as_f64().unwrap_or_default();
            emit!(
                out,
                "  {mark} {:<16} {:>9.1} ms   {}",
                crate::js::string_of(&call["function"]),
                ms,
                kib(&call["heap_bytes"])
            );
        }
        for log in step["logs"].as_array().into_iter().flatten() {
            emit!(
                out,
                "  log   {} {:<5} {}",
                crate::js::string_of(&log["source"]),
                crate::js::string_of(&log["type"]),
                crate::js::string_of(&log["message"])
            );
        }
        for error in step["errors"].as_array().into_iter().flatten() {
            let text =
                error.get("stack").or_else(|| error.get("message")).map(crate::js::string_of).unwrap_or_default();
            for (index, line) in text.lines().enumerate() {
                emit!(out, "  {} {line}", if index == 0 { "error" } else { "     " });
            }
        }
        for (label, key) in [("storage", "storage_writes"), ("cache", "cache_writes")] {
            for write in step[key].as_array().into_iter().flatten() {
                let value = if write["value"].is_null() { String::new() } else { format!(" = {}", write["value"]) };
                emit!(
                    out,
                    "  {label:<7} {} {}{value}",
                    crate::js::string_of(&write["operation"]),
                    crate::js::string_of(&write["key"])
                );
            }
        }
        for captured in step["captured"].as_array().into_iter().flatten() {
            emit!(out, "  posthog.capture {captured}");
        }
        for job in step["jobs"].as_array().into_iter().flatten() {
            emit!(out, "  job   {job}");
        }
        if let Some(output) = step.get("output") {
            if step["dropped"] == Value::Bool(true) {
                emit!(out, "  out: (dropped)");
            } else {
                emit!(out, "  out: {output}");
            }
        }
    }
    out.push('\n');
    emit!(
        out,
        "{}",
        if report["ok"] == Value::Bool(true) { "OK: every call succeeded" } else { "FAILED: see the errors above" }
    );
    out
}

// ---------------------------------------------------------------------------------------------
// check

/// The config field types PostHog's interface knows.
const CONFIG_TYPES: &[&str] = &["string", "attachment", "choice", "json"];

/// Every problem of the plugin at `path` (empty: valid), and what was found.
fn check_plugin(path: &Path) -> (Vec<String>, Map<String, Value>) {
    let mut problems = Vec::new();
    let mut found = Map::new();
    let source = match Source::open(path) {
        Ok(source) => source,
        Err(error) => return (vec![error.to_string()], found),
    };
    let plugin_json = match source.plugin_json() {
        Ok(Some(Value::Object(json))) => json,
        Ok(Some(_)) => return (vec!["plugin.json is not a JSON object".into()], found),
        Ok(None) => return (vec!["plugin.json not found".into()], found),
        Err(error) => return (vec![error], found),
    };
    match plugin_json.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => {
            found.insert("name".into(), json!(name));
        }
        Some(_) => problems.push("plugin.json: \"name\" must be a non-empty string".into()),
        None => problems.push("plugin.json: \"name\" is missing".into()),
    }
    if let Some(main) = plugin_json.get("main") {
        if !main.is_string() {
            problems.push("plugin.json: \"main\" must be a string (the file with the plugin's code)".into());
        }
    }
    check_config_schema(plugin_json.get("config"), &mut problems);
    // The code, found exactly as the server finds it.
    let plugin = Plugin::new(source.plugin_row(found.get("name").and_then(Value::as_str).map(str::to_string)));
    match load_code(".", &plugin) {
        Err(failure) => problems.push(failure.message().to_string()),
        Ok(code) => {
            found.insert("main".into(), json!(plugin_json.get("main").and_then(Value::as_str).unwrap_or("index.js")));
            match super::transform::transform_code(&code.code, &|module: &str| runtime::is_allowed_import(module)) {
                Ok(transformed) => {
                    found.insert("imports".into(), json!(transformed.imports));
                }
                Err(error) => problems.push(error.to_string()),
            }
        }
    }
    (problems, found)
}

fn check_config_schema(schema: Option<&Value>, problems: &mut Vec<String>) {
    let Some(schema) = schema else { return };
    let Some(entries) = schema.as_array() else {
        problems.push("plugin.json: \"config\" must be an array of fields".into());
        return;
    };
    let mut keys: Vec<&str> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let at = format!("plugin.json: config[{index}]");
        let Some(entry) = entry.as_object() else {
            problems.push(format!("{at} must be an object"));
            continue;
        };
        // A markdown entry only shows text in the interface.
        if entry.contains_key("markdown") && !entry.contains_key("key") {
            continue;
        }
        match entry.get("key").and_then(Value::as_str).filter(|key| !key.is_empty()) {
            Some(key) if keys.contains(&key) => problems.push(format!("{at}: key \"{key}\" appears twice")),
            Some(key) => keys.push(key),
            None => problems.push(format!("{at}: \"key\" must be a non-empty string")),
        }
        let field_type = entry.get("type").and_then(Value::as_str).unwrap_or("string");
        if !CONFIG_TYPES.contains(&field_type) {
            problems.push(format!("{at}: unknown type \"{field_type}\" (one of {})", CONFIG_TYPES.join(", ")));
        }
        if field_type == "choice" {
            match entry.get("choices").and_then(Value::as_array) {
                Some(choices) if !choices.is_empty() => {
                    if let Some(default) = entry.get("default").filter(|default| !default.is_null()) {
                        if !choices.contains(default) {
                            problems.push(format!("{at}: default {default} is not one of the choices"));
                        }
                    }
                }
                _ => problems.push(format!("{at}: a choice field needs a non-empty \"choices\" array")),
            }
        }
        if let Some(required) = entry.get("required") {
            if !required.is_boolean() {
                problems.push(format!("{at}: \"required\" must be true or false"));
            }
        }
    }
}

fn check_command(args: &CheckArgs) -> i32 {
    let (problems, found) = check_plugin(&args.path);
    let mut out = String::new();
    if args.json {
        let report = json!({"path": args.path.display().to_string(), "ok": problems.is_empty(), "problems": problems, "plugin": found});
        emit!(out, "{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else if problems.is_empty() {
        let imports = found.get("imports").map(Value::to_string).unwrap_or_default();
        emit!(
            out,
            "OK: plugin {} ({}), main {}, imports {imports}",
            found.get("name").map(crate::js::string_of).unwrap_or_default(),
            args.path.display(),
            found.get("main").map(crate::js::string_of).unwrap_or_default(),
        );
    } else {
        emit!(out, "{}: {} problem{}", args.path.display(), problems.len(), if problems.len() == 1 { "" } else { "s" });
        for problem in &problems {
            emit!(out, "  - {problem}");
        }
    }
    print_out(&out);
    if problems.is_empty() {
        0
    } else {
        1
    }
}
