//! Which of a team's actions an event matches. An action matches when any of its steps matches;
//! a step matches when its element, URL, event-name and property-filter conditions all hold.
//!
//! Owns the step checks, the property-filter operators with the reference's JavaScript casting
//! rules ([`casting_compare`]), the URL rules (SQL-LIKE contains, exact, RE2-style regex via the
//! `regex` crate) and the cohort check (`posthog_cohortpeople`, plus an optional static-cohort
//! lookup for the ClickHouse pipeline). Does not fetch persons or write matches.

use std::cmp::Ordering;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lru::LruCache;
use regex::Regex;
use serde_json::{Map, Value};
use sqlx::PgPool;
use thiserror::Error;
use tracing::{debug, warn};
use uuid::Uuid;

use super::selector::Selector;
use super::{Action, ActionError, ActionManager, ActionStep};
use crate::event::PluginEvent;
use crate::infra::BoxError;
use crate::ingestion::elements::Element;
use crate::js;
use crate::model::Person;

/// Looks a person up in ClickHouse's `person_static_cohort` (ClickHouse pipeline only).
#[async_trait]
pub trait StaticCohortLookup: Send + Sync {
    async fn is_in_static_cohort(&self, team_id: i64, cohort_id: i64, person_uuid: Uuid) -> Result<bool, BoxError>;
}

/// Why a step could not be evaluated; the step then counts as not matching (reference: Sentry).
#[derive(Debug, Error)]
enum StepError {
    #[error("invalid regular expression {pattern:?}: {reason}")]
    InvalidRegex { pattern: String, reason: String },
    #[error("Can't match against invalid cohort ID value \"{0}!\"")]
    InvalidCohortId(String),
    #[error("cohort membership query failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("static cohort lookup failed: {0}")]
    StaticCohort(#[source] BoxError),
}

/// The comparison operators [`casting_compare`] supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CastingOperator {
    Exact,
    IsNot,
    LessThan,
    GreaterThan,
}

/// Compares like ClickHouse would after casting a column: first JavaScript's own comparison
/// (`==`, `!=`, or `<`/`>` when neither side is a string); failing that, when the JavaScript types
/// differ, both sides are cast to numbers (strict boolean words first, then `Number(x)`).
/// `None` is `undefined`.
pub fn casting_compare(a: Option<&Value>, b: Option<&Value>, operator: CastingOperator) -> bool {
    let neither_string = js::type_of(a) != "string" && js::type_of(b) != "string";
    let direct = match operator {
        CastingOperator::Exact => js::loose_equals(a, b),
        CastingOperator::IsNot => !js::loose_equals(a, b),
        CastingOperator::LessThan => neither_string && js::compare(a, b) == Some(Ordering::Less),
        CastingOperator::GreaterThan => neither_string && js::compare(a, b) == Some(Ordering::Greater),
    };
    if direct {
        return true;
    }
    if js::type_of(a) == js::type_of(b) {
        return false;
    }
    let cast = |value: Option<&Value>| match js::string_to_boolean_strict(value) {
        Some(flag) => f64::from(u8::from(flag)),
        None => js::to_number(value),
    };
    let (a, b) = (cast(a), cast(b));
    match operator {
        CastingOperator::Exact => a == b,
        CastingOperator::IsNot => a != b,
        CastingOperator::LessThan => a < b,
        CastingOperator::GreaterThan => a > b,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    Exact,
    IsNot,
    IContains,
    NotIContains,
    Regex,
    NotRegex,
    GreaterThan,
    LessThan,
    IsSet,
    IsNotSet,
}

impl Operator {
    /// Missing or unknown operators mean `exact`.
    fn parse(operator: Option<&Value>) -> Operator {
        match operator.and_then(Value::as_str) {
            Some("is_not") => Operator::IsNot,
            Some("icontains") => Operator::IContains,
            Some("not_icontains") => Operator::NotIContains,
            Some("regex") => Operator::Regex,
            Some("not_regex") => Operator::NotRegex,
            Some("gt") => Operator::GreaterThan,
            Some("lt") => Operator::LessThan,
            Some("is_set") => Operator::IsSet,
            Some("is_not_set") => Operator::IsNotSet,
            _ => Operator::Exact,
        }
    }

    /// These operators match when the property is absent (or of a type they cannot test).
    fn matches_empty(self) -> bool {
        matches!(self, Operator::IsNotSet | Operator::IsNot | Operator::NotIContains | Operator::NotRegex)
    }

    /// The JavaScript types the found value must have for the operator to apply.
    fn required_types(self) -> Option<&'static [&'static str]> {
        match self {
            Operator::IContains | Operator::NotIContains | Operator::Regex | Operator::NotRegex => Some(&["string"]),
            Operator::GreaterThan | Operator::LessThan => Some(&["number", "boolean"]),
            _ => None,
        }
    }
}

