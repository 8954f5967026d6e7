//! Facade modules (`runtime/modules`): libraries the reference lets plugins import, evaluated in
//! the VM only when a plugin requires them, with their host work behind `MetaBindings::call_from`.

mod runtime_support;

use plugin_server::plugins::runtime::{CallKind, WorkerPool};
use runtime_support::*;
use serde_json::{json, Value};

async fn run_task(code: &str) -> Value {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    load(&pool, 1, code, TestMeta::new()).await.unwrap_or_else(|e| panic!("{e}"));
    pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap_or_else(|e| panic!("{e}"))
}

/// `stream` as the reference offers it (`{ PassThrough }`): written chunks come out as 'data'
/// events, by async iteration and through `pipe`, with 'end' and 'finish'.
#[tokio::test]
async fn stream_pass_through() {
    let out = run_task(
        "import { PassThrough } from 'stream'
        export async function runEveryMinute() {
            const seen = []
            const a = new PassThrough()
            a.on('data', (chunk) => seen.push(chunk.toString()))
            const ended = new Promise((resolve) => a.on('end', resolve))
            const finished = new Promise((resolve) => a.on('finish', resolve))
            a.write('he')
            a.write(Buffer.from('llo'))
            a.end(' world')
            await Promise.all([ended, finished])
            const b = new PassThrough()
            const c = new PassThrough({ objectMode: true })
            b.pipe(new PassThrough()).pipe(c)
            b.end('piped')
            const parts = []
            for await (const part of c) parts.push(part.toString())
            return [seen.join(''), parts, typeof require('stream').PassThrough]
        }",
    )
    .await;
    assert_eq!(out, json!(["hello world", ["piped"], "function"]));
}

/// Facades that exist only for other facades (`events`) are not importable: the reference's
/// message, at load, like any module outside its list.
#[tokio::test]
async fn internal_facades_are_not_importable() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    for code in [
        "import { EventEmitter } from 'events'\nexport function f() { return EventEmitter }",
        "const e = require('events')",
    ] {
        let error = load(&pool, 1, code, TestMeta::new()).await.unwrap_err().to_string();
        assert_eq!(error, "/index.ts: Cannot import 'events'! This package is not provided by PostHog in plugins.");
    }
}

/// A facade costs nothing to VMs that do not import it: it is compiled on first use, so a VM
/// whose plugin requires it is larger by at least the facade's code, and one that does not is as
/// small as before facades existed.
#[tokio::test]
async fn facades_load_lazily() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let plain = "export function runEveryMinute() { return 1 }";
    let importing = "import { Client } from 'pg'\nexport function runEveryMinute() { return typeof Client }";
    let unused = "import { Client } from 'pg'\nexport function runEveryMinute() { return 1 }";
    let unused_faker = "import * as faker from 'faker'\nexport function runEveryMinute() { return 1 }";
    load(&pool, 1, plain, TestMeta::new()).await.unwrap();
    load(&pool, 2, importing, TestMeta::new()).await.unwrap();
    load(&pool, 3, unused, TestMeta::new()).await.unwrap();
    load(&pool, 4, unused_faker, TestMeta::new()).await.unwrap();
    for id in [1, 2, 3, 4] {
        pool.call(id, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    }
    let memory = |values: Vec<i64>| values.into_iter().sum::<i64>();
    let plain_bytes = memory(pool.memory_usage(1).await);
    let importing_bytes = memory(pool.memory_usage(2).await);
    let unused_bytes = memory(pool.memory_usage(3).await);
    assert!(importing_bytes > plain_bytes + 20_000, "pg + events loaded: {importing_bytes} vs {plain_bytes}");
    // An unused import is erased (as Babel does) and loads nothing.
    assert!(unused_bytes < plain_bytes + 2_000, "nothing loaded: {unused_bytes} vs {plain_bytes}");
    let unused_faker_bytes = memory(pool.memory_usage(4).await);
    assert!(unused_faker_bytes < plain_bytes + 2_000, "no faker: {unused_faker_bytes} vs {plain_bytes}");
}

