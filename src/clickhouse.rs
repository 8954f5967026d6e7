//! The ClickHouse client (the `clickhouse` crate over HTTP) with the reference's connection settings,
//! its start-up `SELECT 1`, and read queries bounded by a timeout.
//!
//! Settings, as the reference's `hub.ts` gives them to its client: host `CLICKHOUSE_HOST`, port 8123
//! over http, or 8443 over https with `CLICKHOUSE_SECURE`; user `CLICKHOUSE_USER`, password
//! `CLICKHOUSE_PASSWORD` (none when unset or empty); database `CLICKHOUSE_DATABASE`; the option
//! `output_format_json_quote_64bit_integers=0`; `CLICKHOUSE_CA` is a PEM file relative to
//! `BASE_DIR`, and when one is given the server certificate is not verified (the reference sets
//! `rejectUnauthorized: false` then).
//!
//! Owns only the connection; what is read (static cohorts) belongs to the module that reads it.

use std::path::Path;
use std::time::Duration;

use ::clickhouse::{Client, Compression, Row};
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::Config;

/// How long one query may take (the reference only warned after 30 s; we give up instead so a
/// hung ClickHouse cannot hold an event forever).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the start-up `SELECT 1` may take, so that an absent ClickHouse barely delays start-up.
pub const STARTUP_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keep-alive on the pooled connections (the `clickhouse` crate's own default).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Idle pooled connections are dropped before ClickHouse's HTTP keep-alive (3 s by default) closes
/// them under us (the `clickhouse` crate's own default).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum ClickHouseError {
    #[error("cannot read CLICKHOUSE_CA file {path}: {source}")]
    CaFile { path: String, source: std::io::Error },
    #[error("invalid CLICKHOUSE_CA certificate: {0}")]
    InvalidCa(native_tls::Error),
    #[error("cannot set up TLS for ClickHouse: {0}")]
    Tls(native_tls::Error),
    /// Displayed with its causes ("network error: client error (Connect): tcp connect error:
    /// Connection refused"), since the crate's own message stops at the first.
    #[error("{}", with_causes(.0))]
    Query(::clickhouse::error::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl From<::clickhouse::error::Error> for ClickHouseError {
    fn from(error: ::clickhouse::error::Error) -> Self {
        ClickHouseError::Query(error)
    }
}

/// An error and its chain of sources on one line.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some layers repeat their source's message in their own.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Where and how to connect: what the reference passes to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseSettings {
    /// `http://host:8123` or `https://host:8443`.
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    /// The PEM read from `CLICKHOUSE_CA`; with one, the server certificate is not verified.
    pub ca: Option<Vec<u8>>,
}

impl ClickHouseSettings {
    /// The reference's settings from the configuration; fails only when `CLICKHOUSE_CA` cannot be read.
    pub fn from_config(config: &Config) -> Result<ClickHouseSettings, ClickHouseError> {
        let (scheme, port) = if config.CLICKHOUSE_SECURE { ("https", 8443) } else { ("http", 8123) };
        let ca = match &config.CLICKHOUSE_CA {
            // The reference tests the variable for truthiness: an empty value means no CA.
            Some(ca) if !ca.is_empty() => {
                let path = Path::new(&config.BASE_DIR).join(ca);
                let pem = std::fs::read(&path)
                    .map_err(|source| ClickHouseError::CaFile { path: path.display().to_string(), source })?;
                Some(pem)
            }
            _ => None,
        };
        Ok(ClickHouseSettings {
            url: format!("{scheme}://{}:{port}", config.CLICKHOUSE_HOST),
            database: config.CLICKHOUSE_DATABASE.clone(),
            user: config.CLICKHOUSE_USER.clone(),
            // `CLICKHOUSE_PASSWORD || undefined`: an empty password is no password.
            password: config.CLICKHOUSE_PASSWORD.clone().filter(|password| !password.is_empty()),
            ca,
        })
    }
}

/// A pooled ClickHouse client. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct ClickHouse {
    client: Client,
    url: String,
    query_timeout: Duration,
}

impl ClickHouse {
    /// The client the reference builds in Kafka mode.
    pub fn from_config(config: &Config) -> Result<ClickHouse, ClickHouseError> {
        ClickHouse::new(&ClickHouseSettings::from_config(config)?)
    }

