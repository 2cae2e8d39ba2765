//! The opaque claim configuration (`tandem.dev/v1alpha1` `ClaimConfig`) from
//! `allocation.devices.config`: strict parsing that names the field at fault, and merging of
//! class and claim entries per request (class first, then claim; later entries win).

use crate::names::{CLAIM_CONFIG_API_VERSION, CLAIM_CONFIG_KIND};
use k8s_openapi::api::resource::v1::DeviceAllocationConfiguration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which communication library's environment the container gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvFlavour {
    /// `NCCL_IB_HCA` with the paired HCAs in GPU order.
    #[default]
    Nccl,
    /// `UCX_NET_DEVICES` with the paired HCA ports.
    Ucx,
    /// Only the `TANDEM_*` summary.
    None,
}

/// Whether a GPU-only claim also gets its GPUs' closest NICs, shared with other pods, and
/// whether a NIC allocated in the claim moves its netdev into the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicAttach {
    /// The RDMA char devices of the node's NIC paired with each GPU; no netdev.
    Shared,
    /// Off by default: sharing a NIC is a choice the cluster admin (class) or user makes.
    #[default]
    None,
    /// A NIC allocated in the claim: its netdev moves into the pod's network namespace
    /// through the `tandem hook attach` OCI hook (needs the plugin's hook path).
    Exclusive,
}

/// The effective configuration of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestConfig {
    pub env: EnvFlavour,
    pub nic_attach: NicAttach,
    /// The in-pod name of the request's exclusively attached NIC (`net1`); several NICs in
    /// one request get `net10`, `net11`, ... Unset: `rdma0`, `rdma1`, ... across the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    /// Whether some config entry set `nicAttach`: unset means "exclusive when the hook is
    /// configured" for a NIC allocated in the claim, while an explicit `none` keeps it on
    /// the host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nic_attach_set: bool,
}

impl RequestConfig {
    /// Whether a NIC allocated in the claim for this request moves into the pod. Without a
    /// hook path nothing can move it, so it keeps the pre-netattach behaviour (RDMA char
    /// devices only) even when `exclusive` was asked for.
    pub fn exclusive_for_claimed_nic(&self, hook_configured: bool) -> bool {
        hook_configured
            && match (self.nic_attach_set, self.nic_attach) {
                (false, _) => true,
                (true, attach) => attach == NicAttach::Exclusive,
            }
    }
}

/// One parsed `ClaimConfig`: the fields it sets, `None` for the ones it leaves alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ConfigOverlay {
    env: Option<EnvFlavour>,
    nic_attach: Option<NicAttach>,
    interface_name: Option<String>,
}

/// A config entry that is not a valid `ClaimConfig`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("allocation.devices.config[{index}] (source {source_kind}): field {field:?}: {message}")]
pub struct ConfigError {
    pub index: usize,
    pub source_kind: String,
    pub field: String,
    pub message: String,
}

