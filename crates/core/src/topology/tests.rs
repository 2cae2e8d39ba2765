//! Unit and property tests of affinity, pairing and pair groups over hand-built and generated
//! topologies (the fixture-based tests live in tests/topology_fixtures.rs).

use super::*;
use crate::topology::inventory::NumaSource;
use proptest::prelude::*;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn function(bdf: &str, root: &str, bridges: &[&str], numa: Option<u32>) -> PciFunction {
    PciFunction {
        address: addr(bdf),
        vendor_id: 0x10de,
        device_id: 0x2330,
        class: 0x030200,
        subsystem_vendor_id: None,
        subsystem_device_id: None,
        vendor_name: None,
        device_name: None,
        numa_node: numa,
        numa_source: if numa.is_some() {
            NumaSource::Sysfs
        } else {
            NumaSource::Unknown
        },
        local_cpulist: None,
        pcie_root: root.to_string(),
        bridges: bridges.iter().map(|b| addr(b)).collect(),
        link_speed: None,
        link_width: None,
        driver: None,
        iommu_group: None,
        sriov: None,
        physfn: None,
        aer_fatal: None,
    }
}

#[test]
fn levels_follow_nvidia_smi() {
    let rp = "0000:15:01.0";
    let usp = "0000:16:00.0";
    let gpu = function(
        "0000:1b:00.0",
        "pci0000:15",
        &[rp, usp, "0000:17:03.0"],
        Some(0),
    );
    let same_switch = function(
        "0000:18:00.0",
        "pci0000:15",
        &[rp, usp, "0000:17:00.0"],
        Some(0),
    );
    let nested = function(
        "0000:1a:00.0",
        "pci0000:15",
        &[rp, usp, "0000:17:01.0", "0000:19:00.0", "0000:1a:00.0"],
        Some(0),
    );
    let other_port = function("0000:15:02.0", "pci0000:15", &["0000:15:03.0"], Some(0));
    let other_root = function("0000:29:00.0", "pci0000:27", &["0000:27:01.0"], Some(0));
    let other_numa = function("0000:9a:00.0", "pci0000:97", &["0000:97:01.0"], Some(1));
    let unknown_numa = function("0000:aa:00.0", "pci0000:a8", &[], None);
    assert_eq!(affinity(&gpu, &same_switch), Affinity::Pix);
    assert_eq!(affinity(&gpu, &nested), Affinity::Pxb);
    assert_eq!(affinity(&gpu, &other_port), Affinity::Phb);
    assert_eq!(affinity(&gpu, &other_root), Affinity::Node);
    assert_eq!(affinity(&gpu, &other_numa), Affinity::Sys);
    assert_eq!(affinity(&gpu, &unknown_numa), Affinity::Sys);
    assert_eq!(nearest_switch(&gpu), Some(addr(usp)));
    assert_eq!(nearest_switch(&other_port), None);
}

#[test]
fn flat_vm_devices_on_one_root_are_phb() {
    let gpu = function("0000:10:1c.0", "pci0000:10", &[], Some(0));
    let efa = function("0000:10:1b.0", "pci0000:10", &[], Some(0));
    assert_eq!(affinity(&gpu, &efa), Affinity::Phb);
}

#[test]
fn more_gpus_than_nics_share_nics_evenly() {
    let g: Vec<PciFunction> = (0..4)
        .map(|i| function(&format!("0000:10:1{i}.0"), "pci0000:10", &[], Some(0)))
        .collect();
    let n = [
        function("0000:10:01.0", "pci0000:10", &[], Some(0)),
        function("0000:10:02.0", "pci0000:10", &[], Some(0)),
    ];
    let pairing = pair_devices(&g.iter().collect::<Vec<_>>(), &n.iter().collect::<Vec<_>>());
    assert_eq!(pairing.pairs.len(), 4);
    for nic in &n {
        assert_eq!(
            pairing
                .pairs
                .iter()
                .filter(|p| p.nic == nic.address)
                .count(),
            2
        );
    }
    // Neighbouring GPUs share a NIC.
    assert_eq!(pairing.pairs[0].nic, pairing.pairs[1].nic);
}

