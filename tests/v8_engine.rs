//! The V8 engine on its own (src/plugins/runtime/v8): Intl and V8's error texts, the heap limit
//! (that call fails, the isolate is dead, another isolate keeps working), the CPU deadline on a
//! loop and a regex bomb, promises and host async ops, host functions, values in and out
//! (hostile ones included), console capture, the bare sandbox, realms, and isolates on several
//! threads.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use plugin_server::plugins::runtime::v8::{
    ConsoleLevel, ConsoleLine, EngineError, HostFuture, Outcome, RealmId, SourceKind, V8Isolate, V8Options,
};
use plugin_server::plugins::runtime::{JsError, MetaError, Thrown};
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

fn fresh() -> V8Isolate {
    match V8Isolate::new(V8Options::default()) {
        Ok(isolate) => isolate,
        Err(error) => panic!("no isolate: {error}"),
    }
}

fn script(code: &str) -> V8Isolate {
    let mut isolate = fresh();
    if let Err(error) = isolate.load(SourceKind::Script, code, "plugin.js", SECOND) {
        panic!("loading failed: {error}");
    }
    isolate
}

/// A call with room for the hostile values' work on a loaded machine (deadlines are tested apart).
fn call(isolate: &mut V8Isolate, name: &str, args: &[Value]) -> Result<Value, EngineError> {
    match isolate.call(name, args, 20 * SECOND)? {
        Outcome::Done(value) => Ok(value),
        Outcome::Pending(_) => panic!("{name} is still pending"),
    }
}

fn js_error(result: Result<Value, EngineError>) -> JsError {
    match result {
        Err(EngineError::Js(error)) => error,
        other => panic!("expected a JS error, got {other:?}"),
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match runtime {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => panic!("no runtime: {error}"),
    }
}

#[test]
fn intl_formats_like_node() {
    let mut isolate = script(
        "function formats() {
            return [
                new Date(Date.UTC(2021, 10, 1, 23, 30)).toLocaleString('en-GB', { timeZone: 'Asia/Tokyo' }),
                new Intl.NumberFormat('de-DE', { style: 'currency', currency: 'EUR' }).format(1234.5),
                'ä'.localeCompare('z', 'de'),
            ]
        }",
    );
    let formats = call(&mut isolate, "formats", &[]).ok();
    assert_eq!(formats, Some(json!(["02/11/2021, 08:30:00", "1.234,50\u{a0}€", -1])));
    assert!(plugin_server::plugins::runtime::v8::version().starts_with("10.2."));
}

#[test]
fn errors_carry_v8_messages_and_stacks() {
    let mut isolate = script(
        "function plan(billing) { return billing.plan }
         function split(candidate) { return candidate.split(',') }
         function recurse() { return recurse() }
         function throwString() { throw 'just a string' }
         function throwNumber() { throw 42 }
         function retry() { const e = new Error('again'); e.__posthogRetryError = true; throw e }",
    );
    let error = js_error(call(&mut isolate, "plan", &[]));
    assert_eq!(
        (error.name.as_str(), error.message.as_str()),
        ("TypeError", "Cannot read properties of undefined (reading 'plan')")
    );
    let stack = error.stack.unwrap_or_default();
    assert!(
        stack.starts_with("TypeError: Cannot read properties of undefined (reading 'plan')\n    at plan (plugin.js:1:"),
        "{stack}"
    );
    let error = js_error(call(&mut isolate, "split", &[json!(5)]));
    assert_eq!(error.message, "candidate.split is not a function");
    let error = js_error(call(&mut isolate, "recurse", &[]));
    assert_eq!((error.name.as_str(), error.message.as_str()), ("RangeError", "Maximum call stack size exceeded"));
    let error = js_error(call(&mut isolate, "throwString", &[]));
    assert_eq!((error.thrown, error.message.as_str()), (Thrown::String, "just a string"));
    let error = js_error(call(&mut isolate, "throwNumber", &[]));
    assert_eq!((error.thrown, error.message.as_str()), (Thrown::Primitive, "42"));
    assert!(js_error(call(&mut isolate, "retry", &[])).retry);
    // The isolate keeps working after every one of them.
    assert!(matches!(call(&mut isolate, "split", &[json!("a,b")]), Ok(v) if v == json!(["a", "b"])));

    let mut broken = fresh();
    let error = match broken.load(SourceKind::Script, "function (", "broken.js", SECOND) {
        Err(EngineError::Js(error)) => error,
        other => panic!("expected a syntax error, got {other:?}"),
    };
    assert_eq!(
        (error.name.as_str(), error.message.as_str()),
        ("SyntaxError", "Function statements require a function name")
    );
    assert!(error.stack.unwrap_or_default().starts_with("broken.js:1\n"));
    assert!(matches!(broken.call("missing", &[], SECOND), Err(EngineError::NotFound(name)) if name == "missing"));
}

