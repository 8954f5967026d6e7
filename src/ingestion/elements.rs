//! Elements of autocaptured events: parsing `$elements`, the elements hash, and the `elements_chain` text form.
//!
//! Owns the `Element` shape (the `posthog_element` columns), [`extract_elements`] (the reference's
//! `extractElements`), [`elements_hash`] (MD5 of a Python-`json.dumps`-compatible serialization,
//! which Django computes too, so it must match byte for byte), [`elements_to_chain`] (ClickHouse's
//! `elements_chain`) and [`chain_to_elements`] (its parser). It does not store anything: writing
//! element groups is the ingestion writer's job.

use std::cmp::Ordering;
use std::sync::LazyLock;

use icu_collator::options::CollatorOptions;
use icu_collator::{Collator, CollatorBorrowed};
use md5::{Digest, Md5};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::js;

/// `$el_text` is cut to this many UTF-16 code units.
pub const MAX_TEXT_LENGTH: usize = 400;
/// `attr__href` is cut to this many UTF-16 code units.
pub const MAX_HREF_LENGTH: usize = 2048;

/// One element of an autocapture event (index 0 is the clicked element, then its ancestors).
/// Serializes like the reference's element objects: absent fields are left out, in the key order
/// of the reference's `extractElements`, so the JSON written to `posthog_event.elements` matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Element {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attr_class: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attr_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth_child: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth_of_type: Option<i64>,
    /// Every `attr__*` key of the raw element, values unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<i64>,
}

/// Converts the raw `$elements` array of an event. Tolerant: a field of the wrong type is left
/// out (the reference would crash on some of them, e.g. a numeric `$el_text`), and a non-object
/// entry becomes an empty element so the order of the others is kept.
pub fn extract_elements(raw_elements: &[Value]) -> Vec<Element> {
    raw_elements.iter().map(extract_element).collect()
}

fn extract_element(raw: &Value) -> Element {
    let Some(raw) = raw.as_object() else {
        return Element { attributes: Some(Map::new()), ..Element::default() };
    };
    let string = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
    let integer = |key: &str| raw.get(key).and_then(json_integer);
    let attr_class = match raw.get("attr__class") {
        Some(Value::String(classes)) => Some(classes.split(' ').map(str::to_owned).collect()),
        // Not what posthog-js sends, but unambiguous: keep a list of class names as it is.
        Some(Value::Array(classes)) => classes.iter().map(|class| class.as_str().map(str::to_owned)).collect(),
        _ => None,
    };
    Element {
        text: string("$el_text").map(|text| truncate_utf16(&text, MAX_TEXT_LENGTH)),
        tag_name: string("tag_name"),
        href: string("attr__href").map(|href| truncate_utf16(&href, MAX_HREF_LENGTH)),
        attr_class,
        attr_id: string("attr__id"),
        nth_child: integer("nth_child"),
        nth_of_type: integer("nth_of_type"),
        attributes: Some(
            raw.iter().filter(|(key, _)| key.starts_with("attr__")).map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        ..Element::default()
    }
}

fn json_integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64().or_else(|| {
            number.as_f64().filter(|float| float.fract() == 0.0 && float.abs() < 9.2e18).map(|float| float as i64)
        }),
        _ => None,
    }
}

/// JavaScript's `slice(0, max)` on UTF-16 code units. A surrogate pair that would be split is
/// dropped whole (a Rust string cannot hold half of it).
pub fn truncate_utf16(text: &str, max: usize) -> String {
    let mut units = 0;
    let mut end = 0;
    for (index, c) in text.char_indices() {
        units += c.len_utf16();
        if units > max {
            break;
        }
        end = index + c.len_utf8();
    }
    text[..end].to_owned()
}

/// The element group hash (`posthog_elementgroup.hash`, `posthog_event.elements_hash`): MD5 of the
/// Python-`json.dumps(sort_keys=True)` form of the elements, each with `order` = its index (as the
/// reference's `createElementGroup` sets it before hashing).
pub fn elements_hash(elements: &[Element]) -> String {
    let mut out = String::with_capacity(256 * elements.len().max(1));
    out.push('[');
    for (index, element) in elements.iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        // The keys in sorted order: attr_class, attr_id, attributes, href, nth_child,
        // nth_of_type, order, tag_name, text.
        out.push_str("{\"attr_class\": ");
        match &element.attr_class {
            Some(classes) => {
                out.push('[');
                for (position, class) in classes.iter().enumerate() {
                    if position > 0 {
                        out.push_str(", ");
                    }
                    push_python_string(&mut out, class);
                }
                out.push(']');
            }
            None => out.push_str("null"),
        }
        out.push_str(", \"attr_id\": ");
        push_optional_string(&mut out, &element.attr_id);
        out.push_str(", \"attributes\": ");
        match &element.attributes {
            Some(attributes) => python_json_dumps_object(&mut out, attributes),
            None => out.push_str("null"),
        }
        out.push_str(", \"href\": ");
        push_optional_string(&mut out, &element.href);
        out.push_str(", \"nth_child\": ");
        push_optional_integer(&mut out, element.nth_child);
        out.push_str(", \"nth_of_type\": ");
        push_optional_integer(&mut out, element.nth_of_type);
        out.push_str(", \"order\": ");
        out.push_str(&index.to_string());
        out.push_str(", \"tag_name\": ");
        push_optional_string(&mut out, &element.tag_name);
        out.push_str(", \"text\": ");
        push_optional_string(&mut out, &element.text);
        out.push('}');
    }
    out.push(']');
    format!("{:x}", Md5::digest(out.as_bytes()))
}

