//! What preparing one claim means, computed without side effects: checks each allocated device
//! against the inventory, pairs GPUs with NICs, and builds the CDI spec, environment and
//! topology file. The preparer only writes what this returns.
//!
//! [`plan_claim`] runs the steps in order; each concern has its own file: pairing and the
//! topology file (`topology`), the CDI edits of each device (`edits`), the claim-wide
//! environment (`env_vars`) and the NIC moves (`netattach`). Whether another claim holds a
//! planned device (`holders`) is checked apart, by the preparer under its checkpoint's memory
//! lock, so that claims of different calls are planned in parallel.

mod edits;
mod env_vars;
mod holders;
mod netattach;
#[cfg(test)]
mod tests;
mod topology;

pub use holders::DeviceHolders;
pub use netattach::{NetattachHook, NetdevMover};

use super::RecordedDevice;
use super::cdi::{self, CdiSpec, ContainerEdits};
use super::config;
use super::driver_root::DriverRoot;
use super::error::PrepareError;
use super::topology_file::ClaimTopology;
use super::vendor_cdi::VendorMatches;
use crate::topology::{Accelerator, DeviceRef, Inventory, Nic, device_issues};
use std::collections::BTreeMap;
use std::path::Path;
use tandem_kubelet_plugin::claim::{AllocatedDevice, ClaimRef, OurAllocation};

/// The claim's accelerators, each with its allocation, in PCI address order.
type Accelerators<'a> = Vec<(&'a AllocatedDevice, &'a Accelerator)>;
/// The claim's NICs, each with its allocation, in PCI address order.
type Nics<'a> = Vec<(&'a AllocatedDevice, &'a Nic)>;
/// The resolved configuration of each request of the claim.
type PerRequest = BTreeMap<String, config::RequestConfig>;

/// Where things go: from the preparer's configuration.
pub struct PlanContext<'a> {
    pub driver_name: &'a str,
    pub dev_root_in_container: &'a Path,
    /// Host path of this claim's topology file (`<state_dir>/claims/<uid>.topology.json`).
    pub topology_host_path: &'a Path,
    pub inventory: &'a Inventory,
    /// How an exclusively attached NIC's netdev reaches the pod; `None` keeps every NIC's
    /// netdev on the host.
    pub netdev_mover: Option<NetdevMover<'a>>,
    /// Other vendors' CDI devices of the inventory's accelerators; each one found is listed
    /// before ours in the prepared device's CDI ids.
    pub vendor: Option<&'a VendorMatches>,
    /// Driver libraries and binaries mounted into the containers of GPUs without a vendor
    /// device (`--gpu-driver-root`).
    pub driver_root: Option<&'a DriverRoot>,
    /// Set `NVIDIA_VISIBLE_DEVICES` to the claim's GPU UUIDs for runtimes in legacy mode.
    pub nvidia_legacy_env: bool,
}

/// The outcome of planning one claim.
#[derive(Clone, Debug)]
pub struct ClaimPlan {
    pub devices: Vec<RecordedDevice>,
    pub topology: ClaimTopology,
    /// `None` when the claim holds no device of ours: nothing to hand to the runtime.
    pub spec: Option<CdiSpec>,
}

pub fn plan_claim(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    allocation: &OurAllocation,
) -> Result<ClaimPlan, PrepareError> {
    let (accelerators, nics) = claim_devices(ctx.inventory, claim, allocation)?;
    let per_request = request_configs(ctx, claim, allocation)?;
    let flavour = env_vars::claim_flavour(claim, &per_request)?;
    let (pairing, shared_nics) =
        topology::claim_pairing(ctx.inventory, &per_request, &accelerators, &nics);
    let topology = topology::claim_topology(claim, &accelerators, &nics, &shared_nics, &pairing);
    if allocation.devices.is_empty() {
        return Ok(ClaimPlan {
            devices: Vec::new(),
            topology,
            spec: None,
        });
    }

    let kind = crate::names::cdi_claim_kind(ctx.driver_name);
    let mut devices = edits::Devices::new(&kind, claim);
    for (allocated, accelerator) in &accelerators {
        devices.push_accelerator(ctx, allocated, accelerator)?;
    }
    netattach::refuse_unmovable_exclusive(ctx, claim, &per_request, &nics)?;
    let pod_names = netattach::exclusive_pod_names(ctx, claim, &per_request, &nics, &pairing)?;
    for (allocated, nic) in &nics {
        let mut edits = edits::nic_edits(ctx, claim, allocated, nic, false)?;
        let pod_name = pod_names.get(&nic.pci.address);
        netattach::add_netdev_move(ctx, claim, nic, pod_name, &mut edits)?;
        devices.push(allocated, edits);
    }
    let (cdi_devices, recorded) = devices.with_topology_mount(ctx)?;
    let mut claim_edits = ContainerEdits {
        env: env_vars::claim_env_vars(ctx, flavour, &topology, &accelerators),
        ..ContainerEdits::default()
    };
    edits::add_shared_nic_nodes(ctx, claim, &shared_nics, &mut claim_edits)?;
    let mut spec = CdiSpec {
        cdi_version: String::new(),
        kind,
        devices: cdi_devices,
        container_edits: claim_edits,
    };
    spec.cdi_version = cdi::minimum_version(&spec).to_string();
    Ok(ClaimPlan {
        devices: recorded,
        topology,
        spec: Some(spec),
    })
}

/// Finds each allocated device in the inventory and checks that it may be prepared: healthy
/// (unless the allocation has admin access). Returns the accelerators and the NICs, each
/// sorted by PCI address.
fn claim_devices<'a>(
    inventory: &'a Inventory,
    claim: &ClaimRef,
    allocation: &'a OurAllocation,
) -> Result<(Accelerators<'a>, Nics<'a>), PrepareError> {
    let mut accelerators: Accelerators<'a> = Vec::new();
    let mut nics: Nics<'a> = Vec::new();
    for allocated in &allocation.devices {
        let found = inventory.device_by_name(&allocated.device).ok_or_else(|| {
            PrepareError::DeviceNotFound {
                claim: claim.to_string(),
                device: allocated.device.clone(),
            }
        })?;
        let issues = device_issues(found);
        // Admin access is how an operator reaches a broken device to diagnose it.
        if !issues.is_empty() && !allocated.admin_access {
            let issues: Vec<String> = issues.iter().map(|i| format!("{i:?}")).collect();
            return Err(PrepareError::DeviceUnhealthy {
                claim: claim.to_string(),
                device: allocated.device.clone(),
                issues: issues.join(", "),
            });
        }
        match found {
            DeviceRef::Accelerator(a) => accelerators.push((allocated, a)),
            DeviceRef::Nic(n) => nics.push((allocated, n)),
        }
    }
    accelerators.sort_by_key(|(_, a)| a.pci.address);
    nics.sort_by_key(|(_, n)| n.pci.address);
    Ok((accelerators, nics))
}

/// The opaque configuration of each request of the claim, resolved against the defaults.
fn request_configs(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    allocation: &OurAllocation,
) -> Result<PerRequest, PrepareError> {
    let requests: Vec<&str> = allocation
        .devices
        .iter()
        .flat_map(|d| d.requests.iter().map(String::as_str))
        .collect();
    config::resolve(ctx.driver_name, &allocation.config, &requests).map_err(|source| {
        PrepareError::Config {
            claim: claim.to_string(),
            source,
        }
    })
}
