//! The checks made before anything moves: interface names the kernel accepts, snapshots whose
//! addresses, routes and rules can be re-created, and the guards that keep the node's own
//! interfaces out of pods. All pure, so they are tested without netlink.

use super::{InterfaceSnapshot, IpFamily, LOCAL_TABLE, MAX_IFNAME_LEN, NetAttachError};
use std::net::IpAddr;

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

/// Checks addresses, routes and rules before anything moves: prefix lengths fit the family, a
/// gateway has the destination's family, tables are neither unspecified nor `local` and rule
/// interface names are valid. A bad record would otherwise strand the interface
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
        if let Some(table) = r.table
            && !is_usable_table(table)
        {
            return Err(invalid(
                format!("route {}/{} table {table}", r.destination, r.prefix_len),
                "table 0 (unspecified) and 255 (local) are not copied".into(),
            ));
        }
    }
    for rule in &snapshot.rules {
        let what = || format!("rule priority {} table {}", rule.priority, rule.table);
        if !is_usable_table(rule.table) {
            return Err(invalid(
                what(),
                "table 0 (unspecified) and 255 (local) are not copied".into(),
            ));
        }
        for prefix in [rule.from, rule.to].into_iter().flatten() {
            if IpFamily::of(prefix.address) != rule.family {
                return Err(invalid(
                    format!("{} from/to {}", what(), prefix.address),
                    "address family differs from the rule's".into(),
                ));
            }
            if prefix.prefix_len > max_prefix(prefix.address) {
                return Err(invalid(
                    format!(
                        "{} from/to {}/{}",
                        what(),
                        prefix.address,
                        prefix.prefix_len
                    ),
                    "prefix length too long for the family".into(),
                ));
            }
        }
        for name in [&rule.iif, &rule.oif].into_iter().flatten() {
            validate_ifname(name)?;
        }
    }
    Ok(())
}

fn is_usable_table(table: u32) -> bool {
    table != 0 && table != LOCAL_TABLE
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
