//! The real `fetch` (reqwest) behind the sandbox against local HTTP servers: node-fetch v2's
//! errors (message, `type`, `errno`, `code`, checked against node-fetch 2 on Node 20), its
//! Response/Headers surface, the network policy (internal addresses refused, on the resolved
//! address and on every redirect hop, unless allowed), and the per-VM bounds (host calls in
//! flight, response size).
//!
//! The network settings are process-wide; nextest runs every test in its own process, and each
//! test sets the settings it needs first.

mod network_support;
mod runtime_support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use network_support::{response, serve, Reply};
use plugin_server::config::NodeEnv;
use plugin_server::plugins::runtime::{
    configure_network, CallKind, MetaBindings, MetaError, NetworkSettings, PluginVmSpec, WorkerPool,
};
use runtime_support::options;
use serde_json::{json, Value};

/// Meta with the default (network) fetch.
struct NetworkMeta;

#[async_trait]
impl MetaBindings for NetworkMeta {
    async fn call(&self, _name: &str, _args: Vec<Value>) -> Result<Value, MetaError> {
        Ok(Value::Null)
    }
}

fn allow_internal() -> NetworkSettings {
    NetworkSettings { allow_internal_ips: true, ..NetworkSettings::defaults(NodeEnv::Production) }
}

fn production() -> NetworkSettings {
    NetworkSettings::defaults(NodeEnv::Production)
}

/// Runs `body` (the inside of an async function) as a plugin's `runEveryMinute` and returns its
/// result. `describe(e)` is available to render an error as node-fetch's fields.
async fn run(body: &str) -> Value {
    let pool = WorkerPool::new(options(1, 20.0)).unwrap();
    let code = format!(
        "import fetch, {{ FetchError, Headers, Response }} from 'node-fetch'
        const describe = (e) => ({{ str: String(e), name: e.name, message: e.message, type: e.type, errno: e.errno, code: e.code,
            keys: Object.keys(e), isFetchError: e instanceof FetchError, isError: e instanceof Error }})
        const attempt = (p) => p.then((r) => ({{ status: r.status }}), describe)
        export async function runEveryMinute(meta) {{ {body} }}"
    );
    pool.load(PluginVmSpec { plugin_config_id: 1, code, meta: Arc::new(NetworkMeta) }).await.unwrap();
    pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap()
}

fn system_error(message: String, code: &str) -> Value {
    json!({"str": format!("FetchError: {message}"), "name": "FetchError", "message": message, "type": "system",
        "errno": code, "code": code, "keys": ["message", "type", "errno", "code"], "isFetchError": true, "isError": true})
}

fn typed_error(message: String, kind: &str) -> Value {
    json!({"str": format!("FetchError: {message}"), "name": "FetchError", "message": message, "type": kind,
        "keys": ["message", "type"], "isFetchError": true, "isError": true})
}

#[tokio::test]
async fn fetch_performs_real_requests() {
    configure_network(allow_internal());
    let server = serve("127.0.0.1:0", |seen| {
        let payload = json!({"request": format!("{} {}", seen.method, seen.target), "body": seen.body}).to_string();
        response("201 Created", &[("content-type", "application/json"), ("x-custom", "yes")], &payload)
    })
    .await;
    let base = server.url("");
    let out = run(&format!(
        "const r = await fetch('{base}/path?q=1', {{ method: 'POST', body: JSON.stringify({{ a: 1 }}), headers: {{ 'Content-Type': 'application/json' }} }})
        const data = await r.json()
        return [r.status, r.ok, r.headers.get('X-Custom'), data.request, data.body]"
    ))
    .await;
    assert_eq!(out, json!([201, true, "yes", "POST /path?q=1", "{\"a\":1}"]));
    let seen = server.seen();
    assert_eq!(seen[0].header("user-agent"), Some("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)"));
    assert_eq!(seen[0].header("accept"), Some("*/*"));
    assert_eq!(seen[0].header("x-plugin-server-fetch-options"), None);
}

