//! Shared test support: a fresh Postgres database per test (PostHog schema + graphile schema),
//! the reference's standard fixture (`resetTestDatabase`), a per-test Redis key prefix, and a
//! configuration pointing at them. Every integration test file starts with `mod common;`.
//! Submodules: `http_stub` (stand-ins for external HTTP services), `in_process` (the whole server
//! in the test's process), `moto` (a local S3/Kinesis server) and `server_process` (the binary run
//! as a process).
//!
//! Databases are cloned from a template built once per schema version (the template's name
//! carries a hash of the SQL), so a test pays a `CREATE DATABASE … TEMPLATE` (tens of ms), not the
//! whole schema. `scripts/test` drops leftover `pst_*` databases before a run.
#![allow(dead_code)]

pub mod http_stub;
pub mod in_process;
pub mod moto;
pub mod server_process;
pub mod statsd;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use plugin_server::config::Config;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

pub const COMMON_USER_ID: i32 = 1001;
pub const COMMON_USER_UUID: &str = "797757a4-baed-4fa8-b73b-2b6cf0300299";
pub const COMMON_ORGANIZATION_ID: &str = "ca30f2ec-e9a4-4001-bf27-3ef194086068";
pub const COMMON_ORGANIZATION_MEMBERSHIP_ID: &str = "0177364a-fc7b-0000-511c-137090b9e4e1";
pub const TEAM_ID: i32 = 2;
pub const PLUGIN_ID: i32 = 60;
pub const PLUGIN_CONFIG_ID: i32 = 39;
pub const ATTACHMENT_ID: i32 = 42666;
pub const GRAPHILE_SCHEMA: &str = "graphile_worker";

/// Postgres server for tests: `TEST_POSTGRES_HOST`/`TEST_POSTGRES_PORT`, default 127.0.0.1:5432,
/// user `postgres`, trust auth.
fn server_options() -> PgConnectOptions {
    let host = std::env::var("TEST_POSTGRES_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("TEST_POSTGRES_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(5432);
    PgConnectOptions::new().host(&host).port(port).username("postgres")
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A fresh database with the full schema and no rows.
    pub async fn empty() -> TestDb {
        let template = ensure_template().await;
        let name = format!("pst_{}", Uuid::new_v4().simple());
        let mut admin = admin_connection().await;
        for attempt in 0.. {
            let created = admin.execute(format!("CREATE DATABASE {name} TEMPLATE {template}").as_str()).await;
            match created {
                Ok(_) => break,
                // Another test is cloning the same template at this instant.
                Err(error) if attempt < 50 && error.to_string().contains("being accessed by other users") => {
                    tokio::time::sleep(Duration::from_millis(50 + attempt * 10)).await
                }
                Err(error) => panic!("cannot create test database {name}: {error}"),
            }
        }
        let _ = admin.close().await;
        let options = server_options().database(&name);
        let url = database_url(&name);
        let pool = PgPoolOptions::new().max_connections(10).connect_with(options).await.expect("connect test db");
        TestDb { name, url, pool }
    }

    /// A fresh database with the reference's standard fixture (`resetTestDatabase(code)`,
    /// `withExtendedTestData = true`).
    pub async fn with_fixture(code: Option<&str>) -> TestDb {
        let db = TestDb::empty().await;
        reset_test_database(&db.pool, code, true).await;
        db
    }

    /// Configuration for a server/test against this database and the given Redis key space.
    /// `JS_ENGINE` comes from the environment (as for the server processes tests start), so
    /// `scripts/test`'s second pass runs in-process servers on V8 too.
    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        let redis = redis_url();
        let engine = std::env::var("JS_ENGINE").unwrap_or_default();
        let mut pairs: Vec<(&str, &str)> =
            vec![("NODE_ENV", "test"), ("DATABASE_URL", self.url.as_str()), ("REDIS_URL", redis.as_str())];
        if !engine.is_empty() {
            pairs.push(("JS_ENGINE", engine.as_str()));
        }
        // The schedule and job queue locks of this database's servers only: servers of other
        // tests on the same Redis would otherwise hold them (one key per Redis) for minutes.
        let lock_prefix = format!("{}:", self.name);
        pairs.push(("REDIS_LOCK_PREFIX", lock_prefix.as_str()));
        pairs.extend_from_slice(extra);
        // Later pairs win: look up from the end.
        Config::from_lookup(&|key| pairs.iter().rev().find(|(name, _)| *name == key).map(|(_, v)| v.to_string()))
            .expect("valid test config")
    }
}

pub fn database_url(name: &str) -> String {
    let options = server_options();
    format!("postgres://postgres@{}:{}/{}", options.get_host(), options.get_port(), name)
}