/// `generic-pool` is the real library (3.7.1): a pool of factory-made resources with a maximum,
/// waiting acquirers, `use`, validation and drain/clear.
#[tokio::test]
async fn generic_pool_is_the_real_library() {
    let out = run_task(
        "import * as genericPool from 'generic-pool'
        export async function runEveryMinute() {
            let made = 0
            const destroyed = []
            const pool = genericPool.createPool({
                create: async () => ({ id: ++made }),
                destroy: async (r) => { destroyed.push(r.id) },
            }, { max: 2, min: 0 })
            const a = await pool.acquire()
            const b = await pool.acquire()
            const waiting = pool.acquire()
            const pending = pool.pending
            await pool.release(a)
            const c = await waiting
            await pool.release(b)
            await pool.release(c)
            const sizes = [pool.size, pool.available, pool.borrowed, pending]
            const used = await pool.use(async (r) => r.id * 10)
            await pool.drain()
            await pool.clear()
            return { ids: [a.id, b.id, c.id], sizes, used, made, destroyed: destroyed.sort(), keys: Object.keys(genericPool).sort() }
        }",
    )
    .await;
    assert_eq!(out["ids"], json!([1, 2, 1]));
    assert_eq!(out["sizes"], json!([2, 2, 0, 1]));
    assert!(out["used"] == json!(10) || out["used"] == json!(20), "{out}");
    assert_eq!(out["made"], json!(2));
    assert_eq!(out["destroyed"], json!([1, 2]));
    assert_eq!(out["keys"], json!(["DefaultEvictor", "Deque", "Pool", "PriorityQueue", "createPool"]));
}

/// An allowed facade imported but never used loads nothing and never fails (Babel erases the
/// import); one required in a branch that never runs is allowed too; a module the reference does
/// not offer still fails at load with its message, even in an unused branch.
#[tokio::test]
async fn imports_at_load_follow_the_reference() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let unused = "import { Client } from 'pg'\nexport function runEveryMinute() { return 1 }";
    let branch = "export function runEveryMinute(meta) { if (meta.config.never) { const pg = require('pg'); return pg } return 2 }";
    load(&pool, 1, unused, TestMeta::new()).await.unwrap();
    load(&pool, 2, branch, TestMeta::new()).await.unwrap();
    assert_eq!(pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap(), json!(1));
    assert_eq!(pool.call(2, "runEveryMinute", vec![], CallKind::Task).await.unwrap(), json!(2));
    for (module, code) in [
        ("fs", "import { readFileSync } from 'fs'\nexport function runEveryMinute() { return readFileSync }"),
        ("child_process", "export function runEveryMinute(meta) { if (meta.config.never) require('child_process') }"),
    ] {
        let error = load(&pool, 3, code, TestMeta::new()).await.unwrap_err().to_string();
        assert_eq!(
            error,
            format!("/index.ts: Cannot import '{module}'! This package is not provided by PostHog in plugins.")
        );
    }
}

/// What faker 5.5.3 gives on Node 20 after `faker.seed(123)` (`require('faker')` of the published
/// package): `datatype.number()`, `datatype.number({min: 1, max: 10})`, `name.firstName()`,
/// `internet.email()`, `datatype.uuid()`, `lorem.sentence()`,
/// `date.past(1, '2021-01-01T00:00:00Z')`, `helpers.createCard().name`, `random.alphaNumeric(8)`.
const FAKER_SEED_123: &str = r#"[69646, 8, "Edison", "Danielle_Pollich@yahoo.com", "b76cf6a9-7266-45ab-9730-b69ba27218b8",
    "Harum ullam pariatur quos est quod.", "2020-05-22T23:26:02.057Z", "Tonya Hand", "fvkf4h7h"]"#;

/// `faker` is the real library (5.5.3, `en`): values from its data, and after `faker.seed(123)`
/// the very values Node gives; `import * as faker` and `require('faker')` are the same object.
#[tokio::test]
async fn faker_is_the_real_library() {
    let code = "import * as faker from 'faker'
        export function processEvent(event) {
            const firstName = faker.name.firstName()
            const email = faker.internet.email()
            faker.seed(123)
            const seeded = [faker.datatype.number(), faker.datatype.number({ min: 1, max: 10 }), faker.name.firstName(),
                faker.internet.email(), faker.datatype.uuid(), faker.lorem.sentence(),
                faker.date.past(1, '2021-01-01T00:00:00Z').toISOString(), faker.helpers.createCard().name,
                faker.random.alphaNumeric(8)]
            const card = faker.helpers.createCard()
            event.properties = {
                ...event.properties,
                firstName,
                known: faker.definitions.name.first_name.includes(firstName),
                email,
                seeded,
                uuid: faker.datatype.uuid(),
                past: faker.date.past() instanceof Date && faker.date.past() < new Date(),
                card: Object.keys(card),
                paragraph: faker.lorem.paragraph().split(' ').length > 3,
                locale: faker.locale,
                same: faker === require('faker'),
            }
            return event
        }";
    let out = process(code, json!({"event": "e", "properties": {"a": 1}})).await.unwrap_or_else(|e| panic!("{e}"));
    let p = &out["properties"];
    assert_eq!(p["a"], json!(1));
    assert_eq!(p["known"], json!(true), "{out}");
    assert!(p["email"].as_str().unwrap().contains('@'), "{out}");
    assert_eq!(p["seeded"], serde_json::from_str::<Value>(FAKER_SEED_123).unwrap());
    let uuid = p["uuid"].as_str().unwrap();
    assert!(uuid.len() == 36 && uuid.chars().filter(|c| *c == '-').count() == 4, "{out}");
    assert_eq!(p["past"], json!(true));
    assert_eq!(
        p["card"],
        json!(["name", "username", "email", "address", "phone", "website", "company", "posts", "accountHistory"])
    );
    assert_eq!(p["paragraph"], json!(true));
    assert_eq!(p["locale"], json!("en"));
    assert_eq!(p["same"], json!(true));
}

