//! The meta API against real Redis and Postgres (the reference's meta.cache, meta.storage,
//! utils.cursor, console, posthog.capture, posthog.api and meta.jobs cases of
//! tests/postgres/vm.test.ts and tests/worker/console.test.ts).

mod common;
mod plugins_support;

use std::sync::Arc;
use std::time::Duration;

use plugin_server::plugins::extensions::PluginContext;
use plugin_server::plugins::runtime::FetchRequest;
use plugin_server::plugins::vm_boundary::Method;
use plugins_support::*;
use serde_json::{json, Value};
use uuid::Uuid;

async fn context() -> (Setup, PluginContext) {
    let fakes = Arc::new(FakeFactory::default());
    fakes.register(
        "noop",
        FakePlugin { exports: exports(&[Method::ProcessEvent]), handler: handler(|_| async { Ok(Value::Null) }) },
    );
    let setup = Setup::new("noop", Arc::new(SharedFakeFactory(fakes))).await;
    setup.plugins.reload().await.unwrap();
    let config = setup.plugins.config(CONFIG).unwrap();
    let context = PluginContext::new(setup.services.clone(), config);
    (setup, context)
}

fn key(name: &str) -> Value {
    json!(format!("{name}-{}", Uuid::new_v4().simple()))
}

async fn call(context: &PluginContext, name: &str, args: Vec<Value>) -> Value {
    context.call(name, args).await.unwrap_or_else(|error| panic!("{name}: {error}"))
}

