//! NIC facts the slice builder needs that sysfs does not hold: each netdev's IP addresses,
//! dumped over rtnetlink (RTM_GETADDR) in this process's network namespace, and the rail
//! ConfigMap the cluster controller keeps. Both are I/O shells around `NetworkFacts`.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;

use crate::names;

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
    #[error("reading ConfigMap {namespace}/{name}: {source}")]
    RailConfigMap {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// `address/prefix` of one RTM_NEWADDR message. IFA_LOCAL is an IPv4 interface's own
/// address (IFA_ADDRESS is the peer on point-to-point links); IPv6 sends only IFA_ADDRESS.
fn address_of(message: &AddressMessage) -> Option<String> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(format!("{address}/{}", message.header.prefix_len))
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

/// Every interface's addresses (`ifName → ["192.168.1.5/24", ...]`, in kernel order).
pub async fn interface_addresses() -> Result<BTreeMap<String, Vec<String>>, NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    let connection = tokio::spawn(connection);
    let dumped = async {
        let links: Vec<_> =
            handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|source| NetworkError::Dump {
                    what: "link",
                    source,
                })?;
        let addresses: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetworkError::Dump {
                what: "address",
                source,
            })?;
        Ok::<_, NetworkError>((links, addresses))
    }
    .await;
    // The connection task only ends when every handle is gone; ours is the last one.
    drop(handle);
    connection.abort();
    let (links, addresses) = dumped?;
    let names: BTreeMap<u32, String> = links
        .iter()
        .filter_map(|link| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some((link.header.index, name.clone())),
                _ => None,
            })
        })
        .collect();
    let mut by_interface: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in &addresses {
        // An address whose link vanished between the two dumps belongs to no NIC we publish.
        let (Some(name), Some(address)) = (names.get(&message.header.index), address_of(message))
        else {
            continue;
        };
        by_interface.entry(name.clone()).or_default().push(address);
    }
    Ok(by_interface)
}

/// The rail ConfigMap's data, `None` when the controller has not written one (no rails yet).
pub async fn rail_configmap_data(
    client: kube::Client,
    namespace: &str,
) -> Result<Option<BTreeMap<String, String>>, NetworkError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let found = api
        .get_opt(names::RAILS_CONFIGMAP)
        .await
        .map_err(|source| NetworkError::RailConfigMap {
            namespace: namespace.to_string(),
            name: names::RAILS_CONFIGMAP.to_string(),
            source,
        })?;
    Ok(found.map(|configmap| configmap.data.unwrap_or_default()))
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
        let addresses = interface_addresses().await.unwrap();
        let lo = addresses
            .get("lo")
            .unwrap_or_else(|| panic!("no lo in {addresses:?}"));
        assert!(lo.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");
    }
}
