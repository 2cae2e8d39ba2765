//! NIC facts the slice builder needs that sysfs does not hold: each netdev's IP addresses,
//! which interfaces carry a default route and how interfaces stack, dumped over rtnetlink in
//! this process's network namespace, and the rail ConfigMap the cluster controller keeps.
//! Both are I/O shells around `NetworkFacts`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};

use super::build::NetworkFacts;
use crate::names;
use crate::netattach::MAIN_TABLE;
use crate::netattach::netlink::{all_tables, interface_address};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("rtnetlink {what} dump: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// `address/prefix` of one RTM_NEWADDR message, read as netattach reads an interface's
/// addresses before moving it.
fn address_of(message: &AddressMessage) -> Option<String> {
    interface_address(message).map(|a| format!("{}/{}", a.address, a.prefix_len))
}

/// Adds the host addresses of interfaces that sit in pods (`interfaces`, from the attach
/// records) where the host's dump no longer has them, so a NIC keeps its `tandem.dev/subnet`
/// while a claim holds it.
pub fn keep_attached_addresses(
    addresses: &mut BTreeMap<String, Vec<String>>,
    interfaces: &[crate::netattach::record::AttachedInterface],
) {
    for interface in interfaces {
        let snapshot = &interface.snapshot;
        addresses
            .entry(snapshot.host_name.clone())
            .or_insert_with(|| {
                snapshot
                    .addresses
                    .iter()
                    .map(|a| format!("{}/{}", a.address, a.prefix_len))
                    .collect()
            });
    }
}

/// Indexes of the interfaces a main-table default route (either family) leaves through,
/// multipath hops included. Defaults in other tables are per-NIC source routing, which RDMA
/// NICs on multi-rail machines carry routinely; they do not make a NIC the node's own.
pub fn default_route_interfaces(routes: &[RouteMessage]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    for route in routes {
        let table = crate::netattach::route_table(route);
        if table != MAIN_TABLE || route.header.destination_prefix_length != 0 {
            continue;
        }
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => {
                    found.insert(*index);
                }
                RouteAttribute::MultiPath(hops) => {
                    found.extend(hops.iter().map(|hop| hop.interface_index));
                }
                _ => {}
            }
        }
    }
    found
}

/// `(lower, upper)` index pairs: a port and its bond, team, bridge or VRF (IFLA_MASTER), and
/// a VLAN, macvlan or IPoIB child and the link it is made on (IFLA_LINK). A veth's IFLA_LINK
/// names its peer, and a link in another namespace has an index that means nothing here;
/// neither is stacking.
pub fn stacked_links(links: &[LinkMessage]) -> Vec<(u32, u32)> {
    let mut pairs = Vec::new();
    for link in links {
        let index = link.header.index;
        let is_veth = link.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        });
        let other_namespace = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Controller(master) if *master != index => {
                    pairs.push((index, *master))
                }
                LinkAttribute::Link(lower)
                    if *lower != index && *lower != 0 && !is_veth && !other_namespace =>
                {
                    pairs.push((*lower, index))
                }
                _ => {}
            }
        }
    }
    pairs
}

/// One read of the interfaces of this network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceDump {
    /// `ifName → ["192.168.1.5/24", ...]`, in kernel order.
    pub addresses: BTreeMap<String, Vec<String>>,
    /// Interfaces a main-table default route leaves through.
    pub default_routes: BTreeSet<String>,
    /// ifName → the interfaces stacked directly on it.
    pub upper_interfaces: BTreeMap<String, BTreeSet<String>>,
}

impl InterfaceDump {
    /// Replaces the interface facts in `facts`, leaving the rails as they are.
    pub fn store_in(self, facts: &mut NetworkFacts) {
        facts.addresses = self.addresses;
        facts.default_routes = self.default_routes;
        facts.upper_interfaces = self.upper_interfaces;
    }
}

fn dump_failed(what: &'static str) -> impl Fn(rtnetlink::Error) -> NetworkError {
    move |source| NetworkError::Dump { what, source }
}

