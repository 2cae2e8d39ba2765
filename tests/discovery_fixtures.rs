//! Discovery over every built-in fixture machine, written to disk in the kernel's layout:
//! device counts and the facts pairing and claim preparation rely on (models, bridges, RDMA
//! ports, NUMA, char devices), with no problems on a healthy machine.

use tandem::fixture::{builtin, builtin_names, write_machine};
use tandem::sysfs::discover;
use tandem::topology::{
    Accelerator, AcceleratorKind, CharDevice, Inventory, Nic, NumaSource, PciAddress,
};

fn discover_builtin(name: &str) -> Inventory {
    let desc = builtin(name).unwrap_or_else(|| panic!("no builtin {name}"));
    let dir = tandem::fixture::scratch_dir().unwrap();
    let roots = write_machine(&desc, dir.path()).unwrap();
    discover(&roots).unwrap()
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn accelerator<'a>(inventory: &'a Inventory, bdf: &str) -> &'a Accelerator {
    let address = addr(bdf);
    inventory
        .accelerators
        .iter()
        .find(|a| a.pci.address == address)
        .unwrap_or_else(|| panic!("no accelerator {bdf}"))
}

fn nic<'a>(inventory: &'a Inventory, bdf: &str) -> &'a Nic {
    let address = addr(bdf);
    inventory
        .nics
        .iter()
        .find(|n| n.pci.address == address)
        .unwrap_or_else(|| panic!("no NIC {bdf}"))
}

fn char_device(path: &str, major: u32, minor: u32) -> CharDevice {
    CharDevice {
        path: path.to_string(),
        major,
        minor,
    }
}

fn assert_sorted(inventory: &Inventory) {
    let gpus: Vec<_> = inventory
        .accelerators
        .iter()
        .map(|a| a.pci.address)
        .collect();
    assert!(gpus.is_sorted(), "{gpus:?}");
    let nics: Vec<_> = inventory.nics.iter().map(|n| n.pci.address).collect();
    assert!(nics.is_sorted(), "{nics:?}");
    for nic in &inventory.nics {
        let names: Vec<_> = nic.netdevs.iter().map(|n| n.name.as_str()).collect();
        assert!(names.is_sorted(), "{names:?}");
    }
}

#[test]
fn every_builtin_discovers_without_problems() {
    let expected: &[(&str, usize, usize)] = &[
        ("aws-p4d", 8, 8),
        ("aws-p5", 8, 33),
        ("azure-nd-h100-v5", 8, 9),
        ("azure-ndv4", 8, 9),
        ("dgx-h100", 8, 13),
        ("gb200", 4, 8),
        ("gke-a4", 8, 9),
        ("gpu-only", 5, 0),
        ("large", 64, 64),
        ("mi300x", 8, 8),
        ("workstation", 1, 1),
    ];
    assert_eq!(
        expected.len(),
        builtin_names().len(),
        "a builtin is not covered here"
    );
    for &(name, accelerators, nics) in expected {
        let inventory = discover_builtin(name);
        assert!(
            inventory.problems.is_empty(),
            "{name}: {:#?}",
            inventory.problems
        );
        assert_eq!(
            inventory.accelerators.len(),
            accelerators,
            "{name} accelerators"
        );
        assert_eq!(inventory.nics.len(), nics, "{name} NICs");
        assert_sorted(&inventory);
    }
}

