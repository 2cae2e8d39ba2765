//! Exclusive NIC attach: moves a host network interface into a pod's network namespace under
//! a new name with its addresses, MTU, routes (main and per-NIC tables) and policy rules, and
//! brings it back intact on release.
//! Planning and validation are pure; [`netlink`] is the thin rtnetlink shell that acts.

pub mod netlink;
pub mod rdma;
pub mod record;
pub mod status;

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
                table: None,
            }],
            rules: Vec::new(),
            was_up: true,
        }
    }

    /// `snap()` with source-based routing: a default route in table 101, the rule that
    /// selects it by source and one that pins output through the interface.
    fn source_routed() -> InterfaceSnapshot {
        let mut s = snap();
        s.routes.push(InterfaceRoute {
            destination: "0.0.0.0".parse().unwrap(),
            prefix_len: 0,
            gateway: Some("10.1.0.1".parse().unwrap()),
            metric: None,
            table: Some(101),
        });
        s.rules = vec![
            InterfaceRule {
                family: IpFamily::Ipv4,
                priority: 100,
                table: 101,
                from: Some(IpPrefix {
                    address: "10.1.0.2".parse().unwrap(),
                    prefix_len: 32,
                }),
                to: None,
                iif: None,
                oif: None,
                fwmark: None,
                fwmask: None,
                protocol: None,
            },
            InterfaceRule {
                family: IpFamily::Ipv4,
                priority: 101,
                table: 101,
                from: None,
                to: None,
                iif: None,
                oif: Some("eth1".into()),
                fwmark: None,
                fwmask: None,
                protocol: None,
            },
        ];
        s
    }

    #[test]
    fn records_without_tables_or_rules_still_load() {
        // The shape records had before per-NIC tables and rules were kept.
        let old = r#"{"hostName":"eth1","mtu":9000,"addresses":[{"address":"10.1.0.2","prefixLen":24}],
            "routes":[{"destination":"10.2.0.0","prefixLen":16,"gateway":"10.1.0.1"}],"wasUp":true}"#;
        let loaded: InterfaceSnapshot = serde_json::from_str(old).unwrap();
        assert_eq!(loaded, snap());
        assert_eq!(loaded.routes[0].table_id(), MAIN_TABLE);
        // And a main-table-only snapshot still writes that shape, so older readers cope.
        let written = serde_json::to_value(snap()).unwrap();
        assert!(written.get("rules").is_none(), "{written}");
        assert!(written["routes"][0].get("table").is_none(), "{written}");
    }

    #[test]
    fn tables_and_rules_round_trip_through_json() {
        let s = source_routed();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["routes"][1]["table"], 101);
        assert_eq!(json["rules"][0]["family"], "ipv4");
        assert_eq!(json["rules"][0]["from"]["prefixLen"], 32);
        assert_eq!(json["rules"][1]["oif"], "eth1");
        let back: InterfaceSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn own_tables_leave_out_the_shared_ones() {
        let mut s = source_routed();
        s.routes[0].table = Some(DEFAULT_TABLE);
        s.routes.push(InterfaceRoute {
            table: Some(101),
            ..s.routes[1].clone()
        });
        s.routes.push(InterfaceRoute {
            table: Some(MAIN_TABLE),
            ..s.routes[1].clone()
        });
        assert_eq!(s.own_tables(), vec![101]);
        assert!(snap().own_tables().is_empty());
    }

    #[test]
    fn rules_belong_by_table_or_by_name_but_never_with_another_interface() {
        let s = source_routed();
        let tables = s.own_tables();
        assert!(s.rules.iter().all(|r| r.belongs_to("eth1", &tables)));
        // Same table, other NIC: table 101 is not eth2's.
        assert!(!s.rules[0].belongs_to("eth2", &[102]));
        // Naming eth1 is enough, whatever the table.
        assert!(s.rules[1].belongs_to("eth1", &[]));
        // A rule for eth1's table that also names eth2 would mean something else in the pod.
        let mixed = InterfaceRule {
            iif: Some("eth2".into()),
            ..s.rules[1].clone()
        };
        assert!(!mixed.belongs_to("eth1", &tables));
        let unrelated = InterfaceRule {
            table: 102,
            ..s.rules[0].clone()
        };
        assert!(!unrelated.belongs_to("eth1", &tables));
    }

    #[test]
    fn pod_rules_use_the_pod_side_name() {
        let mut s = source_routed();
        s.rules[0].iif = Some("eth1".into());
        let pod = s.pod_rules("rdma0");
        assert_eq!(pod[0].iif.as_deref(), Some("rdma0"));
        assert_eq!(pod[0].from, s.rules[0].from);
        assert_eq!(pod[1].oif.as_deref(), Some("rdma0"));
        assert_eq!(pod[1].iif, None);
        assert_eq!(pod[1].table, 101);
    }

    #[test]
    fn snapshot_validation_checks_tables_and_rules() {
        assert!(validate_snapshot(&source_routed()).is_ok());
        for table in [0, LOCAL_TABLE] {
            let mut s = source_routed();
            s.routes[1].table = Some(table);
            assert!(validate_snapshot(&s).is_err(), "route table {table}");
            let mut s = source_routed();
            s.rules[0].table = table;
            assert!(validate_snapshot(&s).is_err(), "rule table {table}");
        }
        let mut s = source_routed();
        s.rules[0].from = Some(IpPrefix {
            address: "10.1.0.2".parse().unwrap(),
            prefix_len: 33,
        });
        assert!(validate_snapshot(&s).is_err());
        let mut s = source_routed();
        s.rules[0].to = Some(IpPrefix {
            address: "fd00::1".parse().unwrap(),
            prefix_len: 128,
        });
        assert!(validate_snapshot(&s).is_err(), "v6 prefix in a v4 rule");
        let mut s = source_routed();
        s.rules[1].oif = Some("a/b".into());
        assert!(matches!(
            validate_snapshot(&s),
            Err(NetAttachError::InvalidName { .. })
        ));
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
