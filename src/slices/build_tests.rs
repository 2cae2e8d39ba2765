//! Unit tests of the slice builder (`tandem_core::slices`) on fixture machines discovered from
//! their sysfs trees: subnets and rails, the per-slice limit, which NICs are left out as
//! management links, roles, pairing and NIC sets.

use crate::names;
use crate::slices::build::*;
use crate::topology::{Inventory, Nic};
use k8s_openapi::api::resource::v1::{Device, DeviceAttribute};
use std::collections::{BTreeMap, BTreeSet};

fn facts(addresses: &[(&str, &[&str])], rails: Option<&[(&str, &str)]>) -> NetworkFacts {
    NetworkFacts::from_addresses(addresses, rails)
}

#[test]
fn nics_with_addresses_publish_subnet_and_rail() {
    let dir = crate::fixture::scratch_dir().unwrap();
    let machine = crate::fixture::builtin("dgx-h100").unwrap();
    let roots = crate::fixture::write_machine(&machine, dir.path()).unwrap();
    let inventory = crate::sysfs::discover(&roots).unwrap();
    let mut names_of_nics: Vec<&str> = inventory.nics.iter().filter_map(|n| n.if_name()).collect();
    names_of_nics.truncate(3);
    let [first, second, third] = names_of_nics[..] else {
        panic!("dgx-h100 has fewer than 3 named NICs");
    };
    let network = facts(
        &[
            (first, &["192.168.1.5/24"]),
            (second, &["192.168.2.5/24"]),
            (third, &["fd00:3::5/64"]),
        ],
        // Rail keys as the controller writes them; the third subnet has no rail yet.
        Some(&[("192.168.1.0_24", "0"), ("192.168.2.0_24", "1")]),
    );
    let devices =
        build_devices_with_network(&inventory, "tandem.dev", &SliceOptions::default(), &network);
    let attrs_of = |if_name: &str| {
        devices
            .iter()
            .filter_map(|d| d.attributes.as_ref())
            .find(|a| a.get("tandem.dev/ifName").and_then(|v| v.string.as_deref()) == Some(if_name))
            .unwrap()
            .clone()
    };
    let subnet = |a: &BTreeMap<String, DeviceAttribute>| {
        a.get("tandem.dev/subnet").and_then(|v| v.string.clone())
    };
    let rail = |a: &BTreeMap<String, DeviceAttribute>| a.get("tandem.dev/rail").and_then(|v| v.int);
    let a = attrs_of(first);
    assert_eq!(
        (subnet(&a).as_deref(), rail(&a)),
        (Some("192.168.1.0/24"), Some(0))
    );
    let b = attrs_of(second);
    assert_eq!(
        (subnet(&b).as_deref(), rail(&b)),
        (Some("192.168.2.0/24"), Some(1))
    );
    let c = attrs_of(third);
    assert_eq!(
        (subnet(&c).as_deref(), rail(&c)),
        (Some("fd00:3::/64"), None)
    );
    let without = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
    assert!(
        without
            .iter()
            .filter_map(|d| d.attributes.as_ref())
            .all(|a| {
                !a.contains_key("tandem.dev/subnet") && !a.contains_key("tandem.dev/rail")
            })
    );

    // No rail ConfigMap: subnets only.
    let no_rails = NetworkFacts {
        rails: None,
        ..network
    };
    let devices = build_devices_with_network(
        &inventory,
        "tandem.dev",
        &SliceOptions::default(),
        &no_rails,
    );
    assert!(
        devices
            .iter()
            .filter_map(|d| d.attributes.as_ref())
            .all(|a| !a.contains_key("tandem.dev/rail"))
    );
    assert_eq!(
        devices
            .iter()
            .filter_map(|d| d.attributes.as_ref())
            .filter(|a| a.contains_key("tandem.dev/subnet"))
            .count(),
        3
    );
}

#[test]
fn per_slice_limit_depends_on_taints() {
    let plain = SliceOptions {
        device_taints: false,
        max_devices_per_slice: 500,
        ..Default::default()
    };
    assert_eq!(plain.devices_per_slice(), 128);
    let tainted = SliceOptions {
        device_taints: true,
        max_devices_per_slice: 128,
        ..Default::default()
    };
    assert_eq!(tainted.devices_per_slice(), 64);
    let tiny = SliceOptions {
        device_taints: false,
        max_devices_per_slice: 0,
        ..Default::default()
    };
    assert_eq!(tiny.devices_per_slice(), 1);
}

fn machine(name: &str) -> Inventory {
    let dir = crate::fixture::scratch_dir().unwrap();
    let roots =
        crate::fixture::write_machine(&crate::fixture::builtin(name).unwrap(), dir.path()).unwrap();
    crate::sysfs::discover(&roots).unwrap()
}

fn nic_named<'a>(inventory: &'a Inventory, if_name: &str) -> &'a Nic {
    inventory
        .nics
        .iter()
        .find(|n| n.if_name() == Some(if_name))
        .unwrap_or_else(|| panic!("no {if_name}"))
}

fn device_names(devices: &[Device]) -> Vec<&str> {
    devices.iter().map(|d| d.name.as_str()).collect()
}

