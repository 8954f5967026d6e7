//! Static cohorts in ClickHouse (`person_static_cohort`), which the matcher consults before
//! Postgres in the ClickHouse pipeline (`KAFKA_ENABLED`), as the reference does.
//!
//! Owns only this lookup over ClickHouse's HTTP interface (what the reference's client speaks),
//! with the reference's connection settings: `CLICKHOUSE_HOST`, port 8123 (8443 with
//! `CLICKHOUSE_SECURE`), `CLICKHOUSE_USER`/`PASSWORD`/`DATABASE`, and `CLICKHOUSE_CA` (relative to
//! `BASE_DIR`; with a CA the reference also stops verifying the server certificate).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use thiserror::Error;
use uuid::Uuid;

use super::StaticCohortLookup;
use crate::config::Config;

/// How long one lookup may take (the reference only warned after 30 s).
pub const CLICKHOUSE_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum StaticCohortError {
    #[error("cannot read CLICKHOUSE_CA file {path}: {source}")]
    CaFile { path: String, source: std::io::Error },
    #[error("invalid CLICKHOUSE_CA certificate: {0}")]
    InvalidCa(reqwest::Error),
    #[error("cannot build the ClickHouse HTTP client: {0}")]
    Client(reqwest::Error),
}

/// `StaticCohortLookup` against ClickHouse.
pub struct ClickHouseStaticCohorts {
    client: reqwest::Client,
    url: String,
    database: String,
    user: String,
    password: Option<String>,
}

/// ClickHouse string literal escaping (the reference's `escapeClickHouseString`).
fn escape_string(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\'', "\\'")
}

impl ClickHouseStaticCohorts {
    /// The reference's connection settings from the configuration.
    pub fn from_config(config: &Config) -> Result<ClickHouseStaticCohorts, StaticCohortError> {
        let (scheme, port) = if config.CLICKHOUSE_SECURE { ("https", 8443) } else { ("http", 8123) };
        let mut builder = reqwest::Client::builder().timeout(CLICKHOUSE_QUERY_TIMEOUT);
        if let Some(ca) = &config.CLICKHOUSE_CA {
            let path = Path::new(&config.BASE_DIR).join(ca);
            let pem = std::fs::read(&path)
                .map_err(|source| StaticCohortError::CaFile { path: path.display().to_string(), source })?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(StaticCohortError::InvalidCa)?;
            builder = builder.add_root_certificate(certificate).danger_accept_invalid_certs(true);
        }
        Ok(ClickHouseStaticCohorts {
            client: builder.build().map_err(StaticCohortError::Client)?,
            url: format!("{scheme}://{}:{port}/", config.CLICKHOUSE_HOST),
            database: config.CLICKHOUSE_DATABASE.clone(),
            user: config.CLICKHOUSE_USER.clone(),
            password: config.CLICKHOUSE_PASSWORD.clone(),
        })
    }

    /// A lookup against an explicit HTTP endpoint (`http://host:port/`).
    pub fn new(url: &str, database: &str, user: &str, password: Option<&str>) -> ClickHouseStaticCohorts {
        ClickHouseStaticCohorts {
            client: reqwest::Client::builder()
                .timeout(CLICKHOUSE_QUERY_TIMEOUT)
                .build()
                .unwrap_or_else(|_| reqwest::Client::new()),
            url: url.to_owned(),
            database: database.to_owned(),
            user: user.to_owned(),
            password: password.map(str::to_owned),
        }
    }

    /// The query the reference runs.
    pub fn query(team_id: i64, cohort_id: i64, person_uuid: Uuid) -> String {
        format!(
            "SELECT 1 FROM person_static_cohort WHERE team_id = {team_id} AND cohort_id = {cohort_id} \
             AND person_id = '{}' LIMIT 1 FORMAT JSON",
            escape_string(&person_uuid.to_string())
        )
    }
}

#[async_trait]
impl StaticCohortLookup for ClickHouseStaticCohorts {
    async fn is_in_static_cohort(&self, team_id: i64, cohort_id: i64, person_uuid: Uuid) -> Result<bool, String> {
        let response = self
            .client
            .post(&self.url)
            .query(&[("database", self.database.as_str()), ("output_format_json_quote_64bit_integers", "0")])
            .basic_auth(&self.user, self.password.as_deref())
            .body(Self::query(team_id, cohort_id, person_uuid))
            .send()
            .await
            .map_err(|error| format!("ClickHouse request failed: {error}"))?;
        let status = response.status();
        let body = response.text().await.map_err(|error| format!("ClickHouse response unreadable: {error}"))?;
        if !status.is_success() {
            return Err(format!("ClickHouse answered {status}: {}", body.trim()));
        }
        let result: Value =
            serde_json::from_str(&body).map_err(|error| format!("ClickHouse answer is not JSON: {error}"))?;
        Ok(result.get("rows").and_then(Value::as_u64).unwrap_or(0) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escapes_the_person_id() {
        assert_eq!(escape_string(r"a'b\c"), r"a\'b\\c");
        assert_eq!(
            ClickHouseStaticCohorts::query(2, 7, Uuid::nil()),
            "SELECT 1 FROM person_static_cohort WHERE team_id = 2 AND cohort_id = 7 \
             AND person_id = '00000000-0000-0000-0000-000000000000' LIMIT 1 FORMAT JSON"
        );
    }
}
