//! The CDI edits that move an exclusively attached NIC's netdev into the pod (the
//! `tandem hook attach` OCI hook, or CDI `netDevices`) and the netdev's name in the pod.

use super::edits::path_string;
use super::{Nics, PerRequest, PlanContext, PrepareError};
use crate::netattach::record::InterfaceRequest;
use crate::prepare::cdi::{ContainerEdits, Hook, NetDevice};
use crate::prepare::config::{self, NicAttach};
use crate::topology::{Nic, PciAddress};
use std::collections::BTreeMap;
use std::path::Path;
use tandem_kubelet_plugin::claim::{AllocatedDevice, ClaimRef};

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

/// Asking for `exclusive` on a node that cannot move netdevs is refused rather than quietly
/// downgraded: the pod would start without the interface it asked for.
pub(super) fn refuse_unmovable_exclusive(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    per_request: &PerRequest,
    nics: &Nics<'_>,
) -> Result<(), PrepareError> {
    if ctx.netdev_mover.is_none() && !nics.is_empty() {
        let asked = per_request
            .iter()
            .find(|(_, c)| c.nic_attach_set && c.nic_attach == NicAttach::Exclusive);
        if let Some((request, _)) = asked {
            return Err(PrepareError::ConflictingConfig {
                claim: claim.to_string(),
                reason: format!(
                    "request {request:?} asks for nicAttach \"exclusive\", but this node's plugin has no --hook-path (nor --netdev-attach=cdi) to move network interfaces with"
                ),
            });
        }
    }
    Ok(())
}

/// Adds the edit that moves `nic`'s netdev into the pod as `pod_name`, when the node has a
/// mover and the NIC is exclusively attached (has a pod name) and has a netdev.
pub(super) fn add_netdev_move(
    ctx: &PlanContext<'_>,
    claim: &ClaimRef,
    nic: &Nic,
    pod_name: Option<&String>,
    edits: &mut ContainerEdits,
) -> Result<(), PrepareError> {
    let (Some(mover), Some(pod_name), Some(host_name)) =
        (ctx.netdev_mover, pod_name, nic.if_name())
    else {
        return Ok(());
    };
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
    Ok(())
}
/// The in-pod names of the claim's exclusively attached NICs: a request's `interfaceName`
/// (with an index when the request holds several NICs), else `rdma0`, `rdma1`, ... in pairing
/// order (the NIC of the first GPU first), then the unpaired ones by PCI address.
pub(super) fn exclusive_pod_names(
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
