//! The host side of the Google Cloud facades (`runtime/modules/bigquery.js`): authenticated REST
//! requests as the `@google-cloud/*` libraries make them, with a service account's credentials.
//!
//! Used by `@google-cloud/bigquery`, `@google-cloud/storage` and `@google-cloud/pubsub`
//! (`modules/google-common.js`). Owns:
//! * service-account auth as google-auth-library does it: an RS256-signed JWT (`iss` the
//!   account's `client_email`, `scope`, `aud` the key's `token_uri`, one hour) exchanged at
//!   `token_uri` for an OAuth access token (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`),
//!   kept per plugin config until five minutes before it expires (at most [`MAX_CACHED_TOKENS`]);
//!   the private key never enters JavaScript after the facade hands it over and is only parsed here;
//! * the API roots (`https://bigquery.googleapis.com`, or the client's `apiEndpoint`); a request
//!   never leaves its root's host;
//! * retries as `retry-request` does them when the client has `autoRetry` (network errors, 429
//!   and 5xx; `2^n` s plus up to 1 s between attempts, `maxRetries` 3), within the host call's
//!   deadline;
//! * the bounds per plugin config: [`MAX_REQUESTS_IN_FLIGHT`] requests at once, request bodies up
//!   to `PLUGIN_FETCH_MAX_RESPONSE_BYTES`, keys up to [`MAX_KEY_BYTES`].
//!
//! The network is the plugins' own client (`runtime/host/fetch.rs`): the same policy
//! (`ALLOW_INTERNAL_IPS`, checked on resolved addresses), response-body bounds and timeouts.
//!
//! Call (`hostCall` name; JSON arguments): `google.request [credentials, request]`, where
//! `credentials` is the key file's `{client_email, private_key, private_key_id?, token_uri?}` and
//! `request` is `{service, apiEndpoint?, method, path, query?, json? | bodyBase64? + contentType?,
//! scopes, maxRetries?, raw?}` (`service`: `bigquery`, `storage`, `pubsub`). It answers
//! `{"status", "body", "bodyBase64"?}` for any HTTP answer of the API (the facade makes the library's
//! errors from it) or `{"error": {"kind": "fetch" | "auth" | "config", "message", ...}}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
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
/// Access tokens kept per plugin config (one per account, token URL and scopes).
pub const MAX_CACHED_TOKENS: usize = 16;
/// The largest private key (PEM) accepted.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// google-auth-library's default token URL (when the key names none).
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// A token is renewed this long before it expires (google-auth-library's eager refresh).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// retry-request's `maxRetries` default.
const DEFAULT_MAX_RETRIES: u32 = 3;
const MAX_RETRIES_CAP: u32 = 5;
const USER_AGENT: &str = "gcloud-node plugin-server";

/// A failure before or instead of an API answer.
#[derive(Debug, Error)]
pub enum GoogleError {
    /// The client's configuration or the request is unusable (the libraries throw these).
    #[error("{0}")]
    Config(String),
    /// The token exchange failed (gaxios' error: status and the OAuth error).
    #[error("{message}")]
    Auth { message: String, status: Option<u16> },
    /// The network failed (node-fetch's `FetchError`, as the libraries surface it).
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

impl GoogleError {
    fn to_json(&self) -> Value {
        match self {
            GoogleError::Config(message) => json!({"kind": "config", "message": message}),
            GoogleError::Auth { message, status } => json!({"kind": "auth", "message": message, "status": status}),
            GoogleError::Fetch(error) => {
                json!({"kind": "fetch", "message": error.message, "type": error.kind, "code": error.code})
            }
        }
    }
}

fn api_roots() -> &'static RwLock<Vec<(String, String)>> {
    static ROOTS: OnceLock<RwLock<Vec<(String, String)>>> = OnceLock::new();
    ROOTS.get_or_init(RwLock::default)
}

/// TEST HOOK (never called by the server): sends every request for `service` (`bigquery`) to
/// `root` (such as `http://127.0.0.1:9050`) instead of Google's, for tests that run the whole
/// server against a local stand-in of the API.
pub fn set_test_api_root(service: &str, root: &str) {
    if let Ok(mut roots) = api_roots().write() {
        roots.retain(|(known, _)| known != service);
        roots.push((service.to_string(), root.trim_end_matches('/').to_string()));
    }
}

