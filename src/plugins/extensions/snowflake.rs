//! The host side of the `snowflake-sdk` facade (`runtime/modules/snowflake-sdk.js`): one request
//! to a Snowflake account's REST endpoint (`/session/v1/login-request`,
//! `/queries/v1/query-request`, `/session/token-request`, `/session/logout-request`, a result
//! URL) as snowflake-sdk 1.6 sends it. The protocol (tokens, bindings, result rows, renewal,
//! errors) is the facade's; this side owns what must not be left to plugin code:
//! * the account's root: `https://<account>.snowflakecomputing.com` (with the `region`, or the
//!   account's own `<account>.<region>` as snowflake-sdk builds it), or the client's `accessUrl`;
//!   a request never leaves its root's host;
//! * the session token in the `Authorization: Snowflake Token="…"` header (checked: no line
//!   breaks, bounded);
//! * retries as snowflake-sdk retries a request (network errors, 408, 429 and 5xx; `2^n` s plus
//!   up to 1 s, at most [`MAX_RETRIES`]), within the host call's deadline;
//! * the bounds per plugin config: [`MAX_REQUESTS_IN_FLIGHT`] requests at once, request bodies up
//!   to `PLUGIN_FETCH_MAX_RESPONSE_BYTES`; answers through the plugins' client (its policy,
//!   `ALLOW_INTERNAL_IPS` on resolved addresses, its response-body bounds and timeouts).
//!
//! Call (`hostCall` name; JSON arguments): `snowflake.request [client, request]`, where `client`
//! is `{account?, region?, accessUrl?}` and `request` is `{method, path, query?, token?, json?,
//! accept?}`. It answers `{"status", "body"}` for any HTTP answer (`body` parsed when it is JSON,
//! else the text) or `{"error": {"kind": "network" | "config", "message", "code"?}}`.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use thiserror::Error;
use tokio::sync::Semaphore;

use super::super::runtime::{
    fetch_with, network_settings, FetchError, FetchRequest, FetchResponse, FETCH_OPTIONS_HEADER, REQUEST_TIMEOUT,
};
use super::super::vm_boundary::JsError;
use super::retry::{append_query, check_body_size, take_turn, with_retries, MIN_ATTEMPT_TIME};

/// Requests one plugin config may have in flight at once; more wait for a turn.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 8;
/// Retries of one request (network errors, 408, 429, 5xx).
pub const MAX_RETRIES: u32 = 3;
/// The longest session or master token accepted.
const MAX_TOKEN_BYTES: usize = 8192;
/// snowflake-sdk's user agent, naming this server.
const USER_AGENT: &str = "JavaScript/1.6.23 (plugin-server)";

/// A failure before or instead of an answer of Snowflake.
#[derive(Debug, Error)]
pub enum SnowflakeError {
    /// The client's options or the request are unusable.
    #[error("{0}")]
    Config(String),
    /// The network failed.
    #[error(transparent)]
    Network(#[from] FetchError),
}

impl SnowflakeError {
    fn to_json(&self) -> Value {
        match self {
            SnowflakeError::Config(message) => json!({"kind": "config", "message": message}),
            SnowflakeError::Network(error) => json!({"kind": "network", "message": error.message, "code": error.code}),
        }
    }
}

fn test_root() -> &'static RwLock<Option<String>> {
    static ROOT: OnceLock<RwLock<Option<String>>> = OnceLock::new();
    ROOT.get_or_init(RwLock::default)
}

/// TEST HOOK (never called by the server): sends every Snowflake request to `root` (such as
/// `http://127.0.0.1:9050`) instead of the account's host, for tests that run the whole server
/// against a local stand-in of Snowflake.
pub fn set_test_access_url(root: &str) {
    if let Ok(mut cell) = test_root().write() {
        *cell = Some(root.trim_end_matches('/').to_string());
    }
}

/// Whether `name` can be part of a host name as snowflake-sdk puts it there.
fn host_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
}

