//! The `plugin-server` binary run as a process: every CLI mode's exit code and output, the health
//! ping seen from another process, graceful and forced shutdown, start-up failures (issue 2).
//!
//! Servers here use a Redis database number of their own (the ping key is global by design), so
//! these tests do not disturb other tests that use Redis database 0.

mod common;

use std::time::{Duration, Instant};

use common::server_process::{run, stderr, stdout, Server};
use common::TestDb;

fn flush_redis_db(db: u8) {
    let client = redis::Client::open(format!("{}/{db}", common::redis_url())).unwrap();
    let mut connection = client.get_connection().unwrap();
    let _: () = redis::cmd("FLUSHDB").query(&mut connection).unwrap();
}

#[test]
fn version_prints_the_version() {
    let output = run(&["--version"], &[]);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("@posthog/plugin-server v1.10.5"));
    let short = run(&["-v"], &[]);
    assert_eq!(short.status.code(), Some(0));
}

#[test]
fn help_lists_every_variable_with_description_and_default() {
    let output = run(&["--help"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    assert!(text.contains("Supported configuration environment variables:"));
    for variable in plugin_server::config::VARIABLES {
        let line = text
            .lines()
            .find(|line| line.starts_with(&format!("       - {} - ", variable.name)))
            .unwrap_or_else(|| panic!("{} missing from --help", variable.name));
        assert!(line.contains(variable.description) && line.contains("(default: "), "{line}");
    }
    assert!(text.contains("- TASK_TIMEOUT - how many seconds until tasks are timed out (default: 30)"));
    // -h wins over every other mode, as in the reference.
    assert_eq!(run(&["--healthcheck", "-h"], &[]).status.code(), Some(0));
}

#[test]
fn help_works_even_with_an_invalid_environment() {
    let output = run(&["--help"], &[("WORKER_CONCURRENCY", "abc")]);
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn invalid_configuration_stops_start_up_with_one_clear_line() {
    for (name, value) in [("WORKER_CONCURRENCY", "abc"), ("KAFKA_ENABLED", "maybe")] {
        let output = run(&[], &[(name, value)]);
        assert_eq!(output.status.code(), Some(1), "{name}={value}");
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "{message}");
        assert!(message.contains(name) && message.contains(value), "{message}");
    }
}

#[test]
fn healthcheck_with_unreachable_redis_exits_1_quickly() {
    let started = Instant::now();
    let output = run(&["--healthcheck"], &[("REDIS_URL", "redis://127.0.0.1:1")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    // A host that never answers (TEST-NET) must not hang either.
    let started = Instant::now();
    let output = run(&["--healthcheck"], &[("REDIS_URL", "redis://192.0.2.1:6379")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_follows_the_server_lifecycle_and_sigterm_shuts_down_gracefully() {
    const REDIS_DB: u8 = 11;
    flush_redis_db(REDIS_DB);
    let db = TestDb::empty().await;
    let redis = format!("{}/{REDIS_DB}", common::redis_url());
    let env = [("DATABASE_URL", db.url.as_str()), ("REDIS_URL", redis.as_str()), ("LOG_LEVEL", "info")];

    let before = run(&["--healthcheck"], &env);
    assert_eq!(before.status.code(), Some(1), "no server yet: {}", stdout(&before));
    assert!(stdout(&before).contains("not found! Plugin server seems to be offline"));

    let mut server = Server::start(&[], &env);
    assert!(server.wait_for_line("All systems go", Duration::from_secs(30)), "{}", server.output());
    let during = run(&["--healthcheck"], &env);
    assert_eq!(during.status.code(), Some(0), "{}", stdout(&during));
    assert!(stdout(&during).contains("Redis key @posthog-plugin-server/ping found with value"));

    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut connection = client.get_connection().unwrap();
    let version: String = redis::cmd("GET").arg("@posthog-plugin-server/version").query(&mut connection).unwrap();
    assert_eq!(version, "1.10.5");
    let queues: String =
        redis::cmd("GET").arg("@posthog-plugin-server/enabled-job-queues").query(&mut connection).unwrap();
    assert_eq!(queues, "\"graphile\"", "JSON-encoded as the reference writes it");
    let ttl: i64 = redis::cmd("TTL").arg("@posthog-plugin-server/ping").query(&mut connection).unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");

    let stopping = Instant::now();
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let code = server.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", server.output());
    assert!(stopping.elapsed() < Duration::from_secs(15));
    assert!(server.output().contains("Over and out"));

    let after = run(&["--healthcheck"], &env);
    assert_eq!(after.status.code(), Some(1), "the ping is gone once the server stopped");
}

/// A component that panics (fault injected in debug builds) brings the process down with exit
/// code 1, and the health ping is no longer there.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_component_exits_1_and_the_ping_stops() {
    const REDIS_DB: u8 = 14;
    flush_redis_db(REDIS_DB);
    let db = TestDb::empty().await;
    let redis = format!("{}/{REDIS_DB}", common::redis_url());
    let queue = common::unique_prefix("panicking");
    for fault in ["panic", "exit"] {
        let env = [
            ("DATABASE_URL", db.url.as_str()),
            ("REDIS_URL", redis.as_str()),
            ("LOG_LEVEL", "info"),
            ("PLUGINS_CELERY_QUEUE", queue.as_str()),
            ("PLUGIN_SERVER_TEST_FAULT", fault),
        ];
        let mut server = Server::start(&[], &env);
        let code = server.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(1), "{fault}: {}", server.output());
        let output = server.output();
        let expected = if fault == "panic" {
            "component injected fault panicked: injected panic"
        } else {
            "component injected fault stopped unexpectedly"
        };
        assert!(output.contains(expected), "{fault}: {output}");
        let after = run(&["--healthcheck"], &env);
        assert_eq!(after.status.code(), Some(1), "{fault}: the ping is gone: {}", stdout(&after));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_forces_the_exit() {
    const REDIS_DB: u8 = 12;
    let db = TestDb::empty().await;
    let redis = format!("{}/{REDIS_DB}", common::redis_url());
    let env = [("DATABASE_URL", db.url.as_str()), ("REDIS_URL", redis.as_str()), ("LOG_LEVEL", "info")];
    let mut server = Server::start(&[], &env);
    assert!(server.wait_for_line("All systems go", Duration::from_secs(30)), "{}", server.output());
    server.signal(nix::sys::signal::Signal::SIGINT);
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some(), "{}", server.output());
}

#[test]
fn start_up_against_unreachable_postgres_fails_with_a_clear_message() {
    let started = Instant::now();
    let output = run(&[], &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing"), ("LOG_LEVEL", "info")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("Cannot connect to Postgres at 127.0.0.1:1/nothing"), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn start_up_without_any_postgres_configuration_names_the_variables() {
    let output = run(&[], &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("either DATABASE_URL or POSTHOG_DB_NAME required"), "{}", stderr(&output));
}

#[test]
fn start_up_against_unreachable_redis_fails_with_a_clear_message() {
    let database = common::database_url("postgres");
    let output = run(&[], &[("DATABASE_URL", database.as_str()), ("REDIS_URL", "redis://127.0.0.1:1")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("Cannot connect to Redis at redis://127.0.0.1:1"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_the_graphile_schema_once() {
    let name = format!("pst_migrate_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&common::database_url("postgres")).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let url = common::database_url(&name);

    let first = run(&["--migrate"], &[("DATABASE_URL", url.as_str())]);
    assert_eq!(first.status.code(), Some(0), "{} {}", stdout(&first), stderr(&first));
    assert!(stdout(&first).contains("Graphile migrations are now up to date!"));
    assert!(stdout(&first).contains("[1, 2, 3, 4, 5, 6, 7, 8]"));

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let applied: Vec<i32> =
        sqlx::query_scalar("SELECT id FROM graphile_worker.migrations ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(applied, (1..=8).collect::<Vec<_>>());
    let job: i64 = sqlx::query_scalar("SELECT id FROM graphile_worker.add_job('pluginJob', '{\"a\": 1}'::json)")
        .fetch_one(&pool)
        .await
        .expect("graphile's add_job exists");
    assert!(job > 0);

    let second = run(&["--migrate"], &[("DATABASE_URL", url.as_str())]);
    assert_eq!(second.status.code(), Some(0));
    assert!(stdout(&second).contains("applied: []"), "{}", stdout(&second));

    // A custom schema name and JOB_QUEUE_GRAPHILE_URL are honoured.
    let custom = run(
        &["--migrate"],
        &[
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/x"),
            ("JOB_QUEUE_GRAPHILE_URL", url.as_str()),
            ("JOB_QUEUE_GRAPHILE_SCHEMA", "jobs_here"),
        ],
    );
    assert_eq!(custom.status.code(), Some(0), "{}", stderr(&custom));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs_here.migrations").fetch_one(&pool).await.unwrap();
    assert_eq!(count, 8);
    pool.close().await;
}

#[test]
fn migrate_without_graphile_has_nothing_to_do() {
    let output = run(&["--migrate"], &[("JOB_QUEUES", "fs")]);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("Graphile job queues not enabled. Nothing to migrate."));
}

#[test]
fn migrate_against_unreachable_postgres_exits_1() {
    let output = run(&["--migrate"], &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("Error running migrations for Graphile Worker!"));
}

#[test]
fn idle_mode_stays_up_doing_nothing_until_a_signal() {
    for (args, env) in [(vec!["--idle"], vec![]), (vec![], vec![("PLUGIN_SERVER_IDLE", "true")])] {
        // No database or Redis is needed: idle touches nothing.
        let mut server = Server::start(&args, &env);
        assert!(server.wait_for_line("Disengaging this plugin server instance", Duration::from_secs(10)));
        assert_eq!(server.wait_exit(Duration::from_millis(1500)), None, "still running");
        server.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(0));
    }
}

#[test]
fn unknown_arguments_are_ignored_like_the_reference() {
    let output = run(&["--some-flag", "extra", "--version"], &[]);
    assert_eq!(output.status.code(), Some(0));
}
