//! Fixture trees checked the way a reader of a real `/sys` would see them: links followed with
//! std::fs, attribute files read and parsed, and the `tandem fixture` command run end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem::fixture::{
    DeviceKind, FixtureError, MachineDescription, builtin, builtin_names, synthetic, write_machine,
};
use tandem::sysfs::MachineRoots;
use tandem::topology::PciAddress;

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim_end_matches('\n')
        .to_string()
}

fn scratch() -> tempfile::TempDir {
    tandem::fixture::scratch_dir().unwrap()
}

fn write(desc: &MachineDescription) -> (tempfile::TempDir, MachineRoots) {
    let dir = scratch();
    let roots = write_machine(desc, dir.path()).unwrap();
    (dir, roots)
}

/// One PCI function as found through `bus/pci/devices`.
struct Found {
    /// The link's target as written (relative).
    link: PathBuf,
    /// The canonical directory the link leads to.
    dir: PathBuf,
    /// Path elements below `devices/`: `pciDDDD:BB`, then BDFs.
    chain: Vec<String>,
}

fn pci_functions(roots: &MachineRoots) -> BTreeMap<PciAddress, Found> {
    let devices = roots.sys.join("devices").canonicalize().unwrap();
    let mut found = BTreeMap::new();
    for entry in fs::read_dir(roots.sys.join("bus/pci/devices")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let address: PciAddress = name.parse().unwrap();
        assert_eq!(address.to_string(), name, "BDFs are lowercase and padded");
        let link = fs::read_link(entry.path()).unwrap();
        assert!(link.is_relative(), "{name} -> {}", link.display());
        let dir = entry.path().canonicalize().unwrap();
        let chain: Vec<String> = dir
            .strip_prefix(&devices)
            .unwrap_or_else(|_| panic!("{name} resolves outside sys/devices: {}", dir.display()))
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        assert_eq!(chain.last().unwrap(), &name);
        found.insert(address, Found { link, dir, chain });
    }
    found
}

fn hex(path: PathBuf) -> u32 {
    let text = read(&path);
    u32::from_str_radix(text.strip_prefix("0x").unwrap(), 16).unwrap()
}

