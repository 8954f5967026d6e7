//! PostHog's S3 export plugin, unmodified (tests/data/plugins), through the whole server against a
//! local S3 (moto, `tests/common/moto.rs`, which checks request signatures): events go in as
//! Celery tasks, objects come out in the bucket, and the test lists them, reads them back, decodes
//! them (gzip, brotli, none) and checks every line. When the upload fails (the bucket missing, the
//! S3 server down) the plugin's own retry (`RetryError` → the server's export retry job; in 0.0.3
//! the plugin's `uploadBatchToS3` job) delivers the batch later without losing an event.
//! Also the aws-sdk surface a plugin author relies on (callbacks, `.promise()`, outputs with
//! `Date`s and `Buffer`s, errors with `code`/`statusCode`), from a plugin's `processEvent`.

mod common;
mod export_support;

use std::collections::BTreeSet;
use std::io::Read;
use std::time::Duration;

use common::moto::{free_port, Moto};
use common::TestDb;
use export_support::{add_config, database_with_plugin, ExportServer, NOW, TEAM};
use plugin_server::sources::celery::PROCESS_EVENT_TASK;
use serde_json::{json, Map, Value};

/// A database with the standard team, `plugin_dir`'s plugin (id 70) and one enabled config per
/// entry of `configs` (ids 80, 81, …), then the server.
async fn start(plugin_dir: &str, configs: &[Value]) -> ExportServer {
    let files = ["index.ts", "plugin.json", "package.json", "LICENSE"];
    let db = database_with_plugin(plugin_dir, "s3-export-plugin", &files, "0.0.4").await;
    for (index, config) in configs.iter().enumerate() {
        add_config(&db, 80 + index as i32, config).await;
    }
    ExportServer::launch(db, "s3", &[])
}

/// The reference's standard fixture with `code` as its plugin (config 39), then the server.
async fn with_code(code: &str) -> ExportServer {
    ExportServer::launch(TestDb::with_fixture(Some(code)).await, "s3", &[])
}

/// `process_event_with_plugins` for events `event-{from}` … `event-{to - 1}` (property `n`).
async fn send(server: &ExportServer, range: std::ops::Range<u32>) {
    for n in range {
        server.send_event(json!({"event": format!("event-{n}"), "properties": {"n": n, "text": "zażółć 🦔"}})).await;
    }
}

/// The S3 plugin's config (plugin.json keys) for `moto`, flushing the export buffer after 1 s.
fn s3_config(moto: &Moto, bucket: &str, prefix: &str, compression: &str) -> Value {
    json!({
        "awsAccessKey": moto.access_key_id, "awsSecretAccessKey": moto.secret_access_key, "awsRegion": "us-east-1",
        "s3BucketName": bucket, "s3BucketEndpoint": moto.endpoint, "s3ForcePathStyle": "true", "prefix": prefix,
        "uploadMinutes": "1", "uploadMegabytes": "1", "eventsToIgnore": "$feature_flag_called", "uploadFormat": "jsonl",
        "compression": compression, "signatureVersion": "", "sse": "disabled", "sseKmsKeyId": "",
        "exportEventsBufferSeconds": "1",
    })
}

fn decode(key: &str, body: &[u8]) -> String {
    let mut text = String::new();
    if key.ends_with(".gz") {
        flate2::read::GzDecoder::new(body).read_to_string(&mut text).expect("gzip");
    } else if key.ends_with(".br") {
        brotli::Decompressor::new(body, 4096).read_to_string(&mut text).expect("brotli");
    } else {
        text = String::from_utf8(body.to_vec()).expect("utf-8");
    }
    text
}