/// The account's root URL, as snowflake-sdk's `connection_config.js` builds `accessUrl`.
pub fn access_url(client: &Map<String, Value>) -> Result<url::Url, SnowflakeError> {
    let text = |name: &str| client.get(name).and_then(Value::as_str).filter(|text| !text.is_empty());
    let overridden = test_root().read().ok().and_then(|root| root.clone());
    let root = match (overridden, text("accessUrl"), text("account")) {
        (Some(root), _, _) => root,
        (None, Some(access), _) => access.trim_end_matches('/').to_string(),
        (None, None, Some(account)) => {
            if !host_label(account) {
                return Err(SnowflakeError::Config(format!("Invalid account: {account:?}")));
            }
            match text("region").filter(|region| *region != "us-west-2" && !account.contains('.')) {
                Some(region) if host_label(region) => format!("https://{account}.{region}.snowflakecomputing.com"),
                Some(region) => return Err(SnowflakeError::Config(format!("Invalid region: {region:?}"))),
                None => format!("https://{account}.snowflakecomputing.com"),
            }
        }
        (None, None, None) => {
            return Err(SnowflakeError::Config("A value must be specified for the account connection option.".into()))
        }
    };
    url::Url::parse(&root)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
        .ok_or_else(|| SnowflakeError::Config(format!("Invalid accessUrl: {root}")))
}

/// One request of the facade.
#[derive(Debug)]
struct SfRequest {
    url: url::Url,
    method: String,
    token: Option<String>,
    body: Option<Vec<u8>>,
    accept: String,
}

impl SfRequest {
    fn from_json(client: Option<&Value>, request: Option<&Value>) -> Result<SfRequest, SnowflakeError> {
        let empty = Map::new();
        let client = client.and_then(Value::as_object).unwrap_or(&empty);
        let request = request.and_then(Value::as_object).unwrap_or(&empty);
        let text = |name: &str| request.get(name).and_then(Value::as_str);
        let root = access_url(client)?;
        let path = text("path").unwrap_or_default();
        // A result URL may come back absolute; it must be on the account's host all the same.
        let mut url = if path.starts_with('/') {
            root.join(path).map_err(|_| SnowflakeError::Config(format!("Invalid URL: {root}{path}")))?
        } else {
            url::Url::parse(path).map_err(|_| SnowflakeError::Config(format!("Invalid URL: {path:?}")))?
        };
        if url.scheme() != root.scheme()
            || url.host_str() != root.host_str()
            || url.port_or_known_default() != root.port_or_known_default()
        {
            return Err(SnowflakeError::Config(format!("{path} leaves {root}")));
        }
        if let Some(Value::Object(query)) = request.get("query") {
            append_query(&mut url, query);
        }
        let method = text("method").unwrap_or("GET").to_ascii_uppercase();
        if !matches!(method.as_str(), "GET" | "POST" | "DELETE") {
            return Err(SnowflakeError::Config(format!("{method} is not a valid HTTP method")));
        }
        let token = match text("token") {
            Some(token) if token.len() > MAX_TOKEN_BYTES || token.contains(['\r', '\n', '"']) => {
                return Err(SnowflakeError::Config("The session token is not valid".into()))
            }
            other => other.map(str::to_string),
        };
        let body = request.get("json").filter(|json| !json.is_null()).map(|json| json.to_string().into_bytes());
        let accept = match text("accept") {
            Some("application/snowflake") => "application/snowflake",
            _ => "application/json",
        };
        Ok(SfRequest { url, method, token, body, accept: accept.to_string() })
    }
}

/// snowflake-sdk's `isRetryableHttpError`.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || (500..600).contains(&status)
}

/// The `snowflake-sdk` facade's state for one plugin config.
pub struct Snowflake {
    in_flight: Arc<Semaphore>,
}

impl Default for Snowflake {
    fn default() -> Snowflake {
        Snowflake { in_flight: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)) }
    }
}

