//! What the sandbox's synchronous host functions do, engine-neutral: the work behind `crypto`,
//! `zlib`, `url`, `Buffer` and `TextEncoder`/`TextDecoder` (the JS side lives in `prelude.js`),
//! on plain bytes and strings, so plugin code never holds a host object. Each engine binds them:
//! `host/quickjs.rs` (QuickJS values, buffers allocated in the VM's heap) and `host/v8.rs` (V8,
//! through the shim's JSON boundary; bytes travel as binary strings that `v8/bootstrap.js`
//! converts).
//!
//! Also the host-op limits the prelude enforces per VM (`limits`: how many host calls may be in
//! flight) and V8's `JSON.parse` message for `res.json()`'s node-fetch error (`jsonError`).
//!
//! Not here: functions that need the VM's async machinery (meta calls, fetch, timers), which
//! live in each engine's VM (`quickjs.rs`, `v8/vm.rs`); the HTTP client itself is `fetch.rs`.
//!
//! Host-made memory counts against the VM's limit: zlib output is bounded while it streams by the
//! VM's headroom (QuickJS: [`memory_headroom`]; V8: its heap limit less its heap used), so an
//! inflate bomb stops at the budget instead of after it.

pub mod fetch;
mod quickjs;
pub mod v8;

pub use quickjs::{buffer, bytes_of, install, install_test_console, memory_headroom};

use std::io::{Read, Write};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Digest;

