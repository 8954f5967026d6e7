//! Same results as the original 1.10.5 on real payloads and real plugins (issue 13), the whole
//! server in process against real Postgres and Redis: Celery envelopes that JavaScript accepts,
//! TypeScript plugins with type-only imports, where `$plugins_*` land, the `meta.geoip.locate`
//! record, and the error stored on the plugin config. Each expected value is what the original
//! stores for the same input (checked against its code and, where it computes, Node 20).

mod common;

use common::in_process::{self, InProcessServer};
use common::{wait_for, TestDb};
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use serde_json::{json, Map, Value};

struct RunningServer {
    server: InProcessServer,
    pool: sqlx::PgPool,
}

impl RunningServer {
    async fn start(db: &TestDb, extra: &[(&str, &str)]) -> RunningServer {
        let server = InProcessServer::start(in_process::celery_config(db, "compat", extra));
        RunningServer { server, pool: db.pool.clone() }
    }

    /// `process_event_with_plugins(distinct_id, ip, site_url, data, team_id, now, sent_at)` as
    /// PostHog's Django app sends it.
    async fn send(&self, args: Value) {
        let args = args.as_array().unwrap().clone();
        self.server.producer.send_task(PROCESS_EVENT_TASK, &args, &Map::new()).await.unwrap();
    }

