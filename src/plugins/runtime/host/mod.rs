//! Synchronous host functions behind the sandbox's `crypto`, `zlib`, `url`, `Buffer` and
//! `TextEncoder`/`TextDecoder` (the JS side lives in `prelude.js`). They take and return plain
//! bytes/strings, so plugin code never holds a host object.
//!
//! Also the host-op limits the prelude enforces per VM (`limits`: how many host calls may be in
//! flight) and V8's `JSON.parse` message for `res.json()`'s node-fetch error (`jsonError`).
//!
//! Not here: functions that need the VM's async machinery (meta calls, fetch, timers), which
//! live in `quickjs.rs`; the HTTP client itself is `fetch.rs`.
//!
//! Host-made memory counts against the VM's limit: every buffer handed to JS is allocated in the
//! VM's own heap ([`buffer`] copies into it, so QuickJS' memory limit applies and an allocation
//! over it is an ordinary `out of memory`), and zlib output is bounded while it streams by the
//! VM's [`memory_headroom`], so an inflate bomb stops at the budget instead of after it.

pub mod fetch;

use std::io::{Read, Write};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rquickjs::{ArrayBuffer, Ctx, Exception, Function, Object, Result as JsResult, TypedArray, Value};
use sha2::Digest;

/// Largest output a single zlib call may produce, whatever the VM's headroom (a decompression
/// bomb stops at the smaller of the two).
const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `crypto.randomBytes` request.
const MAX_RANDOM_BYTES: usize = 1024 * 1024;

/// The bytes of a `Uint8Array`/`Buffer` or `ArrayBuffer` argument.
pub fn bytes_of(ctx: &Ctx<'_>, value: &Value<'_>) -> JsResult<Vec<u8>> {
    if let Some(object) = value.as_object() {
        if let Ok(array) = TypedArray::<u8>::from_object(object.clone()) {
            return Ok(array.as_bytes().map(|b| b.to_vec()).unwrap_or_default());
        }
        if let Some(buffer) = ArrayBuffer::from_object(object.clone()) {
            return Ok(buffer.as_bytes().map(|b| b.to_vec()).unwrap_or_default());
        }
    }
    Err(Exception::throw_type(ctx, "expected a Buffer, Uint8Array or ArrayBuffer"))
}

/// Bytes the VM of `ctx` may still allocate before its memory limit (`usize::MAX` without one).
/// The budget for host-made data (zlib output, fetch bodies) that is about to be handed to JS.
pub fn memory_headroom(ctx: &Ctx<'_>) -> usize {
    let mut usage = std::mem::MaybeUninit::<rquickjs::qjs::JSMemoryUsage>::zeroed();
    // SAFETY: `ctx` is a live context on this thread; QuickJS only fills the struct.
    let usage = unsafe {
        rquickjs::qjs::JS_ComputeMemoryUsage(rquickjs::qjs::JS_GetRuntime(ctx.as_raw().as_ptr()), usage.as_mut_ptr());
        usage.assume_init()
    };
    if usage.malloc_limit <= 0 {
        return usize::MAX;
    }
    usize::try_from(usage.malloc_limit.saturating_sub(usage.malloc_size)).unwrap_or(0)
}

/// A JS `ArrayBuffer` of `bytes`, allocated in the VM's heap so it counts against its limit.
pub fn buffer<'js>(ctx: &Ctx<'js>, bytes: Vec<u8>) -> JsResult<ArrayBuffer<'js>> {
    ArrayBuffer::new_copy(ctx.clone(), bytes)
}

fn digest(algorithm: &str, data: &[u8]) -> Option<Vec<u8>> {
    Some(match algorithm.to_ascii_lowercase().as_str() {
        "md5" => md5::Md5::digest(data).to_vec(),
        "sha1" => sha1::Sha1::digest(data).to_vec(),
        "sha256" => sha2::Sha256::digest(data).to_vec(),
        "sha384" => sha2::Sha384::digest(data).to_vec(),
        "sha512" => sha2::Sha512::digest(data).to_vec(),
        _ => return None,
    })
}

