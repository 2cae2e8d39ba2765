//! Validation every kind shares or a small kind needs alone: object metadata (names, labels,
//! annotations) and ConfigMap size and keys.

use super::grammar::{is_dns_subdomain, is_label_key, is_label_value, object};
use crate::apiserver_fake::status::FieldError;
use serde_json::Value;

pub(super) fn validate_config_map(config_map: &Value, errors: &mut Vec<FieldError>) {
    let mut total = 0;
    for section in ["data", "binaryData"] {
        for (key, value) in object(config_map.get(section)).into_iter().flatten() {
            total += key.len() + value.as_str().map_or(0, str::len);
            let valid = !key.is_empty()
                && key.len() <= 253
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !valid {
                errors.push(FieldError::invalid(
                    format!("{section}[{key}]"),
                    &Value::String(key.clone()),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                ));
            }
        }
    }
    if total > 1024 * 1024 {
        errors.push(FieldError::too_long("data", 1024 * 1024));
    }
}

pub(super) fn validate_metadata(object: &Value, errors: &mut Vec<FieldError>) {
    match object.pointer("/metadata/name").and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required("metadata.name", "name or generateName is required")),
        Some(name) if !is_dns_subdomain(name) => errors.push(FieldError::invalid(
            "metadata.name",
            &Value::String(name.into()),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )),
        Some(_) => {}
    }
    for (key, value) in object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if !is_label_key(key) {
            errors.push(FieldError::invalid(
                "metadata.labels",
                &Value::String(key.clone()),
                "name part must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
        if !value.as_str().is_some_and(is_label_value) {
            errors.push(FieldError::invalid(format!("metadata.labels[{key}]"), value, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"));
        }
    }
    for key in object
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        if !is_label_key(&key.to_lowercase()) {
            errors.push(FieldError::invalid(
                "metadata.annotations",
                &Value::String(key.clone()),
                "name part must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
    }
}
