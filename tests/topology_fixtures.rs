//! The pairs a person would check by hand on each built-in fixture machine, read through the
//! real discovery code from trees in the kernel's layout, and `tandem topo` end to end.

use std::process::Command;
use tandem::fixture::{builtin, builtin_names, write_machine};
use tandem::names::{accelerator_device_name, nic_device_name};
use tandem::sysfs::discover;
use tandem::topology::{Affinity, Inventory, Pairing, PciAddress, pair_groups, pair_node};

fn machine(name: &str) -> (tempfile::TempDir, Inventory) {
    let dir = tandem::fixture::scratch_dir().unwrap();
    let description = builtin(name).unwrap_or_else(|| panic!("no builtin fixture {name}"));
    let roots = write_machine(&description, dir.path()).unwrap();
    let inventory = discover(&roots).unwrap();
    (dir, inventory)
}

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

/// (GPU BDF, NIC BDF, level) for every pair.
fn pairs_of(p: &Pairing) -> Vec<(String, String, Affinity)> {
    p.pairs
        .iter()
        .map(|p| (p.accelerator.to_string(), p.nic.to_string(), p.affinity))
        .collect()
}

fn rdma_name(inv: &Inventory, nic: &PciAddress) -> String {
    inv.nic(nic)
        .and_then(|n| n.rdma.as_ref())
        .map(|r| r.name.clone())
        .unwrap_or_default()
}

#[test]
fn dgx_h100_pairs_each_gpu_with_its_rail_hca_at_pix() {
    let (_dir, inv) = machine("dgx-h100");
    assert_eq!(inv.accelerators.len(), 8);
    assert!(inv.problems.is_empty(), "{:?}", inv.problems);
    let pairing = pair_node(&inv);
    let rails = [
        ("0000:1b:00.0", "mlx5_0"),
        ("0000:43:00.0", "mlx5_3"),
        ("0000:52:00.0", "mlx5_4"),
        ("0000:61:00.0", "mlx5_5"),
        ("0000:9d:00.0", "mlx5_6"),
        ("0000:c3:00.0", "mlx5_9"),
        ("0000:d1:00.0", "mlx5_10"),
        ("0000:df:00.0", "mlx5_11"),
    ];
    assert_eq!(pairing.pairs.len(), 8);
    for (gpu, hca) in rails {
        let pair = pairing.nic_for(&a(gpu)).unwrap();
        assert_eq!(rdma_name(&inv, &pair.nic), hca, "GPU {gpu}");
        assert_eq!(pair.affinity, Affinity::Pix, "GPU {gpu}");
    }
    // GPU1 goes with mlx5_3, the check from the DGX H100 user guide.
    assert_eq!(pairing.pairs[1].nic, a("0000:40:00.0"));
    // Storage HCAs and the management NIC stay unpaired.
    for spare in [
        "0000:29:00.0",
        "0000:29:00.1",
        "0000:aa:00.0",
        "0000:aa:00.1",
        "0000:0b:00.0",
    ] {
        assert!(pairing.unpaired_nics.contains(&a(spare)), "{spare}");
    }
    // Each rail is its own pair group, shared by exactly its GPU and HCA.
    let groups = pair_groups(&inv);
    for p in &pairing.pairs {
        let group = &groups[&p.accelerator];
        assert_eq!(group, &groups[&p.nic]);
        assert!(group.starts_with("switch-"), "{group}");
        assert_eq!(groups.values().filter(|g| *g == group).count(), 2);
    }
    // The management NIC has no RDMA, so it takes no part in pairing and has no group.
    assert!(!groups.contains_key(&a("0000:0b:00.0")));
    assert_eq!(groups[&a("0000:29:00.0")], "numa-0");
}

