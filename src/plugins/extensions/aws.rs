//! The host side of the `aws-sdk` facade (`runtime/modules/aws-sdk.js`): S3 (REST-XML) and
//! Kinesis (JSON 1.1) requests made as aws-sdk v2 makes them (2.927.0, the reference's version).
//!
//! Owns:
//! * endpoints: the regional ones, a custom `endpoint` (with or without scheme, `sslEnabled`),
//!   virtual-hosted or path-style buckets (`s3ForcePathStyle`, `s3BucketEndpoint`, buckets whose
//!   names are not DNS-compatible);
//! * requests from aws-sdk's params (the supported operations and members are the tables below;
//!   anything else is aws-sdk's `UnexpectedParameter` / `MissingRequiredParameter` /
//!   `InvalidParameterType`), signed with Signature Version 4 (`aws-sigv4`);
//! * aws-sdk's retries: networking errors, timeouts, 5xx, throttling, up to `maxRetries` (3)
//!   after `random × 2^n × retryDelayOptions.base` (100 ms);
//! * answers read into aws-sdk's output shapes (member order, lists defaulting to `[]`), and its
//!   errors: `code`, `message`, `statusCode`, `retryable`, `requestId`, … (S3's XML error body,
//!   `NotFound` & co. for empty bodies, `UnknownEndpoint` for a host that cannot be reached);
//! * the bounds per plugin config: [`MAX_REQUESTS_IN_FLIGHT`] requests at once (more wait their
//!   turn), request bodies up to `PLUGIN_FETCH_MAX_RESPONSE_BYTES` (`s3.upload` splits larger ones
//!   into parts in the facade, as aws-sdk's ManagedUpload does).
//!
//! The network is the plugins' own client (`runtime/host/fetch.rs`): the same policy
//! (`ALLOW_INTERNAL_IPS`, checked on resolved addresses), response-body bounds and timeouts.
//!
//! Calls (`hostCall` names; JSON arguments, binary bodies as base64):
//! * `aws.s3 [config, operation, params, bodyBase64?]`
//! * `aws.kinesis [config, operation, params]` (blobs already base64, as the JSON protocol wants)
//!
//! Each answers `{"data": output}` or `{"error": fields}`; the facade makes the `Date`s, `Buffer`s
//! and the `Error` object. `config` is `{accessKeyId, secretAccessKey, sessionToken?, region?,
//! endpoint?, sslEnabled?, s3ForcePathStyle?, s3BucketEndpoint?, maxRetries?, retryBase?}`.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use super::super::runtime::{
    fetch_undecoded, network_settings, FetchError, FetchRequest, FetchResponse, FETCH_OPTIONS_HEADER, REQUEST_TIMEOUT,
};
use super::super::vm_boundary::JsError;

/// Requests one plugin config may have in flight at once (aws-sdk's ManagedUpload sends 4 parts
/// at a time); more wait for a turn within the host call's deadline.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 8;
/// aws-sdk's `maxRetries` default for S3 and Kinesis.
const DEFAULT_MAX_RETRIES: u32 = 3;
/// The most retries a plugin may ask for (each waits up to 2^n × base).
const MAX_RETRIES_CAP: u32 = 10;
/// aws-sdk's `retryDelayOptions.base` default (ms).
const DEFAULT_RETRY_BASE_MS: f64 = 100.0;
/// An attempt is not started with less time than this left.
const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(20);
const USER_AGENT: &str = "aws-sdk-nodejs/2.927.0 linux/v14.21.3 plugin-server";
const S3_XMLNS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// The aws-sdk facade's state for one plugin config.
pub struct Aws {
    in_flight: Arc<Semaphore>,
}

impl Default for Aws {
    fn default() -> Aws {
        Aws { in_flight: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)) }
    }
}

impl Aws {
    /// `aws.s3` / `aws.kinesis` (see the module docs), retries included, within `budget` (the
    /// host call's deadline less a margin, so that the plugin sees aws-sdk's `TimeoutError`
    /// rather than the runtime's).
    pub async fn call(&self, function: &str, args: &[Value], budget: Duration) -> Result<Value, JsError> {
        let deadline = Instant::now() + budget;
        let outcome = match function {
            "aws.s3" => self.s3(args, deadline).await,
            "aws.kinesis" => self.kinesis(args, deadline).await.map(|data| (data, String::new())),
            _ => return Err(JsError::new("TypeError", format!("{function} is not a function"))),
        };
        Ok(match outcome {
            Ok((data, url)) if url.is_empty() => json!({ "data": data }),
            Ok((data, url)) => json!({ "data": data, "url": url }),
            Err(error) => json!({ "error": Value::Object(error.fields) }),
        })
    }

    /// The output, and the request's URL without its query (`s3.upload`'s `Location`).
    async fn s3(&self, args: &[Value], deadline: Instant) -> Result<(Value, String), AwsError> {
        let config = ClientConfig::from_json(args.first(), "us-east-1")?;
        let operation = args.get(1).and_then(Value::as_str).unwrap_or_default();
        let op = S3_OPERATIONS
            .iter()
            .find(|op| op.name == operation)
            .ok_or_else(|| AwsError::new("UnknownOperation", format!("The plugin server's S3 has no {operation}()")))?;
        let empty = Map::new();
        let params = match args.get(2) {
            Some(Value::Object(params)) => params,
            None | Some(Value::Null) => &empty,
            Some(_) => return Err(AwsError::invalid_type("params", "a structure")),
        };
        let body = match args.get(3).and_then(Value::as_str) {
            Some(encoded) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| AwsError::invalid_type("params.Body", "a Buffer"))?,
            ),
            None => None,
        };
        let request = build_s3_request(&config, op, params, body)?;
        let response = self.send(&config, &request, Signing::S3, deadline).await?;
        let mut location = request.url.clone();
        location.set_query(None);
        Ok((read_s3_output(op, &response)?, location.to_string()))
    }

    async fn kinesis(&self, args: &[Value], deadline: Instant) -> Result<Value, AwsError> {
        let config = ClientConfig::from_json(args.first(), "")?;
        let operation = args.get(1).and_then(Value::as_str).unwrap_or_default();
        let target = KINESIS_OPERATIONS.iter().find(|name| lower_first(name) == operation).ok_or_else(|| {
            AwsError::new("UnknownOperation", format!("The plugin server's Kinesis has no {operation}()"))
        })?;
        let params = match args.get(2) {
            Some(Value::Object(params)) => Value::Object(params.clone()),
            None | Some(Value::Null) => json!({}),
            Some(_) => return Err(AwsError::invalid_type("params", "a structure")),
        };
        if config.region.is_empty() {
            return Err(AwsError::new("ConfigError", "Missing region in config"));
        }
        let endpoint = config.endpoint_url("kinesis")?;
        let request = HttpRequest {
            method: "POST",
            url: endpoint.clone(),
            hostname: endpoint.host_str().unwrap_or_default().to_string(),
            signed_headers: vec![("x-amz-target".into(), format!("Kinesis_20131202.{target}"))],
            headers: vec![("content-type".into(), "application/x-amz-json-1.1".into())],
            body: params.to_string().into_bytes(),
            service: "kinesis",
        };
        let response = self.send(&config, &request, Signing::Json, deadline).await?;
        if response.body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&response.body)
            .map_err(|e| AwsError::new("SerializationException", format!("Kinesis answered something not JSON: {e}")))
    }

    /// Signs and sends `request`, retrying as aws-sdk does; a non-2xx answer is the service's
    /// error.
    async fn send(
        &self,
        config: &ClientConfig,
        request: &HttpRequest,
        signing: Signing,
        deadline: Instant,
    ) -> Result<FetchResponse, AwsError> {
        let settings = network_settings();
        if request.body.len() > settings.max_response_bytes {
            return Err(AwsError::new(
                "RequestEntityTooLarge",
                format!(
                    "The plugin server refused a request body of {} bytes: at most {} bytes per request (PLUGIN_FETCH_MAX_RESPONSE_BYTES); s3.upload() sends larger bodies in parts",
                    request.body.len(),
                    settings.max_response_bytes
                ),
            ));
        }
        let _turn = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AwsError::new("NetworkingError", "the plugin's AWS client is shut down"))?;
        let mut attempt = 0u32;
        loop {
            let timeout = deadline.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT);
            if timeout < MIN_ATTEMPT_TIME {
                return Err(timeout_error(config, request, timeout));
            }
            let mut signed = sign(config, request, signing, SystemTime::now())?;
            // Redirects are S3 errors here (aws-sdk re-signs for the bucket's region, which the
            // answer names); the attempt ends by the host call's deadline.
            signed.headers.push((
                FETCH_OPTIONS_HEADER.into(),
                json!({"redirect": "manual", "timeout": timeout.as_millis() as u64}).to_string(),
            ));
            let mut error = match fetch_undecoded(&settings, signed).await {
                Ok(response) if (200..300).contains(&response.status) => match signing {
                    // S3 may answer 200 with an error body (CompleteMultipartUpload).
                    Signing::S3 if is_200_error(&response) => s3_error(&response),
                    _ => return Ok(response),
                },
                Ok(response) => match signing {
                    Signing::S3 => s3_error(&response),
                    Signing::Json => json_error(&response),
                },
                Err(error) => network_error(config, request, &error, timeout),
            };
            if attempt < config.max_retries {
                let delay = rand::random::<f64>() * 2f64.powi(attempt as i32) * config.retry_base_ms;
                error.fields.insert("retryDelay".into(), json!(delay));
                let pause = Duration::from_secs_f64(delay / 1000.0).min(MAX_RETRY_DELAY);
                if error.retryable() && Instant::now() + pause + MIN_ATTEMPT_TIME < deadline {
                    attempt += 1;
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            return Err(error);
        }
    }
}

