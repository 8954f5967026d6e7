//! Direct conversion between `serde_json::Value` and QuickJS values (no JSON text round trip).
//!
//! JS → JSON follows `JSON.stringify` closely enough for plugin data: `toJSON` is honoured (Dates
//! become ISO strings, Buffers `{type: "Buffer", data}`), functions/symbols/undefined object
//! members are skipped, `undefined`/functions in arrays become `null`, array holes `null` (as V8's
//! `JSON.stringify` of a sparse array), non-finite numbers `null`, and cycles/over-deep nesting
//! become `null` instead of failing.
//!
//! Every value crossing from the VM to the host is bounded by a [`Budget`]: values visited
//! (a shared child counts once per visit, as a copy would hold it), bytes of strings and keys,
//! and the call's deadline. An array's `length` is only a claim: it is checked against the
//! budget before a single element is read (a length of 2^31 − 1 would otherwise be copied as
//! 2^31 nulls), and read as a plain number (rquickjs' `Array::len` asserts a small integer and a
//! panic there poisons the runtime lock), so the value is refused instead.

use std::time::Instant;

use rquickjs::{Array, Ctx, Function, Object, Type, Value as JsValue};
use serde_json::{Map, Number, Value};

/// Nesting deeper than this is cut (cycles end here too).
const MAX_DEPTH: usize = 128;
/// Values (every array element, hole and object member, per visit) one conversion may produce.
pub const MAX_VALUES: usize = 1_000_000;
/// Bytes of strings and keys one conversion may produce.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;
/// How many values are converted between two looks at the clock.
const CLOCK_EVERY: usize = 4096;

/// Why a value was not taken from the VM.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("it holds more than {MAX_VALUES} values (array elements and object members, shared ones counted each time they appear)")]
    TooManyValues,
    #[error("an array claims a length of {0}, more than the {MAX_VALUES} values one value may hold")]
    ArrayTooLong(f64),
    #[error("its strings and keys take more than {MAX_BYTES} bytes")]
    TooManyBytes,
    #[error("reading it ran past the call's deadline")]
    Deadline,
}

/// What is left for one conversion.
#[derive(Debug, Clone)]
pub struct Budget {
    values: usize,
    bytes: usize,
    deadline: Option<Instant>,
    since_clock: usize,
}

impl Budget {
    /// The standard budget, ending at `deadline` (if any).
    pub fn new(deadline: Option<Instant>) -> Budget {
        Budget { values: MAX_VALUES, bytes: MAX_BYTES, deadline, since_clock: 0 }
    }

    fn value(&mut self) -> Result<(), Refused> {
        self.values = self.values.checked_sub(1).ok_or(Refused::TooManyValues)?;
        self.since_clock += 1;
        if self.since_clock >= CLOCK_EVERY {
            self.since_clock = 0;
            self.check_clock()?;
        }
        Ok(())
    }