/// Only the `en` locale is bundled (see the README): `faker.locale` switches (the object is
/// the plugin's own, not frozen), and every other locale of faker 5.5.3 gives `en`'s data, the
/// values Node gives for `en` (seed 123: `Maurine`, `Grantview`; Node's `de` gives `Jasmina`,
/// `Gürbigland`); a name faker does not know fails as on Node. Each VM has its own faker.
#[tokio::test]
async fn faker_locales_fall_back_to_en() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let code = "const faker = require('faker')
        function processEvent(event) {
            const before = faker.locale
            faker.locale = 'de'
            faker.seed(123)
            const de = [faker.locale, faker.name.firstName(), faker.address.city()]
            faker.setLocale('en')
            faker.seed(123)
            const en = [faker.locale, faker.name.firstName(), faker.address.city()]
            faker.locale = 'xx'
            let unknown = null
            try { faker.name.firstName() } catch (e) { unknown = e.name }
            faker.locale = 'de'
            event.properties = { before, de, en, unknown, locales: Object.keys(faker.locales).length }
            return event
        }";
    load(&pool, 1, code, TestMeta::new()).await.unwrap_or_else(|e| panic!("{e}"));
    load(&pool, 2, code, TestMeta::new()).await.unwrap_or_else(|e| panic!("{e}"));
    let event = json!({"event": "e", "properties": {}});
    let first = pool.call(1, "processEvent", vec![event.clone()], CallKind::Method).await.unwrap();
    assert_eq!(
        first["properties"],
        json!({
            "before": "en",
            "de": ["de", "Maurine", "Grantview"],
            "en": ["en", "Maurine", "Grantview"],
            "unknown": "TypeError",
            "locales": 47,
        })
    );
    // Config 1 left its faker on 'de'; config 2's is its own, still on 'en'.
    let second = pool.call(2, "processEvent", vec![event], CallKind::Method).await.unwrap();
    assert_eq!(second["properties"]["before"], json!("en"));
}

/// What importing faker costs a VM, against one that does not import it: printed (`--no-capture`)
/// for the README, bounded here. A VM that does not import it pays nothing (`facades_load_lazily`).
#[tokio::test]
async fn faker_cost() {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    let plain = "export function runEveryMinute() { return 1 }";
    let importing = "export function runEveryMinute() {
            const t0 = Date.now()
            const faker = require('faker')
            const t1 = Date.now()
            faker.name.firstName()
            return [t1 - t0, Date.now() - t1]
        }";
    load(&pool, 1, plain, TestMeta::new()).await.unwrap();
    load(&pool, 2, importing, TestMeta::new()).await.unwrap();
    pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    let times = pool.call(2, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    let plain_bytes: i64 = pool.memory_usage(1).await.into_iter().sum();
    let faker_bytes: i64 = pool.memory_usage(2).await.into_iter().sum();
    let added = faker_bytes - plain_bytes;
    let engine = std::env::var("JS_ENGINE").unwrap_or_else(|_| "v8".into());
    eprintln!(
        "faker on {engine}: require {} ms, first call {} ms, VM {plain_bytes} -> {faker_bytes} bytes (+{added})",
        times[0], times[1]
    );
    assert!(added > 100_000, "faker's code and data are in the VM: +{added}");
    assert!(added < 30 << 20, "faker adds under 30 MiB: +{added}");
}