fn api_root(service: &str, endpoint: Option<&str>) -> Result<String, GoogleError> {
    if let Some(root) = api_roots()
        .read()
        .ok()
        .and_then(|roots| roots.iter().find(|(known, _)| known == service).map(|(_, root)| root.clone()))
    {
        return Ok(root);
    }
    if let Some(endpoint) = endpoint.filter(|endpoint| !endpoint.is_empty()) {
        let endpoint = endpoint.trim_end_matches('/');
        return Ok(if endpoint.contains("://") { endpoint.to_string() } else { format!("https://{endpoint}") });
    }
    match service {
        "bigquery" => Ok("https://bigquery.googleapis.com".into()),
        "storage" => Ok("https://storage.googleapis.com".into()),
        "pubsub" => Ok("https://pubsub.googleapis.com".into()),
        _ => Err(GoogleError::Config(format!("unknown Google service {service:?}"))),
    }
}

/// The service account of a key file.
#[derive(Debug, Clone)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: String,
}

impl ServiceAccount {
    fn from_json(value: Option<&Value>) -> Result<ServiceAccount, GoogleError> {
        let Some(Value::Object(key)) = value else {
            return Err(GoogleError::Config(
                "Could not load the default credentials. The plugin server reads credentials only from the client's `credentials` option.".into(),
            ));
        };
        let text = |name: &str| key.get(name).and_then(Value::as_str).filter(|text| !text.is_empty());
        let client_email = text("client_email").ok_or_else(|| {
            GoogleError::Config("The incoming JSON object does not contain a client_email field".into())
        })?;
        let private_key = text("private_key").ok_or_else(|| {
            GoogleError::Config("The incoming JSON object does not contain a private_key field".into())
        })?;
        if private_key.len() > MAX_KEY_BYTES || client_email.len() > 1024 {
            return Err(GoogleError::Config("The service account key is too large".into()));
        }
        let token_uri = text("token_uri").unwrap_or(DEFAULT_TOKEN_URI);
        if token_uri.len() > 2048 {
            return Err(GoogleError::Config("The service account's token_uri is too long".into()));
        }
        Ok(ServiceAccount {
            client_email: client_email.to_string(),
            private_key: private_key.to_string(),
            private_key_id: text("private_key_id").map(|id| id.chars().take(256).collect()),
            token_uri: token_uri.to_string(),
        })
    }
}

/// The signed assertion google-auth-library (gtoken) sends for `account` and `scope` at `now`.
pub fn signed_jwt(
    private_key_pem: &str,
    key_id: Option<&str>,
    issuer: &str,
    scope: &str,
    audience: &str,
    now: u64,
) -> Result<String, GoogleError> {
    use openssl::{hash::MessageDigest, pkey::PKey, sign::Signer};
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let mut header = json!({"alg": "RS256", "typ": "JWT"});
    if let Some(id) = key_id {
        header["kid"] = Value::String(id.to_string());
    }
    let claims = json!({"iss": issuer, "scope": scope, "aud": audience, "exp": now + 3600, "iat": now});
    let input = format!("{}.{}", encode(header.to_string().as_bytes()), encode(claims.to_string().as_bytes()));
    let bad_key = |_| {
        GoogleError::Config(
            "error:1E08010C:DECODER routines::unsupported: the service account's private_key is not a PEM RSA key"
                .into(),
        )
    };
    let key = PKey::private_key_from_pem(private_key_pem.as_bytes()).map_err(bad_key)?;
    if key.rsa().is_err() {
        return Err(GoogleError::Config("the service account's private_key is not an RSA key".into()));
    }
    let signature = Signer::new(MessageDigest::sha256(), &key)
        .and_then(|mut signer| {
            signer.update(input.as_bytes())?;
            signer.sign_to_vec()
        })
        .map_err(|error| GoogleError::Config(format!("could not sign the token request: {error}")))?;
    Ok(format!("{input}.{}", encode(&signature)))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    client_email: String,
    token_uri: String,
    scope: String,
    /// A hash of the key, so that a changed key gets a new token.
    key_digest: [u8; 32],
}

struct CachedToken {
    token: String,
    renew_at: Instant,
}

/// The Google facades' state for one plugin config.
pub struct Google {
    in_flight: Arc<Semaphore>,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
}

impl Default for Google {
    fn default() -> Google {
        Google { in_flight: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)), tokens: Mutex::default() }
    }
}

/// One API request from the facade.
struct ApiRequest {
    url: url::Url,
    method: String,
    body: Option<Vec<u8>>,
    content_type: Option<String>,
    scope: String,
    max_retries: u32,
}