async fn admin_connection() -> PgConnection {
    PgConnection::connect_with(&server_options().database("postgres")).await.expect("connect to Postgres as postgres")
}

fn migration_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations/posthog");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("migrations/posthog exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    files
}

/// Builds (once per schema version) the template database and returns its name.
async fn ensure_template() -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut sql = String::new();
    for file in migration_files() {
        sql.push_str(&std::fs::read_to_string(&file).expect("read migration"));
        sql.push('\n');
    }
    for (_, graphile) in plugin_server::jobs::migrations::GRAPHILE_MIGRATIONS {
        std::hash::Hash::hash(graphile, &mut hasher);
    }
    std::hash::Hash::hash(&sql, &mut hasher);
    let name = format!("pst_template_{:016x}", std::hash::Hasher::finish(&hasher));

    let mut admin = admin_connection().await;
    // Serialise template creation across test processes.
    admin.execute("SELECT pg_advisory_lock(727274)").await.expect("advisory lock");
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await
        .expect("query pg_database");
    if exists.is_none() {
        let building = format!("{name}_building");
        admin.execute(format!("DROP DATABASE IF EXISTS {building}").as_str()).await.expect("drop stale template");
        admin.execute(format!("CREATE DATABASE {building}").as_str()).await.expect("create template");
        {
            let mut template =
                PgConnection::connect_with(&server_options().database(&building)).await.expect("connect");
            sqlx::raw_sql(&sql).execute(&mut template).await.expect("apply PostHog schema");
            plugin_server::jobs::migrations::migrate(&mut template, GRAPHILE_SCHEMA).await.expect("graphile schema");
            let _ = template.close().await;
        }
        admin.execute(format!("ALTER DATABASE {building} RENAME TO {name}").as_str()).await.expect("rename template");
    }
    admin.execute("SELECT pg_advisory_unlock(727274)").await.expect("advisory unlock");
    let _ = admin.close().await;
    name
}

/// A zip archive `testplugin/index.js` (when code is given) + `testplugin/plugin.json`, like the
/// reference's `plugin60` fixture.
pub fn plugin_zip(code: Option<&str>, plugin_json: &serde_json::Value) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options: zip::write::SimpleFileOptions = zip::write::SimpleFileOptions::default();
        if let Some(code) = code {
            zip.start_file("testplugin/index.js", options).expect("zip entry");
            zip.write_all(code.as_bytes()).expect("zip write");
        }
        zip.start_file("testplugin/plugin.json", options).expect("zip entry");
        zip.write_all(plugin_json.to_string().as_bytes()).expect("zip write");
        zip.finish().expect("zip finish");
    }
    buffer.into_inner()
}

/// The reference's `plugin60` config schema.
pub fn plugin60_config_schema() -> serde_json::Value {
    serde_json::json!({
        "localhostIP": {"hint": "Useful if testing locally", "name": "IP to use instead of 127.0.0.1", "type": "string", "order": 2, "default": "", "required": false},
        "maxmindMmdb": {"hint": "The \"GeoIP2 City\" or \"GeoLite2 City\" database file", "name": "GeoIP .mddb database", "type": "attachment", "order": 1,
            "markdown": "Sign up for a [MaxMind.com](https://www.maxmind.com) account, download and extract the database and then upload the `.mmdb` file below", "required": true}
    })
}