// ---------------------------------------------------------------- errors

/// An aws-sdk error: its own enumerable fields, in aws-sdk's order (`message`, `code`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct AwsError {
    pub fields: Map<String, Value>,
}

impl AwsError {
    fn new(code: &str, message: impl Into<String>) -> AwsError {
        let mut fields = Map::new();
        fields.insert("message".into(), Value::String(message.into()));
        fields.insert("code".into(), Value::String(code.into()));
        AwsError { fields }
    }

    fn with(mut self, key: &str, value: Value) -> AwsError {
        self.fields.insert(key.into(), value);
        self
    }

    fn missing(member: &str) -> AwsError {
        AwsError::new("MissingRequiredParameter", format!("Missing required key '{member}' in params"))
    }

    fn invalid_type(path: &str, expected: &str) -> AwsError {
        AwsError::new("InvalidParameterType", format!("Expected {path} to be {expected}"))
    }

    pub fn code(&self) -> &str {
        self.fields.get("code").and_then(Value::as_str).unwrap_or_default()
    }

    fn retryable(&self) -> bool {
        self.fields.get("retryable").and_then(Value::as_bool).unwrap_or(false)
    }
}

/// Node's `errno` for the system error codes the plugins' client reports.
fn errno(code: &str) -> Option<i64> {
    Some(match code {
        "ECONNREFUSED" => -111,
        "ECONNRESET" => -104,
        "ETIMEDOUT" => -110,
        "EHOSTUNREACH" => -113,
        "ENETUNREACH" => -101,
        "EADDRNOTAVAIL" => -99,
        "ENOTFOUND" => -3008,
        "EAI_AGAIN" => -3001,
        _ => return None,
    })
}

/// A request that did not get an answer. aws-sdk 2.927 on Node ≥ 14 reports every system error
/// as `UnknownEndpoint` ("Inaccessible host") wrapping the `NetworkingError`; a timeout is a
/// `TimeoutError`; a destination the network policy refuses is a `NetworkingError` that is not
/// retried (asking again cannot help).
fn network_error(config: &ClientConfig, request: &HttpRequest, error: &FetchError, timeout: Duration) -> AwsError {
    let reason = error.message.split_once("reason: ").map(|(_, reason)| reason).unwrap_or(&error.message).to_string();
    let region = Value::String(config.region.clone());
    let hostname = Value::String(request.hostname.clone());
    if error.kind.as_deref() == Some("request-timeout") || error.kind.as_deref() == Some("body-timeout") {
        return timeout_error(config, request, timeout);
    }
    if error.is_refusal() {
        return AwsError::new("NetworkingError", reason)
            .with("region", region)
            .with("hostname", hostname)
            .with("retryable", json!(false));
    }
    let code = error.code.as_deref().unwrap_or_default();
    // Node's system error as aws-sdk wrapped it: `message`, `errno`, `code` (now
    // `NetworkingError`), `syscall`, `address`, `port`, then aws-sdk's fields.
    let mut original = Map::new();
    original.insert("message".into(), json!(reason));
    if let Some(number) = errno(code) {
        original.insert("errno".into(), json!(number));
    }
    original.insert("code".into(), json!("NetworkingError"));
    let syscall = if reason.starts_with("getaddrinfo") { "getaddrinfo" } else { "connect" };
    original.insert("syscall".into(), json!(syscall));
    if syscall == "connect" {
        if let Some((host, port)) = reason.rsplit(' ').next().and_then(|address| address.rsplit_once(':')) {
            original.insert("address".into(), json!(host));
            original.insert("port".into(), json!(port.parse::<u16>().ok()));
        }
    }
    let original = AwsError { fields: original }
        .with("region", region.clone())
        .with("hostname", hostname.clone())
        .with("retryable", json!(true));
    if errno(code).is_none() {
        return original;
    }
    AwsError::new(
        "UnknownEndpoint",
        format!(
            "Inaccessible host: `{}'. This service may not be available in the `{}' region.",
            request.hostname, config.region
        ),
    )
    .with("region", region)
    .with("hostname", hostname)
    .with("retryable", json!(true))
    .with("originalError", Value::Object(original.fields))
}

/// aws-sdk's `TimeoutError` of an attempt that had `timeout`.
fn timeout_error(config: &ClientConfig, request: &HttpRequest, timeout: Duration) -> AwsError {
    AwsError::new("TimeoutError", format!("Connection timed out after {}ms", timeout.as_millis()))
        .with("region", json!(config.region))
        .with("hostname", json!(request.hostname))
        .with("retryable", json!(true))
}

/// Whether aws-sdk retries an error with this code and status.
fn retryable_service_error(code: &str, status: u16) -> bool {
    const THROTTLING: &[&str] = &[
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "Throttling",
    ];
    status >= 500
        || status == 429
        || THROTTLING.contains(&code)
        || code == "RequestTimeout"
        || code == "ExpiredTokenException"
}

fn header<'a>(response: &'a FetchResponse, name: &str) -> Option<&'a str> {
    response.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
}

/// S3's error: the XML body's `Code` and `Message`, or for an empty body the status's name
/// (`NotFound`, `Forbidden`, …) and a `null` message, as aws-sdk's `extractError`.
fn s3_error(response: &FetchResponse) -> AwsError {
    let status = response.status;
    let text = String::from_utf8_lossy(&response.body);
    let named = match status {
        304 => Some("NotModified"),
        400 => Some("BadRequest"),
        403 => Some("Forbidden"),
        404 => Some("NotFound"),
        _ => None,
    };
    let region = header(response, "x-amz-bucket-region").map(str::to_string);
    let mut error = match (named, text.trim().is_empty()) {
        (Some(code), true) => AwsError { fields: Map::new() }.with("message", Value::Null).with("code", json!(code)),
        _ => {
            let document = roxmltree::Document::parse(&text).ok();
            let field = |name: &str| {
                document.as_ref().and_then(|document| {
                    document
                        .root_element()
                        .children()
                        .find(|node| node.has_tag_name(name))
                        .and_then(|node| node.text())
                        .map(str::to_string)
                })
            };
            let code = field("Code").unwrap_or_else(|| status.to_string());
            let message = field("Message").map(Value::String).unwrap_or(Value::Null);
            AwsError { fields: Map::new() }.with("message", message).with("code", json!(code))
        }
    };
    error = error.with("region", region.map(Value::String).unwrap_or(Value::Null));
    if let Some(id) = header(response, "x-amz-request-id") {
        error = error.with("requestId", json!(id));
    }
    if let Some(id) = header(response, "x-amz-id-2") {
        error = error.with("extendedRequestId", json!(id));
    }
    let retryable = retryable_service_error(error.code(), status);
    error.with("statusCode", json!(status)).with("retryable", json!(retryable))
}

/// aws-sdk's `is200Error`: a 200 whose short body is an `<Error>` document.
fn is_200_error(response: &FetchResponse) -> bool {
    response.status == 200
        && (15..=3000).contains(&response.body.len())
        && String::from_utf8_lossy(&response.body).trim_end().ends_with("</Error>")
}