    pub fn new(settings: &ClickHouseSettings) -> Result<ClickHouse, ClickHouseError> {
        let mut tls = native_tls::TlsConnector::builder();
        if let Some(pem) = &settings.ca {
            let certificate = native_tls::Certificate::from_pem(pem).map_err(ClickHouseError::InvalidCa)?;
            tls.add_root_certificate(certificate).danger_accept_invalid_certs(true);
        }
        let tls = tls.build().map_err(ClickHouseError::Tls)?;
        let mut http = HttpConnector::new();
        http.set_keepalive(Some(TCP_KEEPALIVE));
        // The same connector serves http:// and https:// URLs.
        http.enforce_http(false);
        let connector = HttpsConnector::from((http, tokio_native_tls::TlsConnector::from(tls)));
        let hyper = HyperClient::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT).build(connector);
        let mut client = Client::with_http_client(hyper)
            .with_url(settings.url.as_str())
            .with_database(settings.database.as_str())
            .with_user(settings.user.as_str())
            .with_compression(Compression::None)
            .with_option("output_format_json_quote_64bit_integers", "0");
        if let Some(password) = &settings.password {
            client = client.with_password(password.as_str());
        }
        Ok(ClickHouse { client, url: settings.url.clone(), query_timeout: QUERY_TIMEOUT })
    }

    /// Gives up on queries after `timeout` instead of [`QUERY_TIMEOUT`].
    pub fn with_query_timeout(mut self, timeout: Duration) -> ClickHouse {
        self.query_timeout = timeout;
        self
    }

    /// The server's URL, for log lines.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs a complete read query and returns its rows (sent as `RowBinary`, which the crate
    /// appends as the output format).
    pub async fn fetch_all<T: Row + DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, ClickHouseError> {
        let query = self.fetch_all_within(sql, self.query_timeout);
        crate::metrics::catalog::instrument_query(crate::metrics::catalog::statsd::CLICKHOUSE, None, query).await
    }

    /// `SELECT 1`, as the reference runs at start-up to test that the connection works.
    pub async fn check_connection(&self, timeout: Duration) -> Result<(), ClickHouseError> {
        self.fetch_all_within::<u8>("SELECT 1", timeout).await.map(drop)
    }

    async fn fetch_all_within<T: Row + DeserializeOwned>(
        &self,
        sql: &str,
        timeout: Duration,
    ) -> Result<Vec<T>, ClickHouseError> {
        // The crate reads `?` as a bind placeholder; our queries come complete, so every `?` is literal.
        let query = self.client.query(&sql.replace('?', "??"));
        match tokio::time::timeout(timeout, query.fetch_all::<T>()).await {
            Ok(rows) => Ok(rows?),
            Err(_) => Err(ClickHouseError::Timeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        Config::from_lookup(&|key| pairs.iter().find(|(name, _)| *name == key).map(|(_, value)| value.to_string()))
            .unwrap()
    }

    #[test]
    fn plain_http_on_8123_by_default() {
        let settings = ClickHouseSettings::from_config(&config(&[("CLICKHOUSE_HOST", "ch.internal")])).unwrap();
        assert_eq!(
            settings,
            ClickHouseSettings {
                url: "http://ch.internal:8123".into(),
                database: "default".into(),
                user: "default".into(),
                password: None,
                ca: None,
            }
        );
    }

    #[test]
    fn secure_uses_https_on_8443_and_empty_password_is_none() {
        let settings = ClickHouseSettings::from_config(&config(&[
            ("CLICKHOUSE_SECURE", "true"),
            ("CLICKHOUSE_PASSWORD", ""),
            ("CLICKHOUSE_USER", "reader"),
            ("CLICKHOUSE_DATABASE", "posthog"),
        ]))
        .unwrap();
        assert_eq!(settings.url, "https://localhost:8443");
        assert_eq!((settings.user.as_str(), settings.database.as_str()), ("reader", "posthog"));
        assert_eq!(settings.password, None);
        let settings = ClickHouseSettings::from_config(&config(&[("CLICKHOUSE_PASSWORD", "pw")])).unwrap();
        assert_eq!(settings.password.as_deref(), Some("pw"));
    }

    #[test]
    fn ca_is_read_relative_to_base_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), b"not a certificate").unwrap();
        let base = dir.path().to_str().unwrap();
        let settings =
            ClickHouseSettings::from_config(&config(&[("BASE_DIR", base), ("CLICKHOUSE_CA", "ca.pem")])).unwrap();
        assert_eq!(settings.ca.as_deref(), Some(&b"not a certificate"[..]));
        // An unparsable CA is an error of its own, like an unreadable one.
        assert!(matches!(ClickHouse::new(&settings), Err(ClickHouseError::InvalidCa(_))));
        let missing = ClickHouseSettings::from_config(&config(&[("BASE_DIR", base), ("CLICKHOUSE_CA", "absent.pem")]));
        match missing {
            Err(error @ ClickHouseError::CaFile { .. }) => assert!(error.to_string().contains("absent.pem"), "{error}"),
            other => panic!("expected a CA file error, got {other:?}"),
        }
    }
}
