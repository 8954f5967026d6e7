//! Configuration: defaults per environment, overrides, rejections, and the connection settings
//! derived from it (issue 2).

use plugin_server::config::{markdown_table, Config, LogLevel, NodeEnv, VARIABLES};
use plugin_server::hub::{describe_redis, postgres_options, redis_url, HubError};

fn config(pairs: &[(&str, &str)]) -> Config {
    Config::from_pairs(pairs).expect("valid config")
}

#[test]
fn production_defaults_match_the_reference() {
    let c = config(&[]);
    assert_eq!(c.CELERY_DEFAULT_QUEUE, "celery");
    assert_eq!(c.PLUGINS_CELERY_QUEUE, "posthog-plugins");
    assert_eq!(c.DATABASE_URL, None);
    assert_eq!(c.POSTHOG_DB_USER, "postgres");
    assert_eq!(c.POSTHOG_POSTGRES_HOST, "localhost");
    assert_eq!(c.POSTHOG_POSTGRES_PORT, 5432);
    assert_eq!(c.CLICKHOUSE_DATABASE, "default");
    assert_eq!(c.KAFKA_CONSUMPTION_TOPIC.as_deref(), Some("events_plugin_ingestion"));
    assert_eq!(c.KAFKA_PRODUCER_MAX_QUEUE_SIZE, 1000);
    assert_eq!(c.KAFKA_MAX_MESSAGE_BATCH_SIZE, 900_000);
    assert_eq!(c.KAFKA_FLUSH_FREQUENCY_MS, 500);
    assert_eq!(c.REDIS_URL, "redis://127.0.0.1");
    assert_eq!(c.POSTHOG_REDIS_PORT, 6379);
    assert_eq!(c.BASE_DIR, ".");
    assert_eq!(c.PLUGINS_RELOAD_PUBSUB_CHANNEL, "reload-plugins");
    assert_eq!(c.WORKER_CONCURRENCY, std::thread::available_parallelism().unwrap().get());
    assert_eq!(c.TASK_TIMEOUT, 30.0);
    assert_eq!(c.TASKS_PER_WORKER, 10);
    assert_eq!(c.LOG_LEVEL, LogLevel::Info);
    assert_eq!(c.STATSD_PORT, 8125);
    assert_eq!(c.STATSD_PREFIX, "plugin-server.");
    assert_eq!(c.SCHEDULE_LOCK_TTL, 60.0);
    assert_eq!(c.REDIS_POOL_MIN_SIZE, 1);
    assert_eq!(c.REDIS_POOL_MAX_SIZE, 3);
    assert!(!c.DISABLE_MMDB);
    assert_eq!(c.DISTINCT_ID_LRU_SIZE, 10000);
    assert_eq!(c.INTERNAL_MMDB_SERVER_PORT, 0);
    assert!(!c.PLUGIN_SERVER_IDLE);
    assert_eq!(c.JOB_QUEUES, "graphile");
    assert_eq!(c.JOB_QUEUE_GRAPHILE_SCHEMA, "graphile_worker");
    assert_eq!(c.JOB_QUEUE_S3_AWS_REGION, "us-west-1");
    assert!(!c.CRASH_IF_NO_PERSISTENT_JOB_QUEUE);
    assert_eq!(c.STALENESS_RESTART_SECONDS, 0.0);
    assert!(!c.CAPTURE_INTERNAL_METRICS);
    assert!(c.PISCINA_USE_ATOMICS);
    assert_eq!(c.PISCINA_ATOMICS_TIMEOUT, 5000.0);
}

#[test]
fn test_and_dev_environments_have_their_own_defaults() {
    let test = config(&[("NODE_ENV", "test")]);
    assert_eq!(test.DATABASE_URL.as_deref(), Some("postgres://localhost:5432/test_posthog"));
    assert_eq!(test.CLICKHOUSE_DATABASE, "posthog_test");
    assert_eq!(test.KAFKA_PRODUCER_MAX_QUEUE_SIZE, 0);
    assert_eq!(test.LOG_LEVEL, LogLevel::Warn);
    assert!(test.DISABLE_MMDB);

    let dev = config(&[("NODE_ENV", "Development")]);
    assert_eq!(dev.DATABASE_URL.as_deref(), Some("postgres://localhost:5432/posthog"));
    let debug = config(&[("DEBUG", "yes")]);
    assert_eq!(debug.DATABASE_URL.as_deref(), Some("postgres://localhost:5432/posthog"));
    assert_eq!(NodeEnv::detect(&|k| (k == "NODE_ENV").then(|| "testing".to_string())), NodeEnv::Test);
    assert_eq!(NodeEnv::detect(&|_| None), NodeEnv::Production);
}

