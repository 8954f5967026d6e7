//! The V8 binding of the host functions (`host/mod.rs` holds what they do). The shim passes
//! values as JSON, so bytes travel as *binary strings* (one char per byte, U+0000..U+00FF);
//! `v8/bootstrap.js` turns them into `Uint8Array`s and back, and hands the prelude the same
//! `host` object QuickJS does. Every function is a global `__pst_<name>` that the bootstrap takes
//! and deletes before any plugin code runs.

use std::path::PathBuf;
use std::rc::Rc;

use serde_json::{json, Value};

use super::super::v8::{EngineError, V8Isolate};
use super::super::MetaError;
use super::Thrown;

/// The prefix of the host globals the bootstrap collects.
pub const PREFIX: &str = "__pst_";

/// The bytes of a binary string (every char below U+0100).
pub fn bin_bytes(value: Option<&Value>) -> Result<Vec<u8>, MetaError> {
    let Some(Value::String(text)) = value else {
        return Err(MetaError::named("TypeError", "expected a Buffer, Uint8Array or ArrayBuffer"));
    };
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).map_err(|_| MetaError::named("TypeError", "expected bytes")))
        .collect()
}

/// A binary string of `bytes`.
pub fn bin_string(bytes: &[u8]) -> Value {
    Value::String(bytes.iter().map(|&b| char::from(b)).collect())
}

