//! Names other people depend on (design.md): the driver, attribute keys, device names.
//! Spelled here once; everything else refers to these.

use crate::topology::address::PciAddress;

pub const DEFAULT_DRIVER_NAME: &str = "tandem.dev";
pub const STANDARD_ATTRIBUTE_DOMAIN: &str = "resource.kubernetes.io";
pub const ATTR_PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
pub const ATTR_PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";

/// Device attributes and capacities Tandem publishes, as identifiers under the driver's domain
/// (`<driver>/<id>`, so `tandem.dev/pairGroup` with the default driver name).
pub const ATTR_KIND: &str = "kind";
pub const ATTR_VENDOR: &str = "vendor";
pub const ATTR_MODEL: &str = "model";
pub const ATTR_UUID: &str = "uuid";
pub const ATTR_NUMA_NODE: &str = "numaNode";
pub const ATTR_PCIE_SWITCH: &str = "pcieSwitch";
pub const ATTR_PAIR_GROUP: &str = "pairGroup";
pub const ATTR_PAIRED_WITH: &str = "pairedWith";
pub const ATTR_PAIR_AFFINITY: &str = "pairAffinity";
/// The accelerator's device name, on the accelerator and on every NIC of its NIC set, so that
/// `matchAttribute: tandem.dev/pairSet` gives one GPU with its own NICs.
pub const ATTR_PAIR_SET: &str = "pairSet";
/// On an accelerator: how many NICs its NIC set holds.
pub const ATTR_PAIRED_NIC_COUNT: &str = "pairedNicCount";
/// On a NIC: `fabric` (the compute fabric) or `frontend` (the node's own network).
pub const ATTR_ROLE: &str = "role";
pub const ATTR_IF_NAME: &str = "ifName";
pub const ATTR_RDMA: &str = "rdma";
pub const ATTR_RDMA_DEVICE: &str = "rdmaDevice";
pub const ATTR_LINK_LAYER: &str = "linkLayer";
pub const ATTR_LINK_SPEED_GBPS: &str = "linkSpeedGbps";
pub const ATTR_MAC: &str = "mac";
pub const CAPACITY_MEMORY: &str = "memory";
/// `tandem.dev/kind` values.
pub const KIND_GPU: &str = "gpu";
pub const KIND_NIC: &str = "nic";
/// Device taint keys, also under the driver's domain (`tandem.dev/link-down`).
pub const TAINT_LINK_DOWN: &str = "link-down";
pub const TAINT_PCIE_FATAL: &str = "pcie-fatal";
pub const TAINT_GONE: &str = "gone";

/// `<driver>/<id>`: a driver-scoped attribute, capacity or taint key.
pub fn driver_qualified(driver_name: &str, id: &str) -> String {
    format!("{driver_name}/{id}")
}

/// DeviceClasses (design.md): accelerators, and RDMA-capable NICs.
pub const DEVICE_CLASS_GPU: &str = "gpu.tandem.dev";
pub const DEVICE_CLASS_NIC: &str = "nic.tandem.dev";

/// Cluster controller (design.md): the field manager of everything it writes, the Node labels
/// and annotation of the fleet alignment view, the Lease and the rail ConfigMap it owns.
pub const CONTROLLER_FIELD_MANAGER: &str = "tandem-controller";
pub const CONTROLLER_LEASE_NAME: &str = "tandem-controller";
pub const DEFAULT_CONTROLLER_NAMESPACE: &str = "tandem-system";
pub const LABEL_GPUS: &str = "tandem.dev/gpus";
pub const LABEL_RDMA_NICS: &str = "tandem.dev/rdma-nics";
pub const LABEL_BEST_AFFINITY: &str = "tandem.dev/best-affinity";
/// JSON detail behind the labels (pairs per affinity level, unhealthy devices); read back to
/// tell whether a node's alignment got worse, whichever replica wrote it.
pub const ANNOTATION_ALIGNMENT: &str = "tandem.dev/alignment";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "tandem";
pub const RAILS_CONFIGMAP: &str = "tandem-rails";
/// NIC attributes for rail-optimised fabrics: the IPv4/IPv6 prefix of the NIC's address
/// (`192.168.1.0/24`) and the rail number the controller assigned to that prefix.
pub const ATTR_SUBNET: &str = "subnet";
pub const ATTR_RAIL: &str = "rail";
/// Event reasons the controller emits on Nodes.
pub const REASON_ALIGNMENT_DEGRADED: &str = "AlignmentDegraded";
pub const REASON_RAIL_MISMATCH: &str = "RailMismatch";

/// CDI class of the per-claim specs. The vendor is the driver name, so the default kind is
/// `tandem.dev/claim` and a second driver instance with another name never touches our specs.
pub const CDI_CLASS_CLAIM: &str = "claim";

/// `<driver>/claim`: the CDI kind of the per-claim specs.
pub fn cdi_claim_kind(driver_name: &str) -> String {
    format!("{driver_name}/{CDI_CLASS_CLAIM}")
}

/// Opaque claim configuration (`allocation.devices.config[].opaque.parameters`) type identity.
pub const CLAIM_CONFIG_API_VERSION: &str = "tandem.dev/v1alpha1";
pub const CLAIM_CONFIG_KIND: &str = "ClaimConfig";

/// Where the per-claim topology file is mounted (read-only) inside the container.
pub const CONTAINER_TOPOLOGY_FILE: &str = "/var/run/tandem/topology.json";

/// Container environment set for every prepared claim.
pub const ENV_CLAIM_UID: &str = "TANDEM_CLAIM_UID";
pub const ENV_GPUS: &str = "TANDEM_GPUS";
pub const ENV_NICS: &str = "TANDEM_NICS";
pub const ENV_PAIRS: &str = "TANDEM_PAIRS";
pub const ENV_TOPOLOGY_FILE: &str = "TANDEM_TOPOLOGY_FILE";

/// `gpu-dddd-bb-dd-f`: the device name of an accelerator, stable across reboots.
pub fn accelerator_device_name(address: &PciAddress) -> String {
    format!("gpu-{}", address.dashed())
}

/// `nic-dddd-bb-dd-f`: the device name of a NIC, stable while its netdev is inside a pod.
pub fn nic_device_name(address: &PciAddress) -> String {
    format!("nic-{}", address.dashed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_follow_design() {
        let a: PciAddress = "0000:18:00.0".parse().unwrap();
        assert_eq!(accelerator_device_name(&a), "gpu-0000-18-00-0");
        assert_eq!(nic_device_name(&a), "nic-0000-18-00-0");
    }
}