#[test]
fn heap_limit_ends_the_call_and_another_isolate_keeps_working() {
    let options = V8Options { heap_limit_bytes: 32 * 1024 * 1024, ..V8Options::default() };
    let mut greedy = match V8Isolate::new(options.clone()) {
        Ok(isolate) => isolate,
        Err(error) => panic!("{error}"),
    };
    let mut neighbour = match V8Isolate::new(options) {
        Ok(isolate) => isolate,
        Err(error) => panic!("{error}"),
    };
    let code = "function grow() { const all = []; for (;;) all.push({ n: Math.random(), s: 'x' + Math.random() }) }
                function ok() { return 'fine' }";
    for isolate in [&mut greedy, &mut neighbour] {
        assert!(isolate.load(SourceKind::Script, code, "plugin.js", SECOND).is_ok());
    }
    let started = Instant::now();
    let result = greedy.call("grow", &[], Duration::from_secs(30));
    assert!(matches!(result, Err(EngineError::HeapLimit(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(greedy.is_dead());
    assert!(matches!(greedy.call("ok", &[], SECOND), Err(EngineError::HeapLimit(_))));
    drop(greedy);
    assert_eq!(call(&mut neighbour, "ok", &[]).ok(), Some(json!("fine")));
    // A fresh isolate after the dead one was dropped works too.
    let mut fresh = script("function ok() { return 1 }");
    assert_eq!(call(&mut fresh, "ok", &[]).ok(), Some(json!(1)));
}

#[test]
fn array_buffers_have_a_budget_and_the_isolate_lives_on() {
    let options = V8Options { array_buffer_limit_bytes: 64 * 1024 * 1024, ..V8Options::default() };
    let mut isolate = match V8Isolate::new(options) {
        Ok(isolate) => isolate,
        Err(error) => panic!("{error}"),
    };
    // 64 × 16 MiB, every buffer kept and written to: 1 GiB without the budget.
    let code = "function hoard(kind) {
                    const kept = [];
                    for (let i = 0; i < 64; i++) {
                        const bytes = kind === 'view' ? new Uint8Array(16 << 20) : new Uint8Array(new ArrayBuffer(16 << 20));
                        bytes.fill(1);
                        kept.push(bytes);
                    }
                    return kept.length;
                }
                function small() { return new Uint8Array(1 << 20).fill(2)[5] }";
    assert!(isolate.load(SourceKind::Script, code, "plugin.js", SECOND).is_ok());
    for kind in ["buffer", "view"] {
        match call(&mut isolate, "hoard", &[json!(kind)]) {
            Err(EngineError::Js(error)) => {
                assert_eq!(
                    (error.name.as_str(), error.message.as_str()),
                    ("RangeError", "Array buffer allocation failed")
                );
            }
            other => panic!("{kind}: {other:?}"),
        }
        assert!(!isolate.is_dead());
        // The isolate lives on: the failed call's buffers are garbage, freed for the next ones.
        assert_eq!(call(&mut isolate, "small", &[]).ok(), Some(json!(2)));
    }
    let stats = isolate.array_buffers();
    assert!(stats.refused >= 2, "{stats:?}");
    assert!(stats.used <= stats.budget, "{stats:?}");
    isolate.collect_garbage();
    assert!(isolate.array_buffers().used < 16 * 1024 * 1024, "{:?}", isolate.array_buffers());
}

#[test]
fn deadline_stops_a_loop_and_a_regex_bomb() {
    let mut isolate = script(
        "function spin() { for (;;) {} }
         function bomb() { return /(a+)+b/.test('a'.repeat(40)) }
         function ok(x) { return x + 1 }",
    );
    for name in ["spin", "bomb"] {
        let started = Instant::now();
        let result = isolate.call(name, &[], Duration::from_millis(200));
        assert!(matches!(result, Err(EngineError::Timeout(_))), "{name}: {result:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{name} took {:?}", started.elapsed());
        // The isolate is usable afterwards: the termination does not leak into the next call.
        assert_eq!(call(&mut isolate, "ok", &[json!(1)]).ok(), Some(json!(2)));
    }
    // A loop at load time stops too.
    let mut looping = fresh();
    let result = looping.load(SourceKind::Script, "while (true) {}", "plugin.js", Duration::from_millis(100));
    assert!(matches!(result, Err(EngineError::Timeout(_))), "{result:?}");
}

#[test]
fn promises_and_host_async_ops() {
    let mut isolate = fresh();
    let started = Rc::new(Cell::new(0));
    let counter = started.clone();
    let registered = isolate.register_async("lookup", move |args| -> HostFuture {
        counter.set(counter.get() + 1);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            match args.first().and_then(Value::as_str) {
                Some("bad") => Err(MetaError::named("TypeError", "no such key")),
                Some(key) => Ok(json!({ "value": format!("value of {key}") })),
                None => Ok(Value::Null),
            }
        })
    });
    assert!(registered.is_ok());
    assert!(isolate.register_async("forever", |_| -> HostFuture { Box::pin(futures::future::pending()) }).is_ok());
    let code = "
        export async function twice(key) {
            const [a, b] = await Promise.all([lookup(key), lookup(key + '!')])
            return a.value + ' / ' + b.value
        }
        export async function caught() {
            try { await lookup('bad') } catch (e) { return e.name + ': ' + e.message }
        }
        export async function rejects() { await lookup('bad') }
        export async function plain(x) { await null; return x * 2 }
        export function never() { return new Promise(() => {}) }
        export function waits() { return forever() }
        export function fireAndForget() {
            Promise.reject(new Error('nobody listens'))
            Promise.reject(new Error('handled later')).catch(() => {})
            return 1
        }";
    assert!(isolate.load(SourceKind::Module, code, "index.ts", SECOND).is_ok());
    let main = RealmId::MAIN;
    let result = block_on(async {
        (
            isolate.call_async(main, "twice", &[json!("k")], SECOND, SECOND).await,
            isolate.call_async(main, "caught", &[], SECOND, SECOND).await,
            isolate.call_async(main, "rejects", &[], SECOND, SECOND).await,
            isolate.call_async(main, "plain", &[json!(21)], SECOND, SECOND).await,
            isolate.call_async(main, "never", &[], SECOND, SECOND).await,
            isolate.call_async(main, "waits", &[], SECOND, Duration::from_millis(50)).await,
        )
    });
    assert_eq!(result.0.ok(), Some(json!("value of k / value of k!")));
    assert_eq!(result.1.ok(), Some(json!("TypeError: no such key")));
    let error = js_error(result.2);
    assert_eq!((error.name.as_str(), error.message.as_str()), ("TypeError", "no such key"));
    assert_eq!(result.3.ok(), Some(json!(42)));
    assert!(matches!(result.4, Err(EngineError::NeverSettles)));
    assert!(matches!(result.5, Err(EngineError::PromiseTimeout(_))));
    assert_eq!(started.get(), 4);
    // Only a rejection nobody handles is reported (not the calls' own rejected promises).
    assert!(isolate.take_unhandled_rejections(SECOND).is_empty());
    assert_eq!(isolate.call("fireAndForget", &[], SECOND).ok(), Some(Outcome::Done(json!(1))));
    let unhandled: Vec<String> = isolate.take_unhandled_rejections(SECOND).into_iter().map(|e| e.message).collect();
    assert_eq!(unhandled, vec!["nobody listens".to_string()]);
    // A plain (sync) call of an async function settles within the call when nothing waits.
    assert_eq!(isolate.call("plain", &[json!(1)], SECOND).ok(), Some(Outcome::Done(json!(2))));

    // Top-level await in a module waits like a call.
    let mut awaiting = isolate_with_lookup();
    let loaded = awaiting.load(SourceKind::Module, "export const v = await lookup('x')", "index.ts", SECOND);
    assert!(matches!(loaded, Ok(Outcome::Pending(_))), "{loaded:?}");
}

fn isolate_with_lookup() -> V8Isolate {
    let mut isolate = fresh();
    let registered = isolate.register_async("lookup", |_| -> HostFuture { Box::pin(async { Ok(json!(1)) }) });
    assert!(registered.is_ok());
    isolate
}

#[test]
fn host_functions_are_called_synchronously() {
    let mut isolate = fresh();
    let calls = Rc::new(Cell::new(0));
    let counter = calls.clone();
    let registered = isolate.register_function("add", move |args| {
        counter.set(counter.get() + 1);
        let numbers: Option<Vec<f64>> = args.iter().map(Value::as_f64).collect();
        numbers.map(|n| json!(n.iter().sum::<f64>())).ok_or_else(|| MetaError::named("TypeError", "numbers only"))
    });
    assert!(registered.is_ok());
    assert!(isolate.register_function("echo", |args| Ok(Value::Array(args))).is_ok());
    let code = "
        function sum() { return add(1, 2, 3.5) }
        function refused() { try { add('x') } catch (e) { return [e instanceof Error, e.name, e.message] } }
        function echoes() { const d = new Date(Date.UTC(2020, 0, 1)); return echo(d, undefined, [undefined, () => 1], { f() {}, u: undefined, n: null }) }
        function hostile() { const a = []; a.length = 2 ** 31 - 1; return echo(a) }";
    assert!(isolate.load(SourceKind::Script, code, "plugin.js", SECOND).is_ok());
    assert_eq!(call(&mut isolate, "sum", &[]).ok(), Some(json!(6.5)));
    assert_eq!(call(&mut isolate, "refused", &[]).ok(), Some(json!([true, "TypeError", "numbers only"])));
    assert_eq!(
        call(&mut isolate, "echoes", &[]).ok(),
        Some(json!(["2020-01-01T00:00:00.000Z", null, [null, null], { "n": null }]))
    );
    let error = js_error(call(&mut isolate, "hostile", &[]));
    assert_eq!(error.name, "RangeError");
    assert!(error.message.starts_with("The plugin server refused the arguments of echo:"), "{}", error.message);
    assert_eq!(calls.get(), 2);
}

#[test]
fn values_in_and_out() {
    let mut isolate = script(
        "function same(x) { return x }
         function shapes() {
             const cyclic = { name: 'c' }; cyclic.self = cyclic
             const nested = []; let inner = nested; for (let i = 0; i < 1000; i++) { inner.push([]); inner = inner[0] }
             return {
                 numbers: [1, -0, 1.5, 1e21, 2 ** 53 + 2, NaN, Infinity],
                 text: 'é \"quoted\" \\n \\u0001 \\ud800 😀',
                 latin1: 'café ü ÿ \\u0080 \\u007f \"q\" \\\\ \\n \\t \\r \\u001f end',
                 date: new Date(0), boxed: [new String('s'), new Number(1), new Boolean(false)],
                 skipped: { f() {}, u: undefined, s: Symbol('x') }, sparse: [, 1],
                 map: new Map([[1, 2]]), cyclic, depth: JSON.stringify(nested).length > 0 ? nested : null,
             }
         }
         function huge() { const a = []; a.length = 2 ** 31 - 1; return a }
         function many() { return new Array(1100).fill(new Array(1000).fill(0)) }
         function wide() { const o = {}; for (let i = 0; i < 1000; i++) o['k' + i] = i; return new Array(1100).fill(o) }
         function long() { return new Array(100).fill('x'.repeat(1024 * 1024)) }
         function latin1Long() { return new Array(40).fill('é'.repeat(1024 * 1024)) }
         function getter() { return { get boom() { throw new Error('getter says no') } } }
         function toJson() { return { toJSON() { throw new TypeError('toJSON says no') } } }
         function bigint() { return { n: 10n } }
         function proxy() { return new Proxy({}, { ownKeys() { throw new Error('ownKeys says no') } }) }
         function undef() { return undefined }",
    );
    let event = json!({"event": "$pageview", "distinct_id": "😀", "properties": {"a": [1, 2.5, null, true], "b": {"c": "d"}}, "n": -7});
    assert_eq!(call(&mut isolate, "same", std::slice::from_ref(&event)).ok(), Some(event));
    let shapes = call(&mut isolate, "shapes", &[]).unwrap_or_default();
    assert_eq!(shapes["numbers"], json!([1, 0, 1.5, 1e21, 9007199254740994u64, null, null]));
    assert_eq!(shapes["text"], json!("é \"quoted\" \n \u{1} \u{fffd} 😀"));
    // A one-byte (Latin-1) string: written as UTF-8, escapes as JSON.stringify makes them.
    assert_eq!(shapes["latin1"], json!("café ü ÿ \u{80} \u{7f} \"q\" \\ \n \t \r \u{1f} end"));
    assert_eq!(shapes["date"], json!("1970-01-01T00:00:00.000Z"));
    assert_eq!(shapes["boxed"], json!(["s", 1, false]));
    assert_eq!(shapes["skipped"], json!({}));
    assert_eq!(shapes["sparse"], json!([null, 1]));
    assert_eq!(shapes["map"], json!({}));
    assert_eq!(shapes["cyclic"], json!({"name": "c", "self": null}));
    let mut depth = 0;
    let mut inner = &shapes["depth"];
    while let Some(first) = inner.get(0) {
        depth += 1;
        inner = first;
    }
    assert!((100..=120).contains(&depth), "{depth}");

    let refused = |r: Result<Value, EngineError>| match r {
        Err(EngineError::Refused(refused)) => refused.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(refused(call(&mut isolate, "huge", &[])).contains("claims a length of 2147483647"));
    assert!(refused(call(&mut isolate, "many", &[])).contains("more than 1000000 values"));
    assert!(refused(call(&mut isolate, "wide", &[])).contains("more than 1000000 values"));
    assert!(refused(call(&mut isolate, "long", &[])).contains("bytes"));
    // 40 M Latin-1 characters are 80 MB of UTF-8: over the budget though under it in characters.
    assert!(refused(call(&mut isolate, "latin1Long", &[])).contains("bytes"));
    assert_eq!(js_error(call(&mut isolate, "getter", &[])).message, "getter says no");
    assert_eq!(js_error(call(&mut isolate, "toJson", &[])).message, "toJSON says no");
    assert_eq!(js_error(call(&mut isolate, "bigint", &[])).message, "Do not know how to serialize a BigInt");
    assert_eq!(js_error(call(&mut isolate, "proxy", &[])).message, "ownKeys says no");
    assert_eq!(call(&mut isolate, "undef", &[]).ok(), Some(Value::Null));
    // Still healthy after all of that.
    assert_eq!(call(&mut isolate, "same", &[json!(1)]).ok(), Some(json!(1)));
}

#[test]
fn console_is_captured() {
    let mut isolate = script(
        "function logs() {
            console.log('a', { b: 1 }, [1, 'x'], 3, undefined, null)
            console.info('info'); console.warn('warn'); console.error(new Error('bad')); console.debug(Symbol('s'))
        }
        function flood() { for (let i = 0; i < 20000; i++) console.log(i) }",
    );
    assert!(call(&mut isolate, "logs", &[]).is_ok());
    let (lines, dropped) = isolate.take_console();
    let line = |level, text: &str| ConsoleLine { level, text: text.to_string() };
    assert_eq!(
        lines,
        vec![
            line(ConsoleLevel::Log, "a {\"b\":1} [1,\"x\"] 3 undefined null"),
            line(ConsoleLevel::Info, "info"),
            line(ConsoleLevel::Warn, "warn"),
            line(ConsoleLevel::Error, "Error: bad"),
            line(ConsoleLevel::Debug, "Symbol(s)"),
        ]
    );
    assert_eq!(dropped, 0);
    assert!(call(&mut isolate, "flood", &[]).is_ok());
    let (lines, dropped) = isolate.take_console();
    assert_eq!((lines.len(), dropped), (10_000, 10_000));
}

#[test]
fn nothing_of_node_or_the_process_is_reachable() {
    let mut isolate = script(
        "function globals() {
            return ['require', 'process', 'Buffer', 'setTimeout', 'module', 'global', '__dirname', 'fetch']
                .map((name) => typeof globalThis[name])
        }
        function atomicsWait() { return Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10) }",
    );
    assert_eq!(call(&mut isolate, "globals", &[]).ok(), Some(Value::from(vec!["undefined"; 8])));
    assert!(js_error(call(&mut isolate, "atomicsWait", &[])).message.contains("Atomics.wait cannot be called"));
    let mut module = fresh();
    let error = match module.load(SourceKind::Module, "import fs from 'fs'\nexport const x = fs", "index.ts", SECOND) {
        Err(EngineError::Js(error)) => error,
        other => panic!("expected an import error, got {other:?}"),
    };
    assert_eq!(error.message, "Cannot find module 'fs'");
}

