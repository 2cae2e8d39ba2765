//! The per-claim topology file mounted read-only into the container: the claim's devices,
//! its GPU-NIC pairs and their affinity levels, in the shape of `tandem topo -o json`.

use crate::topology::Affinity;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimTopology {
    pub claim_uid: String,
    pub namespace: String,
    pub name: String,
    pub gpus: Vec<TopologyGpu>,
    /// The claim's NICs, then NICs attached in shared mode (`shared: true`).
    pub nics: Vec<TopologyNic>,
    /// In GPU order.
    pub pairs: Vec<TopologyPair>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpaired_gpus: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpaired_nics: Vec<String>,
    /// Why some devices have no pair, for a person to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyGpu {
    pub name: String,
    #[serde(rename = "pciBusID")]
    pub pci_bus_id: String,
    pub pcie_root: String,
    pub numa_node: Option<u32>,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyNic {
    pub name: String,
    #[serde(rename = "pciBusID")]
    pub pci_bus_id: String,
    pub pcie_root: String,
    pub numa_node: Option<u32>,
    pub if_name: Option<String>,
    pub rdma_device: Option<String>,
    /// The RDMA port to use: the first ACTIVE one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_port: Option<u32>,
    /// Attached in shared mode to a GPU-only claim: RDMA char devices only, other pods may use
    /// the same NIC.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyPair {
    pub gpu: String,
    pub nic: String,
    pub affinity: Affinity,
}
