//! ResourceSlice validation: pool and driver, device attributes, capacities, taints and the
//! per-slice limits, and what an update may not change.

use super::grammar::{
    array, is_dns_subdomain, is_label_key, is_label_value, is_quantity, is_semver, object,
    validate_dns_label, validate_driver_name, validate_pool_name, validate_qualified_name,
};
use super::{
    MAX_ATTRIBUTE_STRING, MAX_ATTRIBUTES_AND_CAPACITIES, MAX_DEVICES_PER_SLICE,
    MAX_DEVICES_WITH_TAINTS_OR_COUNTERS, MAX_TAINTS,
};
use crate::apiserver_fake::status::FieldError;
use serde_json::{Map, Value};

fn validate_attribute(value: &Value, field: &str, errors: &mut Vec<FieldError>) {
    let Some(map) = value.as_object() else {
        errors.push(FieldError::invalid(field, value, "must be an object"));
        return;
    };
    let set: Vec<&str> = ["int", "bool", "string", "version"]
        .into_iter()
        .filter(|k| map.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    match set.len() {
        0 => errors.push(FieldError::required(
            field,
            "exactly one value must be specified",
        )),
        1 => {}
        _ => errors.push(FieldError::invalid(
            field,
            value,
            "exactly one value must be specified",
        )),
    }
    if let Some(v) = map.get("string").filter(|v| !v.is_null()) {
        match v.as_str() {
            Some(s) if s.len() > MAX_ATTRIBUTE_STRING => errors.push(FieldError::too_long(
                format!("{field}.string"),
                MAX_ATTRIBUTE_STRING,
            )),
            Some(_) => {}
            None => errors.push(FieldError::invalid(
                format!("{field}.string"),
                v,
                "must be a string",
            )),
        }
    }
    if let Some(v) = map.get("version").filter(|v| !v.is_null()) {
        match v.as_str() {
            Some(s) if s.len() > MAX_ATTRIBUTE_STRING => errors.push(FieldError::too_long(
                format!("{field}.version"),
                MAX_ATTRIBUTE_STRING,
            )),
            Some(s) if is_semver(s) => {}
            _ => errors.push(FieldError::invalid(
                format!("{field}.version"),
                v,
                "must be a string compatible with semver.org spec 2.0.0",
            )),
        }
    }
    if let Some(v) = map.get("int").filter(|v| !v.is_null())
        && v.as_i64().is_none()
    {
        errors.push(FieldError::invalid(
            format!("{field}.int"),
            v,
            "must be a 64-bit integer",
        ));
    }
    if let Some(v) = map.get("bool").filter(|v| !v.is_null())
        && !v.is_boolean()
    {
        errors.push(FieldError::invalid(
            format!("{field}.bool"),
            v,
            "must be a boolean",
        ));
    }
}

fn validate_taint(taint: &Value, field: &str, errors: &mut Vec<FieldError>) {
    match taint.get("key").and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required(format!("{field}.key"), "")),
        Some(key) if !is_label_key(key) => errors.push(FieldError::invalid(
            format!("{field}.key"),
            &Value::String(key.into()),
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
        )),
        Some(_) => {}
    }
    if let Some(value) = taint.get("value").and_then(Value::as_str)
        && !is_label_value(value)
    {
        errors.push(FieldError::invalid(
            format!("{field}.value"),
            &Value::String(value.into()),
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
        ));
    }
    const EFFECTS: &[&str] = &["None", "NoSchedule", "NoExecute"];
    match taint.get("effect") {
        None | Some(Value::Null) => {
            errors.push(FieldError::required(format!("{field}.effect"), ""))
        }
        Some(Value::String(e)) if EFFECTS.contains(&e.as_str()) => {}
        Some(other) => errors.push(FieldError::not_supported(
            format!("{field}.effect"),
            other,
            EFFECTS,
        )),
    }
}

