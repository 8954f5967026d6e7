//! The plugins' network reach: the HTTP client behind the sandbox's `fetch` / `node-fetch` and
//! `posthog.api`, and the policy it enforces.
//!
//! Owns:
//! * the network policy: loopback, private (RFC 1918, CGNAT, IPv6 ULA), link-local, multicast,
//!   unspecified, reserved and cloud-metadata destinations are refused unless the operator sets
//!   `ALLOW_INTERNAL_IPS` (the default in dev/test, as in PostHog's later servers). The check runs
//!   on the *resolved* addresses (a reqwest DNS resolver, so a name that re-resolves to an
//!   internal address at connect time is still refused) and on every redirect hop (redirects are
//!   followed here, not by reqwest). The configured PostHog host (`SITE_URL`) is always reachable;
//! * node-fetch v2's behaviour: its redirect rules (`follow`, `redirect: 'manual' | 'error'`,
//!   303 → GET, credentials dropped on a cross-host hop), its `timeout` and `size` options, and its
//!   `FetchError` messages, `type`s and `code`s (`request to URL failed, reason: connect
//!   ECONNREFUSED 127.0.0.1:9`, `getaddrinfo ENOTFOUND host`, `maximum redirect reached at: URL`, …);
//! * the bounds: a response body over `PLUGIN_FETCH_MAX_RESPONSE_BYTES` is an error and is never
//!   buffered whole; all bodies being read at once share `PLUGIN_FETCH_BUFFER_MAX_BYTES` (a body
//!   that would go past it fails), so many concurrent fetches cannot exhaust memory either; a
//!   request never takes longer than [`REQUEST_TIMEOUT`].
//!
//! Errors cross to JS as a [`MetaError`] named `FetchError[type,code]` (the VM boundary carries a
//! name and a message only); `prelude.js` turns that into a node-fetch `FetchError` with `type`,
//! `errno` and `code`.
//!
//! The settings are process-wide ([`configure`], called once at start-up from the server config);
//! an unconfigured process uses the defaults of its `NODE_ENV`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::super::MetaError;
use crate::config::{Config, NodeEnv};

/// Default of `PLUGIN_FETCH_MAX_RESPONSE_BYTES`.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Default of `PLUGIN_FETCH_BUFFER_MAX_BYTES`.
pub const MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;
/// Default of `PLUGIN_MAX_HOST_CALLS_IN_FLIGHT`.
pub const MAX_HOST_CALLS_IN_FLIGHT: usize = 500;
/// Longest a single request may take, redirects and body included (node-fetch has no default
/// timeout; a plugin's `timeout` option can only shorten this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// node-fetch's default `follow`.
const DEFAULT_FOLLOW: u64 = 20;
/// The reference's `posthog.api` host.
pub const DEFAULT_POSTHOG_HOST: &str = "https://app.posthog.com";
/// The request header through which `prelude.js` passes node-fetch's options (`redirect`,
/// `follow`, `timeout`, `size`) as JSON; it is removed before the request is sent.
pub const OPTIONS_HEADER: &str = "x-plugin-server-fetch-options";
/// Names of cloud metadata services, refused whatever they resolve to.
const METADATA_NAMES: &[&str] = &["metadata.google.internal", "metadata.goog", "metadata", "instance-data"];

/// The network settings of the plugins (from the server config).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSettings {
    /// `ALLOW_INTERNAL_IPS`: internal destinations are reachable.
    pub allow_internal_ips: bool,
    /// The PostHog instance (`SITE_URL`, else the reference's `https://app.posthog.com`): the
    /// default `posthog.api` host, the only one the bot user's key is sent to, always reachable.
    pub posthog_host: String,
    /// `PLUGIN_FETCH_MAX_RESPONSE_BYTES`.
    pub max_response_bytes: usize,
    /// `PLUGIN_FETCH_BUFFER_MAX_BYTES`: response bytes all fetches together may hold while they
    /// read their bodies.
    pub max_buffered_bytes: usize,
    /// `PLUGIN_MAX_HOST_CALLS_IN_FLIGHT`: host calls (fetch, posthog.api, meta calls) one VM may
    /// have started and not yet seen settle.
    pub max_host_calls_in_flight: usize,
    /// TESTS ONLY (never set from the environment): host names resolved to these addresses and
    /// treated as public, so a test can stand a loopback server in for an internet host.
    pub test_public_hosts: Vec<(String, IpAddr)>,
}