fn push_optional_string(out: &mut String, value: &Option<String>) {
    match value {
        Some(text) => push_python_string(out, text),
        None => out.push_str("null"),
    }
}

fn push_optional_integer(out: &mut String, value: Option<i64>) {
    match value {
        Some(number) => out.push_str(&number.to_string()),
        None => out.push_str("null"),
    }
}

/// Python's `json.dumps(obj, sort_keys=True)` (ASCII escaping, `", "` and `": "` separators) as the
/// reference reproduces it: keys sorted by UTF-16 code units, numbers printed as JavaScript does.
fn python_json_dumps(out: &mut String, value: &Value) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                python_json_dumps(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => python_json_dumps_object(out, map),
        Value::String(text) => push_python_string(out, text),
        other => out.push_str(&js::json_stringify(other, None)),
    }
}

fn python_json_dumps_object(out: &mut String, map: &Map<String, Value>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
    out.push('{');
    for (index, key) in keys.into_iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        push_python_string(out, key);
        out.push_str(": ");
        python_json_dumps(out, &map[key]);
    }
    out.push('}');
}

/// A JSON string literal as `JSON.stringify` writes it, then with every UTF-16 code unit outside
/// 0x20–0x7F escaped as `\uxxxx` (lower-case hex), which is Python's `ensure_ascii` output.
fn push_python_string(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let push_unit = |out: &mut String, unit: u16| {
        out.push_str("\\u");
        for shift in [12, 8, 4, 0] {
            out.push(char::from(HEX[usize::from((unit >> shift) & 0xf)]));
        }
    };
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='\u{7f}' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_unit(out, *unit);
                }
            }
        }
    }
    out.push('"');
}

/// JavaScript's `localeCompare` without a locale: ICU root collation (Node's default locale gives
/// the same order for attribute names).
static COLLATOR: LazyLock<Option<CollatorBorrowed<'static>>> =
    LazyLock::new(|| Collator::try_new(Default::default(), CollatorOptions::default()).ok());

fn locale_compare(a: &str, b: &str) -> Ordering {
    match COLLATOR.as_ref() {
        Some(collator) => collator.compare(a, b),
        None => a.cmp(b),
    }
}

fn escape_quotes(text: &str) -> String {
    text.replace('"', "\\\"")
}

/// The ClickHouse `elements_chain`: elements joined by `;`, each as
/// `tag.class1.class2:key="value"…` with classes sorted and attributes in locale order.
pub fn elements_to_chain(elements: &[Element]) -> String {
    elements.iter().map(element_to_chain).collect::<Vec<_>>().join(";")
}

fn element_to_chain(element: &Element) -> String {
    let mut out = element.tag_name.clone().unwrap_or_default();
    if let Some(classes) = &element.attr_class {
        let mut classes = classes.clone();
        classes.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
        for class in classes {
            out.push('.');
            out.push_str(&class.replace('"', ""));
        }
    }
    // Later entries override earlier ones with the same key, as the reference's object spread.
    let mut attributes: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: String| match attributes.iter_mut().find(|(existing, _)| existing == key) {
        Some(entry) => entry.1 = value,
        None => attributes.push((key.to_owned(), value)),
    };
    if let Some(text) = element.text.as_ref().filter(|text| !text.is_empty()) {
        set("text", text.clone());
    }
    set("nth-child", element.nth_child.unwrap_or(0).to_string());
    set("nth-of-type", element.nth_of_type.unwrap_or(0).to_string());
    if let Some(href) = element.href.as_ref().filter(|href| !href.is_empty()) {
        set("href", href.clone());
    }
    if let Some(attr_id) = element.attr_id.as_ref().filter(|attr_id| !attr_id.is_empty()) {
        set("attr_id", attr_id.clone());
    }
    for (key, value) in element.attributes.iter().flatten() {
        // The reference calls `value.toString()`, which throws on null; "null" keeps the event.
        set(key, js::to_js_string(Some(value)));
    }
    attributes.sort_by(|(a, _), (b, _)| locale_compare(a, b));
    out.push(':');
    for (key, value) in attributes {
        out.push_str(&format!("{}=\"{}\"", escape_quotes(&key), escape_quotes(&value)));
    }
    out
}

