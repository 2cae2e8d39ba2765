//! Rail assignment, pure: the RDMA NICs of every node grouped by the subnet they sit on, each
//! subnet given a stable rail number. Numbers once given are never changed; new subnets get the
//! lowest free number, and nodes whose NICs do not fit a one-NIC-per-rail layout are reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IP prefix with its host bits cleared: `192.168.1.0/24`, `fd00:1::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    network: IpAddr,
    prefix_len: u8,
}

impl Subnet {
    /// Parses `address/prefix`; host bits are cleared, so `10.0.3.7/24` is `10.0.3.0/24`.
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let (address, prefix) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not an IP prefix like 192.168.1.0/24"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?}: {address:?} is not an IPv4 or IPv6 address"))?;
        let prefix_len: u8 = prefix
            .parse()
            .map_err(|_| format!("{text:?}: prefix length {prefix:?} is not a number"))?;
        let network = match address {
            IpAddr::V4(v4) if prefix_len <= 32 => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) if prefix_len <= 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            _ => return Err(format!("{text:?}: prefix length {prefix_len} is too long")),
        };
        Ok(Subnet {
            network,
            prefix_len,
        })
    }

    /// The network address, host bits cleared.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The ConfigMap data key for this subnet. Keys may only hold `[-._a-zA-Z0-9]`, so `/`
    /// becomes `_` and `:` becomes `-` (neither occurs in an address otherwise).
    pub fn configmap_key(&self) -> String {
        self.to_string().replace('/', "_").replace(':', "-")
    }

    /// The subnet a ConfigMap data key names, if it names one.
    pub fn from_configmap_key(key: &str) -> Option<Subnet> {
        Subnet::parse(&key.replace('_', "/").replace('-', ":")).ok()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Subnet → rail number, as stored in the rail ConfigMap.
pub type RailMap = BTreeMap<Subnet, i64>;

/// The rail of `subnet` according to the rail ConfigMap's data: what a node plugin publishes
/// as `tandem.dev/rail` for a NIC whose `tandem.dev/subnet` is `subnet`.
pub fn rail_for_subnet(configmap_data: &BTreeMap<String, String>, subnet: &str) -> Option<i64> {
    let key = Subnet::parse(subnet).ok()?.configmap_key();
    configmap_data.get(&key)?.trim().parse().ok()
}

/// The rails a ConfigMap's data holds; entries that are not `subnet-key: integer` are left out
/// (and left alone when the map is written back).
pub fn rails_from_configmap(data: &BTreeMap<String, String>) -> RailMap {
    data.iter()
        .filter_map(|(key, value)| {
            let subnet = Subnet::from_configmap_key(key)?;
            let rail: i64 = value.trim().parse().ok()?;
            (rail >= 0).then_some((subnet, rail))
        })
        .collect()
}

/// One RDMA NIC of a node and the subnet its slice attribute names, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSubnet {
    pub device: String,
    pub subnet: Option<String>,
}

/// A node's RDMA NICs, in device-name order (which follows PCI order, and so GPU order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNics {
    pub node: String,
    pub nics: Vec<NicSubnet>,
}

/// A node whose NICs cannot be placed on rails, and why, for a Node Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RailMisfit {
    pub node: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RailPlan {
    /// Every rail: the existing ones and the new ones.
    pub rails: RailMap,
    /// Rails given in this plan, in the order they were numbered.
    pub added: Vec<(Subnet, i64)>,
    pub misfits: Vec<RailMisfit>,
}