    async fn event_row(&self, name: &str) -> (String, Value, String) {
        wait_for(&format!("the {name} row"), || async {
            sqlx::query_as::<_, (String, Value, String)>(
                "SELECT distinct_id, properties, to_char(timestamp AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') FROM posthog_event WHERE event = $1",
            )
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
        })
        .await
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

const NOW: &str = "2021-11-01T10:00:00.000Z";

/// Records what the plugin saw, as a plugin written against the original would.
const TYPE_RECORDER: &str = r#"
    export function processEvent(event) {
        event.properties = event.properties || {}
        event.properties.seen = {
            timestamp: typeof event.timestamp,
            offset: typeof event.offset,
            distinct_id: typeof event.distinct_id,
            ip: typeof event.ip,
        }
        return event
    }
"#;

/// Fields the original reads without a type check, with JSON types the strict decoding refused
/// ("bad arguments: invalid type: integer `1635760798000`, expected a string").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_payloads_javascript_accepts_are_ingested_as_the_original_does() {
    let db = TestDb::with_fixture(Some(TYPE_RECORDER)).await;
    let server = RunningServer::start(&db, &[]).await;
    let data = |event: &str, extra: Value| {
        let mut data = json!({"event": event, "properties": {"kept": 1}});
        data.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        data
    };
    let site = "http://127.0.0.1:8000";
    // Epoch milliseconds: `new Date(1635760798000)`, skew-corrected against sent_at (= now here).
    server
        .send(json!(["u1", null, site, data("ts-number", json!({"timestamp": 1635760798000_i64})), 2, NOW, NOW]))
        .await;
    // Without sent_at the original's `DateTime.fromISO(number)` is invalid and the insert fails;
    // here the client's time is kept (README, differences).
    server
        .send(json!([
            "u1",
            null,
            site,
            data("ts-number-no-sent-at", json!({"timestamp": 1635760798000_i64})),
            2,
            NOW,
            null
        ]))
        .await;
    // `Duration.fromMillis("2000")` is two seconds.
    server.send(json!(["u1", null, site, data("offset-string", json!({"offset": "2000"})), 2, NOW, NOW])).await;
    // A falsy timestamp falls through to the offset; `Number([5])` is 5.
    server
        .send(json!(["u1", null, site, data("offset-array", json!({"timestamp": 0, "offset": [5]})), 2, NOW, NOW]))
        .await;
    // Numbers where strings are expected: `String(42.0)` is "42", a team id 2.0 is 2, a numeric
    // ip is truthy and stored as sent.
    server.send(json!([42.0, 3232235777_i64, site, data("numbers", json!({})), 2.0, NOW, NOW])).await;
    // No distinct id: the original stores the event under `String(undefined)`.
    server.send(json!([null, null, null, data("no-distinct-id", json!({})), 2, NOW, NOW])).await;
    // `$set` spread as JavaScript does (`{...properties.$set, ...data.$set}`); null properties are `{}`.
    server.send(json!(["u2", null, site, {"event": "set-string", "properties": null, "$set": "ab", "$set_once": 0}, 2, NOW, NOW])).await;

    let (_, properties, timestamp) = server.event_row("ts-number").await;
    assert_eq!(timestamp, "2021-11-01T09:59:58.000Z");
    assert_eq!(
        properties["seen"],
        json!({"timestamp": "number", "offset": "undefined", "distinct_id": "string", "ip": "object"})
    );
    assert_eq!(properties["kept"], json!(1));
    assert_eq!(server.event_row("ts-number-no-sent-at").await.2, "2021-11-01T09:59:58.000Z");
    let (_, properties, timestamp) = server.event_row("offset-string").await;
    assert_eq!(timestamp, "2021-11-01T09:59:58.000Z");
    assert_eq!(properties["seen"]["offset"], json!("string"));
    assert_eq!(server.event_row("offset-array").await.2, "2021-11-01T09:59:59.995Z");
    let (distinct_id, properties, _) = server.event_row("numbers").await;
    assert_eq!(distinct_id, "42");
    assert_eq!(properties["$ip"], json!(3232235777_i64));
    assert_eq!(properties["seen"]["ip"], json!("number"));
    assert_eq!(server.event_row("no-distinct-id").await.0, "undefined");
    let (_, properties, _) = server.event_row("set-string").await;
    assert_eq!(properties["$set"], json!({"0": "a", "1": "b"}));
    assert!(properties.get("$set_once").is_none(), "{properties}");
    let person: Value = sqlx::query_scalar(
        "SELECT p.properties FROM posthog_person p JOIN posthog_persondistinctid d ON d.person_id = p.id \
         WHERE d.distinct_id = 'u2'",
    )
    .fetch_one(&server.pool)
    .await
    .unwrap();
    assert_eq!(person, json!({"0": "a", "1": "b"}));
    server.stop().await;
}

/// The reference's `run.ts` adds `$plugins_*` to the event object it passed in: they are stored
/// when the plugin changed that object in place (or threw), not when it returned a new one.
const SHAPES: &str = r#"
    export function processEvent(event) {
        if (event.event === 'new-object') {
            return { ...event, properties: { ...event.properties, fresh: true } }
        }
        if (event.event === 'throw-string') {
            throw 'just text'
        }
        event.properties.touched = true
        if (event.event === 'throw-error') {
            throw new Error('boom')
        }
        return event
    }
"#;

async fn property_definition_exists(pool: &sqlx::PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT exists(SELECT 1 FROM posthog_propertydefinition WHERE name = $1)")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn event_args(name: &str) -> Value {
    json!(["shapes-user", null, "http://127.0.0.1:8000", {"event": name, "properties": {"a": 1}}, 2, NOW, NOW])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_properties_land_on_the_event_object_passed_in_only() {
    let db = TestDb::with_fixture(Some(SHAPES)).await;
    let server = RunningServer::start(&db, &[]).await;

    server.send(event_args("new-object")).await;
    let (_, properties, _) = server.event_row("new-object").await;
    assert_eq!(properties, json!({"a": 1, "fresh": true}), "no $plugins_* on a returned new object");
    for name in ["$plugins_succeeded", "$plugins_failed", "$plugins_deferred"] {
        assert!(!property_definition_exists(&server.pool, name).await, "{name}");
    }

    server.send(event_args("same-object")).await;
    let (_, properties, _) = server.event_row("same-object").await;
    assert_eq!(
        properties,
        json!({"a": 1, "touched": true, "$plugins_succeeded": ["test-maxmind-plugin (39)"], "$plugins_failed": [], "$plugins_deferred": []})
    );
    assert!(property_definition_exists(&server.pool, "$plugins_succeeded").await);

    server.send(event_args("throw-error")).await;
    let (_, properties, _) = server.event_row("throw-error").await;
    assert_eq!(properties["$plugins_failed"], json!(["test-maxmind-plugin (39)"]));
    assert_eq!(properties["touched"], json!(true));
    server.stop().await;
}

async fn config_error(pool: &sqlx::PgPool, message: &str) -> Value {
    wait_for(&format!("the error {message:?}"), || async {
        let error: Option<Value> =
            sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = 39").fetch_one(pool).await.unwrap();
        error.filter(|error| error["message"] == message)
    })
    .await
}

/// `processError`: a thrown string is `{message, time}`; an error object adds `name`, `stack`
/// (V8's shape: `Name: message` first) and the event as it was when the plugin threw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_config_errors_have_the_original_fields() {
    let db = TestDb::with_fixture(Some(SHAPES)).await;
    let server = RunningServer::start(&db, &[]).await;

    server.send(event_args("throw-string")).await;
    let error = config_error(&server.pool, "just text").await;
    let mut keys: Vec<&String> = error.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["message", "time"], "{error}");
    // Still ingested, with the failure recorded.
    assert_eq!(server.event_row("throw-string").await.1["$plugins_failed"], json!(["test-maxmind-plugin (39)"]));