static SPLIT_CHAIN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r#"(?:[^\s;"]|"(?:\\.|[^"])*")+"#).expect("valid"));
static SPLIT_CLASS_ATTRIBUTES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(.*?)($|:([a-zA-Z\-_0-9]*=.*))").expect("valid"));
static PARSE_ATTRIBUTES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r#"((.*?)="(.*?[^\\])")"#).expect("valid"));

/// Parses an `elements_chain` back into elements (`order` = position). Like the reference,
/// escaped quotes in values stay escaped.
pub fn chain_to_elements(chain: &str) -> Vec<Element> {
    SPLIT_CHAIN
        .find_iter(chain)
        .enumerate()
        .map(|(index, found)| {
            let mut element = Element { attributes: Some(Map::new()), order: Some(index as i64), ..Element::default() };
            let Some(split) = SPLIT_CLASS_ATTRIBUTES.captures(found.as_str()) else {
                return element;
            };
            let tag_and_classes = split.get(1).map(|m| m.as_str()).unwrap_or_default();
            if !tag_and_classes.is_empty() {
                let mut parts = tag_and_classes.split('.');
                element.tag_name = parts.next().map(str::to_owned);
                let classes: Vec<String> = parts.filter(|class| !class.is_empty()).map(str::to_owned).collect();
                if tag_and_classes.contains('.') {
                    element.attr_class = Some(classes);
                }
            }
            let attribute_text = split.get(3).map(|m| m.as_str()).unwrap_or_default();
            for attribute in PARSE_ATTRIBUTES.captures_iter(attribute_text) {
                let key = attribute.get(2).map(|m| m.as_str()).unwrap_or_default();
                let value = attribute.get(3).map(|m| m.as_str()).unwrap_or_default();
                match key {
                    "href" => element.href = Some(value.to_owned()),
                    "nth-child" => element.nth_child = parse_int(value),
                    "nth-of-type" => element.nth_of_type = parse_int(value),
                    "text" => element.text = Some(value.to_owned()),
                    "attr_id" => element.attr_id = Some(value.to_owned()),
                    "" => {}
                    other => {
                        element
                            .attributes
                            .get_or_insert_with(Map::new)
                            .insert(other.to_owned(), Value::String(value.to_owned()));
                    }
                }
            }
            element
        })
        .collect()
}

