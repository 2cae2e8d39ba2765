//! DeviceClass and ResourceClaim validation: CEL selectors, opaque configs, the claim's spec
//! and its status (allocation, reservedFor, per-device conditions and network data).

use super::grammar::{
    array, is_dns_subdomain, validate_dns_label, validate_driver_name, validate_pool_name,
};
use super::{
    MAX_CEL_LENGTH, MAX_DEVICE_CONDITIONS, MAX_REQUESTS, MAX_RESERVED_FOR, MAX_RESULTS,
    MAX_SELECTORS,
};
use crate::apiserver_fake::status::FieldError;
use serde_json::Value;

pub(super) fn validate_device_class(class: &Value, errors: &mut Vec<FieldError>) {
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

pub(super) fn validate_claim(claim: &Value, old: Option<&Value>, errors: &mut Vec<FieldError>) {
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