/// A JSON-protocol error (`{"__type": "…#Code", "message": "…"}`).
fn json_error(response: &FetchResponse) -> AwsError {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let kind = body
        .get("__type")
        .or_else(|| body.get("code"))
        .and_then(Value::as_str)
        .map(|kind| kind.rsplit('#').next().unwrap_or(kind).to_string())
        .or_else(|| header(response, "x-amzn-errortype").map(|kind| kind.split(':').next().unwrap_or(kind).to_string()))
        .unwrap_or_else(|| if response.status == 413 { "RequestEntityTooLarge".into() } else { "UnknownError".into() });
    let message = body
        .get("message")
        .or_else(|| body.get("Message"))
        .and_then(Value::as_str)
        .map(|m| Value::String(m.to_string()))
        .unwrap_or(Value::Null);
    let mut error = AwsError { fields: Map::new() }.with("message", message).with("code", json!(kind));
    if let Some(id) = header(response, "x-amzn-requestid") {
        error = error.with("requestId", json!(id));
    }
    let retryable = retryable_service_error(error.code(), response.status);
    error.with("statusCode", json!(response.status)).with("retryable", json!(retryable))
}

// ---------------------------------------------------------------- client configuration

#[derive(Debug, Clone, PartialEq)]
struct ClientConfig {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// Empty when none was given and the service has no default.
    region: String,
    endpoint: Option<String>,
    ssl_enabled: bool,
    force_path_style: bool,
    bucket_endpoint: bool,
    max_retries: u32,
    retry_base_ms: f64,
}

fn test_endpoint() -> &'static RwLock<Option<String>> {
    static ENDPOINT: OnceLock<RwLock<Option<String>>> = OnceLock::new();
    ENDPOINT.get_or_init(RwLock::default)
}

/// TEST HOOK (never called by the server): a client made without an `endpoint` sends its requests
/// to `root` (such as moto's `http://127.0.0.1:5000`, path-style) instead of AWS's regional
/// endpoint, for tests that run a plugin which names no endpoint against a local stand-in.
pub fn set_test_endpoint(root: &str) {
    if let Ok(mut cell) = test_endpoint().write() {
        *cell = Some(root.trim_end_matches('/').to_string());
    }
}

fn truthy(value: Option<&Value>) -> bool {
    value.is_some_and(crate::js::is_truthy)
}

fn text(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(text)) if !text.is_empty() => Some(text.clone()),
        _ => None,
    }
}

impl ClientConfig {
    fn from_json(value: Option<&Value>, default_region: &str) -> Result<ClientConfig, AwsError> {
        let empty = Map::new();
        let config = value.and_then(Value::as_object).unwrap_or(&empty);
        let (Some(access_key_id), Some(secret_access_key)) =
            (text(config.get("accessKeyId")), text(config.get("secretAccessKey")))
        else {
            return Err(AwsError::new(
                "CredentialsError",
                "Missing credentials in config, if using AWS_CONFIG_FILE, set AWS_SDK_LOAD_CONFIG=1",
            ));
        };
        let max_retries = config
            .get("maxRetries")
            .and_then(Value::as_f64)
            .filter(|n| n.is_finite() && *n >= 0.0)
            .map(|n| (n as u32).min(MAX_RETRIES_CAP))
            .unwrap_or(DEFAULT_MAX_RETRIES);
        let retry_base_ms = config
            .get("retryBase")
            .and_then(Value::as_f64)
            .filter(|n| n.is_finite() && *n >= 0.0)
            .unwrap_or(DEFAULT_RETRY_BASE_MS)
            .min(MAX_RETRY_DELAY.as_millis() as f64);
        let mut endpoint = text(config.get("endpoint"));
        let mut force_path_style = truthy(config.get("s3ForcePathStyle"));
        if endpoint.is_none() {
            if let Some(root) = test_endpoint().read().ok().and_then(|root| root.clone()) {
                endpoint = Some(root);
                force_path_style = true;
            }
        }
        Ok(ClientConfig {
            access_key_id,
            secret_access_key,
            session_token: text(config.get("sessionToken")),
            region: text(config.get("region")).unwrap_or_else(|| default_region.to_string()),
            endpoint,
            ssl_enabled: config.get("sslEnabled").map(crate::js::is_truthy).unwrap_or(true),
            force_path_style,
            bucket_endpoint: truthy(config.get("s3BucketEndpoint")),
            max_retries,
            retry_base_ms,
        })
    }

    /// The service endpoint: the custom one (aws-sdk's `AWS.Endpoint`: a missing scheme is
    /// `https://`, or `http://` without `sslEnabled`), else the region's.
    fn endpoint_url(&self, service: &str) -> Result<url::Url, AwsError> {
        let scheme = if self.ssl_enabled { "https" } else { "http" };
        let text = match &self.endpoint {
            Some(endpoint) if endpoint.contains("://") => endpoint.clone(),
            Some(endpoint) => format!("{scheme}://{endpoint}"),
            None if service == "s3" && self.region == "us-east-1" => format!("{scheme}://s3.amazonaws.com"),
            None if self.region.starts_with("cn-") => format!("{scheme}://{service}.{}.amazonaws.com.cn", self.region),
            None => format!("{scheme}://{service}.{}.amazonaws.com", self.region),
        };
        url::Url::parse(&text)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
            .ok_or_else(|| AwsError::new("InvalidEndpoint", format!("Invalid endpoint: {text}")))
    }
}

// ---------------------------------------------------------------- requests

/// A request before signing.
#[derive(Debug, Clone, PartialEq)]
struct HttpRequest {
    method: &'static str,
    url: url::Url,
    /// The host name as aws-sdk reports it in errors (`hostname`).
    hostname: String,
    /// Headers that are part of the signature (`x-amz-*`, `content-md5`).
    signed_headers: Vec<(String, String)>,
    /// Headers sent unsigned, as aws-sdk leaves them out (`content-type`, `user-agent`).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    service: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Signing {
    /// S3: the path signed as sent, `x-amz-content-sha256`.
    S3,
    /// JSON protocol services.
    Json,
}

/// The request as it goes out: SigV4 headers added.
fn sign(
    config: &ClientConfig,
    request: &HttpRequest,
    signing: Signing,
    time: SystemTime,
) -> Result<FetchRequest, AwsError> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode,
    };
    let credentials = aws_credential_types::Credentials::new(
        config.access_key_id.clone(),
        config.secret_access_key.clone(),
        config.session_token.clone(),
        None,
        "plugin config",
    );
    let identity = credentials.into();
    let mut settings = SigningSettings::default();
    if signing == Signing::S3 {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&config.region)
        .name(request.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| AwsError::new("SigningError", e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        request.method,
        request.url.as_str(),
        request.signed_headers.iter().map(|(name, value)| (name.as_str(), value.as_str())),
        SignableBody::Bytes(&request.body),
    )
    .map_err(|e| AwsError::new("SigningError", e.to_string()))?;
    let (instructions, _signature) =
        sign(signable, &params).map_err(|e| AwsError::new("SigningError", e.to_string()))?.into_parts();
    let mut headers = request.signed_headers.clone();
    headers.extend(instructions.headers().map(|(name, value)| (name.to_string(), value.to_string())));
    headers.extend(request.headers.iter().cloned());
    headers.push(("user-agent".into(), USER_AGENT.into()));
    Ok(FetchRequest {
        url: request.url.to_string(),
        method: request.method.to_string(),
        headers,
        body: if request.body.is_empty() && matches!(request.method, "GET" | "HEAD" | "DELETE") {
            None
        } else {
            Some(request.body.clone())
        },
    })
}

/// aws-sdk's `uriEscape`: RFC 3986, everything but unreserved characters escaped.
fn uri_escape(text: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(text, UNRESERVED).to_string()
}

/// aws-sdk's `uriEscapePath`: each `/`-separated segment escaped.
fn uri_escape_path(text: &str) -> String {
    text.split('/').map(uri_escape).collect::<Vec<_>>().join("/")
}

/// aws-sdk's `dnsCompatibleBucketName`.
fn dns_compatible_bucket(bucket: &str) -> bool {
    let bytes = bucket.as_bytes();
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ip_like = {
        let parts: Vec<&str> = bucket.split('.').collect();
        parts.windows(4).any(|w| w.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    };
    (3..=63).contains(&bytes.len())
        && edge(bytes[0])
        && edge(bytes[bytes.len() - 1])
        && bytes.iter().all(|b| edge(*b) || *b == b'.' || *b == b'-')
        && !bucket.contains("..")
        && !ip_like
}

// ---------------------------------------------------------------- S3 operations

/// How a member is typed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Str,
    Int,
    Bool,
    /// Sent as RFC 822 in headers (aws-sdk's default), ISO 8601 in query strings.
    Time,
    /// Sent as ISO 8601 in a header (`x-amz-object-lock-retain-until-date`).
    IsoTime,
}