/// Why a node's NICs do not fit a one-NIC-per-rail layout, if they do not.
fn node_misfit(node: &NodeNics, fleet_has_subnets: bool) -> Result<Vec<Subnet>, String> {
    let mut problems = Vec::new();
    let mut without = Vec::new();
    let mut seen: BTreeMap<Subnet, &str> = BTreeMap::new();
    let mut subnets = Vec::new();
    for nic in &node.nics {
        let Some(text) = &nic.subnet else {
            without.push(nic.device.as_str());
            continue;
        };
        match Subnet::parse(text) {
            Ok(subnet) => {
                if let Some(first) = seen.insert(subnet, &nic.device) {
                    problems.push(format!(
                        "NICs {first} and {} are both on subnet {subnet}, so neither rail is known",
                        nic.device
                    ));
                }
                subnets.push(subnet);
            }
            Err(e) => problems.push(format!("NIC {}: subnet {e}", nic.device)),
        }
    }
    if fleet_has_subnets && !without.is_empty() {
        problems.push(format!(
            "NICs {} publish no subnet while other NICs in the cluster do",
            without.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(subnets)
    } else {
        Err(problems.join("; "))
    }
}

/// The lowest rail number not in `used`.
fn lowest_free(used: &BTreeSet<i64>) -> i64 {
    (0..).find(|i| !used.contains(i)).unwrap_or(0)
}

/// Extends `existing` with rails for every subnet the fitting nodes use. New subnets are
/// numbered by where they first appear on a node (the NIC of the first GPU first), then by
/// address, so a fleet seen for the first time gets rail i = the NIC of GPU i.
pub fn plan_rails(existing: &RailMap, nodes: &[NodeNics]) -> RailPlan {
    let fleet_has_subnets = nodes
        .iter()
        .flat_map(|n| &n.nics)
        .any(|nic| nic.subnet.is_some());
    let mut misfits = Vec::new();
    // Subnet → lowest NIC position on any node it was seen at.
    let mut new_subnets: BTreeMap<Subnet, usize> = BTreeMap::new();
    for node in nodes.iter().filter(|n| !n.nics.is_empty()) {
        match node_misfit(node, fleet_has_subnets) {
            Ok(subnets) => {
                for (position, subnet) in subnets.into_iter().enumerate() {
                    if !existing.contains_key(&subnet) {
                        let slot = new_subnets.entry(subnet).or_insert(position);
                        *slot = (*slot).min(position);
                    }
                }
            }
            Err(message) => misfits.push(RailMisfit {
                node: node.node.clone(),
                message,
            }),
        }
    }
    let mut ordered: Vec<(usize, Subnet)> = new_subnets.into_iter().map(|(s, p)| (p, s)).collect();
    ordered.sort();
    let mut rails = existing.clone();
    let mut used: BTreeSet<i64> = rails.values().copied().collect();
    let mut added = Vec::with_capacity(ordered.len());
    for (_, subnet) in ordered {
        let rail = lowest_free(&used);
        used.insert(rail);
        rails.insert(subnet, rail);
        added.push((subnet, rail));
    }
    RailPlan {
        rails,
        added,
        misfits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, subnets: &[Option<&str>]) -> NodeNics {
        NodeNics {
            node: name.into(),
            nics: subnets
                .iter()
                .enumerate()
                .map(|(i, s)| NicSubnet {
                    device: format!("nic-{i}"),
                    subnet: s.map(str::to_string),
                })
                .collect(),
        }
    }

    fn sub(text: &str) -> Subnet {
        Subnet::parse(text).unwrap()
    }

    #[test]
    fn subnets_are_canonical_and_round_trip_through_configmap_keys() {
        assert_eq!(sub("10.0.3.7/24").to_string(), "10.0.3.0/24");
        assert_eq!(sub("fd00:0:0:1::5/64").to_string(), "fd00:0:0:1::/64");
        assert_eq!(sub("10.1.2.3/0").to_string(), "0.0.0.0/0");
        for text in ["192.168.1.0/24", "fd00:1::/64", "10.0.0.0/8"] {
            let key = sub(text).configmap_key();
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
                "{key}"
            );
            assert_eq!(Subnet::from_configmap_key(&key), Some(sub(text)));
        }
        assert!(Subnet::parse("10.0.0.0").is_err());
        assert!(Subnet::parse("10.0.0.0/33").is_err());
        assert!(Subnet::parse("fd00::/129").is_err());
        assert!(Subnet::parse("eth0/24").is_err());
    }

    #[test]
    fn new_subnets_follow_nic_order_and_existing_rails_never_move() {
        let nodes = [
            node("a", &[Some("10.0.1.0/24"), Some("10.0.0.0/24")]),
            node("b", &[Some("10.0.1.0/24"), Some("10.0.0.0/24")]),
        ];
        let plan = plan_rails(&RailMap::new(), &nodes);
        assert!(plan.misfits.is_empty(), "{:?}", plan.misfits);
        assert_eq!(plan.rails[&sub("10.0.1.0/24")], 0);
        assert_eq!(plan.rails[&sub("10.0.0.0/24")], 1);

        let mut existing = RailMap::new();
        existing.insert(sub("10.0.0.0/24"), 0);
        existing.insert(sub("10.0.9.0/24"), 2);
        let plan = plan_rails(
            &existing,
            &[node(
                "c",
                &[
                    Some("10.0.0.0/24"),
                    Some("10.0.5.0/24"),
                    Some("10.0.6.0/24"),
                ],
            )],
        );
        assert_eq!(plan.rails[&sub("10.0.0.0/24")], 0);
        assert_eq!(plan.rails[&sub("10.0.9.0/24")], 2);
        assert_eq!(
            plan.added,
            vec![(sub("10.0.5.0/24"), 1), (sub("10.0.6.0/24"), 3)]
        );
    }

    #[test]
    fn misfits_are_reported_not_guessed() {
        let nodes = [
            node("shared", &[Some("10.0.0.0/24"), Some("10.0.0.128/24")]),
            node("partial", &[Some("10.0.1.0/24"), None]),
            node("bad", &[Some("not-a-prefix")]),
            node("ok", &[Some("10.0.2.0/24")]),
        ];
        let plan = plan_rails(&RailMap::new(), &nodes);
        let names: Vec<&str> = plan.misfits.iter().map(|m| m.node.as_str()).collect();
        assert_eq!(names, ["shared", "partial", "bad"]);
        assert!(plan.misfits[0].message.contains("10.0.0.0/24"));
        assert!(plan.misfits[1].message.contains("nic-1"));
        // Only the fitting node's subnet got a rail.
        assert_eq!(plan.added, vec![(sub("10.0.2.0/24"), 0)]);
        // A fleet where no NIC has a subnet has no rails and no misfits.
        let plan = plan_rails(&RailMap::new(), &[node("x", &[None, None])]);
        assert!(plan.misfits.is_empty() && plan.rails.is_empty());
    }

    #[test]
    fn configmap_data_reads_back_and_answers_rail_lookups() {
        let data: BTreeMap<String, String> = [
            ("10.0.0.0_24".to_string(), "0".to_string()),
            ("fd00-1--_64".to_string(), "1".to_string()),
            ("notes".to_string(), "hand-written".to_string()),
            ("10.0.1.0_24".to_string(), "x".to_string()),
        ]
        .into();
        let rails = rails_from_configmap(&data);
        assert_eq!(rails.len(), 2);
        assert_eq!(rail_for_subnet(&data, "10.0.0.9/24"), Some(0));
        assert_eq!(rail_for_subnet(&data, "fd00:1::/64"), Some(1));
        assert_eq!(rail_for_subnet(&data, "10.0.1.0/24"), None);
        assert_eq!(rail_for_subnet(&data, "garbage"), None);
    }
}