impl NetworkSettings {
    /// The defaults of an environment: internal addresses allowed in dev and test only.
    pub fn defaults(node_env: NodeEnv) -> NetworkSettings {
        NetworkSettings {
            allow_internal_ips: node_env != NodeEnv::Production,
            posthog_host: DEFAULT_POSTHOG_HOST.to_string(),
            max_response_bytes: MAX_RESPONSE_BYTES,
            max_buffered_bytes: MAX_BUFFERED_BYTES,
            max_host_calls_in_flight: MAX_HOST_CALLS_IN_FLIGHT,
            test_public_hosts: Vec::new(),
        }
    }

    pub fn from_config(config: &Config) -> NetworkSettings {
        let posthog_host = config
            .SITE_URL
            .as_deref()
            .map(|site| site.trim_end_matches('/').to_string())
            .filter(|site| !site.is_empty())
            .unwrap_or_else(|| DEFAULT_POSTHOG_HOST.to_string());
        NetworkSettings {
            allow_internal_ips: config.ALLOW_INTERNAL_IPS,
            posthog_host,
            max_response_bytes: config.PLUGIN_FETCH_MAX_RESPONSE_BYTES,
            max_buffered_bytes: config.PLUGIN_FETCH_BUFFER_MAX_BYTES,
            max_host_calls_in_flight: config.PLUGIN_MAX_HOST_CALLS_IN_FLIGHT.max(1),
            test_public_hosts: Vec::new(),
        }
    }

    /// The PostHog host's origin (`scheme://host:port`), if it parses.
    pub fn posthog_origin(&self) -> Option<String> {
        url::Url::parse(&self.posthog_host).ok().map(|url| url.origin().ascii_serialization())
    }

    fn posthog_host_name(&self) -> Option<String> {
        url::Url::parse(&self.posthog_host).ok().and_then(|url| url.host_str().map(str::to_ascii_lowercase))
    }

    fn test_address(&self, host: &str) -> Option<IpAddr> {
        self.test_public_hosts
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(host))
            .map(|(_, ip)| *ip)
            .or_else(|| added_test_host(host))
    }
}

fn added_test_hosts() -> &'static RwLock<Vec<(String, IpAddr)>> {
    static HOSTS: OnceLock<RwLock<Vec<(String, IpAddr)>>> = OnceLock::new();
    HOSTS.get_or_init(RwLock::default)
}

fn added_test_host(host: &str) -> Option<IpAddr> {
    let hosts = added_test_hosts().read().ok()?;
    hosts.iter().find(|(name, _)| name.eq_ignore_ascii_case(host)).map(|(_, ip)| *ip)
}

/// TEST HOOK (never called by the server): like [`NetworkSettings::test_public_hosts`], but kept
/// across [`configure`], for tests that run the whole server in process (which configures the
/// network from its config) and need a name such as `x.redshift.amazonaws.com` to reach a local
/// service.
pub fn add_test_public_host(name: &str, ip: IpAddr) {
    if let Ok(mut hosts) = added_test_hosts().write() {
        hosts.retain(|(known, _)| !known.eq_ignore_ascii_case(name));
        hosts.push((name.to_string(), ip));
    }
}

fn settings_cell() -> &'static RwLock<Option<Arc<NetworkSettings>>> {
    static SETTINGS: OnceLock<RwLock<Option<Arc<NetworkSettings>>>> = OnceLock::new();
    SETTINGS.get_or_init(|| RwLock::new(None))
}

/// Sets the process-wide network settings (the server calls it once at start-up).
pub fn configure(settings: NetworkSettings) {
    if let Ok(mut cell) = settings_cell().write() {
        *cell = Some(Arc::new(settings));
    }
}

/// The settings in force: the configured ones, else those of this process's configuration
/// (`Config::from_env`, read once; production defaults if it does not parse).
pub fn settings() -> Arc<NetworkSettings> {
    if let Some(settings) = settings_cell().read().ok().and_then(|cell| cell.clone()) {
        return settings;
    }
    static UNCONFIGURED: OnceLock<Arc<NetworkSettings>> = OnceLock::new();
    UNCONFIGURED
        .get_or_init(|| {
            Arc::new(match Config::from_env() {
                Ok(config) => NetworkSettings::from_config(&config),
                Err(_) => NetworkSettings::defaults(NodeEnv::Production),
            })
        })
        .clone()
}

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