/// Where an input member goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Header(&'static str),
    Query(&'static str),
    /// The map of `x-amz-meta-*` headers.
    Metadata,
    /// Handled by the operation itself (`Bucket`, `Key`, `Body`, XML payloads).
    Special,
    /// Accepted and ignored (`ContentLength`: the body's own length is sent).
    Ignored,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name: &'static str,
    place: Place,
    kind: Kind,
}

const fn m(name: &'static str, place: Place, kind: Kind) -> Member {
    Member { name, place, kind }
}

use Kind::{Bool, Int, IsoTime, Str, Time};
use Place::{Header as H, Ignored, Metadata, Query as Q, Special};

/// Output shapes (XML bodies and members read from headers).
#[derive(Debug, Clone, Copy)]
enum Shape {
    Str,
    Int,
    Bool,
    Time,
    Struct(&'static [(&'static str, Shape)]),
    /// Repeated elements named like the member (`Contents`, `CommonPrefixes`).
    FlatList(&'static Shape),
    /// A wrapper element whose children are the items (`<Buckets><Bucket>…`).
    List(&'static Shape),
}

/// Where the output comes from.
#[derive(Debug, Clone, Copy)]
enum Out {
    Header(&'static str, Shape),
    Metadata,
    /// The XML body's members (the shape's, in order).
    Xml(&'static [(&'static str, Shape)]),
    /// The body as bytes (`getObject`).
    Body,
}

struct S3Operation {
    name: &'static str,
    method: &'static str,
    /// Needs `Bucket` (and `Key` when `object`).
    bucket: bool,
    object: bool,
    /// Fixed query (`list-type=2`, `uploads`).
    subresource: &'static [(&'static str, &'static str)],
    input: &'static [Member],
    /// Takes `Body`.
    body: bool,
    /// In aws-sdk's output order: members read from headers (in the shape's order), then the
    /// body's (aws-sdk parses the headers first).
    output: &'static [(&'static str, Out)],
}

const OBJECT_WRITE_HEADERS: &[Member] = &[
    m("ACL", H("x-amz-acl"), Str),
    m("CacheControl", H("Cache-Control"), Str),
    m("ContentDisposition", H("Content-Disposition"), Str),
    m("ContentEncoding", H("Content-Encoding"), Str),
    m("ContentLanguage", H("Content-Language"), Str),
    m("ContentType", H("Content-Type"), Str),
    m("Expires", H("Expires"), Time),
    m("GrantFullControl", H("x-amz-grant-full-control"), Str),
    m("GrantRead", H("x-amz-grant-read"), Str),
    m("GrantReadACP", H("x-amz-grant-read-acp"), Str),
    m("GrantWriteACP", H("x-amz-grant-write-acp"), Str),
    m("Metadata", Metadata, Str),
    m("ServerSideEncryption", H("x-amz-server-side-encryption"), Str),
    m("StorageClass", H("x-amz-storage-class"), Str),
    m("WebsiteRedirectLocation", H("x-amz-website-redirect-location"), Str),
    m("SSEKMSKeyId", H("x-amz-server-side-encryption-aws-kms-key-id"), Str),
    m("SSEKMSEncryptionContext", H("x-amz-server-side-encryption-context"), Str),
    m("BucketKeyEnabled", H("x-amz-server-side-encryption-bucket-key-enabled"), Bool),
    m("RequestPayer", H("x-amz-request-payer"), Str),
    m("Tagging", H("x-amz-tagging"), Str),
    m("ObjectLockMode", H("x-amz-object-lock-mode"), Str),
    m("ObjectLockRetainUntilDate", H("x-amz-object-lock-retain-until-date"), IsoTime),
    m("ObjectLockLegalHoldStatus", H("x-amz-object-lock-legal-hold"), Str),
    m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
];

const PUT_OBJECT_INPUT: &[Member] = &{
    let mut all = [m("", Special, Str); OBJECT_WRITE_HEADERS.len() + 2];
    all[0] = m("ContentLength", Ignored, Int);
    all[1] = m("ContentMD5", H("Content-MD5"), Str);
    let mut i = 0;
    while i < OBJECT_WRITE_HEADERS.len() {
        all[i + 2] = OBJECT_WRITE_HEADERS[i];
        i += 1;
    }
    all
};

const OBJECT_READ_INPUT: &[Member] = &[
    m("IfMatch", H("If-Match"), Str),
    m("IfModifiedSince", H("If-Modified-Since"), Time),
    m("IfNoneMatch", H("If-None-Match"), Str),
    m("IfUnmodifiedSince", H("If-Unmodified-Since"), Time),
    m("Range", H("Range"), Str),
    m("ResponseCacheControl", Q("response-cache-control"), Str),
    m("ResponseContentDisposition", Q("response-content-disposition"), Str),
    m("ResponseContentEncoding", Q("response-content-encoding"), Str),
    m("ResponseContentLanguage", Q("response-content-language"), Str),
    m("ResponseContentType", Q("response-content-type"), Str),
    m("ResponseExpires", Q("response-expires"), Time),
    m("VersionId", Q("versionId"), Str),
    m("RequestPayer", H("x-amz-request-payer"), Str),
    m("PartNumber", Q("partNumber"), Int),
    m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
];

