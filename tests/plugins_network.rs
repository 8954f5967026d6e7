//! The plugins' network reach through the real server (in process, Postgres pipeline): a plugin
//! trying loopback, cloud metadata and a redirect to loopback is refused under the production
//! policy (and the refusal is in its log entries), allowed when `ALLOW_INTERNAL_IPS` allows it;
//! `posthog.api` sends the bot user's key to the configured PostHog host (`SITE_URL`) only.

mod common;
mod network_support;

use common::in_process::InProcessServer;
use common::{wait_for, TestDb};
use network_support::{response, serve, Routes};
use plugin_server::config::Config;
use serde_json::{json, Value};

const PLUGIN: &str = r#"
    export async function processEvent (event) {
        const out = {}
        for (const [key, url] of Object.entries(event.properties.urls || {})) {
            out[key] = await fetch(url).then((r) => r.text(), (e) => e.code + ' ' + e.message)
        }
        out.api = await posthog.api.get('/api/projects/@current').then((r) => r.text(), (e) => e.message)
        out.apiRedirect = await posthog.api.get('/api/redirect').then((r) => r.text(), (e) => e.code + ' ' + e.message)
        out.apiElsewhere = await posthog.api.get('/api/x', { host: event.properties.elsewhere }).then((r) => r.text(), (e) => e.message)
        event.properties.results = out
        return event
    }
"#;

/// The PostHog instance (on `localhost`, as `SITE_URL`) and an internal service (on 127.0.0.1).
async fn servers() -> (Routes, Routes) {
    let inner = serve("127.0.0.1:0", |_| response("200 OK", &[], "inner secret")).await;
    let inner_url = inner.url("/steal");
    let site = serve("127.0.0.1:0", move |seen| {
        if seen.target.starts_with("/api/redirect") {
            return response("302 Found", &[("location", &inner_url)], "");
        }
        if seen.target.starts_with("/to-inner") {
            return response("302 Found", &[("location", &inner_url)], "");
        }
        let authorized = seen.header("authorization").is_some_and(|value| value.starts_with("Bearer phx_"));
        response("200 OK", &[], if authorized { "site ok" } else { "site unauthorized" })
    })
    .await;
    (site, inner)
}