#[test]
fn modules_function_bodies_and_realms() {
    let mut isolate = fresh();
    let loaded = isolate.load(
        SourceKind::FunctionBody,
        "exports.processEvent = (event) => ({ ...event, seen: true }); const hidden = 1",
        "index.js",
        SECOND,
    );
    assert!(loaded.is_ok(), "{loaded:?}");
    assert_eq!(call(&mut isolate, "processEvent", &[json!({"e": 1})]).ok(), Some(json!({"e": 1, "seen": true})));
    assert!(matches!(isolate.call("hidden", &[], SECOND), Err(EngineError::NotFound(_))));

    // Realms of one isolate do not see each other's globals.
    let other = match isolate.new_realm() {
        Ok(realm) => realm,
        Err(error) => panic!("{error}"),
    };
    assert!(isolate
        .load_in(other, SourceKind::Script, "globalThis.x = 'other'; function x_() { return x }", "b.js", SECOND)
        .is_ok());
    assert!(isolate
        .load(SourceKind::Script, "globalThis.x = 'main'; function x_() { return x }", "a.js", SECOND)
        .is_ok());
    let read = |isolate: &mut V8Isolate, realm| match isolate.call_in(realm, "x_", &[], SECOND) {
        Ok(Outcome::Done(value)) => value,
        other => panic!("{other:?}"),
    };
    assert_eq!(read(&mut isolate, other), json!("other"));
    assert_eq!(read(&mut isolate, RealmId::MAIN), json!("main"));
}