#[test]
fn aws_p4d_gpus_share_the_efa_of_their_root() {
    let (_dir, inv) = machine("aws-p4d");
    let pairing = pair_node(&inv);
    assert_eq!(
        pairs_of(&pairing)[..2],
        [
            ("0000:10:1c.0".into(), "0000:10:1b.0".into(), Affinity::Phb),
            ("0000:10:1d.0".into(), "0000:10:1b.0".into(), Affinity::Phb),
        ]
    );
    assert_eq!(pairing.pairs.len(), 8);
    for p in &pairing.pairs {
        assert_eq!(p.affinity, Affinity::Phb);
        assert_eq!(p.accelerator.bus, p.nic.bus, "same root complex");
        assert!(
            inv.nic(&p.nic).unwrap().netdevs.is_empty(),
            "EFA has no netdev"
        );
    }
    // ENA interfaces are not RDMA and stay out.
    assert_eq!(pairing.unpaired_nics.len(), 4);
    // numa_node is -1 in the VM; the node comes from local_cpulist.
    let gpu = inv.accelerator(&a("0000:90:1c.0")).unwrap();
    assert_eq!(gpu.pci.numa_node, Some(1));
    let groups = pair_groups(&inv);
    assert_eq!(groups[&a("0000:10:1c.0")], "pci0000-10");
    assert_eq!(groups[&a("0000:10:1b.0")], "pci0000-10");
}

#[test]
fn gb200_pairs_by_numa_node_spread_over_physical_cards() {
    let (_dir, inv) = machine("gb200");
    let pairing = pair_node(&inv);
    // Each GPU gets a port of its own dual-port card: two GPUs on the two ports of one card
    // would share its PCIe link while the other card on the node idled.
    assert_eq!(
        pairs_of(&pairing),
        vec![
            ("0008:06:00.0".into(), "0000:03:00.0".into(), Affinity::Node),
            ("0009:06:00.0".into(), "0002:03:00.0".into(), Affinity::Node),
            ("0018:06:00.0".into(), "0010:03:00.0".into(), Affinity::Node),
            ("0019:06:00.0".into(), "0012:03:00.0".into(), Affinity::Node),
        ]
    );
    let cards: std::collections::BTreeSet<(u32, u8, u8)> = pairing
        .pairs
        .iter()
        .map(|p| (p.nic.domain, p.nic.bus, p.nic.device))
        .collect();
    assert_eq!(cards.len(), 4, "four different physical cards");
    // NICs at NODE level form no sets: the second ports stay free.
    assert_eq!(pairing.unpaired_nics.len(), 4);
    // pcieRoot never matches here; the pair group is the NUMA node.
    let groups = pair_groups(&inv);
    assert_eq!(groups[&a("0008:06:00.0")], "numa-0");
    assert_eq!(groups[&a("0002:03:00.1")], "numa-0");
    assert_eq!(groups[&a("0019:06:00.0")], "numa-1");
}

#[test]
fn gke_a4_pairs_gpu_n_with_gpu_n_rdma0() {
    let (_dir, inv) = machine("gke-a4");
    let pairing = pair_node(&inv);
    assert_eq!(pairing.pairs.len(), 8);
    for (i, p) in pairing.pairs.iter().enumerate() {
        assert_eq!(p.affinity, Affinity::Pix);
        let nic = inv.nic(&p.nic).unwrap();
        assert_eq!(nic.if_name(), Some(format!("gpu{i}rdma0").as_str()));
    }
    assert_eq!(
        pairing.unpaired_nics,
        vec![a("0000:00:04.0")],
        "gVNIC stays out"
    );
}

#[test]
fn workstation_pairs_its_ethernet_nic() {
    let (_dir, inv) = machine("workstation");
    let pairing = pair_node(&inv);
    assert_eq!(
        pairs_of(&pairing),
        vec![("0000:01:00.0".into(), "0000:05:00.0".into(), Affinity::Phb)]
    );
    assert!(pairing.reason.unwrap().contains("no RDMA NIC"));
}

#[test]
fn gpu_only_has_no_pairs_and_says_why() {
    let (_dir, inv) = machine("gpu-only");
    assert_eq!(inv.accelerators.len(), 5);
    assert!(inv.nics.is_empty());
    let pairing = pair_node(&inv);
    assert!(pairing.pairs.is_empty());
    assert!(pairing.reason.unwrap().contains("no network interfaces"));
    assert!(pair_groups(&inv).is_empty());
}

#[test]
fn large_pairs_every_gpu_once() {
    let (_dir, inv) = machine("large");
    assert!(inv.accelerators.len() >= 64 && inv.nics.len() >= 64);
    let pairing = pair_node(&inv);
    assert_eq!(pairing.pairs.len(), inv.accelerators.len());
    let mut nics: Vec<_> = pairing.pairs.iter().map(|p| p.nic).collect();
    nics.sort();
    nics.dedup();
    assert_eq!(nics.len(), pairing.pairs.len(), "one NIC per GPU");
    let counts = pairing.level_counts();
    assert!(
        counts[0] > 0 && counts[0] < pairing.pairs.len(),
        "{counts:?}"
    );
}