/// Every interface's addresses, the main-table default routes and how links stack.
pub async fn interface_dump() -> Result<InterfaceDump, NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    let connection = tokio::spawn(connection);
    let dumped = async {
        let links: Vec<_> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_failed("link"))?;
        let addresses: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_failed("address"))?;
        let mut routes: Vec<RouteMessage> = handle
            .route()
            .get(all_tables(RouteMessageBuilder::<Ipv4Addr>::new().build()))
            .execute()
            .try_collect()
            .await
            .map_err(dump_failed("IPv4 route"))?;
        routes.extend(
            handle
                .route()
                .get(all_tables(RouteMessageBuilder::<Ipv6Addr>::new().build()))
                .execute()
                .try_collect::<Vec<_>>()
                .await
                .map_err(dump_failed("IPv6 route"))?,
        );
        Ok::<_, NetworkError>((links, addresses, routes))
    }
    .await;
    // The connection task only ends when every handle is gone; ours is the last one.
    drop(handle);
    connection.abort();
    let (links, addresses, routes) = dumped?;
    let names: BTreeMap<u32, String> = links
        .iter()
        .filter_map(|link| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some((link.header.index, name.clone())),
                _ => None,
            })
        })
        .collect();
    let mut dump = InterfaceDump::default();
    for message in &addresses {
        // An address whose link vanished between the dumps belongs to no NIC we publish.
        let (Some(name), Some(address)) = (names.get(&message.header.index), address_of(message))
        else {
            continue;
        };
        dump.addresses
            .entry(name.clone())
            .or_default()
            .push(address);
    }
    dump.default_routes = default_route_interfaces(&routes)
        .iter()
        .filter_map(|index| names.get(index).cloned())
        .collect();
    for (lower, upper) in stacked_links(&links) {
        if let (Some(lower), Some(upper)) = (names.get(&lower), names.get(&upper)) {
            dump.upper_interfaces
                .entry(lower.clone())
                .or_default()
                .insert(upper.clone());
        }
    }
    Ok(dump)
}

