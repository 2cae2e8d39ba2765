//! What preparing one claim means, computed without side effects: checks each allocated device
//! against the inventory and the other prepared claims, pairs GPUs with NICs, and builds the
//! CDI spec, environment and topology file. The preparer only writes what this returns.

use super::cdi::{self, CdiDevice, CdiSpec, ContainerEdits, DeviceNode, Hook, Mount, NetDevice};
use super::config::{self, EnvFlavour, NicAttach};
use super::driver_root::DriverRoot;
use super::env::claim_env;
use super::error::PrepareError;
use super::topology_file::{ClaimTopology, TopologyGpu, TopologyNic, TopologyPair};
use super::vendor_cdi::VendorMatches;
use super::{PreparedDevice, RecordedDevice};
use crate::names::{CONTAINER_TOPOLOGY_FILE, accelerator_device_name, nic_device_name};
use crate::netattach::record::InterfaceRequest;
use crate::topology::{
    Accelerator, AcceleratorKind, CharDevice, DeviceRef, Inventory, Nic, PciAddress, PciFunction,
    device_issues, pair_devices, pair_node,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use tandem_kubelet_plugin::claim::{AllocatedDevice, ClaimRef, OurAllocation};

/// Shared device nodes (HostInfo) each accelerator kind needs beside its own nodes.
const NVIDIA_SHARED_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];
const AMD_SHARED_NODES: &[&str] = &["kfd"];
const VFIO_SHARED_NODES: &[&str] = &["vfio/vfio"];
const RDMA_CM_NODE: &str = "infiniband/rdma_cm";
/// A NIC attached in shared mode gets its verbs device only: umad and issm are management
/// interfaces (MADs, subnet-manager capability) that a pod sharing the NIC must not hold.
const SHARED_NIC_NODE_PREFIX: &str = "infiniband/uverbs";

/// Who already holds a device, from the checkpoint and from claims prepared earlier in the same
/// call.
#[derive(Clone, Debug, Default)]
pub struct DeviceHolders {
    holders: BTreeMap<String, Vec<Holder>>,
}

#[derive(Clone, Debug)]
struct Holder {
    claim_uid: String,
    claim: String,
    share_id: bool,
    admin_access: bool,
}

impl DeviceHolders {
    pub fn add(&mut self, claim: &ClaimRef, devices: &[RecordedDevice]) {
        for d in devices {
            self.holders
                .entry(d.device.device_name.clone())
                .or_default()
                .push(Holder {
                    claim_uid: claim.uid.clone(),
                    claim: claim.to_string(),
                    share_id: d.device.share_id.is_some(),
                    admin_access: d.admin_access,
                });
        }
    }

    /// Marks `device` as unavailable for a reason other than a prepared claim (its netdev is
    /// still in the pod of an unprepared claim); it conflicts with every allocation.
    pub fn add_unavailable(&mut self, device: String, reason: String) {
        self.holders.entry(device).or_default().push(Holder {
            claim_uid: String::new(),
            claim: reason,
            share_id: false,
            admin_access: false,
        });
    }

    /// Another claim whose hold on `device` excludes this allocation. Admin access coexists
    /// with anything (it is for monitoring and repair); shares coexist with shares.
    fn conflicting(&self, claim_uid: &str, device: &AllocatedDevice) -> Option<&str> {
        self.holders
            .get(&device.device)?
            .iter()
            .filter(|h| h.claim_uid != claim_uid)
            .find(|h| {
                let compatible = device.admin_access
                    || h.admin_access
                    || (device.share_id.is_some() && h.share_id);
                !compatible
            })
            .map(|h| h.claim.as_str())
    }
}

/// Where things go: from the preparer's configuration.
pub struct PlanContext<'a> {
    pub driver_name: &'a str,
    pub dev_root_in_container: &'a Path,
    /// Host path of this claim's topology file (`<state_dir>/claims/<uid>/topology.json`).
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

/// The CDI edit that moves a netdev into the pod.
#[derive(Clone, Copy, Debug)]
pub enum NetdevMover<'a> {
    /// A `createRuntime` hook running `tandem hook attach`: works with any CDI runtime, and
    /// brings addresses, routes and rules along.
    Hook(NetattachHook<'a>),
    /// CDI 1.1 `netDevices`: the runtime moves the interface itself (it keeps addresses but
    /// not routes or rules; runtime-spec `linux.netDevices`).
    Cdi,
}

/// What the CDI hook entry of an exclusively attached NIC needs.
#[derive(Clone, Copy, Debug)]
pub struct NetattachHook<'a> {
    /// Host path of the `tandem` binary the runtime runs.
    pub path: &'a Path,
    /// The plugin's state directory, where the hook records what it moved.
    pub state_dir: &'a Path,
    /// The Kubernetes node IP: the hook refuses to move the interface that holds it.
    pub node_ip: Option<std::net::IpAddr>,
}