#[test]
fn every_builtin_fixture_discovers_without_problems() {
    for name in builtin_names() {
        let (_dir, inv) = machine(name);
        assert!(inv.problems.is_empty(), "{name}: {:?}", inv.problems);
        assert!(!inv.accelerators.is_empty(), "{name}");
    }
}

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn topo_json_on_a_tree_written_by_tandem_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let written = tandem(&["fixture", "dgx-h100", "--out", out.to_str().unwrap()]);
    assert!(written.status.success(), "{written:?}");
    let sys = out.join("sys");
    let proc = out.join("proc");
    let dev = out.join("dev");
    let topo = tandem(&[
        "topo",
        "--sysfs-root",
        sys.to_str().unwrap(),
        "--proc-root",
        proc.to_str().unwrap(),
        "--dev-root",
        dev.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(topo.status.success(), "{topo:?}");
    let json: serde_json::Value = serde_json::from_slice(&topo.stdout).unwrap();
    assert_eq!(json["gpus"].as_array().unwrap().len(), 8);
    assert_eq!(json["nics"].as_array().unwrap().len(), 13);
    let gpu1 = accelerator_device_name(&a("0000:43:00.0"));
    let pair = json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["gpu"] == gpu1.as_str())
        .unwrap();
    assert_eq!(pair["nic"], nic_device_name(&a("0000:40:00.0")).as_str());
    assert_eq!(pair["affinity"], "PIX");
    let first_gpu = &json["gpus"][0];
    for key in ["name", "pciBusID", "pcieRoot", "numaNode"] {
        assert!(!first_gpu[key].is_null(), "gpu {key}");
    }
    let first_nic = &json["nics"][0];
    for key in ["name", "pciBusID", "pcieRoot", "numaNode", "ifName"] {
        assert!(!first_nic[key].is_null(), "nic {key}");
    }
    assert!(first_nic.get("rdmaDevice").is_some());
}

#[test]
fn topo_text_on_a_fixture_shows_matrix_and_pairs() {
    let topo = tandem(&["topo", "--fixture", "dgx-h100"]);
    assert!(topo.status.success(), "{topo:?}");
    let text = String::from_utf8(topo.stdout).unwrap();
    assert!(text.contains("Affinity"), "{text}");
    assert!(text.contains("GPU1"), "{text}");
    let gpu1_pair = text
        .lines()
        .find(|l| l.contains("gpu-0000-43-00-0 <->"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        gpu1_pair.contains("mlx5_3") && gpu1_pair.contains("PIX"),
        "{gpu1_pair}"
    );
}

#[test]
fn topo_on_an_empty_root_fails_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let topo = tandem(&["topo", "--sysfs-root", dir.path().to_str().unwrap()]);
    assert!(!topo.status.success());
    let err = String::from_utf8_lossy(&topo.stderr);
    assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
}

#[test]
fn topo_on_a_machine_without_accelerators_says_so_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
    let topo = tandem(&[
        "topo",
        "--sysfs-root",
        dir.path().join("sys").to_str().unwrap(),
        "--proc-root",
        dir.path().join("proc").to_str().unwrap(),
    ]);
    assert!(topo.status.success(), "{topo:?}");
    assert!(String::from_utf8_lossy(&topo.stdout).contains("no accelerators"));
}

#[test]
fn unknown_fixture_lists_the_valid_names() {
    let topo = tandem(&["topo", "--fixture", "nope"]);
    assert!(!topo.status.success());
    let err = String::from_utf8_lossy(&topo.stderr);
    assert!(err.contains("dgx-h100") && err.contains("gb200"), "{err}");
}