impl ApiRequest {
    fn from_json(value: Option<&Value>) -> Result<ApiRequest, GoogleError> {
        let empty = Map::new();
        let request = match value {
            Some(Value::Object(request)) => request,
            _ => &empty,
        };
        let text = |name: &str| request.get(name).and_then(Value::as_str);
        let service = text("service").unwrap_or_default();
        let root = api_root(service, text("apiEndpoint"))?;
        let path = text("path")
            .filter(|path| path.starts_with('/'))
            .ok_or_else(|| GoogleError::Config("a Google API request needs a path".into()))?;
        let mut url = url::Url::parse(&format!("{root}{path}"))
            .map_err(|_| GoogleError::Config(format!("Invalid URL: {root}{path}")))?;
        let root_url = url::Url::parse(&root).map_err(|_| GoogleError::Config(format!("Invalid URL: {root}")))?;
        if url.host_str() != root_url.host_str() || url.port_or_known_default() != root_url.port_or_known_default() {
            return Err(GoogleError::Config(format!("{path} leaves {root}")));
        }
        if let Some(Value::Object(query)) = request.get("query") {
            append_query(&mut url, query);
        }
        let method = text("method").unwrap_or("GET").to_ascii_uppercase();
        if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
            return Err(GoogleError::Config(format!("{method} is not a valid HTTP method")));
        }
        let (body, content_type) = match (request.get("json"), text("bodyBase64")) {
            (Some(json), _) if !json.is_null() => {
                (Some(json.to_string().into_bytes()), Some("application/json".into()))
            }
            (_, Some(encoded)) => (
                Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|_| GoogleError::Config("the request body is not base64".into()))?,
                ),
                Some(text("contentType").unwrap_or("application/octet-stream").chars().take(256).collect()),
            ),
            _ => (None, None),
        };
        let scopes: Vec<&str> = match request.get("scopes") {
            Some(Value::Array(scopes)) => scopes.iter().filter_map(Value::as_str).take(16).collect(),
            _ => Vec::new(),
        };
        let max_retries = request
            .get("maxRetries")
            .and_then(Value::as_f64)
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(|n| (n as u32).min(MAX_RETRIES_CAP))
            .unwrap_or(DEFAULT_MAX_RETRIES);
        Ok(ApiRequest { url, method, body, content_type, scope: scopes.join(" "), max_retries })
    }
}

fn retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

impl Google {
    /// `google.request` (see the module docs) within `budget` (the host call's deadline less a
    /// margin).
    pub async fn call(&self, function: &str, args: &[Value], budget: Duration) -> Result<Value, JsError> {
        if function != "google.request" {
            return Err(JsError::new("TypeError", format!("{function} is not a function")));
        }
        let deadline = Instant::now() + budget;
        // `raw`: the body's bytes too (a download).
        let raw = args.get(1).and_then(|request| request.get("raw")).and_then(Value::as_bool).unwrap_or(false);
        Ok(match self.request(args, deadline).await {
            Ok(response) => {
                let body = serde_json::from_slice::<Value>(&response.body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&response.body).into_owned()));
                let mut answer = json!({"status": response.status, "body": body});
                if raw {
                    answer["bodyBase64"] =
                        Value::String(base64::engine::general_purpose::STANDARD.encode(&response.body));
                }
                answer
            }
            Err(error) => {
                tracing::debug!(%error, "Google API request failed");
                json!({"error": error.to_json()})
            }
        })
    }

    async fn request(&self, args: &[Value], deadline: Instant) -> Result<FetchResponse, GoogleError> {
        let account = ServiceAccount::from_json(args.first())?;
        let request = ApiRequest::from_json(args.get(1))?;
        check_body_size(request.body.as_deref()).map_err(GoogleError::Config)?;
        let _turn = take_turn(&self.in_flight, "Google").await.map_err(GoogleError::Config)?;
        let retryable = |outcome: &Result<FetchResponse, GoogleError>| match outcome {
            Ok(response) => retryable_status(response.status),
            Err(GoogleError::Fetch(error)) => !error.is_refusal(),
            Err(_) => false,
        };
        with_retries(request.max_retries, deadline, retryable, || async {
            let token = self.token(&account, &request.scope, deadline).await?;
            self.send(&request, &token, deadline).await
        })
        .await
    }

    async fn send(&self, request: &ApiRequest, token: &str, deadline: Instant) -> Result<FetchResponse, GoogleError> {
        let timeout = deadline.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT);
        if timeout < MIN_ATTEMPT_TIME {
            return Err(GoogleError::Fetch(timeout_error(request.url.as_str())));
        }
        let mut headers = vec![
            ("authorization".to_string(), format!("Bearer {token}")),
            ("user-agent".to_string(), USER_AGENT.to_string()),
            (FETCH_OPTIONS_HEADER.to_string(), json!({"timeout": timeout.as_millis() as u64}).to_string()),
        ];
        if let Some(content_type) = &request.content_type {
            headers.push(("content-type".into(), content_type.clone()));
        }
        let fetch = FetchRequest {
            url: request.url.to_string(),
            method: request.method.clone(),
            headers,
            body: request.body.clone(),
        };
        Ok(fetch_with(&network_settings(), fetch).await?)
    }

    /// An access token for `account` and `scope`: the cached one, or a new one from the token URL.
    async fn token(&self, account: &ServiceAccount, scope: &str, deadline: Instant) -> Result<String, GoogleError> {
        use sha2::Digest as _;
        let key = TokenKey {
            client_email: account.client_email.clone(),
            token_uri: account.token_uri.clone(),
            scope: scope.to_string(),
            key_digest: sha2::Sha256::digest(account.private_key.as_bytes()).into(),
        };
        if let Ok(tokens) = self.tokens.lock() {
            if let Some(cached) = tokens.get(&key).filter(|cached| cached.renew_at > Instant::now()) {
                return Ok(cached.token.clone());
            }
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0);
        let signing = account.clone();
        let scope_owned = scope.to_string();
        // RSA signing is CPU work: off the async workers.
        let assertion = tokio::task::spawn_blocking(move || {
            signed_jwt(
                &signing.private_key,
                signing.private_key_id.as_deref(),
                &signing.client_email,
                &scope_owned,
                &signing.token_uri,
                now,
            )
        })
        .await
        .map_err(|error| GoogleError::Config(format!("could not sign the token request: {error}")))??;
        let timeout = deadline.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT);
        if timeout < MIN_ATTEMPT_TIME {
            return Err(GoogleError::Fetch(timeout_error(&account.token_uri)));
        }
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
            .append_pair("assertion", &assertion)
            .finish();
        let request = FetchRequest {
            url: account.token_uri.clone(),
            method: "POST".into(),
            headers: vec![
                ("content-type".into(), "application/x-www-form-urlencoded".into()),
                ("user-agent".into(), USER_AGENT.into()),
                (FETCH_OPTIONS_HEADER.into(), json!({"timeout": timeout.as_millis() as u64}).to_string()),
            ],
            body: Some(form.into_bytes()),
        };
        let response = fetch_with(&network_settings(), request).await?;
        let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        if !(200..300).contains(&response.status) {
            // gtoken's message: `<error>: <error_description>` when the server says so.
            let message = match (body.get("error").and_then(Value::as_str), body.get("error_description")) {
                (Some(error), Some(Value::String(description))) => format!("{error}: {description}"),
                (Some(error), _) => error.to_string(),
                _ => format!("Request failed with status code {}", response.status),
            };
            return Err(GoogleError::Auth { message, status: Some(response.status) });
        }
        let token = body
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty() && token.len() <= 8192 && !token.contains(['\r', '\n']))
            .ok_or_else(|| GoogleError::Auth {
                message: "The token endpoint sent no access_token".into(),
                status: None,
            })?
            .to_string();
        let lifetime = Duration::from_secs(body.get("expires_in").and_then(Value::as_u64).unwrap_or(3600).min(86_400));
        let renew_at = Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN.min(lifetime / 2));
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.len() >= MAX_CACHED_TOKENS {
                tokens.clear();
            }
            tokens.insert(key, CachedToken { token: token.clone(), renew_at });
        }
        Ok(token)
    }
}