/// `resetTestDatabase(code, {}, {}, {withExtendedTestData})` on an already-created database.
pub async fn reset_test_database(pool: &PgPool, code: Option<&str>, with_extended_test_data: bool) {
    sqlx::raw_sql(
        "TRUNCATE TABLE ee_hook, posthog_personalapikey, posthog_featureflag, posthog_annotation, posthog_dashboarditem,
         posthog_dashboard, posthog_cohortpeople, posthog_cohort, posthog_actionstep, posthog_action_events,
         posthog_action, posthog_element, posthog_elementgroup, posthog_sessionrecordingevent,
         posthog_persondistinctid, posthog_person, posthog_event, posthog_pluginstorage, posthog_pluginattachment,
         posthog_pluginlogentry, posthog_pluginconfig, posthog_plugin, posthog_eventdefinition,
         posthog_propertydefinition, posthog_grouptypemapping, posthog_team, posthog_organizationmembership,
         posthog_organization, posthog_user CASCADE",
    )
    .execute(pool)
    .await
    .expect("truncate");
    create_user_team_and_organization(
        pool,
        TEAM_ID,
        COMMON_USER_ID,
        COMMON_USER_UUID,
        COMMON_ORGANIZATION_ID,
        COMMON_ORGANIZATION_MEMBERSHIP_ID,
    )
    .await;
    if !with_extended_test_data {
        return;
    }
    sqlx::query(
        "INSERT INTO posthog_action (id, team_id, name, created_at, created_by_id, deleted, post_to_slack,
            slack_message_format, is_calculating, updated_at, last_calculated_at)
         VALUES ($1, $2, 'Test Action', now(), $3, false, true, '', false, now(), now())",
    )
    .bind(TEAM_ID + 67)
    .bind(TEAM_ID)
    .bind(COMMON_USER_ID)
    .execute(pool)
    .await
    .expect("insert action");
    sqlx::query(
        "INSERT INTO posthog_actionstep (id, action_id, tag_name, text, href, selector, url, url_matching, name, event, properties)
         VALUES ($1, $2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, $3)",
    )
    .bind(TEAM_ID + 911)
    .bind(TEAM_ID + 67)
    .bind(serde_json::json!([{"type": "event", "operator": "exact", "key": "foo", "value": ["bar"]}]))
    .execute(pool)
    .await
    .expect("insert action step");
    let plugin_json = serde_json::json!({"name": "posthog-maxmind-plugin", "description": "just for testing", "url": "http://example.com/plugin", "config": {}, "main": "index.js"});
    sqlx::query(
        "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, url, config_schema, tag,
            archive, error, from_json, from_web, is_global, is_preinstalled, capabilities, metrics)
         VALUES ($1, $2::uuid, 'custom', 'test-maxmind-plugin', 'Ingest GeoIP data via MaxMind',
            'https://www.npmjs.com/package/posthog-maxmind-plugin', $3, '0.0.2', $4, NULL, false, false, false, false, '{}', '{}')",
    )
    .bind(PLUGIN_ID)
    .bind(COMMON_ORGANIZATION_ID)
    .bind(plugin60_config_schema())
    .bind(plugin_zip(code, &plugin_json))
    .execute(pool)
    .await
    .expect("insert plugin");
    sqlx::query(
        "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
         VALUES ($1, $2, $3, true, 0, $4, NULL, now(), now())",
    )
    .bind(PLUGIN_CONFIG_ID)
    .bind(TEAM_ID)
    .bind(PLUGIN_ID)
    .bind(serde_json::json!({"localhostIP": "94.224.212.175"}))
    .execute(pool)
    .await
    .expect("insert plugin config");
    sqlx::query(
        "INSERT INTO posthog_pluginattachment (id, key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
         VALUES ($1, 'maxmindMmdb', 'application/octet-stream', 'test.txt', 4, 'test'::bytea, $2, $3)",
    )
    .bind(ATTACHMENT_ID)
    .bind(PLUGIN_CONFIG_ID)
    .bind(TEAM_ID)
    .execute(pool)
    .await
    .expect("insert attachment");
    // Keep serial sequences ahead of the fixed ids the fixture uses.
    sqlx::raw_sql(
        "SELECT setval('posthog_action_id_seq', 1000); SELECT setval('posthog_actionstep_id_seq', 1000);
         SELECT setval('posthog_plugin_id_seq', 1000); SELECT setval('posthog_pluginconfig_id_seq', 1000);
         SELECT setval('posthog_pluginattachment_id_seq', 50000); SELECT setval('posthog_team_id_seq', 1000);
         SELECT setval('posthog_user_id_seq', 2000);",
    )
    .execute(pool)
    .await
    .expect("advance sequences");
}

/// The reference's `createUserTeamAndOrganization` (user, organization, membership, team).
pub async fn create_user_team_and_organization(
    pool: &PgPool,
    team_id: i32,
    user_id: i32,
    user_uuid: &str,
    organization_id: &str,
    membership_id: &str,
) {
    sqlx::query(
        "INSERT INTO posthog_user (id, uuid, password, first_name, last_name, email, distinct_id, is_staff,
            is_active, date_joined, events_column_config)
         VALUES ($1, $2::uuid, 'gibberish', 'PluginTest', 'User', $3, $4, false, false, now(), '{\"active\": \"DEFAULT\"}')",
    )
    .bind(user_id)
    .bind(user_uuid)
    .bind(format!("test{user_id}@posthog.com"))
    .bind(format!("plugin_test_user_distinct_id_{user_id}"))
    .execute(pool)
    .await
    .expect("insert user");
    sqlx::query(
        "INSERT INTO posthog_organization (id, name, plugins_access_level, personalization, setup_section_2_completed,
            for_internal_metrics, available_features, domain_whitelist, is_member_join_email_enabled, slug)
         VALUES ($1::uuid, 'TEST ORG', 9, '{}', true, false, '{}', '{}', false, $2)",
    )
    .bind(organization_id)
    .bind(Uuid::new_v4().simple().to_string()[..12].to_string())
    .execute(pool)
    .await
    .expect("insert organization");
    sqlx::query(
        "INSERT INTO posthog_organizationmembership (id, organization_id, user_id, level, joined_at, updated_at)
         VALUES ($1::uuid, $2::uuid, $3, 15, now(), now())",
    )
    .bind(membership_id)
    .bind(organization_id)
    .bind(user_id)
    .execute(pool)
    .await
    .expect("insert membership");
    create_team(pool, team_id, organization_id).await;
}

