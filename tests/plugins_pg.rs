//! PostHog's own Postgres-family plugins, unmodified (`tests/data/plugins/`), through the whole
//! server in process: Celery events in, `exportEvents` (and the plugin's own jobs) through the
//! `pg` facade, rows out in a table of the local PostgreSQL; a destination that fails (its
//! table dropped) makes the plugin retry as it was written to (its own job, or `RetryError` and
//! the server's `exportEventsWithRetry`), and no event is lost.

mod common;

use std::io::Write;
use std::time::Duration;

use common::in_process::{self, InProcessServer};
use common::{wait_for, TestDb};
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use serde_json::{json, Map, Value};

struct RunningServer(InProcessServer);

impl RunningServer {
    /// A server on `db`, on its own Celery queue, with the graphile job queue.
    async fn start(db: &TestDb) -> RunningServer {
        RunningServer(InProcessServer::start(in_process::celery_config(
            db,
            "pg-plugins",
            &[("JOB_QUEUES", "graphile")],
        )))
    }

    /// `process_event_with_plugins` as PostHog's Django app sends it.
    async fn send(&self, event: &str, distinct_id: &str) {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // As posthog-js sends it: with the client's `timestamp` (the Redshift plugin reads it).
        let data = json!({
            "event": event, "properties": {"kept": event, "$ip": "10.0.0.1"}, "uuid": uuid::Uuid::now_v7().to_string(),
            "timestamp": now,
        });
        let args = json!([distinct_id, null, "http://127.0.0.1:8000", data, common::TEAM_ID, now, now]);
        self.0.producer.send_task(PROCESS_EVENT_TASK, args.as_array().unwrap(), &Map::new()).await.unwrap();
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

/// A zip of `tests/data/plugins/<folder>` as PostHog stores a plugin archive.
fn plugin_archive(folder: &str) -> Vec<u8> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/plugins").join(folder);
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options: zip::write::SimpleFileOptions = zip::write::SimpleFileOptions::default();
        let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            zip.start_file(format!("{folder}-main/{}", entry.file_name().to_string_lossy()), options).unwrap();
            zip.write_all(&std::fs::read(entry.path()).unwrap()).unwrap();
        }
        zip.finish().unwrap();
    }
    buffer.into_inner()
}

/// Installs the plugin in `folder` for the test team with `config`.
async fn install(db: &TestDb, plugin_id: i32, config_id: i32, folder: &str, config: Value) {
    sqlx::query(
        "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, url, config_schema, tag,
            archive, error, from_json, from_web, is_global, is_preinstalled, capabilities, metrics)
         VALUES ($1, $2::uuid, 'custom', $3, 'test', 'https://github.com/PostHog', '{}', '0.0.1', $4,
            NULL, false, false, false, false, '{}', '{}')",
    )
    .bind(plugin_id)
    .bind(common::COMMON_ORGANIZATION_ID)
    .bind(folder)
    .bind(plugin_archive(folder))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
         VALUES ($1, $2, $3, true, 0, $4, NULL, now(), now())",
    )
    .bind(config_id)
    .bind(common::TEAM_ID)
    .bind(plugin_id)
    .bind(config)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn database_with_team() -> TestDb {
    let db = TestDb::empty().await;
    common::reset_test_database(&db.pool, None, false).await;
    db
}

/// `(event, distinct_id, properties.kept, team_id, has uuid)` of the exported rows, by event.
async fn exported(db: &TestDb, table: &str) -> Vec<(String, String, String, i32, bool)> {
    let sql = format!(
        "SELECT event, distinct_id, (properties::jsonb)->>'kept', team_id, uuid IS NOT NULL FROM {table} ORDER BY event"
    );
    sqlx::query_as(&sql).fetch_all(&db.pool).await.unwrap_or_default()
}