    server.send(event_args("throw-error")).await;
    let error = config_error(&server.pool, "boom").await;
    let mut keys: Vec<&String> = error.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["event", "message", "name", "stack", "time"], "{error}");
    assert_eq!(error["name"], "Error");
    assert!(error["stack"].as_str().unwrap().starts_with("Error: boom\n    at processEvent"), "{error}");
    let event = &error["event"];
    assert_eq!(event["event"], "throw-error");
    assert_eq!(event["properties"], json!({"a": 1, "touched": true}), "as it was at the throw");
    assert_eq!(event["distinct_id"], "shapes-user");
    assert_eq!(event["team_id"], 2);
    server.stop().await;
}

/// A TypeScript plugin as written against the original: the scaffold's types imported from a
/// package the server does not provide, used in types only (Babel erases the import), and the
/// `meta.geoip.locate` record with its `undefined` fields.
const TYPED_GEOIP: &str = r#"
import { PluginEvent, PluginMeta } from 'posthog-plugins'
import type { City } from '@maxmind/geoip2-node'

export async function processEvent(event: PluginEvent, { geoip }: PluginMeta): Promise<PluginEvent> {
    const city: City | null = await geoip.locate(event.properties?.ip as string)
    event.properties = {
        ...event.properties,
        keys: Object.keys(city as object),
        postalUndefined: city?.postal === undefined,
        postalIn: 'postal' in (city as object),
        json: JSON.stringify(city),
        missing: await geoip.locate('10.0.0.1'),
    }
    return event
}
"#;