/// Compiled patterns, shared by all events: user patterns repeat on every event of a team.
struct RegexCache(Mutex<LruCache<String, Result<Arc<Regex>, String>>>);

impl RegexCache {
    fn new() -> RegexCache {
        RegexCache(Mutex::new(LruCache::new(NonZeroUsize::new(2048).unwrap_or(NonZeroUsize::MIN))))
    }

    fn get(&self, pattern: &str) -> Result<Arc<Regex>, StepError> {
        let mut cache = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let compiled = cache
            .get_or_insert(pattern.to_owned(), || {
                Regex::new(&re2_compatible(pattern)).map(Arc::new).map_err(|error| error.to_string())
            })
            .clone();
        compiled.map_err(|reason| StepError::InvalidRegex { pattern: pattern.to_owned(), reason })
    }
}

/// Brings a user pattern to RE2's reading (RE2 is what the reference and ClickHouse use) before
/// the `regex` crate compiles it:
/// * RE2's Perl classes and word boundaries are ASCII-only, the `regex` crate's Unicode-aware, so
///   `\d`, `\w`, `\s`, `\b` (and negations) are spelled out in ASCII;
/// * RE2 reads a `{` that does not open `{n}`, `{n,}` or `{n,m}` as a literal, where the `regex`
///   crate rejects the pattern, so such a `{` is escaped.
fn re2_compatible(pattern: &str) -> std::borrow::Cow<'_, str> {
    if !pattern.contains(['\\', '{']) {
        return std::borrow::Cow::Borrowed(pattern);
    }
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '{' {
            if !opens_repetition(chars.as_str()) {
                out.push('\\');
            }
            out.push(c);
            continue;
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str("[0-9]"),
            Some('D') => out.push_str("[^0-9]"),
            Some('w') => out.push_str("[0-9A-Za-z_]"),
            Some('W') => out.push_str("[^0-9A-Za-z_]"),
            Some('s') => out.push_str("[\\t\\n\\f\\r ]"),
            Some('S') => out.push_str("[^\\t\\n\\f\\r ]"),
            Some('b') => out.push_str("(?-u:\\b)"),
            Some('B') => out.push_str("(?-u:\\B)"),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether the text after a `{` is `n}`, `n,}` or `n,m}` (RE2's counted repetitions).
fn opens_repetition(rest: &str) -> bool {
    let digits = |text: &str| text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let min = digits(rest);
    if min == 0 {
        return false;
    }
    let after = &rest[min..];
    if after.starts_with('}') {
        return true;
    }
    let Some(after_comma) = after.strip_prefix(',') else {
        return false;
    };
    after_comma[digits(after_comma)..].starts_with('}')
}

/// SQL `LIKE`-style "contains": `_` is any one character, `%` any run; everything else literal.
/// "Any character" excludes line terminators, as JavaScript's `.` does.
fn like_pattern(url: &str) -> String {
    const ANY: &str = "[^\\n\\r\\u{2028}\\u{2029}]";
    url.chars()
        .map(|c| match c {
            '_' => ANY.to_owned(),
            '%' => format!("{ANY}*"),
            other => regex::escape(&other.to_string()),
        })
        .collect()
}

pub struct ActionMatcher {
    postgres: PgPool,
    manager: Arc<ActionManager>,
    static_cohorts: Option<Arc<dyn StaticCohortLookup>>,
    regexes: RegexCache,
}

impl ActionMatcher {
    pub fn new(postgres: PgPool, manager: Arc<ActionManager>) -> ActionMatcher {
        ActionMatcher { postgres, manager, static_cohorts: None, regexes: RegexCache::new() }
    }

    /// In the ClickHouse pipeline, static cohorts are checked in ClickHouse before Postgres.
    pub fn with_static_cohorts(mut self, lookup: Arc<dyn StaticCohortLookup>) -> ActionMatcher {
        self.static_cohorts = Some(lookup);
        self
    }

    pub fn manager(&self) -> &Arc<ActionManager> {
        &self.manager
    }

    /// The event's team's actions that the event matches, in ascending action id order.
    /// `elements` are the event's elements (from `$elements`, see `elements::extract_elements`).
    pub async fn matches(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
    ) -> Result<Vec<Arc<Action>>, ActionError> {
        let actions = self.manager.team_actions(event.team_id)?;
        let checks = actions.iter().map(|action| self.check_action(event, person, elements, action));
        let results = futures::future::join_all(checks).await;
        Ok(actions.into_iter().zip(results).filter(|(_, matched)| *matched).map(|(action, _)| action).collect())
    }

    /// Whether any step of the action matches. A step that cannot be evaluated counts as no match.
    pub async fn check_action(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
        action: &Action,
    ) -> bool {
        for step in &action.steps {
            match self.check_step(event, person, elements, step).await {
                Ok(true) => return true,
                Ok(false) => {}
                // A bad pattern or cohort id fails on every event of the team: keep those quiet.
                Err(error @ (StepError::InvalidRegex { .. } | StepError::InvalidCohortId(_))) => {
                    debug!(%error, team_id = action.team_id, action_id = action.id, step_id = step.id,
                        "action step cannot match; counting it as no match")
                }
                Err(error) => warn!(%error, team_id = action.team_id, action_id = action.id, step_id = step.id,
                    "action step could not be evaluated; counting it as no match"),
            }
        }
        false
    }

    async fn check_step(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
        step: &ActionStep,
    ) -> Result<bool, StepError> {
        Ok(check_step_element(elements, step)
            && self.check_step_url(event, step)?
            && check_step_event(event, step)
            && self.check_step_filters(event, person, elements, step).await?)
    }

    fn check_step_url(&self, event: &PluginEvent, step: &ActionStep) -> Result<bool, StepError> {
        let Some(url) = truthy(&step.url) else {
            return Ok(true);
        };
        let current_url = event.properties.as_ref().and_then(|properties| properties.get("$current_url"));
        let Some(current_url) = current_url.and_then(Value::as_str).filter(|current| !current.is_empty()) else {
            return Ok(false);
        };
        Ok(match step.url_matching.as_deref() {
            // An invalid user pattern is a mismatch, not an error (as in the reference).
            Some("regex") => self.regexes.get(url).map(|regex| regex.is_match(current_url)).unwrap_or(false),
            Some("exact") => url == current_url,
            _ => self.regexes.get(&like_pattern(url))?.is_match(current_url),
        })
    }

    async fn check_step_filters(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
        step: &ActionStep,
    ) -> Result<bool, StepError> {
        let filters = match &step.properties {
            Some(Value::Array(filters)) => filters,
            // The reference iterates a string's characters as filters, none of which can pass.
            Some(Value::String(text)) if !text.is_empty() => return Ok(false),
            _ => return Ok(true),
        };
        for filter in filters {
            if !self.check_filter(event, person, elements, filter).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn check_filter(
        &self,
        event: &PluginEvent,
        person: Option<&Person>,
        elements: &[Element],
        filter: &Value,
    ) -> Result<bool, StepError> {
        let Some(filter) = filter.as_object() else {
            return Ok(false);
        };
        match filter.get("type").and_then(Value::as_str) {
            Some("event") => self.check_properties(event.properties.as_ref(), filter),
            Some("person") => match person {
                Some(person) => self.check_properties(Some(&person.properties), filter),
                None => Ok(Operator::parse(filter.get("operator")).matches_empty()),
            },
            Some("element") => self.check_element_filter(elements, filter),
            Some("cohort") => self.check_cohort_filter(person, filter).await,
            _ => Ok(false),
        }
    }

    fn check_element_filter(&self, elements: &[Element], filter: &Map<String, Value>) -> Result<bool, StepError> {
        if filter.get("key").and_then(Value::as_str) == Some("selector") {
            return Ok(filter_values(filter).into_iter().any(|value| {
                value.is_some_and(js::is_truthy) && Selector::parse(&js::to_js_string(value)).matches(elements)
            }));
        }
        for element in elements {
            let Ok(Value::Object(fields)) = serde_json::to_value(element) else {
                continue;
            };
            if self.check_properties(Some(&fields), filter)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn check_cohort_filter(
        &self,
        person: Option<&Person>,
        filter: &Map<String, Value>,
    ) -> Result<bool, StepError> {
        let value = filter.get("value");
        if value.and_then(Value::as_str) == Some("all") {
            return Ok(true);
        }
        let Some(person) = person else {
            return Ok(false);
        };
        let invalid = || StepError::InvalidCohortId(js::to_js_string(value));
        let is_number = matches!(value, Some(Value::Number(_)));
        if !is_number && !starts_with_integer(&js::to_js_string(value)) {
            return Err(invalid());
        }
        // The query uses Number(value); a value like "12abc" passed the check above but is not
        // a valid id, which made the reference's query fail.
        let cohort_id = js::to_number(value);
        if !cohort_id.is_finite() || cohort_id.fract() != 0.0 {
            return Err(invalid());
        }
        let cohort_id = cohort_id as i64;
        if let Some(lookup) = &self.static_cohorts {
            if lookup
                .is_in_static_cohort(i64::from(person.team_id), cohort_id, person.uuid)
                .await
                .map_err(StepError::StaticCohort)?
            {
                return Ok(true);
            }
        }
        Ok(crate::metrics::catalog::postgres(
            "doesPersonBelongToCohort",
            crate::db::actions::is_in_cohort(&self.postgres, cohort_id, i64::from(person.id)),
        )
        .await?)
    }

    /// The property test of one filter against one set of properties (`None`: no properties).
    fn check_properties(
        &self,
        properties: Option<&Map<String, Value>>,
        filter: &Map<String, Value>,
    ) -> Result<bool, StepError> {
        let operator = Operator::parse(filter.get("operator"));
        let key = js::to_js_string(filter.get("key"));
        let Some(found) = properties.and_then(|properties| properties.get(&key)) else {
            return Ok(operator.matches_empty());
        };
        if let Some(types) = operator.required_types() {
            if !types.contains(&js::type_of(Some(found))) {
                return Ok(operator.matches_empty());
            }
        }
        let found_lower = found.as_str().map(str::to_lowercase).unwrap_or_default();
        for value in filter_values(filter) {
            let passed = match operator {
                Operator::Exact => casting_compare(Some(found), value, CastingOperator::Exact),
                Operator::IsNot => casting_compare(Some(found), value, CastingOperator::IsNot),
                Operator::GreaterThan => casting_compare(Some(found), value, CastingOperator::GreaterThan),
                Operator::LessThan => casting_compare(Some(found), value, CastingOperator::LessThan),
                Operator::IContains => found_lower.contains(&js::stringify(value).to_lowercase()),
                Operator::NotIContains => !found_lower.contains(&js::stringify(value).to_lowercase()),
                Operator::Regex | Operator::NotRegex => {
                    let is_match =
                        self.regexes.get(&js::stringify(value))?.is_match(found.as_str().unwrap_or_default());
                    is_match == (operator == Operator::Regex)
                }
                Operator::IsSet => true,
                Operator::IsNotSet => false,
            };
            if passed {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// `value` if it is an array, else `[value]` (`None` for an absent value, i.e. `undefined`).
fn filter_values(filter: &Map<String, Value>) -> Vec<Option<&Value>> {
    match filter.get("value") {
        Some(Value::Array(values)) => values.iter().map(Some).collect(),
        other => vec![other],
    }
}

fn truthy(field: &Option<String>) -> Option<&str> {
    field.as_deref().filter(|text| !text.is_empty())
}

/// Link href / tag name / text must all equal on one element; then the selector must match.
fn check_step_element(elements: &[Element], step: &ActionStep) -> bool {
    let (href, tag_name, text) = (truthy(&step.href), truthy(&step.tag_name), truthy(&step.text));
    if href.is_some() || tag_name.is_some() || text.is_some() {
        let equal =
            |required: Option<&str>, actual: &Option<String>| required.is_none_or(|r| actual.as_deref() == Some(r));
        let any = elements.iter().any(|element| {
            equal(href, &element.href) && equal(tag_name, &element.tag_name) && equal(text, &element.text)
        });
        if !any {
            return false;
        }
    }
    match truthy(&step.selector) {
        Some(selector) => Selector::parse(selector).matches(elements),
        None => true,
    }
}

fn check_step_event(event: &PluginEvent, step: &ActionStep) -> bool {
    truthy(&step.event).is_none_or(|name| event.event == name)
}

/// Whether `parseInt(text)` is a number (not NaN).
fn starts_with_integer(text: &str) -> bool {
    let trimmed = text.trim_start();
    let unsigned = trimmed.strip_prefix(['-', '+']).unwrap_or(trimmed);
    unsigned.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_classes_are_ascii_only_as_in_re2() {
        let cache = RegexCache::new();
        let matches = |pattern: &str, text: &str| cache.get(pattern).map(|regex| regex.is_match(text));
        assert!(matches(r"^\d+$", "123").unwrap_or(false));
        assert!(!matches(r"^\d+$", "١٢٣").unwrap_or(true));
        assert!(matches(r"^\w+\s\W$", "a_1 !").unwrap_or(false));
        assert!(!matches(r"\w", "é").unwrap_or(true));
        assert!(matches(r"[\d.]+", "1.5").unwrap_or(false));
        assert!(matches(r"\bfoo\b", "a foo b").unwrap_or(false));
        assert!(matches(r"\\d", "\\d").unwrap_or(false));
        assert!(cache.get("(unclosed").is_err());
        // RE2 reads a `{` that opens no counted repetition as a literal.
        assert!(matches(r#"{"a":1}"#, r#"x{"a":1}"#).unwrap_or(false));
        assert!(matches("a{,3}", "a{,3}").unwrap_or(false));
        assert!(matches("^a{2,}$", "aaa").unwrap_or(false));
        assert!(matches("^a{1,2}b{2}$", "abb").unwrap_or(false));
        assert!(cache.get("{2}").is_err());
    }

    #[test]
    fn like_pattern_is_literal_except_wildcards() {
        let like =
            |pattern: &str, url: &str| Regex::new(&like_pattern(pattern)).map(|r| r.is_match(url)).unwrap_or(false);
        assert!(like("exampl_.com/%.html", "https://example.com/index.html"));
        assert!(!like("exampl_.com/%.html", "https://example.com/"));
        assert!(!like("a.c", "abc"));
        assert!(like("a.c", "xa.cx"));
        assert!(like("(x)", "(x)"));
    }

    #[test]
    fn cohort_ids_are_checked_like_parse_int() {
        assert!(starts_with_integer("12abc"));
        assert!(starts_with_integer(" -3"));
        assert!(!starts_with_integer("abc"));
        assert!(!starts_with_integer("null"));
    }
}
