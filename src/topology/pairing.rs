//! Which NIC goes with which accelerator. The pairing is optimal lexicographically: the most
//! pairs at PIX, then the most at PXB, and so on down to SYS; ties go to the lowest BDFs.
//!
//! The affinity levels come from nested domains (switch ⊂ top switch ⊂ root complex, then NUMA
//! node, then machine), so matching greedily inside each domain from the innermost outwards
//! pairs, at every level, as many devices as any assignment could: within a domain the
//! leftovers of its children are all on one side, so the domain ends with min(GPUs, NICs)
//! pairs inside it. That makes the pairing O(n log n) rather than a general assignment.
//! The nesting holds because the kernel gives every function below a host bridge the
//! bridge's NUMA node, so a root complex never spans NUMA nodes.

use super::address::PciAddress;
use super::affinity::{Affinity, Domain, affinity, domain_at};
use super::inventory::{Inventory, PciFunction};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub accelerator: PciAddress,
    pub nic: PciAddress,
    pub affinity: Affinity,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pairing {
    /// Sorted by accelerator. With more accelerators than NICs a NIC appears in several pairs.
    pub pairs: Vec<Pair>,
    pub unpaired_accelerators: Vec<PciAddress>,
    pub unpaired_nics: Vec<PciAddress>,
    /// Why there are no pairs, or why some devices were left out, for a person to read.
    pub reason: Option<String>,
}

impl Pairing {
    pub fn nic_for(&self, accelerator: &PciAddress) -> Option<&Pair> {
        self.pairs.iter().find(|p| &p.accelerator == accelerator)
    }

    /// How many pairs sit at each level, PIX first.
    pub fn level_counts(&self) -> [usize; 5] {
        let mut counts = [0; 5];
        for p in &self.pairs {
            counts[p.affinity.index()] += 1;
        }
        counts
    }
}

/// Pairs exactly the given devices (for example, the devices of one claim).
pub fn pair_devices(accelerators: &[&PciFunction], nics: &[&PciFunction]) -> Pairing {
    let mut pairing = match_in_domains(accelerators, nics);
    if accelerators.is_empty() {
        pairing.reason = Some("no accelerators to pair".to_string());
    } else if nics.is_empty() {
        pairing.reason = Some("no network interfaces to pair with".to_string());
    }
    pairing
}

/// Pairs the whole node. Only RDMA NICs take part, unless the node has none: then plain
/// Ethernet NICs do, since a GPU with a TCP NIC nearby still beats one without.
pub fn pair_node(inventory: &Inventory) -> Pairing {
    let accelerators: Vec<&PciFunction> = inventory.accelerators.iter().map(|a| &a.pci).collect();
    let (nics, reason) = node_pairing_nics(inventory);
    let mut pairing = pair_devices(&accelerators, &nics);
    if inventory.nics.is_empty() && !accelerators.is_empty() {
        pairing.reason = Some("this node has no network interfaces".to_string());
    } else if pairing.reason.is_none() {
        pairing.reason = reason;
    }
    // NICs left out of pairing are unpaired too.
    for nic in &inventory.nics {
        if !nics.iter().any(|n| n.address == nic.pci.address) {
            pairing.unpaired_nics.push(nic.pci.address);
        }
    }
    pairing.unpaired_nics.sort();
    pairing
}

/// The NICs that take part in node-wide pairing, with a note when plain NICs stand in.
pub fn node_pairing_nics(inventory: &Inventory) -> (Vec<&PciFunction>, Option<String>) {
    let rdma: Vec<&PciFunction> = inventory
        .nics
        .iter()
        .filter(|n| n.is_rdma())
        .map(|n| &n.pci)
        .collect();
    if !rdma.is_empty() || inventory.nics.is_empty() {
        return (rdma, None);
    }
    let all = inventory.nics.iter().map(|n| &n.pci).collect();
    (
        all,
        Some("no RDMA NIC on this node: pairing plain network interfaces".to_string()),
    )
}

/// The free accelerators (indexes) and NIC slots (NIC index, round) inside one domain.
type DomainMembers = (Vec<usize>, Vec<(usize, usize)>);

fn match_in_domains(accelerators: &[&PciFunction], nics: &[&PciFunction]) -> Pairing {
    let mut accels: Vec<&PciFunction> = accelerators.to_vec();
    accels.sort_by_key(|p| p.address);
    accels.dedup_by_key(|p| p.address);
    let mut nic_list: Vec<&PciFunction> = nics.to_vec();
    nic_list.sort_by_key(|p| p.address);
    nic_list.dedup_by_key(|p| p.address);

    // More accelerators than NICs: each NIC serves at most ceil(G/N) of them, so the NICs are
    // shared evenly and every accelerator still gets one.
    let slots_per_nic = if nic_list.is_empty() {
        0
    } else {
        accels.len().div_ceil(nic_list.len()).max(1)
    };
    // A slot is (nic index, round); sorted by NIC then round so that a shared NIC serves
    // neighbouring accelerators (GPU0 and GPU1 share NIC0, as on p4d).
    let mut free_slots: Vec<(usize, usize)> = (0..nic_list.len())
        .flat_map(|n| (0..slots_per_nic).map(move |r| (n, r)))
        .collect();
    let mut free_accels: Vec<usize> = (0..accels.len()).collect();
    let mut pairs = Vec::new();

    for level in Affinity::ALL {
        if free_accels.is_empty() || free_slots.is_empty() {
            break;
        }
        let mut groups: BTreeMap<Domain, DomainMembers> = BTreeMap::new();
        for &a in &free_accels {
            if let Some(d) = domain_at(accels[a], level) {
                groups.entry(d).or_default().0.push(a);
            }
        }
        for &s in &free_slots {
            if let Some(d) = domain_at(nic_list[s.0], level) {
                groups.entry(d).or_default().1.push(s);
            }
        }
        let mut used_accels = Vec::new();
        let mut used_slots = Vec::new();
        for (_, (group_accels, group_slots)) in groups {
            // Both lists are already in BDF order (free lists are kept sorted).
            for (&a, &s) in group_accels.iter().zip(group_slots.iter()) {
                pairs.push(Pair {
                    accelerator: accels[a].address,
                    nic: nic_list[s.0].address,
                    affinity: affinity(accels[a], nic_list[s.0]),
                });
                used_accels.push(a);
                used_slots.push(s);
            }
        }
        used_accels.sort_unstable();
        used_slots.sort_unstable();
        free_accels.retain(|a| used_accels.binary_search(a).is_err());
        free_slots.retain(|s| used_slots.binary_search(s).is_err());
    }

    pairs.sort_by_key(|p| p.accelerator);
    let unpaired_accelerators = free_accels.iter().map(|&a| accels[a].address).collect();
    let paired_nics: BTreeSet<PciAddress> = pairs.iter().map(|p| p.nic).collect();
    let unpaired_nics = nic_list
        .iter()
        .filter(|n| !paired_nics.contains(&n.address))
        .map(|n| n.address)
        .collect();
    Pairing {
        pairs,
        unpaired_accelerators,
        unpaired_nics,
        reason: None,
    }
}