fn hmac_digest(algorithm: &str, key: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Option<Vec<u8>> {
        let mut mac = <M as Mac>::new_from_slice(key).ok()?;
        mac.update(data);
        Some(mac.finalize().into_bytes().to_vec())
    }
    match algorithm.to_ascii_lowercase().as_str() {
        "md5" => run::<Hmac<md5::Md5>>(key, data),
        "sha1" => run::<Hmac<sha1::Sha1>>(key, data),
        "sha256" => run::<Hmac<sha2::Sha256>>(key, data),
        "sha384" => run::<Hmac<sha2::Sha384>>(key, data),
        "sha512" => run::<Hmac<sha2::Sha512>>(key, data),
        _ => None,
    }
}

/// Node's brotli encoder parameters (`params` of `brotliCompress*` options, keyed by
/// `zlib.constants.BROTLI_PARAM_*`): Node's defaults are quality 11, window 22, generic mode.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BrotliParams {
    quality: i32,
    lgwin: i32,
    mode: i32,
}

impl Default for BrotliParams {
    fn default() -> BrotliParams {
        BrotliParams { quality: 11, lgwin: 22, mode: 0 }
    }
}

/// `zlib.constants.BROTLI_PARAM_MODE`, `…_QUALITY`, `…_LGWIN`.
const BROTLI_PARAM_MODE: &str = "0";
const BROTLI_PARAM_QUALITY: &str = "1";
const BROTLI_PARAM_LGWIN: &str = "2";

impl BrotliParams {
    /// From the `params` object of the options, as Node reads it: a key that is no
    /// `BROTLI_PARAM_*` is a `RangeError` (`ERR_BROTLI_INVALID_PARAM`), a value that is no number
    /// a `TypeError`; values out of range are clamped (quality, window) or ignored (mode), as the
    /// brotli encoder does.
    fn from_js(ctx: &Ctx<'_>, params: Option<Object<'_>>) -> JsResult<BrotliParams> {
        let mut out = BrotliParams::default();
        let Some(params) = params else { return Ok(out) };
        for key in params.keys::<String>() {
            let key = key?;
            if !matches!(key.as_str(), "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9") {
                return Err(Exception::throw_range(ctx, &format!("{key} is not a valid Brotli parameter")));
            }
            let value: Value = params.get(key.as_str())?;
            let Some(number) = value.as_number() else {
                return Err(Exception::throw_type(
                    ctx,
                    &format!(
                        "The \"options.params[key]\" property must be of type number. Received type {}",
                        value.type_name()
                    ),
                ));
            };
            let number = if number.is_finite() { number.trunc().clamp(-1e9, 1e9) as i32 } else { 0 };
            match key.as_str() {
                BROTLI_PARAM_QUALITY => out.quality = number.clamp(0, 11),
                BROTLI_PARAM_LGWIN => out.lgwin = number.clamp(10, 24),
                BROTLI_PARAM_MODE if (0..=2).contains(&number) => out.mode = number,
                // Block size, size hint and the rest tune speed only.
                _ => {}
            }
        }
        Ok(out)
    }
}

