//! Configuration: every environment variable of the reference's `src/config/config.ts`, with the
//! same names, the same defaults (including the test/dev defaults keyed on `NODE_ENV`/`DEBUG`) and
//! the same `--help` texts, parsed and validated once at start-up.
//!
//! One table (the `define_config!` invocation below) is the single source for the `Config` struct,
//! the parser, `--help` and the README's configuration table (a test checks the README against it).
//! This module does not connect to anything; see `hub` for that.
//!
//! Field names are the environment variable names on purpose (as in the reference's hub), so a
//! grep for `KAFKA_ENABLED` finds every use.
//!
//! Deliberate differences from the reference (which silently accepts anything):
//! * a number that does not parse (`WORKER_CONCURRENCY=abc`), or a fraction where a count is
//!   expected, is rejected instead of becoming `NaN`/truncated;
//! * a boolean must be one of `y yes t true on 1` / `n no f false off 0` / empty (the reference
//!   maps every unknown word to `false`, so `KAFKA_ENABLED=maybe` would silently mean "no");
//! * `LOG_LEVEL` must be one of the reference's levels;
//! * a value starting with `.` (`.5`) parses as a number (the reference yields `NaN`).
#![allow(non_snake_case)]

use std::fmt;

use thiserror::Error;

/// A configuration value that cannot be used. Start-up prints it as one line and exits 1.
#[derive(Debug, Error, PartialEq)]
#[error("Invalid value for {name}: {value:?} ({expected})")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// The deployment environment, as the reference's `determineNodeEnv` computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeEnv {
    Production,
    Development,
    Test,
}

impl NodeEnv {
    /// `NODE_ENV` lower-cased starting with `test` → test, with `dev` → development; otherwise a
    /// truthy `DEBUG` → development; otherwise production.
    pub fn detect(lookup: &dyn Fn(&str) -> Option<String>) -> NodeEnv {
        if let Some(raw) = lookup("NODE_ENV") {
            let lowered = raw.to_lowercase();
            if lowered.starts_with("test") {
                return NodeEnv::Test;
            }
            if lowered.starts_with("dev") {
                return NodeEnv::Development;
            }
        }
        if lookup("DEBUG").is_some_and(|value| string_to_boolean(&value)) {
            return NodeEnv::Development;
        }
        NodeEnv::Production
    }

    /// [`NodeEnv::detect`] on the process environment: for `--help`, which must print even when a
    /// config value is invalid (everything else reads it from [`Config`]).
    pub fn from_process() -> NodeEnv {
        NodeEnv::detect(&|key| std::env::var(key).ok())
    }
}

/// The reference's lenient boolean rule (`stringToBoolean`), used where it is not a config value
/// (for example `DEBUG`).
pub fn string_to_boolean(value: &str) -> bool {
    matches!(value.trim().to_lowercase().as_str(), "y" | "yes" | "t" | "true" | "on" | "1")
}

