//! The reference's small CSS selector matcher for action steps and `element` filters: a selector
//! such as `main > div.top a[href='x']:nth-child(2)` against an event's elements (index 0 is the
//! clicked element, higher indexes are its ancestors).
//!
//! Owns parsing selectors into parts and the matching walk. It is deliberately not a full CSS
//! engine: it supports exactly what the reference supports (tags, classes, `[attr='v']`,
//! `:nth-child(n)`, `:nth-of-type(n)`, descendant and `>` child combinators).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use crate::ingestion::elements::Element;

// Greedy as in the reference: with two attribute selectors in one part, the last is taken first.
static ATTRIBUTE_SELECTOR: LazyLock<Regex> = LazyLock::new(|| Regex::new(r#"\[(.*)=['|"](.*)['|"]\]"#).expect("valid"));
static COLON_SELECTOR: LazyLock<Regex> = LazyLock::new(|| Regex::new(r":([A-Za-z-]+)\((\d+)\)").expect("valid"));
static FINAL_TAG: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^([A-Za-z0-9]+)").expect("valid"));

/// What an element must have to satisfy one part of a selector.
#[derive(Debug, Clone, Default, PartialEq)]
struct Requirements {
    tag_name: Option<String>,
    href: Option<String>,
    attr_id: Option<String>,
    attr_class: Option<Vec<String>>,
    nth_child: Option<i64>,
    nth_of_type: Option<i64>,
    /// Attribute name (without the `attr__` prefix) → required value.
    attributes: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq)]
struct SelectorPart {
    direct_descendant: bool,
    requirements: Requirements,
}

/// A parsed selector; parse once, match many times.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    parts: Vec<SelectorPart>,
}

impl Selector {
    pub fn parse(selector: &str) -> Selector {
        // People sometimes add `*` by hand; it means nothing here.
        let cleaned = selector.replace("> * > ", "").replace("> *", "");
        let tokens: Vec<&str> = cleaned.trim().split(' ').collect();
        let mut parts = Vec::new();
        for (index, token) in tokens.iter().enumerate() {
            if *token == ">" || token.is_empty() {
                continue;
            }
            let direct_descendant = index > 0 && tokens[index - 1] == ">";
            parts.push(SelectorPart { direct_descendant, requirements: parse_part(token) });
        }
        Selector { parts }
    }

    /// The reference's matching walk, outermost part first, scanning from the outermost element.
    pub fn matches(&self, elements: &[Element]) -> bool {
        // The initial base is the imaginary parent of the outermost known element.
        let mut base = elements.len() as isize;
        let mut was_part_matched = true;
        let mut part_index: isize = 0;
        // The walk moves `base` down or `part_index` back on every miss, so it terminates; the
        // bound only guards against a logic slip turning into a hang on user input.
        let mut budget = (elements.len() + 1) * (self.parts.len() + 1) * 4 + 16;
        while (part_index as usize) < self.parts.len() {
            budget = budget.saturating_sub(1);
            if base <= 0 || part_index < 0 || budget == 0 {
                return false;
            }
            let part = &self.parts[part_index as usize];
            was_part_matched = false;
            let mut candidate = base - 1;
            while candidate >= 0 {
                if satisfies(&elements[candidate as usize], &part.requirements) {
                    base = candidate;
                    was_part_matched = true;
                    break;
                } else if part.direct_descendant {
                    break;
                }
                candidate -= 1;
            }
            if was_part_matched {
                part_index += 1;
            } else if part.direct_descendant {
                // For a direct child the parent part has to be matched again further in.
                part_index -= 1;
            } else {
                base -= 1;
            }
        }
        was_part_matched
    }
}

/// Shorthand for one-off checks.
pub fn elements_match_selector(elements: &[Element], selector: &str) -> bool {
    Selector::parse(selector).matches(elements)
}