#[test]
fn an_accelerator_under_an_unknown_path_shape_is_a_problem_and_topo_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let written = tandem(&["fixture", "workstation", "--out", out.to_str().unwrap()]);
    assert!(written.status.success(), "{written:?}");
    // The GPU moved below a bus discovery does not know: a PCI function hanging off a
    // platform device with no PCI host bridge on the way.
    let sys = out.join("sys");
    let old = sys.join("devices/pci0000:00/0000:00:01.0/0000:01:00.0");
    let new = sys.join("devices/platform/strange-bus/0000:01:00.0");
    std::fs::create_dir_all(new.parent().unwrap()).unwrap();
    std::fs::rename(&old, &new).unwrap();
    let link = sys.join("bus/pci/devices/0000:01:00.0");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("../../../devices/platform/strange-bus/0000:01:00.0", &link)
        .unwrap();

    let inventory = discover(&tandem::sysfs::MachineRoots::under(&out)).unwrap();
    assert!(inventory.accelerators.is_empty());
    assert_eq!(inventory.lost_accelerators(), 1);
    let problem = inventory
        .problems
        .iter()
        .find(|p| p.device == Some(a("0000:01:00.0")))
        .expect("a problem naming the GPU");
    assert!(
        problem.path.ends_with("bus/pci/devices/0000:01:00.0"),
        "{problem}"
    );
    assert!(problem.message.contains("strange-bus"), "{problem}");

    for format in ["text", "json"] {
        let topo = tandem(&[
            "topo",
            "--sysfs-root",
            sys.to_str().unwrap(),
            "--proc-root",
            out.join("proc").to_str().unwrap(),
            "-o",
            format,
        ]);
        assert_eq!(topo.status.code(), Some(3), "{topo:?}");
        let stdout = String::from_utf8_lossy(&topo.stdout);
        assert!(stdout.contains("strange-bus"), "{stdout}");
        assert!(!stdout.contains("no accelerators found"), "{stdout}");
    }
}

/// Every GPU paired with a fabric NIC, no NIC shared while a fabric NIC is free.
fn assert_fabric_pairs_without_sharing(inv: &Inventory, pairing: &Pairing) {
    use tandem::topology::NicRole;
    let gpus: std::collections::BTreeSet<_> = pairing.pairs.iter().map(|p| p.accelerator).collect();
    assert_eq!(gpus.len(), inv.accelerators.len(), "every GPU paired");
    let mut seen = std::collections::BTreeSet::new();
    for p in &pairing.pairs {
        assert_eq!(inv.nic(&p.nic).unwrap().role(), NicRole::Fabric, "{p:?}");
        assert!(seen.insert(p.nic), "NIC {} shared", p.nic);
    }
}

#[test]
fn azure_nd_h100_v5_on_vmbus_pairs_each_gpu_with_an_ib_vf_of_its_numa_node() {
    let (_dir, inv) = machine("azure-nd-h100-v5");
    assert!(inv.problems.is_empty(), "{:?}", inv.problems);
    assert_eq!(inv.accelerators.len(), 8);
    assert_eq!(inv.nics.len(), 9);
    // Each device is its own root: the pci<dom>:00 element of its VMBus path.
    let gpu = inv.accelerator(&a("0008:00:00.0")).unwrap();
    assert_eq!(gpu.pci.pcie_root, "pci0008:00");
    assert!(gpu.pci.bridges.is_empty());
    // The accelerated-networking VF is RDMA-capable but the frontend, and stays unpaired
    // though its address sorts before every IB VF.
    let an = inv.nic(&a("00b5:00:02.0")).unwrap();
    assert!(an.is_rdma());
    assert_eq!(an.role(), tandem::topology::NicRole::Frontend);
    assert!(
        an.frontend.as_deref().unwrap().contains("eth0"),
        "{:?}",
        an.frontend
    );
    let pairing = pair_node(&inv);
    assert_fabric_pairs_without_sharing(&inv, &pairing);
    let expected = [
        ("0001:00:00.0", "mlx5_ib0"),
        ("0002:00:00.0", "mlx5_ib1"),
        ("0003:00:00.0", "mlx5_ib2"),
        ("0008:00:00.0", "mlx5_ib3"),
        ("0009:00:00.0", "mlx5_ib4"),
        ("000a:00:00.0", "mlx5_ib5"),
        ("000b:00:00.0", "mlx5_ib6"),
        ("000c:00:00.0", "mlx5_ib7"),
    ];
    for (gpu, ib) in expected {
        let pair = pairing.nic_for(&a(gpu)).unwrap();
        assert_eq!(rdma_name(&inv, &pair.nic), ib, "GPU {gpu}");
        assert_eq!(
            pair.affinity,
            Affinity::Node,
            "no switch information on VMBus"
        );
    }
    assert_eq!(pairing.unpaired_nics, vec![a("00b5:00:02.0")]);
    // pcieRoot never matches across devices here; the pair group is the NUMA node.
    let groups = pair_groups(&inv);
    assert_eq!(groups[&a("0001:00:00.0")], "numa-0");
    assert_eq!(groups[&a("0105:00:00.0")], "numa-1");
    assert!(
        !groups.contains_key(&a("00b5:00:02.0")),
        "frontend takes no part"
    );
}