/// A team (project) of an existing organization, as the reference's fixture creates them.
pub async fn create_team(pool: &PgPool, team_id: i32, organization_id: &str) {
    sqlx::query(
        "INSERT INTO posthog_team (id, organization_id, app_urls, name, event_names, event_names_with_usage,
            event_properties, event_properties_with_usage, event_properties_numerical, anonymize_ips,
            completed_snippet_onboarding, ingested_event, uuid, session_recording_opt_in, plugins_opt_in,
            opt_out_capture, is_demo, api_token, test_account_filters, timezone, data_attributes, access_control)
         VALUES ($1, $2::uuid, '{}', 'TEST PROJECT', '[]', '[]', '[]', '[]', '[]', false, true, true, $3, true, false,
            false, false, $4, '[]', 'UTC', '[\"data-attr\"]', false)",
    )
    .bind(team_id)
    .bind(organization_id)
    .bind(Uuid::now_v7())
    .bind(format!("THIS IS NOT A TOKEN FOR TEAM {team_id}"))
    .execute(pool)
    .await
    .expect("insert team");
}

/// A Redis key prefix of this test's own.
pub fn unique_prefix(name: &str) -> String {
    format!("test:{name}:{}:", Uuid::new_v4().simple())
}

/// Polls `probe` every 100 ms until it answers `Some`, failing the test after 30 s.
pub async fn wait_for<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_for_up_to(what, Duration::from_secs(30), probe).await
}

/// [`wait_for`] with a limit of its own (what waits on a retry schedule).
pub async fn wait_for_up_to<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Adds plugin `plugin_id` (a zip of `code`) and its enabled config `config_id` for `team_id`,
/// at `order` in the team's chain.
pub async fn add_plugin_config(pool: &PgPool, plugin_id: i32, config_id: i32, team_id: i32, order: i32, code: &str) {
    let name = format!("plugin-{plugin_id}");
    let plugin_json = serde_json::json!({"name": name, "description": "test", "url": "http://example.com/plugin", "config": {}, "main": "index.js"});
    sqlx::query(
        "INSERT INTO posthog_plugin (id, organization_id, plugin_type, name, description, url, config_schema, tag,
            archive, error, from_json, from_web, is_global, is_preinstalled, capabilities, metrics)
         VALUES ($1, $2::uuid, 'custom', $3, 'test', 'http://example.com/plugin', '{}', '0.0.1', $4,
            NULL, false, false, false, false, '{}', '{}')",
    )
    .bind(plugin_id)
    .bind(COMMON_ORGANIZATION_ID)
    .bind(&name)
    .bind(plugin_zip(Some(code), &plugin_json))
    .execute(pool)
    .await
    .expect("insert plugin");
    sqlx::query(
        "INSERT INTO posthog_pluginconfig (id, team_id, plugin_id, enabled, \"order\", config, error, created_at, updated_at)
         VALUES ($1, $2, $3, true, $4, '{}', NULL, now(), now())",
    )
    .bind(config_id)
    .bind(team_id)
    .bind(plugin_id)
    .bind(order)
    .execute(pool)
    .await
    .expect("insert plugin config");
}

/// A `process_event_with_plugins` Celery task as PostHog's Django app queues it on `queue`: an
/// event named `event` with `{"index": index}` from user-`index` of `team`, sent now from
/// 127.0.0.1 on http://localhost, with the Celery task id `task_id`.
pub fn process_event_task(queue: &str, task_id: &str, index: usize, team: i32, event: &str) -> String {
    use serde_json::json;
    let now = chrono::Utc::now().to_rfc3339();
    let args = [
        json!(format!("user-{index}")),
        json!("127.0.0.1"),
        json!("http://localhost"),
        json!({"event": event, "properties": {"index": index}}),
        json!(team),
        json!(now),
        json!(now),
    ];
    plugin_server::sinks::celery_producer::encode_task_message(
        queue,
        plugin_server::sources::celery::PROCESS_EVENT_TASK,
        task_id,
        &args,
        &serde_json::Map::new(),
    )
}