#[test]
fn isolates_on_several_threads() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || -> Result<u64, String> {
                let mut isolates: Vec<V8Isolate> = (0..3)
                    .map(|_| {
                        let mut isolate = V8Isolate::new(V8Options::default()).map_err(|e| e.to_string())?;
                        isolate
                            .load(
                                SourceKind::Script,
                                "function f(e) { return { ...e, n: e.n + 1 } }\nfunction spin() { for(;;){} }",
                                "p.js",
                                SECOND,
                            )
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(isolate)
                    })
                    .collect::<Result<_, _>>()?;
                let mut total = 0;
                for i in 0..300u64 {
                    let isolate = &mut isolates[(i % 3) as usize];
                    if i % 100 == 7 {
                        let timed_out = isolate.call("spin", &[], Duration::from_millis(20));
                        if !matches!(timed_out, Err(EngineError::Timeout(_))) {
                            return Err(format!("thread {t}: spin gave {timed_out:?}"));
                        }
                    }
                    match isolate.call("f", &[json!({"n": i})], SECOND) {
                        Ok(Outcome::Done(v)) if v["n"] == json!(i + 1) => total += 1,
                        other => return Err(format!("thread {t}: {other:?}")),
                    }
                }
                Ok(total)
            })
        })
        .collect();
    for thread in threads {
        match thread.join() {
            Ok(Ok(total)) => assert_eq!(total, 300),
            Ok(Err(error)) => panic!("{error}"),
            Err(_) => panic!("a thread panicked"),
        }
    }
}