async fn wait_for_rows(db: &TestDb, table: &str, count: usize) -> Vec<(String, String, String, i32, bool)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = exported(db, table).await;
        if rows.len() >= count {
            return rows;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {count} rows in {table} (have {rows:?}); plugin logs and errors: {:?}",
                diagnosis(db).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The plugins' log lines and config errors, for a failing test's message.
async fn diagnosis(db: &TestDb) -> (Vec<(i32, String)>, Vec<(i32, Option<Value>)>) {
    let logs = sqlx::query_as("SELECT plugin_config_id, message FROM posthog_pluginlogentry ORDER BY timestamp")
        .fetch_all(&db.pool)
        .await
        .unwrap_or_default();
    let errors =
        sqlx::query_as("SELECT id, error FROM posthog_pluginconfig").fetch_all(&db.pool).await.unwrap_or_default();
    (logs, errors)
}

async fn console_logs(db: &TestDb, config_id: i32) -> Vec<String> {
    sqlx::query_scalar("SELECT message FROM posthog_pluginlogentry WHERE plugin_config_id = $1 ORDER BY timestamp")
        .bind(config_id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn wait_for_log(db: &TestDb, config_id: i32, part: &str) {
    wait_for(&format!("a log line with {part:?}"), || async {
        console_logs(db, config_id).await.iter().any(|line| line.contains(part)).then_some(())
    })
    .await;
}

fn row(event: &str, distinct_id: &str) -> (String, String, String, i32, bool) {
    (event.to_string(), distinct_id.to_string(), event.to_string(), common::TEAM_ID, true)
}

/// PostHog/postgres-plugin: `setupPlugin` creates the table over TLS (self-signed certificate
/// accepted, as its `hasSelfSignedCert: Yes` asks), `exportEvents` hands each batch to its
/// `uploadBatchToPostgres` job, which inserts it; with the table gone the job fails, logs, and
/// re-enqueues itself, and the batch lands once the table is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_plugin_exports_events_and_retries_with_its_own_job() {
    let db = database_with_team().await;
    let table = "pg_plugin_events";
    install(
        &db,
        88,
        188,
        "postgres-plugin",
        json!({
            "host": "127.0.0.1", "port": "5432", "dbName": db.name, "tableName": table, "dbUsername": "postgres",
            "dbPassword": "unused-with-trust", "hasSelfSignedCert": "Yes", "eventsToIgnore": "ignored-event",
            "exportEventsBufferSeconds": "1"
        }),
    )
    .await;
    let server = RunningServer::start(&db).await;
    for (event, distinct_id) in [("a-first", "u1"), ("ignored-event", "u1"), ("b-second", "u2"), ("c-third", "u3")] {
        server.send(event, distinct_id).await;
    }
    let rows = wait_for_rows(&db, table, 3).await;
    assert_eq!(rows, vec![row("a-first", "u1"), row("b-second", "u2"), row("c-third", "u3")]);
    let ip: Option<String> = sqlx::query_scalar(&format!("SELECT ip FROM {table} WHERE event = 'a-first'"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ip.as_deref(), Some("10.0.0.1"));

    // The destination fails: the plugin's job logs, retries in 3 s, and delivers once it is back.
    sqlx::raw_sql(&format!("DROP TABLE {table}")).execute(&db.pool).await.unwrap();
    server.send("d-fourth", "u4").await;
    server.send("e-fifth", "u5").await;
    wait_for_log(&db, 188, &format!("Error uploading to Postgres: relation \"{table}\" does not exist")).await;
    wait_for_log(&db, 188, "for retry in 3000ms").await;
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (uuid varchar(200), event varchar(200), properties jsonb, elements jsonb, set jsonb,
            set_once jsonb, timestamp timestamp with time zone, team_id int, distinct_id varchar(200),
            ip varchar(200), site_url varchar(200))"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let rows = wait_for_rows(&db, table, 2).await;
    assert_eq!(rows, vec![row("d-fourth", "u4"), row("e-fifth", "u5")]);
    server.stop().await;
}

/// PostHog/redshift-plugin against the local PostgreSQL (a Redshift host name resolved to it for
/// the test; `varchar` properties, as Postgres has no `super`): rows arrive; with the table
/// gone its `exportEvents` throws `RetryError`, the server retries the batch (6 s later), and the
/// batch lands once the table is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redshift_plugin_exports_events_and_retries_on_retry_error() {
    let host = "facade-test.abc123xyz.us-east-1.redshift.amazonaws.com";
    // TEST HOOK: the cluster's name stands for the local PostgreSQL.
    plugin_server::plugins::runtime::add_test_public_host(host, "127.0.0.1".parse().unwrap());
    let db = database_with_team().await;
    let table = "redshift_events";
    install(
        &db,
        89,
        189,
        "redshift-plugin",
        json!({
            "clusterHost": host, "clusterPort": "5432", "dbName": db.name, "tableName": table,
            "dbUsername": "postgres", "dbPassword": "unused-with-trust", "uploadSeconds": "1", "uploadMegabytes": "1",
            "eventsToIgnore": "ignored-event", "propertiesDataType": "varchar", "exportEventsBufferSeconds": "1"
        }),
    )
    .await;
    let server = RunningServer::start(&db).await;
    for (event, distinct_id) in [("a-first", "u1"), ("ignored-event", "u1"), ("b-second", "u2")] {
        server.send(event, distinct_id).await;
    }
    let rows = wait_for_rows(&db, table, 2).await;
    assert_eq!(rows, vec![row("a-first", "u1"), row("b-second", "u2")]);

    sqlx::raw_sql(&format!("DROP TABLE {table}")).execute(&db.pool).await.unwrap();
    server.send("c-third", "u3").await;
    wait_for_log(
        &db,
        189,
        &format!("Error uploading to Redshift: relation \"{table}\" does not exist. Setting up retries..."),
    )
    .await;
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (uuid varchar(200), event varchar(200), properties varchar(65535),
            elements varchar(65535), set varchar(65535), set_once varchar(65535),
            timestamp timestamp with time zone, team_id int, distinct_id varchar(200), ip varchar(200),
            site_url varchar(200))"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let rows = wait_for_rows(&db, table, 1).await;
    assert_eq!(rows, vec![row("c-third", "u3")]);
    server.stop().await;
}

/// PostHog/postgres-import-events-plugin: its `Import events` job reads `$pageview` rows of
/// another team minute by minute through a `pg.Pool` (over TLS) and captures them, chaining its
/// own jobs until the end date; the captured events are ingested for the plugin's team.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_import_plugin_imports_events_with_a_pool() {
    let db = database_with_team().await;
    common::create_team(&db.pool, 99, common::COMMON_ORGANIZATION_ID).await;
    for (event, distinct_id, at) in [
        ("$pageview", "s1", "2021-11-01T10:00:10Z"),
        ("other", "s0", "2021-11-01T10:00:20Z"),
        ("$pageview", "s2", "2021-11-01T10:00:40Z"),
        ("$pageview", "s3", "2021-11-01T10:01:30Z"),
        ("$pageview", "late", "2021-11-01T10:05:00Z"),
    ] {
        sqlx::query(
            "INSERT INTO posthog_event (created_at, event, distinct_id, properties, team_id, timestamp)
             VALUES (now(), $1, $2, $3, 99, $4::timestamptz)",
        )
        .bind(event)
        .bind(distinct_id)
        .bind(json!({"source": distinct_id}))
        .bind(at)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    install(
        &db,
        90,
        190,
        "postgres-import-events-plugin",
        json!({
            "host": "127.0.0.1", "port": "5432", "dbName": db.name, "dbUsername": "postgres",
            "dbPassword": "unused-with-trust", "hasSelfSignedCert": "Yes", "teamId": "99"
        }),
    )
    .await;
    let server = RunningServer::start(&db).await;
    let job = json!({
        "type": "Import events",
        "payload": {"dateFrom": "2021-11-01T10:00:00.000Z", "dateTo": "2021-11-01T10:01:40.000Z"},
        "timestamp": chrono::Utc::now().timestamp_millis(),
        "pluginConfigId": 190,
        "pluginConfigTeam": common::TEAM_ID,
    });
    // The server creates the job queue's schema as it starts.
    wait_for("the job to be queued", || async {
        sqlx::query(&format!("SELECT {}.add_job('pluginJob', $1::json)", common::GRAPHILE_SCHEMA))
            .bind(job.to_string())
            .execute(&db.pool)
            .await
            .ok()
    })
    .await;
    let imported: Vec<(String, Option<String>)> = wait_for("three imported events", || async {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT properties->>'distinctId', properties->>'source' FROM posthog_event
             WHERE team_id = $1 AND event = '$pageview' ORDER BY properties->>'distinctId'",
        )
        .bind(common::TEAM_ID)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        (rows.len() >= 3).then_some(rows)
    })
    .await;
    assert_eq!(
        imported,
        vec![("s1".into(), Some("s1".into())), ("s2".into(), Some("s2".into())), ("s3".into(), Some("s3".into()))]
    );
    wait_for_log(&db, 190, "done, exiting").await;
    server.stop().await;
}
