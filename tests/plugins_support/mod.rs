//! Support for the plugin tests: a [`Plugins`] facade on a fresh fixture database with
//! recording capture/job sinks, a scripted fake VM factory (to test the orchestration without
//! JavaScript), and row helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use plugin_server::event::PluginEvent;
use plugin_server::hub::Hub;
use plugin_server::plugins::extensions::{
    CaptureSink, CapturedEvent, EnqueuedJob, JobEnqueuer, PluginContext, PluginRun, PluginServices, RunObserver,
    SinkError,
};
use plugin_server::plugins::lazy::LoadOptions;
use plugin_server::plugins::log_entries::PostgresLogSink;
use plugin_server::plugins::vm_boundary::{CallError, JsError, Method, PluginVm, TaskKind, VmExports, VmFactory};
use plugin_server::plugins::Plugins;
use serde_json::{json, Value};

use crate::common::{TestDb, PLUGIN_CONFIG_ID, TEAM_ID};

#[derive(Default)]
pub struct RecordingCapture {
    pub events: Mutex<Vec<CapturedEvent>>,
}

#[async_trait]
impl CaptureSink for RecordingCapture {
    async fn capture(&self, event: CapturedEvent) -> Result<(), SinkError> {
        self.events.lock().unwrap().push(event);
        Ok(())
    }
}

#[derive(Default)]
pub struct RecordingJobs {
    pub jobs: Mutex<Vec<EnqueuedJob>>,
}

#[async_trait]
impl JobEnqueuer for RecordingJobs {
    async fn enqueue(&self, job: EnqueuedJob) -> Result<(), SinkError> {
        self.jobs.lock().unwrap().push(job);
        Ok(())
    }
}

/// Records `(function, team, failed)` of every plugin call.
#[derive(Default)]
pub struct RecordingObserver {
    pub runs: Mutex<Vec<(String, i64, bool)>>,
}

impl RunObserver for RecordingObserver {
    fn plugin_ran(&self, run: &PluginRun<'_>) {
        self.runs.lock().unwrap().push((run.function.to_string(), run.team_id, run.failed));
    }
}

/// One call a fake VM received.
#[derive(Clone)]
pub struct Call {
    pub name: String,
    pub args: Vec<Value>,
    pub context: Arc<PluginContext>,
}

pub type Handler = Arc<dyn Fn(Call) -> BoxFuture<'static, Result<Value, CallError>> + Send + Sync>;

/// A scripted plugin: its exports and what its functions do.
#[derive(Clone)]
pub struct FakePlugin {
    pub exports: VmExports,
    pub handler: Handler,
}

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Call) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, CallError>> + Send + 'static,
{
    Arc::new(move |call| Box::pin(f(call)))
}

/// A plugin with only `processEvent`, which gets the event and returns what `f` makes of it.
pub fn process_event_plugin<F>(f: F) -> FakePlugin
where
    F: Fn(Value) -> Result<Value, CallError> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    FakePlugin {
        exports: exports(&[Method::ProcessEvent]),
        handler: handler(move |call| {
            let f = f.clone();
            async move { f(call.args.first().cloned().unwrap_or(Value::Null)) }
        }),
    }
}

/// A plugin whose exportEvents records each batch; `retry` makes it throw RetryError.
pub fn exporter(batches: Arc<Mutex<Vec<Vec<Value>>>>, retry: bool) -> FakePlugin {
    FakePlugin {
        exports: VmExports { methods: vec![Method::ExportEvents], ..VmExports::default() },
        handler: handler(move |call| {
            let batches = batches.clone();
            async move {
                if call.name == "exportEvents" {
                    batches.lock().unwrap().push(call.args[0].as_array().cloned().unwrap_or_default());
                    if retry {
                        return Err(JsError::retry("try again").into());
                    }
                }
                Ok(Value::Null)
            }
        }),
    }
}

/// A facade whose fixture plugin is the fake `plugin`, with set-up retries every `retry_base`.
pub async fn fake_setup(plugin: FakePlugin, retry_base: Duration) -> (Arc<FakeFactory>, Setup) {
    fake_setup_with(plugin, retry_base, |_| {}).await
}

/// As [`fake_setup`], with `edit` applied to the services before the plugins load.
pub async fn fake_setup_with(
    plugin: FakePlugin,
    retry_base: Duration,
    edit: impl FnOnce(&mut PluginServices),
) -> (Arc<FakeFactory>, Setup) {
    let fakes = Arc::new(FakeFactory::default());
    fakes.register("fake", plugin);
    let options = LoadOptions { retry_base, test_env: true };
    let setup = Setup::with_services("fake", Arc::new(SharedFakeFactory(fakes.clone())), options, &[], edit).await;
    (fakes, setup)
}