#[test]
fn every_builtin_lays_out_the_kernel_pci_shape() {
    for name in builtin_names() {
        let desc = builtin(name).unwrap();
        let (_dir, roots) = write(&desc);
        let functions = pci_functions(&roots);
        let described: BTreeMap<PciAddress, _> = desc
            .devices
            .iter()
            .map(|d| (d.path.rsplit('/').next().unwrap().parse().unwrap(), d))
            .collect();

        for (address, found) in &functions {
            // Hyper-V passthrough: the device's own root sits below its VMBus instance,
            // whose GUID carries the PCI domain in its second group (bytes 4-5).
            let root_at = found
                .chain
                .iter()
                .position(|e| tandem::topology::address::is_root_name(e))
                .unwrap_or_else(|| panic!("{name} {address}: no root in {:?}", found.chain));
            if root_at > 0 {
                assert_eq!(
                    found.chain[..4],
                    ["LNXSYSTM:00", "LNXSYBUS:00", "ACPI0004:00", "VMBUS:00"],
                    "{name} {address}"
                );
                assert_eq!(root_at, 5, "{name} {address}: one VMBus instance");
                let guid: Vec<&str> = found.chain[4].split('-').collect();
                assert_eq!(guid.len(), 5, "{name} {address}: {}", found.chain[4]);
                assert_eq!(guid[1], format!("{:04x}", address.domain & 0xffff));
                assert_eq!(found.chain.len(), 7, "no bridges on VMBus");
            }
            let chain = &found.chain[root_at..];
            let root = &chain[0];
            assert_eq!(
                link_prefix(&found.link),
                "../../../devices",
                "{name} {address}"
            );
            assert!(
                tandem::topology::address::is_root_name(root),
                "{name}: {root}"
            );
            // The root is named after the first element's domain and bus.
            let first: PciAddress = chain[1].parse().unwrap();
            assert_eq!(&first.root_name(), root, "{name} {address}");
            for bridge in &chain[1..chain.len() - 1] {
                let bridge: PciAddress = bridge.parse().unwrap();
                assert_eq!(bridge.domain, address.domain);
                let class = hex(functions[&bridge].dir.join("class"));
                assert_eq!(
                    class >> 8,
                    0x0604,
                    "{name}: {bridge} on the path of {address}"
                );
            }
            let numa: i32 = read(found.dir.join("numa_node")).parse().unwrap();
            assert!(numa >= -1, "{name} {address}");
            assert!(!read(found.dir.join("local_cpulist")).is_empty());
            assert!(read(found.dir.join("current_link_speed")).ends_with("GT/s PCIe"));
            let width: u32 = read(found.dir.join("current_link_width")).parse().unwrap();
            assert!(width > 0);
            let driver = found.dir.join("driver").canonicalize().unwrap();
            assert_eq!(
                driver.parent().unwrap(),
                roots.sys.join("bus/pci/drivers").canonicalize().unwrap(),
                "{name} {address}"
            );
            let group = found.dir.join("iommu_group").canonicalize().unwrap();
            assert_eq!(
                group.parent().unwrap(),
                roots
                    .sys
                    .join("kernel/iommu_groups")
                    .canonicalize()
                    .unwrap()
            );
            if let Some(spec) = described.get(address) {
                assert_eq!(hex(found.dir.join("vendor")), u32::from(spec.id.vendor));
                assert_eq!(hex(found.dir.join("device")), u32::from(spec.id.device));
                assert_eq!(hex(found.dir.join("class")), spec.class);
                let elements = spec.path.split('/').count();
                assert_eq!(chain.len(), elements + 1, "{name} {address}");
            }
        }
        // Exactly the described devices plus the bridges their paths imply.
        let bridges: BTreeSet<&str> = desc
            .devices
            .iter()
            .flat_map(|d| {
                let elements: Vec<&str> = d.path.split('/').collect();
                elements[..elements.len() - 1].to_vec()
            })
            .collect();
        assert_eq!(
            functions.len(),
            desc.devices.len() + bridges.len(),
            "{name}"
        );

        // Every netdev link resolves to a directory with the attributes discovery reads, and
        // `lo` lives under devices/virtual.
        let class_net = roots.sys.join("class/net");
        for entry in fs::read_dir(&class_net).unwrap() {
            let entry = entry.unwrap();
            let dir = entry.path().canonicalize().unwrap();
            for attribute in ["address", "operstate", "mtu", "ifindex", "type"] {
                assert!(
                    dir.join(attribute).is_file(),
                    "{name}: {}/{attribute}",
                    dir.display()
                );
            }
        }
        let lo = class_net.join("lo").canonicalize().unwrap();
        assert!(lo.ends_with("devices/virtual/net/lo"), "{}", lo.display());

        // NUMA nodes as described.
        for node in &desc.numa_nodes {
            let node_dir = roots
                .sys
                .join(format!("devices/system/node/node{}", node.id));
            assert_eq!(read(node_dir.join("cpulist")), node.cpulist);
            let distances: Vec<u32> = read(node_dir.join("distance"))
                .split_whitespace()
                .map(|d| d.parse().unwrap())
                .collect();
            assert_eq!(distances, node.distances);
        }
        assert!(read(roots.proc.join("devices")).starts_with("Character devices:\n"));
        assert!(roots.dev.is_dir());
    }
}