/// Seconds the runtime gives the hook; the hook bounds each netlink request far below it.
const NETATTACH_HOOK_TIMEOUT_SECONDS: i64 = 30;

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
    holders: &DeviceHolders,
) -> Result<ClaimPlan, PrepareError> {
    let mut accelerators: Vec<(&AllocatedDevice, &Accelerator)> = Vec::new();
    let mut nics: Vec<(&AllocatedDevice, &Nic)> = Vec::new();
    for allocated in &allocation.devices {
        let found = ctx
            .inventory
            .device_by_name(&allocated.device)
            .ok_or_else(|| PrepareError::DeviceNotFound {
                claim: claim.to_string(),
                device: allocated.device.clone(),
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
        if let Some(other) = holders.conflicting(&claim.uid, allocated) {
            return Err(PrepareError::DeviceInUse {
                claim: claim.to_string(),
                device: allocated.device.clone(),
                other: other.to_string(),
            });
        }
        match found {
            DeviceRef::Accelerator(a) => accelerators.push((allocated, a)),
            DeviceRef::Nic(n) => nics.push((allocated, n)),
        }
    }
    accelerators.sort_by_key(|(_, a)| a.pci.address);
    nics.sort_by_key(|(_, n)| n.pci.address);

    let requests: Vec<&str> = allocation
        .devices
        .iter()
        .flat_map(|d| d.requests.iter().map(String::as_str))
        .collect();
    let per_request =
        config::resolve(ctx.driver_name, &allocation.config, &requests).map_err(|source| {
            PrepareError::Config {
                claim: claim.to_string(),
                source,
            }
        })?;
    let flavour = claim_flavour(claim, &per_request)?;

    // Pair within the claim; a GPU-only claim may borrow the node's best NICs in shared mode.
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
            shared_pairing(ctx.inventory, &accel_pcis, &wants_shared, &mut shared_nics)
        }
    } else {
        pair_devices(&accel_pcis, &nic_pcis)
    };

    let topology = ClaimTopology {
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
    };

    if allocation.devices.is_empty() {
        return Ok(ClaimPlan {
            devices: Vec::new(),
            topology,
            spec: None,
        });
    }

    let kind = crate::names::cdi_claim_kind(ctx.driver_name);
    let mut cdi_devices = Vec::new();
    let mut recorded = Vec::new();
    for (allocated, accelerator) in &accelerators {
        let mut edits = accelerator_edits(ctx, claim, allocated, accelerator)?;
        let vendor_id = ctx
            .vendor
            .and_then(|v| v.get(&accelerator.pci.address))
            .and_then(|v| v.device_id.clone());
        // The vendor's device brings the driver's user space itself; mounting a driver root
        // as well would put two copies of it in the container.
        if vendor_id.is_none()
            && !accelerator.vfio
            && let Some(root) = ctx.driver_root
            && root.serves(accelerator.kind)
        {
            let extra = root.edits();
            edits.mounts.extend(extra.mounts);
            edits.env.extend(extra.env);
        }
        push_device(
            &kind,
            claim,
            allocated,
            edits,
            &mut cdi_devices,
            &mut recorded,
        );
        if let (Some(id), Some(last)) = (vendor_id, recorded.last_mut()) {
            // The runtime applies the vendor's device and its common edits (libraries,
            // hooks) together with ours.
            last.device.cdi_device_ids.insert(0, id);
        }
    }
    // Asking for `exclusive` on a node that cannot move netdevs is refused rather than
    // quietly downgraded: the pod would start without the interface it asked for.
    if ctx.netdev_mover.is_none() && !nics.is_empty() {
        let asked = per_request
            .iter()
            .find(|(_, c)| c.nic_attach_set && c.nic_attach == config::NicAttach::Exclusive);
        if let Some((request, _)) = asked {
            return Err(PrepareError::ConflictingConfig {
                claim: claim.to_string(),
                reason: format!(
                    "request {request:?} asks for nicAttach \"exclusive\", but this node's plugin has no --hook-path (nor --netdev-attach=cdi) to move network interfaces with"
                ),
            });
        }
    }
    let pod_names = exclusive_pod_names(ctx, claim, &per_request, &nics, &pairing)?;
    for (allocated, nic) in &nics {
        let mut edits = nic_edits(ctx, claim, allocated, nic, false)?;
        if let (Some(mover), Some(pod_name), Some(host_name)) = (
            ctx.netdev_mover,
            pod_names.get(&nic.pci.address),
            nic.if_name(),
        ) {
            let request = InterfaceRequest {
                host_name: host_name.to_string(),
                pod_name: pod_name.clone(),
                pci_address: Some(nic.pci.address.to_string()),
                rdma_device: nic.rdma.as_ref().map(|r| r.name.clone()),
            };
            match mover {
                NetdevMover::Hook(hook) => {
                    edits.hooks.push(netattach_hook(claim, hook, &request)?);
                }
                NetdevMover::Cdi => edits.net_devices.push(NetDevice {
                    host_interface_name: request.host_name,
                    name: request.pod_name,
                }),
            }
        }
        push_device(
            &kind,
            claim,
            allocated,
            edits,
            &mut cdi_devices,
            &mut recorded,
        );
    }
    // The topology mount goes on every device rather than on the spec: CDI rejects a device
    // with empty edits (a plain Ethernet NIC has no device node), and runtimes replace a mount
    // of the same container path, so repeating it costs nothing.
    let topology_mount = Mount {
        host_path: path_string(claim, "topology file", ctx.topology_host_path)?,
        container_path: CONTAINER_TOPOLOGY_FILE.to_string(),
        options: ["ro", "nosuid", "nodev", "bind"].map(String::from).to_vec(),
    };
    for device in &mut cdi_devices {
        device.container_edits.mounts.push(topology_mount.clone());
    }
    let mut claim_edits = ContainerEdits {
        env: claim_env(flavour, &topology),
        ..ContainerEdits::default()
    };
    claim_edits.env.extend(super::env::tpu_env(&tpu_chips(
        ctx.inventory,
        &accelerators,
    )));
    if ctx.nvidia_legacy_env {
        let uuids: Vec<&str> = accelerators
            .iter()
            .filter(|(_, a)| a.kind == AcceleratorKind::NvidiaGpu && !a.vfio)
            .filter_map(|(_, a)| a.uuid.as_deref())
            .collect();
        if !uuids.is_empty() {
            claim_edits
                .env
                .push(format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")));
        }
    }
    for nic in &shared_nics {
        let name = nic_device_name(&nic.pci.address);
        let shared_allocated = AllocatedDevice {
            requests: Vec::new(),
            pool: String::new(),
            device: name,
            share_id: None,
            admin_access: false,
        };
        let edits = nic_edits(ctx, claim, &shared_allocated, nic, true)?;
        for node in edits.device_nodes {
            push_node(&mut claim_edits.device_nodes, node);
        }
    }
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

/// Google's PCI vendor ID: its class 0x12 functions are TPU chips.
const VENDOR_GOOGLE: u16 = 0x1ae0;

fn is_tpu(a: &Accelerator) -> bool {
    a.kind == AcceleratorKind::ProcessingAccelerator && a.pci.vendor_id == VENDOR_GOOGLE
}

/// Host chip indices of the claim's TPUs, as libtpu numbers them: the `accel<N>` number of a
/// chip with an accel node, else the chip's place among the node's TPUs in PCI bus order
/// (the order `/dev/vfio` groups and accel nodes are created in).
fn tpu_chips(inventory: &Inventory, accelerators: &[(&AllocatedDevice, &Accelerator)]) -> Vec<u32> {
    let mut host: Vec<&Accelerator> = inventory
        .accelerators
        .iter()
        .filter(|a| is_tpu(a))
        .collect();
    host.sort_by_key(|a| a.pci.address);
    let mut chips: Vec<u32> = accelerators
        .iter()
        .filter(|(_, a)| is_tpu(a))
        .filter_map(|(_, a)| {
            let accel = a.char_devices.iter().find_map(|c| {
                c.path
                    .strip_prefix("accel/accel")
                    .and_then(|n| n.parse::<u32>().ok())
            });
            accel.or_else(|| {
                host.iter()
                    .position(|h| h.pci.address == a.pci.address)
                    .and_then(|i| u32::try_from(i).ok())
            })
        })
        .collect();
    chips.sort_unstable();
    chips
}

/// The in-pod names of the claim's exclusively attached NICs: a request's `interfaceName`
/// (with an index when the request holds several NICs), else `rdma0`, `rdma1`, ... in pairing
/// order (the NIC of the first GPU first), then the unpaired ones by PCI address.
fn exclusive_pod_names(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    per_request: &BTreeMap<String, config::RequestConfig>,
    nics: &[(&AllocatedDevice, &Nic)],
    pairing: &crate::topology::pairing::Pairing,
) -> Result<BTreeMap<PciAddress, String>, PrepareError> {
    let mover_configured = ctx.netdev_mover.is_some();
    // The config deciding each NIC: its first request that asks for exclusive.
    let exclusive: BTreeMap<PciAddress, &config::RequestConfig> = nics
        .iter()
        .filter(|(_, nic)| nic.if_name().is_some())
        .filter_map(|(allocated, nic)| {
            allocated
                .requests
                .iter()
                .filter_map(|r| per_request.get(r))
                .find(|c| c.exclusive_for_claimed_nic(mover_configured))
                .map(|c| (nic.pci.address, c))
        })
        .collect();
    let mut ordered: Vec<PciAddress> = Vec::new();
    let paired = pairing.pairs.iter().map(|p| p.nic);
    for address in paired
        .chain(pairing.unpaired_nics.iter().copied())
        .chain(exclusive.keys().copied())
    {
        if exclusive.contains_key(&address) && !ordered.contains(&address) {
            ordered.push(address);
        }
    }
    let mut per_name: BTreeMap<&str, usize> = BTreeMap::new();
    for config in exclusive.values() {
        if let Some(name) = config.interface_name.as_deref() {
            *per_name.entry(name).or_default() += 1;
        }
    }
    let mut seen_of_name: BTreeMap<&str, usize> = BTreeMap::new();
    let mut default_index = 0;
    let mut names = BTreeMap::new();
    for address in ordered {
        let name = match exclusive
            .get(&address)
            .and_then(|c| c.interface_name.as_deref())
        {
            Some(name) if per_name.get(name).copied().unwrap_or(0) == 1 => name.to_string(),
            Some(name) => {
                let seen = seen_of_name.entry(name).or_default();
                *seen += 1;
                format!("{name}{}", *seen - 1)
            }
            None => {
                default_index += 1;
                crate::netattach::default_pod_name(default_index - 1)
            }
        };
        if names.values().any(|n| n == &name) {
            return Err(PrepareError::ConflictingConfig {
                claim: claim.to_string(),
                reason: format!(
                    "two exclusively attached NICs would both be called {name:?} in the pod; give the requests distinct interfaceName values"
                ),
            });
        }
        names.insert(address, name);
    }
    Ok(names)
}

fn netattach_hook(
    claim: &ClaimRef,
    hook: NetattachHook<'_>,
    request: &InterfaceRequest,
) -> Result<Hook, PrepareError> {
    let mut args = vec![
        "tandem".to_string(),
        "hook".into(),
        "attach".into(),
        "--claim-uid".into(),
        claim.uid.clone(),
        "--state-dir".into(),
        path_string(claim, "state directory", hook.state_dir)?,
    ];
    if let Some(node_ip) = hook.node_ip {
        args.extend(["--node-ip".to_string(), node_ip.to_string()]);
    }
    args.extend(["--interface".to_string(), request.to_arg()]);
    Ok(Hook {
        hook_name: "createRuntime".to_string(),
        path: path_string(claim, "netattach hook", hook.path)?,
        args: args.to_vec(),
        timeout: Some(NETATTACH_HOOK_TIMEOUT_SECONDS),
    })
}

/// One env flavour per claim: the environment is claim-wide, so requests that ask for
/// different flavours contradict each other.
fn claim_flavour(
    claim: &ClaimRef,
    per_request: &BTreeMap<String, config::RequestConfig>,
) -> Result<EnvFlavour, PrepareError> {
    let mut chosen: Option<(&str, EnvFlavour)> = None;
    for (request, config) in per_request {
        match chosen {
            None => chosen = Some((request, config.env)),
            Some((first, env)) if env != config.env => {
                return Err(PrepareError::ConflictingConfig {
                    claim: claim.to_string(),
                    reason: format!(
                        "request {first:?} asks for env {env:?} but request {request:?} for {:?}; \
                         the environment is claim-wide",
                        config.env
                    ),
                });
            }
            Some(_) => {}
        }
    }
    Ok(chosen.map(|(_, env)| env).unwrap_or_default())
}

/// Pairs the claim's GPUs with the NICs the node-wide pairing gives them, for GPUs whose
/// request asked for shared attach. A NIC that is unhealthy is left out with a reason rather
/// than failing the claim: the GPUs are usable without it.
fn shared_pairing<'a>(
    inventory: &'a Inventory,
    accelerators: &[&PciFunction],
    wants_shared: &BTreeSet<PciAddress>,
    shared_nics: &mut Vec<&'a Nic>,
) -> crate::topology::Pairing {
    let node = pair_node(inventory);
    let mut pairing = crate::topology::Pairing::default();
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

fn push_device(
    kind: &str,
    claim: &ClaimRef,
    allocated: &AllocatedDevice,
    edits: ContainerEdits,
    cdi_devices: &mut Vec<CdiDevice>,
    recorded: &mut Vec<RecordedDevice>,
) {
    let name = cdi::device_name(&claim.uid, &allocated.device);
    recorded.push(RecordedDevice {
        device: PreparedDevice {
            request_names: allocated.base_request_names(),
            pool_name: allocated.pool.clone(),
            device_name: allocated.device.clone(),
            cdi_device_ids: vec![cdi::qualified_name(kind, &name)],
            share_id: allocated.share_id.clone(),
        },
        admin_access: allocated.admin_access,
    });
    cdi_devices.push(CdiDevice {
        name,
        container_edits: edits,
    });
}

fn accelerator_edits(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    allocated: &AllocatedDevice,
    accelerator: &Accelerator,
) -> Result<ContainerEdits, PrepareError> {
    let shared: &[&str] = if accelerator.vfio {
        VFIO_SHARED_NODES
    } else {
        match accelerator.kind {
            AcceleratorKind::NvidiaGpu => NVIDIA_SHARED_NODES,
            AcceleratorKind::AmdGpu => AMD_SHARED_NODES,
            AcceleratorKind::ProcessingAccelerator => &[],
        }
    };
    let own = accelerator.char_devices.iter();
    let host = host_nodes(ctx.inventory, shared);
    char_device_edits(ctx, claim, allocated, own.chain(host))
}

/// The device nodes of `char_devices` (each path once) as one device's container edits.
fn char_device_edits<'a>(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    allocated: &AllocatedDevice,
    char_devices: impl Iterator<Item = &'a CharDevice>,
) -> Result<ContainerEdits, PrepareError> {
    let mut nodes = Vec::new();
    for char_device in char_devices {
        push_node(
            &mut nodes,
            device_node(ctx, claim, &allocated.device, char_device)?,
        );
    }
    Ok(ContainerEdits {
        device_nodes: nodes,
        ..ContainerEdits::default()
    })
}

fn nic_edits(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    allocated: &AllocatedDevice,
    nic: &Nic,
    shared: bool,
) -> Result<ContainerEdits, PrepareError> {
    let Some(rdma) = nic.rdma.as_ref() else {
        // A plain Ethernet NIC has no char device; its netdev stays on the host.
        return Ok(ContainerEdits::default());
    };
    let own = rdma
        .char_devices
        .iter()
        .filter(|c| !shared || c.path.starts_with(SHARED_NIC_NODE_PREFIX));
    let host = host_nodes(ctx.inventory, &[RDMA_CM_NODE]);
    char_device_edits(ctx, claim, allocated, own.chain(host))
}

fn host_nodes<'a>(
    inventory: &'a Inventory,
    names: &'a [&str],
) -> impl Iterator<Item = &'a CharDevice> {
    inventory
        .host
        .shared_char_devices
        .iter()
        .filter(move |c| names.contains(&c.path.as_str()))
}

