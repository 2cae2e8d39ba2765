//! The apiserver's validation for the kinds Tandem writes, on raw JSON so that shapes a typed
//! client could never produce are caught too: ResourceSlice limits and names, DeviceClass,
//! ResourceClaim spec/status, and object metadata. Field paths match the real messages.

use super::kinds::{KindInfo, Validation};
use super::status::FieldError;
use serde_json::{Map, Value};

const MAX_DEVICES_PER_SLICE: usize = 128;
const MAX_DEVICES_WITH_TAINTS_OR_COUNTERS: usize = 64;
const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
const MAX_ATTRIBUTE_STRING: usize = 64;
const MAX_TAINTS: usize = 16;
const MAX_ID_LENGTH: usize = 32;
const MAX_DRIVER_NAME: usize = 63;
const MAX_POOL_NAME: usize = 253;
const MAX_REQUESTS: usize = 32;
const MAX_RESULTS: usize = 32;
const MAX_RESERVED_FOR: usize = 256;
const MAX_DEVICE_CONDITIONS: usize = 8;
const MAX_SELECTORS: usize = 32;
const MAX_CEL_LENGTH: usize = 10 * 1024;

fn is_dns_label(s: &str) -> bool {
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

fn is_c_identifier(s: &str) -> bool {
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

fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name_part(name),
        None => is_label_name_part(s),
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name_part(s)
}

fn numeric_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

fn is_semver(s: &str) -> bool {
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
fn validate_driver_name(value: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) {
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

fn validate_pool_name(value: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) {
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

fn validate_dns_label(value: Option<&Value>, field: &str, errors: &mut Vec<FieldError>) {
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
fn validate_qualified_name(name: &str, field: &str, errors: &mut Vec<FieldError>) {
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

fn array(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn object(value: Option<&Value>) -> Option<&Map<String, Value>> {
    value.and_then(Value::as_object)
}

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

fn validate_resource_slice(slice: &Value, old: Option<&Value>, errors: &mut Vec<FieldError>) {
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

fn validate_device_class(class: &Value, errors: &mut Vec<FieldError>) {
    let spec = class.get("spec").unwrap_or(&Value::Null);
    let selectors = array(spec.get("selectors"));
    if selectors.len() > MAX_SELECTORS {
        errors.push(FieldError::too_many(
            "spec.selectors",
            selectors.len(),
            MAX_SELECTORS,
            "items",
        ));
    }
    for (i, selector) in selectors.iter().enumerate() {
        validate_cel_selector(selector, &format!("spec.selectors[{i}]"), errors);
    }
    let config = array(spec.get("config"));
    if config.len() > MAX_SELECTORS {
        errors.push(FieldError::too_many(
            "spec.config",
            config.len(),
            MAX_SELECTORS,
            "items",
        ));
    }
    for (i, entry) in config.iter().enumerate() {
        validate_opaque(entry, &format!("spec.config[{i}]"), errors);
    }
}

fn validate_cel_selector(selector: &Value, field: &str, errors: &mut Vec<FieldError>) {
    match selector.pointer("/cel/expression").and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required(format!("{field}.cel.expression"), "")),
        Some(e) if e.len() > MAX_CEL_LENGTH => errors.push(FieldError::too_long(
            format!("{field}.cel.expression"),
            MAX_CEL_LENGTH,
        )),
        Some(_) => {}
    }
}

fn validate_opaque(entry: &Value, field: &str, errors: &mut Vec<FieldError>) {
    match entry.get("opaque") {
        Some(opaque) if opaque.is_object() => {
            validate_driver_name(
                opaque.get("driver"),
                &format!("{field}.opaque.driver"),
                errors,
            );
            match opaque.get("parameters") {
                None | Some(Value::Null) => errors.push(FieldError::required(
                    format!("{field}.opaque.parameters"),
                    "",
                )),
                Some(p) if p.to_string().len() > 10 * 1024 => errors.push(FieldError::too_long(
                    format!("{field}.opaque.parameters"),
                    10 * 1024,
                )),
                Some(_) => {}
            }
        }
        _ => errors.push(FieldError::required(format!("{field}.opaque"), "")),
    }
}

fn validate_claim(claim: &Value, old: Option<&Value>, errors: &mut Vec<FieldError>) {
    let spec = claim.get("spec").unwrap_or(&Value::Null);
    let requests = array(spec.pointer("/devices/requests"));
    if requests.len() > MAX_REQUESTS {
        errors.push(FieldError::too_many(
            "spec.devices.requests",
            requests.len(),
            MAX_REQUESTS,
            "items",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, request) in requests.iter().enumerate() {
        let field = format!("spec.devices.requests[{i}]");
        validate_dns_label(request.get("name"), &format!("{field}.name"), errors);
        if let Some(name) = request.get("name").and_then(Value::as_str)
            && !seen.insert(name)
        {
            errors.push(FieldError::duplicate(format!("{field}.name"), name));
        }
        let exactly = request.get("exactly").filter(|v| !v.is_null());
        let first = request.get("firstAvailable").filter(|v| !v.is_null());
        match (exactly, first) {
            (Some(e), None) => match e.get("deviceClassName").and_then(Value::as_str) {
                Some(c) if is_dns_subdomain(c) => {}
                Some(c) => errors.push(FieldError::invalid(
                    format!("{field}.exactly.deviceClassName"),
                    &Value::String(c.into()),
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                )),
                None => errors.push(FieldError::required(format!("{field}.exactly.deviceClassName"), "")),
            },
            (None, Some(_)) => {}
            _ => errors.push(FieldError::required(field, "exactly one of `exactly` or `firstAvailable` is required")),
        }
    }
    if let Some(old) = old
        && old.get("spec") != claim.get("spec")
    {
        errors.push(FieldError::invalid(
            "spec",
            claim.get("spec").unwrap_or(&Value::Null),
            "field is immutable",
        ));
    }
    validate_claim_status(claim, old, errors);
}

fn validate_claim_status(claim: &Value, old: Option<&Value>, errors: &mut Vec<FieldError>) {
    let Some(status) = claim.get("status").filter(|s| s.is_object()) else {
        return;
    };
    let allocation = status.get("allocation").filter(|v| !v.is_null());
    if let Some(allocation) = allocation {
        let results = array(allocation.pointer("/devices/results"));
        if results.len() > MAX_RESULTS {
            errors.push(FieldError::too_many(
                "status.allocation.devices.results",
                results.len(),
                MAX_RESULTS,
                "items",
            ));
        }
        for (i, result) in results.iter().enumerate() {
            let field = format!("status.allocation.devices.results[{i}]");
            match result.get("request").and_then(Value::as_str) {
                Some(r) if !r.is_empty() => {}
                _ => errors.push(FieldError::required(format!("{field}.request"), "")),
            }
            validate_driver_name(result.get("driver"), &format!("{field}.driver"), errors);
            validate_pool_name(result.get("pool"), &format!("{field}.pool"), errors);
            validate_dns_label(result.get("device"), &format!("{field}.device"), errors);
        }
        for (i, entry) in array(allocation.pointer("/devices/config"))
            .iter()
            .enumerate()
        {
            let field = format!("status.allocation.devices.config[{i}]");
            match entry.get("source").and_then(Value::as_str) {
                Some("FromClass" | "FromClaim") => {}
                _ => errors.push(FieldError::not_supported(
                    format!("{field}.source"),
                    entry.get("source").unwrap_or(&Value::Null),
                    &["FromClass", "FromClaim"],
                )),
            }
            validate_opaque(entry, &field, errors);
        }
        if let Some(old_allocation) = old
            .and_then(|o| o.pointer("/status/allocation"))
            .filter(|v| !v.is_null())
            && old_allocation != allocation
        {
            errors.push(FieldError::invalid(
                "status.allocation",
                allocation,
                "field is immutable",
            ));
        }
    }
    let reserved = array(status.get("reservedFor"));
    if reserved.len() > MAX_RESERVED_FOR {
        errors.push(FieldError::too_many(
            "status.reservedFor",
            reserved.len(),
            MAX_RESERVED_FOR,
            "items",
        ));
    }
    if !reserved.is_empty() && allocation.is_none() {
        errors.push(FieldError::forbidden(
            "status.reservedFor",
            "may not be specified when `allocated` is not set",
        ));
    }
    let allocated: std::collections::BTreeSet<(&str, &str, &str)> = allocation
        .map(|a| array(a.pointer("/devices/results")))
        .unwrap_or_default()
        .iter()
        .filter_map(|r| {
            Some((
                r.get("driver")?.as_str()?,
                r.get("pool")?.as_str()?,
                r.get("device")?.as_str()?,
            ))
        })
        .collect();
    let mut seen_devices = std::collections::BTreeSet::new();
    for (i, device) in array(status.get("devices")).iter().enumerate() {
        let field = format!("status.devices[{i}]");
        validate_driver_name(device.get("driver"), &format!("{field}.driver"), errors);
        validate_pool_name(device.get("pool"), &format!("{field}.pool"), errors);
        validate_dns_label(device.get("device"), &format!("{field}.device"), errors);
        let str_of = |key: &str| device.get(key).and_then(Value::as_str).unwrap_or("");
        let key = (str_of("driver"), str_of("pool"), str_of("device"));
        if !allocated.contains(&key) {
            errors.push(FieldError::invalid(
                field.clone(),
                &Value::String(format!("{}/{}/{}", key.0, key.1, key.2)),
                "must be an allocated device in the claim",
            ));
        }
        let share_id = device.get("shareID").and_then(Value::as_str).unwrap_or("");
        if !seen_devices.insert((key, share_id)) {
            errors.push(FieldError::duplicate(
                field.clone(),
                &format!("{}/{}/{}", key.0, key.1, key.2),
            ));
        }
        let conditions = array(device.get("conditions"));
        if conditions.len() > MAX_DEVICE_CONDITIONS {
            errors.push(FieldError::too_many(
                format!("{field}.conditions"),
                conditions.len(),
                MAX_DEVICE_CONDITIONS,
                "items",
            ));
        }
        for (j, condition) in conditions.iter().enumerate() {
            validate_condition(condition, &format!("{field}.conditions[{j}]"), errors);
        }
        if let Some(network) = device.get("networkData") {
            if network
                .get("interfaceName")
                .and_then(Value::as_str)
                .is_some_and(|s| s.len() > 256)
            {
                errors.push(FieldError::too_long(
                    format!("{field}.networkData.interfaceName"),
                    256,
                ));
            }
            if network
                .get("hardwareAddress")
                .and_then(Value::as_str)
                .is_some_and(|s| s.len() > 128)
            {
                errors.push(FieldError::too_long(
                    format!("{field}.networkData.hardwareAddress"),
                    128,
                ));
            }
            let ips = array(network.get("ips"));
            if ips.len() > 16 {
                errors.push(FieldError::too_many(
                    format!("{field}.networkData.ips"),
                    ips.len(),
                    16,
                    "items",
                ));
            }
            let mut seen_ips = std::collections::BTreeSet::new();
            for (j, ip) in ips.iter().enumerate() {
                let ip_field = format!("{field}.networkData.ips[{j}]");
                match ip.as_str() {
                    Some(text) if is_interface_cidr(text) => {
                        if !seen_ips.insert(text) {
                            errors.push(FieldError::duplicate(ip_field, text));
                        }
                    }
                    _ => errors.push(FieldError::invalid(
                        ip_field,
                        ip,
                        "must be a valid address in CIDR form, (e.g. 10.9.8.7/24 or 2001:db8::1/64)",
                    )),
                }
            }
        }
    }
}

/// An interface address with its prefix length, as `ip addr` shows it (`10.1.0.2/24`).
fn is_interface_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(address) = address.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    !prefix.starts_with('+') && prefix.len() <= 3 && prefix.parse::<u8>().is_ok_and(|p| p <= max)
}

/// metav1.Condition: type and reason are required and shaped, status is True/False/Unknown,
/// lastTransitionTime is required, message at most 32768 bytes.
fn validate_condition(condition: &Value, field: &str, errors: &mut Vec<FieldError>) {
    let text = |key: &str| condition.get(key).and_then(Value::as_str);
    match text("type") {
        Some(t) if !t.is_empty() && t.len() <= 316 => {}
        _ => errors.push(FieldError::required(format!("{field}.type"), "")),
    }
    match text("status") {
        Some("True" | "False" | "Unknown") => {}
        _ => errors.push(FieldError::not_supported(
            format!("{field}.status"),
            condition.get("status").unwrap_or(&Value::Null),
            &["False", "True", "Unknown"],
        )),
    }
    let reason_ok = text("reason").is_some_and(|r| {
        let mut chars = r.chars();
        r.len() <= 1024
            && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ',' || c == ':')
            && !r.ends_with([',', ':'])
    });
    if !reason_ok {
        errors.push(FieldError::invalid(
            format!("{field}.reason"),
            condition.get("reason").unwrap_or(&Value::Null),
            "a condition reason must start with alphabetic character, optionally followed by a string of alphanumeric characters or '_,:', and must end with an alphanumeric character or '_'",
        ));
    }
    if text("lastTransitionTime").is_none_or(str::is_empty) {
        errors.push(FieldError::required(
            format!("{field}.lastTransitionTime"),
            "must be set",
        ));
    }
    if text("message").is_some_and(|m| m.len() > 32768) {
        errors.push(FieldError::too_long(format!("{field}.message"), 32768));
    }
}

fn validate_config_map(config_map: &Value, errors: &mut Vec<FieldError>) {
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

fn validate_metadata(object: &Value, errors: &mut Vec<FieldError>) {
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

/// Server-side defaulting before validation: device taints get `timeAdded` when unset, as the
/// DeviceTaint API documents ("added automatically during create or update if not set").
pub(crate) fn apply_defaults(kind: &KindInfo, object: &mut Value, now: &str) {
    if kind.validation != Validation::ResourceSlice {
        return;
    }
    let Some(devices) = object
        .pointer_mut("/spec/devices")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for device in devices {
        let Some(taints) = device.get_mut("taints").and_then(Value::as_array_mut) else {
            continue;
        };
        for taint in taints.iter_mut().filter_map(Value::as_object_mut) {
            if taint.get("timeAdded").is_none_or(Value::is_null) {
                taint.insert("timeAdded".into(), Value::String(now.to_string()));
            }
        }
    }
}

/// Everything wrong with `object` as a create (old = None) or an update of `old`.
pub(crate) fn validate(kind: &KindInfo, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    validate_metadata(object, &mut errors);
    match kind.validation {
        Validation::ResourceSlice => validate_resource_slice(object, old, &mut errors),
        Validation::ResourceClaim => validate_claim(object, old, &mut errors),
        Validation::DeviceClass => validate_device_class(object, &mut errors),
        Validation::ConfigMap => validate_config_map(object, &mut errors),
        Validation::MetadataOnly => {}
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_grammars() {
        assert!(is_dns_label("gpu-0000-18-00-0"));
        assert!(!is_dns_label("gpu_0"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("tandem.dev"));
        assert!(!is_dns_subdomain("tandem..dev"));
        assert!(
            is_c_identifier("pciBusID")
                && is_c_identifier("_x1")
                && !is_c_identifier("1x")
                && !is_c_identifier("a-b")
        );
        assert!(is_label_key("tandem.dev/link-down") && !is_label_key("tandem.dev/-x"));
    }

    #[test]
    fn semver_and_quantity_grammars() {
        for good in ["1.2.3", "0.0.0-alpha.1", "1.0.0+build.5", "10.20.30-rc.1+x"] {
            assert!(is_semver(good), "{good}");
        }
        for bad in ["1.2", "01.2.3", "1.2.3-", "1.2.3-01", "v1.2.3"] {
            assert!(!is_semver(bad), "{bad}");
        }
        for good in ["80Gi", "1", "0.5", "100m", "1e3", "-2Ki"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "Gi", "1.2.3", "5XB", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