/// Follows the rail ConfigMap (`<namespace>/tandem-rails`) with one watch on that object
/// alone, sending its data (`None` while it does not exist) after every complete (re)list and
/// whenever it changes, until `shutdown`. A watch instead of a poll: at 5,000 nodes a 30 s GET would be ~170 requests a
/// second for data that changes a few times a day; the watch costs one idle connection per
/// node and brings a change within the apiserver's fan-out time. Errors are logged and the
/// watch resumes with backoff; the last data stays in `rails` meanwhile.
pub async fn watch_rail_configmap(
    client: kube::Client,
    namespace: String,
    rails: tokio::sync::watch::Sender<Option<BTreeMap<String, String>>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", names::RAILS_CONFIGMAP));
    let mut events = watcher(api, config).default_backoff().boxed();
    // What a relist has sent so far; published when the relist is complete.
    let mut relisted: Option<BTreeMap<String, String>> = None;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = shutdown.cancelled() => return,
        };
        let data = match event {
            None => return,
            Some(Err(error)) => {
                tracing::warn!(
                    %namespace,
                    configmap = names::RAILS_CONFIGMAP,
                    %error,
                    "watching the rail ConfigMap failed; keeping the last rails"
                );
                continue;
            }
            Some(Ok(watcher::Event::Init)) => {
                relisted = None;
                continue;
            }
            Some(Ok(watcher::Event::InitApply(configmap))) => {
                relisted = Some(configmap.data.unwrap_or_default());
                continue;
            }
            Some(Ok(watcher::Event::InitDone)) => {
                // Always a notification, even when nothing changed: a listener waiting for
                // the first complete view learns that there is none.
                rails.send_replace(relisted.take());
                continue;
            }
            Some(Ok(watcher::Event::Apply(configmap))) => Some(configmap.data.unwrap_or_default()),
            Some(Ok(watcher::Event::Delete(_))) => None,
        };
        rails.send_if_modified(|current| {
            let changed = *current != data;
            *current = data;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_in_pods_keep_their_recorded_addresses_and_live_ones_win() {
        let record: crate::netattach::record::NetAttachRecord =
            serde_json::from_value(serde_json::json!({"interfaces": [
                {"podName": "rdma0", "netns": {"pid": 1, "dev": 4, "inode": 9},
                 "phase": "attached",
                 "snapshot": {"hostName": "ibp24s0", "mtu": 9000, "wasUp": true, "routes": [],
                              "addresses": [{"address": "10.1.0.2", "prefixLen": 24}]}},
                {"podName": "rdma1", "netns": {"pid": 1, "dev": 4, "inode": 9},
                 "phase": "attached",
                 "snapshot": {"hostName": "ibp64s0", "mtu": 9000, "wasUp": true, "routes": [],
                              "addresses": [{"address": "10.2.0.2", "prefixLen": 24}]}}
            ]}))
            .unwrap();
        // ibp64s0 is back on the host already (with a new address): the dump is the truth.
        let mut addresses: BTreeMap<String, Vec<String>> =
            [("ibp64s0".to_string(), vec!["10.9.0.2/24".to_string()])].into();
        keep_attached_addresses(&mut addresses, &record.interfaces);
        assert_eq!(addresses["ibp24s0"], ["10.1.0.2/24"]);
        assert_eq!(addresses["ibp64s0"], ["10.9.0.2/24"]);
    }

    #[tokio::test]
    async fn loopback_holds_the_ipv4_loopback_prefix() {
        let dump = interface_dump().await.unwrap();
        let lo = dump
            .addresses
            .get("lo")
            .unwrap_or_else(|| panic!("no lo in {:?}", dump.addresses));
        assert!(lo.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");
        assert!(!dump.default_routes.contains("lo"), "{dump:?}");
    }

    fn route(table: u32, prefix_len: u8, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.table = u8::try_from(table)
            .unwrap_or(rtnetlink::packet_route::route::RouteHeader::RT_TABLE_UNSPEC);
        message.header.destination_prefix_length = prefix_len;
        message.attributes = attributes;
        if table > 255 {
            message.attributes.push(RouteAttribute::Table(table));
        }
        message
    }

    #[test]
    fn only_main_table_defaults_count_multipath_hops_included() {
        use rtnetlink::packet_route::route::RouteNextHop;
        let hop = |index| {
            let mut hop = RouteNextHop::default();
            hop.interface_index = index;
            hop
        };
        let routes = [
            // default via eth0 in main
            route(MAIN_TABLE, 0, vec![RouteAttribute::Oif(2)]),
            // per-NIC source routing: a default in the NIC's own table
            route(100, 0, vec![RouteAttribute::Oif(7)]),
            route(1000, 0, vec![RouteAttribute::Oif(8)]),
            // a subnet route out of an RDMA NIC in main
            route(MAIN_TABLE, 24, vec![RouteAttribute::Oif(9)]),
            // ECMP default over two uplinks, main table given as an attribute only
            {
                let mut r = route(0, 0, vec![RouteAttribute::MultiPath(vec![hop(3), hop(4)])]);
                r.attributes.push(RouteAttribute::Table(MAIN_TABLE));
                r
            },
            // unreachable default: no interface
            route(MAIN_TABLE, 0, vec![]),
        ];
        assert_eq!(default_route_interfaces(&routes), BTreeSet::from([2, 3, 4]));
    }

    fn link(index: u32, attributes: Vec<LinkAttribute>) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.attributes = attributes;
        message
    }

    #[test]
    fn bond_ports_and_vlans_stack_veth_peers_and_foreign_links_do_not() {
        let links = [
            // eth0 and eth1 are ports of bond0 (10); bond0.100 (11) is a VLAN on bond0
            link(2, vec![LinkAttribute::Controller(10)]),
            link(3, vec![LinkAttribute::Controller(10)]),
            link(11, vec![LinkAttribute::Link(10)]),
            // a veth whose peer is index 5 here
            link(
                12,
                vec![
                    LinkAttribute::Link(5),
                    LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
                ],
            ),
            // a link whose lower device sits in another namespace
            link(
                13,
                vec![LinkAttribute::Link(2), LinkAttribute::LinkNetNsId(1)],
            ),
            // a physical NIC: IFLA_LINK, when sent, is itself
            link(14, vec![LinkAttribute::Link(14)]),
        ];
        assert_eq!(stacked_links(&links), [(2, 10), (3, 10), (10, 11)]);
    }
}