fn push_node(nodes: &mut Vec<DeviceNode>, node: DeviceNode) {
    if !nodes.iter().any(|n| n.path == node.path) {
        nodes.push(node);
    }
}

/// A CDI device node for a char device of the inventory. The numbers come from sysfs (never a
/// stat of /dev, which may be a different mount namespace); the path must stay below the dev
/// root whatever the inventory says.
fn device_node(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    device: &str,
    char_device: &CharDevice,
) -> Result<DeviceNode, PrepareError> {
    let relative = Path::new(&char_device.path);
    let plain = !char_device.path.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    let bad = || PrepareError::BadDeviceNodePath {
        claim: claim.to_string(),
        device: device.to_string(),
        path: char_device.path.clone(),
    };
    if !plain {
        return Err(bad());
    }
    let path = ctx.dev_root_in_container.join(relative);
    let path = path.to_str().ok_or_else(bad)?.to_string();
    Ok(DeviceNode::char_device(
        path,
        char_device.major,
        char_device.minor,
    ))
}

fn path_string(claim: &ClaimRef, what: &str, path: &Path) -> Result<String, PrepareError> {
    path.to_str()
        .map(String::from)
        .ok_or_else(|| PrepareError::Io {
            claim: claim.to_string(),
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} path is not UTF-8"),
            ),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1::{
        DeviceAllocationConfiguration, OpaqueDeviceConfiguration,
    };
    use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
    use std::path::PathBuf;

    fn inventory() -> (tempfile::TempDir, Inventory) {
        let dir = tempfile::tempdir().unwrap();
        let desc = crate::fixture::builtin("dgx-h100").unwrap();
        let roots = crate::fixture::write_machine(&desc, dir.path()).unwrap();
        let inventory = crate::sysfs::discover(&roots).unwrap();
        (dir, inventory)
    }

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: "ml".into(),
            name: format!("claim-{uid}"),
            uid: uid.into(),
        }
    }

    fn allocated(request: &str, device: &str) -> AllocatedDevice {
        AllocatedDevice {
            requests: vec![request.into()],
            pool: "node-a".into(),
            device: device.into(),
            share_id: None,
            admin_access: false,
        }
    }

    fn plan(
        inventory: &Inventory,
        uid: &str,
        allocation: &OurAllocation,
        holders: &DeviceHolders,
    ) -> Result<ClaimPlan, PrepareError> {
        let topology = PathBuf::from("/var/lib/tandem/claims/u/topology.json");
        let ctx = PlanContext {
            driver_name: "tandem.dev",
            dev_root_in_container: Path::new("/dev"),
            topology_host_path: &topology,
            inventory,
            netdev_mover: None,
            vendor: None,
            driver_root: None,
            nvidia_legacy_env: false,
        };
        plan_claim(&ctx, &claim(uid), allocation, holders)
    }

    fn recorded(device: &AllocatedDevice) -> RecordedDevice {
        RecordedDevice {
            device: PreparedDevice {
                request_names: device.base_request_names(),
                pool_name: device.pool.clone(),
                device_name: device.device.clone(),
                cdi_device_ids: Vec::new(),
                share_id: device.share_id.clone(),
            },
            admin_access: device.admin_access,
        }
    }

    #[test]
    fn exclusive_holds_conflict_shares_and_admin_access_do_not() {
        let (_dir, inventory) = inventory();
        let gpu = "gpu-0000-1b-00-0";
        let exclusive = allocated("gpus", gpu);
        let shared = AllocatedDevice {
            share_id: Some("s1".into()),
            ..allocated("gpus", gpu)
        };
        let admin = AllocatedDevice {
            admin_access: true,
            ..allocated("gpus", gpu)
        };
        let only = |d: &AllocatedDevice| OurAllocation {
            devices: vec![d.clone()],
            config: Vec::new(),
        };
        let held_by = |d: &AllocatedDevice| {
            let mut holders = DeviceHolders::default();
            holders.add(&claim("first"), &[recorded(d)]);
            holders
        };
        let in_use =
            |r: Result<ClaimPlan, PrepareError>| matches!(r, Err(PrepareError::DeviceInUse { .. }));
        assert!(in_use(plan(
            &inventory,
            "second",
            &only(&exclusive),
            &held_by(&exclusive)
        )));
        assert!(in_use(plan(
            &inventory,
            "second",
            &only(&shared),
            &held_by(&exclusive)
        )));
        assert!(in_use(plan(
            &inventory,
            "second",
            &only(&exclusive),
            &held_by(&shared)
        )));
        assert!(plan(&inventory, "second", &only(&shared), &held_by(&shared)).is_ok());
        assert!(plan(&inventory, "second", &only(&admin), &held_by(&exclusive)).is_ok());
        assert!(plan(&inventory, "second", &only(&exclusive), &held_by(&admin)).is_ok());
        // A claim never conflicts with its own earlier record (re-prepare after a reboot).
        assert!(plan(&inventory, "first", &only(&exclusive), &held_by(&exclusive)).is_ok());
    }

    #[test]
    fn inventory_device_paths_that_leave_the_dev_root_are_refused() {
        let (_dir, mut inventory) = inventory();
        inventory.accelerators[0].char_devices[0].path = "../sda".into();
        let allocation = OurAllocation {
            devices: vec![allocated("gpus", "gpu-0000-1b-00-0")],
            config: Vec::new(),
        };
        let e = plan(&inventory, "u", &allocation, &DeviceHolders::default()).unwrap_err();
        assert!(matches!(e, PrepareError::BadDeviceNodePath { .. }), "{e}");
        assert!(e.to_string().contains("gpu-0000-1b-00-0"), "{e}");
    }

    #[test]
    fn requests_asking_for_different_env_flavours_conflict() {
        let (_dir, inventory) = inventory();
        let env = |request: &str, flavour: &str| DeviceAllocationConfiguration {
            source: "FromClaim".into(),
            requests: Some(vec![request.into()]),
            opaque: Some(OpaqueDeviceConfiguration {
                driver: "tandem.dev".into(),
                parameters: RawExtension(serde_json::json!({
                    "apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig", "env": flavour
                })),
            }),
        };
        let allocation = OurAllocation {
            devices: vec![
                allocated("gpus", "gpu-0000-1b-00-0"),
                allocated("nics", "nic-0000-18-00-0"),
            ],
            config: vec![env("gpus", "nccl"), env("nics", "ucx")],
        };
        let e = plan(&inventory, "u", &allocation, &DeviceHolders::default()).unwrap_err();
        assert!(matches!(e, PrepareError::ConflictingConfig { .. }), "{e}");
    }

    #[test]
    fn admin_access_reaches_an_unhealthy_device() {
        let (_dir, mut inventory) = inventory();
        inventory.accelerators[0].pci.aer_fatal = Some(2);
        let mut device = allocated("gpus", "gpu-0000-1b-00-0");
        let allocation = |d: &AllocatedDevice| OurAllocation {
            devices: vec![d.clone()],
            config: Vec::new(),
        };
        let e = plan(
            &inventory,
            "u",
            &allocation(&device),
            &DeviceHolders::default(),
        )
        .unwrap_err();
        assert!(matches!(e, PrepareError::DeviceUnhealthy { .. }), "{e}");
        device.admin_access = true;
        assert!(
            plan(
                &inventory,
                "u",
                &allocation(&device),
                &DeviceHolders::default()
            )
            .is_ok()
        );
    }

    fn plan_with_mover(
        inventory: &Inventory,
        allocation: &OurAllocation,
        mover: NetdevMover<'_>,
    ) -> Result<ClaimPlan, PrepareError> {
        let topology = PathBuf::from("/var/lib/tandem/claims/u/topology.json");
        let ctx = PlanContext {
            driver_name: "tandem.dev",
            dev_root_in_container: Path::new("/dev"),
            topology_host_path: &topology,
            inventory,
            netdev_mover: Some(mover),
            vendor: None,
            driver_root: None,
            nvidia_legacy_env: false,
        };
        plan_claim(&ctx, &claim("u"), allocation, &DeviceHolders::default())
    }

    fn plan_with_hook(
        inventory: &Inventory,
        allocation: &OurAllocation,
    ) -> Result<ClaimPlan, PrepareError> {
        plan_with_mover(
            inventory,
            allocation,
            NetdevMover::Hook(NetattachHook {
                path: Path::new("/opt/tandem/bin/tandem"),
                state_dir: Path::new("/var/lib/tandem"),
                node_ip: Some("192.0.2.10".parse().unwrap()),
            }),
        )
    }

    fn claim_config(requests: &[&str], fields: serde_json::Value) -> DeviceAllocationConfiguration {
        let mut parameters = serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "ClaimConfig",
        });
        for (k, v) in fields.as_object().unwrap() {
            parameters[k] = v.clone();
        }
        DeviceAllocationConfiguration {
            source: "FromClaim".into(),
            requests: Some(requests.iter().map(|r| r.to_string()).collect()),
            opaque: Some(k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration {
                driver: "tandem.dev".into(),
                parameters: k8s_openapi::apimachinery::pkg::runtime::RawExtension(parameters),
            }),
        }
    }

    /// The GPU, the NIC paired with it and another NIC with a netdev.
    fn gpu_and_two_nics(inventory: &Inventory) -> (&Accelerator, &Nic, &Nic) {
        let gpu = &inventory.accelerators[0];
        let paired = crate::topology::pair_devices(
            &[&gpu.pci],
            &inventory.nics.iter().map(|n| &n.pci).collect::<Vec<_>>(),
        );
        let first_nic = inventory
            .nics
            .iter()
            .find(|n| n.pci.address == paired.pairs[0].nic)
            .unwrap();
        let other_nic = inventory
            .nics
            .iter()
            .find(|n| n.pci.address != first_nic.pci.address && n.if_name().is_some())
            .unwrap();
        (gpu, first_nic, other_nic)
    }

    fn nic_hooks(plan: &ClaimPlan) -> Vec<(String, Vec<String>)> {
        plan.spec
            .as_ref()
            .unwrap()
            .devices
            .iter()
            .flat_map(|d| {
                d.container_edits
                    .hooks
                    .iter()
                    .map(|h| (h.hook_name.clone(), h.args.clone()))
            })
            .collect()
    }

    #[test]
    fn exclusive_nics_get_the_attach_hook_in_pairing_order_unless_config_says_none() {
        let (_dir, inventory) = inventory();
        let (gpu, first_nic, other_nic) = gpu_and_two_nics(&inventory);
        let allocation = OurAllocation {
            devices: vec![
                allocated("gpus", &accelerator_device_name(&gpu.pci.address)),
                allocated("nics", &nic_device_name(&other_nic.pci.address)),
                allocated("nics", &nic_device_name(&first_nic.pci.address)),
            ],
            config: Vec::new(),
        };
        let hooks = nic_hooks(&plan_with_hook(&inventory, &allocation).unwrap());
        assert_eq!(hooks.len(), 2, "{hooks:?}");
        let first_if = first_nic.if_name().unwrap();
        let other_if = other_nic.if_name().unwrap();
        for (name, args) in &hooks {
            assert_eq!(name, "createRuntime");
            assert_eq!(&args[..5], ["tandem", "hook", "attach", "--claim-uid", "u"]);
            assert!(args.contains(&"/var/lib/tandem".to_string()), "{args:?}");
            assert!(
                args.windows(2).any(|w| w == ["--node-ip", "192.0.2.10"]),
                "{args:?}"
            );
        }
        let interfaces: Vec<InterfaceRequest> = hooks
            .iter()
            .map(|(_, a)| a.last().unwrap().parse().unwrap())
            .collect();
        let expect = |nic: &Nic, host: &str, pod: &str| InterfaceRequest {
            host_name: host.to_string(),
            pod_name: pod.to_string(),
            pci_address: Some(nic.pci.address.to_string()),
            rdma_device: nic.rdma.as_ref().map(|r| r.name.clone()),
        };
        assert!(
            interfaces.contains(&expect(first_nic, first_if, "rdma0")),
            "{interfaces:?}"
        );
        assert!(
            interfaces.contains(&expect(other_nic, other_if, "rdma1")),
            "{interfaces:?}"
        );

        // No hook path: the behaviour before netattach, nothing moves.
        assert!(
            nic_hooks(&plan(&inventory, "u", &allocation, &DeviceHolders::default()).unwrap())
                .is_empty()
        );

        // An explicit `none` keeps the netdevs on the host even with the hook configured.
        let mut with_none = allocation.clone();
        with_none.config = vec![
            k8s_openapi::api::resource::v1::DeviceAllocationConfiguration {
                source: "FromClaim".into(),
                requests: Some(vec!["nics".into()]),
                opaque: Some(k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration {
                    driver: "tandem.dev".into(),
                    parameters: k8s_openapi::apimachinery::pkg::runtime::RawExtension(
                        serde_json::json!({
                            "apiVersion": "tandem.dev/v1alpha1",
                            "kind": "ClaimConfig",
                            "nicAttach": "none"
                        }),
                    ),
                }),
            },
        ];
        assert!(nic_hooks(&plan_with_hook(&inventory, &with_none).unwrap()).is_empty());

        // An explicit `exclusive` on a node without the hook is refused, naming the request,
        // rather than quietly handing out the NIC without its netdev.
        let mut with_exclusive = with_none.clone();
        if let Some(opaque) = with_exclusive.config[0].opaque.as_mut() {
            opaque.parameters.0["nicAttach"] = "exclusive".into();
        }
        let refused = plan(&inventory, "u", &with_exclusive, &DeviceHolders::default())
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("\"nics\"") && refused.contains("--hook-path"),
            "{refused}"
        );
        assert_eq!(
            nic_hooks(&plan_with_hook(&inventory, &with_exclusive).unwrap()).len(),
            2
        );
    }

    #[test]
    fn interface_names_come_from_config_and_clash_is_refused() {
        let (_dir, inventory) = inventory();
        let (gpu, first_nic, other_nic) = gpu_and_two_nics(&inventory);
        let pod_names = |allocation: &OurAllocation| -> Result<Vec<String>, PrepareError> {
            let plan = plan_with_hook(&inventory, allocation)?;
            let mut names: Vec<String> = nic_hooks(&plan)
                .iter()
                .map(|(_, a)| {
                    a.last()
                        .unwrap()
                        .parse::<InterfaceRequest>()
                        .unwrap()
                        .pod_name
                })
                .collect();
            names.sort();
            Ok(names)
        };
        let mut allocation = OurAllocation {
            devices: vec![
                allocated("gpus", &accelerator_device_name(&gpu.pci.address)),
                allocated("fast", &nic_device_name(&first_nic.pci.address)),
                allocated("slow", &nic_device_name(&other_nic.pci.address)),
            ],
            config: vec![claim_config(
                &["fast"],
                serde_json::json!({"interfaceName": "net1"}),
            )],
        };
        // The named request gets its name; the other keeps the default sequence.
        assert_eq!(pod_names(&allocation).unwrap(), ["net1", "rdma0"]);
        // One name for a request with several NICs: an index is appended.
        allocation.devices[2].requests = vec!["fast".into()];
        assert_eq!(pod_names(&allocation).unwrap(), ["net10", "net11"]);
        // A name that collides with the default of another NIC is refused, naming the clash.
        allocation.devices[2].requests = vec!["slow".into()];
        allocation.config = vec![claim_config(
            &["fast"],
            serde_json::json!({"interfaceName": "rdma0"}),
        )];
        let refused = pod_names(&allocation).unwrap_err().to_string();
        assert!(refused.contains("\"rdma0\""), "{refused}");
        // Names that cannot be interface names never reach a hook.
        allocation.config = vec![claim_config(
            &["fast"],
            serde_json::json!({"interfaceName": "a/b"}),
        )];
        assert!(plan_with_hook(&inventory, &allocation).is_err());
    }

    /// A GKE TPU v5e host (ct5lp-hightpu-4t shape): four chips on one root complex, the
    /// first two with accel nodes (`accel1`, `accel0`: numbered by the driver, not by bus),
    /// the last two bound to vfio-pci.
    fn tpu_host() -> (tempfile::TempDir, Inventory) {
        let mut desc = crate::fixture::builtin("gpu-only").unwrap();
        let template = desc
            .devices
            .iter()
            .find(|d| matches!(d.kind, crate::fixture::DeviceKind::Accelerator(_)))
            .unwrap()
            .clone();
        desc.name = "tpu-v5e".into();
        desc.devices = (0..4u8)
            .map(|i| {
                let mut chip = template.clone();
                chip.path = format!("0000:00:{:02x}.0", 4 + i);
                chip.id = crate::fixture::PciId::new(VENDOR_GOOGLE, 0x0063);
                chip.class = 0x120000;
                chip.numa = Some(0);
                chip.kind =
                    crate::fixture::DeviceKind::Accelerator(crate::fixture::AcceleratorSpec {
                        driver: "google-tpu".into(),
                        index: Some(u32::from(i)),
                    });
                if i >= 2 {
                    chip.overrides.driver = Some(crate::fixture::VFIO_DRIVER.into());
                    chip.overrides.iommu_group = Some(10 + u32::from(i));
                }
                chip
            })
            .collect();
        // accel1 for the first chip, accel0 for the second.
        for (i, chip) in desc.devices.iter_mut().enumerate().take(2) {
            chip.kind = crate::fixture::DeviceKind::Accelerator(crate::fixture::AcceleratorSpec {
                driver: "google-tpu".into(),
                index: Some(1 - i as u32),
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let roots = crate::fixture::write_machine(&desc, dir.path()).unwrap();
        (dir, crate::sysfs::discover(&roots).unwrap())
    }

    #[test]
    fn tpu_claims_get_their_chip_nodes_and_gke_tpu_env() {
        let (_dir, tpus) = tpu_host();
        assert!(tpus.problems.is_empty(), "{:?}", tpus.problems);
        let names: Vec<String> = tpus
            .accelerators
            .iter()
            .map(|a| accelerator_device_name(&a.pci.address))
            .collect();
        let claim_of = |picked: &[usize]| {
            let allocation = OurAllocation {
                devices: picked
                    .iter()
                    .map(|&i| allocated("tpus", &names[i]))
                    .collect(),
                config: Vec::new(),
            };
            plan(&tpus, "u", &allocation, &DeviceHolders::default())
                .unwrap()
                .spec
                .unwrap()
        };
        let env_of = |spec: &CdiSpec| -> Vec<String> {
            spec.container_edits
                .env
                .iter()
                .filter(|e| e.starts_with("TPU_"))
                .cloned()
                .collect()
        };
        let nodes_of = |spec: &CdiSpec| -> Vec<String> {
            let mut nodes: Vec<String> = spec
                .devices
                .iter()
                .flat_map(|d| {
                    d.container_edits
                        .device_nodes
                        .iter()
                        .map(|n| n.path.clone())
                })
                .collect();
            nodes.sort();
            nodes
        };
        // The first chip by bus order carries accel1: its chip index is 1.
        let first = claim_of(&[0]);
        assert_eq!(nodes_of(&first), ["/dev/accel/accel1"]);
        assert_eq!(
            env_of(&first),
            [
                "TPU_VISIBLE_CHIPS=1",
                "TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1",
                "TPU_PROCESS_BOUNDS=1,1,1"
            ]
        );
        // The two vfio chips: their groups, chips 2 and 3.
        let vfio = claim_of(&[2, 3]);
        assert_eq!(nodes_of(&vfio), ["/dev/vfio/12", "/dev/vfio/13"]);
        assert_eq!(env_of(&vfio)[0], "TPU_VISIBLE_CHIPS=2,3");
        assert_eq!(env_of(&vfio)[1], "TPU_CHIPS_PER_PROCESS_BOUNDS=1,2,1");
        let all = claim_of(&[0, 1, 2, 3]);
        assert_eq!(env_of(&all)[0], "TPU_VISIBLE_CHIPS=0,1,2,3");
        assert_eq!(env_of(&all)[1], "TPU_CHIPS_PER_PROCESS_BOUNDS=2,2,1");
        // GPUs get no TPU env.
        let (_d, dgx) = inventory();
        let gpu = OurAllocation {
            devices: vec![allocated("gpus", "gpu-0000-1b-00-0")],
            config: Vec::new(),
        };
        let spec = plan(&dgx, "u", &gpu, &DeviceHolders::default())
            .unwrap()
            .spec
            .unwrap();
        assert!(env_of(&spec).is_empty());
    }

    #[test]
    fn cdi_mode_emits_net_devices_instead_of_the_hook() {
        let (_dir, inventory) = inventory();
        let (gpu, first_nic, _) = gpu_and_two_nics(&inventory);
        let allocation = OurAllocation {
            devices: vec![
                allocated("gpus", &accelerator_device_name(&gpu.pci.address)),
                allocated("nics", &nic_device_name(&first_nic.pci.address)),
            ],
            config: Vec::new(),
        };
        let plan = plan_with_mover(&inventory, &allocation, NetdevMover::Cdi).unwrap();
        assert!(nic_hooks(&plan).is_empty());
        let spec = plan.spec.unwrap();
        let net_devices: Vec<&NetDevice> = spec
            .devices
            .iter()
            .flat_map(|d| &d.container_edits.net_devices)
            .collect();
        assert_eq!(
            net_devices,
            [&NetDevice {
                host_interface_name: first_nic.if_name().unwrap().to_string(),
                name: "rdma0".into(),
            }]
        );
        assert_eq!(spec.cdi_version, "1.1.0");
    }
}
