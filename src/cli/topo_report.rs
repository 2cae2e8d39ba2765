//! What `tandem topo` shows: the node's accelerators and NICs, the affinity matrix in the
//! style of `nvidia-smi topo -m`, and the chosen pairs and groups. Built from the Inventory
//! alone; `-o json` prints the same report as the JSON named in design.md.

use crate::names::{accelerator_device_name, nic_device_name};
use crate::topology::affinity::{Affinity, affinity, nearest_switch};
use crate::topology::groups::pair_groups;
use crate::topology::inventory::{Accelerator, Inventory, Nic, NicRole, PciFunction};
use crate::topology::pairing::{Pairing, pair_node};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceleratorEntry {
    pub name: String,
    #[serde(rename = "pciBusID")]
    pub pci_bus_id: String,
    pub pcie_root: String,
    pub numa_node: Option<u32>,
    pub kind: String,
    pub vendor: String,
    pub model: String,
    pub uuid: Option<String>,
    pub driver: Option<String>,
    pub pcie_switch: Option<String>,
    pub pair_group: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NicEntry {
    pub name: String,
    #[serde(rename = "pciBusID")]
    pub pci_bus_id: String,
    pub pcie_root: String,
    pub numa_node: Option<u32>,
    pub if_name: Option<String>,
    pub rdma_device: Option<String>,
    pub rdma: bool,
    pub vendor: String,
    pub model: String,
    pub link_layer: Option<String>,
    pub link_speed_gbps: Option<u64>,
    pub state: Option<String>,
    pub pcie_switch: Option<String>,
    pub pair_group: Option<String>,
    /// `fabric` or `frontend`, as far as sysfs tells (the plugin also knows the node IP and
    /// default routes, and publishes those NICs' role as frontend).
    pub role: NicRole,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_reason: Option<String>,
}

/// A GPU and its NIC set: `nic` is the first (primary) NIC, `nics` the whole set in pairing
/// order (one NIC on most machines, four EFA devices per GPU on AWS p5).
#[derive(Clone, Debug, Serialize)]
pub struct PairEntry {
    pub gpu: String,
    pub nic: String,
    pub affinity: Affinity,
    pub nics: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopoReport {
    pub gpus: Vec<AcceleratorEntry>,
    pub nics: Vec<NicEntry>,
    pub pairs: Vec<PairEntry>,
    pub unpaired_gpus: Vec<String>,
    pub unpaired_nics: Vec<String>,
    /// Why there are no (or fewer) pairs, for a person to read.
    pub note: Option<String>,
    pub problems: Vec<String>,
    /// Accelerators found but left out of the report (see `problems`); `tandem topo` exits
    /// with status 3 when there are any.
    pub lost_accelerators: usize,
    /// `affinity[i][j]`: GPU i to NIC j, in the order of `gpus` and `nics`.
    #[serde(skip)]
    pub affinity: Vec<Vec<Affinity>>,
}

impl TopoReport {
    pub fn new(inventory: &Inventory) -> Self {
        let pairing: Pairing = pair_node(inventory);
        let groups = pair_groups(inventory);
        let gpus = inventory
            .accelerators
            .iter()
            .map(|a| accelerator_entry(a, groups.get(&a.pci.address).cloned()))
            .collect();
        let nics = inventory
            .nics
            .iter()
            .map(|n| nic_entry(n, groups.get(&n.pci.address).cloned()))
            .collect();
        let affinity_matrix = inventory
            .accelerators
            .iter()
            .map(|a| {
                inventory
                    .nics
                    .iter()
                    .map(|n| affinity(&a.pci, &n.pci))
                    .collect()
            })
            .collect();
        let pairs = pairing
            .primary_pairs()
            .map(|p| PairEntry {
                gpu: accelerator_device_name(&p.accelerator),
                nic: nic_device_name(&p.nic),
                affinity: p.affinity,
                nics: pairing
                    .nics_of(&p.accelerator)
                    .map(|q| nic_device_name(&q.nic))
                    .collect(),
            })
            .collect();
        let mut note = pairing.reason.clone();
        let lost = inventory.lost_accelerators();
        if inventory.accelerators.is_empty() && lost == 0 {
            note = Some("no accelerators found on this node".to_string());
        } else if lost > 0 {
            note = Some(format!(
                "{lost} accelerator(s) found but not placed (see the problems below)"
            ));
        }
        TopoReport {
            gpus,
            nics,
            pairs,
            unpaired_gpus: pairing
                .unpaired_accelerators
                .iter()
                .map(accelerator_device_name)
                .collect(),
            unpaired_nics: pairing.unpaired_nics.iter().map(nic_device_name).collect(),
            note,
            problems: inventory.problems.iter().map(|p| p.to_string()).collect(),
            lost_accelerators: inventory.lost_accelerators(),
            affinity: affinity_matrix,
        }
    }

    /// The human-readable report.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} accelerator(s), {} NIC(s)",
            self.gpus.len(),
            self.nics.len()
        );
        if let Some(note) = &self.note {
            let _ = writeln!(out, "note: {note}");
        }
        if !self.gpus.is_empty() {
            let _ = writeln!(out, "\nAccelerators");
            for (i, g) in self.gpus.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  GPU{i:<3} {:<18} {}  {:<11} NUMA {:<3} {}",
                    g.name,
                    g.pci_bus_id,
                    g.pcie_root,
                    numa_text(g.numa_node),
                    g.model
                );
            }
        }
        if !self.nics.is_empty() {
            let _ = writeln!(out, "\nNICs");
            for (j, n) in self.nics.iter().enumerate() {
                let link = match (&n.link_layer, n.link_speed_gbps) {
                    (Some(l), Some(s)) => format!("{l} {s} Gb/s"),
                    (Some(l), None) => l.clone(),
                    (None, Some(s)) => format!("{s} Gb/s"),
                    (None, None) => String::new(),
                };
                let role = match n.role {
                    NicRole::Frontend => "  (frontend)",
                    NicRole::Fabric => "",
                };
                let _ = writeln!(
                    out,
                    "  NIC{j:<3} {:<18} {}  {:<11} NUMA {:<3} {:<10} {:<16} {:<8} {}{role}",
                    n.name,
                    n.pci_bus_id,
                    n.pcie_root,
                    numa_text(n.numa_node),
                    n.rdma_device.as_deref().unwrap_or("-"),
                    n.if_name.as_deref().unwrap_or("-"),
                    n.state.as_deref().unwrap_or("-"),
                    link
                );
            }
        }
        if !self.gpus.is_empty() && !self.nics.is_empty() {
            self.render_matrix(&mut out);
        }
        if !self.pairs.is_empty() {
            let _ = writeln!(out, "\nPairs");
            for p in &self.pairs {
                let gi = self.gpus.iter().position(|g| g.name == p.gpu);
                let nj = self.nics.iter().position(|n| n.name == p.nic);
                let label = |n: Option<usize>, prefix: &str| {
                    n.map(|i| format!("{prefix}{i}")).unwrap_or_default()
                };
                let group = gi
                    .and_then(|i| self.gpus[i].pair_group.clone())
                    .unwrap_or_else(|| "-".to_string());
                let nic_label = nj
                    .and_then(|j| {
                        let n = &self.nics[j];
                        n.rdma_device.clone().or_else(|| n.if_name.clone())
                    })
                    .unwrap_or_default();
                let more = if p.nics.len() > 1 {
                    format!("  +{} in its NIC set", p.nics.len() - 1)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "  {:<6} {} <-> {:<6} {} {:<12} {:<4}  group {}{more}",
                    label(gi, "GPU"),
                    p.gpu,
                    label(nj, "NIC"),
                    p.nic,
                    nic_label,
                    p.affinity,
                    group
                );
                for extra in p.nics.iter().skip(1) {
                    let j = self.nics.iter().position(|n| &n.name == extra);
                    let name = j
                        .and_then(|j| {
                            let n = &self.nics[j];
                            n.rdma_device.clone().or_else(|| n.if_name.clone())
                        })
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  {:<6} {:<16}  +  {:<6} {} {}",
                        "",
                        "",
                        label(j, "NIC"),
                        extra,
                        name
                    );
                }
            }
        }
        if !self.unpaired_nics.is_empty() {
            let _ = writeln!(out, "\nUnpaired NICs: {}", self.unpaired_nics.join(", "));
        }
        if !self.unpaired_gpus.is_empty() {
            let _ = writeln!(out, "Unpaired GPUs: {}", self.unpaired_gpus.join(", "));
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nProblems found while reading the machine");
            for p in &self.problems {
                let _ = writeln!(out, "  {p}");
            }
        }
        out
    }

    fn render_matrix(&self, out: &mut String) {
        const MAX_COLUMNS: usize = 64;
        let _ = writeln!(out, "\nAffinity");
        if self.nics.len() > MAX_COLUMNS {
            let _ = writeln!(
                out,
                "  ({} NICs: matrix omitted, use -o json for the pairs)",
                self.nics.len()
            );
            return;
        }
        let _ = write!(out, "        ");
        for j in 0..self.nics.len() {
            let _ = write!(out, "{:<6}", format!("NIC{j}"));
        }
        let _ = writeln!(out);
        for (i, row) in self.affinity.iter().enumerate() {
            let _ = write!(out, "  {:<6}", format!("GPU{i}"));
            for a in row {
                let _ = write!(out, "{:<6}", a.as_str());
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "\n  PIX  = through at most a single PCIe switch\n  PXB  = through multiple PCIe switches, without the host bridge\n  PHB  = through a PCIe host bridge (same root complex)\n  NODE = across root complexes within a NUMA node\n  SYS  = across NUMA nodes (or NUMA node unknown)"
        );
    }
}