fn parse_part(token: &str) -> Requirements {
    let mut tag = token.to_owned();
    let mut requirements = Requirements::default();
    while let Some(captures) = ATTRIBUTE_SELECTOR.captures(&tag) {
        let whole = captures.get(0).map(|m| m.range()).unwrap_or(0..0);
        let attribute = captures.get(1).map(|m| m.as_str().to_lowercase()).unwrap_or_default();
        let value = captures.get(2).map(|m| m.as_str().to_owned()).unwrap_or_default();
        tag.replace_range(whole, "");
        match attribute.as_str() {
            "id" => requirements.attr_id = Some(value.to_lowercase()),
            "href" => requirements.href = Some(value),
            _ => {
                requirements.attributes.get_or_insert_with(Map::new).insert(attribute, Value::String(value));
            }
        }
    }
    while let Some(captures) = COLON_SELECTOR.captures(&tag) {
        let whole = captures.get(0).map(|m| m.range()).unwrap_or(0..0);
        let name = captures.get(1).map(|m| m.as_str().to_owned()).unwrap_or_default();
        let argument: Option<i64> = captures.get(2).and_then(|m| m.as_str().parse().ok());
        tag.replace_range(whole, "");
        // REF-BUG fixed: the reference loops forever on a zero argument or an unsupported
        // pseudo-class; such pseudo-classes are ignored here instead.
        match (name.as_str(), argument) {
            (_, None | Some(0)) => {}
            ("nth-child", Some(n)) => requirements.nth_child = Some(n),
            ("nth-of-type", Some(n)) => requirements.nth_of_type = Some(n),
            _ => {}
        }
    }
    if let Some((before, classes)) = tag.split_once('.') {
        requirements.attr_class = Some(classes.split('.').map(unescape_class_name).collect());
        tag = before.to_owned();
    }
    if let Some(captures) = FINAL_TAG.captures(&tag) {
        requirements.tag_name = captures.get(1).map(|m| m.as_str().to_owned());
    }
    requirements
}

/// `\\` becomes `\`; every other backslash is dropped.
fn unescape_class_name(class_name: &str) -> String {
    class_name.split("\\\\").map(|piece| piece.replace('\\', "")).collect::<Vec<_>>().join("\\")
}

/// Empty requirement strings count as "not required", as the reference's truthiness checks do.
fn satisfies(element: &Element, requirements: &Requirements) -> bool {
    let differs = |required: &Option<String>, actual: &Option<String>| {
        required.as_ref().is_some_and(|required| !required.is_empty() && actual.as_ref() != Some(required))
    };
    if differs(&requirements.tag_name, &element.tag_name)
        || differs(&requirements.href, &element.href)
        || differs(&requirements.attr_id, &element.attr_id)
    {
        return false;
    }
    if let Some(required) = &requirements.attr_class {
        let classes = element.attr_class.as_deref().unwrap_or_default();
        if classes.is_empty() || !required.iter().all(|class| classes.contains(class)) {
            return false;
        }
    }
    if requirements.nth_child.is_some_and(|n| element.nth_child != Some(n))
        || requirements.nth_of_type.is_some_and(|n| element.nth_of_type != Some(n))
    {
        return false;
    }
    if let Some(required) = &requirements.attributes {
        let Some(attributes) = &element.attributes else {
            return false;
        };
        for (key, value) in required {
            if attributes.get(&format!("attr__{key}")) != Some(value) {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(tag: &str, classes: &[&str]) -> Element {
        Element {
            tag_name: Some(tag.into()),
            attr_class: if classes.is_empty() { None } else { Some(classes.iter().map(|c| c.to_string()).collect()) },
            ..Element::default()
        }
    }

    fn check(elements: &[Element], selector: &str) -> bool {
        elements_match_selector(elements, selector)
    }

    #[test]
    fn zero_and_unknown_pseudo_classes_are_ignored_instead_of_looping() {
        let elements = [el("span", &[]), el("section", &[])];
        assert!(check(&elements, "section > span:nth-child(0)"));
        assert!(check(&elements, "span:first-of-kind(3)"));
    }

    #[test]
    fn class_names_are_unescaped_and_ids_lower_cased() {
        let element = Element { attr_id: Some("main".into()), ..el("div", &["a:b", "c\\d"]) };
        assert!(check(std::slice::from_ref(&element), "div.a\\:b"));
        assert!(check(std::slice::from_ref(&element), "div.c\\\\d"));
        assert!(check(&[element], "[id='MAIN']"));
    }
}