/// The strings node-fetch 2 gives on Node 20 for the same cases (see the module doc).
#[tokio::test]
async fn errors_read_as_node_fetch() {
    configure_network(allow_internal());
    let server = serve("127.0.0.1:0", |seen| match seen.target.as_str() {
        "/loop" => response("302 Found", &[("location", "/loop")], ""),
        "/redir" => response("301 Moved Permanently", &[("location", "/ok")], ""),
        "/badjson" => response("200 OK", &[("content-type", "application/json")], "{\"a\":"),
        "/html" => response("200 OK", &[], "<html><body>hello world this is a page</body></html>"),
        "/slow" => Reply::After(Duration::from_secs(3), Box::new(response("200 OK", &[], "x"))),
        "/reset" => Reply::Drop,
        "/big" => response("200 OK", &[], &"x".repeat(100)),
        "/slowbody" => Reply::Split(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\na".to_vec(),
            Duration::from_secs(3),
            b"b".to_vec(),
        ),
        _ => response("200 OK", &[], "ok"),
    })
    .await;
    let base = server.url("");
    let out = run(&format!(
        "const results = {{}}
        results.refused = await attempt(fetch('http://127.0.0.1:9/e'))
        results.loop = await attempt(fetch('{base}/loop'))
        results.follow = await attempt(fetch('{base}/redir', {{ follow: 0 }}))
        results.noRedirect = await attempt(fetch('{base}/redir', {{ redirect: 'error' }}))
        results.timeout = await attempt(fetch('{base}/slow', {{ timeout: 200 }}))
        results.reset = await attempt(fetch('{base}/reset'))
        results.bodyTimeout = await fetch('{base}/slowbody', {{ timeout: 500 }}).then((r) => r.text()).then(() => 'read', describe)
        results.size = await attempt(fetch('{base}/big', {{ size: 10 }}))
        results.badjson = await fetch('{base}/badjson').then((r) => r.json()).then(() => 'parsed', describe)
        results.html = await fetch('{base}/html').then((r) => r.json()).then(() => 'parsed', describe)
        results.relative = await attempt(fetch('/relative'))
        results.ftp = await attempt(fetch('ftp://x/y'))
        results.getBody = await attempt(fetch('{base}/ok', {{ body: 'x' }}))
        results.badHeader = await attempt(fetch('{base}/ok', {{ headers: {{ 'bad name': 'x' }} }}))
        return results"
    ))
    .await;
    assert_eq!(
        out["refused"],
        system_error(
            "request to http://127.0.0.1:9/e failed, reason: connect ECONNREFUSED 127.0.0.1:9".into(),
            "ECONNREFUSED"
        )
    );
    assert_eq!(out["loop"], typed_error(format!("maximum redirect reached at: {base}/loop"), "max-redirect"));
    assert_eq!(out["follow"], typed_error(format!("maximum redirect reached at: {base}/redir"), "max-redirect"));
    assert_eq!(
        out["noRedirect"],
        typed_error(
            format!("uri requested responds with a redirect, redirect mode is set to error: {base}/redir"),
            "no-redirect"
        )
    );
    assert_eq!(out["timeout"], typed_error(format!("network timeout at: {base}/slow"), "request-timeout"));
    assert_eq!(
        out["reset"],
        system_error(format!("request to {base}/reset failed, reason: socket hang up"), "ECONNRESET")
    );
    assert_eq!(out["size"], typed_error(format!("content size at {base}/big over limit: 10"), "max-size"));
    assert_eq!(
        out["bodyTimeout"],
        typed_error(format!("Response timeout while trying to fetch {base}/slowbody (over 500ms)"), "body-timeout")
    );
    assert_eq!(
        out["badjson"],
        typed_error(
            format!("invalid json response body at {base}/badjson reason: Unexpected end of JSON input"),
            "invalid-json"
        )
    );
    assert_eq!(
        out["html"]["message"],
        format!("invalid json response body at {base}/html reason: Unexpected token '<', \"<html><bod\"... is not valid JSON")
    );
    for (case, message) in [
        ("relative", "Only absolute URLs are supported"),
        ("ftp", "Only HTTP(S) protocols are supported"),
        ("getBody", "Request with GET/HEAD method cannot have body"),
        ("badHeader", "bad name is not a legal HTTP header name"),
    ] {
        assert_eq!(out[case]["str"], format!("TypeError: {message}"), "{case}");
    }
}