const OBJECT_READ_OUTPUT: &[(&str, Out)] = &[
    ("DeleteMarker", Out::Header("x-amz-delete-marker", Shape::Bool)),
    ("AcceptRanges", Out::Header("accept-ranges", Shape::Str)),
    ("Expiration", Out::Header("x-amz-expiration", Shape::Str)),
    ("Restore", Out::Header("x-amz-restore", Shape::Str)),
    ("LastModified", Out::Header("Last-Modified", Shape::Time)),
    ("ContentLength", Out::Header("Content-Length", Shape::Int)),
    ("ETag", Out::Header("ETag", Shape::Str)),
    ("MissingMeta", Out::Header("x-amz-missing-meta", Shape::Int)),
    ("VersionId", Out::Header("x-amz-version-id", Shape::Str)),
    ("CacheControl", Out::Header("Cache-Control", Shape::Str)),
    ("ContentDisposition", Out::Header("Content-Disposition", Shape::Str)),
    ("ContentEncoding", Out::Header("Content-Encoding", Shape::Str)),
    ("ContentLanguage", Out::Header("Content-Language", Shape::Str)),
    ("ContentRange", Out::Header("Content-Range", Shape::Str)),
    ("ContentType", Out::Header("Content-Type", Shape::Str)),
    ("Expires", Out::Header("Expires", Shape::Time)),
    ("WebsiteRedirectLocation", Out::Header("x-amz-website-redirect-location", Shape::Str)),
    ("ServerSideEncryption", Out::Header("x-amz-server-side-encryption", Shape::Str)),
    ("Metadata", Out::Metadata),
    ("SSEKMSKeyId", Out::Header("x-amz-server-side-encryption-aws-kms-key-id", Shape::Str)),
    ("BucketKeyEnabled", Out::Header("x-amz-server-side-encryption-bucket-key-enabled", Shape::Bool)),
    ("StorageClass", Out::Header("x-amz-storage-class", Shape::Str)),
    ("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str)),
    ("ReplicationStatus", Out::Header("x-amz-replication-status", Shape::Str)),
    ("PartsCount", Out::Header("x-amz-mp-parts-count", Shape::Int)),
    ("TagCount", Out::Header("x-amz-tagging-count", Shape::Int)),
    ("ObjectLockMode", Out::Header("x-amz-object-lock-mode", Shape::Str)),
    ("ObjectLockRetainUntilDate", Out::Header("x-amz-object-lock-retain-until-date", Shape::Time)),
    ("ObjectLockLegalHoldStatus", Out::Header("x-amz-object-lock-legal-hold", Shape::Str)),
];

const GET_OBJECT_OUTPUT: &[(&str, Out)] = &{
    let mut all = [("", Out::Body); OBJECT_READ_OUTPUT.len() + 1];
    let mut i = 0;
    while i < OBJECT_READ_OUTPUT.len() {
        all[i] = OBJECT_READ_OUTPUT[i];
        i += 1;
    }
    all[i] = ("Body", Out::Body);
    all
};

const WRITE_OUTPUT: &[(&str, Out)] = &[
    ("Expiration", Out::Header("x-amz-expiration", Shape::Str)),
    ("ETag", Out::Header("ETag", Shape::Str)),
    ("ServerSideEncryption", Out::Header("x-amz-server-side-encryption", Shape::Str)),
    ("VersionId", Out::Header("x-amz-version-id", Shape::Str)),
    ("SSEKMSKeyId", Out::Header("x-amz-server-side-encryption-aws-kms-key-id", Shape::Str)),
    ("SSEKMSEncryptionContext", Out::Header("x-amz-server-side-encryption-context", Shape::Str)),
    ("BucketKeyEnabled", Out::Header("x-amz-server-side-encryption-bucket-key-enabled", Shape::Bool)),
    ("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str)),
];

const OWNER: Shape = Shape::Struct(&[("DisplayName", Shape::Str), ("ID", Shape::Str)]);
const OBJECT: Shape = Shape::Struct(&[
    ("Key", Shape::Str),
    ("LastModified", Shape::Time),
    ("ETag", Shape::Str),
    ("Size", Shape::Int),
    ("StorageClass", Shape::Str),
    ("Owner", OWNER),
]);
const PREFIX: Shape = Shape::Struct(&[("Prefix", Shape::Str)]);

const LIST_COMMON_INPUT: [Member; 5] = [
    m("Delimiter", Q("delimiter"), Str),
    m("EncodingType", Q("encoding-type"), Str),
    m("MaxKeys", Q("max-keys"), Int),
    m("Prefix", Q("prefix"), Str),
    m("RequestPayer", H("x-amz-request-payer"), Str),
];

const S3_OPERATIONS: &[S3Operation] = &[
    S3Operation {
        name: "putObject",
        method: "PUT",
        bucket: true,
        object: true,
        subresource: &[],
        input: PUT_OBJECT_INPUT,
        body: true,
        output: WRITE_OUTPUT,
    },
    S3Operation {
        name: "getObject",
        method: "GET",
        bucket: true,
        object: true,
        subresource: &[],
        input: OBJECT_READ_INPUT,
        body: false,
        output: GET_OBJECT_OUTPUT,
    },
    S3Operation {
        name: "headObject",
        method: "HEAD",
        bucket: true,
        object: true,
        subresource: &[],
        input: OBJECT_READ_INPUT,
        body: false,
        output: OBJECT_READ_OUTPUT,
    },
    S3Operation {
        name: "deleteObject",
        method: "DELETE",
        bucket: true,
        object: true,
        subresource: &[],
        input: &[
            m("MFA", H("x-amz-mfa"), Str),
            m("VersionId", Q("versionId"), Str),
            m("RequestPayer", H("x-amz-request-payer"), Str),
            m("BypassGovernanceRetention", H("x-amz-bypass-governance-retention"), Bool),
            m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
        ],
        body: false,
        output: &[
            ("DeleteMarker", Out::Header("x-amz-delete-marker", Shape::Bool)),
            ("VersionId", Out::Header("x-amz-version-id", Shape::Str)),
            ("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str)),
        ],
    },
    S3Operation {
        name: "listObjectsV2",
        method: "GET",
        bucket: true,
        object: false,
        subresource: &[("list-type", "2")],
        input: &[
            LIST_COMMON_INPUT[0],
            LIST_COMMON_INPUT[1],
            LIST_COMMON_INPUT[2],
            LIST_COMMON_INPUT[3],
            LIST_COMMON_INPUT[4],
            m("ContinuationToken", Q("continuation-token"), Str),
            m("FetchOwner", Q("fetch-owner"), Bool),
            m("StartAfter", Q("start-after"), Str),
            m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
        ],
        body: false,
        output: &[(
            "",
            Out::Xml(&[
                ("IsTruncated", Shape::Bool),
                ("Contents", Shape::FlatList(&OBJECT)),
                ("Name", Shape::Str),
                ("Prefix", Shape::Str),
                ("Delimiter", Shape::Str),
                ("MaxKeys", Shape::Int),
                ("CommonPrefixes", Shape::FlatList(&PREFIX)),
                ("EncodingType", Shape::Str),
                ("KeyCount", Shape::Int),
                ("ContinuationToken", Shape::Str),
                ("NextContinuationToken", Shape::Str),
                ("StartAfter", Shape::Str),
            ]),
        )],
    },
    S3Operation {
        name: "listObjects",
        method: "GET",
        bucket: true,
        object: false,
        subresource: &[],
        input: &[
            LIST_COMMON_INPUT[0],
            LIST_COMMON_INPUT[1],
            LIST_COMMON_INPUT[2],
            LIST_COMMON_INPUT[3],
            LIST_COMMON_INPUT[4],
            m("Marker", Q("marker"), Str),
            m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
        ],
        body: false,
        output: &[(
            "",
            Out::Xml(&[
                ("IsTruncated", Shape::Bool),
                ("Marker", Shape::Str),
                ("NextMarker", Shape::Str),
                ("Contents", Shape::FlatList(&OBJECT)),
                ("Name", Shape::Str),
                ("Prefix", Shape::Str),
                ("Delimiter", Shape::Str),
                ("MaxKeys", Shape::Int),
                ("CommonPrefixes", Shape::FlatList(&PREFIX)),
                ("EncodingType", Shape::Str),
            ]),
        )],
    },
    S3Operation {
        name: "listBuckets",
        method: "GET",
        bucket: false,
        object: false,
        subresource: &[],
        input: &[],
        body: false,
        output: &[(
            "",
            Out::Xml(&[
                ("Buckets", Shape::List(&Shape::Struct(&[("Name", Shape::Str), ("CreationDate", Shape::Time)]))),
                ("Owner", OWNER),
            ]),
        )],
    },
    S3Operation {
        name: "createBucket",
        method: "PUT",
        bucket: true,
        object: false,
        subresource: &[],
        input: &[
            m("ACL", H("x-amz-acl"), Str),
            m("CreateBucketConfiguration", Special, Str),
            m("GrantFullControl", H("x-amz-grant-full-control"), Str),
            m("GrantRead", H("x-amz-grant-read"), Str),
            m("GrantReadACP", H("x-amz-grant-read-acp"), Str),
            m("GrantWrite", H("x-amz-grant-write"), Str),
            m("GrantWriteACP", H("x-amz-grant-write-acp"), Str),
            m("ObjectLockEnabledForBucket", H("x-amz-bucket-object-lock-enabled"), Bool),
        ],
        body: false,
        output: &[("Location", Out::Header("Location", Shape::Str))],
    },
    S3Operation {
        name: "headBucket",
        method: "HEAD",
        bucket: true,
        object: false,
        subresource: &[],
        input: &[m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str)],
        body: false,
        output: &[],
    },
    S3Operation {
        name: "deleteBucket",
        method: "DELETE",
        bucket: true,
        object: false,
        subresource: &[],
        input: &[m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str)],
        body: false,
        output: &[],
    },
    S3Operation {
        name: "createMultipartUpload",
        method: "POST",
        bucket: true,
        object: true,
        subresource: &[("uploads", "")],
        input: OBJECT_WRITE_HEADERS,
        body: false,
        output: &[
            ("AbortDate", Out::Header("x-amz-abort-date", Shape::Time)),
            ("AbortRuleId", Out::Header("x-amz-abort-rule-id", Shape::Str)),
            ("ServerSideEncryption", Out::Header("x-amz-server-side-encryption", Shape::Str)),
            ("SSEKMSKeyId", Out::Header("x-amz-server-side-encryption-aws-kms-key-id", Shape::Str)),
            ("BucketKeyEnabled", Out::Header("x-amz-server-side-encryption-bucket-key-enabled", Shape::Bool)),
            ("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str)),
            ("", Out::Xml(&[("Bucket", Shape::Str), ("Key", Shape::Str), ("UploadId", Shape::Str)])),
        ],
    },
    S3Operation {
        name: "uploadPart",
        method: "PUT",
        bucket: true,
        object: true,
        subresource: &[],
        input: &[
            m("ContentLength", Ignored, Int),
            m("ContentMD5", H("Content-MD5"), Str),
            m("PartNumber", Q("partNumber"), Int),
            m("UploadId", Q("uploadId"), Str),
            m("RequestPayer", H("x-amz-request-payer"), Str),
            m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
        ],
        body: true,
        output: &[
            ("ServerSideEncryption", Out::Header("x-amz-server-side-encryption", Shape::Str)),
            ("ETag", Out::Header("ETag", Shape::Str)),
            ("SSEKMSKeyId", Out::Header("x-amz-server-side-encryption-aws-kms-key-id", Shape::Str)),
            ("BucketKeyEnabled", Out::Header("x-amz-server-side-encryption-bucket-key-enabled", Shape::Bool)),
            ("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str)),
        ],
    },
    S3Operation {
        name: "completeMultipartUpload",
        method: "POST",
        bucket: true,
        object: true,
        subresource: &[],
        input: &[
            m("MultipartUpload", Special, Str),
            m("UploadId", Q("uploadId"), Str),
            m("RequestPayer", H("x-amz-request-payer"), Str),
            m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
        ],
        body: false,
        output: &[
            ("Expiration", Out::Header("x-amz-expiration", Shape::Str)),
            ("ServerSideEncryption", Out::Header("x-amz-server-side-encryption", Shape::Str)),
            ("VersionId", Out::Header("x-amz-version-id", Shape::Str)),
            ("SSEKMSKeyId", Out::Header("x-amz-server-side-encryption-aws-kms-key-id", Shape::Str)),
            ("BucketKeyEnabled", Out::Header("x-amz-server-side-encryption-bucket-key-enabled", Shape::Bool)),
            ("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str)),
            (
                "",
                Out::Xml(&[
                    ("Location", Shape::Str),
                    ("Bucket", Shape::Str),
                    ("Key", Shape::Str),
                    ("ETag", Shape::Str),
                ]),
            ),
        ],
    },
    S3Operation {
        name: "abortMultipartUpload",
        method: "DELETE",
        bucket: true,
        object: true,
        subresource: &[],
        input: &[
            m("UploadId", Q("uploadId"), Str),
            m("RequestPayer", H("x-amz-request-payer"), Str),
            m("ExpectedBucketOwner", H("x-amz-expected-bucket-owner"), Str),
        ],
        body: false,
        output: &[("RequestCharged", Out::Header("x-amz-request-charged", Shape::Str))],
    },
];

/// Members every operation names as required besides `Bucket`/`Key`.
fn required(op: &S3Operation) -> &'static [&'static str] {
    match op.name {
        "uploadPart" => &["PartNumber", "UploadId"],
        "completeMultipartUpload" | "abortMultipartUpload" => &["UploadId"],
        _ => &[],
    }
}

/// A timestamp input (a `Date` crosses as its ISO string; aws-sdk reads numbers as epoch seconds).
fn timestamp(value: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    match value {
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .map(|time| time.with_timezone(&chrono::Utc))
            .or_else(|_| chrono::DateTime::parse_from_rfc2822(text).map(|time| time.with_timezone(&chrono::Utc)))
            .ok(),
        Value::Number(number) => {
            number.as_f64().and_then(|seconds| chrono::DateTime::from_timestamp_millis((seconds * 1000.0) as i64))
        }
        _ => None,
    }
}

/// The text of an input member, checked as aws-sdk's param validator does.
fn member_text(member: &Member, value: &Value, in_query: bool) -> Result<String, AwsError> {
    let path = format!("params.{}", member.name);
    match member.kind {
        Str => value.as_str().map(str::to_string).ok_or_else(|| AwsError::invalid_type(&path, "a string")),
        Int => value
            .as_f64()
            .filter(|n| n.is_finite())
            .map(crate::js::number_to_string)
            .ok_or_else(|| AwsError::invalid_type(&path, "a number")),
        Bool => value.as_bool().map(|b| b.to_string()).ok_or_else(|| AwsError::invalid_type(&path, "a boolean")),
        Time | IsoTime => {
            let time = timestamp(value)
                .ok_or_else(|| AwsError::invalid_type(&path, "a Date object, ISO-8601 string, or a UNIX timestamp"))?;
            Ok(if member.kind == IsoTime || in_query {
                time.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            } else {
                time.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
            })
        }
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// The XML payload of `createBucket` / `completeMultipartUpload`.
fn xml_payload(config: &ClientConfig, op: &S3Operation, params: &Map<String, Value>) -> Result<Vec<u8>, AwsError> {
    match op.name {
        "createBucket" => {
            // aws-sdk adds the client's region as the LocationConstraint outside us-east-1.
            let constraint = match params.get("CreateBucketConfiguration") {
                Some(Value::Object(configuration)) => match configuration.get("LocationConstraint") {
                    Some(Value::String(location)) => Some(location.clone()),
                    None | Some(Value::Null) => None,
                    Some(_) => {
                        return Err(AwsError::invalid_type(
                            "params.CreateBucketConfiguration.LocationConstraint",
                            "a string",
                        ))
                    }
                },
                Some(Value::Null) | None if config.region != "us-east-1" => Some(config.region.clone()),
                Some(Value::Null) | None => None,
                Some(_) => return Err(AwsError::invalid_type("params.CreateBucketConfiguration", "a structure")),
            };
            Ok(match constraint {
                Some(location) => format!(
                    "<CreateBucketConfiguration xmlns=\"{S3_XMLNS}\"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                    xml_escape(&location)
                )
                .into_bytes(),
                None => Vec::new(),
            })
        }
        "completeMultipartUpload" => {
            let parts = match params.get("MultipartUpload") {
                Some(Value::Object(upload)) => match upload.get("Parts") {
                    Some(Value::Array(parts)) => parts.clone(),
                    None | Some(Value::Null) => Vec::new(),
                    Some(_) => return Err(AwsError::invalid_type("params.MultipartUpload.Parts", "an Array")),
                },
                None | Some(Value::Null) => Vec::new(),
                Some(_) => return Err(AwsError::invalid_type("params.MultipartUpload", "a structure")),
            };
            let mut xml = format!("<CompleteMultipartUpload xmlns=\"{S3_XMLNS}\">");
            for (index, part) in parts.iter().enumerate() {
                let etag = part.get("ETag").and_then(Value::as_str);
                let number = part.get("PartNumber").and_then(Value::as_f64);
                let (Some(etag), Some(number)) = (etag, number) else {
                    return Err(AwsError::invalid_type(
                        &format!("params.MultipartUpload.Parts[{index}]"),
                        "a structure with ETag and PartNumber",
                    ));
                };
                xml.push_str(&format!(
                    "<Part><ETag>{}</ETag><PartNumber>{}</PartNumber></Part>",
                    xml_escape(etag),
                    crate::js::number_to_string(number)
                ));
            }
            xml.push_str("</CompleteMultipartUpload>");
            Ok(xml.into_bytes())
        }
        _ => Ok(Vec::new()),
    }
}

/// The HTTP request of an S3 operation.
fn build_s3_request(
    config: &ClientConfig,
    op: &S3Operation,
    params: &Map<String, Value>,
    body: Option<Vec<u8>>,
) -> Result<HttpRequest, AwsError> {
    let required_text = |name: &str| -> Result<String, AwsError> {
        match params.get(name) {
            None | Some(Value::Null) => Err(AwsError::missing(name)),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(_) => Err(AwsError::invalid_type(&format!("params.{name}"), "a string")),
        }
    };
    let bucket = if op.bucket { Some(required_text("Bucket")?) } else { None };
    let key = if op.object { Some(required_text("Key")?) } else { None };
    if bucket.as_deref() == Some("") {
        return Err(AwsError::new(
            "InvalidParameter",
            "Expected uri parameter to have length >= 1, but found \"\" for params.Bucket",
        ));
    }
    if key.as_deref() == Some("") {
        return Err(AwsError::new(
            "InvalidParameter",
            "Expected uri parameter to have length >= 1, but found \"\" for params.Key",
        ));
    }
    for name in required(op) {
        if matches!(params.get(*name), None | Some(Value::Null)) {
            return Err(AwsError::missing(name));
        }
    }
    let mut signed_headers = Vec::new();
    let mut headers = Vec::new();
    let mut query: Vec<(String, String)> =
        op.subresource.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
    for (name, value) in params {
        if value.is_null() || name == "Bucket" || name == "Key" || (name == "Body" && op.body) {
            continue;
        }
        let Some(member) = op.input.iter().find(|member| member.name == name) else {
            return Err(AwsError::new("UnexpectedParameter", format!("Unexpected key '{name}' found in params")));
        };
        match member.place {
            H(header_name) => {
                let text = member_text(member, value, false)?;
                let header_name = header_name.to_ascii_lowercase();
                if header_name.starts_with("x-amz-") || header_name == "content-md5" {
                    signed_headers.push((header_name, text));
                } else {
                    headers.push((header_name, text));
                }
            }
            Q(query_name) => query.push((query_name.to_string(), member_text(member, value, true)?)),
            Metadata => {
                let Some(map) = value.as_object() else {
                    return Err(AwsError::invalid_type("params.Metadata", "a map"));
                };
                for (key, value) in map {
                    let Some(text) = value.as_str() else {
                        return Err(AwsError::invalid_type(&format!("params.Metadata['{key}']"), "a string"));
                    };
                    signed_headers.push((format!("x-amz-meta-{}", key.to_ascii_lowercase()), text.to_string()));
                }
            }
            Special | Ignored => {}
        }
    }
    let body = if op.body { body.unwrap_or_default() } else { xml_payload(config, op, params)? };
    // Where the bucket goes: the host (virtual-hosted), or the path.
    let mut url = config.endpoint_url("s3")?;
    let base_path = url.path().trim_end_matches('/').to_string();
    let mut path = base_path;
    if let Some(bucket) = &bucket {
        let path_style = config.force_path_style
            || (!config.bucket_endpoint
                && (!dns_compatible_bucket(bucket) || (config.ssl_enabled && bucket.contains('.'))));
        if path_style {
            path.push('/');
            path.push_str(&uri_escape(bucket));
        } else if !config.bucket_endpoint {
            let host = format!("{bucket}.{}", url.host_str().unwrap_or_default());
            url.set_host(Some(&host))
                .map_err(|_| AwsError::new("InvalidEndpoint", format!("Invalid bucket host: {host}")))?;
        }
    }
    path.push('/');
    if let Some(key) = &key {
        path.push_str(&uri_escape_path(key));
    }
    query.sort();
    let query_text = query
        .iter()
        .map(|(name, value)| {
            if value.is_empty() && op.subresource.iter().any(|(n, _)| n == name) {
                uri_escape(name)
            } else {
                format!("{}={}", uri_escape(name), uri_escape(value))
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    let mut text = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        text.push_str(&format!(":{port}"));
    }
    text.push_str(&path);
    if !query_text.is_empty() {
        text.push('?');
        text.push_str(&query_text);
    }
    let url =
        url::Url::parse(&text).map_err(|_| AwsError::new("InvalidEndpoint", format!("Invalid request URL: {text}")))?;
    let hostname = url.host_str().unwrap_or_default().to_string();
    Ok(HttpRequest { method: op.method, url, hostname, signed_headers, headers, body, service: "s3" })
}

// ---------------------------------------------------------------- S3 answers

fn time_text(text: &str) -> Value {
    let parsed = chrono::DateTime::parse_from_rfc2822(text)
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(text))
        .map(|time| time.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    Value::String(parsed.unwrap_or_else(|_| text.to_string()))
}

/// A header or XML text as the shape says.
fn scalar(shape: Shape, text: &str) -> Value {
    match shape {
        Shape::Int => text.trim().parse::<i64>().map(Value::from).unwrap_or(Value::Null),
        Shape::Bool => Value::Bool(text.trim() == "true"),
        Shape::Time => time_text(text.trim()),
        _ => Value::String(text.to_string()),
    }
}

fn xml_value(node: roxmltree::Node<'_, '_>, shape: Shape) -> Value {
    match shape {
        Shape::Struct(members) => Value::Object(xml_members(node, members)),
        Shape::List(item) => Value::Array(
            node.children().filter(|child| child.is_element()).map(|child| xml_value(child, *item)).collect(),
        ),
        Shape::FlatList(item) => xml_value(node, *item),
        scalar_shape => scalar(scalar_shape, node.text().unwrap_or_default()),
    }
}

fn xml_members(node: roxmltree::Node<'_, '_>, members: &[(&str, Shape)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, shape) in members {
        let mut found = node.children().filter(|child| child.is_element() && child.tag_name().name() == *name);
        match shape {
            Shape::FlatList(_) => {
                out.insert(name.to_string(), Value::Array(found.map(|child| xml_value(child, *shape)).collect()));
            }
            Shape::List(_) => {
                let value = found.next().map(|child| xml_value(child, *shape)).unwrap_or_else(|| json!([]));
                out.insert(name.to_string(), value);
            }
            _ => {
                if let Some(child) = found.next() {
                    out.insert(name.to_string(), xml_value(child, *shape));
                }
            }
        }
    }
    out
}

fn read_s3_output(op: &S3Operation, response: &FetchResponse) -> Result<Value, AwsError> {
    let mut out = Map::new();
    let text = String::from_utf8_lossy(&response.body);
    let document = if op.output.iter().any(|(_, out)| matches!(out, Out::Xml(_))) && !text.trim().is_empty() {
        Some(roxmltree::Document::parse(&text).map_err(|e| AwsError::new("XMLParserError", e.to_string()))?)
    } else {
        None
    };
    for (name, source) in op.output {
        match source {
            Out::Header(header_name, shape) => {
                if let Some(value) = header(response, header_name) {
                    out.insert(name.to_string(), scalar(*shape, value));
                }
            }
            Out::Metadata => {
                let metadata: Map<String, Value> = response
                    .headers
                    .iter()
                    .filter_map(|(key, value)| {
                        let key = key.to_ascii_lowercase();
                        key.strip_prefix("x-amz-meta-").map(|name| (name.to_string(), Value::String(value.clone())))
                    })
                    .collect();
                out.insert(name.to_string(), Value::Object(metadata));
            }
            Out::Xml(members) => {
                if let Some(document) = &document {
                    out.extend(xml_members(document.root_element(), members));
                }
            }
            Out::Body => {
                out.insert(name.to_string(), json!(base64::engine::general_purpose::STANDARD.encode(&response.body)));
            }
        }
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------- Kinesis

/// The Kinesis operations the facade offers (JSON protocol target names).
const KINESIS_OPERATIONS: &[&str] = &[
    "CreateStream",
    "DeleteStream",
    "DescribeStream",
    "DescribeStreamSummary",
    "GetRecords",
    "GetShardIterator",
    "ListShards",
    "ListStreams",
    "PutRecord",
    "PutRecords",
];

fn lower_first(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> ClientConfig {
        let mut base = json!({"accessKeyId": "AKIDEXAMPLE", "secretAccessKey": "SECRET", "region": "us-west-1"});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ClientConfig::from_json(Some(&base), "us-east-1").unwrap()
    }

    fn op(name: &str) -> &'static S3Operation {
        S3_OPERATIONS.iter().find(|op| op.name == name).unwrap()
    }

    fn params(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn buckets_go_where_aws_sdk_puts_them() {
        let put = |cfg: Value, bucket: &str, key: &str| {
            build_s3_request(&config(cfg), op("putObject"), &params(json!({"Bucket": bucket, "Key": key})), None)
                .unwrap()
                .url
                .to_string()
        };
        assert_eq!(
            put(json!({}), "my-bucket", "a/b c+d.txt"),
            "https://my-bucket.s3.us-west-1.amazonaws.com/a/b%20c%2Bd.txt"
        );
        assert_eq!(put(json!({"region": "us-east-1"}), "my-bucket", "k"), "https://my-bucket.s3.amazonaws.com/k");
        // A dot in the name under TLS, or a name that is not DNS-compatible: path style.
        assert_eq!(put(json!({}), "my.bucket", "k"), "https://s3.us-west-1.amazonaws.com/my.bucket/k");
        assert_eq!(put(json!({}), "My_Bucket", "k"), "https://s3.us-west-1.amazonaws.com/My_Bucket/k");
        let local = json!({"endpoint": "http://127.0.0.1:9000", "s3ForcePathStyle": true});
        assert_eq!(put(local, "bucket", "2021-01-01/x.jsonl.gz"), "http://127.0.0.1:9000/bucket/2021-01-01/x.jsonl.gz");
        // Without path style a custom endpoint gets the bucket as a subdomain, as aws-sdk does.
        assert_eq!(put(json!({"endpoint": "http://localhost:9000"}), "bucket", "k"), "http://bucket.localhost:9000/k");
        // s3BucketEndpoint: the endpoint is the bucket's own.
        let own = json!({"endpoint": "https://bucket.example.com", "s3BucketEndpoint": true});
        assert_eq!(put(own, "bucket", "k"), "https://bucket.example.com/k");
        assert_eq!(
            put(json!({"endpoint": "minio.local:9000", "sslEnabled": false, "s3ForcePathStyle": true}), "b-1", "k"),
            "http://minio.local:9000/b-1/k"
        );
        assert_eq!(
            put(json!({"endpoint": "http://127.0.0.1:9000/prefix/", "s3ForcePathStyle": true}), "b-1", "k!'()*"),
            "http://127.0.0.1:9000/prefix/b-1/k%21%27%28%29%2A"
        );
    }

    #[test]
    fn params_are_checked_as_aws_sdk_checks_them() {
        let cfg = config(json!({}));
        let error = |op_name: &str, p: Value| build_s3_request(&cfg, op(op_name), &params(p), None).unwrap_err().fields;
        assert_eq!(error("putObject", json!({"Bucket": "b"}))["message"], "Missing required key 'Key' in params");
        assert_eq!(error("putObject", json!({"Bucket": "b"}))["code"], "MissingRequiredParameter");
        assert_eq!(
            error("putObject", json!({"Bucket": 1, "Key": "k"}))["message"],
            "Expected params.Bucket to be a string"
        );
        assert_eq!(
            error("putObject", json!({"Bucket": "b", "Key": "k", "Nope": 1}))["message"],
            "Unexpected key 'Nope' found in params"
        );
        assert_eq!(
            error("uploadPart", json!({"Bucket": "b", "Key": "k", "UploadId": "u"}))["message"],
            "Missing required key 'PartNumber' in params"
        );
        let request = build_s3_request(
            &cfg,
            op("putObject"),
            &params(json!({"Bucket": "b", "Key": "k", "ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "key-1",
                "ContentType": "application/json", "Metadata": {"Team": "2"}})),
            Some(b"{}".to_vec()),
        )
        .unwrap();
        assert_eq!(
            request.signed_headers,
            vec![
                ("x-amz-server-side-encryption".to_string(), "aws:kms".to_string()),
                ("x-amz-server-side-encryption-aws-kms-key-id".into(), "key-1".into()),
                ("x-amz-meta-team".into(), "2".into()),
            ]
        );
        assert_eq!(request.headers, vec![("content-type".to_string(), "application/json".to_string())]);
        let list = build_s3_request(
            &cfg,
            op("listObjectsV2"),
            &params(json!({"Bucket": "bkt", "Prefix": "2021/", "MaxKeys": 5})),
            None,
        )
        .unwrap();
        assert_eq!(list.url.as_str(), "https://bkt.s3.us-west-1.amazonaws.com/?list-type=2&max-keys=5&prefix=2021%2F");
        // A one-letter name is not DNS-compatible: path style.
        let create =
            build_s3_request(&cfg, op("createMultipartUpload"), &params(json!({"Bucket": "b", "Key": "k"})), None)
                .unwrap();
        assert_eq!(create.url.as_str(), "https://s3.us-west-1.amazonaws.com/b/k?uploads");
        let bucket = build_s3_request(&cfg, op("createBucket"), &params(json!({"Bucket": "b"})), None).unwrap();
        assert_eq!(
            String::from_utf8(bucket.body).unwrap(),
            format!("<CreateBucketConfiguration xmlns=\"{S3_XMLNS}\"><LocationConstraint>us-west-1</LocationConstraint></CreateBucketConfiguration>")
        );
    }

    /// The example of AWS's "Signature Calculations for the Authorization Header" (S3, GET
    /// Object with a Range header), whose signature AWS publishes.
    #[test]
    fn signatures_match_aws_published_example() {
        let cfg = ClientConfig::from_json(
            Some(&json!({"accessKeyId": "AKIAIOSFODNN7EXAMPLE", "secretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "region": "us-east-1"})),
            "us-east-1",
        )
        .unwrap();
        let mut request = build_s3_request(
            &cfg,
            op("getObject"),
            &params(json!({"Bucket": "examplebucket", "Key": "test.txt"})),
            None,
        )
        .unwrap();
        request.signed_headers.push(("range".into(), "bytes=0-9".into()));
        let time = chrono::DateTime::parse_from_rfc3339("2013-05-24T00:00:00Z").unwrap();
        let signed = sign(&cfg, &request, Signing::S3, SystemTime::from(time)).unwrap();
        let authorization = signed.headers.iter().find(|(name, _)| name == "authorization").unwrap().1.clone();
        assert_eq!(
            authorization,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> FetchResponse {
        FetchResponse {
            status,
            status_text: String::new(),
            url: String::new(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn answers_read_as_aws_sdk_reads_them() {
        let list = response(
            200,
            &[],
            r#"<?xml version="1.0" encoding="utf-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>false</IsTruncated><Contents><Key>a/b c+d.txt</Key><LastModified>2026-12-06T20:55:51.000Z</LastModified><ETag>&#34;5d41402abc4b2a76b9719d911017c592&#34;</ETag><Size>5</Size><StorageClass>STANDARD</StorageClass></Contents><Name>testbucket</Name><Prefix/><MaxKeys>1000</MaxKeys><KeyCount>1</KeyCount></ListBucketResult>"#,
        );
        // What aws-sdk 2.927.0 on Node 20 gives for the same answer.
        assert_eq!(
            read_s3_output(op("listObjectsV2"), &list).unwrap().to_string(),
            r#"{"IsTruncated":false,"Contents":[{"Key":"a/b c+d.txt","LastModified":"2026-12-06T20:55:51.000Z","ETag":"\"5d41402abc4b2a76b9719d911017c592\"","Size":5,"StorageClass":"STANDARD"}],"Name":"testbucket","Prefix":"","MaxKeys":1000,"CommonPrefixes":[],"KeyCount":1}"#
        );
        let get = response(
            200,
            &[
                ("accept-ranges", "bytes"),
                ("last-modified", "Sun, 06 Dec 2026 20:55:51 GMT"),
                ("content-length", "5"),
                ("etag", "\"5d41402abc4b2a76b9719d911017c592\""),
                ("content-type", "application/octet-stream"),
            ],
            "hello",
        );
        assert_eq!(
            read_s3_output(op("getObject"), &get).unwrap().to_string(),
            r#"{"AcceptRanges":"bytes","LastModified":"2026-12-06T20:55:51.000Z","ContentLength":5,"ETag":"\"5d41402abc4b2a76b9719d911017c592\"","ContentType":"application/octet-stream","Metadata":{},"Body":"aGVsbG8="}"#
        );
        let missing = response(
            404,
            &[("x-amz-request-id", "R1")],
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>missing</BucketName><RequestId>R1</RequestId></Error>",
        );
        assert_eq!(
            Value::Object(s3_error(&missing).fields).to_string(),
            r#"{"message":"The specified bucket does not exist","code":"NoSuchBucket","region":null,"requestId":"R1","statusCode":404,"retryable":false}"#
        );
        let head = s3_error(&response(404, &[], ""));
        assert_eq!(
            Value::Object(head.fields).to_string(),
            r#"{"message":null,"code":"NotFound","region":null,"statusCode":404,"retryable":false}"#
        );
        assert!(s3_error(&response(503, &[], "<Error><Code>SlowDown</Code></Error>")).retryable());
    }

    #[test]
    fn unreachable_hosts_read_as_aws_sdk_2927_on_node() {
        let cfg = config(json!({"endpoint": "http://127.0.0.1:9", "s3ForcePathStyle": true}));
        let request =
            build_s3_request(&cfg, op("putObject"), &params(json!({"Bucket": "b", "Key": "k"})), None).unwrap();
        let refused = FetchError {
            message: "request to http://127.0.0.1:9/b/k failed, reason: connect ECONNREFUSED 127.0.0.1:9".into(),
            kind: Some("system".into()),
            code: Some("ECONNREFUSED".into()),
        };
        assert_eq!(
            Value::Object(network_error(&cfg, &request, &refused, Duration::from_secs(5)).fields).to_string(),
            concat!(
                r#"{"message":"Inaccessible host: `127.0.0.1'. This service may not be available in the `us-west-1' region.","#,
                r#""code":"UnknownEndpoint","region":"us-west-1","hostname":"127.0.0.1","retryable":true,"originalError":"#,
                r#"{"message":"connect ECONNREFUSED 127.0.0.1:9","errno":-111,"code":"NetworkingError","syscall":"connect","#,
                r#""address":"127.0.0.1","port":9,"region":"us-west-1","hostname":"127.0.0.1","retryable":true}}"#
            )
        );
    }

    #[test]
    fn dns_compatible_names() {
        for name in ["bucket", "my-bucket", "my.bucket", "b12"] {
            assert!(dns_compatible_bucket(name), "{name}");
        }
        for name in ["ab", "Bucket", "-bucket", "bucket-", "my..bucket", "my_bucket", "192.168.1.1"] {
            assert!(!dns_compatible_bucket(name), "{name}");
        }
    }
}