fn brotli_compress(data: &[u8], params: BrotliParams) -> std::result::Result<Vec<u8>, String> {
    let mut encoder = brotli::enc::BrotliEncoderParams {
        quality: params.quality,
        lgwin: params.lgwin,
        mode: match params.mode {
            1 => brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_TEXT,
            2 => brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_FONT,
            _ => brotli::enc::backward_references::BrotliEncoderMode::BROTLI_MODE_GENERIC,
        },
        ..Default::default()
    };
    encoder.size_hint = data.len();
    let mut out = Vec::new();
    brotli::BrotliCompress(&mut &data[..], &mut out, &encoder).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Runs one zlib operation with the default brotli parameters.
#[cfg(test)]
fn zlib(op: &str, data: &[u8], limit: u64) -> std::result::Result<Vec<u8>, String> {
    zlib_with(op, data, limit, BrotliParams::default())
}

/// Runs one zlib operation; inflated output stops at `limit` bytes (streaming: at most `limit + 1`
/// bytes are ever produced).
fn zlib_with(op: &str, data: &[u8], limit: u64, brotli: BrotliParams) -> std::result::Result<Vec<u8>, String> {
    use flate2::read::{DeflateDecoder, GzDecoder, MultiGzDecoder, ZlibDecoder};
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;
    let inflate = |mut reader: Box<dyn Read + '_>| -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        reader.by_ref().take(limit.saturating_add(1)).read_to_end(&mut out).map_err(|e| e.to_string())?;
        if out.len() as u64 > limit {
            return Err(format!(
                "Cannot create a Buffer larger than the plugin's memory allows: the {op} output exceeds {limit} bytes"
            ));
        }
        Ok(out)
    };
    fn deflate<W: Write>(
        mut writer: W,
        data: &[u8],
        finish: impl FnOnce(W) -> std::io::Result<Vec<u8>>,
    ) -> std::result::Result<Vec<u8>, String> {
        writer.write_all(data).map_err(|e| e.to_string())?;
        finish(writer).map_err(|e| e.to_string())
    }
    match op {
        "gzip" => deflate(GzEncoder::new(Vec::new(), Compression::default()), data, |w| w.finish()),
        "deflate" => deflate(ZlibEncoder::new(Vec::new(), Compression::default()), data, |w| w.finish()),
        "deflateRaw" => deflate(DeflateEncoder::new(Vec::new(), Compression::default()), data, |w| w.finish()),
        "gunzip" => inflate(Box::new(MultiGzDecoder::new(data))),
        "inflate" => inflate(Box::new(ZlibDecoder::new(data))),
        "inflateRaw" => inflate(Box::new(DeflateDecoder::new(data))),
        "unzip" if data.starts_with(&[0x1f, 0x8b]) => inflate(Box::new(GzDecoder::new(data))),
        "unzip" => inflate(Box::new(ZlibDecoder::new(data))),
        "brotliCompress" => brotli_compress(data, brotli),
        // Node's message for a stream that is not brotli.
        "brotliDecompress" => inflate(Box::new(brotli::Decompressor::new(data, 4096))).map_err(|e| {
            if e.contains("exceeds") {
                e
            } else {
                "Decompression failed".to_string()
            }
        }),
        _ => Err(format!("unknown zlib operation {op}")),
    }
    .map_err(|e| if e.contains("invalid") || e.contains("corrupt") { "incorrect header check".to_string() } else { e })
}

/// The WHATWG URL API's getters (`url::quirks` implements them to the standard, as Node does).
fn url_record<'js>(ctx: &Ctx<'js>, url: &url::Url) -> JsResult<Object<'js>> {
    use url::quirks;
    let record = Object::new(ctx.clone())?;
    record.set("href", quirks::href(url))?;
    record.set("protocol", quirks::protocol(url))?;
    record.set("username", quirks::username(url))?;
    record.set("password", quirks::password(url))?;
    record.set("host", quirks::host(url))?;
    record.set("hostname", quirks::hostname(url))?;
    record.set("port", quirks::port(url))?;
    record.set("pathname", quirks::pathname(url))?;
    record.set("search", quirks::search(url))?;
    record.set("hash", quirks::hash(url))?;
    record.set("origin", quirks::origin(url))?;
    Ok(record)
}

/// The URL parser (`new URL(input, base)`): `None` for an invalid input or base.
fn parse_url(href: &str, base: Option<&str>) -> Option<url::Url> {
    match base {
        Some(base) => {
            let base = url::Url::parse(base).ok()?;
            url::Url::options().base_url(Some(&base)).parse(href).ok()
        }
        None => url::Url::parse(href).ok(),
    }
}