#[test]
fn environment_overrides_are_parsed_by_type() {
    let c = config(&[
        ("WORKER_CONCURRENCY", "4"),
        ("TASK_TIMEOUT", "2.5"),
        ("KAFKA_ENABLED", "TRUE"),
        ("DISABLE_MMDB", "0"),
        ("LOG_LEVEL", "debug"),
        ("KAFKA_HOSTS", "kafka:9092"),
        ("SENTRY_DSN", ""),
        ("JOB_QUEUES", " graphile , fs ,"),
        ("STATSD_PORT", "9125"),
    ]);
    assert_eq!(c.WORKER_CONCURRENCY, 4);
    assert_eq!(c.TASK_TIMEOUT, 2.5);
    assert!(c.KAFKA_ENABLED);
    assert!(!c.DISABLE_MMDB);
    assert_eq!(c.LOG_LEVEL, LogLevel::Debug);
    assert_eq!(c.KAFKA_HOSTS.as_deref(), Some("kafka:9092"));
    assert_eq!(c.SENTRY_DSN, None, "an empty nullable string counts as unset, as in the reference");
    assert_eq!(c.job_queue_types(), vec!["graphile", "fs"]);
    assert_eq!(c.STATSD_PORT, 9125);
    for truthy in ["y", "yes", "t", "true", "on", "1", "Yes"] {
        assert!(config(&[("CAPTURE_INTERNAL_METRICS", truthy)]).CAPTURE_INTERNAL_METRICS, "{truthy}");
    }
    for falsy in ["n", "no", "f", "false", "off", "0", ""] {
        assert!(!config(&[("PISCINA_USE_ATOMICS", falsy)]).PISCINA_USE_ATOMICS, "{falsy}");
    }
}

#[test]
fn worker_concurrency_zero_means_all_cores() {
    let c = config(&[("WORKER_CONCURRENCY", "0")]);
    assert_eq!(c.worker_threads(), std::thread::available_parallelism().unwrap().get());
}

#[test]
fn bad_values_are_rejected_naming_variable_and_value() {
    let cases = [
        ("WORKER_CONCURRENCY", "abc"),
        ("WORKER_CONCURRENCY", "1.5"),
        ("WORKER_CONCURRENCY", "-1"),
        ("KAFKA_ENABLED", "maybe"),
        ("LOG_LEVEL", "verbose"),
        ("TASK_TIMEOUT", "soon"),
        ("STATSD_PORT", "70000"),
    ];
    for (name, value) in cases {
        let error = Config::from_pairs(&[(name, value)]).expect_err(name);
        let line = error.to_string();
        assert!(line.contains(name) && line.contains(value), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }
}

#[test]
fn postgres_connection_settings() {
    let discrete = config(&[
        ("POSTHOG_DB_NAME", "posthog"),
        ("POSTHOG_DB_USER", "me"),
        ("POSTHOG_POSTGRES_HOST", "db.internal"),
        ("POSTHOG_POSTGRES_PORT", "6543"),
    ]);
    let options = postgres_options(&discrete).unwrap();
    assert_eq!(options.get_host(), "db.internal");
    assert_eq!(options.get_port(), 6543);
    assert_eq!(options.get_username(), "me");
    assert_eq!(options.get_database(), Some("posthog"));

    let url = config(&[("DATABASE_URL", "postgres://u@h:1234/d"), ("POSTHOG_DB_NAME", "ignored")]);
    let options = postgres_options(&url).unwrap();
    assert_eq!((options.get_host(), options.get_port(), options.get_database()), ("h", 1234, Some("d")));

    let error = postgres_options(&config(&[])).unwrap_err();
    assert!(matches!(error, HubError::MissingPostgresConfig));
    assert_eq!(
        error.to_string(),
        "Invalid configuration for Postgres: either DATABASE_URL or POSTHOG_DB_NAME required"
    );
}

#[test]
fn redis_connection_settings() {
    assert_eq!(redis_url(&config(&[("REDIS_URL", "redis://cache:6380")])), "redis://cache:6380");
    let discrete = config(&[
        ("REDIS_URL", "redis://ignored"),
        ("POSTHOG_REDIS_HOST", "redis.internal"),
        ("POSTHOG_REDIS_PORT", "6390"),
        ("POSTHOG_REDIS_PASSWORD", "s3cr:t"),
    ]);
    assert_eq!(redis_url(&discrete), "redis://:s3cr%3At@redis.internal:6390");
    assert_eq!(describe_redis(&discrete), "redis://***@redis.internal:6390");
}

#[test]
fn readme_configuration_table_is_generated_from_the_config_source() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's configuration table is stale; replace it with the output of `plugin-server --config-table`:\n{table}"
    );
    for variable in VARIABLES {
        assert!(readme.contains(&format!("`{}`", variable.name)), "{} missing from README", variable.name);
    }
}

#[test]
fn lock_keys_are_the_reference_s_unless_prefixed() {
    use plugin_server::jobs::consumer::JobConsumerSettings;
    use plugin_server::schedule::ScheduleSettings;
    let plain = config(&[]);
    assert_eq!(ScheduleSettings::from_config(&plain).lock_resource, "plugin-server:locks:schedule");
    assert_eq!(JobConsumerSettings::from_config(&plain).lock_resource, "plugin-server:locks:job-queue-consumer");
    let prefixed = config(&[("REDIS_LOCK_PREFIX", "eu:")]);
    assert_eq!(ScheduleSettings::from_config(&prefixed).lock_resource, "eu:plugin-server:locks:schedule");
    assert_eq!(JobConsumerSettings::from_config(&prefixed).lock_resource, "eu:plugin-server:locks:job-queue-consumer");
}