#[test]
fn dgx_h100() {
    let inventory = discover_builtin("dgx-h100");
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    assert_eq!(inventory.accelerators.len(), 8);
    assert_eq!(inventory.nics.len(), 13);
    for gpu in &inventory.accelerators {
        assert_eq!(gpu.kind, AcceleratorKind::NvidiaGpu);
        assert_eq!(gpu.model, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpu.pci.driver.as_deref(), Some("nvidia"));
        assert!(
            gpu.uuid.as_deref().is_some_and(|u| u.starts_with("GPU-")),
            "{:?}",
            gpu.uuid
        );
        let minor = gpu.minor.unwrap();
        assert_eq!(
            gpu.char_devices,
            vec![char_device(&format!("nvidia{minor}"), 195, minor)]
        );
    }

    let gpu0 = accelerator(&inventory, "0000:1b:00.0");
    assert_eq!(gpu0.minor, Some(0));
    assert_eq!(gpu0.pci.pcie_root, "pci0000:15");
    assert_eq!(
        gpu0.pci.bridges,
        vec![
            addr("0000:15:01.0"),
            addr("0000:16:00.0"),
            addr("0000:17:03.0")
        ]
    );
    assert_eq!(
        (gpu0.pci.vendor_id, gpu0.pci.device_id, gpu0.pci.class),
        (0x10de, 0x2330, 0x030200)
    );
    assert_eq!(gpu0.pci.subsystem_device_id, Some(0x16c1));
    assert_eq!(gpu0.pci.vendor_name.as_deref(), Some("NVIDIA Corporation"));
    assert!(
        gpu0.pci.device_name.is_some(),
        "the PCI database knows the H100"
    );
    assert_eq!(
        (gpu0.pci.numa_node, gpu0.pci.numa_source),
        (Some(0), NumaSource::Sysfs)
    );
    assert_eq!(gpu0.pci.aer_fatal, Some(0));
    assert!(gpu0.pci.link_speed.is_some() && gpu0.pci.link_width.is_some());
    assert!(gpu0.pci.iommu_group.is_some());
    assert_eq!(
        accelerator(&inventory, "0000:df:00.0").pci.numa_node,
        Some(1)
    );

    let hca0 = nic(&inventory, "0000:18:00.0");
    assert_eq!(hca0.pci.driver.as_deref(), Some("mlx5_core"));
    assert_eq!(
        hca0.pci.bridges,
        vec![
            addr("0000:15:01.0"),
            addr("0000:16:00.0"),
            addr("0000:17:00.0")
        ]
    );
    assert_eq!(hca0.if_name(), Some("ibp24s0"));
    assert_eq!(hca0.netdevs[0].if_type, Some(32));
    assert_eq!(hca0.netdevs[0].speed_mbps, Some(400_000));
    assert_eq!(hca0.pci.sriov.map(|s| s.total_vfs), Some(16));
    let rdma = hca0.rdma.as_ref().unwrap();
    assert_eq!(rdma.name, "mlx5_0");
    assert!(rdma.node_guid.is_some());
    assert_eq!(rdma.ports.len(), 1);
    let port = &rdma.ports[0];
    assert_eq!(port.number, 1);
    assert_eq!(port.state.as_deref(), Some("ACTIVE"));
    assert_eq!(port.phys_state.as_deref(), Some("LinkUp"));
    assert_eq!(port.link_layer.as_deref(), Some("InfiniBand"));
    assert_eq!(port.rate_gbps, Some(400));
    let paths: Vec<_> = rdma.char_devices.iter().map(|c| c.path.as_str()).collect();
    assert!(paths.contains(&"infiniband/uverbs0"), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.starts_with("infiniband/umad")),
        "{paths:?}"
    );
    assert!(
        paths.iter().any(|p| p.starts_with("infiniband/issm")),
        "{paths:?}"
    );
    let uverbs0 = rdma
        .char_devices
        .iter()
        .find(|c| c.path == "infiniband/uverbs0")
        .unwrap();
    assert_eq!((uverbs0.major, uverbs0.minor), (231, 192));

    // The rail HCA numbering skips the storage ports.
    assert_eq!(
        nic(&inventory, "0000:40:00.0").rdma.as_ref().unwrap().name,
        "mlx5_3"
    );
    assert_eq!(nic(&inventory, "0000:dc:00.0").if_name(), Some("ibp220s0"));
    // The management port: plain Ethernet, no RDMA.
    let mgmt = nic(&inventory, "0000:0b:00.0");
    assert!(!mgmt.is_rdma());
    assert_eq!(mgmt.if_name(), Some("eno3"));
    assert_eq!(mgmt.pci.link_width, Some(4));
    // docker0 lives under devices/virtual/net: no NIC carries it.
    assert!(
        inventory
            .nics
            .iter()
            .all(|n| n.netdevs.iter().all(|d| d.name != "docker0"))
    );

    assert_eq!(inventory.numa_nodes.len(), 2);
    assert_eq!(inventory.numa_nodes[0].cpulist, "0-55,112-167");
    assert_eq!(inventory.numa_nodes[1].distances, vec![21, 10]);
    assert_eq!(
        inventory.host.nvidia_driver_version.as_deref(),
        Some("580.95.05")
    );
    let shared: Vec<_> = inventory
        .host
        .shared_char_devices
        .iter()
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(
        shared,
        [
            "nvidiactl",
            "nvidia-uvm",
            "nvidia-uvm-tools",
            "infiniband/rdma_cm"
        ]
    );
    assert_eq!(
        inventory.host.shared_char_devices[0],
        char_device("nvidiactl", 195, 255)
    );
    assert_eq!(inventory.host.shared_char_devices[1].minor, 0);
    assert_eq!(inventory.host.shared_char_devices[2].minor, 1);
}