fn paired_with(devices: &[Device], name: &str) -> Option<String> {
    devices
        .iter()
        .find(|d| d.name == name)?
        .attributes
        .as_ref()?
        .get("tandem.dev/pairedWith")?
        .string
        .clone()
}

#[test]
fn the_nic_carrying_the_default_route_is_left_out_unless_asked_for() {
    // The reported node: no accelerator, no RDMA NIC, just the VM's eth0 with the
    // default route (gke-a4's gVNIC without the rest of the machine).
    let mut inventory = machine("gke-a4");
    inventory.accelerators.clear();
    inventory.nics.retain(|n| !n.is_rdma());
    let eth0 = names::nic_device_name(&nic_named(&inventory, "eth0").pci.address);
    let mut network = facts(&[("eth0", &["10.128.0.5/32"])], None);
    network.default_routes.insert("eth0".into());

    let options = SliceOptions::default();
    let (devices, left_out) =
        build_devices_leaving_out(&inventory, "tandem.dev", &options, &network);
    assert!(devices.is_empty(), "{:?}", device_names(&devices));
    assert_eq!(
        left_out,
        [LeftOutNic {
            device: eth0.clone(),
            if_name: Some("eth0".into()),
            reason: ManagementReason::DefaultRoute { via: "eth0".into() },
        }]
    );
    assert_eq!(
        left_out[0].reason.to_string(),
        "the default route leaves through eth0"
    );
    let slices = build_slices_from_devices(
        devices,
        &NodeIdentity {
            name: "vm".into(),
            uid: String::new(),
        },
        "tandem.dev",
        &options,
    );
    assert_eq!(slices.len(), 1, "the pool exists, empty");
    assert_eq!(slices[0].spec.devices.as_ref().map(Vec::len), Some(0));

    let asked = SliceOptions {
        publish_management_nics: true,
        ..SliceOptions::default()
    };
    let (devices, left_out) = build_devices_leaving_out(&inventory, "tandem.dev", &asked, &network);
    assert_eq!(device_names(&devices), [eth0.as_str()]);
    assert!(left_out.is_empty());
}

#[test]
fn the_nic_holding_the_node_ip_is_left_out_and_the_rdma_nics_are_untouched() {
    let inventory = machine("gke-a4");
    let eth0 = names::nic_device_name(&nic_named(&inventory, "eth0").pci.address);
    let all = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
    for node_ip in ["10.128.0.5", "fd00:10::5"] {
        let options = SliceOptions {
            node_ip: Some(node_ip.parse().unwrap()),
            ..SliceOptions::default()
        };
        // No default route at all (a node routed by BGP, say): the node IP decides.
        let network = facts(
            &[("eth0", &["10.128.0.5/32", "fd00:10::5/64", "fe80::1/64"])],
            None,
        );
        let (devices, left_out) =
            build_devices_leaving_out(&inventory, "tandem.dev", &options, &network);
        assert_eq!(left_out.len(), 1, "{left_out:?}");
        assert_eq!(left_out[0].device, eth0);
        assert_eq!(
            left_out[0].reason,
            ManagementReason::NodeIp {
                via: "eth0".into(),
                ip: node_ip.parse().unwrap()
            }
        );
        // Every other device is exactly what it was, pairing attributes included.
        let expected: Vec<&Device> = all.iter().filter(|d| d.name != eth0).collect();
        assert_eq!(devices.iter().collect::<Vec<_>>(), expected, "{node_ip}");
    }
    // A node IP that no interface holds leaves everything in.
    let elsewhere = SliceOptions {
        node_ip: Some("192.0.2.1".parse().unwrap()),
        ..SliceOptions::default()
    };
    let network = facts(&[("eth0", &["10.128.0.5/32"])], None);
    assert!(management_nics(&inventory, &elsewhere, &network).is_empty());
    assert_eq!(
        build_devices_with_network(&inventory, "tandem.dev", &elsewhere, &network).len(),
        all.len()
    );
}

#[test]
fn a_nic_under_a_bridge_or_vlan_that_holds_the_node_ip_is_left_out() {
    let inventory = machine("gke-a4");
    let rdma1 = names::nic_device_name(&nic_named(&inventory, "gpu1rdma0").pci.address);
    let options = SliceOptions {
        node_ip: Some("10.0.0.7".parse().unwrap()),
        ..SliceOptions::default()
    };
    // gpu1rdma0 is a port of br0; the node IP sits on a VLAN on br0.
    let mut network = facts(&[("br0.100", &["10.0.0.7/24"])], None);
    network.upper_interfaces = BTreeMap::from([
        ("gpu1rdma0".to_string(), BTreeSet::from(["br0".to_string()])),
        ("br0".to_string(), BTreeSet::from(["br0.100".to_string()])),
        // A loop in the facts must not hang the builder.
        (
            "br0.100".to_string(),
            BTreeSet::from(["gpu1rdma0".to_string()]),
        ),
    ]);
    let left_out = management_nics(&inventory, &options, &network);
    assert_eq!(left_out.len(), 1, "{left_out:?}");
    assert_eq!(left_out[0].device, rdma1);
    assert_eq!(
        left_out[0].reason.to_string(),
        "br0.100 holds the node IP 10.0.0.7"
    );
}