/// A WHATWG URL setter on `url`. Invalid values leave the URL unchanged, as the standard says.
fn set_url_field(url: &mut url::Url, field: &str, value: &str) {
    use url::quirks;
    let _ = match field {
        "protocol" => quirks::set_protocol(url, value),
        "username" => quirks::set_username(url, value),
        "password" => quirks::set_password(url, value),
        "host" => quirks::set_host(url, value),
        "hostname" => quirks::set_hostname(url, value),
        "port" => quirks::set_port(url, value),
        "pathname" => {
            quirks::set_pathname(url, value);
            Ok(())
        }
        "search" => {
            quirks::set_search(url, value);
            Ok(())
        }
        "hash" => {
            quirks::set_hash(url, value);
            Ok(())
        }
        _ => Ok(()),
    };
}

/// V8's `JSON.parse` error message for `text` (Node 20), which node-fetch puts in its
/// `invalid json response body at URL reason: …`; `None` when `text` parses.
pub fn v8_json_error(text: &str) -> Option<String> {
    let error = serde_json::from_str::<serde_json::Value>(text).err()?;
    if error.is_eof() {
        return Some("Unexpected end of JSON input".to_string());
    }
    // serde reports 1-based line/column of the offending character; V8 counts UTF-16 units.
    let chars: Vec<char> = text.chars().collect();
    let mut line = 1;
    let mut position = 0;
    for (index, c) in chars.iter().enumerate() {
        if line == error.line() {
            position = (index + error.column()).saturating_sub(1).min(chars.len().saturating_sub(1));
            break;
        }
        if *c == '\n' {
            line += 1;
        }
    }
    let token = chars.get(position).copied().unwrap_or(' ');
    if error.to_string().starts_with("trailing characters") {
        return Some(format!("Unexpected non-whitespace character after JSON at position {position}"));
    }
    // V8 quotes the whole text when it is short, else 10 characters either side.
    const CONTEXT: usize = 10;
    let slice = |from: usize, to: usize| chars[from..to.min(chars.len())].iter().collect::<String>();
    let snippet = if chars.len() < CONTEXT * 2 + 1 {
        format!("\"{}\"", slice(0, chars.len()))
    } else if position < CONTEXT {
        format!("\"{}\"...", slice(0, position + CONTEXT))
    } else if position >= chars.len() - CONTEXT {
        format!("...\"{}\"", slice(position - CONTEXT, chars.len()))
    } else {
        format!("...\"{}\"...", slice(position - CONTEXT, position + CONTEXT))
    };
    Some(format!("Unexpected token '{token}', {snippet} is not valid JSON"))
}

