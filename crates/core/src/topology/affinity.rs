//! How close two PCI functions sit: the levels `nvidia-smi topo -m` prints (PIX, PXB, PHB,
//! NODE, SYS), and the nested topology domains those levels are made of. Pairing and pair
//! groups use the same domains, so the three can never disagree.

use super::address::PciAddress;
use super::inventory::PciFunction;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Affinity between two devices, closest first (`Pix < Sys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Affinity {
    /// Through at most one PCIe switch (or one bridge).
    Pix,
    /// Through several bridges, without crossing the host bridge.
    Pxb,
    /// Through the host bridge of one root complex.
    Phb,
    /// Across root complexes within one NUMA node.
    Node,
    /// Across NUMA nodes (or where the NUMA node is unknown).
    Sys,
}

impl Affinity {
    pub const ALL: [Affinity; 5] = [
        Affinity::Pix,
        Affinity::Pxb,
        Affinity::Phb,
        Affinity::Node,
        Affinity::Sys,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Affinity::Pix => "PIX",
            Affinity::Pxb => "PXB",
            Affinity::Phb => "PHB",
            Affinity::Node => "NODE",
            Affinity::Sys => "SYS",
        }
    }

    pub fn index(&self) -> usize {
        *self as usize
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topology domain: the set of devices below one switch, one root complex, one NUMA node,
/// or the whole machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// Devices whose nearest switch (or, without one, parent root port) is this bridge.
    Switch(PciAddress),
    /// Every device below this top-level switch, however deep.
    SwitchTree(PciAddress),
    Root(String),
    Numa(u32),
    Machine,
}

impl Domain {
    /// The `pairGroup` attribute value naming this domain (short, DNS-label friendly).
    pub fn group_name(&self) -> String {
        match self {
            Domain::Switch(a) => format!("switch-{}", a.dashed()),
            Domain::SwitchTree(a) => format!("switch-tree-{}", a.dashed()),
            Domain::Root(r) => r.replace(':', "-"),
            Domain::Numa(n) => format!("numa-{n}"),
            Domain::Machine => "node".to_string(),
        }
    }
}

/// The PCIe switch a device hangs off (the `pcieSwitch` attribute), if there is one. In a
/// switch, Linux shows the upstream port as a bridge and each downstream port as a bridge
/// below it, so the chain below a root port alternates upstream (odd index) and downstream
/// (even index) ports. A device below a downstream port belongs to the switch of that port's
/// upstream port; chains that do not follow the pattern fall back to the parent bridge.
pub fn nearest_switch(pci: &PciFunction) -> Option<PciAddress> {
    let chain = &pci.bridges;
    match chain.len().checked_sub(1)? {
        0 => None, // directly below a root port
        parent if parent % 2 == 0 => Some(chain[parent - 1]),
        parent => Some(chain[parent]),
    }
}

/// The domain within which devices are one switch (or one bridge) apart: the nearest switch,
/// else the root port both hang off.
fn single_switch_domain(pci: &PciFunction) -> Option<PciAddress> {
    nearest_switch(pci).or_else(|| pci.bridges.last().copied())
}

/// The outermost switch below the root port: everything that shares it is PXB or closer.
fn top_switch(pci: &PciFunction) -> Option<PciAddress> {
    pci.bridges.get(1).copied()
}

/// The domain of `pci` at `level`, if it has one there.
pub fn domain_at(pci: &PciFunction, level: Affinity) -> Option<Domain> {
    match level {
        Affinity::Pix => single_switch_domain(pci).map(Domain::Switch),
        Affinity::Pxb => top_switch(pci).map(Domain::SwitchTree),
        Affinity::Phb => Some(Domain::Root(pci.pcie_root.clone())),
        Affinity::Node => pci.numa_node.map(Domain::Numa),
        Affinity::Sys => Some(Domain::Machine),
    }
}

/// The affinity level of a pair: the closest level at which both share a domain.
pub fn affinity(a: &PciFunction, b: &PciFunction) -> Affinity {
    Affinity::ALL
        .into_iter()
        .find(|&level| match (domain_at(a, level), domain_at(b, level)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        })
        .unwrap_or(Affinity::Sys)
}
