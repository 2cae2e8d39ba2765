//! Pair groups: for every device, the tightest topology domain holding both accelerators and
//! NICs that take part in pairing. A claim that asks for GPUs and NICs with
//! `matchAttribute: tandem.dev/pairGroup` then only gets pairs at the best level the machine
//! offers: on DGX a PCIe switch, on p4d a root complex, on Grace machines (where pcieRoot never
//! matches) a NUMA node.

use super::address::PciAddress;
use super::affinity::{Affinity, Domain, domain_at};
use super::inventory::{Inventory, PciFunction};
use super::pairing::node_pairing_nics;
use std::collections::{BTreeMap, HashSet};

/// The `pairGroup` value of every device that can be paired. Devices with no counterpart
/// (a GPU on a node without NICs, a NIC left out of pairing) get none.
pub fn pair_groups(inventory: &Inventory) -> BTreeMap<PciAddress, String> {
    let accelerators: Vec<&PciFunction> = inventory.accelerators.iter().map(|a| &a.pci).collect();
    let (nics, _) = node_pairing_nics(inventory);
    let mut groups = BTreeMap::new();
    if accelerators.is_empty() || nics.is_empty() {
        return groups;
    }
    // Domains, per level, that hold at least one accelerator / one NIC.
    let with_accelerators = domains_by_level(&accelerators);
    let with_nics = domains_by_level(&nics);
    let mut assign = |pci: &PciFunction, other_side: &[HashSet<Domain>; 5]| {
        for level in Affinity::ALL {
            if let Some(d) = domain_at(pci, level)
                && other_side[level.index()].contains(&d)
            {
                groups.insert(pci.address, d.group_name());
                return;
            }
        }
    };
    for a in &accelerators {
        assign(a, &with_nics);
    }
    for n in &nics {
        assign(n, &with_accelerators);
    }
    groups
}

fn domains_by_level(devices: &[&PciFunction]) -> [HashSet<Domain>; 5] {
    let mut sets: [HashSet<Domain>; 5] = Default::default();
    for pci in devices {
        for level in Affinity::ALL {
            if let Some(d) = domain_at(pci, level) {
                sets[level.index()].insert(d);
            }
        }
    }
    sets
}