#[tokio::test]
async fn unresolvable_names_and_bad_certificates_read_as_node_fetch() {
    configure_network(allow_internal());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let identity =
        native_tls::Identity::from_pkcs8(&std::fs::read(cert).unwrap(), &std::fs::read(key).unwrap()).unwrap();
    let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(socket).await;
            });
        }
    });
    let out = run(&format!(
        "return [await attempt(fetch('https://localhost:{port}/x')), await attempt(fetch('http://no-such-host.invalid/x'))]"
    ))
    .await;
    assert_eq!(
        out[0],
        system_error(
            format!("request to https://localhost:{port}/x failed, reason: self-signed certificate"),
            "DEPTH_ZERO_SELF_SIGNED_CERT"
        )
    );
    // Without a network here the resolver may answer "temporary failure" (EAI_AGAIN) instead.
    let code = out[1]["code"].as_str().unwrap().to_string();
    assert!(code == "ENOTFOUND" || code == "EAI_AGAIN", "{}", out[1]);
    assert_eq!(
        out[1],
        system_error(
            format!("request to http://no-such-host.invalid/x failed, reason: getaddrinfo {code} no-such-host.invalid"),
            &code
        )
    );
}

#[tokio::test]
async fn response_and_headers_surface() {
    configure_network(allow_internal());
    let server = serve("127.0.0.1:0", |seen| match seen.target.as_str() {
        "/redir" => response("301 Moved Permanently", &[("location", "/hdr")], ""),
        "/see-other" => response("303 See Other", &[("location", "/hdr")], ""),
        _ => response(
            "201 Made",
            &[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-B", "b"), ("X-A", "a")],
            &json!({"method": seen.method, "body": seen.body}).to_string(),
        ),
    })
    .await;
    let base = server.url("");
    let out = run(&format!(
        "const r = await fetch('{base}/redir')
        const each = []
        r.headers.forEach((v, k) => each.push([k, v]))
        const text = await r.text()
        const again = await r.text().then(() => 'read twice', (e) => String(e))
        const manual = await fetch('{base}/redir', {{ redirect: 'manual' }})
        const post = await fetch('{base}/see-other', {{ method: 'POST', body: 'data' }})
        const h = new Headers({{ 'X-Z': '1', 'x-a': '2' }})
        h.append('X-Z', '3')
        const built = new Response('{{\"x\":1}}', {{ status: 404, headers: {{ a: 'b' }} }})
        return {{
            status: r.status, statusText: r.statusText, ok: r.ok, url: r.url, redirected: r.redirected,
            cookie: r.headers.get('set-cookie'), raw: r.headers.raw()['set-cookie'], keys: [...r.headers.keys()].filter((k) => k.startsWith('x-') || k === 'set-cookie'),
            each: each.filter(([k]) => k.startsWith('x-')), text, again, bodyUsed: r.bodyUsed,
            buffer: (await fetch('{base}/hdr').then((x) => x.buffer())).length > 0,
            manual: [manual.status, manual.headers.get('location'), manual.redirected],
            post: await post.json(),
            built: [built.status, built.ok, built.headers.get('A'), (await built.json()).x],
            headers: [h.get('x-z'), [...h.entries()], h.has('X-A'), String(h)],
            isRedirect: fetch.isRedirect(302),
        }}"
    ))
    .await;
    assert_eq!(out["status"], 201);
    assert_eq!(out["statusText"], "Made");
    assert_eq!(out["ok"], true);
    assert_eq!(out["url"], format!("{base}/hdr"));
    assert_eq!(out["redirected"], true);
    assert_eq!(out["cookie"], "a=1, b=2");
    assert_eq!(out["raw"], json!(["a=1", "b=2"]));
    assert_eq!(out["keys"], json!(["set-cookie", "x-a", "x-b"]));
    assert_eq!(out["each"], json!([["x-a", "a"], ["x-b", "b"]]));
    assert_eq!(out["again"], format!("TypeError: body used already for: {base}/hdr"));
    assert_eq!(out["bodyUsed"], true);
    assert_eq!(out["buffer"], true);
    assert_eq!(out["manual"], json!([301, format!("{base}/hdr"), false]));
    assert_eq!(out["post"], json!({"method": "GET", "body": ""}));
    assert_eq!(out["built"], json!([404, false, "b", 1]));
    assert_eq!(out["headers"], json!(["1, 3", [["x-a", "2"], ["x-z", "1, 3"]], true, "[object Headers]"]));
    assert_eq!(out["isRedirect"], true);
}

/// Production defaults: loopback, private, link-local and metadata destinations are refused, by
/// address literal, by name (on the resolved address) and on a redirect hop; the refusal is a
/// node-fetch-like system error the plugin can read.
#[tokio::test]
async fn internal_destinations_are_refused_by_default() {
    let server = serve("127.0.0.1:0", |seen| match seen.target.as_str() {
        "/to-loopback" => response("302 Found", &[("location", "http://127.0.0.1:9/secret")], ""),
        "/to-metadata" => response("302 Found", &[("location", "http://169.254.169.254/latest/meta-data/")], ""),
        _ => response("200 OK", &[], "public"),
    })
    .await;
    let port = server.address.port();
    // TEST HOOK: `public.test` stands for an internet host; it is served by the loopback server.
    configure_network(NetworkSettings {
        test_public_hosts: vec![("public.test".into(), "127.0.0.1".parse().unwrap())],
        ..production()
    });
    let out = run(&format!(
        "const r = {{}}
        r.public = await fetch('http://public.test:{port}/').then((x) => x.text())
        r.loopback = await attempt(fetch('http://127.0.0.1:{port}/'))
        r.localhost = await attempt(fetch('http://localhost:{port}/'))
        r.ipv6 = await attempt(fetch('http://[::1]:{port}/'))
        r.mapped = await attempt(fetch('http://[::ffff:127.0.0.1]:{port}/'))
        r.metadata = await attempt(fetch('http://169.254.169.254/latest/meta-data/'))
        r.metadataName = await attempt(fetch('http://metadata.google.internal/computeMetadata/v1/'))
        r.private = await attempt(fetch('http://10.0.0.1/'))
        r.redirect = await attempt(fetch('http://public.test:{port}/to-loopback'))
        r.redirectMetadata = await attempt(fetch('http://public.test:{port}/to-metadata'))
        return r"
    ))
    .await;
    assert_eq!(out["public"], "public");
    let refused = |url: &str, what: &str| {
        system_error(
            format!("request to {url} failed, reason: refused to connect to {what} addresses are not allowed for plugins (set ALLOW_INTERNAL_IPS=true to allow them)"),
            "ERR_PLUGIN_FETCH_REFUSED",
        )
    };
    assert_eq!(out["loopback"], refused(&format!("http://127.0.0.1:{port}/"), "127.0.0.1: loopback"));
    assert_eq!(out["localhost"]["code"], "ERR_PLUGIN_FETCH_REFUSED", "{}", out["localhost"]);
    assert!(
        out["localhost"]["message"].as_str().unwrap().contains("refused to connect to localhost ("),
        "{}",
        out["localhost"]
    );
    assert_eq!(out["ipv6"], refused(&format!("http://[::1]:{port}/"), "::1: loopback"));
    assert_eq!(out["mapped"]["code"], "ERR_PLUGIN_FETCH_REFUSED", "{}", out["mapped"]);
    assert_eq!(out["metadata"], refused("http://169.254.169.254/latest/meta-data/", "169.254.169.254: cloud metadata"));
    assert_eq!(out["metadataName"]["code"], "ERR_PLUGIN_FETCH_REFUSED", "{}", out["metadataName"]);
    assert_eq!(out["private"], refused("http://10.0.0.1/", "10.0.0.1: private"));
    assert_eq!(out["redirect"], refused("http://127.0.0.1:9/secret", "127.0.0.1: loopback"));
    assert_eq!(out["redirectMetadata"]["code"], "ERR_PLUGIN_FETCH_REFUSED");
    // Nothing but the public requests reached the server.
    assert!(server.seen().iter().all(|seen| seen.target == "/" || seen.target.starts_with("/to-")));
}

#[tokio::test]
async fn the_operator_can_allow_internal_destinations() {
    configure_network(allow_internal());
    let server = serve("127.0.0.1:0", |_| response("200 OK", &[], "inside")).await;
    let port = server.address.port();
    let out = run(&format!(
        "return [await fetch('http://127.0.0.1:{port}/').then((r) => r.text()), await fetch('http://localhost:{port}/').then((r) => r.text())]"
    ))
    .await;
    assert_eq!(out, json!(["inside", "inside"]));
}

/// A plugin that starts thousands of fetches without awaiting them gets the first
/// `max_host_calls_in_flight` and an error for the rest; the server never sees more at once.
#[tokio::test]
async fn host_calls_in_flight_are_capped_per_vm() {
    configure_network(NetworkSettings { max_host_calls_in_flight: 20, ..allow_internal() });
    let server =
        serve("127.0.0.1:0", |_| Reply::After(Duration::from_millis(300), Box::new(response("200 OK", &[], "ok"))))
            .await;
    let base = server.url("/");
    let out = run(&format!(
        "const all = []
        for (let i = 0; i < 5000; i++) all.push(fetch('{base}').then(() => 'ok', (e) => e.code || e.message))
        const storage = await meta.storage.get('x').then(() => 'ok', (e) => e.message)
        const results = await Promise.all(all)
        const after = await fetch('{base}').then(() => 'ok', (e) => e.message)
        return {{ ok: results.filter((r) => r === 'ok').length, refused: results.filter((r) => r === 'ERR_PLUGIN_TOO_MANY_IN_FLIGHT').length, storage, after }}"
    ))
    .await;
    assert_eq!(out["ok"], 20, "{out}");
    assert_eq!(out["refused"], 4980, "{out}");
    assert!(out["storage"].as_str().unwrap().starts_with("too many host calls in flight (20"), "{out}");
    assert_eq!(out["after"], "ok", "the cap frees as calls settle");
    assert_eq!(server.seen().len(), 21);
}

#[tokio::test]
async fn response_bodies_are_bounded() {
    configure_network(NetworkSettings { max_response_bytes: 1000, ..allow_internal() });
    let server = serve("127.0.0.1:0", |seen| match seen.target.as_str() {
        // No content-length: the limit is found while reading, not from the header.
        "/chunked" => Reply::Split(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec(),
            Duration::from_millis(10),
            vec![b'x'; 5000],
        ),
        _ => response("200 OK", &[], &"y".repeat(5000)),
    })
    .await;
    let out = run(&format!(
        "return [await attempt(fetch('{}')), await attempt(fetch('{}')), await attempt(fetch('{}', {{ size: 1000000 }}))]",
        server.url("/chunked"),
        server.url("/sized"),
        server.url("/sized")
    ))
    .await;
    assert_eq!(out[0], typed_error(format!("content size at {} over limit: 1000", server.url("/chunked")), "max-size"));
    assert_eq!(out[1], typed_error(format!("content size at {} over limit: 1000", server.url("/sized")), "max-size"));
    assert_eq!(out[2]["type"], "max-size", "a plugin's own size option cannot raise the limit");
}

/// All bodies being read at once share one budget: the second of two concurrent 2,000-byte bodies
/// does not fit in 2,500 bytes; the budget is given back afterwards.
#[tokio::test]
async fn concurrent_bodies_share_one_buffer_budget() {
    configure_network(NetworkSettings { max_buffered_bytes: 2500, ..allow_internal() });
    let server = serve("127.0.0.1:0", |_| {
        let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\nconnection: close\r\n\r\n".to_vec();
        head.extend_from_slice(&[b'x'; 1500]);
        Reply::Split(head, Duration::from_millis(800), vec![b'y'; 500])
    })
    .await;
    let url = server.url("/");
    let out = run(&format!(
        "const both = await Promise.all([attempt(fetch('{url}')), attempt(fetch('{url}'))])
        const after = await attempt(fetch('{url}'))
        return {{ both, after }}"
    ))
    .await;
    let both = out["both"].as_array().unwrap();
    assert_eq!(both.iter().filter(|r| r["status"] == 200).count(), 1, "{out}");
    let failed = both.iter().find(|r| r.get("code").is_some()).unwrap();
    assert_eq!(
        *failed,
        system_error(
            format!("request to {url} failed, reason: the plugin server's buffer for response bodies is full (2500 bytes, PLUGIN_FETCH_BUFFER_MAX_BYTES)"),
            "ERR_PLUGIN_FETCH_BUFFER_FULL"
        )
    );
    assert_eq!(out["after"]["status"], 200, "{out}");
}
