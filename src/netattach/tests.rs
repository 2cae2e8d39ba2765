//! Unit tests of the snapshot types and the checks in validate.rs.

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