    fn check_clock(&self) -> Result<(), Refused> {
        match self.deadline {
            Some(deadline) if Instant::now() > deadline => Err(Refused::Deadline),
            _ => Ok(()),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<(), Refused> {
        self.bytes = self.bytes.checked_sub(n).ok_or(Refused::TooManyBytes)?;
        Ok(())
    }
}

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

/// Reads a JS value as JSON; `undefined` (and other non-JSON values at the top) become `Null`,
/// and so does a value over the standard budget (for diagnostics: error messages, exports).
pub fn from_js(value: &JsValue<'_>) -> Value {
    from_js_checked(value, &mut Budget::new(None)).unwrap_or(Value::Null)
}

/// Reads a JS value as JSON within `budget`: a value that does not fit is refused as a whole.
pub fn from_js_checked(value: &JsValue<'_>, budget: &mut Budget) -> Result<Value, Refused> {
    budget.check_clock()?;
    Ok(convert(value, 0, budget)?.unwrap_or(Value::Null))
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

/// A number-valued property (`length`) as a float, whatever its representation.
fn number_of(value: &JsValue<'_>) -> Option<f64> {
    match value.type_of() {
        Type::Int => value.as_int().map(f64::from),
        Type::Float => value.as_float(),
        _ => None,
    }
}

/// `Ok(None)`: not representable in JSON here (skipped in objects, `null` in arrays), or a getter
/// threw (the reference's `JSON.stringify` would have thrown: the member is left out).
fn convert(value: &JsValue<'_>, depth: usize, budget: &mut Budget) -> Result<Option<Value>, Refused> {
    budget.value()?;
    Ok(match value.type_of() {
        Type::Uninitialized | Type::Undefined | Type::Symbol | Type::Function | Type::Constructor => None,
        Type::Null => Some(Value::Null),
        Type::Bool => Some(Value::Bool(value.as_bool().unwrap_or(false))),
        Type::Int => Some(Value::Number(value.as_int().unwrap_or(0).into())),
        Type::Float => Some(js_number(value.as_float().unwrap_or(f64::NAN))),
        Type::String => {
            let text = value.as_string().and_then(|s| s.to_string().ok()).unwrap_or_default();
            budget.bytes(text.len())?;
            Some(Value::String(text))
        }
        Type::BigInt => {
            // JSON.stringify throws on BigInt; the string form keeps the data.
            let text: Option<String> =
                value.ctx().globals().get::<_, Function>("String").ok().and_then(|f| f.call((value.clone(),)).ok());
            if let Some(text) = &text {
                budget.bytes(text.len())?;
            }
            Some(text.map(Value::String).unwrap_or(Value::Null))
        }
        Type::Array => {
            if depth >= MAX_DEPTH {
                return Ok(Some(Value::Null));
            }
            let Some(object) = value.as_object() else { return Ok(None) };
            let Ok(length) = object.get::<_, JsValue>("length") else { return Ok(None) };
            let length = number_of(&length).filter(|l| l.is_finite() && *l > 0.0).unwrap_or(0.0).floor();
            if length > budget.values as f64 {
                return Err(Refused::ArrayTooLong(length));
            }
            let length = length as u32;
            let mut out = Vec::with_capacity(length.min(1024) as usize);
            for index in 0..length {
                let item = match object.get::<_, JsValue>(index) {
                    Ok(item) => item,
                    Err(_) => {
                        budget.check_clock()?;
                        return Ok(None);
                    }
                };
                // Holes read as `undefined`, which JSON writes as `null` in arrays.
                out.push(convert(&item, depth + 1, budget)?.unwrap_or(Value::Null));
            }
            Some(Value::Array(out))
        }
        Type::Object | Type::Exception | Type::Promise => {
            if depth >= MAX_DEPTH {
                return Ok(Some(Value::Null));
            }
            let Some(object) = value.as_object() else { return Ok(None) };
            if let Ok(to_json) = object.get::<_, JsValue>("toJSON") {
                if let Some(function) = to_json.as_function() {
                    let replaced: JsValue = match function.call((rquickjs::function::This(object.clone()),)) {
                        Ok(replaced) => replaced,
                        Err(_) => {
                            budget.check_clock()?;
                            return Ok(None);
                        }
                    };
                    return convert(&replaced, depth + 1, budget);
                }
            }
            let mut out = Map::new();
            for prop in object.props::<String, JsValue>() {
                let Ok((key, item)) = prop else {
                    budget.check_clock()?;
                    continue;
                };
                budget.bytes(key.len())?;
                if let Some(v) = convert(&item, depth + 1, budget)? {
                    out.insert(key, v);
                }
            }
            Some(Value::Object(out))
        }
        _ => None,
    })
}

/// The items of a JS array built by the prelude or passed by a plugin (host function
/// arguments), read within `budget`.
pub fn array_items<'js>(array: &Object<'js>, budget: &mut Budget) -> Result<Vec<JsValue<'js>>, Refused> {
    let length = array.get::<_, JsValue>("length").ok().and_then(|l| number_of(&l));
    let length = length.filter(|l| l.is_finite() && *l > 0.0).unwrap_or(0.0).floor();
    if length > budget.values as f64 {
        return Err(Refused::ArrayTooLong(length));
    }
    let mut items = Vec::with_capacity((length as usize).min(1024));
    for index in 0..length as u32 {
        budget.value()?;
        items.push(array.get::<_, JsValue>(index).unwrap_or_else(|_| JsValue::new_undefined(array.ctx().clone())));
    }
    Ok(items)
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

    #[test]
    fn values_are_bounded_by_what_they_hold() {
        let rt = Runtime::new().unwrap();
        let ctx = Context::full(&rt).unwrap();
        ctx.with(|ctx| {
            let check = |code: &str| {
                let v: JsValue = ctx.eval(code).unwrap();
                from_js_checked(&v, &mut Budget::new(None))
            };
            // V8: JSON.stringify of a sparse array writes its holes as null.
            assert_eq!(check("const a = [1]; a[3] = 4; a").unwrap(), json!([1, null, null, 4]));
            assert_eq!(check("Object.assign([], {length: 2**31 - 1})"), Err(Refused::ArrayTooLong(2147483647.0)));
            assert_eq!(check("Object.assign([], {length: 2**32 - 1})"), Err(Refused::ArrayTooLong(4294967295.0)));
            assert_eq!(
                check("let o = {v: 1}; for (let i = 0; i < 40; i++) o = {a: o, b: o}; o"),
                Err(Refused::TooManyValues)
            );
            assert_eq!(check("({s: 'x'.repeat(65 * 1024 * 1024)})"), Err(Refused::TooManyBytes));
            // A shared child counts per visit, but a moderate one is fine.
            let shared = check("let p = {v: 1}; for (let i = 0; i < 10; i++) p = {a: p, b: p}; p").unwrap();
            assert_eq!(shared["a"]["b"]["a"]["b"]["a"]["b"]["a"]["b"]["a"]["b"]["v"], 1);
            // Past the deadline nothing is read.
            let v: JsValue = ctx.eval("({a: 1})").unwrap();
            let mut late = Budget::new(Some(Instant::now() - std::time::Duration::from_millis(1)));
            assert_eq!(from_js_checked(&v, &mut late), Err(Refused::Deadline));
        });
    }
}
