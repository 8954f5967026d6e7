//! The QuickJS binding of the host functions (`host/mod.rs` holds what they do): plain bytes and
//! strings in and out, every buffer allocated in the VM's own heap.

use rquickjs::{ArrayBuffer, Ctx, Exception, Function, Object, Result as JsResult, TypedArray, Value};

use super::Thrown;

fn throw(ctx: &Ctx<'_>, thrown: Thrown) -> rquickjs::Error {
    match thrown {
        Thrown::Error(m) => Exception::throw_message(ctx, &m),
        Thrown::Type(m) => Exception::throw_type(ctx, &m),
        Thrown::Range(m) => Exception::throw_range(ctx, &m),
    }
}

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

/// Brotli options from a `params` object.
fn brotli_params<'js>(ctx: &Ctx<'js>, params: Option<Object<'js>>) -> JsResult<super::BrotliParams> {
    let mut entries = Vec::new();
    if let Some(params) = params {
        for key in params.keys::<String>() {
            let key = key?;
            let value: Value = params.get(key.as_str())?;
            entries.push((key, value.as_number().ok_or_else(|| value.type_name().to_string())));
        }
    }
    super::brotli_params(entries).map_err(|t| throw(ctx, t))
}

fn url_record<'js>(ctx: &Ctx<'js>, url: &url::Url) -> JsResult<Object<'js>> {
    let record = Object::new(ctx.clone())?;
    for (name, value) in super::url_fields(url) {
        record.set(name, value)?;
    }
    Ok(record)
}

