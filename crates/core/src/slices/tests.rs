//! Unit tests of the slice builder on hand-made data: attribute bounds, slice names,
//! quantities and subnets. The tests on fixture machines are in the tandem package
//! (`src/slices/build_tests.rs`), because the fixtures' crate depends on this one.

use super::devices::bytes_quantity;
use super::layout::is_dns_label;
use super::*;

#[test]
fn strings_are_cut_on_character_boundaries() {
    assert_eq!(bounded_string("short"), "short");
    let long = "é".repeat(40); // 80 bytes
    let cut = bounded_string(&long);
    assert!(cut.len() <= 64 && cut.len() >= 63, "{}", cut.len());
    assert!(long.starts_with(&cut));
    assert_eq!(bounded_string(&"x".repeat(100)).len(), 64);
}

#[test]
fn slice_names_are_valid_and_stable() {
    assert_eq!(slice_name("node-a", "tandem.dev", 3), "node-a-tandem.dev-3");
    let long_label = format!("n{}", "x".repeat(60));
    let name = slice_name(&long_label, "tandem.dev", 0);
    assert!(name.split('.').all(is_dns_label), "{name}");
    assert_eq!(name, slice_name(&long_label, "tandem.dev", 0));
    assert_ne!(name, slice_name(&long_label, "other.dev", 0));
    let huge = vec!["abc"; 80].join(".");
    let name = slice_name(&huge, "tandem.dev", 1);
    assert!(
        name.len() <= 253 && name.split('.').all(is_dns_label),
        "{name}"
    );
}

#[test]
fn quantities_use_binary_units_when_exact() {
    assert_eq!(bytes_quantity(80 << 30).0, "80Gi");
    assert_eq!(bytes_quantity(1536 << 20).0, "1536Mi");
    assert_eq!(bytes_quantity(1000).0, "1000");
}

fn facts(addresses: &[(&str, &[&str])], rails: Option<&[(&str, &str)]>) -> NetworkFacts {
    NetworkFacts::from_addresses(addresses, rails)
}

#[test]
fn subnet_is_the_kernel_prefix_of_the_first_fabric_address() {
    let network = facts(
        &[
            ("eth24", &["192.168.1.5/24"]),
            // GKE gives each NIC a /32: the /32 is what every node agrees on.
            ("gpu0rdma0", &["10.128.0.17/32"]),
            ("ib6", &["fe80::1/64", "fd00:1:2:3::9/64"]),
            ("ib7", &["fe80::2/64", "2001:db8:7::4/64", "172.16.7.2/16"]),
            ("link-local-only", &["169.254.3.3/16", "fe80::3/64"]),
        ],
        None,
    );
    let subnet = |name| network.subnet_of(name).map(|s| s.to_string());
    assert_eq!(subnet("eth24").as_deref(), Some("192.168.1.0/24"));
    assert_eq!(subnet("gpu0rdma0").as_deref(), Some("10.128.0.17/32"));
    assert_eq!(subnet("ib6").as_deref(), Some("fd00:1:2:3::/64"));
    assert_eq!(
        subnet("ib7").as_deref(),
        Some("172.16.0.0/16"),
        "IPv4 first"
    );
    assert_eq!(subnet("link-local-only"), None);
    assert_eq!(subnet("absent"), None);
}