/// The events in the objects under `prefix`, decoded, once there are `count` of them (up to 3
/// minutes: a batch whose upload failed comes back on the export retry schedule, 6, 12, 24, 48 and
/// 96 s apart, and a loaded machine can make it miss one).
async fn exported(moto: &Moto, bucket: &str, prefix: &str, count: usize) -> Vec<(String, Value)> {
    let mut waited = 0;
    loop {
        let mut events = Vec::new();
        for (key, body) in moto.objects(bucket).await {
            if !key.starts_with(prefix) {
                continue;
            }
            for line in decode(&key, &body).lines() {
                events.push((key.clone(), serde_json::from_str::<Value>(line).expect("a JSON line")));
            }
        }
        if events.len() >= count {
            return events;
        }
        waited += 1;
        assert!(waited < 1800, "{} of {count} events under {prefix} in {bucket}", events.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each of events `0..count` exactly once, as the plugin exported them.
fn assert_all_once(events: &[(String, Value)], count: u32) {
    let numbers: Vec<u64> = events.iter().map(|(_, e)| e["properties"]["n"].as_u64().expect("n")).collect();
    let unique: BTreeSet<u64> = numbers.iter().copied().collect();
    assert_eq!(unique, (0..u64::from(count)).collect::<BTreeSet<_>>(), "every event");
    assert_eq!(numbers.len(), unique.len(), "no event twice: {numbers:?}");
    for (_, event) in events {
        assert_eq!(event["event"], format!("event-{}", event["properties"]["n"]));
        assert_eq!(event["properties"]["text"], "zażółć 🦔");
        assert_eq!(event["team_id"], TEAM);
        assert_eq!(event["distinct_id"], "user-1");
        assert!(event["uuid"].as_str().is_some_and(|uuid| uuid.len() == 36), "{event}");
    }
}

/// `{prefix}YYYY-MM-DD/YYYYMMDD-HHMMSS.mmmZ-<16 hex>.jsonl{suffix}`, as the plugin names objects.
fn assert_key_shape(key: &str, prefix: &str, suffix: &str) {
    let rest = key.strip_prefix(prefix).unwrap_or_else(|| panic!("{key} under {prefix}"));
    let (day, file) = rest.split_once('/').unwrap_or_else(|| panic!("{key}: day folder"));
    assert_eq!(day.len(), 10, "{key}");
    let file =
        file.strip_suffix(&format!(".jsonl{suffix}")).unwrap_or_else(|| panic!("{key} ends with .jsonl{suffix}"));
    let hex = file.rsplit('-').next().unwrap();
    assert_eq!(hex.len(), 16, "{key}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
    assert!(file.starts_with(&day.replace('-', "")), "{key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_plugin_exports_gzip_brotli_and_plain_objects() {
    let moto = Moto::start(&["exports"]).await;
    let configs = [
        s3_config(&moto, "exports", "gzip/", "gzip"),
        s3_config(&moto, "exports", "brotli/", "brotli"),
        s3_config(&moto, "exports", "plain/", "no compression"),
    ];
    let server = start("s3-export-plugin", &configs).await;
    send(&server, 0..40).await;
    for (prefix, suffix) in [("gzip/", ".gz"), ("brotli/", ".br"), ("plain/", "")] {
        let events = exported(&moto, "exports", prefix, 40).await;
        assert_all_once(&events, 40);
        for (key, _) in &events {
            assert_key_shape(key, prefix, suffix);
        }
    }
    for config_id in [80, 81, 82] {
        assert_eq!(server.config_error(config_id).await, None);
        let log = server.wait_for_log(config_id, "to bucket exports").await;
        assert!(log.iter().any(|line| line == "Trying to send batch to S3..."), "{log:?}");
        assert!(log.iter().all(|line| !line.contains("Error uploading")), "{log:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_retried_until_it_exists_and_no_event_is_lost() {
    let moto = Moto::start(&[]).await;
    let server = start("s3-export-plugin", &[s3_config(&moto, "later", "", "gzip")]).await;
    send(&server, 0..25).await;
    // aws-sdk's error, logged by the plugin, which then throws RetryError: the server's export
    // retry job runs exportEvents again in 6 s.
    server.wait_for_log(80, "Error uploading to S3: The specified bucket does not exist").await;
    assert_eq!(moto.s3("listObjectsV2", json!({"Bucket": "later"})).await.unwrap_err()["code"], "NoSuchBucket");
    moto.s3("createBucket", json!({"Bucket": "later"})).await.expect("createBucket");
    let events = exported(&moto, "later", "", 25).await;
    assert_all_once(&events, 25);
    server.wait_for_log(80, "Uploaded 25 events to bucket later").await;
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_server_that_is_down_is_retried_until_it_answers() {
    let port = free_port();
    let config = json!({
        "awsAccessKey": "AKIDLOCAL", "awsSecretAccessKey": "local-secret", "awsRegion": "us-east-1",
        "s3BucketName": "exports", "s3BucketEndpoint": format!("http://127.0.0.1:{port}"), "s3ForcePathStyle": "true",
        "compression": "brotli", "sse": "disabled", "exportEventsBufferSeconds": "1", "prefix": "",
    });
    let server = start("s3-export-plugin", &[config]).await;
    send(&server, 0..30).await;
    // aws-sdk 2.927 on Node reports a refused connection as UnknownEndpoint (after its 3 retries).
    server
        .wait_for_log(80, "Error uploading to S3: Inaccessible host: `127.0.0.1'. This service may not be available in the `us-east-1' region.")
        .await;
    // The server comes up (without IAM: any key is accepted) before the retry job runs.
    let moto = Moto::start_unauthenticated_on(port, &["exports"]).await;
    let events = exported(&moto, "exports", "", 30).await;
    assert_all_once(&events, 30);
    for (key, _) in &events {
        assert_key_shape(key, "", ".br");
    }
    server.stop().await;
}

/// What a plugin author relies on, from a plugin's `processEvent` (results put on the event).
const SURFACE: &str = r#"
    import { S3 } from 'aws-sdk'
    import * as AWS from 'aws-sdk'
    import { brotliCompressSync, brotliDecompressSync, brotliCompress, constants } from 'zlib'
    const shape = (e) => ({ name: e.name, code: e.code, statusCode: e.statusCode, message: e.message,
        retryable: e.retryable, text: String(e), isError: e instanceof Error, time: e.time instanceof Date })
    const attempt = async (f) => { try { return { ok: await f() } } catch (e) { return { error: shape(e) } } }
    export async function processEvent(event) {
        const options = { accessKeyId: 'KEY', secretAccessKey: 'SECRET', endpoint: 'ENDPOINT', s3ForcePathStyle: true, region: 'us-east-1' }
        const s3 = new S3(options)
        const out = {}
        out.put = await s3.putObject({ Bucket: 'surface', Key: 'dir/a b+c.txt', Body: 'hello', ContentType: 'text/plain', Metadata: { team: '2' } }).promise()
        const got = await s3.getObject({ Bucket: 'surface', Key: 'dir/a b+c.txt' }).promise()
        out.got = { body: got.Body.toString(), isBuffer: Buffer.isBuffer(got.Body), date: got.LastModified instanceof Date,
            type: got.ContentType, metadata: got.Metadata, length: got.ContentLength, etag: got.ETag, response: !!got.$response }
        // Callback style; `this` is the response, as in aws-sdk.
        const listed = await new Promise((resolve, reject) =>
            s3.listObjectsV2({ Bucket: 'surface', Prefix: 'dir/' }, function (err, data) { err ? reject(err) : resolve([data, this && this.request && this.request.operation]) }))
        out.list = { keys: listed[0].Contents.map((o) => o.Key), date: listed[0].Contents[0].LastModified instanceof Date,
            count: listed[0].KeyCount, prefixes: listed[0].CommonPrefixes, operation: listed[1] }
        out.noKey = await attempt(() => s3.getObject({ Bucket: 'surface', Key: 'nope' }).promise())
        out.head = await attempt(() => s3.headObject({ Bucket: 'surface', Key: 'nope' }).promise())
        out.noBucket = await attempt(() => s3.putObject({ Bucket: 'nobucket', Key: 'k', Body: 'x' }).promise())
        out.missing = await attempt(() => s3.putObject({ Bucket: 'surface' }).promise())
        out.unexpected = await attempt(() => s3.putObject({ Bucket: 'surface', Key: 'k', Bodyy: 'x' }).promise())
        out.badSecret = await attempt(() => new S3({ ...options, secretAccessKey: 'wrong' }).listObjectsV2({ Bucket: 'surface' }).promise())
        out.noCredentials = await attempt(() => new S3({ endpoint: 'ENDPOINT', s3ForcePathStyle: true }).listObjectsV2({ Bucket: 'surface' }).promise())
        // Over aws-sdk's 5 MB part size: a multipart upload of two parts.
        const big = await s3.upload({ Bucket: 'surface', Key: 'big.bin', Body: Buffer.alloc(6 * 1024 * 1024, 97) }).promise()
        const head = await s3.headObject({ Bucket: 'surface', Key: 'big.bin' }).promise()
        out.big = { location: big.Location, key: big.Key, bucket: big.Bucket, parts: big.ETag.replace(/.*-/, '').replace('"', ''), length: head.ContentLength }
        const small = await new Promise((resolve, reject) => s3.upload({ Bucket: 'surface', Key: 'small.txt', Body: Buffer.from('small') }, (err, data) => err ? reject(err) : resolve(data)))
        out.small = small
        // The global config, as `AWS.config.update(...)` sets it for later clients.
        AWS.config.update({ accessKeyId: 'KEY', secretAccessKey: 'SECRET', region: 'us-east-1' })
        out.global = await new AWS.S3({ endpoint: 'ENDPOINT', s3ForcePathStyle: true }).headObject({ Bucket: 'surface', Key: 'small.txt' }).promise().then((d) => d.ContentLength)
        out.deleted = await s3.deleteObject({ Bucket: 'surface', Key: 'small.txt' }).promise()
        out.other = await attempt(() => new AWS.DynamoDB())
        // zlib's brotli, as the S3 plugin compresses with it (Node's values in the comments).
        const text = 'abc'.repeat(1000)
        const packed = brotliCompressSync(Buffer.from(text), { params: { [constants.BROTLI_PARAM_QUALITY]: 4 } })
        out.brotli = {
            small: packed.length < 40,
            back: brotliDecompressSync(packed).toString() === text,
            async: await new Promise((resolve) => brotliCompress('hi', (err, bytes) => resolve(err ? String(err) : brotliDecompressSync(bytes).toString()))),
            garbage: await attempt(() => brotliDecompressSync(Buffer.from('nope'))),
            key: await attempt(() => brotliCompressSync('x', { params: { 42: 1 } })),
            clamped: brotliDecompressSync(brotliCompressSync('clamped', { params: { 1: 99, 2: 5 } })).toString(),
        }
        event.properties.aws = out
        return event
    }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_uses_the_aws_sdk_surface_against_a_signature_checking_s3() {
    let moto = Moto::start(&["surface"]).await;
    let code = SURFACE
        .replace("'KEY'", &format!("'{}'", moto.access_key_id))
        .replace("'SECRET'", &format!("'{}'", moto.secret_access_key))
        .replace("'ENDPOINT'", &format!("'{}'", moto.endpoint));
    let server = with_code(&code).await;
    let args =
        json!(["user-1", "127.0.0.1", "http://127.0.0.1:8000", {"event": "surface", "properties": {}}, TEAM, NOW, NOW]);
    server.producer().send_task(PROCESS_EVENT_TASK, args.as_array().unwrap(), &Map::new()).await.unwrap();
    let out = server.event_properties("surface").await["aws"].clone();
    assert_eq!(out["put"], json!({"ETag": "\"5d41402abc4b2a76b9719d911017c592\""}));
    assert_eq!(
        out["got"],
        json!({"body": "hello", "isBuffer": true, "date": true, "type": "text/plain", "metadata": {"team": "2"},
               "length": 5, "etag": "\"5d41402abc4b2a76b9719d911017c592\"", "response": true})
    );
    assert_eq!(
        out["list"],
        json!({"keys": ["dir/a b+c.txt"], "date": true, "count": 1, "prefixes": [], "operation": "listObjectsV2"})
    );
    // The errors as aws-sdk 2.927.0 on Node 20 gives them for the same answers.
    let error = |name: &str, code: &str, status: Value, message: Value, retryable: bool| {
        let text = format!("{name}: {}", message.as_str().unwrap_or("null"));
        json!({"error": {"name": name, "code": code, "statusCode": status, "message": message, "retryable": retryable,
                         "text": text, "isError": true, "time": true}})
    };
    assert_eq!(
        out["noKey"],
        error("NoSuchKey", "NoSuchKey", json!(404), json!("The specified key does not exist."), false)
    );
    assert_eq!(out["head"], error("NotFound", "NotFound", json!(404), Value::Null, false));
    assert_eq!(
        out["noBucket"],
        error("NoSuchBucket", "NoSuchBucket", json!(404), json!("The specified bucket does not exist"), false)
    );
    let missing = error(
        "MissingRequiredParameter",
        "MissingRequiredParameter",
        Value::Null,
        json!("Missing required key 'Key' in params"),
        false,
    );
    let mut missing_no_extra = missing.clone();
    missing_no_extra["error"].as_object_mut().unwrap().remove("statusCode");
    missing_no_extra["error"].as_object_mut().unwrap().remove("retryable");
    assert_eq!(without_nulls(&out["missing"]), without_nulls(&missing_no_extra));
    assert_eq!(out["unexpected"]["error"]["message"], "Unexpected key 'Bodyy' found in params");
    assert_eq!(out["badSecret"]["error"]["code"], "SignatureDoesNotMatch");
    assert_eq!(out["badSecret"]["error"]["statusCode"], 403);
    assert_eq!(out["noCredentials"]["error"]["code"], "CredentialsError");
    assert_eq!(
        out["big"],
        // moto's Location, as aws-sdk passes it on.
        json!({"location": "http://surface.s3.amazonaws.com/big.bin", "key": "big.bin", "bucket": "surface", "parts": "2", "length": 6291456})
    );
    let small_etag = format!("\"{}\"", hex::encode(<md5::Md5 as md5::Digest>::digest(b"small")));
    assert_eq!(
        out["small"],
        json!({"ETag": small_etag, "Location": format!("{}/surface/small.txt", moto.endpoint), "key": "small.txt",
               "Key": "small.txt", "Bucket": "surface"})
    );
    assert_eq!(out["global"], 5);
    assert_eq!(out["deleted"], json!({}));
    assert_eq!(out["brotli"]["small"], true, "{}", out["brotli"]);
    assert_eq!(out["brotli"]["back"], true);
    assert_eq!(out["brotli"]["async"], "hi");
    assert_eq!(out["brotli"]["garbage"]["error"]["message"], "Decompression failed");
    assert_eq!(out["brotli"]["key"]["error"]["name"], "RangeError");
    assert_eq!(out["brotli"]["key"]["error"]["message"], "42 is not a valid Brotli parameter");
    assert_eq!(out["brotli"]["clamped"], "clamped");
    assert_eq!(
        out["other"]["error"]["message"],
        "AWS.DynamoDB is not available in plugins (the plugin server's aws-sdk has S3 and Kinesis)"
    );
    server.stop().await;
}

fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect(),
        ),
        other => other.clone(),
    }
}

/// The host side alone (what the facade calls): requests moto accepts with the right key and
/// refuses with another, keys that need escaping, bodies both ways, aws-sdk's outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_requests_are_signed_as_s3_checks_them() {
    use base64::Engine as _;
    use plugin_server::plugins::extensions::aws::Aws;
    let moto = Moto::start(&["signed"]).await;
    let aws = Aws::default();
    let call = |config: Value, operation: &str, params: Value, body: Option<&[u8]>| {
        let body = body.map(|b| json!(base64::engine::general_purpose::STANDARD.encode(b))).unwrap_or(Value::Null);
        let aws = &aws;
        let operation = operation.to_string();
        async move { aws.call("aws.s3", &[config, json!(operation), params, body], Duration::from_secs(20)).await.unwrap() }
    };
    let key = "a dir/ünï cödé+(1)!*'~.txt";
    let put = call(
        moto.client_config(),
        "putObject",
        json!({"Bucket": "signed", "Key": key, "Body": null, "ContentType": "text/plain", "Metadata": {"Run": "1"}}),
        Some(b"hello"),
    )
    .await;
    assert_eq!(put["data"], json!({"ETag": "\"5d41402abc4b2a76b9719d911017c592\""}), "{put}");
    assert_eq!(
        put["url"],
        format!("{}/signed/a%20dir/%C3%BCn%C3%AF%20c%C3%B6d%C3%A9%2B%281%29%21%2A%27~.txt", moto.endpoint)
    );
    let got = call(moto.client_config(), "getObject", json!({"Bucket": "signed", "Key": key}), None).await;
    assert_eq!(got["data"]["Body"], base64::engine::general_purpose::STANDARD.encode(b"hello"));
    assert_eq!(got["data"]["Metadata"], json!({"run": "1"}));
    assert_eq!(got["data"]["ContentType"], "text/plain");
    let listed = call(
        moto.client_config(),
        "listObjectsV2",
        json!({"Bucket": "signed", "Prefix": "a dir/", "MaxKeys": 10}),
        None,
    )
    .await;
    assert_eq!(listed["data"]["Contents"][0]["Key"], key);
    assert_eq!(listed["data"]["KeyCount"], 1);
    let mut wrong = moto.client_config();
    wrong["secretAccessKey"] = json!("not-the-secret");
    let refused = call(wrong, "listObjectsV2", json!({"Bucket": "signed"}), None).await;
    assert_eq!(refused["error"]["code"], "SignatureDoesNotMatch", "{refused}");
    assert_eq!(refused["error"]["statusCode"], 403);
    assert_eq!(refused["error"]["retryable"], false);
    let created = call(moto.client_config(), "createBucket", json!({"Bucket": "made-later"}), None).await;
    assert!(created.get("error").is_none(), "{created}");
    let deleted = call(moto.client_config(), "deleteObject", json!({"Bucket": "signed", "Key": key}), None).await;
    assert_eq!(deleted["data"], json!({}));
}

/// The 2021 plugin (0.0.3, what a 1.10 user ran): `onEvent` into `createBuffer`, flushed after
/// `uploadMinutes` (at least one minute); the bucket in the host name (virtual-hosted style: it
/// has no `s3ForcePathStyle`); an upload failure enqueues the plugin's own `uploadBatchToS3` job,
/// which uploads the batch once the bucket exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_2021_plugin_retries_with_its_own_job_on_a_virtual_hosted_bucket() {
    let moto = Moto::start(&[]).await;
    // `exports03.localhost` stands for the bucket's own host name, as `bucket.s3.amazonaws.com`.
    plugin_server::plugins::runtime::add_test_public_host("exports03.localhost", "127.0.0.1".parse().unwrap());
    let config = json!({
        "awsAccessKey": moto.access_key_id, "awsSecretAccessKey": moto.secret_access_key, "awsRegion": "us-east-1",
        "s3BucketName": "exports03", "s3BucketEndpoint": format!("http://localhost:{}", moto.port), "prefix": "2021/",
        "uploadMinutes": "1", "uploadMegabytes": "1", "eventsToIgnore": "event-3", "uploadFormat": "jsonl",
        "compression": "gzip", "signatureVersion": "v4", "sse": "disabled", "sseKmsKeyId": "",
    });
    let server = start("s3-export-plugin-0.0.3", &[config]).await;
    send(&server, 0..20).await;
    server.wait_long_for_log(80, "Error uploading to S3: The specified bucket does not exist", 120).await;
    moto.s3("createBucket", json!({"Bucket": "exports03"})).await.expect("createBucket");
    let events = exported(&moto, "exports03", "2021/", 19).await;
    let numbers: BTreeSet<u64> = events.iter().map(|(_, e)| e["properties"]["n"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..20).filter(|n| *n != 3).collect::<BTreeSet<_>>());
    assert_eq!(events.len(), 19, "each event once");
    // One buffer per VM (one VM per worker thread, as the original's per-thread VMs): each flushed
    // its share; every failed upload enqueued a retry job (which flushes the batch again).
    let log = server.log(80).await;
    let count = |prefix: &str| log.iter().filter(|line| line.starts_with(prefix)).count();
    assert!(count("Error uploading to S3: ") >= 1, "{log:?}");
    assert_eq!(count("Enqueued batch "), count("Error uploading to S3: "), "{log:?}");
    let flushed: usize = log
        .iter()
        .filter_map(|line| line.strip_prefix("Flushing ")?.strip_suffix(" events!")?.parse::<usize>().ok())
        .sum();
    assert!(flushed >= 19, "{log:?}");
    for (key, _) in &events {
        assert_key_shape(key, "2021/", ".gz");
    }
    assert_eq!(server.config_error(80).await, None);
    server.stop().await;
}

/// Kinesis as PostHog's Kinesis import plugin calls it (describeStream, getShardIterator and
/// getRecords with callbacks; `err.name` of an expired iterator), against moto's Kinesis.
const KINESIS: &str = r#"
    import { Kinesis } from 'aws-sdk'
    const call = (k, method, params) => new Promise((resolve) => k[method](params, (err, data) => resolve(err ? { error: { name: err.name, code: err.code, statusCode: err.statusCode, message: err.message } } : data)))
    export async function processEvent(event) {
        const kinesis = new Kinesis({ accessKeyId: 'KEY', secretAccessKey: 'SECRET', region: 'us-east-1', endpoint: 'ENDPOINT' })
        await kinesis.createStream({ StreamName: 'events', ShardCount: 1 }).promise()
        await kinesis.putRecord({ StreamName: 'events', PartitionKey: 'p', Data: JSON.stringify({ event: 'from kinesis', who: { id: 'u1' } }) }).promise()
        await kinesis.putRecord({ StreamName: 'events', PartitionKey: 'p', Data: Buffer.from('second') }).promise()
        const described = await call(kinesis, 'describeStream', { StreamName: 'events' })
        const shard = described.StreamDescription.Shards[0]
        const iterator = await call(kinesis, 'getShardIterator', { ShardId: shard.ShardId, ShardIteratorType: 'TRIM_HORIZON', StreamName: 'events' })
        const records = await call(kinesis, 'getRecords', { ShardIterator: iterator.ShardIterator })
        event.properties.kinesis = {
            status: described.StreamDescription.StreamStatus,
            created: described.StreamDescription.StreamCreationTimestamp instanceof Date,
            shards: described.StreamDescription.Shards.length,
            data: records.Records.map((r) => Buffer.from(r.Data).toString()),
            buffers: records.Records.every((r) => Buffer.isBuffer(r.Data)),
            arrival: records.Records.every((r) => r.ApproximateArrivalTimestamp instanceof Date),
            next: typeof records.NextShardIterator,
            missing: await call(kinesis, 'describeStream', { StreamName: 'nope' }),
            noRegion: await call(new Kinesis({ accessKeyId: 'KEY', secretAccessKey: 'SECRET' }), 'listStreams', {}),
        }
        return event
    }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reads_a_kinesis_stream_as_the_kinesis_plugin_does() {
    let moto = Moto::start(&[]).await;
    let code = KINESIS
        .replace("'KEY'", &format!("'{}'", moto.access_key_id))
        .replace("'SECRET'", &format!("'{}'", moto.secret_access_key))
        .replace("'ENDPOINT'", &format!("'{}'", moto.endpoint));
    let server = with_code(&code).await;
    let args =
        json!(["user-1", "127.0.0.1", "http://127.0.0.1:8000", {"event": "kinesis", "properties": {}}, TEAM, NOW, NOW]);
    server.producer().send_task(PROCESS_EVENT_TASK, args.as_array().unwrap(), &Map::new()).await.unwrap();
    let out = server.event_properties("kinesis").await["kinesis"].clone();
    assert_eq!(out["status"], "ACTIVE", "{out}");
    assert_eq!(out["created"], true);
    assert_eq!(out["shards"], 1);
    assert_eq!(out["data"], json!([r#"{"event":"from kinesis","who":{"id":"u1"}}"#, "second"]));
    assert_eq!(out["buffers"], true);
    assert_eq!(out["arrival"], true);
    assert_eq!(out["next"], "string");
    assert_eq!(out["missing"]["error"]["name"], "ResourceNotFoundException", "{out}");
    assert_eq!(out["missing"]["error"]["statusCode"], 400);
    assert_eq!(
        out["noRegion"]["error"],
        json!({"name": "ConfigError", "code": "ConfigError", "message": "Missing region in config"})
    );
    server.stop().await;
}

/// One config's requests are bounded on the host: at most `MAX_REQUESTS_IN_FLIGHT` at once (the
/// rest wait their turn and all succeed), and a request body over `PLUGIN_FETCH_MAX_RESPONSE_BYTES`
/// is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_requests_of_one_config_are_bounded() {
    use plugin_server::plugins::extensions::aws::{Aws, MAX_REQUESTS_IN_FLIGHT};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plugin_server::plugins::runtime::configure_network(plugin_server::plugins::runtime::NetworkSettings::defaults(
        plugin_server::config::NodeEnv::Test,
    ));
    // A slow S3 stand-in that counts the requests it holds at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (now, most, total) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counters = (now.clone(), most.clone(), total.clone());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (now, most, total) = (counters.0.clone(), counters.1.clone(), counters.2.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buffer = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buffer[..n]),
                    }
                }
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(held, Ordering::SeqCst);
                total.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                let answer = "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    let config = json!({"accessKeyId": "AKID", "secretAccessKey": "secret", "region": "us-east-1",
                        "endpoint": format!("http://127.0.0.1:{port}"), "s3ForcePathStyle": true});
    let aws = Aws::default();
    let calls = (0..30).map(|n| {
        let (aws, config) = (&aws, config.clone());
        async move {
            aws.call(
                "aws.s3",
                &[config, json!("putObject"), json!({"Bucket": "bkt", "Key": format!("k{n}")}), json!("aGk=")],
                Duration::from_secs(20),
            )
            .await
            .unwrap()
        }
    });
    let answers = futures::future::join_all(calls).await;
    assert!(answers.iter().all(|answer| answer["data"]["ETag"] == "\"e\""), "{answers:?}");
    assert_eq!(total.load(Ordering::SeqCst), 30);
    assert_eq!(most.load(Ordering::SeqCst), MAX_REQUESTS_IN_FLIGHT, "requests held at once");
    // Over the per-request body bound: refused here, nothing sent.
    use base64::Engine as _;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 32 * 1024 * 1024 + 1]);
    let refused = aws
        .call(
            "aws.s3",
            &[config, json!("putObject"), json!({"Bucket": "bkt", "Key": "big"}), json!(big)],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(refused["error"]["code"], "RequestEntityTooLarge", "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 33554432 bytes per request (PLUGIN_FETCH_MAX_RESPONSE_BYTES)"));
    assert_eq!(total.load(Ordering::SeqCst), 30);
}