/// Adds the synchronous host functions to `host`.
pub fn install<'js>(ctx: &Ctx<'js>, host: &Object<'js>) -> JsResult<()> {
    // The facade modules (`runtime/modules`): their list, or one compiled (on demand).
    host.set(
        "facade",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, name: rquickjs::function::Opt<String>| -> JsResult<Value<'js>> {
            let Some(name) = name.0 else {
                let list = rquickjs::Array::new(ctx.clone())?;
                for (index, facade) in super::super::modules::FACADES.iter().enumerate() {
                    let entry = rquickjs::Array::new(ctx.clone())?;
                    entry.set(0, facade.name)?;
                    entry.set(1, facade.importable)?;
                    list.set(index, entry)?;
                }
                return Ok(list.into_value());
            };
            let Some(facade) = super::super::modules::find(&name) else {
                return Err(Exception::throw_type(&ctx, &format!("no facade module {name}")));
            };
            let source = format!("export default {}", facade.source);
            let (module, _) =
                rquickjs::Module::declare(ctx.clone(), super::super::modules::file_name(&name), source)?.eval()?;
            module.namespace()?.get("default")
        })?,
    )?;
    host.set(
        "limits",
        Function::new(ctx.clone(), |ctx: Ctx<'js>| -> JsResult<Object<'js>> {
            let limits = Object::new(ctx)?;
            limits.set("maxHostCallsInFlight", super::max_host_calls_in_flight() as f64)?;
            Ok(limits)
        })?,
    )?;
    host.set("jsonError", Function::new(ctx.clone(), |text: String| super::v8_json_error(&text))?)?;
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
            Ok(super::base64_encode(&bytes_of(&ctx, &v)?, url_safe))
        })?,
    )?;
    host.set(
        "base64Decode",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, s: String| buffer(&ctx, super::base64_decode(&s)))?,
    )?;
    host.set(
        "hash",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, algorithm: String, data: Value<'js>| {
            let data = bytes_of(&ctx, &data)?;
            let out = super::hash(&algorithm, &data).map_err(|t| throw(&ctx, t))?;
            buffer(&ctx, out)
        })?,
    )?;
    host.set(
        "hmac",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, algorithm: String, key: Value<'js>, data: Value<'js>| {
            let key = bytes_of(&ctx, &key)?;
            let data = bytes_of(&ctx, &data)?;
            let out = super::hmac(&algorithm, &key, &data).map_err(|t| throw(&ctx, t))?;
            buffer(&ctx, out)
        })?,
    )?;
    host.set(
        "sign",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, algorithm: String, key: Value<'js>, passphrase: String, data: Value<'js>| {
                let key = bytes_of(&ctx, &key)?;
                let data = bytes_of(&ctx, &data)?;
                let out = super::sign(&algorithm, &key, &passphrase, &data).map_err(|t| throw(&ctx, t))?;
                buffer(&ctx, out)
            },
        )?,
    )?;
    host.set(
        "verify",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>,
             algorithm: String,
             key: Value<'js>,
             passphrase: String,
             data: Value<'js>,
             signature: Value<'js>|
             -> JsResult<bool> {
                let key = bytes_of(&ctx, &key)?;
                let data = bytes_of(&ctx, &data)?;
                let signature = bytes_of(&ctx, &signature)?;
                super::verify(&algorithm, &key, &passphrase, &data, &signature).map_err(|t| throw(&ctx, t))
            },
        )?,
    )?;
    host.set(
        "randomBytes",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, size: f64| {
            let out = super::random_bytes(size).map_err(|t| throw(&ctx, t))?;
            buffer(&ctx, out)
        })?,
    )?;
    host.set("randomUUID", Function::new(ctx.clone(), || uuid::Uuid::new_v4().to_string())?)?;
    host.set(
        "zlib",
        Function::new(
            ctx.clone(),
            |ctx: Ctx<'js>, op: String, data: Value<'js>, params: rquickjs::function::Opt<Object<'js>>| {
                let data = bytes_of(&ctx, &data)?;
                let brotli = brotli_params(&ctx, params.0)?;
                // The output is copied into the VM's heap: it must fit there (plus the input copy).
                let out = super::zlib_op(&op, &data, memory_headroom(&ctx), brotli).map_err(|t| throw(&ctx, t))?;
                buffer(&ctx, out)
            },
        )?,
    )?;
    host.set(
        "urlParse",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, href: String, base: rquickjs::function::Opt<String>| {
            match super::url_parse(&href, base.0.as_deref()) {
                Some(url) => url_record(&ctx, &url).map(|record| record.into_value()),
                None => Ok(rquickjs::Value::new_null(ctx)),
            }
        })?,
    )?;
    host.set(
        "urlSet",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, href: String, field: String, value: String| {
            let url = super::url_set(&href, &field, &value).map_err(|t| throw(&ctx, t))?;
            url_record(&ctx, &url)
        })?,
    )?;
    // The application/x-www-form-urlencoded parser (`URLSearchParams`): `[[name, value], …]`.
    host.set(
        "formParse",
        Function::new(ctx.clone(), |ctx: Ctx<'js>, text: String| -> JsResult<rquickjs::Array<'js>> {
            let pairs = rquickjs::Array::new(ctx.clone())?;
            for (index, (name, value)) in super::form_parse(&text).into_iter().enumerate() {
                let pair = rquickjs::Array::new(ctx.clone())?;
                pair.set(0, name)?;
                pair.set(1, value)?;
                pairs.set(index, pair)?;
            }
            Ok(pairs)
        })?,
    )?;
    Ok(())
}

/// Host side of the test-only module `test-utils/write-to-file`.
pub fn install_test_console<'js>(ctx: &Ctx<'js>, host: &Object<'js>, path: std::path::PathBuf) -> JsResult<()> {
    let write_path = path.clone();
    host.set(
        "testConsoleWrite",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, text: String, append: bool| -> JsResult<()> {
            super::test_console_write(&write_path, &text, append)
                .map_err(|e| Exception::throw_message(&ctx, &e.to_string()))
        })?,
    )?;
    host.set(
        "testConsoleRead",
        Function::new(ctx.clone(), move || std::fs::read_to_string(&path).unwrap_or_default())?,
    )?;
    Ok(())
}
