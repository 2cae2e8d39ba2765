//! Exclusive NIC attach: moves a host network interface into a pod's network namespace under
//! a new name with its addresses, MTU and routes, and brings it back intact on release.
//! Planning and validation are pure; [`netlink`] is the thin rtnetlink shell that acts.

pub mod netlink;
pub mod record;

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use netlink::{
    AttachOutcome, Netns, attach, interface_in_netns, move_and_configure, release, snapshot,
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

/// A main-table route through the interface, in the form needed to re-create it elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceRoute {
    pub destination: IpAddr,
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
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
    pub was_up: bool,
}

/// What the node must keep: attaching these would cut the node off its cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guards {
    /// The Kubernetes node IP, when known.
    pub node_ip: Option<IpAddr>,
}

/// Checks a name the kernel will accept for a netdev and that cannot escape a sysfs path.
pub fn validate_ifname(name: &str) -> Result<(), NetAttachError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved path component")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name
        .chars()
        .any(|c| c.is_whitespace() || c == ':' || c.is_control())
    {
        Some("contains whitespace, ':' or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetAttachError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The in-pod name of the `index`-th attached NIC in pairing order when none was requested.
pub fn default_pod_name(index: usize) -> String {
    format!("rdma{index}")
}

/// Checks addresses and routes before anything moves: prefix lengths fit the family and a
/// gateway has the destination's family. A bad record would otherwise strand the interface
/// half-configured inside the pod.
pub fn validate_snapshot(snapshot: &InterfaceSnapshot) -> Result<(), NetAttachError> {
    validate_ifname(&snapshot.host_name)?;
    let invalid = |what: String, reason: String| NetAttachError::InvalidConfig {
        ifname: snapshot.host_name.clone(),
        what,
        reason,
    };
    if !(68..=65535).contains(&snapshot.mtu) {
        return Err(invalid(
            "mtu".into(),
            format!("{} outside 68..=65535", snapshot.mtu),
        ));
    }
    for a in &snapshot.addresses {
        if a.prefix_len > max_prefix(a.address) {
            return Err(invalid(
                format!("address {}/{}", a.address, a.prefix_len),
                "prefix length too long for the family".into(),
            ));
        }
        if a.address.is_unspecified() || a.address.is_multicast() {
            return Err(invalid(
                format!("address {}", a.address),
                "not a unicast address".into(),
            ));
        }
    }
    for r in &snapshot.routes {
        if r.prefix_len > max_prefix(r.destination) {
            return Err(invalid(
                format!("route {}/{}", r.destination, r.prefix_len),
                "prefix length too long for the family".into(),
            ));
        }
        if let Some(gw) = r.gateway
            && gw.is_ipv4() != r.destination.is_ipv4()
        {
            return Err(invalid(
                format!("route {}/{} via {gw}", r.destination, r.prefix_len),
                "gateway family differs from destination".into(),
            ));
        }
    }
    Ok(())
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// IPv6 link-local addresses are re-created by the kernel on every link-up; copying them
/// would only collide with the ones it makes.
pub fn is_link_local_v6(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Refuses interfaces the node needs: one carrying a default route, or the node IP.
pub fn check_guards(
    snapshot: &InterfaceSnapshot,
    carries_default_route: bool,
    guards: &Guards,
) -> Result<(), NetAttachError> {
    let guarded = |reason: String| NetAttachError::Guarded {
        ifname: snapshot.host_name.clone(),
        reason,
    };
    if carries_default_route {
        return Err(guarded("it carries the host's default route".into()));
    }
    if let Some(node_ip) = guards.node_ip
        && snapshot.addresses.iter().any(|a| a.address == node_ip)
    {
        return Err(guarded(format!("it holds the node IP {node_ip}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> InterfaceSnapshot {
        InterfaceSnapshot {
            host_name: "eth1".into(),
            mtu: 9000,
            hardware_address: None,
            addresses: vec![InterfaceAddress {
                address: "10.1.0.2".parse().unwrap(),
                prefix_len: 24,
            }],
            routes: vec![InterfaceRoute {
                destination: "10.2.0.0".parse().unwrap(),
                prefix_len: 16,
                gateway: Some("10.1.0.1".parse().unwrap()),
                metric: None,
            }],
            was_up: true,
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_ifname("rdma0").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok());
        for bad in ["", "abcdefghijklmnop", ".", "..", "a/b", "a b", "a:1"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(default_pod_name(1), "rdma1");
    }

    #[test]
    fn snapshot_validation_rejects_bad_prefixes_and_gateways() {
        assert!(validate_snapshot(&snap()).is_ok());
        let mut s = snap();
        s.addresses[0].prefix_len = 33;
        assert!(validate_snapshot(&s).is_err());
        let mut s = snap();
        s.routes[0].gateway = Some("fd00::1".parse().unwrap());
        assert!(validate_snapshot(&s).is_err());
        let mut s = snap();
        s.mtu = 10;
        assert!(validate_snapshot(&s).is_err());
    }

    #[test]
    fn guards_refuse_default_route_and_node_ip() {
        let s = snap();
        assert!(check_guards(&s, false, &Guards::default()).is_ok());
        assert!(matches!(
            check_guards(&s, true, &Guards::default()),
            Err(NetAttachError::Guarded { .. })
        ));
        let guards = Guards {
            node_ip: Some("10.1.0.2".parse().unwrap()),
        };
        assert!(check_guards(&s, false, &guards).is_err());
    }

    #[test]
    fn link_local_v6_is_detected() {
        assert!(is_link_local_v6("fe80::1".parse().unwrap()));
        assert!(!is_link_local_v6("fd00::1".parse().unwrap()));
        assert!(!is_link_local_v6("10.0.0.1".parse().unwrap()));
    }
}
