//! The CDI container edits of each device of a claim: its device nodes (and the shared nodes
//! its kind needs), the vendor device or driver root of a GPU, and the topology file mount.

use super::{PlanContext, PrepareError};
use crate::names::CONTAINER_TOPOLOGY_FILE;
use crate::prepare::cdi::{self, CdiDevice, ContainerEdits, DeviceNode, Mount};
use crate::prepare::{PreparedDevice, RecordedDevice};
use crate::topology::{Accelerator, AcceleratorKind, CharDevice, Inventory, Nic};
use std::path::{Component, Path};
use tandem_kubelet_plugin::claim::{AllocatedDevice, ClaimRef};

/// Shared device nodes (HostInfo) each accelerator kind needs beside its own nodes.
const NVIDIA_SHARED_NODES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];
const AMD_SHARED_NODES: &[&str] = &["kfd"];
const VFIO_SHARED_NODES: &[&str] = &["vfio/vfio"];
const RDMA_CM_NODE: &str = "infiniband/rdma_cm";
/// A NIC attached in shared mode gets its verbs device only: umad and issm are management
/// interfaces (MADs, subnet-manager capability) that a pod sharing the NIC must not hold.
const SHARED_NIC_NODE_PREFIX: &str = "infiniband/uverbs";

/// The claim's CDI devices and, in the same order, the prepared devices recorded for them.
pub(super) struct Devices<'a> {
    kind: &'a str,
    claim: &'a ClaimRef,
    cdi_devices: Vec<CdiDevice>,
    recorded: Vec<RecordedDevice>,
}

impl<'a> Devices<'a> {
    pub(super) fn new(kind: &'a str, claim: &'a ClaimRef) -> Self {
        Self {
            kind,
            claim,
            cdi_devices: Vec::new(),
            recorded: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, allocated: &AllocatedDevice, edits: ContainerEdits) {
        let name = cdi::device_name(&self.claim.uid, &allocated.device);
        self.recorded.push(RecordedDevice {
            device: PreparedDevice {
                request_names: allocated.base_request_names(),
                pool_name: allocated.pool.clone(),
                device_name: allocated.device.clone(),
                cdi_device_ids: vec![cdi::qualified_name(self.kind, &name)],
                share_id: allocated.share_id.clone(),
            },
            admin_access: allocated.admin_access,
        });
        self.cdi_devices.push(CdiDevice {
            name,
            container_edits: edits,
        });
    }

    /// An accelerator's device: its nodes, and either the vendor's CDI device (listed first
    /// among its CDI ids) or the driver root's mounts.
    pub(super) fn push_accelerator(
        &mut self,
        ctx: &PlanContext<'_>,
        allocated: &AllocatedDevice,
        accelerator: &Accelerator,
    ) -> Result<(), PrepareError> {
        let mut edits = accelerator_edits(ctx, self.claim, allocated, accelerator)?;
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
        self.push(allocated, edits);
        if let (Some(id), Some(last)) = (vendor_id, self.recorded.last_mut()) {
            // The runtime applies the vendor's device and its common edits (libraries,
            // hooks) together with ours.
            last.device.cdi_device_ids.insert(0, id);
        }
        Ok(())
    }

    /// The devices with the topology file mounted on each. The mount goes on every device
    /// rather than on the spec: CDI rejects a device with empty edits (a plain Ethernet NIC
    /// has no device node), and runtimes replace a mount of the same container path, so
    /// repeating it costs nothing.
    pub(super) fn with_topology_mount(
        mut self,
        ctx: &PlanContext<'_>,
    ) -> Result<(Vec<CdiDevice>, Vec<RecordedDevice>), PrepareError> {
        let topology_mount = Mount {
            host_path: path_string(self.claim, "topology file", ctx.topology_host_path)?,
            container_path: CONTAINER_TOPOLOGY_FILE.to_string(),
            options: ["ro", "nosuid", "nodev", "bind"].map(String::from).to_vec(),
        };
        for device in &mut self.cdi_devices {
            device.container_edits.mounts.push(topology_mount.clone());
        }
        Ok((self.cdi_devices, self.recorded))
    }
}

/// The verbs device nodes of the NICs a GPU-only claim borrows in shared mode, as claim-wide
/// edits: the NICs are not the claim's devices.
pub(super) fn add_shared_nic_nodes(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    shared_nics: &[&Nic],
    claim_edits: &mut ContainerEdits,
) -> Result<(), PrepareError> {
    for nic in shared_nics {
        let name = crate::names::nic_device_name(&nic.pci.address);
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
    Ok(())
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

pub(super) fn nic_edits(
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

pub(super) fn path_string(
    claim: &ClaimRef,
    what: &str,
    path: &Path,
) -> Result<String, PrepareError> {
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
