//! Exclusive NIC attach: moves a host network interface into a pod's network namespace under
//! a new name with its addresses, MTU, routes (main and per-NIC tables) and policy rules, and
//! brings it back intact on release.
//! Planning and validation are pure; [`netlink`] is the thin rtnetlink shell that acts.

pub mod netlink;
pub mod rdma;
pub mod record;
pub mod status;
#[cfg(test)]
mod tests;
mod validate;

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use netlink::{
    AttachOutcome, Netns, attach, interface_in_netns, move_and_configure, release, snapshot,
};
pub use validate::{
    Guards, check_guards, default_pod_name, is_link_local_v6, validate_ifname, validate_snapshot,
};

/// Upper bound on each netlink request: a container start must fail with a clear message
/// rather than hang when the kernel or a namespace misbehaves.
pub const DEFAULT_NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Linux's IFNAMSIZ minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// What went wrong while attaching or releasing an interface; every variant names the
/// interface and, where one is involved, the namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetAttachError {
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid {what} for interface {ifname}: {reason}")]
    InvalidConfig {
        ifname: String,
        what: String,
        reason: String,
    },
    #[error("cannot open network namespace {path}: {source}")]
    OpenNamespace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {ns}: {source}")]
    EnterNamespace { ns: String, source: nix::Error },
    #[error("cannot start netlink in namespace {ns}: {source}")]
    Connection { ns: String, source: std::io::Error },
    #[error("{what} for interface {ifname} in namespace {ns} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        ifname: String,
        ns: String,
        after: Duration,
    },
    #[error("{what} for interface {ifname} in namespace {ns} failed: {source}")]
    Netlink {
        what: &'static str,
        ifname: String,
        ns: String,
        // Boxed: the netlink error is large and would bloat every Result on the happy path.
        source: Box<rtnetlink::Error>,
    },
    #[error("interface {ifname} not found in namespace {ns}")]
    NotFound { ifname: String, ns: String },
    #[error("refusing to attach interface {ifname}: {reason}")]
    Guarded { ifname: String, reason: String },
    #[error("namespace worker thread for {ns} panicked")]
    WorkerPanicked { ns: String },
}

/// An address as `ip addr` shows it: `10.0.0.1/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// A route through the interface, in the form needed to re-create it elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceRoute {
    pub destination: IpAddr,
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
    /// Routing table id; `None` is the main table (and what records from before per-NIC
    /// tables hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
}

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;
/// The `default` routing table (`RT_TABLE_DEFAULT`), looked up by the last system rule.
pub const DEFAULT_TABLE: u32 = 253;
/// The `local` routing table (`RT_TABLE_LOCAL`): the kernel fills it from the addresses.
pub const LOCAL_TABLE: u32 = 255;

/// The table a route belongs to: the RTA_TABLE attribute where the kernel sent one (tables
/// above 255 exist only there), else the header's 8-bit field.
pub fn route_table(route: &rtnetlink::packet_route::route::RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            rtnetlink::packet_route::route::RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

impl InterfaceRoute {
    /// The table id the kernel sees.
    pub fn table_id(&self) -> u32 {
        self.table.unwrap_or(MAIN_TABLE)
    }
}

/// A network prefix as `ip rule` shows it: `10.1.0.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpPrefix {
    pub address: IpAddr,
    pub prefix_len: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

impl IpFamily {
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv4() {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }
}

/// A policy-routing rule (`ip rule`) that sends traffic to a table: the source-based
/// routing of multi-NIC nodes (`from 10.1.0.2 lookup 101`). Only rules whose selectors all
/// fit here are copied; tos, uid ranges, ip protocol, ports, `not`, suppressors and
/// non-table actions are not, since a rule re-created without one of them would match more
/// traffic than the original.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceRule {
    pub family: IpFamily,
    pub priority: u32,
    pub table: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<IpPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<IpPrefix>,
    /// Input interface name (`iif`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iif: Option<String>,
    /// Output interface name (`oif`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oif: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmask: Option<u32>,
    /// Who installed the rule (`proto static`, ...; `None` is unspec). Copied because the
    /// kernel counts it when deciding whether a rule already exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
}

impl InterfaceRule {
    /// Whether the rule is about `host_name`: it names the interface as iif/oif, or it
    /// sends traffic to one of `tables` (the interface's own non-main tables). A rule that
    /// names any other interface is not, since inside the pod that name would mean
    /// something else (or nothing).
    pub fn belongs_to(&self, host_name: &str, tables: &[u32]) -> bool {
        let names: Vec<&str> = [self.iif.as_deref(), self.oif.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        if names.iter().any(|n| *n != host_name) {
            return false;
        }
        !names.is_empty() || tables.contains(&self.table)
    }

    /// The same rule with `host_name` as iif/oif replaced by `pod_name`.
    pub fn renamed(&self, host_name: &str, pod_name: &str) -> Self {
        let rename = |name: &Option<String>| {
            name.as_ref().map(|n| {
                if n == host_name {
                    pod_name.to_string()
                } else {
                    n.clone()
                }
            })
        };
        Self {
            iif: rename(&self.iif),
            oif: rename(&self.oif),
            ..self.clone()
        }
    }
}

/// Everything about a host interface that a namespace move flushes and release restores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceSnapshot {
    /// The name on the host; release renames it back to this.
    pub host_name: String,
    pub mtu: u32,
    /// Colon-separated hardware address; finds the device when a destroyed pod namespace has
    /// returned it to the host under another name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    pub addresses: Vec<InterfaceAddress>,
    pub routes: Vec<InterfaceRoute>,
    /// Policy rules that steer traffic into the interface's tables or name it; the kernel
    /// keeps them on the host when the link leaves, the pod gets copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<InterfaceRule>,
    pub was_up: bool,
}

impl InterfaceSnapshot {
    /// The non-main tables the interface's routes live in: the rules that point to them
    /// belong to the interface.
    pub fn own_tables(&self) -> Vec<u32> {
        let mut tables: Vec<u32> = self
            .routes
            .iter()
            .map(InterfaceRoute::table_id)
            .filter(|t| ![MAIN_TABLE, DEFAULT_TABLE, LOCAL_TABLE].contains(t))
            .collect();
        tables.sort_unstable();
        tables.dedup();
        tables
    }

    /// The rules as they must read inside the pod, where the interface is `pod_name`.
    pub fn pod_rules(&self, pod_name: &str) -> Vec<InterfaceRule> {
        self.rules
            .iter()
            .map(|r| r.renamed(&self.host_name, pod_name))
            .collect()
    }
}