/// Largest output a single zlib call may produce, whatever the VM's headroom (a decompression
/// bomb stops at the smaller of the two).
const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `crypto.randomBytes` request.
const MAX_RANDOM_BYTES: usize = 1024 * 1024;

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
pub struct BrotliParams {
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

/// An error a host function throws into JS: its constructor and message.
#[derive(Debug, Clone, PartialEq)]
pub enum Thrown {
    Error(String),
    Type(String),
    Range(String),
}

impl Thrown {
    /// As the meta error the V8 binding throws (name and message).
    pub fn into_meta(self) -> super::MetaError {
        match self {
            Thrown::Error(m) => super::MetaError::new(m),
            Thrown::Type(m) => super::MetaError::named("TypeError", m),
            Thrown::Range(m) => super::MetaError::named("RangeError", m),
        }
    }
}

/// `crypto.createHash(algorithm).update(data).digest()`.
pub fn hash(algorithm: &str, data: &[u8]) -> Result<Vec<u8>, Thrown> {
    digest(algorithm, data).ok_or_else(|| Thrown::Error("Digest method not supported".into()))
}

/// `crypto.createHmac(algorithm, key).update(data).digest()`.
pub fn hmac(algorithm: &str, key: &[u8], data: &[u8]) -> Result<Vec<u8>, Thrown> {
    hmac_digest(algorithm, key, data).ok_or_else(|| Thrown::Error(format!("Invalid digest: {algorithm}")))
}

/// The largest PEM key `crypto.createSign` / `createVerify` accept.
const MAX_KEY_BYTES: usize = 64 * 1024;

/// The digest of a `createSign` algorithm name (`RSA-SHA256`, `sha256`, `SHA512`, …).
fn sign_digest(algorithm: &str) -> Result<openssl::hash::MessageDigest, Thrown> {
    use openssl::hash::MessageDigest;
    let lower = algorithm.to_ascii_lowercase();
    let name = lower.strip_prefix("rsa-").unwrap_or(&lower);
    Ok(match name {
        "md5" => MessageDigest::md5(),
        "sha1" => MessageDigest::sha1(),
        "sha224" => MessageDigest::sha224(),
        "sha256" => MessageDigest::sha256(),
        "sha384" => MessageDigest::sha384(),
        "sha512" => MessageDigest::sha512(),
        _ => return Err(Thrown::Error("Invalid digest".into())),
    })
}

/// Node's message for a key that is no PEM it can read.
const NO_PEM: &str = "error:0909006C:PEM routines:get_name:no start line";

fn private_key(pem: &[u8], passphrase: &str) -> Result<openssl::pkey::PKey<openssl::pkey::Private>, Thrown> {
    use openssl::pkey::PKey;
    if pem.len() > MAX_KEY_BYTES {
        return Err(Thrown::Error("The key is too large".into()));
    }
    let key = if passphrase.is_empty() {
        PKey::private_key_from_pem(pem)
    } else {
        PKey::private_key_from_pem_passphrase(pem, passphrase.as_bytes())
    };
    key.map_err(|_| Thrown::Error(NO_PEM.into()))
}

fn public_key(pem: &[u8], passphrase: &str) -> Result<openssl::pkey::PKey<openssl::pkey::Public>, Thrown> {
    use openssl::pkey::PKey;
    if pem.len() > MAX_KEY_BYTES {
        return Err(Thrown::Error("The key is too large".into()));
    }
    if let Ok(key) = PKey::public_key_from_pem(pem) {
        return Ok(key);
    }
    if let Ok(rsa) = openssl::rsa::Rsa::public_key_from_pem_pkcs1(pem) {
        return PKey::from_rsa(rsa).map_err(|_| Thrown::Error(NO_PEM.into()));
    }
    if let Ok(certificate) = openssl::x509::X509::from_pem(pem) {
        return certificate.public_key().map_err(|_| Thrown::Error(NO_PEM.into()));
    }
    // A private key verifies with its public half, as in Node.
    let private = private_key(pem, passphrase)?;
    let der = private.public_key_to_der().map_err(|_| Thrown::Error(NO_PEM.into()))?;
    PKey::public_key_from_der(&der).map_err(|_| Thrown::Error(NO_PEM.into()))
}

/// `crypto.createSign(algorithm).update(data).sign(key)`: RSA PKCS#1 v1.5 or ECDSA (DER), with a
/// PEM private key (PKCS#8, PKCS#1 or SEC1; `passphrase` when it is encrypted, else empty).
pub fn sign(algorithm: &str, key_pem: &[u8], passphrase: &str, data: &[u8]) -> Result<Vec<u8>, Thrown> {
    let digest = sign_digest(algorithm)?;
    let key = private_key(key_pem, passphrase)?;
    let mut signer = openssl::sign::Signer::new(digest, &key).map_err(|error| Thrown::Error(error.to_string()))?;
    signer.update(data).map_err(|error| Thrown::Error(error.to_string()))?;
    signer.sign_to_vec().map_err(|error| Thrown::Error(error.to_string()))
}

/// `crypto.createVerify(algorithm).update(data).verify(key, signature)`, with a PEM public key,
/// certificate or private key.
pub fn verify(
    algorithm: &str,
    key_pem: &[u8],
    passphrase: &str,
    data: &[u8],
    signature: &[u8],
) -> Result<bool, Thrown> {
    let digest = sign_digest(algorithm)?;
    let key = public_key(key_pem, passphrase)?;
    let mut verifier = openssl::sign::Verifier::new(digest, &key).map_err(|error| Thrown::Error(error.to_string()))?;
    verifier.update(data).map_err(|error| Thrown::Error(error.to_string()))?;
    // A malformed signature is `false`, as in Node.
    Ok(verifier.verify(signature).unwrap_or(false))
}

/// `crypto.randomBytes(size)`.
pub fn random_bytes(size: f64) -> Result<Vec<u8>, Thrown> {
    if !(0.0..=MAX_RANDOM_BYTES as f64).contains(&size) {
        return Err(Thrown::Range("The value of \"size\" is out of range.".into()));
    }
    let mut bytes = vec![0u8; size as usize];
    rand::Rng::fill(&mut rand::rng(), bytes.as_mut_slice());
    Ok(bytes)
}

pub fn base64_encode(bytes: &[u8], url_safe: bool) -> String {
    if url_safe {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    } else {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}

/// Node is lenient: url-safe alphabet, missing padding and whitespace are accepted.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let cleaned: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.as_bytes()).unwrap_or_default()
}

/// One zlib operation (`op`: `gzip`, `inflate`, `brotliCompress`, …) whose output must fit in
/// `headroom` bytes of the VM's memory.
pub fn zlib_op(op: &str, data: &[u8], headroom: usize, brotli: BrotliParams) -> Result<Vec<u8>, Thrown> {
    let limit = (headroom as u64).min(MAX_INFLATED_BYTES);
    zlib_with(op, data, limit, brotli).map_err(Thrown::Error)
}

/// The WHATWG URL API's getters (`url::quirks` implements them to the standard, as Node does).
pub fn url_fields(url: &url::Url) -> [(&'static str, String); 11] {
    use url::quirks;
    [
        ("href", quirks::href(url).to_string()),
        ("protocol", quirks::protocol(url).to_string()),
        ("username", quirks::username(url).to_string()),
        ("password", quirks::password(url).to_string()),
        ("host", quirks::host(url).to_string()),
        ("hostname", quirks::hostname(url).to_string()),
        ("port", quirks::port(url).to_string()),
        ("pathname", quirks::pathname(url).to_string()),
        ("search", quirks::search(url).to_string()),
        ("hash", quirks::hash(url).to_string()),
        ("origin", quirks::origin(url)),
    ]
}

/// `new URL(href, base)`: `None` for an invalid input or base.
pub fn url_parse(href: &str, base: Option<&str>) -> Option<url::Url> {
    parse_url(href, base)
}

/// A WHATWG URL setter applied to `href` (`TypeError: Invalid URL` when `href` does not parse).
pub fn url_set(href: &str, field: &str, value: &str) -> Result<url::Url, Thrown> {
    let mut url = url::Url::parse(href).map_err(|_| Thrown::Type("Invalid URL".into()))?;
    set_url_field(&mut url, field, value);
    Ok(url)
}

/// The application/x-www-form-urlencoded parser (`URLSearchParams`).
pub fn form_parse(text: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(text.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// Host calls one VM may have in flight (`host.limits()` of the prelude).
pub fn max_host_calls_in_flight() -> usize {
    fetch::settings().max_host_calls_in_flight
}

/// `test-utils/write-to-file`: appends `text` to `path` (or replaces the file's contents).
pub fn test_console_write(path: &std::path::Path, text: &str, append: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(path)?;
    file.write_all(text.as_bytes())
}

/// Node's brotli encoder parameters from the `params` entries of the options (key, number or the
/// JS type name of a value that is no number), as Node reads them: a key that is no
/// `BROTLI_PARAM_*` is a `RangeError` (`ERR_BROTLI_INVALID_PARAM`), a value that is no number a
/// `TypeError`; values out of range are clamped (quality, window) or ignored (mode), as the
/// brotli encoder does.
pub fn brotli_params(entries: impl IntoIterator<Item = (String, Result<f64, String>)>) -> Result<BrotliParams, Thrown> {
    let mut out = BrotliParams::default();
    for (key, value) in entries {
        if !matches!(key.as_str(), "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9") {
            return Err(Thrown::Range(format!("{key} is not a valid Brotli parameter")));
        }
        let number = value.map_err(|type_name| {
            Thrown::Type(format!(
                "The \"options.params[key]\" property must be of type number. Received type {type_name}"
            ))
        })?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn rs256_signatures_verify_with_the_public_half_only() {
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let key = openssl::pkey::PKey::from_rsa(rsa).unwrap();
        let private = key.private_key_to_pem_pkcs8().unwrap();
        let public = key.public_key_to_pem().unwrap();
        let signature = super::sign("RSA-SHA256", &private, "", b"payload").unwrap();
        assert_eq!(signature.len(), 256);
        assert!(super::verify("sha256", &public, "", b"payload", &signature).unwrap());
        assert!(super::verify("SHA256", &private, "", b"payload", &signature).unwrap());
        assert!(!super::verify("sha256", &public, "", b"other", &signature).unwrap());
        assert!(!super::verify("sha256", &public, "", b"payload", b"junk").unwrap());
        assert!(
            matches!(super::sign("whirlpool", &private, "", b"x"), Err(super::Thrown::Error(m)) if m == "Invalid digest")
        );
        assert!(
            matches!(super::sign("sha256", b"nope", "", b"x"), Err(super::Thrown::Error(m)) if m.contains("no start line"))
        );
    }

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