fn text(args: &[Value], index: usize) -> String {
    match args.get(index) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn url_record(url: &url::Url) -> Value {
    Value::Object(super::url_fields(url).into_iter().map(|(k, v)| (k.to_string(), Value::String(v))).collect())
}

/// Registers the synchronous host functions on `iso`. `headroom` tells the bytes the isolate may
/// still allocate (zlib output is bounded by it while it streams).
pub fn install(
    iso: &mut V8Isolate,
    headroom: Rc<dyn Fn() -> usize>,
    test_console: Option<PathBuf>,
) -> Result<(), EngineError> {
    let mut define = |name: &str, f: Box<dyn Fn(Vec<Value>) -> Result<Value, MetaError>>| {
        iso.register_function(&format!("{PREFIX}{name}"), f)
    };
    define(
        "limits",
        Box::new(|_: Vec<Value>| Ok(json!({ "maxHostCallsInFlight": super::max_host_calls_in_flight() as f64 }))),
    )?;
    define(
        "jsonError",
        Box::new(|args: Vec<Value>| Ok(super::v8_json_error(&text(&args, 0)).map_or(Value::Null, Value::String))),
    )?;
    define("utf8Encode", Box::new(|args: Vec<Value>| Ok(bin_string(text(&args, 0).as_bytes()))))?;
    define(
        "utf8Decode",
        Box::new(|args: Vec<Value>| Ok(Value::String(String::from_utf8_lossy(&bin_bytes(args.first())?).into_owned()))),
    )?;
    define(
        "base64Encode",
        Box::new(|args: Vec<Value>| {
            let url_safe = args.get(1).and_then(Value::as_bool).unwrap_or(false);
            Ok(Value::String(super::base64_encode(&bin_bytes(args.first())?, url_safe)))
        }),
    )?;
    define("base64Decode", Box::new(|args: Vec<Value>| Ok(bin_string(&super::base64_decode(&text(&args, 0))))))?;
    define(
        "hash",
        Box::new(|args: Vec<Value>| {
            let out = super::hash(&text(&args, 0), &bin_bytes(args.get(1))?).map_err(Thrown::into_meta)?;
            Ok(bin_string(&out))
        }),
    )?;
    define(
        "hmac",
        Box::new(|args: Vec<Value>| {
            let out = super::hmac(&text(&args, 0), &bin_bytes(args.get(1))?, &bin_bytes(args.get(2))?)
                .map_err(Thrown::into_meta)?;
            Ok(bin_string(&out))
        }),
    )?;
    define(
        "sign",
        Box::new(|args: Vec<Value>| {
            let out = super::sign(&text(&args, 0), &bin_bytes(args.get(1))?, &text(&args, 2), &bin_bytes(args.get(3))?)
                .map_err(Thrown::into_meta)?;
            Ok(bin_string(&out))
        }),
    )?;
    define(
        "verify",
        Box::new(|args: Vec<Value>| {
            let valid = super::verify(
                &text(&args, 0),
                &bin_bytes(args.get(1))?,
                &text(&args, 2),
                &bin_bytes(args.get(3))?,
                &bin_bytes(args.get(4))?,
            )
            .map_err(Thrown::into_meta)?;
            Ok(Value::Bool(valid))
        }),
    )?;
    define(
        "randomBytes",
        Box::new(|args: Vec<Value>| {
            let size = args.first().and_then(Value::as_f64).unwrap_or(f64::NAN);
            Ok(bin_string(&super::random_bytes(size).map_err(Thrown::into_meta)?))
        }),
    )?;
    define("randomUUID", Box::new(|_: Vec<Value>| Ok(Value::String(uuid::Uuid::new_v4().to_string()))))?;
    define(
        "zlib",
        Box::new(move |args: Vec<Value>| {
            let data = bin_bytes(args.get(1))?;
            // Each entry: its number, or the JS type name of what is no number (bootstrap.js).
            let mut entries = Vec::new();
            if let Some(Value::Object(params)) = args.get(2) {
                for (key, value) in params {
                    let value = match value {
                        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
                        Value::String(type_name) => Err(type_name.clone()),
                        _ => Err("undefined".to_string()),
                    };
                    entries.push((key.clone(), value));
                }
            }
            let brotli = super::brotli_params(entries).map_err(Thrown::into_meta)?;
            // The output becomes a string, then bytes, in the isolate: it must fit there twice.
            let out = super::zlib_op(&text(&args, 0), &data, headroom() / 2, brotli).map_err(Thrown::into_meta)?;
            Ok(bin_string(&out))
        }),
    )?;
    define(
        "urlParse",
        Box::new(|args: Vec<Value>| {
            let base = match args.get(1) {
                Some(Value::String(base)) => Some(base.as_str()),
                _ => None,
            };
            Ok(super::url_parse(&text(&args, 0), base).map_or(Value::Null, |url| url_record(&url)))
        }),
    )?;
    define(
        "urlSet",
        Box::new(|args: Vec<Value>| {
            let url = super::url_set(&text(&args, 0), &text(&args, 1), &text(&args, 2)).map_err(Thrown::into_meta)?;
            Ok(url_record(&url))
        }),
    )?;
    define(
        "formParse",
        Box::new(|args: Vec<Value>| {
            let pairs = super::form_parse(&text(&args, 0)).into_iter().map(|(k, v)| json!([k, v])).collect();
            Ok(Value::Array(pairs))
        }),
    )?;
    define(
        "facades",
        Box::new(|_: Vec<Value>| {
            let list = super::super::modules::FACADES.iter().map(|f| json!([f.name, f.importable])).collect();
            Ok(Value::Array(list))
        }),
    )?;
    define(
        "facadeSource",
        Box::new(|args: Vec<Value>| {
            let name = text(&args, 0);
            let Some(facade) = super::super::modules::find(&name) else {
                return Err(MetaError::named("TypeError", format!("no facade module {name}")));
            };
            Ok(json!([facade.source, super::super::modules::file_name(&name)]))
        }),
    )?;
    define(
        "importMessage",
        Box::new(|args: Vec<Value>| {
            Ok(Value::String(crate::plugins::transform::forbidden_import_message(&text(&args, 0))))
        }),
    )?;
    if let Some(path) = test_console {
        let write_path = path.clone();
        define(
            "testConsoleWrite",
            Box::new(move |args: Vec<Value>| {
                let append = args.get(1).and_then(Value::as_bool).unwrap_or(false);
                super::test_console_write(&write_path, &text(&args, 0), append)
                    .map(|_| Value::Null)
                    .map_err(|e| MetaError::new(e.to_string()))
            }),
        )?;
        define(
            "testConsoleRead",
            Box::new(move |_: Vec<Value>| Ok(Value::String(std::fs::read_to_string(&path).unwrap_or_default()))),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_strings_round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(bin_bytes(Some(&bin_string(&bytes))).unwrap(), bytes);
        assert!(bin_bytes(Some(&Value::String("€".into()))).is_err());
    }
}
