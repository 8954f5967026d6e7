//! Allow-listed imports and sandbox globals (reference 30 §5.1–5.2): crypto, zlib, url, Buffer,
//! TextEncoder/TextDecoder, jsonwebtoken, @posthog/plugin-scaffold, @posthog/plugin-contrib.

mod runtime_support;

use plugin_server::plugins::runtime::{CallKind, WorkerPool};
use runtime_support::*;
use serde_json::{json, Value};

async fn eval_module(code: &str) -> Value {
    let pool = WorkerPool::new(options(1, 5.0)).unwrap();
    load(&pool, 1, code, TestMeta::new()).await.unwrap_or_else(|e| panic!("{e}"));
    pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn crypto() {
    let out = eval_module(
        "import { createHash, createHmac, randomBytes, randomUUID } from 'crypto'
        export function runEveryMinute() {
            return [
                createHash('md5').update('abc').digest('hex'),
                createHash('sha1').update('abc').digest('hex'),
                createHash('sha256').update('a').update('bc').digest('hex'),
                createHash('sha512').update(Buffer.from('abc')).digest('base64').slice(0, 16),
                createHmac('sha256', 'key').update('The quick brown fox jumps over the lazy dog').digest('hex'),
                randomBytes(16).length,
                /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(randomUUID()),
                (() => { try { createHash('whirlpool') } catch (e) { return e.message } })(),
            ]
        }",
    )
    .await;
    assert_eq!(
        out,
        json!([
            "900150983cd24fb0d6963f7d28e17f72",
            "a9993e364706816aba3e25717850c26c9cd0d89d",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "3a81oZNherrMQXNJ",
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8",
            16,
            true,
            "Digest method not supported"
        ])
    );
}

/// `crypto.createSign` / `createVerify` (and one-shot `sign` / `verify`) with RS256 as
/// google-auth-library and jsonwebtoken use them: the signature verifies with the key's public
/// half outside the VM.
#[tokio::test]
async fn crypto_sign_and_verify() {
    use base64::Engine as _;
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let private = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let public = String::from_utf8(key.public_key_to_pem().unwrap()).unwrap();
    let code = "import { createSign, createVerify, sign, verify } from 'crypto'
        const PRIVATE = __PRIVATE__
        const PUBLIC = __PUBLIC__
        export function runEveryMinute() {
            const signature = createSign('RSA-SHA256').update('header.').update(Buffer.from('claims')).sign(PRIVATE, 'base64')
            const raw = createSign('sha256').update('header.claims').sign({ key: PRIVATE })
            return [
                signature,
                Buffer.isBuffer(raw) && raw.toString('base64') === signature,
                createVerify('RSA-SHA256').update('header.claims').verify(PUBLIC, signature, 'base64'),
                createVerify('sha256').update('header.claims').verify(Buffer.from(PUBLIC), raw),
                createVerify('sha256').update('header.claims').verify(PRIVATE, raw),
                createVerify('sha256').update('header.claimz').verify(PUBLIC, raw),
                createVerify('sha256').update('header.claims').verify(PUBLIC, 'bm9wZQ==', 'base64'),
                verify('sha256', Buffer.from('header.claims'), PUBLIC, sign('sha256', Buffer.from('header.claims'), PRIVATE)),
                (() => { try { createSign('whirlpool') } catch (e) { return e.message } })(),
                (() => { try { return createSign('sha256').update('x').sign('not a key') } catch (e) { return e.message } })(),
                (() => { try { return createSign('sha256').update('x').sign(42) } catch (e) { return e.name } })(),
            ]
        }"
    .replace("__PRIVATE__", &serde_json::to_string(&private).unwrap())
    .replace("__PUBLIC__", &serde_json::to_string(&public).unwrap());
    let out = eval_module(&code).await;
    let signature = base64::engine::general_purpose::STANDARD.decode(out[0].as_str().unwrap()).unwrap();
    let mut verifier = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
    verifier.update(b"header.claims").unwrap();
    assert!(verifier.verify(&signature).unwrap(), "the VM's signature verifies outside it");
    assert_eq!(
        out.as_array().unwrap()[1..],
        json!([
            true,
            true,
            true,
            true,
            false,
            false,
            true,
            "Invalid digest",
            "error:0909006C:PEM routines:get_name:no start line",
            "TypeError"
        ])
        .as_array()
        .unwrap()[..]
    );
}

#[tokio::test]
async fn zlib_and_buffer() {
    let out = eval_module(
        "const zlib = require('zlib')
        function runEveryMinute() {
            const text = 'hello hello hello hello'
            const b = Buffer.from(text)
            return [
                zlib.gunzipSync(zlib.gzipSync(text)).toString(),
                zlib.inflateSync(zlib.deflateSync(b)).toString('utf8'),
                Buffer.from('aGVsbG8=', 'base64').toString(),
                Buffer.from('hello').toString('base64'),
                Buffer.from('ff00', 'hex').toString('hex'),
                Buffer.concat([Buffer.from('a'), Buffer.from('b')]).toString(),
                Buffer.byteLength('héllo'),
                JSON.stringify(Buffer.from('hi')),
                new TextDecoder().decode(new TextEncoder().encode('grüße')),
                (() => { try { zlib.gunzipSync(Buffer.from('garbage')) } catch (e) { return 'threw' } })(),
            ]
        }",
    )
    .await;
    assert_eq!(
        out,
        json!([
            "hello hello hello hello",
            "hello hello hello hello",
            "hello",
            "aGVsbG8=",
            "ff00",
            "ab",
            6,
            "{\"type\":\"Buffer\",\"data\":[104,105]}",
            "grüße",
            "threw"
        ])
    );
}

#[tokio::test]
async fn url_and_search_params() {
    let out = eval_module(
        "import { URL as NodeURL } from 'url'
        export function runEveryMinute() {
            const u = new URL('https://user:pw@example.com:8080/a/b?x=1&y=two#frag')
            u.searchParams.append('z', 'a b')
            const p = new URLSearchParams({ q: 'fetched', n: '1' })
            p.set('n', '2')
            const rel = new NodeURL('../c?d=1', 'https://example.com/a/b/')
            return [u.protocol, u.host, u.hostname, u.port, u.pathname, u.searchParams.get('y'), u.hash,
                    u.href, u.origin, p.toString(), rel.href,
                    (() => { try { new URL('nope') } catch (e) { return e.name } })()]
        }",
    )
    .await;
    assert_eq!(
        out,
        json!([
            "https:",
            "example.com:8080",
            "example.com",
            "8080",
            "/a/b",
            "two",
            "#frag",
            "https://user:pw@example.com:8080/a/b?x=1&y=two&z=a+b#frag",
            "https://example.com:8080",
            "q=fetched&n=2",
            "https://example.com/a/c?d=1",
            "TypeError"
        ])
    );
}

#[tokio::test]
async fn jsonwebtoken() {
    let out = eval_module(
        "import jwt from 'jsonwebtoken'
        export function runEveryMinute() {
            const token = jwt.sign({ sub: '1234567890', name: 'John Doe', iat: 1516239022 }, 'your-256-bit-secret')
            return ['sign' in jwt, token.split('.')[0], jwt.verify(token, 'your-256-bit-secret').name, jwt.decode(token).sub,
                    (() => { try { jwt.verify(token, 'wrong') } catch (e) { return e.message } })()]
        }",
    )
    .await;
    assert_eq!(
        out,
        json!([true, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "John Doe", "1234567890", "invalid signature"])
    );
}

#[tokio::test]
async fn scaffold_and_contrib() {
    let out = eval_module(
        "import { RetryError } from '@posthog/plugin-scaffold'
        import { createBuffer } from '@posthog/plugin-contrib'
        export async function runEveryMinute() {
            const e = new RetryError('again')
            const flushed = []
            const buffer = createBuffer({ limit: 10, timeoutSeconds: 0.2, onFlush: async (batch) => { flushed.push(batch) } })
            buffer.add('a', 4); buffer.add('b', 4); buffer.add('c', 4)
            await new Promise(r => __jestSetTimeout(r, 400))
            return [e instanceof Error, e instanceof RetryError, e.name, e.message, RetryError === globalThis.RetryError, flushed]
        }",
    )
    .await;
    assert_eq!(out, json!([true, true, "Error", "again", true, [["a", "b"], ["c"]]]));
}

#[tokio::test]
async fn test_console_module_in_test_env() {
    let file = tempfile::tempdir().unwrap().keep().join("tmp").join("test-console.txt");
    let pool = WorkerPool::new(plugin_server::plugins::runtime::PoolOptions {
        test_console_file: Some(file.clone()),
        ..options(1, 5.0)
    })
    .unwrap();
    let code = "import { console as testConsole } from 'test-utils/write-to-file'
        export function runEveryMinute() { testConsole.reset(); testConsole.log('processEvent'); testConsole.log('onEvent', 'custom event'); return testConsole.read() }";
    load(&pool, 1, code, TestMeta::new()).await.unwrap();
    let out = pool.call(1, "runEveryMinute", vec![], CallKind::Task).await.unwrap();
    assert_eq!(out, json!([["processEvent"], ["onEvent", "custom event"]]));
    assert_eq!(
        plugin_server::plugins::runtime::read_test_console(&file),
        vec![json!(["processEvent"]), json!(["onEvent", "custom event"])]
    );
    // Without the option the module does not exist.
    let plain = WorkerPool::new(options(1, 5.0)).unwrap();
    let err = load(&plain, 1, code, TestMeta::new()).await.unwrap_err();
    assert!(err.to_string().contains("Cannot import 'test-utils/write-to-file'"), "{err}");
}