/// Adds the synchronous host functions to `host`.
pub fn install<'js>(ctx: &Ctx<'js>, host: &Object<'js>) -> JsResult<()> {
    // The facade modules (`runtime/modules`): their list, or one compiled (on demand).
    host.set(
        "facade",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, name: rquickjs::function::Opt<String>| -> JsResult<Value<'js>> {
            let Some(name) = name.0 else {
                let list = rquickjs::Array::new(ctx.clone())?;
                for (index, facade) in super::modules::FACADES.iter().enumerate() {
                    let entry = rquickjs::Array::new(ctx.clone())?;
                    entry.set(0, facade.name)?;
                    entry.set(1, facade.importable)?;
                    list.set(index, entry)?;
                }
                return Ok(list.into_value());
            };
            let Some(facade) = super::modules::find(&name) else {
                return Err(Exception::throw_type(&ctx, &format!("no facade module {name}")));
            };
            let source = format!("export default {}", facade.source);
            let (module, _) =
                rquickjs::Module::declare(ctx.clone(), super::modules::file_name(&name), source)?.eval()?;
            module.namespace()?.get("default")
        })?,
    )?;
    host.set(
        "limits",
        Function::new(ctx.clone(), |ctx: Ctx<'js>| -> JsResult<Object<'js>> {
            let limits = Object::new(ctx)?;
            limits.set("maxHostCallsInFlight", fetch::settings().max_host_calls_in_flight as f64)?;
            Ok(limits)
        })?,
    )?;
    host.set("jsonError", Function::new(ctx.clone(), |text: String| v8_json_error(&text))?)?;
    host.set("utf8Encode", Function::new(ctx.clone(), |ctx: Ctx<'js>, s: String| buffer(&ctx, s.into_bytes()))?)?;
    host.set(
        "utf8Decode",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, v: Value<'js>| -> JsResult<String> {
            Ok(String::from_utf8_lossy(&bytes_of(&ctx, &v)?).into_owned())
        })?,
    )?;
    host.set(
        "base64Encode",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, v: Value<'js>, url_safe: bool| -> JsResult<String> {
            let bytes = bytes_of(&ctx, &v)?;
            Ok(if url_safe {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
            } else {
                base64::engine::general_purpose::STANDARD.encode(bytes)
            })
        })?,
    )?;
    host.set(
        "base64Decode",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, s: String| {
            // Node is lenient: url-safe alphabet, missing padding and whitespace are accepted.
            let cleaned: String = s
                .chars()
                .filter(|c| !c.is_whitespace() && *c != '=')
                .map(|c| match c {
                    '-' => '+',
                    '_' => '/',
                    c => c,
                })
                .collect();
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()).unwrap_or_default();
            buffer(&ctx, bytes)
        })?,
    )?;
    host.set(
        "hash",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, algorithm: String, data: Value<'js>| {
            let data = bytes_of(&ctx, &data)?;
            match digest(&algorithm, &data) {
                Some(out) => buffer(&ctx, out),
                None => Err(Exception::throw_message(&ctx, "Digest method not supported")),
            }
        })?,
    )?;
    host.set(
        "hmac",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, algorithm: String, key: Value<'js>, data: Value<'js>| {
            let key = bytes_of(&ctx, &key)?;
            let data = bytes_of(&ctx, &data)?;
            match hmac_digest(&algorithm, &key, &data) {
                Some(out) => buffer(&ctx, out),
                None => Err(Exception::throw_message(&ctx, &format!("Invalid digest: {algorithm}"))),
            }
        })?,
    )?;
    host.set(
        "randomBytes",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, size: f64| {
            if !(0.0..=MAX_RANDOM_BYTES as f64).contains(&size) {
                return Err(Exception::throw_range(&ctx, "The value of \"size\" is out of range."));
            }
            let mut bytes = vec![0u8; size as usize];
            rand::Rng::fill(&mut rand::rng(), bytes.as_mut_slice());
            buffer(&ctx, bytes)
        })?,
    )?;
    host.set("randomUUID", Function::new(ctx.clone(), || uuid::Uuid::new_v4().to_string())?)?;
    host.set(
        "zlib",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, op: String, data: Value<'js>, params: rquickjs::function::Opt<Object<'js>>| {
                let data = bytes_of(&ctx, &data)?;
                // The output is copied into the VM's heap: it must fit there (plus the input copy).
                let limit = (memory_headroom(&ctx) as u64).min(MAX_INFLATED_BYTES);
                let brotli = BrotliParams::from_js(&ctx, params.0)?;
                match zlib_with(&op, &data, limit, brotli) {
                    Ok(out) => buffer(&ctx, out),
                    Err(message) => Err(Exception::throw_message(&ctx, &message)),
                }
            },
        )?,
    )?;
    host.set(
        "urlParse",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, href: String, base: rquickjs::function::Opt<String>| match parse_url(
                &href,
                base.0.as_deref(),
            ) {
                Some(url) => url_record(&ctx, &url).map(|record| record.into_value()),
                None => Ok(rquickjs::Value::new_null(ctx)),
            },
        )?,
    )?;
    host.set(
        "urlSet",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, href: String, field: String, value: String| {
            let mut url = url::Url::parse(&href).map_err(|_| Exception::throw_type(&ctx, "Invalid URL"))?;
            set_url_field(&mut url, &field, &value);
            url_record(&ctx, &url)
        })?,
    )?;
    // The application/x-www-form-urlencoded parser (`URLSearchParams`): `[[name, value], …]`.
    host.set(
        "formParse",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, text: String| -> JsResult<rquickjs::Array<'js>> {
            let pairs = rquickjs::Array::new(ctx.clone())?;
            for (index, (name, value)) in url::form_urlencoded::parse(text.as_bytes()).enumerate() {
                let pair = rquickjs::Array::new(ctx.clone())?;
                pair.set(0, name.as_ref())?;
                pair.set(1, value.as_ref())?;
                pairs.set(index, pair)?;
            }
            Ok(pairs)
        })?,
    )?;
    Ok(())
}

