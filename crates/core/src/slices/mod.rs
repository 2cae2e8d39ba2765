//! Inventory → ResourceSlices, pure. One pool per node, devices named from their PCI address,
//! attributes for pairing and topology, and health taints; split into slices that respect the
//! apiserver's limits, in a fixed device order so one changed device rewrites one slice.

use std::net::IpAddr;

mod devices;
mod layout;
mod management;
#[cfg(test)]
mod tests;

pub use devices::{
    bounded_string, build_devices, build_devices_leaving_out, build_devices_with_network,
    gone_taint, health_taint,
};
pub use layout::{build_slices, build_slices_from_devices, slice_name};
pub use management::{LeftOutNic, ManagementReason, NetworkFacts, management_nics};

/// The apiserver's per-slice device limits.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
pub const MAX_DEVICES_PER_SLICE_WITH_TAINTS: usize = 64;
/// Longest string attribute value the apiserver accepts.
pub const MAX_ATTRIBUTE_STRING: usize = 64;
const MAX_OBJECT_NAME: usize = 253;

/// The Node the slices belong to; the UID makes the Node their owner (garbage collection when
/// the Node object goes). An empty UID leaves the owner reference out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceOptions {
    /// Publish DeviceTaints for unhealthy devices (the cluster needs the DRADeviceTaints gate).
    pub device_taints: bool,
    /// Devices per slice, clamped to the apiserver's limits.
    pub max_devices_per_slice: usize,
    /// The Kubernetes node IP: the NIC holding it is the node's own link to the cluster.
    pub node_ip: Option<IpAddr>,
    /// Publish NICs that carry the node IP or a default route too (off: a pod that took
    /// one would cut the node off the cluster).
    pub publish_management_nics: bool,
}

impl Default for SliceOptions {
    fn default() -> Self {
        Self {
            device_taints: false,
            max_devices_per_slice: MAX_DEVICES_PER_SLICE,
            node_ip: None,
            publish_management_nics: false,
        }
    }
}

impl SliceOptions {
    /// Devices per slice. With taints enabled any device may gain a taint at any time, so
    /// the tainted limit applies always: otherwise one link going down would re-split the pool.
    pub fn devices_per_slice(&self) -> usize {
        let limit = if self.device_taints {
            MAX_DEVICES_PER_SLICE_WITH_TAINTS
        } else {
            MAX_DEVICES_PER_SLICE
        };
        self.max_devices_per_slice.clamp(1, limit)
    }
}
