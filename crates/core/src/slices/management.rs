//! The node's IP networks as the builder sees them, and the management NICs (node IP or
//! default route) that the slices leave out so no pod can take the node's own link away.

use super::SliceOptions;
use crate::names;
use crate::rails::Subnet;
use crate::topology::{Inventory, Nic};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What the node knows about its NICs' IP networks, outside sysfs: the addresses of each
/// netdev (`192.168.1.5/24` as the kernel reports them, read over netlink), which interfaces
/// a default route leaves through, how interfaces stack (bond or bridge ports, VLANs) and the
/// rail ConfigMap's data, when the controller has written one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkFacts {
    /// ifName → addresses with the prefix length the kernel holds for them.
    pub addresses: BTreeMap<String, Vec<String>>,
    /// Interfaces that a main-table default route (IPv4 or IPv6) leaves through.
    pub default_routes: BTreeSet<String>,
    /// ifName → the interfaces stacked directly on it: its bond, team or bridge, and VLANs
    /// or other links made on top of it. A NIC under a bond that holds the node IP carries
    /// the node's traffic as much as one holding it itself.
    pub upper_interfaces: BTreeMap<String, BTreeSet<String>>,
    /// Data of the rail ConfigMap (`tandem.dev/rail`); `None` publishes no rails.
    pub rails: Option<BTreeMap<String, String>>,
}

impl NetworkFacts {
    /// Facts that know only interface addresses (`ifName` → `address/prefix` as the kernel
    /// holds them) and, when given, the rail ConfigMap's data: no default routes, nothing
    /// stacked on any interface.
    pub fn from_addresses(addresses: &[(&str, &[&str])], rails: Option<&[(&str, &str)]>) -> Self {
        NetworkFacts {
            default_routes: BTreeSet::new(),
            upper_interfaces: BTreeMap::new(),
            addresses: addresses
                .iter()
                .map(|(name, list)| {
                    (
                        name.to_string(),
                        list.iter().map(|a| a.to_string()).collect(),
                    )
                })
                .collect(),
            rails: rails.map(|r| {
                r.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
        }
    }

    /// The subnet `tandem.dev/subnet` names for `if_name`: the prefix of its first IPv4
    /// address, else of its first global IPv6 address. The prefix length is the kernel's own
    /// (a GKE NIC holding a /32 publishes the /32), so every node of a fabric agrees on it.
    pub fn subnet_of(&self, if_name: &str) -> Option<Subnet> {
        let subnets: Vec<Subnet> = self
            .addresses
            .get(if_name)?
            .iter()
            .filter_map(|text| Subnet::parse(text).ok())
            .filter(|subnet| is_fabric_address(subnet.network()))
            .collect();
        let v4 = subnets.iter().find(|s| s.network().is_ipv4());
        v4.or_else(|| subnets.first()).copied()
    }
}

/// Why a NIC is the node's own link to the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ManagementReason {
    /// `via` (the NIC's netdev, or an interface stacked on it) holds the node IP.
    NodeIp { via: String, ip: IpAddr },
    /// A main-table default route leaves through `via`.
    DefaultRoute { via: String },
}

impl std::fmt::Display for ManagementReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NodeIp { via, ip } => write!(f, "{via} holds the node IP {ip}"),
            Self::DefaultRoute { via } => write!(f, "the default route leaves through {via}"),
        }
    }
}

/// A NIC the builder kept out of the slices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeftOutNic {
    /// The device name it would have had.
    pub device: String,
    pub if_name: Option<String>,
    pub reason: ManagementReason,
}

/// Interfaces stacked on `if_name` at any depth, `if_name` first, then nearest first.
fn interface_and_uppers<'a>(network: &'a NetworkFacts, if_name: &'a str) -> Vec<&'a str> {
    let mut found = vec![if_name];
    let mut next = 0;
    while let Some(current) = found.get(next).copied() {
        next += 1;
        for upper in network.upper_interfaces.get(current).into_iter().flatten() {
            if !found.contains(&upper.as_str()) {
                found.push(upper);
            }
        }
    }
    found
}

fn holds_address(network: &NetworkFacts, if_name: &str, ip: IpAddr) -> bool {
    network
        .addresses
        .get(if_name)
        .into_iter()
        .flatten()
        .filter_map(|text| text.split('/').next()?.parse::<IpAddr>().ok())
        .any(|address| address == ip)
}

pub(super) fn management_reason(
    nic: &Nic,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Option<ManagementReason> {
    for netdev in &nic.netdevs {
        for via in interface_and_uppers(network, &netdev.name) {
            if let Some(ip) = options.node_ip
                && holds_address(network, via, ip)
            {
                return Some(ManagementReason::NodeIp {
                    via: via.to_string(),
                    ip,
                });
            }
            if network.default_routes.contains(via) {
                return Some(ManagementReason::DefaultRoute {
                    via: via.to_string(),
                });
            }
        }
    }
    None
}

/// The NICs that carry the node IP or a default route, which the slices leave out unless
/// `options.publish_management_nics` says otherwise.
pub fn management_nics(
    inventory: &Inventory,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Vec<LeftOutNic> {
    if options.publish_management_nics {
        return Vec::new();
    }
    inventory
        .nics
        .iter()
        .filter_map(|nic| {
            Some(LeftOutNic {
                device: names::nic_device_name(&nic.pci.address),
                if_name: nic.if_name().map(str::to_string),
                reason: management_reason(nic, options, network)?,
            })
        })
        .collect()
}

/// Loopback and link-local addresses say nothing about the fabric a NIC sits on.
fn is_fabric_address(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unicast_link_local()
                && !v6.is_unspecified()
                && !v6.is_multicast()
        }
    }
}
