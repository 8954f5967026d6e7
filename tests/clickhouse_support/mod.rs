//! A real ClickHouse server for a test: Debian's `clickhouse-server` (installed by
//! scripts/services), started in a temporary directory on a loopback address of the test's own
//! (the reference's client always uses port 8123, so tests cannot share one address), stopped when
//! dropped. PostHog's `events` table is created as its ClickHouse migrations have it, with the
//! column types this server version knows (`DateTime` for `DateTime64(6, 'UTC')`).

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct ClickHouseServer {
    child: Child,
    _dir: tempfile::TempDir,
    /// The address it listens on (`CLICKHOUSE_HOST`).
    pub host: String,
    http: reqwest::Client,
}

impl ClickHouseServer {
    /// Starts a server listening on `host`:8123 and waits until it answers `SELECT 1`.
    pub async fn start(host: &str) -> ClickHouseServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().display().to_string();
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <http_port>8123</http_port>
  <listen_host>{host}</listen_host>
  <path>{root}/data/</path>
  <tmp_path>{root}/tmp/</tmp_path>
  <user_files_path>{root}/user_files/</user_files_path>
  <format_schema_path>{root}/format_schemas/</format_schema_path>
  <users_config>/etc/clickhouse-server/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709</mark_cache_size>
</yandex>
"#
        );
        let config_path = dir.path().join("config.xml");
        std::fs::write(&config_path, config).expect("ClickHouse config");
        let child = Command::new("clickhouse-server")
            .arg(format!("--config-file={}", config_path.display()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clickhouse-server (Debian's clickhouse-server package; scripts/services installs it)");
        let server = ClickHouseServer { child, _dir: dir, host: host.to_string(), http: reqwest::Client::new() };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(answer) = server.try_query("SELECT 1").await {
                if answer.trim() == "1" {
                    return server;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "ClickHouse on {host}:8123 did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_query(&self, sql: &str) -> Result<String, String> {
        let response = self
            .http
            .post(format!("http://{}:8123/", self.host))
            .body(sql.to_string())
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let ok = response.status().is_success();
        let text = response.text().await.map_err(|error| error.to_string())?;
        if ok {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// Runs `sql`; panics with ClickHouse's message when it fails.
    pub async fn query(&self, sql: &str) -> String {
        self.try_query(sql).await.unwrap_or_else(|error| panic!("ClickHouse: {sql}: {error}"))
    }

    /// Creates `database` with PostHog's `events` table in it.
    pub async fn create_events_table(&self, database: &str) {
        self.query(&format!("CREATE DATABASE IF NOT EXISTS {database}")).await;
        self.query(&format!(
            "CREATE TABLE {database}.events (uuid UUID, event String, properties String, \
             timestamp DateTime, team_id Int64, distinct_id String, elements_chain String, \
             created_at DateTime, _timestamp DateTime, _offset UInt64) \
             ENGINE = ReplacingMergeTree(_timestamp) \
             PARTITION BY toYYYYMM(timestamp) ORDER BY (team_id, toDate(timestamp), distinct_id, uuid)"
        ))
        .await;
    }

    /// Inserts rows (objects with the `events` columns) as JSONEachRow.
    pub async fn insert_events(&self, database: &str, rows: &[Value]) {
        let body: Vec<String> = rows.iter().map(Value::to_string).collect();
        self.query(&format!("INSERT INTO {database}.events FORMAT JSONEachRow\n{}", body.join("\n"))).await;
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
