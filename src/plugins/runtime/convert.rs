//! Direct conversion between `serde_json::Value` and QuickJS values (no JSON text round trip).
//!
//! JS → JSON follows `JSON.stringify` closely enough for plugin data: `toJSON` is honoured (Dates
//! become ISO strings, Buffers `{type: "Buffer", data}`), functions/symbols/undefined object
//! members are skipped, `undefined`/functions in arrays become `null`, non-finite numbers `null`,
//! and cycles/over-deep nesting become `null` instead of failing.

use rquickjs::{Array, Ctx, Function, Object, Type, Value as JsValue};
use serde_json::{Map, Number, Value};

/// Nesting deeper than this is cut (cycles end here too).
const MAX_DEPTH: usize = 128;

/// Builds a fresh JS value from JSON.
pub fn to_js<'js>(ctx: &Ctx<'js>, value: &Value) -> rquickjs::Result<JsValue<'js>> {
    Ok(match value {
        Value::Null => JsValue::new_null(ctx.clone()),
        Value::Bool(b) => JsValue::new_bool(ctx.clone(), *b),
        Value::Number(n) => number_to_js(ctx, n),
        Value::String(s) => rquickjs::String::from_str(ctx.clone(), s)?.into_value(),
        Value::Array(items) => {
            let array = Array::new(ctx.clone())?;
            for (i, item) in items.iter().enumerate() {
                array.set(i, to_js(ctx, item)?)?;
            }
            array.into_value()
        }
        Value::Object(map) => {
            let object = Object::new(ctx.clone())?;
            for (key, item) in map {
                object.set(key.as_str(), to_js(ctx, item)?)?;
            }
            object.into_value()
        }
    })
}

fn number_to_js<'js>(ctx: &Ctx<'js>, n: &Number) -> JsValue<'js> {
    if let Some(i) = n.as_i64() {
        if let Ok(small) = i32::try_from(i) {
            return JsValue::new_int(ctx.clone(), small);
        }
    }
    JsValue::new_number(ctx.clone(), n.as_f64().unwrap_or(f64::NAN))
}

/// Reads a JS value as JSON; `undefined` (and other non-JSON values at the top) become `Null`.
pub fn from_js(value: &JsValue<'_>) -> Value {
    from_js_depth(value, 0).unwrap_or(Value::Null)
}

fn js_number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        // Integral doubles print without ".0" in JS; keep them integers.
        if f == 0.0 && f.is_sign_negative() {
            return Value::Number(0.into());
        }
        return Value::Number((f as i64).into());
    }
    Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)
}

fn from_js_depth(value: &JsValue<'_>, depth: usize) -> Option<Value> {
    match value.type_of() {
        Type::Uninitialized | Type::Undefined | Type::Symbol | Type::Function | Type::Constructor => None,
        Type::Null => Some(Value::Null),
        Type::Bool => Some(Value::Bool(value.as_bool().unwrap_or(false))),
        Type::Int => Some(Value::Number(value.as_int().unwrap_or(0).into())),
        Type::Float => Some(js_number(value.as_float().unwrap_or(f64::NAN))),
        Type::String => Some(Value::String(value.as_string().and_then(|s| s.to_string().ok()).unwrap_or_default())),
        Type::BigInt => {
            // JSON.stringify throws on BigInt; the string form keeps the data.
            let text: Option<String> =
                value.ctx().globals().get::<_, Function>("String").ok()?.call((value.clone(),)).ok();
            Some(text.map(Value::String).unwrap_or(Value::Null))
        }
        Type::Array => {
            if depth >= MAX_DEPTH {
                return Some(Value::Null);
            }
            let array = value.as_array()?;
            let mut out = Vec::with_capacity(array.len());
            for item in array.iter::<JsValue>() {
                let item = item.ok()?;
                out.push(from_js_depth(&item, depth + 1).unwrap_or(Value::Null));
            }
            Some(Value::Array(out))
        }
        Type::Object | Type::Exception | Type::Promise => {
            if depth >= MAX_DEPTH {
                return Some(Value::Null);
            }
            let object = value.as_object()?;
            if let Ok(to_json) = object.get::<_, JsValue>("toJSON") {
                if let Some(function) = to_json.as_function() {
                    let replaced: JsValue = function.call((rquickjs::function::This(object.clone()),)).ok()?;
                    return from_js_depth(&replaced, depth + 1);
                }
            }
            let mut out = Map::new();
            for prop in object.props::<String, JsValue>() {
                let Ok((key, item)) = prop else { continue };
                if let Some(v) = from_js_depth(&item, depth + 1) {
                    out.insert(key, v);
                }
            }
            Some(Value::Object(out))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rquickjs::{Context, Runtime};
    use serde_json::json;

    #[test]
    fn round_trips_plain_data() {
        let rt = Runtime::new().unwrap();
        let ctx = Context::full(&rt).unwrap();
        ctx.with(|ctx| {
            let input = json!({"a": 1, "b": [1.5, "x", null, true], "c": {"d": -3000000000i64}, "e": ""});
            let js = to_js(&ctx, &input).unwrap();
            assert_eq!(from_js(&js), input);
            let v: JsValue = ctx.eval("({u: undefined, f() {}, d: new Date(0), n: NaN, arr: [undefined]})").unwrap();
            assert_eq!(from_js(&v), json!({"d": "1970-01-01T00:00:00.000Z", "n": null, "arr": [null]}));
            let cyc: JsValue = ctx.eval("const o = {}; o.o = o; o").unwrap();
            assert!(from_js(&cyc).is_object());
        });
    }
}