#[test]
fn a_gpu_is_not_paired_with_a_management_nic_that_is_not_published() {
    // The workstation pairs its GPU with the only (plain) NIC, which carries the default
    // route: left out, the GPU must not name it as its peer.
    let inventory = machine("workstation");
    let nic = names::nic_device_name(&nic_named(&inventory, "enp5s0").pci.address);
    let gpu = names::accelerator_device_name(&inventory.accelerators[0].pci.address);
    let mut network = NetworkFacts::default();
    network.default_routes.insert("enp5s0".into());
    let asked = SliceOptions {
        publish_management_nics: true,
        ..SliceOptions::default()
    };
    let published = build_devices_with_network(&inventory, "tandem.dev", &asked, &network);
    assert_eq!(paired_with(&published, &gpu), Some(nic.clone()));

    let devices =
        build_devices_with_network(&inventory, "tandem.dev", &SliceOptions::default(), &network);
    assert_eq!(device_names(&devices), [gpu.as_str()]);
    assert_eq!(paired_with(&devices, &gpu), None);
    assert!(
        !devices[0]
            .attributes
            .as_ref()
            .unwrap()
            .contains_key("tandem.dev/pairGroup")
    );
}

fn attr<'a>(devices: &'a [Device], name: &str, id: &str) -> Option<&'a DeviceAttribute> {
    devices
        .iter()
        .find(|d| d.name == name)?
        .attributes
        .as_ref()?
        .get(&format!("tandem.dev/{id}"))
}

#[test]
fn nics_carry_their_role_and_a_published_management_nic_is_paired_last() {
    // Azure ND H100 v5: the accelerated-networking VF is a frontend by sysfs alone.
    let inventory = machine("azure-nd-h100-v5");
    let devices = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
    let role = |name: &str| attr(&devices, name, "role").and_then(|a| a.string.clone());
    assert_eq!(role("nic-00b5-00-02-0").as_deref(), Some("frontend"));
    assert_eq!(role("nic-0101-00-00-0").as_deref(), Some("fabric"));
    assert_eq!(attr(&devices, "nic-00b5-00-02-0", "pairedWith"), None);

    // A RoCE port that carries the default route, published on request: a frontend,
    // so the GPU of its switch takes it only if no fabric NIC is left. On gke-a4 each
    // switch has two GPUs and two NICs, so GPU 0 then goes to a fabric NIC elsewhere.
    let inventory = machine("gke-a4");
    let rdma0 = nic_named(&inventory, "gpu0rdma0");
    let rdma0_name = names::nic_device_name(&rdma0.pci.address);
    let mut network = NetworkFacts::default();
    network.default_routes.insert("gpu0rdma0".into());
    let asked = SliceOptions {
        publish_management_nics: true,
        ..SliceOptions::default()
    };
    let devices = build_devices_with_network(&inventory, "tandem.dev", &asked, &network);
    assert_eq!(
        attr(&devices, &rdma0_name, "role").and_then(|a| a.string.as_deref()),
        Some("frontend")
    );
    assert_eq!(attr(&devices, &rdma0_name, "pairedWith"), None);
    let paired: Vec<String> = devices
        .iter()
        .filter(|d| d.name.starts_with("gpu-"))
        .filter_map(|d| {
            d.attributes
                .as_ref()?
                .get("tandem.dev/pairedWith")?
                .string
                .clone()
        })
        .collect();
    assert_eq!(paired.len(), 8, "every GPU still paired: {paired:?}");
    assert!(!paired.contains(&rdma0_name));
}

#[test]
fn a_gpu_and_its_nic_set_share_pair_set() {
    let inventory = machine("aws-p5");
    let devices = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
    let gpu = names::accelerator_device_name(&inventory.accelerators[0].pci.address);
    assert_eq!(
        attr(&devices, &gpu, "pairedNicCount").and_then(|a| a.int),
        Some(4)
    );
    let members: Vec<&str> = devices
        .iter()
        .filter(|d| {
            d.attributes
                .as_ref()
                .and_then(|a| a.get("tandem.dev/pairSet"))
                .and_then(|v| v.string.as_deref())
                == Some(gpu.as_str())
        })
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(members.len(), 5, "the GPU and its four EFA: {members:?}");
    assert!(members[1..].iter().all(|m| m.starts_with("nic-")));
    for nic in &members[1..] {
        assert_eq!(
            attr(&devices, nic, "pairedWith").and_then(|a| a.string.as_deref()),
            Some(gpu.as_str())
        );
        assert_eq!(
            attr(&devices, nic, "role").and_then(|a| a.string.as_deref()),
            Some("fabric")
        );
    }
    // The ENA is no fabric NIC and in no set.
    assert_eq!(
        attr(&devices, "nic-0000-00-05-0", "role").and_then(|a| a.string.as_deref()),
        Some("frontend")
    );
    assert_eq!(attr(&devices, "nic-0000-00-05-0", "pairSet"), None);
}
