//! Label and field selectors with the apiserver's grammar and its refusals: set-based label
//! requirements, and field selectors limited to the fields each kind indexes (anything else is 400).

use super::kinds::KindInfo;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas that are not inside `( )`, since `in (a,b)` holds commas of its own.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_set(key: &str, rest: &str) -> Result<(String, Vec<String>), String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{rest}', expected: '('"))?;
    let values = inner.split(',').map(|v| v.trim().to_string()).collect();
    Ok((checked_key(key)?, values))
}

fn checked_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    if key.is_empty() || key.contains(|c: char| c.is_whitespace() || "=!()".contains(c)) {
        return Err(format!(
            "unable to parse requirement: invalid label key {key:?}"
        ));
    }
    Ok(key.to_string())
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if selector.trim().is_empty() {
            return Ok(Self(requirements));
        }
        for term in split_top_level(selector) {
            let term = term.trim();
            let requirement = if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::NotExists(checked_key(key)?)
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                let (k, v) = parse_set(key, rest)?;
                LabelRequirement::NotIn(k, v)
            } else if let Some((key, rest)) = term.split_once(" in ") {
                let (k, v) = parse_set(key, rest)?;
                LabelRequirement::In(k, v)
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(checked_key(key)?, value.trim().to_string())
            } else if let Some((key, value)) = term.split_once("==") {
                LabelRequirement::Equals(checked_key(key)?, value.trim().to_string())
            } else if let Some((key, value)) = term.split_once('=') {
                LabelRequirement::Equals(checked_key(key)?, value.trim().to_string())
            } else {
                LabelRequirement::Exists(checked_key(term)?)
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let empty = Map::new();
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

/// The string a field selector compares against: strings as they are, booleans and numbers
/// printed, anything missing as "".
fn field_value(object: &Value, field: &str) -> String {
    let pointer = match field {
        // Core events index `source` by the reporting component.
        "source" => "/source/component".to_string(),
        other => format!("/{}", other.replace('.', "/")),
    };
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

impl FieldSelector {
    pub fn parse(selector: &str, kind: &KindInfo) -> Result<Self, String> {
        let mut terms = Vec::new();
        if selector.trim().is_empty() {
            return Ok(Self(terms));
        }
        for term in selector.split(',') {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{selector}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            let known = field == "metadata.name"
                || (field == "metadata.namespace" && kind.namespaced)
                || kind.field_selectors.contains(&field);
            if !known {
                return Err(format!(
                    "field label not supported: {field} (unable to parse requested field selector for {})",
                    kind.qualified_resource()
                ));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (field_value(object, field) == *value) == *equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver_fake::kinds::KINDS;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn label_requirements_follow_apimachinery_semantics() {
        let object = labelled(json!({"a": "1", "b": "2"}));
        let check = |s: &str| LabelSelector::parse(s).unwrap().matches(&object);
        assert!(check("a=1"));
        assert!(check("a==1,b"));
        assert!(!check("a=2"));
        assert!(check("c!=1"), "!= matches objects without the label");
        assert!(!check("!a"));
        assert!(check("!c"));
        assert!(check("a in (1,3),b notin (3)"));
        assert!(!check("a notin (1, 3)"));
        assert!(LabelSelector::parse("a in 1").is_err());
    }

    #[test]
    fn field_selectors_reject_unindexed_fields() {
        let slices = &KINDS[0];
        assert!(FieldSelector::parse("spec.driver=tandem.dev,spec.nodeName=n1", slices).is_ok());
        assert!(FieldSelector::parse("spec.pool.name=n1", slices).is_err());
        assert!(
            FieldSelector::parse("metadata.namespace=x", slices).is_err(),
            "cluster-scoped"
        );
        let s = FieldSelector::parse("spec.nodeName!=n1", slices).unwrap();
        assert!(s.matches(&json!({"spec": {"allNodes": true}})));
        assert!(!s.matches(&json!({"spec": {"nodeName": "n1"}})));
    }
}