/// Parses `ClaimConfig` parameters. Fields are walked by hand rather than with
/// `deny_unknown_fields` alone because serde_json's type errors do not say which field held
/// the wrong type, and the user needs to know.
fn parse_parameters(parameters: &serde_json::Value) -> Result<ConfigOverlay, (String, String)> {
    let object = parameters.as_object().ok_or_else(|| {
        (
            "parameters".to_string(),
            format!("expected a JSON object, got {}", json_kind(parameters)),
        )
    })?;
    let mut overlay = ConfigOverlay::default();
    let mut api_version = None;
    let mut kind = None;
    for (field, value) in object {
        let wrong = |e: serde_json::Error| (field.clone(), e.to_string());
        match field.as_str() {
            "apiVersion" => api_version = Some(String::deserialize(value).map_err(wrong)?),
            "kind" => kind = Some(String::deserialize(value).map_err(wrong)?),
            "env" => overlay.env = Some(EnvFlavour::deserialize(value).map_err(wrong)?),
            "nicAttach" => overlay.nic_attach = Some(NicAttach::deserialize(value).map_err(wrong)?),
            "interfaceName" => {
                let name = String::deserialize(value).map_err(wrong)?;
                // Two bytes stay free for the index suffix of a request with several NICs.
                crate::netattach::validate_ifname(&name)
                    .map_err(|e| (field.clone(), e.to_string()))?;
                if name.len() > crate::netattach::MAX_IFNAME_LEN - 2 {
                    return Err((
                        field.clone(),
                        format!("{name:?} is longer than 13 bytes (2 are kept for an index)"),
                    ));
                }
                overlay.interface_name = Some(name);
            }
            _ => {
                return Err((
                    field.clone(),
                    "unknown field; expected apiVersion, kind, env, nicAttach, interfaceName"
                        .to_string(),
                ));
            }
        }
    }
    match api_version.as_deref() {
        Some(CLAIM_CONFIG_API_VERSION) => {}
        Some(other) => {
            return Err((
                "apiVersion".into(),
                format!("unknown apiVersion {other:?}; expected {CLAIM_CONFIG_API_VERSION:?}"),
            ));
        }
        None => return Err(("apiVersion".into(), "missing".into())),
    }
    match kind.as_deref() {
        Some(CLAIM_CONFIG_KIND) => {}
        Some(other) => {
            return Err((
                "kind".into(),
                format!("unknown kind {other:?}; expected {CLAIM_CONFIG_KIND:?}"),
            ));
        }
        None => return Err(("kind".into(), "missing".into())),
    }
    Ok(overlay)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Whether a config entry's `requests` list covers the allocation result of `request`
/// (`main` or `main/sub`): an empty list covers all; `main` covers all its subrequests.
fn entry_covers(entry_requests: &[String], request: &str) -> bool {
    if entry_requests.is_empty() {
        return true;
    }
    let main = request.split('/').next().unwrap_or(request);
    entry_requests.iter().any(|r| r == request || r == main)
}

/// Computes the effective configuration of each request in `requests` (allocation result
/// request names) from every config entry addressed to `driver_name`. Every such entry is
/// parsed, even one that covers no allocated request: a malformed config is reported, not
/// silently skipped. Entries of other drivers are ignored.
pub fn resolve(
    driver_name: &str,
    entries: &[DeviceAllocationConfiguration],
    requests: &[&str],
) -> Result<BTreeMap<String, RequestConfig>, ConfigError> {
    let mut ours: Vec<(u8, usize, Vec<String>, ConfigOverlay)> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let Some(opaque) = entry.opaque.as_ref() else {
            continue;
        };
        if opaque.driver != driver_name {
            continue;
        }
        let error = |field: String, message: String| ConfigError {
            index,
            source_kind: entry.source.clone(),
            field,
            message,
        };
        let rank = match entry.source.as_str() {
            "FromClass" => 0,
            "FromClaim" => 1,
            other => {
                return Err(error(
                    "source".into(),
                    format!("unknown source {other:?}; expected FromClass or FromClaim"),
                ));
            }
        };
        let overlay = parse_parameters(&opaque.parameters.0).map_err(|(f, m)| error(f, m))?;
        ours.push((
            rank,
            index,
            entry.requests.clone().unwrap_or_default(),
            overlay,
        ));
    }
    // Stable: class entries before claim entries, each in the order the apiserver gave.
    ours.sort_by_key(|(rank, index, _, _)| (*rank, *index));
    let mut resolved = BTreeMap::new();
    for request in requests {
        let mut config = RequestConfig::default();
        for (_, _, covered, overlay) in &ours {
            if entry_covers(covered, request) {
                if let Some(env) = overlay.env {
                    config.env = env;
                }
                if let Some(attach) = overlay.nic_attach {
                    config.nic_attach = attach;
                    config.nic_attach_set = true;
                }
                if let Some(name) = &overlay.interface_name {
                    config.interface_name = Some(name.clone());
                }
            }
        }
        resolved.insert((*request).to_string(), config);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration;
    use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
    use serde_json::json;

    fn entry(
        source: &str,
        driver: &str,
        requests: &[&str],
        params: serde_json::Value,
    ) -> DeviceAllocationConfiguration {
        DeviceAllocationConfiguration {
            source: source.into(),
            requests: (!requests.is_empty())
                .then(|| requests.iter().map(|r| r.to_string()).collect()),
            opaque: Some(OpaqueDeviceConfiguration {
                driver: driver.into(),
                parameters: RawExtension(params),
            }),
        }
    }

    fn config(fields: serde_json::Value) -> serde_json::Value {
        let mut base = json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig"});
        for (k, v) in fields.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    #[test]
    fn defaults_apply_without_entries() {
        let r = resolve("tandem.dev", &[], &["gpus"]).unwrap();
        assert_eq!(
            r["gpus"],
            RequestConfig {
                env: EnvFlavour::Nccl,
                nic_attach: NicAttach::None,
                nic_attach_set: false,
                interface_name: None,
            }
        );
    }

    #[test]
    fn claim_entries_win_over_class_entries_whatever_their_order() {
        let entries = vec![
            entry(
                "FromClaim",
                "tandem.dev",
                &[],
                config(json!({"env": "ucx"})),
            ),
            entry(
                "FromClass",
                "tandem.dev",
                &[],
                config(json!({"env": "none", "nicAttach": "shared"})),
            ),
        ];
        let r = resolve("tandem.dev", &entries, &["gpus"]).unwrap();
        assert_eq!(
            r["gpus"],
            RequestConfig {
                env: EnvFlavour::Ucx,
                nic_attach: NicAttach::Shared,
                nic_attach_set: true,
                interface_name: None,
            }
        );
    }

    #[test]
    fn entries_apply_only_to_their_requests_and_main_covers_subrequests() {
        let entries = vec![entry(
            "FromClaim",
            "tandem.dev",
            &["gpus"],
            config(json!({"nicAttach": "shared"})),
        )];
        let r = resolve("tandem.dev", &entries, &["gpus/h100", "nics"]).unwrap();
        assert_eq!(r["gpus/h100"].nic_attach, NicAttach::Shared);
        assert_eq!(r["nics"].nic_attach, NicAttach::None);
    }

    #[test]
    fn other_drivers_entries_are_ignored_even_when_malformed() {
        let entries = vec![entry(
            "FromClaim",
            "gpu.nvidia.com",
            &[],
            json!({"whatever": 1}),
        )];
        assert!(resolve("tandem.dev", &entries, &["gpus"]).is_ok());
    }

    #[test]
    fn unknown_field_is_named() {
        let entries = vec![entry(
            "FromClaim",
            "tandem.dev",
            &[],
            config(json!({"nicAtach": "shared"})),
        )];
        let e = resolve("tandem.dev", &entries, &["gpus"]).unwrap_err();
        assert_eq!(e.field, "nicAtach");
        assert!(e.to_string().contains("\"nicAtach\""), "{e}");
        assert!(e.to_string().contains("config[0]"), "{e}");
    }

    #[test]
    fn wrong_type_and_unknown_value_name_the_field() {
        let entries = vec![entry(
            "FromClaim",
            "tandem.dev",
            &[],
            config(json!({"env": 3})),
        )];
        let e = resolve("tandem.dev", &entries, &["gpus"]).unwrap_err();
        assert_eq!(e.field, "env");
        assert!(e.message.contains("invalid type"), "{e}");
        let entries = vec![entry(
            "FromClass",
            "tandem.dev",
            &[],
            config(json!({"nicAttach": "passthrough"})),
        )];
        let e = resolve("tandem.dev", &entries, &["gpus"]).unwrap_err();
        assert_eq!(e.field, "nicAttach");
        assert!(e.message.contains("passthrough"), "{e}");
    }

    #[test]
    fn unknown_api_version_kind_and_non_object_are_errors() {
        let mut p = config(json!({}));
        p["apiVersion"] = json!("tandem.dev/v2");
        let e = resolve(
            "tandem.dev",
            &[entry("FromClaim", "tandem.dev", &[], p)],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "apiVersion");
        let mut p = config(json!({}));
        p["kind"] = json!("GpuConfig");
        let e = resolve(
            "tandem.dev",
            &[entry("FromClaim", "tandem.dev", &[], p)],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "kind");
        let e = resolve(
            "tandem.dev",
            &[entry("FromClaim", "tandem.dev", &[], json!([1]))],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "parameters");
        let e = resolve(
            "tandem.dev",
            &[entry(
                "FromClaim",
                "tandem.dev",
                &[],
                json!({"kind": "ClaimConfig"}),
            )],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "apiVersion");
    }
}