/// Minimum log level, with the reference's names and order (`log` sits between info and warn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Log,
    Warn,
    Error,
    None,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Log => "log",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::None => "none",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JavaScript engine of the plugin VMs (`JS_ENGINE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JsEngine {
    /// QuickJS (rquickjs): about a quarter of V8's memory per plugin config, for installations
    /// with many configs per thread.
    QuickJs,
    /// V8 10.2 from Debian's libnode (`runtime/v8`): the default, as the original's engine is V8
    /// (its `Intl` and error messages), and faster on JS-heavy plugins (README, "V8 engine").
    #[default]
    V8,
}

impl JsEngine {
    pub fn as_str(self) -> &'static str {
        match self {
            JsEngine::QuickJs => "quickjs",
            JsEngine::V8 => "v8",
        }
    }

    /// `JS_ENGINE` of the process environment, for code without a `Config` (tests, benches): a
    /// missing or unknown value is the default (V8).
    pub fn from_process_env() -> JsEngine {
        std::env::var("JS_ENGINE")
            .ok()
            .and_then(|raw| <JsEngine as ConfigValue>::parse_env("JS_ENGINE", &raw).ok())
            .unwrap_or_default()
    }
}

impl fmt::Display for JsEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the defaults depend on: the environment kind and the machine's core count.
pub struct DefaultsContext {
    pub node_env: NodeEnv,
    pub cores: usize,
}

impl DefaultsContext {
    fn is_test(&self) -> bool {
        self.node_env == NodeEnv::Test
    }
    fn is_dev(&self) -> bool {
        self.node_env == NodeEnv::Development
    }
}

/// How one type of configuration value is parsed from its environment string and shown in help.
pub trait ConfigValue: Sized {
    fn parse_env(name: &'static str, raw: &str) -> Result<Self, ConfigError>;
    fn show(&self) -> String;
}

impl ConfigValue for String {
    fn parse_env(_: &'static str, raw: &str) -> Result<Self, ConfigError> {
        Ok(raw.to_string())
    }
    fn show(&self) -> String {
        if self.is_empty() {
            "(empty)".into()
        } else {
            self.clone()
        }
    }
}

/// A nullable string. The reference only ever tests these for truthiness, so an empty value is
/// the same as an unset one and is stored as `None`.
impl ConfigValue for Option<String> {
    fn parse_env(_: &'static str, raw: &str) -> Result<Self, ConfigError> {
        Ok(if raw.is_empty() { None } else { Some(raw.to_string()) })
    }
    fn show(&self) -> String {
        self.clone().unwrap_or_else(|| "(unset)".into())
    }
}

impl ConfigValue for bool {
    fn parse_env(name: &'static str, raw: &str) -> Result<Self, ConfigError> {
        match raw.trim().to_lowercase().as_str() {
            "y" | "yes" | "t" | "true" | "on" | "1" => Ok(true),
            "" | "n" | "no" | "f" | "false" | "off" | "0" => Ok(false),
            _ => Err(ConfigError {
                name,
                value: raw.to_string(),
                expected: "expected one of true/false, yes/no, y/n, t/f, on/off, 1/0",
            }),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

fn parse_number(name: &'static str, raw: &str, expected: &'static str) -> Result<f64, ConfigError> {
    let trimmed = raw.trim();
    trimmed
        .parse::<f64>()
        .ok()
        .filter(|value| value.is_finite() && !trimmed.eq_ignore_ascii_case("inf"))
        .ok_or(ConfigError { name, value: raw.to_string(), expected })
}

impl ConfigValue for f64 {
    fn parse_env(name: &'static str, raw: &str) -> Result<Self, ConfigError> {
        let value = parse_number(name, raw, "expected a non-negative number")?;
        if value < 0.0 {
            return Err(ConfigError { name, value: raw.to_string(), expected: "expected a non-negative number" });
        }
        Ok(value)
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

macro_rules! integer_config_value {
    ($($ty:ty),*) => {$(
        impl ConfigValue for $ty {
            fn parse_env(name: &'static str, raw: &str) -> Result<Self, ConfigError> {
                const EXPECTED: &str = "expected a whole number";
                let value = parse_number(name, raw, EXPECTED)?;
                if value < 0.0 || value.fract() != 0.0 || value > <$ty>::MAX as f64 {
                    return Err(ConfigError { name, value: raw.to_string(), expected: EXPECTED });
                }
                Ok(value as $ty)
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
integer_config_value!(u16, u32, u64, usize);

impl ConfigValue for LogLevel {
    fn parse_env(name: &'static str, raw: &str) -> Result<Self, ConfigError> {
        match raw.trim().to_lowercase().as_str() {
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "log" => Ok(LogLevel::Log),
            "warn" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            "none" => Ok(LogLevel::None),
            _ => Err(ConfigError {
                name,
                value: raw.to_string(),
                expected: "expected one of none, debug, info, log, warn, error",
            }),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl ConfigValue for JsEngine {
    fn parse_env(name: &'static str, raw: &str) -> Result<Self, ConfigError> {
        match raw.trim().to_lowercase().as_str() {
            "quickjs" => Ok(JsEngine::QuickJs),
            "v8" => Ok(JsEngine::V8),
            _ => Err(ConfigError { name, value: raw.to_string(), expected: "expected quickjs or v8" }),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// One documented variable, for `--help` and the README.
#[derive(Debug, Clone, Copy)]
pub struct VariableDoc {
    pub name: &'static str,
    pub description: &'static str,
    /// `false` for variables the reference reads but leaves out of its `--help`.
    pub in_reference_help: bool,
}

macro_rules! define_config {
    ($( $name:ident : $ty:ty = $default:expr, $in_help:literal, $description:literal; )*) => {
        /// The server's configuration. Build it with [`Config::from_env`] or [`Config::from_lookup`].
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $( #[doc = $description] pub $name: $ty, )*
            /// The environment kind (`NODE_ENV`, as the reference's `determineNodeEnv` reads it):
            /// the one place the server learns it, so test and development defaults follow it.
            pub node_env: NodeEnv,
        }

        /// Every variable, in the reference's `--help` order, then the ones it leaves out of help.
        pub const VARIABLES: &[VariableDoc] = &[
            $( VariableDoc { name: stringify!($name), description: $description, in_reference_help: $in_help }, )*
        ];

        impl Config {
            /// Builds the configuration from any lookup (the process environment, or a test's map).
            pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
                let context = DefaultsContext {
                    node_env: NodeEnv::detect(lookup),
                    cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                };
                Ok(Config {
                    node_env: context.node_env,
                    $( $name: match lookup(stringify!($name)) {
                        Some(raw) => <$ty as ConfigValue>::parse_env(stringify!($name), &raw)?,
                        None => {
                            let default: fn(&DefaultsContext) -> $ty = $default;
                            default(&context)
                        }
                    }, )*
                })
            }

            /// The default of every variable as shown by `--help`, for the given environment.
            pub fn defaults_for_help(node_env: NodeEnv) -> Vec<(&'static str, String)> {
                let context = DefaultsContext {
                    node_env,
                    cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                };
                vec![ $( (stringify!($name), {
                    let default: fn(&DefaultsContext) -> $ty = $default;
                    default(&context).show()
                }), )* ]
            }
        }
    };
}

define_config! {
    CELERY_DEFAULT_QUEUE: String = |_| "celery".into(), true, "Celery outgoing queue";
    PLUGINS_CELERY_QUEUE: String = |_| "posthog-plugins".into(), true, "Celery incoming queue";
    DATABASE_URL: Option<String> = |c| {
        if c.is_test() {
            Some("postgres://localhost:5432/test_posthog".into())
        } else if c.is_dev() {
            Some("postgres://localhost:5432/posthog".into())
        } else {
            None
        }
    }, true, "Postgres database URL";
    CLICKHOUSE_HOST: String = |_| "localhost".into(), true, "ClickHouse host";
    CLICKHOUSE_DATABASE: String = |c| if c.is_test() { "posthog_test".into() } else { "default".into() }, true, "ClickHouse database";
    CLICKHOUSE_USER: String = |_| "default".into(), true, "ClickHouse username";
    CLICKHOUSE_PASSWORD: Option<String> = |_| None, true, "ClickHouse password";
    CLICKHOUSE_CA: Option<String> = |_| None, true, "ClickHouse CA certs";
    CLICKHOUSE_SECURE: bool = |_| false, true, "whether to secure ClickHouse connection";
    REDIS_URL: String = |_| "redis://127.0.0.1".into(), true, "Redis store URL";
    BASE_DIR: String = |_| ".".into(), true, "base path for resolving local plugins";
    PLUGINS_RELOAD_PUBSUB_CHANNEL: String = |_| "reload-plugins".into(), true, "Redis channel for reload events";
    WORKER_CONCURRENCY: usize = |c| c.cores, true, "number of concurrent worker threads";
    TASK_TIMEOUT: f64 = |_| 30.0, true, "how many seconds until tasks are timed out";
    TASKS_PER_WORKER: usize = |_| 10, true, "number of parallel tasks per worker thread";
    LOG_LEVEL: LogLevel = |c| if c.is_test() { LogLevel::Warn } else { LogLevel::Info }, true, "minimum log level";
    KAFKA_ENABLED: bool = |_| false, true, "use Kafka instead of Celery to ingest events";
    KAFKA_HOSTS: Option<String> = |_| None, true, "comma-delimited Kafka hosts";
    KAFKA_CONSUMPTION_TOPIC: Option<String> = |_| Some("events_plugin_ingestion".into()), true, "Kafka consumption topic override";
    KAFKA_CLIENT_CERT_B64: Option<String> = |_| None, true, "Kafka certificate in Base64";
    KAFKA_CLIENT_CERT_KEY_B64: Option<String> = |_| None, true, "Kafka certificate key in Base64";
    KAFKA_TRUSTED_CERT_B64: Option<String> = |_| None, true, "Kafka trusted CA in Base64";
    SENTRY_DSN: Option<String> = |_| None, true, "Sentry ingestion URL";
    STATSD_HOST: Option<String> = |_| None, true, "StatsD host - integration disabled if this is not provided";
    STATSD_PORT: u16 = |_| 8125, true, "StatsD port";
    STATSD_PREFIX: String = |_| "plugin-server.".into(), true, "StatsD prefix";
    SCHEDULE_LOCK_TTL: f64 = |_| 60.0, true, "how many seconds to hold the lock for the schedule";
    REDIS_POOL_MIN_SIZE: usize = |_| 1, true, "minimum number of Redis connections to use per thread";
    REDIS_POOL_MAX_SIZE: usize = |_| 3, true, "maximum number of Redis connections to use per thread";
    DISABLE_MMDB: bool = |c| c.is_test(), true, "whether to disable fetching MaxMind database for IP location";
    DISTINCT_ID_LRU_SIZE: usize = |_| 10000, true, "size of persons distinct ID LRU cache";
    INTERNAL_MMDB_SERVER_PORT: u16 = |_| 0, true, "port of the internal server used for IP location (0 means random)";
    PLUGIN_SERVER_IDLE: bool = |_| false, true, "whether to disengage the plugin server, e.g. for development";
    JOB_QUEUES: String = |_| "graphile".into(), true, "retry queue engine and fallback queues";
    JOB_QUEUE_GRAPHILE_URL: String = |_| String::new(), true, "use a different postgres connection in the graphile retry queue";
    JOB_QUEUE_GRAPHILE_SCHEMA: String = |_| "graphile_worker".into(), true, "the postgres schema that the graphile job queue uses";
    JOB_QUEUE_GRAPHILE_PREPARED_STATEMENTS: bool = |_| false, true, "enable this to increase job queue throughput if not using pgbouncer";
    JOB_QUEUE_S3_AWS_ACCESS_KEY: String = |_| String::new(), true, "AWS access key for the S3 job queue";
    JOB_QUEUE_S3_AWS_SECRET_ACCESS_KEY: String = |_| String::new(), true, "AWS secret access key for the S3 job queue";
    JOB_QUEUE_S3_AWS_REGION: String = |_| "us-west-1".into(), true, "AWS region for the S3 job queue";
    JOB_QUEUE_S3_BUCKET_NAME: String = |_| String::new(), true, "S3 bucket name for the S3 job queue";
    JOB_QUEUE_S3_PREFIX: String = |_| String::new(), true, "S3 filename prefix for the S3 job queue";
    CRASH_IF_NO_PERSISTENT_JOB_QUEUE: bool = |_| false, true, "refuse to start unless there is a properly configured persistent job queue (e.g. graphile)";
    STALENESS_RESTART_SECONDS: f64 = |_| 0.0, true, "trigger a restart if no event ingested for this duration";
    CAPTURE_INTERNAL_METRICS: bool = |_| false, true, "capture internal metrics for posthog in posthog";
    PISCINA_USE_ATOMICS: bool = |_| true, true, "corresponds to the piscina useAtomics config option (https://github.com/piscinajs/piscina#constructor-new-piscinaoptions)";
    PISCINA_ATOMICS_TIMEOUT: f64 = |_| 5000.0, true, "(advanced) corresponds to the length of time a piscina worker should block for when looking for tasks";
    POSTHOG_DB_NAME: Option<String> = |_| None, false, "Postgres database name, used only when DATABASE_URL is empty";
    POSTHOG_DB_USER: String = |_| "postgres".into(), false, "Postgres user, used only when DATABASE_URL is empty";
    POSTHOG_DB_PASSWORD: String = |_| String::new(), false, "Postgres password, used only when DATABASE_URL is empty";
    POSTHOG_POSTGRES_HOST: String = |_| "localhost".into(), false, "Postgres host, used only when DATABASE_URL is empty";
    POSTHOG_POSTGRES_PORT: u16 = |_| 5432, false, "Postgres port, used only when DATABASE_URL is empty";
    KAFKA_PRODUCER_MAX_QUEUE_SIZE: usize = |c| if c.is_test() { 0 } else { 1000 }, false, "flush the Kafka producer buffer when it holds this many messages";
    KAFKA_MAX_MESSAGE_BATCH_SIZE: usize = |_| 900_000, false, "flush the Kafka producer buffer before it would exceed this many bytes";
    KAFKA_FLUSH_FREQUENCY_MS: u64 = |_| 500, false, "flush the Kafka producer buffer at least this often (milliseconds)";
    KAFKA_MAX_DELIVERY_ATTEMPTS: u32 = |_| 3, false, "Kafka mode: dead-letter a consumed event once its handling was started this many times without finishing (the server crashed on it); 0 turns the count off";
    POSTHOG_REDIS_PASSWORD: String = |_| String::new(), false, "Redis password, used when POSTHOG_REDIS_HOST is set";
    POSTHOG_REDIS_HOST: String = |_| String::new(), false, "Redis host; when set it overrides REDIS_URL";
    POSTHOG_REDIS_PORT: u16 = |_| 6379, false, "Redis port, used when POSTHOG_REDIS_HOST is set";
    DISABLE_WEB: bool = |_| true, false, "accepted for compatibility with later PostHog plugin servers (unused; the HTTP endpoints listen on HTTP_SERVER_PORT)";
    WEB_PORT: u16 = |_| 3008, false, "accepted for compatibility with later PostHog plugin servers (unused)";
    HTTP_SERVER_PORT: u16 = |c| if c.is_test() { 0 } else { 6738 }, false, "port of the HTTP endpoints /_health, /_ready and /metrics (Prometheus), as PostHog's later plugin servers; 0 turns them off (the default under NODE_ENV=test, so that test servers do not collide)";
    PLUGINS_CELERY_CONSUMER_ID: Option<String> = |_| None, false, "identity of this server's Celery consumer, stable across restarts (default: the host name); unique per server";
    PLUGINS_CELERY_MAX_DELIVERIES: u64 = |_| 5, false, "deliveries of one Celery message (the server died while handling it) before it is dead-lettered";
    PLUGINS_CELERY_DEDUPE_TTL_SECONDS: u64 = |_| 3600, false, "how long the marker of an event written from Celery but not yet acknowledged lives";
    WEB_HOSTNAME: String = |_| "0.0.0.0".into(), false, "accepted for compatibility with later PostHog plugin servers (unused)";
    ALLOW_INTERNAL_IPS: bool = |c| c.is_test() || c.is_dev(), false, "let plugins' fetch and posthog.api reach loopback, private, link-local and cloud-metadata addresses (as PostHog's later servers, allowed by default only in dev and test)";
    SITE_URL: Option<String> = |_| None, false, "URL of the PostHog instance: the default posthog.api host and the only one the plugins' bot user API key is sent to (unset: https://app.posthog.com, the reference's default)";
    PLUGIN_FETCH_MAX_RESPONSE_BYTES: usize = |_| 32 * 1024 * 1024, false, "largest response body a plugin's fetch or posthog.api may receive (bytes); a bigger body is a FetchError";
    PLUGIN_FETCH_BUFFER_MAX_BYTES: usize = |_| 256 * 1024 * 1024, false, "response bytes all plugin fetches together may hold while reading bodies; a body that would pass it is a FetchError";
    PLUGIN_MAX_HOST_CALLS_IN_FLIGHT: usize = |_| 500, false, "host calls (fetch, posthog.api, meta calls) one plugin VM may have in flight at once; more are refused with an error";
    INGESTION_RETRY_ATTEMPTS: u32 = |_| 10, false, "attempts at an event or job that fails for a passing reason (Postgres, Redis or Kafka unavailable, a plugin's JS worker thread lost) before it is dead-lettered";
    INGESTION_RETRY_BACKOFF_MS: u64 = |_| 500, false, "wait before the second attempt at an event or job (milliseconds); doubles after each attempt, up to 30 s";
    PLUGIN_WORKER_STALL_MS: u64 = |_| 0, false, "a JS worker thread silent this long (milliseconds) is stalled: it is replaced and its calls are retried; 0 means 2 × TASK_TIMEOUT + 5 s";
    REDIS_LOCK_PREFIX: String = |_| String::new(), false, "prefix of the Redis keys of the schedule and job queue consumer locks, for separate PostHog installs (or test servers) sharing one Redis; empty: the reference's keys plugin-server:locks:schedule and plugin-server:locks:job-queue-consumer";
    JS_ENGINE: JsEngine = |_| JsEngine::V8, false, "JavaScript engine of the plugin VMs: quickjs or v8 (Debian's libnode, V8 10.2)";
}

impl Config {
    /// `NODE_ENV` starts with `test`.
    pub fn is_test(&self) -> bool {
        self.node_env == NodeEnv::Test
    }

    /// `NODE_ENV` starts with `dev`.
    pub fn is_dev(&self) -> bool {
        self.node_env == NodeEnv::Development
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(&|key| std::env::var(key).ok())
    }

    /// Builds a configuration from explicit pairs on top of the defaults (tests, benches).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(&|key| pairs.iter().find(|(name, _)| *name == key).map(|(_, value)| value.to_string()))
    }

    /// Worker threads to start: `WORKER_CONCURRENCY`, where 0 means one per core.
    pub fn worker_threads(&self) -> usize {
        if self.WORKER_CONCURRENCY == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            self.WORKER_CONCURRENCY
        }
    }

    /// Tasks one worker thread runs at once (the reference ignores values below 2).
    pub fn tasks_per_worker(&self) -> usize {
        self.TASKS_PER_WORKER.max(1)
    }

    /// `TASK_TIMEOUT` as a duration.
    pub fn task_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.TASK_TIMEOUT)
    }

    /// The job queue types of `JOB_QUEUES`, in order, trimmed, empty entries dropped.
    pub fn job_queue_types(&self) -> Vec<String> {
        self.JOB_QUEUES.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

/// The `--help` listing: one line per variable, 7 spaces, `- NAME - description (default: …)`.
/// The reference's 47 documented variables come first, in its order.
pub fn format_help(node_env: NodeEnv) -> String {
    let defaults = Config::defaults_for_help(node_env);
    VARIABLES
        .iter()
        .zip(defaults.iter())
        .map(|(doc, (_, default))| {
            let default = if doc.name == "WORKER_CONCURRENCY" {
                format!("{default} (the number of CPU cores; 0 also means all cores)")
            } else {
                default.clone()
            };
            format!("       - {} - {} (default: {})", doc.name, doc.description, default)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The README's configuration table, generated from the same source as `--help`.
pub fn markdown_table() -> String {
    let defaults = Config::defaults_for_help(NodeEnv::Production);
    let test_defaults = Config::defaults_for_help(NodeEnv::Test);
    let mut out =
        String::from("| Variable | Description | Default | Default when NODE_ENV=test |\n|---|---|---|---|\n");
    for ((doc, (_, default)), (_, test_default)) in VARIABLES.iter().zip(defaults.iter()).zip(test_defaults.iter()) {
        let default =
            if doc.name == "WORKER_CONCURRENCY" { "number of CPU cores".to_string() } else { default.clone() };
        let test_default =
            if doc.name == "WORKER_CONCURRENCY" { "number of CPU cores".to_string() } else { test_default.clone() };
        let test_column = if test_default == default { String::new() } else { format!("`{test_default}`") };
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} |\n",
            doc.name,
            doc.description.replace('|', "\\|"),
            default,
            test_column
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_variables_match_reference_help_order() {
        let documented: Vec<&str> = VARIABLES.iter().filter(|doc| doc.in_reference_help).map(|doc| doc.name).collect();
        assert_eq!(documented.len(), 47);
        assert_eq!(&documented[..3], &["CELERY_DEFAULT_QUEUE", "PLUGINS_CELERY_QUEUE", "DATABASE_URL"]);
        assert_eq!(documented.last(), Some(&"PISCINA_ATOMICS_TIMEOUT"));
    }

    #[test]
    fn numbers_starting_with_a_dot_parse() {
        assert_eq!(f64::parse_env("TASK_TIMEOUT", ".5"), Ok(0.5));
    }
}
