//! The Inventory: what discovery found on one node, as plain data. Everything downstream
//! (pairing, slices, claim preparation) reads this and nothing else about the machine.

use super::address::PciAddress;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Facts every PCI function carries, whatever its kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PciFunction {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    /// The 24-bit class code (`0x030200`).
    pub class: u32,
    pub subsystem_vendor_id: Option<u16>,
    pub subsystem_device_id: Option<u16>,
    /// Names from the PCI ID database, where it knows the IDs.
    pub vendor_name: Option<String>,
    pub device_name: Option<String>,
    /// NUMA node; `None` when neither `numa_node` nor `local_cpulist` tells.
    pub numa_node: Option<u32>,
    pub numa_source: NumaSource,
    pub local_cpulist: Option<String>,
    /// `pciDDDD:BB`, the first element below `/sys/devices`.
    pub pcie_root: String,
    /// Bridges from the root port down to (not including) this function.
    pub bridges: Vec<PciAddress>,
    pub link_speed: Option<String>,
    pub link_width: Option<u32>,
    /// Bound kernel driver (`nvidia`, `mlx5_core`, `vfio-pci`); `None` when unbound.
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    pub sriov: Option<Sriov>,
    /// The physical function, on an SR-IOV virtual function.
    pub physfn: Option<PciAddress>,
    /// `TOTAL_ERR_FATAL` from `aer_dev_fatal`, where AER is enabled.
    pub aer_fatal: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NumaSource {
    /// The function's own `numa_node` file.
    Sysfs,
    /// `numa_node` said -1; the node was derived from `local_cpulist`.
    LocalCpulist,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
}

/// A character device the container needs, with the numbers read from sysfs `dev` files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CharDevice {
    /// Path relative to the dev root (`nvidia0`, `infiniband/uverbs3`, `dri/renderD128`).
    pub path: String,
    pub major: u32,
    pub minor: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcceleratorKind {
    NvidiaGpu,
    AmdGpu,
    /// A class 0x12 processing accelerator (Gaudi, TPU, ...) from any vendor.
    ProcessingAccelerator,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accelerator {
    pub pci: PciFunction,
    pub kind: AcceleratorKind,
    /// Marketing name: from the driver where it tells (NVIDIA `Model:`, AMD `product_name`),
    /// else the PCI database, else the raw IDs.
    pub model: String,
    pub uuid: Option<String>,
    /// NVIDIA device minor (`/dev/nvidia<minor>`).
    pub minor: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Bound to vfio-pci: handed out as `/dev/vfio/<group>` rather than through its driver.
    pub vfio: bool,
    /// Device nodes of this accelerator alone (shared nodes such as nvidiactl live in HostInfo).
    pub char_devices: Vec<CharDevice>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Netdev {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub operstate: Option<String>,
    /// Mb/s; `None` when the kernel reports -1 (link down) or nothing.
    pub speed_mbps: Option<u64>,
    /// ARPHRD type: 1 Ethernet, 32 InfiniBand (IPoIB).
    pub if_type: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RdmaPort {
    pub number: u32,
    /// `ACTIVE`, `DOWN`, ... (the text after `4: `).
    pub state: Option<String>,
    pub phys_state: Option<String>,
    /// `InfiniBand` or `Ethernet`.
    pub link_layer: Option<String>,
    /// Gb/s, parsed from `400 Gb/sec (4X NDR)`.
    pub rate_gbps: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RdmaDevice {
    /// The ibdev name (`mlx5_0`, `rdmap16s27`).
    pub name: String,
    pub node_guid: Option<String>,
    pub ports: Vec<RdmaPort>,
    /// `infiniband/uverbsN`, `infiniband/umadN`, `infiniband/issmN`.
    pub char_devices: Vec<CharDevice>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nic {
    pub pci: PciFunction,
    /// Netdevs of this function, sorted by name; empty for RDMA-only devices such as EFA.
    pub netdevs: Vec<Netdev>,
    pub rdma: Option<RdmaDevice>,
    /// Why this NIC is a frontend (the node's own network, not the compute fabric), where
    /// sysfs tells: an accelerated-networking VF enslaved to a Hyper-V synthetic NIC. The
    /// slice builder adds what only the network facts know (node IP, default route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<String>,
}

/// What a NIC is for, as pairing and the `tandem.dev/role` attribute see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicRole {
    /// RDMA-capable and not the node's frontend: InfiniBand, RoCE, EFA.
    Fabric,
    /// The node's own network (or a NIC without RDMA): paired only when nothing else is left.
    Frontend,
}

impl NicRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            NicRole::Fabric => "fabric",
            NicRole::Frontend => "frontend",
        }
    }
}

impl Nic {
    pub fn is_rdma(&self) -> bool {
        self.rdma.is_some()
    }

    pub fn role(&self) -> NicRole {
        if self.is_rdma() && self.frontend.is_none() {
            NicRole::Fabric
        } else {
            NicRole::Frontend
        }
    }
    /// The interface a person would name this NIC by.
    pub fn if_name(&self) -> Option<&str> {
        self.netdevs.first().map(|n| n.name.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NumaNode {
    pub id: u32,
    pub cpulist: String,
    /// SLIT row from `distance`, indexed by node id.
    pub distances: Vec<u32>,
}

/// Machine-wide facts that claim preparation needs beside the devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    /// `/proc/driver/nvidia/version`, first line's version number.
    pub nvidia_driver_version: Option<String>,
    /// Shared device nodes: nvidiactl, nvidia-uvm(-tools), infiniband/rdma_cm, kfd.
    pub shared_char_devices: Vec<CharDevice>,
}

/// Something discovery could not read or understand. The device it concerns (if any) may be
/// missing from the inventory or have a fact left empty; the rest of the machine is unaffected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryProblem {
    pub device: Option<PciAddress>,
    pub path: PathBuf,
    pub message: String,
    /// The kind of device this problem kept out of the inventory, where discovery knew it:
    /// a machine with an accelerator it could not place is not described truthfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<LostDevice>,
}

/// A device that was found but left out of the inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LostDevice {
    Accelerator,
    Nic,
}

impl std::fmt::Display for DiscoveryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.device {
            Some(d) => write!(f, "{d}: {}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Everything discovery found. Devices are sorted by PCI address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub accelerators: Vec<Accelerator>,
    pub nics: Vec<Nic>,
    pub numa_nodes: Vec<NumaNode>,
    pub host: HostInfo,
    pub problems: Vec<DiscoveryProblem>,
}

/// One device of the inventory, whichever kind.
#[derive(Clone, Copy, Debug)]
pub enum DeviceRef<'a> {
    Accelerator(&'a Accelerator),
    Nic(&'a Nic),
}

impl DeviceRef<'_> {
    pub fn pci(&self) -> &PciFunction {
        match self {
            DeviceRef::Accelerator(a) => &a.pci,
            DeviceRef::Nic(n) => &n.pci,
        }
    }
}

impl Inventory {
    /// Accelerators that were found but could not be placed (and so are missing).
    pub fn lost_accelerators(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.lost == Some(LostDevice::Accelerator))
            .count()
    }

    pub fn accelerator(&self, address: &PciAddress) -> Option<&Accelerator> {
        self.accelerators.iter().find(|a| &a.pci.address == address)
    }

    pub fn nic(&self, address: &PciAddress) -> Option<&Nic> {
        self.nics.iter().find(|n| &n.pci.address == address)
    }

    /// Looks a device up by its published name (`gpu-0000-18-00-0`, `nic-0000-18-00-0`).
    pub fn device_by_name(&self, name: &str) -> Option<DeviceRef<'_>> {
        let (kind, dashed) = name.split_once('-')?;
        let address = address_from_dashed(dashed)?;
        match kind {
            "gpu" => self.accelerator(&address).map(DeviceRef::Accelerator),
            "nic" => self.nic(&address).map(DeviceRef::Nic),
            _ => None,
        }
    }
}

/// Parses `dddd-bb-dd-f` back into an address; anything else (dots, slashes, extra parts) is None.
fn address_from_dashed(dashed: &str) -> Option<PciAddress> {
    let parts: Vec<&str> = dashed.split('-').collect();
    let [domain, bus, device, function] = parts.as_slice() else {
        return None;
    };
    format!("{domain}:{bus}:{device}.{function}").parse().ok()
}