fn numa_text(n: Option<u32>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "?".to_string())
}

fn vendor_text(pci: &PciFunction) -> String {
    pci.vendor_name
        .clone()
        .unwrap_or_else(|| format!("0x{:04x}", pci.vendor_id))
}

fn accelerator_entry(a: &Accelerator, pair_group: Option<String>) -> AcceleratorEntry {
    let kind = serde_json::to_value(a.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    AcceleratorEntry {
        name: accelerator_device_name(&a.pci.address),
        pci_bus_id: a.pci.address.to_string(),
        pcie_root: a.pci.pcie_root.clone(),
        numa_node: a.pci.numa_node,
        kind,
        vendor: vendor_text(&a.pci),
        model: a.model.clone(),
        uuid: a.uuid.clone(),
        driver: a.pci.driver.clone(),
        pcie_switch: nearest_switch(&a.pci).map(|s| s.to_string()),
        pair_group,
    }
}

fn nic_entry(n: &Nic, pair_group: Option<String>) -> NicEntry {
    let port = n.rdma.as_ref().and_then(|r| r.ports.first());
    let netdev = n.netdevs.first();
    let speed = port.and_then(|p| p.rate_gbps).or_else(|| {
        netdev
            .and_then(|d| d.speed_mbps)
            .map(|mbps| mbps / 1000)
            .filter(|&g| g > 0)
    });
    let state = port
        .and_then(|p| p.state.clone())
        .or_else(|| netdev.and_then(|d| d.operstate.clone()));
    NicEntry {
        name: nic_device_name(&n.pci.address),
        pci_bus_id: n.pci.address.to_string(),
        pcie_root: n.pci.pcie_root.clone(),
        numa_node: n.pci.numa_node,
        if_name: n.if_name().map(str::to_string),
        rdma_device: n.rdma.as_ref().map(|r| r.name.clone()),
        rdma: n.is_rdma(),
        vendor: vendor_text(&n.pci),
        model: n
            .pci
            .device_name
            .clone()
            .unwrap_or_else(|| format!("0x{:04x}", n.pci.device_id)),
        link_layer: port.and_then(|p| p.link_layer.clone()).or_else(|| {
            netdev.and_then(|d| match d.if_type {
                Some(32) => Some("InfiniBand".to_string()),
                Some(1) => Some("Ethernet".to_string()),
                _ => None,
            })
        }),
        link_speed_gbps: speed,
        state,
        pcie_switch: nearest_switch(&n.pci).map(|s| s.to_string()),
        pair_group,
        role: n.role(),
        role_reason: n.frontend.clone().or_else(|| {
            (!n.is_rdma()).then(|| "no RDMA device: not a compute-fabric NIC".to_string())
        }),
    }
}
