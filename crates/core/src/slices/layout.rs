//! Devices laid out over the node's ResourceSlices: stable slice names within the apiserver's
//! name limits, the per-slice device limit, and the owner reference to the Node.

use super::devices::build_devices;
use super::{MAX_OBJECT_NAME, NodeIdentity, SliceOptions};
use crate::topology::Inventory;
use k8s_openapi::api::resource::v1::{Device, ResourcePool, ResourceSlice, ResourceSliceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

pub(super) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `<node>-<driver>-<index>` when that is a valid object name, else a stable hashed form:
/// a node name with a long last label plus the driver can overflow a DNS label.
pub fn slice_name(node: &str, driver: &str, index: usize) -> String {
    let candidate = format!("{node}-{}-{index}", driver.to_lowercase());
    if candidate.len() <= MAX_OBJECT_NAME && candidate.split('.').all(is_dns_label) {
        return candidate;
    }
    let readable: String = node
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let readable = readable.trim_matches('-');
    let hash = crate::hash::fnv1a64(format!("{node}/{driver}").as_bytes());
    if readable.is_empty() {
        format!("tandem-{hash:016x}-{index}")
    } else {
        format!("{readable}-{hash:016x}-{index}")
    }
}

/// Lays `devices` (already in their final order) out over slices of the node's pool.
/// Pool generation is left at 0: the publisher owns it.
pub fn build_slices_from_devices(
    devices: Vec<Device>,
    node: &NodeIdentity,
    driver: &str,
    options: &SliceOptions,
) -> Vec<ResourceSlice> {
    let per_slice = options.devices_per_slice();
    let mut chunks: Vec<Vec<Device>> = Vec::new();
    let mut devices = devices.into_iter().peekable();
    while devices.peek().is_some() {
        chunks.push(devices.by_ref().take(per_slice).collect());
    }
    if chunks.is_empty() {
        // An empty slice still tells the scheduler this node's pool exists and is empty.
        chunks.push(Vec::new());
    }
    let count = chunks.len() as i64;
    let owner = (!node.uid.is_empty()).then(|| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.name.clone(),
            uid: node.uid.clone(),
            controller: Some(true),
            ..Default::default()
        }]
    });
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, chunk)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(&node.name, driver, index)),
                owner_references: owner.clone(),
                ..Default::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_string(),
                node_name: Some(node.name.clone()),
                pool: ResourcePool {
                    name: node.name.clone(),
                    generation: 0,
                    resource_slice_count: count,
                },
                devices: Some(chunk),
                ..Default::default()
            },
        })
        .collect()
}

/// The node's ResourceSlices for `inventory`.
pub fn build_slices(
    inventory: &Inventory,
    node: &NodeIdentity,
    driver: &str,
    options: &SliceOptions,
) -> Vec<ResourceSlice> {
    build_slices_from_devices(
        build_devices(inventory, driver, options),
        node,
        driver,
        options,
    )
}