// ---------------------------------------------------------------- the policy

/// Why an address is not reachable under the policy, or `None` for a public address.
pub fn internal_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud metadata",
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, b, _) if (16..32).contains(&b) => "private",
        (100, b, _) if (64..128).contains(&b) => "carrier-grade NAT",
        (169, 254, _) => "link-local",
        (192, 0, 0) | (198, 18..=19, _) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "reserved",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    let embedded_v4 = |high: usize| {
        let [a, b] = segments[high].to_be_bytes();
        let [c, d] = segments[high + 1].to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some("cloud metadata");
    }
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
    // addresses reach the embedded IPv4 address; 6to4 (2002:ab:cd::) embeds one too.
    if segments[..5] == [0, 0, 0, 0, 0] && (segments[5] == 0xffff || segments[5] == 0) {
        return internal_v4(embedded_v4(6));
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return internal_v4(embedded_v4(6));
    }
    if segments[0] == 0x2002 {
        return internal_v4(embedded_v4(1));
    }
    Some(match segments[0] {
        s if s & 0xfe00 == 0xfc00 => "private (unique local)",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xffc0 == 0xfec0 => "site-local",
        s if s & 0xff00 == 0xff00 => "multicast",
        0x2001 if segments[1] == 0x0db8 => "reserved",
        _ => return None,
    })
}

/// A destination the policy refuses.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {ip}, a {reason} address")]
pub struct Refused {
    host: String,
    ip: String,
    reason: &'static str,
}

impl Refused {
    fn reason_text(&self) -> String {
        let address = if self.host == self.ip { self.ip.clone() } else { format!("{} ({})", self.host, self.ip) };
        format!(
            "refused to connect to {address}: {} addresses are not allowed for plugins (set ALLOW_INTERNAL_IPS=true to allow them)",
            self.reason
        )
    }
}

/// A name that did not resolve (node's `getaddrinfo ENOTFOUND host`).
#[derive(Debug, thiserror::Error)]
#[error("getaddrinfo {code} {host}")]
struct ResolveFailed {
    host: String,
    code: &'static str,
}

/// The last addresses each name resolved to, to name the address in connect errors as Node does.
fn resolved_cache() -> &'static Mutex<HashMap<String, SocketAddr>> {
    static CACHE: OnceLock<Mutex<HashMap<String, SocketAddr>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn remember(host: &str, address: SocketAddr) {
    if let Ok(mut cache) = resolved_cache().lock() {
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(host.to_ascii_lowercase(), address);
    }
}