fn validate_device(
    device: &Value,
    field: &str,
    per_device_nodes: bool,
    errors: &mut Vec<FieldError>,
) {
    validate_dns_label(device.get("name"), &format!("{field}.name"), errors);
    let attributes = object(device.get("attributes"));
    let capacity = object(device.get("capacity"));
    let total = attributes.map_or(0, Map::len) + capacity.map_or(0, Map::len);
    if total > MAX_ATTRIBUTES_AND_CAPACITIES {
        errors.push(FieldError::too_many(
            field,
            total,
            MAX_ATTRIBUTES_AND_CAPACITIES,
            "attributes and capacities combined",
        ));
    }
    for (name, value) in attributes.into_iter().flatten() {
        let attr_field = format!("{field}.attributes[{name}]");
        validate_qualified_name(name, &attr_field, errors);
        validate_attribute(value, &attr_field, errors);
    }
    let multiple = device
        .get("allowMultipleAllocations")
        .and_then(Value::as_bool)
        == Some(true);
    for (name, value) in capacity.into_iter().flatten() {
        let cap_field = format!("{field}.capacity[{name}]");
        validate_qualified_name(name, &cap_field, errors);
        match value.get("value") {
            Some(Value::String(q)) if is_quantity(q) => {}
            Some(Value::Number(_)) => {}
            None => errors.push(FieldError::required(format!("{cap_field}.value"), "")),
            Some(other) => errors.push(FieldError::invalid(
                format!("{cap_field}.value"),
                other,
                "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
            )),
        }
        if value.get("requestPolicy").is_some_and(|v| !v.is_null()) && !multiple {
            errors.push(FieldError::forbidden(
                format!("{cap_field}.requestPolicy"),
                "allowed only when allowMultipleAllocations is true",
            ));
        }
    }
    let taints = array(device.get("taints"));
    if taints.len() > MAX_TAINTS {
        errors.push(FieldError::too_many(
            format!("{field}.taints"),
            taints.len(),
            MAX_TAINTS,
            "items",
        ));
    }
    for (i, taint) in taints.iter().enumerate() {
        validate_taint(taint, &format!("{field}.taints[{i}]"), errors);
    }
    for conditions in ["bindingConditions", "bindingFailureConditions"] {
        let list = array(device.get(conditions));
        if list.len() > 4 {
            errors.push(FieldError::too_many(
                format!("{field}.{conditions}"),
                list.len(),
                4,
                "items",
            ));
        }
    }
    let selection: Vec<&str> = ["nodeName", "nodeSelector", "allNodes"]
        .into_iter()
        .filter(|k| device.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    if per_device_nodes && selection.len() != 1 {
        errors.push(FieldError::required(
            field,
            "exactly one of `nodeName`, `nodeSelector`, or `allNodes` is required when `perDeviceNodeSelection` is set",
        ));
    } else if !per_device_nodes && !selection.is_empty() {
        errors.push(FieldError::forbidden(
            format!("{field}.{}", selection[0]),
            "`nodeName`, `nodeSelector` and `allNodes` can only be set when `perDeviceNodeSelection` is set",
        ));
    }
}

pub(super) fn validate_resource_slice(
    slice: &Value,
    old: Option<&Value>,
    errors: &mut Vec<FieldError>,
) {
    let Some(spec) = slice.get("spec").filter(|s| s.is_object()) else {
        errors.push(FieldError::required("spec", ""));
        return;
    };
    validate_driver_name(spec.get("driver"), "spec.driver", errors);
    match spec.get("pool") {
        Some(pool) if pool.is_object() => {
            validate_pool_name(pool.get("name"), "spec.pool.name", errors);
            match pool.get("generation").map(Value::as_i64) {
                Some(Some(g)) if g < 0 => errors.push(FieldError::invalid(
                    "spec.pool.generation",
                    &Value::from(g),
                    "must be greater than or equal to 0",
                )),
                Some(None) => errors.push(FieldError::invalid(
                    "spec.pool.generation",
                    &pool["generation"],
                    "must be an integer",
                )),
                _ => {}
            }
            match pool.get("resourceSliceCount").and_then(Value::as_i64) {
                Some(c) if c > 0 => {}
                _ => errors.push(FieldError::invalid(
                    "spec.pool.resourceSliceCount",
                    pool.get("resourceSliceCount").unwrap_or(&Value::Null),
                    "must be greater than zero",
                )),
            }
        }
        _ => errors.push(FieldError::required("spec.pool", "")),
    }
    let set_fields: Vec<&str> = [
        "nodeName",
        "nodeSelector",
        "allNodes",
        "perDeviceNodeSelection",
    ]
    .into_iter()
    .filter(|k| {
        spec.get(*k)
            .is_some_and(|v| !v.is_null() && v != "" && v != false)
    })
    .collect();
    let exactly_one = "exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` is required";
    match set_fields.len() {
        0 => errors.push(FieldError::required("spec", exactly_one)),
        1 => {}
        _ => errors.push(FieldError::invalid(
            "spec",
            &Value::from(set_fields.clone()),
            &format!("{exactly_one}, but multiple fields are set"),
        )),
    }
    if let Some(node) = spec.get("nodeName").and_then(Value::as_str)
        && !node.is_empty()
        && !is_dns_subdomain(node)
    {
        errors.push(FieldError::invalid("spec.nodeName", &Value::String(node.into()), "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"));
    }
    if let Some(selector) = spec.get("nodeSelector").filter(|v| !v.is_null()) {
        let terms = array(selector.get("nodeSelectorTerms"));
        if terms.len() != 1 {
            errors.push(FieldError::invalid(
                "spec.nodeSelector.nodeSelectorTerms",
                &Value::from(terms.len()),
                "must have exactly one node selector term",
            ));
        }
    }
    for flag in ["allNodes", "perDeviceNodeSelection"] {
        if spec.get(flag) == Some(&Value::Bool(false)) {
            errors.push(FieldError::invalid(
                format!("spec.{flag}"),
                &Value::Bool(false),
                "must be true when set",
            ));
        }
    }
    let per_device_nodes = spec.get("perDeviceNodeSelection") == Some(&Value::Bool(true));
    let devices = array(spec.get("devices"));
    let counters = array(spec.get("sharedCounters"));
    if !devices.is_empty() && !counters.is_empty() {
        errors.push(FieldError::invalid(
            "spec",
            &Value::from(vec!["devices", "sharedCounters"]),
            "only one of `devices` or `sharedCounters` may be set",
        ));
    }
    if counters.len() > 8 {
        errors.push(FieldError::too_many(
            "spec.sharedCounters",
            counters.len(),
            8,
            "items",
        ));
    }
    let heavy = devices.iter().any(|d| {
        !array(d.get("taints")).is_empty() || !array(d.get("consumesCounters")).is_empty()
    });
    let max = if heavy {
        MAX_DEVICES_WITH_TAINTS_OR_COUNTERS
    } else {
        MAX_DEVICES_PER_SLICE
    };
    if devices.len() > max {
        errors.push(FieldError::too_many(
            "spec.devices",
            devices.len(),
            max,
            "items",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, device) in devices.iter().enumerate() {
        let field = format!("spec.devices[{i}]");
        validate_device(device, &field, per_device_nodes, errors);
        if let Some(name) = device.get("name").and_then(Value::as_str)
            && !seen.insert(name)
        {
            errors.push(FieldError::duplicate(format!("{field}.name"), name));
        }
    }
    if let Some(old_spec) = old.and_then(|o| o.get("spec")) {
        for (field, pointer) in [
            ("spec.driver", "/driver"),
            ("spec.pool.name", "/pool/name"),
            ("spec.nodeName", "/nodeName"),
        ] {
            if let (Some(a), Some(b)) = (old_spec.pointer(pointer), spec.pointer(pointer))
                && a != b
            {
                errors.push(FieldError::invalid(field, b, "field is immutable"));
            }
        }
    }
}