pub fn exports(methods: &[Method]) -> VmExports {
    VmExports { methods: methods.to_vec(), ..VmExports::default() }
}

/// Makes fake VMs from "code" that names a registered [`FakePlugin`].
#[derive(Default)]
pub struct FakeFactory {
    pub plugins: Mutex<HashMap<String, FakePlugin>>,
    pub loads: AtomicUsize,
    pub calls: Mutex<Vec<(i32, String)>>,
}

impl FakeFactory {
    pub fn register(&self, code: &str, plugin: FakePlugin) {
        self.plugins.lock().unwrap().insert(code.to_string(), plugin);
    }

    pub fn calls_of(&self, name: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|(_, call)| call == name).count()
    }
}

struct FakeVm {
    plugin: FakePlugin,
    context: Arc<PluginContext>,
    factory: Arc<FakeFactory>,
}

impl FakeVm {
    async fn invoke(&self, name: &str, args: Vec<Value>) -> Result<Value, CallError> {
        self.factory.calls.lock().unwrap().push((self.context.config.id, name.to_string()));
        (self.plugin.handler)(Call { name: name.to_string(), args, context: self.context.clone() }).await
    }
}

#[async_trait]
impl PluginVm for FakeVm {
    fn exports(&self) -> &VmExports {
        &self.plugin.exports
    }
    async fn call(&self, method: Method, args: Vec<Value>) -> Result<Value, CallError> {
        self.invoke(method.name(), args).await
    }
    async fn run_task(&self, kind: TaskKind, name: &str, payload: Option<Value>) -> Result<Value, CallError> {
        let name = match kind {
            TaskKind::Job => format!("jobs.{name}"),
            TaskKind::Schedule => name.to_string(),
        };
        self.invoke(&name, payload.into_iter().collect()).await
    }
    async fn dispose(&self) {
        self.factory.calls.lock().unwrap().push((self.context.config.id, "dispose".into()));
    }
}

/// `Arc<FakeFactory>` as a [`VmFactory`].
pub struct SharedFakeFactory(pub Arc<FakeFactory>);

#[async_trait]
impl VmFactory for SharedFakeFactory {
    async fn create(&self, context: Arc<PluginContext>, code: String) -> Result<Arc<dyn PluginVm>, JsError> {
        self.0.loads.fetch_add(1, Ordering::SeqCst);
        let plugin = self.0.plugins.lock().unwrap().get(&code).cloned();
        let Some(plugin) = plugin else {
            return Err(JsError::new("SyntaxError", format!("/index.ts: Unexpected token, expected \",\" ({code})")));
        };
        let vm = FakeVm { plugin, context, factory: self.0.clone() };
        if vm.plugin.exports.has(Method::SetupPlugin) {
            vm.invoke("setupPlugin", Vec::new()).await.map_err(|failure| failure.error)?;
        }
        Ok(Arc::new(vm))
    }
}

/// A facade on a fixture database.
pub struct Setup {
    pub db: TestDb,
    pub hub: Hub,
    pub capture: Arc<RecordingCapture>,
    pub jobs: Arc<RecordingJobs>,
    pub observer: Arc<RecordingObserver>,
    pub services: Arc<PluginServices>,
    pub plugins: Plugins,
}

impl Setup {
    /// Fixture with plugin 60 / config 39 whose archive's index.js is `code`.
    pub async fn new(code: &str, factory: Arc<dyn VmFactory>) -> Setup {
        Self::with_options(code, factory, LoadOptions { retry_base: Duration::from_secs(3), test_env: true }, &[]).await
    }

    pub async fn with_options(
        code: &str,
        factory: Arc<dyn VmFactory>,
        options: LoadOptions,
        extra_config: &[(&str, &str)],
    ) -> Setup {
        Self::with_services(code, factory, options, extra_config, |_| {}).await
    }

    /// As [`Setup::with_options`], with `edit` applied to the services before the plugins load.
    pub async fn with_services(
        code: &str,
        factory: Arc<dyn VmFactory>,
        options: LoadOptions,
        extra_config: &[(&str, &str)],
        edit: impl FnOnce(&mut PluginServices),
    ) -> Setup {
        let db = TestDb::with_fixture(Some(code)).await;
        let hub = Hub::connect(db.config(extra_config)).await.expect("hub");
        let capture = Arc::new(RecordingCapture::default());
        let jobs = Arc::new(RecordingJobs::default());
        let observer = Arc::new(RecordingObserver::default());
        let mut services = PluginServices::new(
            hub.clone(),
            Arc::new(PostgresLogSink::new(hub.postgres.clone(), true)),
            capture.clone(),
            jobs.clone(),
            None,
        );
        services.observer = observer.clone();
        edit(&mut services);
        let services = Arc::new(services);
        let plugins = Plugins::new(services.clone(), factory, options);
        Setup { db, hub, capture, jobs, observer, services, plugins }
    }