impl Snowflake {
    /// `snowflake.request` (see the module docs) within `budget` (the host call's deadline less
    /// a margin).
    pub async fn call(&self, function: &str, args: &[Value], budget: Duration) -> Result<Value, JsError> {
        if function != "snowflake.request" {
            return Err(JsError::new("TypeError", format!("{function} is not a function")));
        }
        let deadline = Instant::now() + budget;
        Ok(match self.request(args, deadline).await {
            Ok(response) => {
                let body = serde_json::from_slice::<Value>(&response.body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&response.body).into_owned()));
                json!({"status": response.status, "body": body})
            }
            Err(error) => {
                tracing::debug!(%error, "Snowflake request failed");
                json!({"error": error.to_json()})
            }
        })
    }

    async fn request(&self, args: &[Value], deadline: Instant) -> Result<FetchResponse, SnowflakeError> {
        let request = SfRequest::from_json(args.first(), args.get(1))?;
        check_body_size(request.body.as_deref()).map_err(SnowflakeError::Config)?;
        let _turn = take_turn(&self.in_flight, "Snowflake").await.map_err(SnowflakeError::Config)?;
        let retryable = |outcome: &Result<FetchResponse, SnowflakeError>| match outcome {
            Ok(response) => retryable_status(response.status),
            Err(SnowflakeError::Network(error)) => !error.is_refusal(),
            Err(_) => false,
        };
        with_retries(MAX_RETRIES, deadline, retryable, || self.send(&request, deadline)).await
    }

    async fn send(&self, request: &SfRequest, deadline: Instant) -> Result<FetchResponse, SnowflakeError> {
        let timeout = deadline.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT);
        if timeout < MIN_ATTEMPT_TIME {
            return Err(SnowflakeError::Network(FetchError {
                message: format!("network timeout at: {}", request.url),
                kind: Some("request-timeout".into()),
                code: None,
            }));
        }
        let mut headers = vec![
            ("accept".to_string(), request.accept.clone()),
            ("user-agent".to_string(), USER_AGENT.to_string()),
            (FETCH_OPTIONS_HEADER.to_string(), json!({"timeout": timeout.as_millis() as u64}).to_string()),
        ];
        if let Some(token) = &request.token {
            headers.push(("authorization".into(), format!("Snowflake Token=\"{token}\"")));
        }
        if request.body.is_some() {
            headers.push(("content-type".into(), "application/json".into()));
        }
        let fetch = FetchRequest {
            url: request.url.to_string(),
            method: request.method.clone(),
            headers,
            body: request.body.clone(),
        };
        Ok(fetch_with(&network_settings(), fetch).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(client: Value) -> Result<String, SnowflakeError> {
        access_url(client.as_object().unwrap()).map(|url| url.to_string())
    }

    #[test]
    fn the_root_is_built_as_snowflake_sdk_builds_it() {
        assert_eq!(root(json!({"account": "ab12345"})).unwrap(), "https://ab12345.snowflakecomputing.com/");
        assert_eq!(
            root(json!({"account": "ab12345", "region": "eu-central-1"})).unwrap(),
            "https://ab12345.eu-central-1.snowflakecomputing.com/"
        );
        assert_eq!(
            root(json!({"account": "ab12345", "region": "us-west-2"})).unwrap(),
            "https://ab12345.snowflakecomputing.com/"
        );
        assert_eq!(
            root(json!({"account": "ab12345.us-east-2.aws"})).unwrap(),
            "https://ab12345.us-east-2.aws.snowflakecomputing.com/"
        );
        assert_eq!(root(json!({"accessUrl": "http://localhost:8080/"})).unwrap(), "http://localhost:8080/");
        assert!(root(json!({"account": "evil.com/x?"})).is_err());
        assert!(root(json!({"account": "a", "region": "b/c"})).is_err());
        assert!(root(json!({})).is_err());
    }

    #[test]
    fn requests_stay_on_their_root() {
        let request = |path: &str| {
            SfRequest::from_json(
                Some(&json!({"account": "acct"})),
                Some(&json!({"method": "POST", "path": path, "query": {"requestId": "r1"}, "json": {"a": 1}})),
            )
        };
        let ok = request("/queries/v1/query-request").unwrap();
        assert_eq!(ok.url.as_str(), "https://acct.snowflakecomputing.com/queries/v1/query-request?requestId=r1");
        assert_eq!(ok.body.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert!(request("https://acct.snowflakecomputing.com/queries/q1/result").is_ok());
        assert!(request("https://evil.example/queries/q1/result").is_err());
        assert!(request("//evil.example/x").is_err());
        let bad_token = SfRequest::from_json(
            Some(&json!({"account": "acct"})),
            Some(&json!({"path": "/x", "token": "a\"\r\nHost: evil"})),
        );
        assert!(bad_token.is_err());
    }
}
