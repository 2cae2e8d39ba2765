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
//!
//! Within a domain, ties go to NICs on physical cards (domain:bus:device) that no pair uses
//! yet, so two GPUs do not share the PCIe link of a dual-port card while another card idles.
//! Where NICs outnumber accelerators, a NIC left over below the same switch as a paired
//! accelerator (PIX or PXB, as good as that accelerator's first NIC) joins its NIC set: AWS
//! p5 puts four EFA devices below each GPU's switch, and the GPU gets all four.

use super::address::PciAddress;
use super::affinity::{Affinity, Domain, affinity, domain_at};
use super::inventory::{Inventory, NicRole, PciFunction};
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
    /// An accelerator with a NIC set appears in one pair per NIC, its first (primary) NIC
    /// first, the rest in BDF order: the pairing order claim environments list them in.
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

    /// Every NIC of an accelerator's set, primary first.
    pub fn nics_of<'a>(&'a self, accelerator: &'a PciAddress) -> impl Iterator<Item = &'a Pair> {
        self.pairs
            .iter()
            .filter(move |p| &p.accelerator == accelerator)
    }

    /// The first pair of every accelerator: one per paired accelerator.
    pub fn primary_pairs(&self) -> impl Iterator<Item = &Pair> {
        self.pairs
            .iter()
            .enumerate()
            .filter(|(i, p)| *i == 0 || self.pairs[i - 1].accelerator != p.accelerator)
            .map(|(_, p)| p)
    }

    /// How many accelerators are paired at each level (by their primary NIC), PIX first.
    pub fn level_counts(&self) -> [usize; 5] {
        let mut counts = [0; 5];
        for p in self.primary_pairs() {
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

/// Pairs the whole node. Compute-fabric NICs take part (RDMA-capable and not the node's
/// frontend); a node without any pairs its frontend RDMA NICs, and a node without RDMA its
/// plain Ethernet NICs, since a GPU with a TCP NIC nearby still beats one without.
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

/// The NICs that take part in node-wide pairing, with a note when others stand in: fabric
/// NICs; else RDMA NICs that are frontends; else every NIC.
pub fn node_pairing_nics(inventory: &Inventory) -> (Vec<&PciFunction>, Option<String>) {
    let fabric: Vec<&PciFunction> = inventory
        .nics
        .iter()
        .filter(|n| n.role() == NicRole::Fabric)
        .map(|n| &n.pci)
        .collect();
    if !fabric.is_empty() || inventory.nics.is_empty() {
        return (fabric, None);
    }
    let frontend_rdma: Vec<&PciFunction> = inventory
        .nics
        .iter()
        .filter(|n| n.is_rdma())
        .map(|n| &n.pci)
        .collect();
    if !frontend_rdma.is_empty() {
        return (
            frontend_rdma,
            Some("no compute-fabric NIC on this node: pairing frontend RDMA NICs".to_string()),
        );
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
    // Pairs on each NIC, and the other functions of each NIC's physical card.
    let mut pairs_on_nic = vec![0usize; nic_list.len()];
    let card_mates: Vec<Vec<usize>> = nic_list
        .iter()
        .map(|n| {
            (0..nic_list.len())
                .filter(|&m| nic_list[m].address != n.address && same_card(nic_list[m], n))
                .collect()
        })
        .collect();

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
        for (_, (group_accels, mut group_slots)) in groups {
            // Both lists are already in BDF order (free lists are kept sorted). Each
            // accelerator takes the first free slot on the least used card: with single-port
            // NICs that is simply the next slot.
            for &a in &group_accels {
                let card_load = |n: usize| {
                    card_mates[n]
                        .iter()
                        .map(|&m| pairs_on_nic[m])
                        .sum::<usize>()
                };
                let Some(pick) =
                    (0..group_slots.len()).min_by_key(|&i| (card_load(group_slots[i].0), i))
                else {
                    break;
                };
                let s = group_slots.remove(pick);
                pairs.push(Pair {
                    accelerator: accels[a].address,
                    nic: nic_list[s.0].address,
                    affinity: affinity(accels[a], nic_list[s.0]),
                });
                pairs_on_nic[s.0] += 1;
                used_accels.push(a);
                used_slots.push(s);
            }
        }
        used_accels.sort_unstable();
        used_slots.sort_unstable();
        free_accels.retain(|a| used_accels.binary_search(a).is_err());
        free_slots.retain(|s| used_slots.binary_search(s).is_err());
    }

    if nic_list.len() > accels.len() {
        add_nic_sets(&accels, &nic_list, &pairs_on_nic, &mut pairs);
    }
    // Stable: each accelerator's primary NIC stays ahead of the rest of its set.
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

/// Two functions of one physical card: same domain, bus and device (`0000:03:00.0` and `.1`).
fn same_card(a: &PciFunction, b: &PciFunction) -> bool {
    let (a, b) = (a.address, b.address);
    (a.domain, a.bus, a.device) == (b.domain, b.bus, b.device)
}

/// Gives each NIC that no pair uses to a paired accelerator below the same switch, when it is
/// as close to it as the accelerator's first NIC (PIX or PXB): the accelerator with the
/// fewest NICs so far, then the lowest BDF. NICs farther away than a switch stay unpaired.
fn add_nic_sets(
    accels: &[&PciFunction],
    nics: &[&PciFunction],
    pairs_on_nic: &[usize],
    pairs: &mut Vec<Pair>,
) {
    let primaries: Vec<(usize, Affinity)> = accels
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let first = pairs.iter().find(|p| p.accelerator == a.address)?;
            matches!(first.affinity, Affinity::Pix | Affinity::Pxb).then_some((i, first.affinity))
        })
        .collect();
    let mut set_sizes = vec![1usize; accels.len()];
    for (n, nic) in nics.iter().enumerate() {
        if pairs_on_nic[n] > 0 {
            continue;
        }
        let best = primaries
            .iter()
            .filter(|&&(a, level)| affinity(accels[a], nic) == level)
            .min_by_key(|&&(a, _)| (set_sizes[a], accels[a].address));
        if let Some(&(a, level)) = best {
            set_sizes[a] += 1;
            pairs.push(Pair {
                accelerator: accels[a].address,
                nic: nic.address,
                affinity: level,
            });
        }
    }
}
