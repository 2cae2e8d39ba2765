//! Pairing the claim's GPUs with NICs (its own, or the node's best in shared mode) and the
//! topology file that tells the pod the result.

use super::{Accelerators, Nics, PerRequest};
use crate::names::{accelerator_device_name, nic_device_name};
use crate::prepare::config::NicAttach;
use crate::prepare::topology_file::{ClaimTopology, TopologyGpu, TopologyNic, TopologyPair};
use crate::topology::{
    Accelerator, DeviceRef, Inventory, Nic, Pairing, PciAddress, PciFunction, device_issues,
    pair_devices, pair_node,
};
use std::collections::BTreeSet;
use tandem_kubelet_plugin::claim::ClaimRef;

/// Pairs within the claim; a GPU-only claim may borrow the node's best NICs in shared mode,
/// returned beside the pairing.
pub(super) fn claim_pairing<'a>(
    inventory: &'a Inventory,
    per_request: &PerRequest,
    accelerators: &Accelerators<'_>,
    nics: &Nics<'_>,
) -> (Pairing, Vec<&'a Nic>) {
    let accel_pcis: Vec<&PciFunction> = accelerators.iter().map(|(_, a)| &a.pci).collect();
    let nic_pcis: Vec<&PciFunction> = nics.iter().map(|(_, n)| &n.pci).collect();
    let mut shared_nics: Vec<&Nic> = Vec::new();
    let pairing = if nics.is_empty() && !accelerators.is_empty() {
        let wants_shared: BTreeSet<PciAddress> = accelerators
            .iter()
            .filter(|(allocated, _)| {
                allocated.requests.iter().any(|r| {
                    per_request
                        .get(r)
                        .is_some_and(|c| c.nic_attach == NicAttach::Shared)
                })
            })
            .map(|(_, a)| a.pci.address)
            .collect();
        if wants_shared.is_empty() {
            pair_devices(&accel_pcis, &nic_pcis)
        } else {
            shared_pairing(inventory, &accel_pcis, &wants_shared, &mut shared_nics)
        }
    } else {
        pair_devices(&accel_pcis, &nic_pcis)
    };
    (pairing, shared_nics)
}

/// The topology file of the claim: its devices and how they pair.
pub(super) fn claim_topology(
    claim: &ClaimRef,
    accelerators: &Accelerators<'_>,
    nics: &Nics<'_>,
    shared_nics: &[&Nic],
    pairing: &Pairing,
) -> ClaimTopology {
    ClaimTopology {
        claim_uid: claim.uid.clone(),
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        gpus: accelerators.iter().map(|(_, a)| topology_gpu(a)).collect(),
        nics: nics
            .iter()
            .map(|(_, n)| topology_nic(n, false))
            .chain(shared_nics.iter().map(|n| topology_nic(n, true)))
            .collect(),
        pairs: pairing
            .pairs
            .iter()
            .map(|p| TopologyPair {
                gpu: accelerator_device_name(&p.accelerator),
                nic: nic_device_name(&p.nic),
                affinity: p.affinity,
            })
            .collect(),
        unpaired_gpus: pairing
            .unpaired_accelerators
            .iter()
            .map(accelerator_device_name)
            .collect(),
        unpaired_nics: if shared_nics.is_empty() {
            pairing.unpaired_nics.iter().map(nic_device_name).collect()
        } else {
            // Node-wide unpaired NICs are not this claim's business.
            Vec::new()
        },
        reason: pairing.reason.clone(),
    }
}

/// Pairs the claim's GPUs with the NICs the node-wide pairing gives them, for GPUs whose
/// request asked for shared attach. A NIC that is unhealthy is left out with a reason rather
/// than failing the claim: the GPUs are usable without it.
fn shared_pairing<'a>(
    inventory: &'a Inventory,
    accelerators: &[&PciFunction],
    wants_shared: &BTreeSet<PciAddress>,
    shared_nics: &mut Vec<&'a Nic>,
) -> Pairing {
    let node = pair_node(inventory);
    let mut pairing = Pairing::default();
    let mut skipped = Vec::new();
    for accelerator in accelerators {
        let address = accelerator.address;
        let pair = wants_shared
            .contains(&address)
            .then(|| node.nic_for(&address))
            .flatten();
        let nic = pair.and_then(|p| inventory.nic(&p.nic).map(|n| (p, n)));
        match nic {
            Some((pair, nic)) if device_issues(DeviceRef::Nic(nic)).is_empty() => {
                pairing.pairs.push(*pair);
                if !shared_nics.iter().any(|n| n.pci.address == nic.pci.address) {
                    shared_nics.push(nic);
                }
            }
            Some((_, nic)) => {
                skipped.push(nic_device_name(&nic.pci.address));
                pairing.unpaired_accelerators.push(address);
            }
            None => pairing.unpaired_accelerators.push(address),
        }
    }
    shared_nics.sort_by_key(|n| n.pci.address);
    pairing.reason = if !skipped.is_empty() {
        Some(format!(
            "shared NIC(s) {} unhealthy, not attached",
            skipped.join(", ")
        ))
    } else if !pairing.unpaired_accelerators.is_empty() {
        node.reason
            .clone()
            .or_else(|| Some("no NIC to attach".to_string()))
    } else {
        None
    };
    pairing
}

fn topology_gpu(a: &Accelerator) -> TopologyGpu {
    TopologyGpu {
        name: accelerator_device_name(&a.pci.address),
        pci_bus_id: a.pci.address.to_string(),
        pcie_root: a.pci.pcie_root.clone(),
        numa_node: a.pci.numa_node,
        model: a.model.clone(),
        uuid: a.uuid.clone(),
    }
}

fn topology_nic(n: &Nic, shared: bool) -> TopologyNic {
    let rdma = n.rdma.as_ref();
    let port = rdma.and_then(|r| {
        r.ports
            .iter()
            .find(|p| p.state.as_deref() == Some("ACTIVE"))
            .or_else(|| r.ports.first())
            .map(|p| p.number)
    });
    TopologyNic {
        name: nic_device_name(&n.pci.address),
        pci_bus_id: n.pci.address.to_string(),
        pcie_root: n.pci.pcie_root.clone(),
        numa_node: n.pci.numa_node,
        if_name: n.if_name().map(String::from),
        rdma_device: rdma.map(|r| r.name.clone()),
        rdma_port: port,
        shared,
    }
}