#[test]
fn azure_ndv4_pairs_two_gpus_with_two_ib_vfs_on_each_of_four_numa_nodes() {
    let (_dir, inv) = machine("azure-ndv4");
    assert!(inv.problems.is_empty(), "{:?}", inv.problems);
    let pairing = pair_node(&inv);
    assert_fabric_pairs_without_sharing(&inv, &pairing);
    // The pairs of Azure's own NCCL topology file for NDv4.
    for (gpu, ib) in [
        ("0003:00:00.0", "0103:00:00.0"),
        ("0004:00:00.0", "0104:00:00.0"),
        ("0001:00:00.0", "0101:00:00.0"),
        ("0002:00:00.0", "0102:00:00.0"),
        ("000d:00:00.0", "0107:00:00.0"),
        ("000e:00:00.0", "0108:00:00.0"),
        ("000b:00:00.0", "0105:00:00.0"),
        ("000c:00:00.0", "0106:00:00.0"),
    ] {
        let pair = pairing.nic_for(&a(gpu)).unwrap();
        assert_eq!(pair.nic, a(ib), "GPU {gpu}");
        assert_eq!(pair.affinity, Affinity::Node);
    }
}

#[test]
fn aws_p5_pairs_each_gpu_with_the_four_efa_devices_below_its_switch() {
    let (_dir, inv) = machine("aws-p5");
    assert!(inv.problems.is_empty(), "{:?}", inv.problems);
    assert_eq!(inv.accelerators.len(), 8);
    assert_eq!(inv.nics.iter().filter(|n| n.is_rdma()).count(), 32);
    let pairing = pair_node(&inv);
    assert_fabric_pairs_without_sharing(&inv, &pairing);
    assert_eq!(pairing.pairs.len(), 32);
    for gpu in &inv.accelerators {
        let set: Vec<_> = pairing.nics_of(&gpu.pci.address).collect();
        assert_eq!(set.len(), 4, "GPU {}", gpu.pci.address);
        for p in &set {
            assert_eq!(p.affinity, Affinity::Pix);
            assert!(
                inv.nic(&p.nic).unwrap().netdevs.is_empty(),
                "EFA is RDMA-only"
            );
        }
        // The primary comes first, the rest in BDF order.
        let nics: Vec<_> = set.iter().map(|p| p.nic).collect();
        let mut sorted = nics.clone();
        sorted.sort();
        assert_eq!(nics, sorted);
    }
    assert_eq!(pairing.level_counts(), [8, 0, 0, 0, 0]);
    assert_eq!(
        pairing.unpaired_nics,
        vec![a("0000:00:05.0")],
        "ENA stays out"
    );
    let groups = pair_groups(&inv);
    let gpu0 = inv.accelerators[0].pci.address;
    for p in pairing.nics_of(&gpu0) {
        assert_eq!(groups[&p.nic], groups[&gpu0]);
    }

    // tandem topo shows the set: one pair per GPU, its NICs listed in pairing order.
    let topo = tandem(&["topo", "--fixture", "aws-p5", "-o", "json"]);
    assert!(topo.status.success(), "{topo:?}");
    let json: serde_json::Value = serde_json::from_slice(&topo.stdout).unwrap();
    let pairs = json["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 8);
    let first = &pairs[0];
    assert_eq!(first["gpu"], accelerator_device_name(&gpu0).as_str());
    let nics: Vec<String> = pairing
        .nics_of(&gpu0)
        .map(|p| nic_device_name(&p.nic))
        .collect();
    assert_eq!(first["nic"], nics[0].as_str());
    assert_eq!(first["nics"], serde_json::json!(nics));
}

#[test]
fn a_claim_for_one_p5_gpu_with_its_nics_lists_the_whole_set_in_pairing_order() {
    use tandem::prepare::config::EnvFlavour;
    use tandem::prepare::env::claim_env;
    use tandem::prepare::topology_file::{ClaimTopology, TopologyNic, TopologyPair};
    use tandem::topology::pair_devices;

    let (_dir, inv) = machine("aws-p5");
    let gpu = &inv.accelerators[2];
    let node = pair_node(&inv);
    // The claim got the GPU and the four EFA of its set, in any order.
    let mut set: Vec<_> = node
        .nics_of(&gpu.pci.address)
        .map(|p| inv.nic(&p.nic).unwrap())
        .collect();
    set.reverse();
    let pairing = pair_devices(&[&gpu.pci], &set.iter().map(|n| &n.pci).collect::<Vec<_>>());
    assert_eq!(
        pairing.pairs,
        node.nics_of(&gpu.pci.address).copied().collect::<Vec<_>>()
    );

    let topology = ClaimTopology {
        claim_uid: "uid".into(),
        namespace: "ml".into(),
        name: "one-gpu-with-its-nics".into(),
        gpus: Vec::new(),
        nics: set
            .iter()
            .map(|n| TopologyNic {
                name: nic_device_name(&n.pci.address),
                pci_bus_id: n.pci.address.to_string(),
                pcie_root: n.pci.pcie_root.clone(),
                numa_node: n.pci.numa_node,
                if_name: None,
                rdma_device: n.rdma.as_ref().map(|r| r.name.clone()),
                rdma_port: Some(1),
                shared: false,
            })
            .collect(),
        pairs: pairing
            .pairs
            .iter()
            .map(|p| TopologyPair {
                gpu: accelerator_device_name(&p.accelerator),
                nic: nic_device_name(&p.nic),
                affinity: p.affinity,
            })
            .collect(),
        unpaired_gpus: Vec::new(),
        unpaired_nics: Vec::new(),
        reason: None,
    };
    let env = claim_env(EnvFlavour::Nccl, &topology);
    let in_order: Vec<String> = pairing
        .pairs
        .iter()
        .map(|p| rdma_name(&inv, &p.nic))
        .collect();
    assert_eq!(in_order.len(), 4);
    let hca = env.iter().find(|e| e.starts_with("NCCL_IB_HCA=")).unwrap();
    assert_eq!(hca, &format!("NCCL_IB_HCA=={}", in_order.join(",")));
    let pairs = env.iter().find(|e| e.starts_with("TANDEM_PAIRS=")).unwrap();
    assert_eq!(pairs.matches(":PIX").count(), 4, "{pairs}");
}

#[test]
fn the_accelerated_networking_vf_is_a_frontend_by_its_master_or_its_name() {
    use tandem::fixture::DeviceKind;
    use tandem::topology::NicRole;
    let an = a("00b5:00:02.0");
    let discover_variant = |edit: &dyn Fn(&mut tandem::fixture::DeviceSpec)| {
        let mut desc = builtin("azure-nd-h100-v5").unwrap();
        let spec = desc
            .devices
            .iter_mut()
            .find(|d| d.path == "00b5:00:02.0")
            .unwrap();
        edit(spec);
        let dir = tandem::fixture::scratch_dir().unwrap();
        let inv = discover(&write_machine(&desc, dir.path()).unwrap()).unwrap();
        assert!(inv.problems.is_empty(), "{:?}", inv.problems);
        (dir, inv)
    };
    // Without the netvsc master, Azure's udev name still tells.
    let (_d1, inv) = discover_variant(&|spec| spec.overrides.netvsc_master = None);
    let nic = inv.nic(&an).unwrap();
    assert_eq!(nic.role(), NicRole::Frontend);
    assert!(nic.frontend.as_deref().unwrap().contains("mlx5_an0"));
    // With neither, it is an RDMA NIC like any other, and its low address wins a NODE tie:
    // the mistake the frontend rule prevents.
    let (_d2, inv) = discover_variant(&|spec| {
        spec.overrides.netvsc_master = None;
        if let DeviceKind::Nic(nic) = &mut spec.kind {
            nic.rdma.as_mut().unwrap().name = "mlx5_8".into();
        }
    });
    assert_eq!(inv.nic(&an).unwrap().role(), NicRole::Fabric);
    assert_eq!(pair_node(&inv).nic_for(&a("0001:00:00.0")).unwrap().nic, an);
}
