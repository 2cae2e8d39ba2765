//! The apiserver's validation for the kinds Tandem writes, on raw JSON so that shapes a typed
//! client could never produce are caught too: ResourceSlice limits and names, DeviceClass,
//! ResourceClaim spec/status, and object metadata. Field paths match the real messages.

use super::kinds::{KindInfo, Validation};
use super::status::FieldError;
use serde_json::Value;

mod claim;
mod grammar;
mod metadata;
mod slice;
#[cfg(test)]
mod tests;

use claim::{validate_claim, validate_device_class};
use metadata::{validate_config_map, validate_metadata};
use slice::validate_resource_slice;

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