fn link_prefix(link: &Path) -> String {
    link.components()
        .take(4)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// `Key: value` lines of `/proc/driver/nvidia/gpus/<BDF>/information`.
fn nvidia_information(roots: &MachineRoots, address: &str) -> BTreeMap<String, String> {
    read(
        roots
            .proc
            .join(format!("driver/nvidia/gpus/{address}/information")),
    )
    .lines()
    .map(|line| {
        let (key, value) = line.split_once(':').unwrap();
        (key.trim().to_string(), value.trim().to_string())
    })
    .collect()
}

#[test]
fn nvidia_gpus_have_driver_information_and_device_nodes() {
    for name in builtin_names() {
        let desc = builtin(name).unwrap();
        let (_dir, roots) = write(&desc);
        let mut minors = BTreeSet::new();
        let mut uuids = BTreeSet::new();
        for spec in &desc.devices {
            let DeviceKind::NvidiaGpu(gpu) = &spec.kind else {
                continue;
            };
            let address = spec.path.rsplit('/').next().unwrap();
            if spec.is_vfio() {
                let info = roots
                    .proc
                    .join(format!("driver/nvidia/gpus/{address}/information"));
                assert!(
                    !info.exists(),
                    "{name}: vfio GPU {address} has a driver entry"
                );
                continue;
            }
            let info = nvidia_information(&roots, address);
            assert_eq!(info["Model"], gpu.model);
            assert_eq!(info["Bus Location"], address);
            assert_eq!(info["Bus Type"], "PCIe");
            assert_eq!(info["GPU Excluded"], "No");
            let uuid = info["GPU UUID"].strip_prefix("GPU-").unwrap().to_string();
            assert_eq!(
                uuid.split('-').map(str::len).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(uuids.insert(uuid), "{name}: UUIDs repeat");
            let minor: u32 = info["Device Minor"].parse().unwrap();
            assert!(minors.insert(minor), "{name}: minor {minor} repeats");
            assert!(roots.dev.join(format!("nvidia{minor}")).is_file());
            let driver =
                fs::read_link(roots.sys.join(format!("bus/pci/devices/{address}/driver"))).unwrap();
            assert_eq!(driver.file_name().unwrap(), "nvidia");
        }
        if !minors.is_empty() {
            assert!(roots.dev.join("nvidiactl").is_file());
            let devices = read(roots.proc.join("devices"));
            assert!(devices.contains("195 nvidia\n"), "{devices}");
            assert!(devices.contains("509 nvidia-uvm\n"), "{devices}");
            let version = read(roots.proc.join("driver/nvidia/version"));
            assert!(
                version.starts_with("NVRM version: NVIDIA UNIX "),
                "{version}"
            );
            let expected = desc.nvidia_driver_version.as_deref().unwrap();
            assert!(version.contains(&format!("  {expected}  ")), "{version}");
        }
    }
}

#[test]
fn dgx_h100_rails_and_hcas() {
    let (_dir, roots) = write(&builtin("dgx-h100").unwrap());
    let sys = &roots.sys;
    assert_eq!(
        fs::read_link(sys.join("bus/pci/devices/0000:18:00.0")).unwrap(),
        Path::new(
            "../../../devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0"
        )
    );
    let gpu0 = sys
        .join("bus/pci/devices/0000:1b:00.0")
        .canonicalize()
        .unwrap();
    assert!(gpu0.ends_with("pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:03.0/0000:1b:00.0"));
    assert_eq!(read(gpu0.join("numa_node")), "0");
    assert_eq!(read(gpu0.join("local_cpulist")), "0-55,112-167");
    assert_eq!(read(gpu0.join("class")), "0x030200");
    assert_eq!(
        read(gpu0.join("aer_dev_fatal")).lines().last().unwrap(),
        "TOTAL_ERR_FATAL 0"
    );

    let rails = [
        ("0000:18:00.0", "mlx5_0", "ibp24s0", 0),
        ("0000:40:00.0", "mlx5_3", "ibp64s0", 0),
        ("0000:4f:00.0", "mlx5_4", "ibp79s0", 0),
        ("0000:5e:00.0", "mlx5_5", "ibp94s0", 0),
        ("0000:9a:00.0", "mlx5_6", "ibp154s0", 1),
        ("0000:c0:00.0", "mlx5_9", "ibp192s0", 1),
        ("0000:ce:00.0", "mlx5_10", "ibp206s0", 1),
        ("0000:dc:00.0", "mlx5_11", "ibp220s0", 1),
    ];
    for (address, ibdev, ifname, numa) in rails {
        let hca = sys
            .join("bus/pci/devices")
            .join(address)
            .canonicalize()
            .unwrap();
        assert_eq!(read(hca.join("numa_node")), numa.to_string());
        assert_eq!(read(hca.join("sriov_totalvfs")), "16");
        assert_eq!(read(hca.join("sriov_numvfs")), "0");
        let ib = sys
            .join("class/infiniband")
            .join(ibdev)
            .canonicalize()
            .unwrap();
        assert_eq!(ib, hca.join("infiniband").join(ibdev));
        assert_eq!(read(ib.join("ports/1/state")), "4: ACTIVE");
        assert_eq!(read(ib.join("ports/1/phys_state")), "5: LinkUp");
        assert_eq!(read(ib.join("ports/1/link_layer")), "InfiniBand");
        assert_eq!(read(ib.join("ports/1/rate")), "400 Gb/sec (4X NDR)");
        assert_eq!(read(ib.join("node_guid")).split(':').count(), 4);
        let net = sys.join("class/net").join(ifname).canonicalize().unwrap();
        assert_eq!(net, hca.join("net").join(ifname));
        assert_eq!(read(net.join("type")), "32");
        assert_eq!(read(net.join("mtu")), "4092");
        assert_eq!(read(net.join("speed")), "400000");
        assert_eq!(read(net.join("operstate")), "up");
        // The class device's `device` link names the PCI function, as in the kernel.
        assert_eq!(
            fs::read_link(net.join("device"))
                .unwrap()
                .file_name()
                .unwrap(),
            address
        );
        let index: u32 = ibdev.trim_start_matches("mlx5_").parse().unwrap();
        let uverbs = sys
            .join(format!("class/infiniband_verbs/uverbs{index}"))
            .canonicalize()
            .unwrap();
        assert!(uverbs.starts_with(&hca));
        assert_eq!(read(uverbs.join("ibdev")), ibdev);
        assert_eq!(read(uverbs.join("dev")), format!("231:{}", 192 + index));
        assert!(
            roots
                .dev
                .join(format!("infiniband/uverbs{index}"))
                .is_file()
        );
        let umad = sys
            .join(format!("class/infiniband_mad/umad{index}"))
            .canonicalize()
            .unwrap();
        assert_eq!(read(umad.join("ibdev")), ibdev);
        assert_eq!(read(umad.join("port")), "1");
        assert_eq!(read(umad.join("dev")), format!("231:{index}"));
        let issm = sys
            .join(format!("class/infiniband_mad/issm{index}"))
            .canonicalize()
            .unwrap();
        assert_eq!(read(issm.join("dev")), format!("231:{}", 64 + index));
    }
    // Storage ports hang off their own root port, with no switch.
    let storage = fs::read_link(sys.join("bus/pci/devices/0000:29:00.1")).unwrap();
    assert_eq!(
        storage,
        Path::new("../../../devices/pci0000:27/0000:27:01.0/0000:29:00.1")
    );
    let storage_ib = sys.join("class/infiniband/mlx5_2").canonicalize().unwrap();
    assert!(
        storage_ib.starts_with(
            sys.join("bus/pci/devices/0000:29:00.1")
                .canonicalize()
                .unwrap()
        )
    );
    assert_eq!(read(storage_ib.join("ports/1/link_layer")), "Ethernet");
    assert_eq!(read(storage_ib.join("ports/1/rate")), "200 Gb/sec (4X HDR)");
    assert!(
        sys.join("class/net/enp170s0f1np1")
            .canonicalize()
            .unwrap()
            .ends_with("0000:aa:00.1/net/enp170s0f1np1")
    );
    let eno3 = sys.join("class/net/eno3").canonicalize().unwrap();
    assert!(eno3.ends_with("pci0000:00/0000:00:1c.0/0000:0b:00.0/net/eno3"));
    assert!(
        !eno3
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("infiniband")
            .exists()
    );
    assert_eq!(read(sys.join("class/misc/rdma_cm/dev")), "10:58");
    assert!(
        sys.join("class/net/docker0")
            .canonicalize()
            .unwrap()
            .starts_with(sys.join("devices/virtual/net").canonicalize().unwrap())
    );
    assert_eq!(read(sys.join("devices/system/node/online")), "0-1");
    assert_eq!(read(sys.join("devices/system/cpu/online")), "0-223");
    let devices = read(roots.proc.join("devices"));
    assert!(devices.contains("231 infiniband_verbs\n"), "{devices}");

    // MACs and GUIDs are unique across the machine.
    let mut macs = BTreeSet::new();
    for entry in fs::read_dir(sys.join("class/net")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.file_name().unwrap() != "lo" {
            assert!(macs.insert(read(dir.join("address"))));
        }
    }
}

#[test]
fn aws_p4d_is_flat_with_rdma_only_efa() {
    let (_dir, roots) = write(&builtin("aws-p4d").unwrap());
    let functions = pci_functions(&roots);
    assert_eq!(functions.len(), 16);
    for (address, found) in &functions {
        assert_eq!(
            found.chain.len(),
            2,
            "{address} has bridges: {:?}",
            found.chain
        );
        assert_eq!(read(found.dir.join("numa_node")), "-1");
    }
    let gpu = &functions[&"0000:90:1c.0".parse().unwrap()];
    assert_eq!(gpu.chain[0], "pci0000:90");
    assert_eq!(read(gpu.dir.join("local_cpulist")), "24-47,72-95");
    assert_eq!(
        nvidia_information(&roots, "0000:90:1c.0")["Device Minor"],
        "4"
    );
    assert_eq!(
        nvidia_information(&roots, "0000:10:1c.0")["Model"],
        "NVIDIA A100-SXM4-40GB"
    );

    let efa = &functions[&"0000:20:1b.0".parse().unwrap()];
    assert!(!efa.dir.join("net").exists(), "EFA has no netdev");
    let ib = roots
        .sys
        .join("class/infiniband/rdmap32s27")
        .canonicalize()
        .unwrap();
    assert_eq!(ib, efa.dir.join("infiniband/rdmap32s27"));
    assert_eq!(read(ib.join("ports/1/link_layer")), "Unspecified");
    assert_eq!(read(ib.join("ports/1/rate")), "100 Gb/sec (4X EDR)");
    assert_eq!(
        fs::read_link(efa.dir.join("driver"))
            .unwrap()
            .file_name()
            .unwrap(),
        "efa"
    );

    let ens65 = roots.sys.join("class/net/ens65").canonicalize().unwrap();
    assert_eq!(
        ens65,
        functions[&"0000:20:01.0".parse().unwrap()]
            .dir
            .join("net/ens65")
    );
    assert_eq!(read(ens65.join("mtu")), "9001");
    assert!(!roots.sys.join("class/net/ens65/../../infiniband").exists());
}

#[test]
fn gb200_puts_every_device_on_its_own_root() {
    let desc = builtin("gb200").unwrap();
    let (_dir, roots) = write(&desc);
    let functions = pci_functions(&roots);
    let gpu_roots: Vec<&str> = [
        "0008:06:00.0",
        "0009:06:00.0",
        "0018:06:00.0",
        "0019:06:00.0",
    ]
    .iter()
    .map(|a| functions[&a.parse().unwrap()].chain[0].as_str())
    .collect();
    assert_eq!(
        gpu_roots,
        ["pci0008:00", "pci0009:00", "pci0018:00", "pci0019:00"]
    );
    let nics = [
        ("0000:03:00.0", "rdma0", "mlx5_0", 0),
        ("0000:03:00.1", "rdma1", "mlx5_1", 0),
        ("0002:03:00.0", "rdma2", "mlx5_2", 0),
        ("0002:03:00.1", "rdma3", "mlx5_3", 0),
        ("0010:03:00.0", "rdma4", "mlx5_4", 1),
        ("0010:03:00.1", "rdma5", "mlx5_5", 1),
        ("0012:03:00.0", "rdma6", "mlx5_6", 1),
        ("0012:03:00.1", "rdma7", "mlx5_7", 1),
    ];
    for (address, ifname, ibdev, numa) in nics {
        let found = &functions[&address.parse().unwrap()];
        assert!(!gpu_roots.contains(&found.chain[0].as_str()));
        assert_eq!(read(found.dir.join("numa_node")), numa.to_string());
        assert!(
            found.dir.join("net").join(ifname).is_dir(),
            "{address} {ifname}"
        );
        let ib = found.dir.join("infiniband").join(ibdev);
        assert_eq!(read(ib.join("ports/1/link_layer")), "Ethernet");
        assert_eq!(read(ib.join("ports/1/rate")), "400 Gb/sec (4X NDR)");
    }
}

#[test]
fn gke_a4_pairs_two_gpus_and_two_nics_per_switch() {
    let (_dir, roots) = write(&builtin("gke-a4").unwrap());
    let functions = pci_functions(&roots);
    let names = ["91", "92", "98", "99", "c6", "c7", "cd", "ce"];
    for (n, bus) in names.iter().enumerate() {
        let net = roots
            .sys
            .join(format!("class/net/gpu{n}rdma0"))
            .canonicalize()
            .unwrap();
        let nic = &functions[&format!("0000:{bus}:00.0").parse().unwrap()];
        assert_eq!(net, nic.dir.join(format!("net/gpu{n}rdma0")));
        assert_eq!(read(net.join("mtu")), "8896");
        assert!(nic.dir.join(format!("infiniband/mlx5_{n}")).is_dir());
    }
    let gpu = &functions[&"0000:8f:00.0".parse().unwrap()];
    let nic = &functions[&"0000:91:00.0".parse().unwrap()];
    assert_eq!(gpu.chain[..3], nic.chain[..3], "same root port and switch");
    assert_eq!(gpu.chain[0], "pci0000:8c");
    assert_eq!(
        nvidia_information(&roots, "0000:cc:00.0")["Model"],
        "NVIDIA B200"
    );
    let eth0 = roots.sys.join("class/net/eth0").canonicalize().unwrap();
    assert!(eth0.ends_with("pci0000:00/0000:00:04.0/net/eth0"));
}

#[test]
fn workstation_has_plain_ethernet_only() {
    let (_dir, roots) = write(&builtin("workstation").unwrap());
    let nic = roots.sys.join("class/net/enp5s0").canonicalize().unwrap();
    assert!(nic.ends_with("pci0000:00/0000:00:1c.0/0000:05:00.0/net/enp5s0"));
    assert_eq!(read(nic.join("type")), "1");
    assert!(!roots.sys.join("class/infiniband").exists());
    assert!(!read(roots.proc.join("devices")).contains("infiniband"));
    let gpu = roots
        .sys
        .join("bus/pci/devices/0000:01:00.0")
        .canonicalize()
        .unwrap();
    assert_eq!(read(gpu.join("class")), "0x030000");
    assert_eq!(read(roots.sys.join("devices/system/node/online")), "0");
    assert_eq!(read(roots.sys.join("devices/system/cpu/online")), "0-15");
}

#[test]
fn gpu_only_has_every_accelerator_kind_and_no_nic() {
    let (_dir, roots) = write(&builtin("gpu-only").unwrap());
    let sys = &roots.sys;
    let interfaces: Vec<String> = fs::read_dir(sys.join("class/net"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(interfaces, ["lo"]);

    let mi300 = sys
        .join("bus/pci/devices/0000:05:00.0")
        .canonicalize()
        .unwrap();
    assert_eq!(read(mi300.join("class")), "0x120000");
    assert_eq!(read(mi300.join("product_name")), "AMD Instinct MI300X");
    assert_eq!(read(mi300.join("mem_info_vram_total")), "206158430208");
    assert_eq!(read(mi300.join("drm/card1/dev")), "226:1");
    assert_eq!(read(mi300.join("drm/renderD128/dev")), "226:128");
    assert_eq!(
        sys.join("class/drm/renderD128").canonicalize().unwrap(),
        mi300.join("drm/renderD128")
    );
    assert_eq!(read(sys.join("class/kfd/kfd/dev")), "235:0");
    assert!(roots.dev.join("dri/renderD128").is_file());

    let gaudi = sys
        .join("bus/pci/devices/0000:b3:00.0")
        .canonicalize()
        .unwrap();
    assert_eq!(read(gaudi.join("class")), "0x120000");
    assert_eq!(
        fs::read_link(gaudi.join("driver"))
            .unwrap()
            .file_name()
            .unwrap(),
        "habanalabs"
    );
    assert_eq!(read(sys.join("class/accel/accel0/dev")), "261:0");
    assert_eq!(
        sys.join("class/accel/accel0").canonicalize().unwrap(),
        gaudi.join("accel/accel0")
    );
    assert!(roots.dev.join("accel/accel0").is_file());

    let vfio = sys
        .join("bus/pci/devices/0000:e1:00.0")
        .canonicalize()
        .unwrap();
    assert_eq!(
        fs::read_link(vfio.join("driver"))
            .unwrap()
            .file_name()
            .unwrap(),
        "vfio-pci"
    );
    assert_eq!(
        fs::read_link(vfio.join("iommu_group"))
            .unwrap()
            .file_name()
            .unwrap(),
        "87"
    );
    assert!(
        sys.join("kernel/iommu_groups/87/devices/0000:e1:00.0")
            .exists()
    );
    assert!(roots.dev.join("vfio/87").is_file());
    assert!(!roots.proc.join("driver/nvidia/gpus/0000:e1:00.0").exists());
    assert_eq!(
        nvidia_information(&roots, "0000:c1:00.0")["Device Minor"],
        "1"
    );

    let devices = read(roots.proc.join("devices"));
    for line in [
        "261 accel",
        "510 vfio",
        "226 drm",
        "235 kfd",
        "195 nvidiactl",
    ] {
        assert!(
            devices.lines().any(|l| l.trim() == line),
            "{line} missing from {devices}"
        );
    }
    assert!(devices.contains("\nBlock devices:\n"));
}

#[test]
fn synthetic_1024_devices_have_unique_valid_addresses() {
    let desc = synthetic(512, 512);
    let (_dir, roots) = write(&desc);
    let functions = pci_functions(&roots);
    let mut endpoints = BTreeSet::new();
    let mut domains = BTreeSet::new();
    for (address, found) in &functions {
        domains.insert(address.domain);
        let class = hex(found.dir.join("class"));
        if class >> 8 != 0x0604 {
            endpoints.insert(*address);
        }
    }
    assert_eq!(endpoints.len(), 1024);
    assert!(domains.len() > 1, "{domains:?}");
    let netdevs = fs::read_dir(roots.sys.join("class/net")).unwrap().count();
    assert_eq!(netdevs, 512 + 1, "512 NICs and lo");
    let ibdevs = fs::read_dir(roots.sys.join("class/infiniband"))
        .unwrap()
        .count();
    assert_eq!(ibdevs, 512);
    let gpus = fs::read_dir(roots.proc.join("driver/nvidia/gpus"))
        .unwrap()
        .count();
    assert_eq!(gpus, 512);
    // Switch depth: some devices sit below three switches.
    let deepest = functions.values().map(|f| f.chain.len()).max().unwrap();
    assert!(deepest >= 8, "deepest chain {deepest}");
}

#[test]
fn refuses_to_write_over_an_existing_tree() {
    let dir = scratch();
    let desc = builtin("workstation").unwrap();
    write_machine(&desc, dir.path()).unwrap();
    let err = write_machine(&desc, dir.path()).unwrap_err();
    assert!(matches!(err, FixtureError::NotEmpty { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&dir.path().join("sys").display().to_string())
    );
}

#[test]
fn rejects_an_inconsistent_description() {
    let mut desc = builtin("workstation").unwrap();
    // The NIC claims the GPU's root port is its switch upstream port on a different parent.
    desc.devices[1].path = "0000:00:1c.0/0000:00:01.0/0000:05:00.0".into();
    let dir = scratch();
    let err = write_machine(&desc, dir.path()).unwrap_err();
    assert!(
        matches!(err, FixtureError::InvalidDescription { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("workstation"), "{err}");
    assert!(
        !dir.path().join("sys").exists(),
        "nothing written for a bad description"
    );
}

#[test]
fn descriptions_round_trip_through_json() {
    for name in builtin_names() {
        let desc = builtin(name).unwrap();
        let json = serde_json::to_string(&desc).unwrap();
        let back: MachineDescription = serde_json::from_str(&json).unwrap();
        assert_eq!(back, desc, "{name}");
    }
}

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_lists_writes_and_rejects_unknown_names() {
    let listed = tandem(&["fixture", "--list"]);
    assert!(listed.status.success());
    let names: Vec<String> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(names, builtin_names());

    let dir = scratch();
    let out = dir.path().join("dgx");
    let written = tandem(&["fixture", "dgx-h100", "--out", out.to_str().unwrap()]);
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let roots = MachineRoots::under(&out);
    assert!(roots.sys.join("class/infiniband/mlx5_11").exists());
    assert!(
        roots
            .proc
            .join("driver/nvidia/gpus/0000:df:00.0/information")
            .is_file()
    );

    let again = tandem(&["fixture", "dgx-h100", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing"));

    let unknown = tandem(&[
        "fixture",
        "dgx-a100",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("dgx-a100"), "{stderr}");
    for name in builtin_names() {
        assert!(stderr.contains(name), "{stderr} should list {name}");
    }
    assert!(!dir.path().join("x/sys").exists());
}

#[test]
fn cli_writes_a_machine_from_json() {
    let dir = scratch();
    let mut desc = builtin("workstation").unwrap();
    desc.name = "custom".into();
    desc.devices.truncate(1);
    let file = dir.path().join("custom.json");
    fs::write(&file, serde_json::to_string_pretty(&desc).unwrap()).unwrap();
    let out = dir.path().join("tree");
    let written = tandem(&[
        "fixture",
        "--from",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let roots = MachineRoots::under(&out);
    assert!(roots.sys.join("bus/pci/devices/0000:01:00.0").exists());
    assert!(!roots.sys.join("bus/pci/devices/0000:05:00.0").exists());

    fs::write(&file, "{\"name\": 3}").unwrap();
    let broken = tandem(&[
        "fixture",
        "--from",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("custom.json"));
}

#[test]
fn sriov_virtual_functions_link_to_their_physical_function() {
    let mut desc = builtin("workstation").unwrap();
    let DeviceKind::Nic(pf) = &mut desc.devices[1].kind else {
        panic!("workstation's second device is its NIC");
    };
    pf.sriov_total_vfs = Some(7);
    pf.sriov_num_vfs = 2;
    let pf_address: PciAddress = "0000:05:00.0".parse().unwrap();
    for (slot, ifname, driver) in [
        ("10.0", Some("enp5s0v0"), "igbvf"),
        ("10.1", None, "vfio-pci"),
    ] {
        let mut vf = desc.devices[1].clone();
        vf.path = format!("0000:00:1c.0/0000:05:{slot}");
        let DeviceKind::Nic(nic) = &mut vf.kind else {
            unreachable!()
        };
        nic.sriov_total_vfs = None;
        nic.sriov_num_vfs = 0;
        nic.physfn = Some(pf_address);
        nic.driver = driver.into();
        nic.netdevs = ifname
            .map(|name| vec![tandem::fixture::NetdevSpec::ethernet(name, 1500, 2500)])
            .unwrap_or_default();
        desc.devices.push(vf);
    }
    let (_dir, roots) = write(&desc);
    let devices = roots.sys.join("bus/pci/devices");
    let pf_dir = devices.join("0000:05:00.0").canonicalize().unwrap();
    assert_eq!(read(pf_dir.join("sriov_totalvfs")), "7");
    assert_eq!(read(pf_dir.join("sriov_numvfs")), "2");
    for (n, vf) in ["0000:05:10.0", "0000:05:10.1"].iter().enumerate() {
        let vf_dir = devices.join(vf).canonicalize().unwrap();
        assert_eq!(vf_dir.join("physfn").canonicalize().unwrap(), pf_dir);
        assert_eq!(
            pf_dir.join(format!("virtfn{n}")).canonicalize().unwrap(),
            vf_dir
        );
        assert!(!vf_dir.join("sriov_totalvfs").exists());
    }
    let vfio_vf = devices.join("0000:05:10.1");
    assert_eq!(
        fs::read_link(vfio_vf.join("driver"))
            .unwrap()
            .file_name()
            .unwrap(),
        "vfio-pci"
    );
    assert!(!vfio_vf.join("net").exists());
    let group = fs::read_link(vfio_vf.join("iommu_group")).unwrap();
    let group = group.file_name().unwrap().to_str().unwrap();
    assert!(roots.dev.join("vfio").join(group).is_file());
    assert!(
        roots
            .sys
            .join("class/net/enp5s0v0")
            .canonicalize()
            .unwrap()
            .starts_with(devices.join("0000:05:10.0").canonicalize().unwrap())
    );
}