/// Runs the server with `extra` settings, sends one event through the plugin and returns the
/// stored `results` property and the plugin's SYSTEM log entries.
async fn run_plugin(
    db: &TestDb,
    site: &Routes,
    inner: &Routes,
    extra: &[(&str, &str)],
) -> (Value, Vec<(String, String)>) {
    let queue = common::unique_prefix("plugins-network");
    let site_url = format!("http://localhost:{}", site.address.port());
    let mut pairs = vec![
        ("WORKER_CONCURRENCY", "1"),
        ("PLUGINS_CELERY_QUEUE", queue.as_str()),
        ("LOG_LEVEL", "warn"),
        ("SITE_URL", site_url.as_str()),
    ];
    let default_queue = format!("{queue}-default");
    pairs.push(("CELERY_DEFAULT_QUEUE", default_queue.as_str()));
    pairs.extend_from_slice(extra);
    let config: Config = db.config(&pairs);
    let server = InProcessServer::start(config);

    let urls = json!({
        "loopback": inner.url("/secret"),
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "redirect": format!("{site_url}/to-inner"),
    });
    let data = json!({
        "distinct_id": "network-tester",
        "event": "network probe",
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "properties": {"urls": urls, "elsewhere": inner.url("")},
        "team_id": common::TEAM_ID,
        "uuid": uuid::Uuid::now_v7().to_string(),
    });
    server.producer.send_capture(data.as_object().unwrap(), i64::from(common::TEAM_ID)).await.unwrap();
    let properties: Value = wait_for("the probe event", || async {
        sqlx::query_scalar::<_, Value>("SELECT properties FROM posthog_event WHERE event = 'network probe'")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    server.stop().await;
    let mut logs: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, message FROM posthog_pluginlogentry WHERE source = 'SYSTEM' AND message LIKE 'fetch refused%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    logs.sort();
    (properties["results"].clone(), logs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_policy_refuses_internal_destinations_and_logs_it() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let (site, inner) = servers().await;
    let (results, logs) = run_plugin(&db, &site, &inner, &[("ALLOW_INTERNAL_IPS", "false")]).await;
    let suffix = "addresses are not allowed for plugins (set ALLOW_INTERNAL_IPS=true to allow them)";
    let loopback = format!(
        "request to {} failed, reason: refused to connect to 127.0.0.1: loopback {suffix}",
        inner.url("/secret")
    );
    let stolen = format!(
        "request to {} failed, reason: refused to connect to 127.0.0.1: loopback {suffix}",
        inner.url("/steal")
    );
    assert_eq!(results["loopback"], format!("ERR_PLUGIN_FETCH_REFUSED {loopback}"));
    assert_eq!(
        results["metadata"],
        format!("ERR_PLUGIN_FETCH_REFUSED request to http://169.254.169.254/latest/meta-data/ failed, reason: refused to connect to 169.254.169.254: cloud metadata {suffix}")
    );
    assert_eq!(results["redirect"], format!("ERR_PLUGIN_FETCH_REFUSED {stolen}"), "a redirect hop is checked too");
    // posthog.api: the bot user's key reaches the configured host; not a redirect target, not another host.
    assert_eq!(results["api"], "site ok");
    assert_eq!(results["apiRedirect"], format!("ERR_PLUGIN_FETCH_REFUSED {stolen}"));
    assert!(
        results["apiElsewhere"]
            .as_str()
            .unwrap()
            .starts_with("posthog.api sends this project's API key only to the configured PostHog host"),
        "{results}"
    );
    assert!(inner.seen().is_empty(), "nothing reached the internal service: {:?}", inner.seen());
    assert_eq!(
        logs,
        vec![
            ("WARN".to_string(), format!("fetch refused: {loopback}")),
            ("WARN".to_string(), format!("fetch refused: {stolen}")),
            ("WARN".to_string(), format!("fetch refused: {stolen}")),
            ("WARN".to_string(), format!("fetch refused: request to http://169.254.169.254/latest/meta-data/ failed, reason: refused to connect to 169.254.169.254: cloud metadata {suffix}")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_internal_ips_lets_plugins_reach_internal_services_without_the_key() {
    let db = TestDb::with_fixture(Some(PLUGIN)).await;
    let (site, inner) = servers().await;
    let (results, logs) = run_plugin(&db, &site, &inner, &[("ALLOW_INTERNAL_IPS", "true")]).await;
    assert_eq!(results["loopback"], "inner secret");
    assert_eq!(results["redirect"], "inner secret");
    assert_eq!(results["api"], "site ok");
    assert_eq!(results["apiRedirect"], "inner secret");
    // The key still goes nowhere but the PostHog host: not through options.host, not on a redirect.
    assert!(
        results["apiElsewhere"].as_str().unwrap().starts_with("posthog.api sends this project's API key only"),
        "{results}"
    );
    let steal = inner.seen().into_iter().filter(|seen| seen.target == "/steal").collect::<Vec<_>>();
    assert_eq!(steal.len(), 2);
    assert!(steal.iter().all(|seen| seen.header("authorization").is_none()), "{steal:?}");
    assert!(logs.is_empty(), "{logs:?}");
}

#[test]
fn internal_addresses_are_allowed_by_default_only_in_dev_and_test() {
    let production = Config::from_pairs(&[]).unwrap();
    assert!(!production.ALLOW_INTERNAL_IPS);
    assert!(Config::from_pairs(&[("NODE_ENV", "test")]).unwrap().ALLOW_INTERNAL_IPS);
    assert!(Config::from_pairs(&[("NODE_ENV", "dev")]).unwrap().ALLOW_INTERNAL_IPS);
    assert!(
        !Config::from_pairs(&[("NODE_ENV", "production"), ("ALLOW_INTERNAL_IPS", "no")]).unwrap().ALLOW_INTERNAL_IPS
    );
}
