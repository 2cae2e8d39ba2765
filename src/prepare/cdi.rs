//! CDI spec documents (container-device-interface SPEC.md) as small serde structs, the
//! lowest `cdiVersion` that covers what a spec uses, and the per-claim spec file naming.
//! Only the fields Tandem writes are modelled; a runtime rejects unknown fields anyway.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A CDI spec file: one per prepared claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<CdiDevice>,
    /// Edits applied whenever any device of this spec is requested: the claim-wide environment
    /// and the verbs devices of NICs attached in shared mode.
    #[serde(default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiDevice {
    pub name: String,
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_devices: Vec<NetDevice>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.mounts.is_empty()
            && self.hooks.is_empty()
            && self.net_devices.is_empty()
    }
}

/// A host network interface the runtime moves into the container's network namespace
/// under `name` (CDI 1.1.0 `netDevices`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetDevice {
    pub host_interface_name: String,
    pub name: String,
}

/// An OCI hook. Hooks are in the spec since 0.3.0 (kubelet-dra.md lists no version that adds
/// them), so they do not raise the minimum version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub hook_name: String,
    pub path: String,
    /// Full argv, `args[0]` included, as OCI hooks take it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Seconds the runtime waits before killing the hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

/// A device node. `hostPath` is left out on purpose: it would need cdiVersion 0.5.0, and the
/// host path equals the container path for every node we hand out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: String,
    #[serde(rename = "type")]
    pub node_type: String,
    pub major: i64,
    pub minor: i64,
}

impl DeviceNode {
    pub fn char_device(path: String, major: u32, minor: u32) -> Self {
        Self {
            path,
            node_type: "c".to_string(),
            major: i64::from(major),
            minor: i64::from(minor),
        }
    }
}

/// A mount. Mount `type` is left out (it needs 0.4.0); the `bind` option is enough for runc
/// and crun to bind-mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The lowest cdiVersion a CDI library accepts for this spec. deviceNodes, env and mounts exist
/// since 0.3.0; 0.5.0 is the first version that allows a device name starting with a digit,
/// which a claim UID (hex) often does. Writing the lowest version keeps runtimes with an older
/// CDI library working. `netDevices` need 1.1.0.
pub fn minimum_version(spec: &CdiSpec) -> &'static str {
    let net_devices = std::iter::once(&spec.container_edits)
        .chain(spec.devices.iter().map(|d| &d.container_edits))
        .any(|e| !e.net_devices.is_empty());
    if net_devices {
        return "1.1.0";
    }
    let name_starts_with_non_letter = spec.devices.iter().any(|d| {
        d.name
            .chars()
            .next()
            .is_some_and(|c| !c.is_ascii_alphabetic())
    });
    if name_starts_with_non_letter {
        "0.5.0"
    } else {
        "0.3.0"
    }
}

/// `<driver>-claim_<uid>.json`: the transient-spec naming of the CDI Go helpers
/// (`<vendor>-<class>_<id>`), so an operator recognises whose file it is.
pub fn spec_file_name(driver_name: &str, claim_uid: &str) -> String {
    format!("{}{claim_uid}.json", spec_file_prefix(driver_name))
}

/// The part of our spec file names before the claim UID.
pub fn spec_file_prefix(driver_name: &str) -> String {
    format!("{driver_name}-{}_", crate::names::CDI_CLASS_CLAIM)
}

/// The CDI device name of one claim device: unique per claim and per node.
pub fn device_name(claim_uid: &str, device_name: &str) -> String {
    format!("{claim_uid}-{device_name}")
}

/// `vendor/class=name`, the fully qualified id the kubelet hands to the runtime.
pub fn qualified_name(kind: &str, name: &str) -> String {
    format!("{kind}={name}")
}

/// Whether the JSON file at `path` is a CDI spec of `kind`. Unreadable or non-JSON files are
/// not ours: we only ever delete what we can prove we wrote.
pub fn is_spec_of_kind(path: &Path, kind: &str) -> bool {
    #[derive(Deserialize)]
    struct KindOnly {
        kind: String,
    }
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<KindOnly>(&bytes).ok())
        .is_some_and(|k| k.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_device(name: &str) -> CdiSpec {
        CdiSpec {
            cdi_version: String::new(),
            kind: "tandem.dev/claim".into(),
            devices: vec![CdiDevice {
                name: name.into(),
                container_edits: ContainerEdits::default(),
            }],
            container_edits: ContainerEdits::default(),
        }
    }

    #[test]
    fn version_rises_only_for_device_names_starting_with_a_digit() {
        assert_eq!(
            minimum_version(&spec_with_device("abc-gpu-0000-1b-00-0")),
            "0.3.0"
        );
        assert_eq!(
            minimum_version(&spec_with_device("3f2a-gpu-0000-1b-00-0")),
            "0.5.0"
        );
    }

    #[test]
    fn net_devices_need_version_1_1_and_use_cdi_field_names() {
        let mut spec = spec_with_device("a-nic");
        spec.devices[0].container_edits.net_devices = vec![NetDevice {
            host_interface_name: "ens1f0".into(),
            name: "rdma0".into(),
        }];
        assert_eq!(minimum_version(&spec), "1.1.0");
        let json = serde_json::to_value(&spec.devices[0].container_edits).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"netDevices": [{"hostInterfaceName": "ens1f0", "name": "rdma0"}]})
        );
    }

    #[test]
    fn json_uses_cdi_field_names_and_omits_empty_edits() {
        let mut spec = spec_with_device("a-gpu");
        spec.devices[0].container_edits.device_nodes =
            vec![DeviceNode::char_device("/dev/nvidia0".into(), 195, 0)];
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cdiVersion": "",
                "kind": "tandem.dev/claim",
                "devices": [{"name": "a-gpu", "containerEdits": {
                    "deviceNodes": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]
                }}]
            })
        );
    }

    #[test]
    fn names_follow_cdi_conventions() {
        assert_eq!(
            spec_file_name("tandem.dev", "u1"),
            "tandem.dev-claim_u1.json"
        );
        assert_eq!(
            qualified_name("tandem.dev/claim", &device_name("u1", "gpu-0000-1b-00-0")),
            "tandem.dev/claim=u1-gpu-0000-1b-00-0"
        );
    }

    #[test]
    fn only_specs_of_our_kind_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("a.json");
        let theirs = dir.path().join("b.json");
        let junk = dir.path().join("c.json");
        std::fs::write(
            &ours,
            r#"{"cdiVersion":"0.3.0","kind":"tandem.dev/claim","devices":[]}"#,
        )
        .unwrap();
        std::fs::write(
            &theirs,
            r#"{"cdiVersion":"0.3.0","kind":"nvidia.com/gpu","devices":[]}"#,
        )
        .unwrap();
        std::fs::write(&junk, "{").unwrap();
        assert!(is_spec_of_kind(&ours, "tandem.dev/claim"));
        assert!(!is_spec_of_kind(&theirs, "tandem.dev/claim"));
        assert!(!is_spec_of_kind(&junk, "tandem.dev/claim"));
    }
}
