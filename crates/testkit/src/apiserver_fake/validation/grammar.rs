//! The name and value grammars the apiserver checks (DNS labels and subdomains, label keys,
//! semver, quantities) and the field-level validators and JSON accessors built on them.

use super::{MAX_DRIVER_NAME, MAX_ID_LENGTH, MAX_POOL_NAME};
use crate::apiserver_fake::status::FieldError;
use serde_json::{Map, Value};

pub(super) fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub(super) fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The name part of a label key or label value: alphanumerics with `-_.` inside.
fn is_label_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

pub(super) fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name_part(name),
        None => is_label_name_part(s),
    }
}

pub(super) fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name_part(s)
}

fn numeric_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

pub(super) fn is_semver(s: &str) -> bool {
    let (rest, build) = match s.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let core_ok = {
        let parts: Vec<&str> = core.split('.').collect();
        parts.len() == 3 && parts.iter().all(|p| numeric_identifier(p))
    };
    let ident_ok =
        |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let pre_ok = pre.is_none_or(|p| {
        p.split('.').all(|id| {
            ident_ok(id) && (!id.bytes().all(|b| b.is_ascii_digit()) || numeric_identifier(id))
        })
    });
    let build_ok = build.is_none_or(|b| b.split('.').all(ident_ok));
    core_ok && pre_ok && build_ok
}

/// resource.Quantity's grammar: signed decimal number, then a binary/decimal SI suffix or exponent.
pub(crate) fn is_quantity(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let number_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || (suffix.starts_with(['e', 'E'])
        && suffix[1..]
            .strip_prefix(['+', '-'])
            .unwrap_or(&suffix[1..])
            .bytes()
            .all(|b| b.is_ascii_digit())
        && suffix.len() > 1);
    number_ok && suffix_ok
}

/// A driver name: ≤63 characters whose lowercase form is a DNS subdomain (like CSI drivers).
pub(super) fn validate_driver_name(
    value: Option<&Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) {
    match value.and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required(field, "")),
        Some(name) if name.len() > MAX_DRIVER_NAME => errors.push(FieldError::too_long(field, MAX_DRIVER_NAME)),
        Some(name) if !is_dns_subdomain(&name.to_lowercase()) => errors.push(FieldError::invalid(
            field,
            &Value::String(name.into()),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )),
        Some(_) => {}
    }
}

pub(super) fn validate_pool_name(value: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) {
    match value.and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required(field, "")),
        Some(name) if name.len() > MAX_POOL_NAME => {
            errors.push(FieldError::too_long(field, MAX_POOL_NAME))
        }
        Some(name) if !name.split('/').all(is_dns_subdomain) => errors.push(FieldError::invalid(
            field,
            &Value::String(name.into()),
            "a valid pool name is one or more DNS subdomains separated by '/'",
        )),
        Some(_) => {}
    }
}

pub(super) fn validate_dns_label(value: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) {
    match value.and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required(field, "")),
        Some(name) if !is_dns_label(name) => errors.push(FieldError::invalid(
            field,
            &Value::String(name.into()),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        )),
        Some(_) => {}
    }
}

/// QualifiedName of an attribute or capacity: a C identifier, or `<domain>/<C identifier>`.
pub(super) fn validate_qualified_name(name: &str, field: &str, errors: &mut Vec<FieldError>) {
    let id = match name.split_once('/') {
        Some((domain, id)) => {
            validate_driver_name(Some(&Value::String(domain.into())), field, errors);
            id
        }
        None => name,
    };
    if id.len() > MAX_ID_LENGTH {
        errors.push(FieldError::too_long(field, MAX_ID_LENGTH));
    } else if !is_c_identifier(id) {
        errors.push(FieldError::invalid(
            field,
            &Value::String(id.into()),
            "a valid C identifier must start with alphabetic character or '_', followed by a string of alphanumeric characters or '_'",
        ));
    }
}

pub(super) fn array(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

pub(super) fn object(value: Option<&Value>) -> Option<&Map<String, Value>> {
    value.and_then(Value::as_object)
}