#[test]
fn spare_nics_stay_unpaired_and_empty_sides_say_why() {
    let g = [function(
        "0000:01:00.0",
        "pci0000:00",
        &["0000:00:01.0"],
        Some(0),
    )];
    let n = [
        function("0000:05:00.0", "pci0000:00", &["0000:00:1c.0"], Some(0)),
        function("0000:06:00.0", "pci0000:00", &["0000:00:01.0"], Some(0)),
    ];
    let pairing = pair_devices(&g.iter().collect::<Vec<_>>(), &n.iter().collect::<Vec<_>>());
    assert_eq!(pairing.pairs.len(), 1);
    assert_eq!(pairing.pairs[0].nic, addr("0000:06:00.0"));
    assert_eq!(pairing.pairs[0].affinity, Affinity::Pix);
    assert_eq!(pairing.unpaired_nics, vec![addr("0000:05:00.0")]);
    let none = pair_devices(&g.iter().collect::<Vec<_>>(), &[]);
    assert!(none.pairs.is_empty());
    assert!(none.reason.unwrap().contains("no network interfaces"));
}

#[test]
fn device_names_round_trip_through_inventory_lookup() {
    let inv = Inventory::default();
    assert!(inv.device_by_name("gpu-0000-1b-00-0").is_none());
    assert!(inv.device_by_name("gpu-../../etc").is_none());
    assert!(inv.device_by_name("nic-0000-1b-00").is_none());
}

// ---- property tests over generated topologies ----

/// A generated machine: each device picks a root, a port below it and a leaf in a small
/// two-level switch tree, so that every affinity level occurs.
fn generated_device(index: usize, root: u8, port: u8, path: u8, numa_mode: u8) -> PciFunction {
    let domain = 0u32;
    let rbus = root * 0x20 + 1;
    let root_port = format!("{domain:04x}:{rbus:02x}:{port:02x}.0");
    let usp = format!("{domain:04x}:{:02x}:00.0", rbus + 1 + port * 4);
    let dsp = format!(
        "{domain:04x}:{:02x}:{:02x}.0",
        rbus + 2 + port * 4,
        path % 3
    );
    let usp2 = format!("{domain:04x}:{:02x}:00.0", rbus + 3 + port * 4);
    let dsp2 = format!(
        "{domain:04x}:{:02x}:{:02x}.0",
        rbus + 3 + port * 4,
        1 + path % 2
    );
    let bridges: Vec<&str> = match path % 4 {
        0 => vec![&root_port],
        1 | 2 => vec![&root_port, &usp, &dsp],
        _ => vec![&root_port, &usp, &dsp, &usp2, &dsp2],
    };
    // The kernel gives every function below a host bridge that bridge's NUMA node, so NUMA is
    // a property of the root: roots 0-1 on node 0, root 2 on node 1 (or unknown), root 3
    // unknown.
    let numa = match (root, numa_mode) {
        (3, _) | (2, 0) => None,
        _ => Some(u32::from(root / 2)),
    };
    let bdf = format!("{:04x}:{:02x}:{:02x}.{}", 1, index / 8, index % 8, 0);
    function(&bdf, &format!("pci{domain:04x}:{rbus:02x}"), &bridges, numa)
}

fn devices_strategy(max: usize) -> impl Strategy<Value = Vec<(u8, u8, u8, u8)>> {
    prop::collection::vec((0u8..4, 0u8..2, 0u8..8, 0u8..6), 0..=max)
}

fn build(spec: &[(u8, u8, u8, u8)], offset: usize) -> Vec<PciFunction> {
    spec.iter()
        .enumerate()
        .map(|(i, &(r, p, l, n))| generated_device(offset + i, r, p, l, n))
        .collect()
}

fn counts_of(assignment: &[usize], gpus: &[PciFunction], nics: &[PciFunction]) -> [usize; 5] {
    let mut counts = [0; 5];
    for (g, &n) in assignment.iter().enumerate() {
        counts[affinity(&gpus[g], &nics[n]).index()] += 1;
    }
    counts
}