/// The resolver of the plugins' client: every address a name resolves to must pass the policy.
struct PolicyResolver;

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            let settings = settings();
            resolve_checked(&settings, &host).await.map(|addresses| Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// Resolves `host` and applies the policy to every address.
async fn resolve_checked(
    settings: &NetworkSettings,
    host: &str,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(ip) = settings.test_address(host) {
        return Ok(vec![SocketAddr::new(ip, 0)]);
    }
    let trusted = settings.posthog_host_name().as_deref() == Some(host);
    if !settings.allow_internal_ips && !trusted && METADATA_NAMES.contains(&host) {
        return Err(Box::new(Refused { host: host.to_string(), ip: host.to_string(), reason: "cloud metadata" }));
    }
    let addresses: Vec<SocketAddr> = match tokio::net::lookup_host((host, 0)).await {
        Ok(found) => found.collect(),
        Err(error) => {
            let code = if error.to_string().contains("Temporary failure") { "EAI_AGAIN" } else { "ENOTFOUND" };
            return Err(Box::new(ResolveFailed { host: host.to_string(), code }));
        }
    };
    if addresses.is_empty() {
        return Err(Box::new(ResolveFailed { host: host.to_string(), code: "ENOTFOUND" }));
    }
    if !settings.allow_internal_ips && !trusted {
        // One internal address refuses the name: a round-robin of public and internal addresses
        // must not reach the internal one.
        for address in &addresses {
            if let Some(reason) = internal_reason(address.ip()) {
                return Err(Box::new(Refused { host: host.to_string(), ip: address.ip().to_string(), reason }));
            }
        }
    }
    if let Some(first) = addresses.first() {
        remember(host, *first);
    }
    Ok(addresses)
}

/// Resolves `host` for a plugin's connection that is not HTTP (the `pg` facade) under the same
/// policy as `fetch`: the addresses with `port`, or Node's message for the failure or the
/// refusal with its code (`ENOTFOUND`, [`REFUSED_CODE`]).
pub async fn resolve_for_plugin(host: &str, port: u16) -> Result<Vec<SocketAddr>, (String, &'static str)> {
    let settings = settings();
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    match resolve_checked(&settings, &host).await {
        Ok(addresses) => Ok(addresses.into_iter().map(|address| SocketAddr::new(address.ip(), port)).collect()),
        Err(error) => {
            if let Some(refused) = error.downcast_ref::<Refused>() {
                return Err((refused.reason_text(), REFUSED_CODE));
            }
            if let Some(failed) = error.downcast_ref::<ResolveFailed>() {
                return Err((failed.to_string(), failed.code));
            }
            Err((error.to_string(), "ENOTFOUND"))
        }
    }
}

/// The policy check of one hop whose host is an address literal (names are checked by the
/// resolver when the connection is made).
fn check_literal(settings: &NetworkSettings, url: &url::Url) -> Result<(), Refused> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    if settings.allow_internal_ips || Some(url.origin().ascii_serialization()) == settings.posthog_origin() {
        return Ok(());
    }
    match internal_reason(ip) {
        Some(reason) => Err(Refused { host: ip.to_string(), ip: ip.to_string(), reason }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------- errors

/// A node-fetch `FetchError` (or a `TypeError` node-fetch throws for a bad request).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub message: String,
    /// node-fetch's `type`: `system`, `max-redirect`, `no-redirect`, `invalid-redirect`,
    /// `max-size`, `request-timeout`, `body-timeout`; `None` for a `TypeError`.
    pub kind: Option<String>,
    /// `code` / `errno` of a `system` error (`ECONNREFUSED`, `ENOTFOUND`, ...).
    pub code: Option<String>,
}

impl FetchError {
    fn new(message: String, kind: &str, code: Option<&str>) -> FetchError {
        FetchError { message, kind: Some(kind.to_string()), code: code.map(str::to_string) }
    }

    fn type_error(message: &str) -> FetchError {
        FetchError { message: message.to_string(), kind: None, code: None }
    }

    /// A policy refusal of a request to `url`.
    pub fn refused(url: &str, reason: &str) -> FetchError {
        FetchError::new(format!("request to {url} failed, reason: {reason}"), "system", Some(REFUSED_CODE))
    }

    /// Whether the network policy refused the destination.
    pub fn is_refusal(&self) -> bool {
        self.code.as_deref() == Some(REFUSED_CODE)
    }
}

/// `code` of a policy refusal.
pub const REFUSED_CODE: &str = "ERR_PLUGIN_FETCH_REFUSED";

impl From<FetchError> for MetaError {
    fn from(error: FetchError) -> MetaError {
        match error.kind {
            None => MetaError::named("TypeError", error.message),
            Some(kind) => {
                MetaError::named(format!("FetchError[{kind},{}]", error.code.unwrap_or_default()), error.message)
            }
        }
    }
}

/// The node-fetch error of a failed exchange with `url` (`host`/`port` for connect messages).
fn exchange_error(
    url: &url::Url,
    error: &reqwest::Error,
    timeout: Duration,
    started: std::time::Instant,
) -> FetchError {
    let failed = |reason: String, code: &str| {
        FetchError::new(format!("request to {url} failed, reason: {reason}"), "system", Some(code))
    };
    if error.is_timeout() || started.elapsed() >= timeout {
        return FetchError::new(format!("network timeout at: {url}"), "request-timeout", None);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut texts = Vec::new();
    while let Some(current) = source {
        if let Some(refused) = current.downcast_ref::<Refused>() {
            return failed(refused.reason_text(), REFUSED_CODE);
        }
        if let Some(unresolved) = current.downcast_ref::<ResolveFailed>() {
            return failed(unresolved.to_string(), unresolved.code);
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if let Some(code) = io_code(io) {
                let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                let port = url.port_or_known_default().unwrap_or(80);
                let address = match host.parse::<IpAddr>() {
                    Ok(ip) => SocketAddr::new(ip, port).to_string(),
                    Err(_) => resolved_cache()
                        .lock()
                        .ok()
                        .and_then(|cache| cache.get(&host.to_ascii_lowercase()).map(|a| SocketAddr::new(a.ip(), port)))
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| format!("{host}:{port}")),
                };
                if code == "ECONNRESET" {
                    return failed("socket hang up".into(), code);
                }
                return failed(format!("connect {code} {address}"), code);
            }
        }
        texts.push(current.to_string());
        source = current.source();
    }
    let all = texts.join(": ");
    if let Some((reason, code)) = tls_error(&all, url) {
        return failed(reason, code);
    }
    if all.contains("connection closed before message completed") || all.contains("connection reset") {
        return failed("socket hang up".into(), "ECONNRESET");
    }
    failed(texts.last().cloned().unwrap_or(all), "EPROTO")
}

fn io_code(error: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    Some(match error.kind() {
        ErrorKind::ConnectionRefused => "ECONNREFUSED",
        ErrorKind::TimedOut => "ETIMEDOUT",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => "ECONNRESET",
        ErrorKind::HostUnreachable => "EHOSTUNREACH",
        ErrorKind::NetworkUnreachable => "ENETUNREACH",
        ErrorKind::AddrNotAvailable => "EADDRNOTAVAIL",
        _ => return None,
    })
}

/// Node's text and code for a certificate failure reported by OpenSSL (through native-tls).
fn tls_error(text: &str, url: &url::Url) -> Option<(String, &'static str)> {
    node_tls_error(text, url.host_str().unwrap_or_default())
}

/// Node's message and `code` for a TLS failure OpenSSL described as `text` (connecting to
/// `host`), for the certificate failures plugins commonly meet; `None` for the others.
pub fn node_tls_error(text: &str, host: &str) -> Option<(String, &'static str)> {
    let lower = text.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    Some(
        if has("self-signed certificate in certificate chain") || has("self signed certificate in certificate chain") {
            ("self-signed certificate in certificate chain".into(), "SELF_SIGNED_CERT_IN_CHAIN")
        } else if has("self-signed certificate") || has("self signed certificate") {
            ("self-signed certificate".into(), "DEPTH_ZERO_SELF_SIGNED_CERT")
        } else if has("certificate has expired") {
            ("certificate has expired".into(), "CERT_HAS_EXPIRED")
        } else if has("unable to get local issuer certificate") {
            ("unable to get local issuer certificate".into(), "UNABLE_TO_GET_ISSUER_CERT_LOCALLY")
        } else if has("unable to verify the first certificate") {
            ("unable to verify the first certificate".into(), "UNABLE_TO_VERIFY_LEAF_SIGNATURE")
        } else if has("hostname mismatch") || has("ip address mismatch") {
            (
                format!(
                    "Hostname/IP does not match certificate's altnames: Host: {host}. is not in the cert's altnames"
                ),
                "ERR_TLS_CERT_ALTNAME_INVALID",
            )
        } else if has("certificate verify failed") {
            ("unable to verify the first certificate".into(), "UNABLE_TO_VERIFY_LEAF_SIGNATURE")
        } else {
            return None;
        },
    )
}

// ---------------------------------------------------------------- the request

/// Response bytes held by all fetches reading their bodies.
static BUFFERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One fetch's share of [`BUFFERED`], given back when the body is handed over or dropped.
struct Reservation(usize);

impl Reservation {
    /// Takes `bytes` more, unless that would pass `max`.
    fn grow(&mut self, bytes: usize, max: usize) -> bool {
        use std::sync::atomic::Ordering;
        let before = BUFFERED.fetch_add(bytes, Ordering::SeqCst);
        if before.saturating_add(bytes) > max {
            BUFFERED.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        self.0 += bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(self.0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// node-fetch's options that change how a request is made (passed in [`OPTIONS_HEADER`]).
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct Options {
    /// `follow` (default 20), `manual`, `error`.
    redirect: Option<String>,
    follow: Option<f64>,
    /// Milliseconds; 0 = none.
    timeout: Option<f64>,
    /// Largest body in bytes; 0 = no limit (ours still applies).
    size: Option<f64>,
}

/// The plugins' HTTP client: node-fetch decompresses gzip bodies (`decompress`), SDK clients
/// such as aws-sdk hand the bytes over as stored (the other client).
fn client(decompress: bool) -> Result<&'static reqwest::Client, FetchError> {
    static CLIENTS: OnceLock<[Result<reqwest::Client, reqwest::Error>; 2]> = OnceLock::new();
    let build = |decompress: bool| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // node-fetch ignores HTTP(S)_PROXY; a proxy would also resolve names past the policy.
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver))
            .gzip(decompress)
            .user_agent("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)")
            .build()
    };
    CLIENTS.get_or_init(|| [build(false), build(true)])[usize::from(decompress)]
        .as_ref()
        .map_err(|e| FetchError::new(format!("could not build the HTTP client: {e}"), "system", Some("EPROTO")))
}

/// Performs `request` over the network under the process's [`settings`] (the default of
/// `MetaBindings::fetch`).
pub async fn http_fetch(request: FetchRequest) -> Result<FetchResponse, MetaError> {
    fetch_with(&settings(), request).await.map_err(MetaError::from)
}

/// Performs `request` under `settings`, following redirects as node-fetch v2 does.
pub async fn fetch_with(settings: &NetworkSettings, request: FetchRequest) -> Result<FetchResponse, FetchError> {
    fetch_inner(settings, request, true).await
}

/// Performs `request` under `settings` for a host-side SDK (`plugins/extensions/aws.rs`): the
/// same policy, bounds and errors as [`fetch_with`], but the body is handed over as the server
/// sent it (a `Content-Encoding: gzip` object stays compressed, as with aws-sdk).
pub async fn fetch_undecoded(settings: &NetworkSettings, request: FetchRequest) -> Result<FetchResponse, FetchError> {
    fetch_inner(settings, request, false).await
}

async fn fetch_inner(
    settings: &NetworkSettings,
    request: FetchRequest,
    decompress: bool,
) -> Result<FetchResponse, FetchError> {
    let started = std::time::Instant::now();
    let FetchRequest { url, method, headers, body } = request;
    let mut options = Options::default();
    let mut headers: Vec<(String, String)> = headers
        .into_iter()
        .filter(|(name, value)| {
            if name.eq_ignore_ascii_case(OPTIONS_HEADER) {
                options = serde_json::from_str(value).unwrap_or_default();
                false
            } else {
                true
            }
        })
        .collect();
    let mut url = match url::Url::parse(&url) {
        Ok(url) => url,
        Err(_) => return Err(FetchError::type_error("Only absolute URLs are supported")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::type_error("Only HTTP(S) protocols are supported"));
    }
    let timeout = match options.timeout {
        Some(ms) if ms.is_finite() && ms > 0.0 => Duration::from_secs_f64(ms / 1000.0).min(REQUEST_TIMEOUT),
        _ => REQUEST_TIMEOUT,
    };
    let limit = match options.size {
        Some(size) if size.is_finite() && size >= 1.0 => (size as usize).min(settings.max_response_bytes),
        _ => settings.max_response_bytes,
    };
    let follow = options.follow.filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64).unwrap_or(DEFAULT_FOLLOW);
    let mode = options.redirect.unwrap_or_else(|| "follow".to_string());
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("accept")) {
        headers.push(("accept".into(), "*/*".into()));
    }
    let mut method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|_| FetchError::type_error(&format!("{method} is not a valid HTTP method")))?;
    let mut body = body;
    let mut hops = 0u64;
    let client = client(decompress)?;
    loop {
        check_literal(settings, &url).map_err(|refused| {
            FetchError::new(
                format!("request to {url} failed, reason: {}", refused.reason_text()),
                "system",
                Some(REFUSED_CODE),
            )
        })?;
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err(FetchError::new(format!("network timeout at: {url}"), "request-timeout", None));
        }
        let mut builder = client.request(method.clone(), url.clone()).timeout(remaining);
        for (name, value) in &headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &body {
            builder = builder.body(body.clone());
        }
        let response = builder.send().await.map_err(|error| exchange_error(&url, &error, timeout, started))?;
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if status.is_redirection() && matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
            if let Some(location) = location {
                let next = url.join(&location);
                match mode.as_str() {
                    "error" => {
                        return Err(FetchError::new(
                            format!("uri requested responds with a redirect, redirect mode is set to error: {url}"),
                            "no-redirect",
                            None,
                        ))
                    }
                    "manual" => {
                        // node-fetch makes the Location header absolute in manual mode.
                        let absolute = next.as_ref().map(|n| n.to_string()).unwrap_or(location);
                        return read_response(
                            response,
                            &url,
                            (limit, settings.max_buffered_bytes),
                            timeout,
                            started,
                            Some(absolute),
                        )
                        .await;
                    }
                    _ => {}
                }
                let Ok(next) = next else {
                    return Err(FetchError::new(
                        format!("uri requested responds with an invalid redirect URL: {location}"),
                        "invalid-redirect",
                        None,
                    ));
                };
                if hops >= follow {
                    return Err(FetchError::new(format!("maximum redirect reached at: {url}"), "max-redirect", None));
                }
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(FetchError::type_error("Only HTTP(S) protocols are supported"));
                }
                hops += 1;
                if status.as_u16() == 303 || (matches!(status.as_u16(), 301 | 302) && method == reqwest::Method::POST) {
                    method = reqwest::Method::GET;
                    body = None;
                    headers.retain(|(name, _)| !name.eq_ignore_ascii_case("content-length"));
                }
                if next.host_str() != url.host_str() || next.port_or_known_default() != url.port_or_known_default() {
                    // Credentials never follow a redirect to another host (node-fetch ≥ 2.6.7 drops
                    // them for another domain; we drop them for any other host or port).
                    headers.retain(|(name, _)| {
                        !["authorization", "www-authenticate", "cookie", "cookie2"]
                            .iter()
                            .any(|sensitive| name.eq_ignore_ascii_case(sensitive))
                    });
                }
                url = next;
                continue;
            }
        }
        return read_response(response, &url, (limit, settings.max_buffered_bytes), timeout, started, None).await;
    }
}