/// JavaScript's `parseInt(text)` (leading whitespace, sign, then decimal digits); `None` for NaN.
fn parse_int(text: &str) -> Option<i64> {
    let trimmed = text.trim_start();
    let (negative, rest) = match trimmed.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, trimmed.strip_prefix('+').unwrap_or(trimmed)),
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let magnitude: i64 = digits.parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(values: Value) -> Vec<Value> {
        values.as_array().cloned().unwrap_or_default()
    }

    #[test]
    fn hash_vectors_match_the_reference() {
        let two = extract_elements(&raw(json!([
            {"tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm"},
            {"tag_name": "div", "nth_child": 1, "nth_of_type": 2, "$el_text": "💻"},
        ])));
        assert_eq!(elements_hash(&two), "0679137c0cd2408a2906839143e7a71f");
        assert_eq!(elements_hash(&two[..1]), "a89021a60b3497d24e93ae181fba01aa");
        let long = "a".repeat(2050);
        let truncated = extract_elements(&raw(json!([
            {"tag_name": "a", "nth_child": 1, "nth_of_type": 2, "attr__class": "btn btn-sm", "$el_text": long, "attr__href": long},
        ])));
        assert_eq!(truncated[0].text.as_ref().map(String::len), Some(400));
        assert_eq!(truncated[0].href.as_ref().map(String::len), Some(2048));
        assert_eq!(elements_hash(&truncated), "c2659b28e72835706835764cf7f63c2a");
    }

    #[test]
    fn extraction_keeps_attr_keys_and_tolerates_bad_input() {
        let elements = extract_elements(&raw(json!([
            {"tag_name": "button", "$el_text": 5, "attr__data-x": 3, "attr__class": "a b", "nth_child": "x", "event": 1},
            "garbage",
            null,
        ])));
        assert_eq!(elements.len(), 3);
        assert_eq!(elements[0].text, None);
        assert_eq!(elements[0].nth_child, None);
        assert_eq!(elements[0].attr_class, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(
            elements[0].attributes,
            Some(json!({"attr__data-x": 3, "attr__class": "a b"}).as_object().cloned().unwrap_or_default())
        );
        assert_eq!(elements[1], Element { attributes: Some(Map::new()), ..Element::default() });
        // Same hash whatever unknown keys the raw element had (reference test "element group").
        let plain =
            extract_elements(&raw(json!([{"tag_name": "button", "$el_text": "Sign up!"}, {"tag_name": "div"}])));
        let extra = extract_elements(&raw(
            json!([{"tag_name": "button", "$el_text": "Sign up!", "event": 1}, {"tag_name": "div"}]),
        ));
        assert_eq!(elements_hash(&plain), elements_hash(&extra));
        assert_eq!(
            serde_json::to_value(&plain[0]).unwrap_or_default(),
            json!({"text": "Sign up!", "tag_name": "button", "attributes": {}})
        );
    }

    #[test]
    fn utf16_truncation_counts_code_units() {
        assert_eq!(truncate_utf16("ab💻c", 3), "ab");
        assert_eq!(truncate_utf16("ab💻c", 4), "ab💻");
        assert_eq!(truncate_utf16("abc", 10), "abc");
    }

    fn chain_fixture() -> Vec<Element> {
        let attributes = json!({
            "prop": "value",
            "number": 33,
            "data-attr": "something \" that; could mess up",
            "style": "min-height: 100vh;",
        });
        vec![
            Element {
                tag_name: Some("a".into()),
                href: Some("/a-url".into()),
                attr_class: Some(vec!["small".into()]),
                text: Some("bla bla".into()),
                attributes: attributes.as_object().cloned(),
                nth_child: Some(1),
                nth_of_type: Some(0),
                ..Element::default()
            },
            Element {
                tag_name: Some("button".into()),
                attr_class: Some(vec!["btn".into(), "btn-primary".into()]),
                nth_child: Some(0),
                nth_of_type: Some(0),
                ..Element::default()
            },
            Element { tag_name: Some("div".into()), nth_child: Some(0), nth_of_type: Some(0), ..Element::default() },
            Element {
                tag_name: Some("div".into()),
                nth_child: Some(0),
                nth_of_type: Some(0),
                attr_id: Some("nested".into()),
                ..Element::default()
            },
        ]
    }

    #[test]
    fn elements_to_chain_and_back() {
        let chain = elements_to_chain(&chain_fixture());
        assert_eq!(
            chain,
            [
                r#"a.small:data-attr="something \" that; could mess up"href="/a-url"nth-child="1"nth-of-type="0"number="33"prop="value"style="min-height: 100vh;"text="bla bla""#,
                r#"button.btn.btn-primary:nth-child="0"nth-of-type="0""#,
                r#"div:nth-child="0"nth-of-type="0""#,
                r#"div:attr_id="nested"nth-child="0"nth-of-type="0""#,
            ]
            .join(";")
        );
        let elements = chain_to_elements(&chain);
        assert_eq!(elements.len(), 4);
        assert_eq!(elements[0].tag_name.as_deref(), Some("a"));
        assert_eq!(elements[0].href.as_deref(), Some("/a-url"));
        assert_eq!(elements[0].attr_class, Some(vec!["small".to_string()]));
        assert_eq!(
            elements[0].attributes,
            json!({
                "prop": "value",
                "number": "33",
                "data-attr": "something \\\" that; could mess up",
                "style": "min-height: 100vh;",
            })
            .as_object()
            .cloned()
        );
        assert_eq!(elements[0].nth_child, Some(1));
        assert_eq!(elements[0].nth_of_type, Some(0));
        assert_eq!(elements[1].attr_class, Some(vec!["btn".to_string(), "btn-primary".to_string()]));
        assert_eq!(elements[3].attr_id.as_deref(), Some("nested"));
        assert_eq!(elements[3].order, Some(3));
    }

    #[test]
    fn attribute_order_is_locale_order() {
        let element = Element {
            tag_name: Some("a".into()),
            attributes: json!({"Zeta": "1", "alpha": "2", "attr__class": "x", "_u": "3", "9": "4"})
                .as_object()
                .cloned(),
            attr_id: Some("i".into()),
            ..Element::default()
        };
        assert_eq!(
            elements_to_chain(&[element]),
            r#"a:_u="3"9="4"alpha="2"attr__class="x"attr_id="i"nth-child="0"nth-of-type="0"Zeta="1""#
        );
    }

    #[test]
    fn chain_without_attributes_is_tolerated() {
        let elements = chain_to_elements("div.a.b;span");
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0].attr_class, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(elements[1].tag_name.as_deref(), Some("span"));
    }
}