#[test]
fn aws_p4d_efa_has_no_netdev_and_numa_comes_from_cpulist() {
    let inventory = discover_builtin("aws-p4d");
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    let efa = nic(&inventory, "0000:10:1b.0");
    assert!(efa.netdevs.is_empty());
    assert_eq!(efa.if_name(), None);
    let rdma = efa.rdma.as_ref().unwrap();
    assert_eq!(rdma.name, "rdmap16s27");
    assert_eq!(rdma.ports[0].rate_gbps, Some(100));
    let ena = nic(&inventory, "0000:10:01.0");
    assert!(!ena.is_rdma());
    assert_eq!(ena.if_name(), Some("ens33"));

    for function in inventory
        .accelerators
        .iter()
        .map(|a| &a.pci)
        .chain(inventory.nics.iter().map(|n| &n.pci))
    {
        assert_eq!(
            function.numa_source,
            NumaSource::LocalCpulist,
            "{}",
            function.address
        );
        assert!(
            function.bridges.is_empty(),
            "flat bus: {}",
            function.address
        );
    }
    assert_eq!(
        accelerator(&inventory, "0000:10:1c.0").pci.numa_node,
        Some(0)
    );
    assert_eq!(
        accelerator(&inventory, "0000:a0:1d.0").pci.numa_node,
        Some(1)
    );
    assert_eq!(
        accelerator(&inventory, "0000:a0:1d.0").pci.pcie_root,
        "pci0000:a0"
    );
    assert_eq!(accelerator(&inventory, "0000:a0:1d.0").minor, Some(7));
    assert_eq!(
        accelerator(&inventory, "0000:a0:1d.0").model,
        "NVIDIA A100-SXM4-40GB"
    );
}

#[test]
fn gpu_only_covers_amd_gaudi_and_vfio() {
    let inventory = discover_builtin("gpu-only");
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    assert!(inventory.nics.is_empty());

    let amd = accelerator(&inventory, "0000:05:00.0");
    assert_eq!(amd.kind, AcceleratorKind::AmdGpu);
    assert_eq!(amd.model, "AMD Instinct MI300X");
    assert_eq!(amd.memory_bytes, Some(206_158_430_208));
    assert_eq!(
        amd.char_devices,
        vec![
            char_device("dri/card1", 226, 1),
            char_device("dri/renderD128", 226, 128)
        ]
    );

    let gaudi = accelerator(&inventory, "0000:b3:00.0");
    assert_eq!(gaudi.kind, AcceleratorKind::ProcessingAccelerator);
    assert_eq!(gaudi.pci.driver.as_deref(), Some("habanalabs"));
    assert_eq!(gaudi.char_devices.len(), 1);
    assert_eq!(gaudi.char_devices[0].path, "accel/accel0");
    assert!(!gaudi.model.is_empty());

    let vfio = accelerator(&inventory, "0000:e1:00.0");
    assert!(vfio.vfio);
    assert_eq!(vfio.kind, AcceleratorKind::NvidiaGpu);
    assert_eq!(vfio.minor, None);
    assert_eq!(vfio.uuid, None);
    assert_eq!(vfio.pci.iommu_group, Some(87));
    assert_eq!(vfio.char_devices.len(), 1);
    assert_eq!(vfio.char_devices[0].path, "vfio/87");
    // Numbers from the group's class/vfio/87/dev: the first group bound gets minor 0.
    assert_eq!(
        (vfio.char_devices[0].major, vfio.char_devices[0].minor),
        (510, 0)
    );
    assert_eq!(
        vfio.model,
        vfio.pci.device_name.clone().unwrap(),
        "falls back to the PCI database"
    );

    let l40s = accelerator(&inventory, "0000:41:00.0");
    assert_eq!(l40s.model, "NVIDIA L40S");
    assert!(!l40s.vfio);

    let shared: Vec<_> = inventory
        .host
        .shared_char_devices
        .iter()
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(
        shared,
        ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "kfd"]
    );
}

#[test]
fn workstation_and_gb200() {
    let workstation = discover_builtin("workstation");
    let gpu = &workstation.accelerators[0];
    assert_eq!(gpu.model, "NVIDIA GeForce RTX 4090");
    assert_eq!(gpu.pci.class, 0x030000);
    assert!(!workstation.nics[0].is_rdma());
    assert_eq!(workstation.numa_nodes.len(), 1);
    assert!(
        workstation
            .host
            .shared_char_devices
            .iter()
            .all(|c| c.path != "infiniband/rdma_cm"),
        "no RDMA device, no rdma_cm"
    );

    let gb200 = discover_builtin("gb200");
    let mut roots: Vec<_> = gb200
        .accelerators
        .iter()
        .map(|a| a.pci.pcie_root.as_str())
        .chain(gb200.nics.iter().map(|n| n.pci.pcie_root.as_str()))
        .collect();
    roots.sort_unstable();
    roots.dedup();
    assert_eq!(
        roots.len(),
        8,
        "GPUs and NIC pairs each on their own root: {roots:?}"
    );
    assert_eq!(
        accelerator(&gb200, "0008:06:00.0").pci.pcie_root,
        "pci0008:00"
    );
}