/// Reads the body (bounded) and builds the response.
async fn read_response(
    mut response: reqwest::Response,
    url: &url::Url,
    (limit, max_buffered): (usize, usize),
    timeout: Duration,
    started: std::time::Instant,
    location: Option<String>,
) -> Result<FetchResponse, FetchError> {
    let status = response.status();
    let over = || FetchError::new(format!("content size at {url} over limit: {limit}"), "max-size", None);
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(over());
    }
    let reason_phrase = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|phrase| String::from_utf8_lossy(phrase.as_bytes()).into_owned());
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            let value = match (&location, k == reqwest::header::LOCATION) {
                (Some(absolute), true) => absolute.clone(),
                _ => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            };
            (k.as_str().to_string(), value)
        })
        .collect();
    let mut body = Vec::new();
    let mut reservation = Reservation(0);
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(error) if error.is_timeout() || started.elapsed() >= timeout => {
                return Err(FetchError::new(
                    format!("Response timeout while trying to fetch {url} (over {}ms)", timeout.as_millis()),
                    "body-timeout",
                    None,
                ))
            }
            Err(error) => {
                let cause = exchange_error(url, &error, timeout, started);
                let reason = cause.message.rsplit("reason: ").next().unwrap_or_default().to_string();
                return Err(FetchError::new(
                    format!("Invalid response body while trying to fetch {url}: {reason}"),
                    "system",
                    cause.code.as_deref(),
                ));
            }
        };
        if body.len() + chunk.len() > limit {
            return Err(over());
        }
        if !reservation.grow(chunk.len(), max_buffered) {
            return Err(FetchError::new(
                format!(
                    "request to {url} failed, reason: the plugin server's buffer for response bodies is full ({max_buffered} bytes, PLUGIN_FETCH_BUFFER_MAX_BYTES)"
                ),
                "system",
                Some("ERR_PLUGIN_FETCH_BUFFER_FULL"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    // node-fetch's `statusText` is the server's reason phrase (hyper keeps a non-canonical one).
    let status_text = reason_phrase.or_else(|| status.canonical_reason().map(str::to_string)).unwrap_or_default();
    Ok(FetchResponse { status: status.as_u16(), status_text, url: url.to_string(), headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(ip: &str) -> Option<&'static str> {
        internal_reason(ip.parse().unwrap())
    }

    #[test]
    fn internal_addresses() {
        for (ip, expected) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fd12::1", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::10.0.0.1", "private"),
            ("2002:7f00:1::", "loopback"),
        ] {
            assert_eq!(reason(ip), Some(expected), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(reason(ip), None, "{ip}");
        }
    }

    #[test]
    fn errors_cross_with_type_and_code() {
        let error = FetchError::new("request to x failed, reason: y".into(), "system", Some("ECONNREFUSED"));
        let meta = MetaError::from(error);
        assert_eq!(meta.name, "FetchError[system,ECONNREFUSED]");
        assert_eq!(MetaError::from(FetchError::type_error("Only absolute URLs are supported")).name, "TypeError");
    }
}