/// JSON.stringify of what the original's `geoip.locate('81.2.69.142')` gives on the GeoLite2 test
/// database (`@maxmind/geoip2-node` 3.0.0 through v8.serialize, in Node 20).
const LONDON_JSON: &str = r#"{"continent":{"code":"EU","geonameId":6255148,"names":{"de":"Europa","en":"Europe","es":"Europa","fr":"Europe","ja":"ヨーロッパ","pt-BR":"Europa","ru":"Европа","zh-CN":"欧洲"}},"country":{"geonameId":2635167,"isoCode":"GB","names":{"de":"Vereinigtes Königreich","en":"United Kingdom","es":"Reino Unido","fr":"Royaume-Uni","ja":"イギリス","pt-BR":"Reino Unido","ru":"Великобритания","zh-CN":"英国"}},"registeredCountry":{"geonameId":6252001,"isoCode":"US","names":{"de":"USA","en":"United States","es":"Estados Unidos","fr":"États-Unis","ja":"アメリカ合衆国","pt-BR":"Estados Unidos","ru":"США","zh-CN":"美国"},"isInEuropeanUnion":false},"traits":{"isAnonymous":false,"isAnonymousProxy":false,"isAnonymousVpn":false,"isHostingProvider":false,"isLegitimateProxy":false,"isPublicProxy":false,"isResidentialProxy":false,"isSatelliteProvider":false,"isTorExitNode":false,"ipAddress":"81.2.69.142","network":"81.2.69.142/31"},"city":{"geonameId":2643743,"names":{"de":"London","en":"London","es":"Londres","fr":"Londres","ja":"ロンドン","pt-BR":"Londres","ru":"Лондон"}},"location":{"accuracyRadius":10,"latitude":51.5142,"longitude":-0.0931,"timeZone":"Europe/London"},"subdivisions":[{"geonameId":6269131,"isoCode":"ENG","names":{"en":"England","es":"Inglaterra","fr":"Angleterre","pt-BR":"Inglaterra"}}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_plugin_with_type_only_imports_gets_the_original_geoip_record() {
    let db = TestDb::with_fixture(Some(TYPED_GEOIP)).await;
    // TypeScript in the plugin's source file, compiled as `index.ts` as the reference does.
    let mmdb = std::fs::read("/work/shared/testdata/GeoLite2-City-Test.mmdb.br").expect("the GeoLite2 test fixture");
    sqlx::query(
        "INSERT INTO posthog_pluginattachment (key, content_type, file_name, file_size, contents, plugin_config_id, team_id)
         VALUES ($1, 'vnd.maxmind.maxmind-db', $2, $3, $4, NULL, NULL)",
    )
    .bind(plugin_server::geoip::MMDB_ATTACHMENT_KEY)
    .bind(format!("GeoLite2-City-{}.mmdb.br", chrono::Local::now().format("%Y-%m-%d")))
    .bind(mmdb.len() as i32)
    .bind(mmdb)
    .execute(&db.pool)
    .await
    .unwrap();
    let server = RunningServer::start(&db, &[("DISABLE_MMDB", "false")]).await;

    server.send(json!(["geo-user", null, "http://127.0.0.1:8000", {"event": "located", "properties": {"ip": "81.2.69.142"}}, 2, NOW, NOW])).await;
    let (_, properties, _) = server.event_row("located").await;
    assert_eq!(
        properties["keys"],
        json!([
            "continent",
            "country",
            "maxmind",
            "registeredCountry",
            "representedCountry",
            "traits",
            "city",
            "location",
            "postal",
            "subdivisions"
        ])
    );
    assert_eq!(properties["postalUndefined"], json!(true));
    assert_eq!(properties["postalIn"], json!(true));
    assert_eq!(properties["json"], json!(LONDON_JSON));
    assert_eq!(properties["missing"], Value::Null);
    let error: Option<Value> = sqlx::query_scalar("SELECT error FROM posthog_pluginconfig WHERE id = 39")
        .fetch_one(&server.pool)
        .await
        .unwrap();
    assert_eq!(error, None, "the plugin loaded and ran");
    server.stop().await;
}

/// Replaces Node 20's rendering of ERR_INVALID_URL by the one the original's Node gives
/// (`TypeError [ERR_INVALID_URL]: Invalid URL` from toString() and the stack).
fn with_original_url_errors(value: &mut Value) {
    match value {
        Value::String(text) if text == "TypeError: Invalid URL" => {
            *text = "TypeError [ERR_INVALID_URL]: Invalid URL".into()
        }
        Value::Array(items) => items.iter_mut().for_each(with_original_url_errors),
        Value::Object(fields) => fields.values_mut().for_each(with_original_url_errors),
        _ => {}
    }
}

/// `new URL()` / `URLSearchParams` in a plugin give what Node 20 gives for the same calls
/// (tests/data/url_cases.js run by Node 20 wrote tests/data/url_node20.json).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_and_search_params_behave_as_in_node() {
    let plugin = format!(
        "{}\nexport function processEvent(event) {{ event.properties.url = urlCases(); return event }}\n",
        include_str!("data/url_cases.js")
    );
    let db = TestDb::with_fixture(Some(&plugin)).await;
    let server = RunningServer::start(&db, &[]).await;
    server
        .send(json!(["url-user", null, "http://127.0.0.1:8000", {"event": "urls", "properties": {}}, 2, NOW, NOW]))
        .await;
    let (_, properties, _) = server.event_row("urls").await;
    let mut expected: Value = serde_json::from_str(include_str!("data/url_node20.json")).unwrap();
    with_original_url_errors(&mut expected);
    let actual = &properties["url"];
    for (index, (case, node)) in expected["parse"].as_array().unwrap().iter().map(|c| (&c[0], &c[1])).enumerate() {
        assert_eq!(&actual["parse"][index][1], node, "new URL(...{case})");
    }
    for section in ["steps", "params", "errors", "json"] {
        assert_eq!(actual[section], expected[section], "{section}");
    }
    server.stop().await;
}