fn timeout_error(url: &str) -> FetchError {
    FetchError { message: format!("network timeout at: {url}"), kind: Some("request-timeout".into()), code: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jwt_is_rs256_over_gtoken_claims_and_verifies() {
        use openssl::{hash::MessageDigest, pkey::PKey, rsa::Rsa, sign::Verifier};
        let rsa = Rsa::generate(2048).unwrap();
        let key = PKey::from_rsa(rsa).unwrap();
        let pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let jwt = signed_jwt(&pem, Some("kid1"), "a@b.iam", "s1 s2", "https://t/token", 1000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        let decode = |part: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap();
        let header: Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        let claims: Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!(header, json!({"alg": "RS256", "typ": "JWT", "kid": "kid1"}));
        assert_eq!(
            claims,
            json!({"iss": "a@b.iam", "scope": "s1 s2", "aud": "https://t/token", "exp": 4600, "iat": 1000})
        );
        let mut verifier = Verifier::new(MessageDigest::sha256(), &key).unwrap();
        verifier.update(format!("{}.{}", parts[0], parts[1]).as_bytes()).unwrap();
        assert!(verifier.verify(&decode(parts[2])).unwrap());
        assert!(matches!(signed_jwt("not a key", None, "a", "s", "u", 0), Err(GoogleError::Config(_))));
    }

    #[test]
    fn requests_stay_on_their_root() {
        let request = |path: &str| {
            ApiRequest::from_json(Some(&json!({"service": "bigquery", "method": "GET", "path": path, "scopes": []})))
        };
        assert_eq!(
            request("/bigquery/v2/projects/p").map(|r| r.url.to_string()).unwrap(),
            "https://bigquery.googleapis.com/bigquery/v2/projects/p"
        );
        assert!(request("@evil.example/x").is_err());
        assert!(request("").is_err());
    }
}