/// Every assignment of GPUs to NICs that respects the per-NIC share (each GPU gets a NIC).
fn all_assignments(gpus: usize, nics: usize, share: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut current = vec![0; gpus];
    fn rec(i: usize, nics: usize, share: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if i == cur.len() {
            let ok = (0..nics).all(|n| cur.iter().filter(|&&x| x == n).count() <= share);
            if ok {
                out.push(cur.clone());
            }
            return;
        }
        for n in 0..nics {
            cur[i] = n;
            rec(i + 1, nics, share, cur, out);
        }
    }
    rec(0, nics, share, &mut current, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn pairing_is_never_worse_than_any_assignment(g in devices_strategy(5), n in devices_strategy(5)) {
        let gpus = build(&g, 0);
        let nics = build(&n, 100);
        let pairing = pair_devices(&gpus.iter().collect::<Vec<_>>(), &nics.iter().collect::<Vec<_>>());
        if gpus.is_empty() || nics.is_empty() {
            prop_assert!(pairing.pairs.is_empty());
            return Ok(());
        }
        prop_assert_eq!(pairing.primary_pairs().count(), gpus.len());
        let ours = pairing.level_counts();
        let share = gpus.len().div_ceil(nics.len());
        for assignment in all_assignments(gpus.len(), nics.len(), share) {
            let theirs = counts_of(&assignment, &gpus, &nics);
            prop_assert!(ours >= theirs, "ours {:?} worse than {:?} ({:?})", ours, theirs, assignment);
        }
        // Each reported level is the true affinity of the pair.
        for p in &pairing.pairs {
            let gi = gpus.iter().find(|x| x.address == p.accelerator).unwrap();
            let ni = nics.iter().find(|x| x.address == p.nic).unwrap();
            prop_assert_eq!(p.affinity, affinity(gi, ni));
        }
    }

    #[test]
    fn pairing_is_deterministic_under_input_order(g in devices_strategy(8), n in devices_strategy(8)) {
        let gpus = build(&g, 0);
        let nics = build(&n, 100);
        let a = pair_devices(&gpus.iter().collect::<Vec<_>>(), &nics.iter().collect::<Vec<_>>());
        let b = pair_devices(&gpus.iter().rev().collect::<Vec<_>>(), &nics.iter().rev().collect::<Vec<_>>());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn equal_pair_group_means_best_available_level(g in devices_strategy(10), n in devices_strategy(10)) {
        let gpus = build(&g, 0);
        let nics = build(&n, 100);
        let inventory = inventory_of(&gpus, &nics);
        let groups = pair_groups(&inventory);
        for gpu in &gpus {
            let best_for_gpu = nics.iter().map(|n| affinity(gpu, n)).min();
            for nic in &nics {
                if groups.contains_key(&gpu.address) && groups.get(&gpu.address) == groups.get(&nic.address) {
                    let best_for_nic = gpus.iter().map(|g| affinity(g, nic)).min();
                    prop_assert_eq!(Some(affinity(gpu, nic)), best_for_gpu);
                    prop_assert_eq!(Some(affinity(gpu, nic)), best_for_nic);
                }
            }
            // Every GPU with a NIC on the node has a group, and a NIC that is best for it
            // and for which it is best shares it.
            if !nics.is_empty() {
                prop_assert!(groups.contains_key(&gpu.address));
            }
            for nic in &nics {
                let level = affinity(gpu, nic);
                let best_for_nic = gpus.iter().map(|g| affinity(g, nic)).min();
                if Some(level) == best_for_gpu && Some(level) == best_for_nic {
                    prop_assert_eq!(groups.get(&gpu.address), groups.get(&nic.address));
                }
            }
        }
    }
}

#[test]
fn ties_go_to_a_card_no_pair_uses_yet() {
    // Two GPUs and two dual-port cards, each on its own root in NUMA node 0: one port of
    // each card, not both ports of the first.
    let gpus = [
        function("0008:06:00.0", "pci0008:00", &["0008:00:00.0"], Some(0)),
        function("0009:06:00.0", "pci0009:00", &["0009:00:00.0"], Some(0)),
    ];
    let nics = [
        function("0000:03:00.0", "pci0000:00", &["0000:00:00.0"], Some(0)),
        function("0000:03:00.1", "pci0000:00", &["0000:00:00.0"], Some(0)),
        function("0002:03:00.0", "pci0002:00", &["0002:00:00.0"], Some(0)),
        function("0002:03:00.1", "pci0002:00", &["0002:00:00.0"], Some(0)),
    ];
    let pairing = pair_devices(
        &gpus.iter().collect::<Vec<_>>(),
        &nics.iter().collect::<Vec<_>>(),
    );
    let chosen: Vec<PciAddress> = pairing.pairs.iter().map(|p| p.nic).collect();
    assert_eq!(chosen, [addr("0000:03:00.0"), addr("0002:03:00.0")]);
    assert!(pairing.pairs.iter().all(|p| p.affinity == Affinity::Node));
    // NODE-level leftovers form no NIC sets.
    assert_eq!(pairing.unpaired_nics.len(), 2);
}

#[test]
fn nics_left_below_a_gpus_switch_join_its_set_and_farther_ones_do_not() {
    let rp = "0000:40:01.0";
    let usp = "0000:41:00.0";
    let gpu = function(
        "0000:43:00.0",
        "pci0000:40",
        &[rp, usp, "0000:42:00.0"],
        Some(0),
    );
    let below = |bdf: &str, port: &str| function(bdf, "pci0000:40", &[rp, usp, port], Some(0));
    let nics = [
        below("0000:44:00.0", "0000:42:01.0"),
        below("0000:45:00.0", "0000:42:02.0"),
        below("0000:46:00.0", "0000:42:03.0"),
        // Same NUMA node, another root: as good as nothing for a set.
        function("0000:90:00.0", "pci0000:8f", &["0000:8f:01.0"], Some(0)),
    ];
    let pairing = pair_devices(&[&gpu], &nics.iter().collect::<Vec<_>>());
    let set: Vec<(PciAddress, Affinity)> = pairing
        .nics_of(&gpu.address)
        .map(|p| (p.nic, p.affinity))
        .collect();
    assert_eq!(
        set,
        [
            (addr("0000:44:00.0"), Affinity::Pix),
            (addr("0000:45:00.0"), Affinity::Pix),
            (addr("0000:46:00.0"), Affinity::Pix),
        ]
    );
    assert_eq!(pairing.unpaired_nics, [addr("0000:90:00.0")]);
    assert_eq!(pairing.primary_pairs().count(), 1);
    assert_eq!(pairing.level_counts(), [1, 0, 0, 0, 0]);
}

#[test]
fn frontend_nics_pair_only_when_no_fabric_nic_is_left() {
    let gpu = function("0000:1b:00.0", "pci0000:15", &["0000:15:01.0"], Some(0));
    let frontend = function("0000:18:00.0", "pci0000:15", &["0000:15:02.0"], Some(0));
    let fabric = function("0000:90:00.0", "pci0000:8f", &["0000:8f:01.0"], Some(1));
    let mut inventory = inventory_of(
        std::slice::from_ref(&gpu),
        &[frontend.clone(), fabric.clone()],
    );
    inventory.nics[0].frontend = Some("carries the default route".into());
    let pairing = pair_node(&inventory);
    // SYS to a fabric NIC beats PHB to the frontend.
    assert_eq!(pairing.pairs[0].nic, fabric.address);
    assert_eq!(pairing.pairs[0].affinity, Affinity::Sys);
    assert_eq!(pairing.unpaired_nics, [frontend.address]);
    // With only frontends left, the GPU still gets one, and the note says why.
    inventory.nics.retain(|n| n.pci.address == frontend.address);
    let pairing = pair_node(&inventory);
    assert_eq!(pairing.pairs[0].nic, frontend.address);
    assert!(pairing.reason.as_deref().unwrap().contains("frontend"));
}

fn inventory_of(gpus: &[PciFunction], nics: &[PciFunction]) -> Inventory {
    use crate::topology::inventory::{AcceleratorKind, RdmaDevice};
    Inventory {
        accelerators: gpus
            .iter()
            .map(|p| Accelerator {
                pci: p.clone(),
                kind: AcceleratorKind::NvidiaGpu,
                model: "test".into(),
                uuid: None,
                minor: None,
                memory_bytes: None,
                vfio: false,
                char_devices: vec![],
            })
            .collect(),
        nics: nics
            .iter()
            .map(|p| Nic {
                pci: p.clone(),
                netdevs: vec![],
                rdma: Some(RdmaDevice {
                    name: format!("mlx5_{}", p.address.device),
                    node_guid: None,
                    ports: vec![],
                    char_devices: vec![],
                }),
                frontend: None,
            })
            .collect(),
        ..Default::default()
    }
}