/// The lines `test-utils/write-to-file`'s `console.log(...args)` wrote to `path` (one JSON array
/// per call), like the module's own `read()`: `[]` when the file does not exist.
pub fn read_test_console(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Host side of the test-only module `test-utils/write-to-file`.
pub fn install_test_console<'js>(ctx: &Ctx<'js>, host: &Object<'js>, path: std::path::PathBuf) -> JsResult<()> {
    let write_path = path.clone();
    host.set(
        "testConsoleWrite",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, text: String, append: bool| -> JsResult<()> {
            let result = (|| -> std::io::Result<()> {
                if let Some(dir) = write_path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(&write_path)?;
                file.write_all(text.as_bytes())
            })();
            result.map_err(|e| Exception::throw_message(&ctx, &e.to_string()))
        })?,
    )?;
    host.set(
        "testConsoleRead",
        Function::new(ctx.clone(), move || std::fs::read_to_string(&path).unwrap_or_default())?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_zlib() {
        assert_eq!(hex::encode(digest("md5", b"abc").unwrap()), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            hex::encode(hmac_digest("sha256", b"key", b"The quick brown fox jumps over the lazy dog").unwrap()),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        let packed = zlib("gzip", b"hello hello hello", MAX_INFLATED_BYTES).unwrap();
        assert_eq!(zlib("gunzip", &packed, MAX_INFLATED_BYTES).unwrap(), b"hello hello hello");
        assert!(zlib("inflate", b"garbage", MAX_INFLATED_BYTES).is_err());
        // A bomb stops at the limit while streaming.
        let bomb = zlib("gzip", &vec![0u8; 8 << 20], MAX_INFLATED_BYTES).unwrap();
        let refused = zlib("gunzip", &bomb, 1 << 20).unwrap_err();
        assert!(refused.contains("exceeds 1048576 bytes"), "{refused}");
        // Brotli both ways (Node's default quality 11), its bomb bound, Node's message for garbage.
        let text = "hello brotli ".repeat(100);
        let packed = zlib("brotliCompress", text.as_bytes(), MAX_INFLATED_BYTES).unwrap();
        assert!(packed.len() < 40, "{}", packed.len());
        assert_eq!(zlib("brotliDecompress", &packed, MAX_INFLATED_BYTES).unwrap(), text.as_bytes());
        let fast = BrotliParams { quality: 1, ..BrotliParams::default() };
        let bomb = zlib_with("brotliCompress", &vec![0u8; 8 << 20], MAX_INFLATED_BYTES, fast).unwrap();
        assert!(zlib("brotliDecompress", &bomb, 1 << 20).unwrap_err().contains("exceeds 1048576 bytes"));
        assert_eq!(
            zlib("brotliDecompress", b"not brotli at all", MAX_INFLATED_BYTES).unwrap_err(),
            "Decompression failed"
        );
    }

    #[test]
    fn json_errors_read_as_v8() {
        assert_eq!(v8_json_error("{\"a\":").as_deref(), Some("Unexpected end of JSON input"));
        assert_eq!(v8_json_error("").as_deref(), Some("Unexpected end of JSON input"));
        assert_eq!(v8_json_error("abc").as_deref(), Some("Unexpected token 'a', \"abc\" is not valid JSON"));
        assert_eq!(
            v8_json_error("<html><body>hello world this is a long page</body></html>").as_deref(),
            Some("Unexpected token '<', \"<html><bod\"... is not valid JSON")
        );
        assert_eq!(
            v8_json_error("{\"a\":1}x").as_deref(),
            Some("Unexpected non-whitespace character after JSON at position 7")
        );
        assert_eq!(v8_json_error("{\"a\":1}"), None);
    }
}