    /// Runs due jobs the way the job consumer would, until none are left (retries scheduled for
    /// later are left alone); returns how many ran.
    pub async fn drain_jobs(&self) -> usize {
        let mut ran = 0;
        loop {
            let now = chrono::Utc::now().timestamp_millis() + 1000;
            let due = {
                let mut jobs = self.jobs.jobs.lock().unwrap();
                let index = jobs.iter().position(|job| job.timestamp <= now);
                index.map(|index| jobs.remove(index))
            };
            let Some(job) = due else { return ran };
            self.plugins.run_job(job).await;
            ran += 1;
            assert!(ran < 200, "the export does not end");
        }
    }

    pub async fn config_error(&self, config_id: i32) -> Option<Value> {
        sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = $1")
            .bind(config_id)
            .fetch_one(&self.db.pool)
            .await
            .expect("config row")
    }

    pub async fn plugin_column(&self, plugin_id: i32, column: &str) -> Value {
        sqlx::query_scalar::<_, Option<Value>>(&format!("SELECT {column} FROM posthog_plugin WHERE id = $1"))
            .bind(plugin_id)
            .fetch_one(&self.db.pool)
            .await
            .expect("plugin row")
            .unwrap_or(Value::Null)
    }

    /// `(source, type, message)` of every log entry of a config, oldest first.
    pub async fn log_entries(&self, config_id: i32) -> Vec<(String, String, String)> {
        sqlx::query_as(
            "SELECT source, type, message FROM posthog_pluginlogentry WHERE plugin_config_id = $1 ORDER BY timestamp, id",
        )
        .bind(config_id)
        .fetch_all(&self.db.pool)
        .await
        .expect("log entries")
    }

    /// Moves a config's `updated_at` forward so the next reload reloads it.
    pub async fn touch_config(&self, config_id: i32) {
        sqlx::query("UPDATE posthog_pluginconfig SET updated_at = updated_at + interval '1 second' WHERE id = $1")
            .bind(config_id)
            .execute(&self.db.pool)
            .await
            .expect("touch config");
    }

    /// Replaces the fixture plugin's code with `source` (plugin_type `source`, no archive).
    pub async fn set_source(&self, plugin_id: i32, source: &str) {
        sqlx::query(
            "UPDATE posthog_plugin SET plugin_type = 'source', archive = NULL, url = NULL, source = $2, updated_at = now() \
             WHERE id = $1",
        )
        .bind(plugin_id)
        .bind(source)
        .execute(&self.db.pool)
        .await
        .expect("update plugin");
    }

    /// Adds a source plugin and an enabled config for team 2.
    pub async fn add_source_plugin(&self, plugin_id: i32, config_id: i32, order: i32, source: &str) {
        sqlx::query(
            "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, source, config_schema, capabilities) \
             SELECT $1, organization_id, 'source', 'plugin-' || $1, $2, '{}', '{}' FROM posthog_plugin WHERE id = 60",
        )
        .bind(plugin_id)
        .bind(source)
        .execute(&self.db.pool)
        .await
        .expect("insert plugin");
        self.add_config(config_id, plugin_id, order).await;
    }

    pub async fn add_config(&self, config_id: i32, plugin_id: i32, order: i32) {
        sqlx::query(
            "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, created_at, updated_at) \
             VALUES ($1, $2, $3, true, $4, '{}', now(), now())",
        )
        .bind(config_id)
        .bind(TEAM_ID)
        .bind(plugin_id)
        .bind(order)
        .execute(&self.db.pool)
        .await
        .expect("insert config");
    }
}

/// A `$test`-style event for team 2.
pub fn event(name: &str) -> PluginEvent {
    serde_json::from_value(json!({
        "distinct_id": "my_id",
        "ip": "127.0.0.1",
        "site_url": "http://localhost",
        "team_id": TEAM_ID,
        "now": "2020-02-23T02:15:00Z",
        "timestamp": "2020-02-23T02:15:00Z",
        "event": name,
        "properties": {},
        "uuid": "017dbd3b-2b9a-0000-9a8f-37d1e0c7f5a0",
    }))
    .expect("event")
}

pub const CONFIG: i32 = PLUGIN_CONFIG_ID;

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