#[tokio::test]
async fn cache_get_set_incr_expire_and_ttl() {
    let (_setup, context) = context().await;
    assert_eq!(context.cache().key("x"), "@plugin/60/2/x");
    let counter = key("counter");
    for expected in 1..=3 {
        let current = call(&context, "cache.get", vec![counter.clone(), json!(0)]).await;
        let next = current.as_i64().unwrap_or(0) + 1;
        call(&context, "cache.set", vec![counter.clone(), json!(next)]).await;
        assert_eq!(call(&context, "cache.get", vec![counter.clone()]).await, json!(expected));
    }
    assert_eq!(call(&context, "cache.expire", vec![counter.clone(), json!(1)]).await, json!(true));
    let ttl = key("ttl");
    call(&context, "cache.set", vec![ttl.clone(), json!("v"), json!(1)]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Missing keys read as null whatever the default.
    assert_eq!(call(&context, "cache.get", vec![counter.clone(), json!(5)]).await, Value::Null);
    assert_eq!(call(&context, "cache.get", vec![ttl.clone()]).await, Value::Null);
    let n = key("n");
    assert_eq!(call(&context, "cache.incr", vec![n.clone()]).await, json!(1));
    assert_eq!(call(&context, "cache.incr", vec![n.clone()]).await, json!(2));
    assert_eq!(call(&context, "cache.expire", vec![key("missing"), json!(1)]).await, json!(false));
    let raw = key("raw");
    call(&context, "cache.set", vec![raw.clone(), json!("not json"), json!(null), json!({"jsonSerialize": false})])
        .await;
    assert_eq!(
        call(&context, "cache.get", vec![raw.clone(), json!(null), json!({"jsonSerialize": false})]).await,
        json!("not json")
    );
    // Invalid JSON reads as null.
    assert_eq!(call(&context, "cache.get", vec![raw.clone()]).await, Value::Null);
    let object = key("object");
    call(&context, "cache.set", vec![object.clone(), json!({"a": [1, 2]})]).await;
    assert_eq!(call(&context, "cache.get", vec![object]).await, json!({"a": [1, 2]}));
}

#[tokio::test]
async fn cache_lists() {
    let (_setup, context) = context().await;
    let list = key("mylist");
    assert_eq!(call(&context, "cache.lpush", vec![list.clone(), json!("a string")]).await, json!(1));
    assert_eq!(call(&context, "cache.lpush", vec![list.clone(), json!(["an", "array"])]).await, json!(3));
    assert_eq!(call(&context, "cache.llen", vec![list.clone()]).await, json!(3));
    assert_eq!(
        call(&context, "cache.lrange", vec![list.clone(), json!(0), json!(-1)]).await,
        json!(["array", "an", "a string"])
    );
    call(&context, "cache.expire", vec![list.clone(), json!(0)]).await;
    assert_eq!(call(&context, "cache.lrange", vec![list.clone(), json!(0), json!(-1)]).await, json!([]));

    let numbers = key("numbers");
    call(&context, "cache.lpush", vec![numbers.clone(), json!(["1", "2", "3"])]).await;
    assert_eq!(call(&context, "cache.lpop", vec![numbers.clone(), json!(1)]).await, json!(["3"]));
    assert_eq!(call(&context, "cache.lrem", vec![numbers.clone(), json!(1), json!("2")]).await, json!(1));
    assert_eq!(call(&context, "cache.lrange", vec![numbers.clone(), json!(0), json!(-1)]).await, json!(["1"]));

    let errors = [
        ("cache.lpush", vec![list.clone(), json!(3)], "cache.lpush expects a string value or an array of strings"),
        (
            "cache.lrange",
            vec![list.clone(), json!("0"), json!(1)],
            "cache.lrange expects a number for the start and end indexes",
        ),
        (
            "cache.lrem",
            vec![list.clone(), json!("1"), json!("x")],
            "cache.lrem expects a number for the \"count\" argument",
        ),
        ("cache.lpop", vec![list.clone(), json!("1")], "cache.lpop expects a number for the \"count\" argument"),
    ];
    for (name, args, message) in errors {
        assert_eq!(context.call(name, args).await.unwrap_err().message, message);
    }
    let too_many: Vec<Value> = (0..1001).map(|i| json!(i.to_string())).collect();
    let error = context.call("cache.lpush", vec![list, json!(too_many)]).await.unwrap_err();
    assert_eq!(
        (error.name.as_str(), error.message.as_str()),
        ("IllegalOperationError", "Too many elements in array for cache.lpush. Maximum: 1000")
    );
}

#[tokio::test]
async fn storage_and_cursors() {
    let (setup, context) = context().await;
    assert_eq!(call(&context, "storage.get", vec![json!("mykey"), json!("default")]).await, json!("default"));
    call(&context, "storage.set", vec![json!("mykey"), json!({"a": 1})]).await;
    assert_eq!(call(&context, "storage.get", vec![json!("mykey")]).await, json!({"a": 1}));
    call(&context, "storage.set", vec![json!("null"), Value::Null]).await;
    assert_eq!(call(&context, "storage.get", vec![json!("null"), json!("default")]).await, Value::Null);
    call(&context, "storage.set", vec![json!("deleteme"), json!(1)]).await;
    call(&context, "storage.del", vec![json!("deleteme")]).await;
    assert_eq!(call(&context, "storage.get", vec![json!("deleteme"), Value::Null]).await, Value::Null);
    // `storage.set(key, undefined)` arrives without the value and deletes.
    call(&context, "storage.set", vec![json!("mykey")]).await;
    assert_eq!(call(&context, "storage.get", vec![json!("mykey"), json!(7)]).await, json!(7));

    call(&context, "utils.cursor.init", vec![json!("cursor"), json!(5)]).await;
    call(&context, "utils.cursor.init", vec![json!("cursor"), json!(100)]).await;
    assert_eq!(call(&context, "utils.cursor.increment", vec![json!("cursor")]).await, json!(6));
    assert_eq!(call(&context, "utils.cursor.increment", vec![json!("cursor"), json!(10)]).await, json!(16));
    assert_eq!(call(&context, "utils.cursor.increment", vec![json!("fresh"), json!(3)]).await, json!(3));
    let stored: String =
        sqlx::query_scalar("SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = 39 AND key = 'cursor'")
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
    assert_eq!(stored, "16");
    assert_eq!(
        context.call("utils.cursor.init", vec![json!("c"), json!("x")]).await.unwrap_err().message,
        "The cursor's initial value must be a number!"
    );
    assert_eq!(
        context.call("utils.cursor.increment", vec![json!("c"), json!("x")]).await.unwrap_err().message,
        "The incrementBy value must be a number!"
    );
}

#[tokio::test]
async fn console_writes_log_entries() {
    let (setup, context) = context().await;
    for (level, kind) in [("debug", "DEBUG"), ("log", "LOG"), ("info", "INFO"), ("warn", "WARN"), ("error", "ERROR")] {
        call(&context, &format!("console.{level}"), vec![json!("number ="), json!(987)]).await;
        let entries = setup.log_entries(CONFIG).await;
        let matching: Vec<_> = entries.iter().filter(|(source, k, _)| source == "CONSOLE" && k == kind).collect();
        assert_eq!(matching.len(), 1, "{kind}");
        assert_eq!(matching[0].2, "number = 987");
    }
    let (team, plugin, instance): (i32, i32, Uuid) = sqlx::query_as(
        "SELECT team_id, plugin_id, instance_id FROM posthog_pluginlogentry WHERE source = 'CONSOLE' LIMIT 1",
    )
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert_eq!((team, plugin, instance), (2, 60, setup.hub.instance_id));
}

#[tokio::test]
async fn capture_builds_the_reference_payload() {
    let (setup, context) = context().await;
    call(&context, "posthog.capture", vec![json!("my-new-event"), json!({"random": "properties"})]).await;
    call(
        &context,
        "posthog.capture",
        vec![json!("other"), json!({"timestamp": "2020-02-23T02:15:00Z", "distinct_id": "custom id"})],
    )
    .await;
    let events = setup.capture.events.lock().unwrap().clone();
    let data = &events[0].data;
    assert_eq!(data["distinct_id"], "test-maxmind-plugin");
    assert_eq!(data["event"], "my-new-event");
    assert_eq!(data["team_id"], 2);
    let properties = data["properties"].as_object().unwrap();
    assert_eq!(properties.keys().collect::<Vec<_>>(), ["$lib", "$lib_version", "distinct_id", "random"]);
    assert_eq!(properties["$lib"], "posthog-plugin-server");
    assert_eq!(properties["$lib_version"], plugin_server::VERSION);
    assert!(data["timestamp"].as_str().unwrap().ends_with('Z'));
    let args = events[0].celery_args();
    assert_eq!(args[0], "test-maxmind-plugin");
    assert_eq!(args[1], Value::Null);
    assert_eq!(args[3], *data);
    assert_eq!(args[4], 2);
    assert_eq!(args[5], data["timestamp"]);

    let data = &events[1].data;
    assert_eq!(data["timestamp"], "2020-02-23T02:15:00Z");
    assert_eq!(data["distinct_id"], "custom id");
    assert_eq!(data["properties"]["distinct_id"], "custom id");
    assert!(data["properties"].get("timestamp").is_none());
    let raw = events[1].raw_event_message();
    assert_eq!(raw["now"], "2020-02-23T02:15:00Z");
    assert_eq!(raw["data"], data.to_string());
}

/// The fetch request of a `posthog.api` call's answer.
fn fetch_request(request: &Value) -> FetchRequest {
    FetchRequest {
        url: request["url"].as_str().unwrap().to_string(),
        method: request["method"].as_str().unwrap().to_string(),
        headers: vec![("authorization".into(), request["headers"]["Authorization"].as_str().unwrap().to_string())],
        body: None,
    }
}

/// The `Authorization` header the fetch sends for a `posthog.api` call's answer.
fn unsealed(context: &PluginContext, request: &Value) -> String {
    context.services.api_keys.unseal(fetch_request(request)).unwrap().headers[0].1.clone()
}

#[tokio::test]
async fn api_requests_and_personal_api_key_provisioning() {
    let statsd = common::statsd::StatsdListener::start();
    statsd.install_global();
    let (setup, context) = context().await;
    let request = call(&context, "posthog.api", vec![json!("GET"), json!("/api/event")]).await;
    assert_eq!(request["url"], "https://app.posthog.com/api/event?token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2");
    assert_eq!(request["method"], "GET");
    assert_eq!(request["body"], Value::Null);
    // The VM gets a sealed handle, never the key; the fetch unseals it for the PostHog host only.
    let bearer = request["headers"]["Authorization"].as_str().unwrap().to_string();
    assert!(bearer.starts_with("Bearer phx_sealed_"), "{bearer}");
    let (email, first_name): (String, String) =
        sqlx::query_as("SELECT email, first_name FROM posthog_user WHERE email LIKE '%@posthogbot.user'")
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
    assert!(email.ends_with("@posthogbot.user"));
    assert_eq!(first_name, "Plugins API User [Bot]");
    // Provisioning timed as the reference's queries (real UDP datagrams).
    statsd.settle();
    for tag in ["fetchPluginsUser", "createUser", "createOrganizationMembership", "createPersonalApiKey"] {
        let total = statsd.total(&format!("query.postgres.total,queryTag={tag}"));
        assert_eq!(total, 1, "{tag}: {:?}", statsd.lines());
        assert!(statsd.has_key(&format!("query.postgres,queryTag={tag}")), "{tag}: {:?}", statsd.lines());
    }
    let key: String = sqlx::query_scalar("SELECT value FROM posthog_personalapikey WHERE label = 'autogen'")
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(unsealed(&context, &request), format!("Bearer {key}"));
    let again = call(&context, "posthog.api", vec![json!("GET"), json!("/api/event")]).await;
    let elsewhere = FetchRequest { url: "https://evil.example/api/event".into(), ..fetch_request(&again) };
    let refused = context.services.api_keys.unseal(elsewhere).unwrap_err();
    assert_eq!(
        refused.message,
        "request to https://evil.example/api/event failed, reason: the PostHog API key may only be sent to https://app.posthog.com"
    );

    let request =
        call(&context, "posthog.api", vec![json!("GET"), json!("/api/event"), json!({"data": {"url": "param"}})]).await;
    assert_eq!(request["url"], "https://app.posthog.com/api/event?url=param&token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2");
    assert_eq!(unsealed(&context, &request), format!("Bearer {key}"), "the key is reused");
    let request =
        call(&context, "posthog.api", vec![json!("POST"), json!("/api/event"), json!({"data": {"a": 1}})]).await;
    assert_eq!(request["url"], "https://app.posthog.com/api/event?token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2");
    assert_eq!(request["body"], r#"{"a":1}"#);
    let request = call(&context, "posthog.api", vec![json!("PUT"), json!("/api/event")]).await;
    assert_eq!(request["body"], "{}");
    let request =
        call(&context, "posthog.api", vec![json!("DELETE"), json!("/api/event"), json!({"data": {"a": 1}})]).await;
    assert_eq!(request["url"], "https://app.posthog.com/api/event?token=THIS+IS+NOT+A+TOKEN+FOR+TEAM+2");
    let request = call(
        &context,
        "posthog.api",
        vec![
            json!("GET"),
            json!("api/event?x=1"),
            json!({"host": "http://localhost:8000/", "projectApiKey": "token", "personalApiKey": "secret"}),
        ],
    )
    .await;
    assert_eq!(request["url"], "http://localhost:8000/api/event?x=1&token=token");
    assert_eq!(request["headers"]["Authorization"], "Bearer secret");
    let error = context
        .call("posthog.api", vec![json!("GET"), json!("/x"), json!({"projectApiKey": "token"})])
        .await
        .unwrap_err();
    assert_eq!(error.message, "You must specify a personalApiKey if you specify a projectApiKey and vice-versa!");
}

#[tokio::test]
async fn jobs_enqueue_the_reference_payload() {
    let (setup, context) = context().await;
    let before = chrono::Utc::now().timestamp_millis();
    call(&context, "jobs.runNow", vec![json!("logReply"), json!({"a": 1})]).await;
    call(&context, "jobs.runIn", vec![json!("logReply"), json!({}), json!(1), json!("second")]).await;
    call(&context, "jobs.runAt", vec![json!("logReply"), json!(null), json!("2030-01-01T00:00:00.000Z")]).await;
    let jobs = setup.jobs.jobs.lock().unwrap().clone();
    assert_eq!(jobs.len(), 3);
    assert_eq!(
        serde_json::to_value(&jobs[0]).unwrap().as_object().unwrap().keys().collect::<Vec<_>>(),
        ["type", "payload", "timestamp", "pluginConfigId", "pluginConfigTeam"]
    );
    assert_eq!((jobs[0].job_type.as_str(), jobs[0].plugin_config_id, jobs[0].plugin_config_team), ("logReply", 39, 2));
    assert!(jobs[0].timestamp >= before && jobs[0].timestamp < before + 1000);
    assert!(jobs[1].timestamp >= before + 1000 && jobs[1].timestamp < before + 2000);
    assert_eq!(jobs[2].timestamp, 1_893_456_000_000);
    let error = context.call("jobs.runIn", vec![json!("x"), json!({}), json!(1), json!("eon")]).await.unwrap_err();
    assert_eq!(error.message, "Unknown time unit: eons");
}

#[tokio::test]
async fn geoip_without_mmdb_throws_the_reference_message() {
    let (_setup, context) = context().await;
    let error = context.call("geoip.locate", vec![json!("89.160.20.129")]).await.unwrap_err();
    assert_eq!(error.message, "IP location capabilities are not available in this PostHog instance!");
}
