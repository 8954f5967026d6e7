//! The HTTP client behind the sandbox's `fetch` / `node-fetch`: one shared reqwest client, with a
//! bounded response body and a bounded time, so a plugin cannot exhaust the server's memory or
//! hold a connection forever.

use std::sync::OnceLock;
use std::time::Duration;

use super::super::MetaError;

/// Largest response body handed to a plugin.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Longest a single request may take (connect + headers + body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A request as the plugin made it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FetchRequest {
    pub url: String,
    /// Upper-case method (`GET` when the plugin gave none).
    pub method: String,
    /// Header pairs, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// What the plugin's `Response` is built from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FetchResponse {
    pub status: u16,
    pub status_text: String,
    /// The final URL (after redirects).
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

fn client() -> Result<&'static reqwest::Client, MetaError> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .user_agent("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| MetaError::named("FetchError", e.clone()))
}

/// Performs `request` over the network (the default of `MetaBindings::fetch`). Errors carry
/// node-fetch's `FetchError` name and a `request to <url> failed, reason: …` message.
pub async fn http_fetch(request: FetchRequest) -> Result<FetchResponse, MetaError> {
    let failed =
        |reason: String| MetaError::named("FetchError", format!("request to {} failed, reason: {reason}", request.url));
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|e| failed(e.to_string()))?;
    let mut builder = client()?.request(method, &request.url);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    if let Some(body) = &request.body {
        builder = builder.body(body.clone());
    }
    let mut response = builder.send().await.map_err(|e| failed(e.to_string()))?;
    let status = response.status();
    let url = response.url().to_string();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(e.to_string()))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(failed(format!("content size over limit: {MAX_RESPONSE_BYTES}")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(FetchResponse {
        status: status.as_u16(),
        status_text: status.canonical_reason().unwrap_or("").to_string(),
        url,
        headers,
        body,
    })
}
