//! Discovery on broken machines: hand-built sysfs/procfs trees (one GPU and one RDMA NIC in the
//! kernel's layout) with one thing wrong each. Discovery must report the fault as a problem
//! naming the file, keep the rest of the machine, and fail only when there is no sysfs at all.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use tandem::sysfs::{DiscoveryError, MachineRoots, discover};
use tandem::topology::{Inventory, NumaSource, PciAddress};
use tempfile::TempDir;

const GPU: &str = "0000:1b:00.0";
const NIC: &str = "0000:18:00.0";
const GPU_DIR: &str = "sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:1b:00.0";
const NIC_DIR: &str = "sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:18:00.0";

/// A machine with one NVIDIA GPU and one ConnectX NIC behind the same switch, on NUMA node 0
/// of two.
struct Machine {
    dir: TempDir,
}

impl Machine {
    fn new() -> Self {
        let m = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        m.write("sys/bus/pci/drivers/nvidia/.keep", "");
        m.write("sys/bus/pci/drivers/mlx5_core/.keep", "");
        m.write("sys/kernel/iommu_groups/21/.keep", "");
        for (bdf, class) in [("0000:15:01.0", "0x060400"), ("0000:16:00.0", "0x060400")] {
            m.add_bridge(bdf, class);
        }
        m.add_function(GPU, GPU_DIR, "0x10de", "0x2330", "0x030200", "nvidia");
        m.add_function(NIC, NIC_DIR, "0x15b3", "0x1021", "0x020700", "mlx5_core");
        m.write(
            &format!("{GPU_DIR}/aer_dev_fatal"),
            "Undefined 0\nDLP 0\nTOTAL_ERR_FATAL 0\n",
        );
        m.link(
            &format!("{GPU_DIR}/iommu_group"),
            "../../../../../kernel/iommu_groups/21",
        );

        let net = format!("{NIC_DIR}/net/ibp24s0");
        m.write(
            &format!("{net}/address"),
            "00:00:10:29:fe:80:00:00:00:00:00:00:b8:3f:d2:03:00:a1:b2:c4\n",
        );
        m.write(&format!("{net}/mtu"), "4092\n");
        m.write(&format!("{net}/operstate"), "up\n");
        m.write(&format!("{net}/speed"), "400000\n");
        m.write(&format!("{net}/type"), "32\n");
        let ib = format!("{NIC_DIR}/infiniband/mlx5_0");
        m.write(&format!("{ib}/node_guid"), "b83f:d203:00a1:b2c4\n");
        m.write(&format!("{ib}/ports/1/state"), "4: ACTIVE\n");
        m.write(&format!("{ib}/ports/1/phys_state"), "5: LinkUp\n");
        m.write(&format!("{ib}/ports/1/link_layer"), "InfiniBand\n");
        m.write(&format!("{ib}/ports/1/rate"), "400 Gb/sec (4X NDR)\n");
        m.write(
            &format!("{NIC_DIR}/infiniband_verbs/uverbs0/ibdev"),
            "mlx5_0\n",
        );
        m.write(
            &format!("{NIC_DIR}/infiniband_verbs/uverbs0/dev"),
            "231:192\n",
        );

        m.write("sys/devices/system/node/node0/cpulist", "0-7\n");
        m.write("sys/devices/system/node/node0/distance", "10 21\n");
        m.write("sys/devices/system/node/node1/cpulist", "8-15\n");
        m.write("sys/devices/system/node/node1/distance", "21 10\n");
        m.write("sys/devices/system/node/online", "0-1\n");

        m.write(
            &format!("proc/driver/nvidia/gpus/{GPU}/information"),
            "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-00000000-1111-2222-3333-444444444444\n\
             Bus Location: \t 0000:1b:00.0\nDevice Minor: \t 0\n",
        );
        m.write(
            "proc/driver/nvidia/version",
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n",
        );
        m.write(
            "proc/devices",
            "Character devices:\n195 nvidia-frontend\n235 nvidia-uvm\n\nBlock devices:\n  8 sd\n",
        );
        m
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn link(&self, rel: &str, target: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let _ = fs::remove_file(&path);
        symlink(target, path).unwrap();
    }

    fn add_bridge(&self, bdf: &str, class: &str) {
        let dir = match bdf {
            "0000:15:01.0" => "sys/devices/pci0000:15/0000:15:01.0".to_string(),
            _ => format!("sys/devices/pci0000:15/0000:15:01.0/{bdf}"),
        };
        self.write(&format!("{dir}/class"), &format!("{class}\n"));
        self.write(&format!("{dir}/vendor"), "0x10b5\n");
        self.link(
            &format!("sys/bus/pci/devices/{bdf}"),
            &format!("../../../{}", dir.strip_prefix("sys/").unwrap()),
        );
    }

    fn add_function(
        &self,
        bdf: &str,
        dir: &str,
        vendor: &str,
        device: &str,
        class: &str,
        driver: &str,
    ) {
        for (name, value) in [
            ("vendor", vendor),
            ("device", device),
            ("class", class),
            ("subsystem_vendor", vendor),
            ("subsystem_device", "0x16c1"),
            ("numa_node", "0"),
            ("local_cpulist", "0-7"),
            ("current_link_speed", "32.0 GT/s PCIe"),
            ("current_link_width", "16"),
        ] {
            self.write(&format!("{dir}/{name}"), &format!("{value}\n"));
        }
        // dir is sys/devices/pci0000:15/<a>/<b>/<bdf>: four levels below sys/.
        self.link(
            &format!("{dir}/driver"),
            &format!("../../../../../bus/pci/drivers/{driver}"),
        );
        self.link(
            &format!("sys/bus/pci/devices/{bdf}"),
            &format!("../../../{}", dir.strip_prefix("sys/").unwrap()),
        );
    }

    fn discover(&self) -> Inventory {
        discover(&MachineRoots::under(self.root())).unwrap()
    }
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn problem_about<'a>(
    inventory: &'a Inventory,
    file_suffix: &str,
) -> &'a tandem::topology::DiscoveryProblem {
    inventory
        .problems
        .iter()
        .find(|p| p.path.ends_with(file_suffix))
        .unwrap_or_else(|| panic!("no problem naming {file_suffix}: {:#?}", inventory.problems))
}

#[test]
fn healthy_machine_has_no_problems() {
    let inventory = Machine::new().discover();
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    assert_eq!(inventory.accelerators.len(), 1);
    assert_eq!(inventory.nics.len(), 1);
    let gpu = &inventory.accelerators[0];
    assert_eq!(gpu.model, "NVIDIA H100 80GB HBM3");
    assert_eq!(
        gpu.pci.bridges,
        vec![addr("0000:15:01.0"), addr("0000:16:00.0")]
    );
    assert_eq!(gpu.pci.iommu_group, Some(21));
    assert_eq!(gpu.pci.aer_fatal, Some(0));
    let nic = &inventory.nics[0];
    assert_eq!(nic.if_name(), Some("ibp24s0"));
    let rdma = nic.rdma.as_ref().unwrap();
    assert_eq!(rdma.ports[0].rate_gbps, Some(400));
    assert_eq!(rdma.char_devices[0].path, "infiniband/uverbs0");
    assert_eq!(inventory.numa_nodes.len(), 2);
}

#[test]
fn missing_numa_node_leaves_none_and_names_the_file() {
    let m = Machine::new();
    fs::remove_file(m.path(&format!("{GPU_DIR}/numa_node"))).unwrap();
    let inventory = m.discover();
    let gpu = &inventory.accelerators[0];
    assert_eq!(gpu.pci.numa_node, None);
    assert_eq!(gpu.pci.numa_source, NumaSource::Unknown);
    let problem = problem_about(&inventory, "0000:1b:00.0/numa_node");
    assert_eq!(problem.device, Some(addr(GPU)));
    assert_eq!(inventory.nics[0].pci.numa_node, Some(0));
}

#[test]
fn garbage_class_leaves_the_device_out() {
    let m = Machine::new();
    m.write(&format!("{GPU_DIR}/class"), "not a class\n");
    let inventory = m.discover();
    assert!(inventory.accelerators.is_empty());
    let problem = problem_about(&inventory, "0000:1b:00.0/class");
    assert!(problem.message.contains("not a class"), "{problem}");
    assert_eq!(inventory.nics.len(), 1, "the NIC is unaffected");
}

#[test]
fn garbage_vendor_leaves_the_device_out() {
    let m = Machine::new();
    m.write(&format!("{NIC_DIR}/vendor"), "0xzzzz\n");
    let inventory = m.discover();
    assert!(inventory.nics.is_empty());
    problem_about(&inventory, "0000:18:00.0/vendor");
    assert_eq!(inventory.accelerators.len(), 1, "the GPU is unaffected");
    assert_eq!(inventory.accelerators[0].pci.address, addr(GPU));
}

#[test]
fn dangling_device_link_is_a_problem() {
    let m = Machine::new();
    m.link(
        "sys/bus/pci/devices/0000:99:00.0",
        "../../../devices/pci0000:99/0000:99:00.0",
    );
    let inventory = m.discover();
    let problem = problem_about(&inventory, "bus/pci/devices/0000:99:00.0");
    assert!(problem.message.contains("dangling"), "{problem}");
    assert_eq!(inventory.accelerators.len(), 1);
    assert_eq!(inventory.nics.len(), 1);
}

#[test]
fn vanished_device_directory_is_a_problem() {
    let m = Machine::new();
    fs::remove_dir_all(m.path(NIC_DIR)).unwrap();
    let inventory = m.discover();
    assert!(inventory.nics.is_empty());
    problem_about(&inventory, "bus/pci/devices/0000:18:00.0");
    assert_eq!(inventory.accelerators.len(), 1);
}

#[test]
fn symlink_loops_are_problems() {
    let m = Machine::new();
    m.link("sys/bus/pci/devices/0000:aa:00.0", "0000:ab:00.0");
    m.link("sys/bus/pci/devices/0000:ab:00.0", "0000:aa:00.0");
    m.link(&format!("{GPU_DIR}/numa_node"), "numa_node");
    let inventory = m.discover();
    problem_about(&inventory, "bus/pci/devices/0000:aa:00.0");
    problem_about(&inventory, "bus/pci/devices/0000:ab:00.0");
    problem_about(&inventory, "0000:1b:00.0/numa_node");
    assert_eq!(inventory.accelerators.len(), 1);
    assert_eq!(inventory.accelerators[0].pci.numa_node, None);
    assert_eq!(inventory.nics.len(), 1);
}

#[test]
fn links_never_lead_outside_the_root() {
    let m = Machine::new();
    // An absolute target is taken relative to the sysfs root, and `..` stops at the root.
    m.link(
        "sys/bus/pci/devices/0000:18:00.0",
        "/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:18:00.0",
    );
    m.link(
        "sys/bus/pci/devices/0000:1b:00.0",
        "../../../../../../../../devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:1b:00.0",
    );
    let inventory = m.discover();
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    assert_eq!(inventory.nics[0].pci.pcie_root, "pci0000:15");
    assert_eq!(inventory.accelerators[0].pci.bridges.len(), 2);
}

#[test]
fn unreadable_file_is_a_problem_or_ignored_when_root() {
    let m = Machine::new();
    let speed = m.path(&format!("{NIC_DIR}/current_link_speed"));
    fs::set_permissions(&speed, fs::Permissions::from_mode(0o000)).unwrap();
    let still_readable = fs::read(&speed).is_ok();
    let inventory = m.discover();
    assert_eq!(inventory.nics.len(), 1);
    if still_readable {
        // Running as root: permission bits do not stop reads, so only the no-panic path and
        // the normal result can be checked.
        assert_eq!(
            inventory.nics[0].pci.link_speed.as_deref(),
            Some("32.0 GT/s PCIe")
        );
    } else {
        assert_eq!(inventory.nics[0].pci.link_speed, None);
        let problem = problem_about(&inventory, "0000:18:00.0/current_link_speed");
        assert!(
            problem.message.to_lowercase().contains("permission"),
            "{problem}"
        );
    }
}

#[test]
fn empty_root_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("sys")).unwrap();
    let err = discover(&MachineRoots::under(dir.path())).unwrap_err();
    assert!(matches!(err, DiscoveryError::EmptyRoot { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().join("sys").display().to_string()),
        "{message}"
    );
    assert!(message.contains("bus/pci/devices"), "{message}");

    // A device list that is not a directory is no device list either.
    fs::create_dir_all(dir.path().join("sys/bus/pci")).unwrap();
    fs::write(dir.path().join("sys/bus/pci/devices"), "").unwrap();
    let err = discover(&MachineRoots::under(dir.path())).unwrap_err();
    assert!(matches!(err, DiscoveryError::EmptyRoot { .. }), "{err}");
}

#[test]
fn missing_root_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let roots = MachineRoots::under(&dir.path().join("nowhere"));
    let err = discover(&roots).unwrap_err();
    assert!(matches!(err, DiscoveryError::RootMissing { .. }), "{err}");
    assert!(
        err.to_string().contains(&roots.sys.display().to_string()),
        "{err}"
    );

    fs::write(dir.path().join("sys"), "a file").unwrap();
    let err = discover(&MachineRoots::under(dir.path())).unwrap_err();
    assert!(
        matches!(err, DiscoveryError::RootNotDirectory { .. }),
        "{err}"
    );
}

#[test]
fn numa_node_minus_one_is_derived_from_local_cpulist() {
    let m = Machine::new();
    m.write(&format!("{GPU_DIR}/numa_node"), "-1\n");
    m.write(&format!("{GPU_DIR}/local_cpulist"), "8-15\n");
    m.write(&format!("{NIC_DIR}/numa_node"), "-1\n");
    m.write(&format!("{NIC_DIR}/local_cpulist"), "0-15\n");
    let inventory = m.discover();
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    let gpu = &inventory.accelerators[0].pci;
    assert_eq!(
        (gpu.numa_node, gpu.numa_source),
        (Some(1), NumaSource::LocalCpulist)
    );
    let nic = &inventory.nics[0].pci;
    assert_eq!(
        (nic.numa_node, nic.numa_source),
        (None, NumaSource::Unknown),
        "CPUs of both nodes: no single node"
    );
}

#[test]
fn vfio_group_numbers_come_from_sysfs_or_proc_devices() {
    let m = Machine::new();
    m.write("sys/bus/pci/drivers/vfio-pci/.keep", "");
    m.link(
        &format!("{GPU_DIR}/driver"),
        "../../../../../bus/pci/drivers/vfio-pci",
    );
    fs::remove_dir_all(m.path("proc/driver/nvidia")).unwrap();

    // No vfio line in /proc/devices and no class/vfio entry: the node cannot be described.
    let inventory = m.discover();
    let gpu = &inventory.accelerators[0];
    assert!(gpu.vfio);
    assert!(gpu.char_devices.is_empty());
    assert_eq!(gpu.model, gpu.pci.device_name.clone().unwrap());
    let problem = problem_about(&inventory, "proc/devices");
    assert!(problem.message.contains("vfio"), "{problem}");
    assert_eq!(inventory.problems.len(), 1, "{:#?}", inventory.problems);
    assert_eq!(
        inventory.host.nvidia_driver_version, None,
        "no GPU uses the nvidia driver"
    );

    // The group's own class device gives the real numbers.
    m.write("sys/devices/virtual/vfio/21/dev", "510:3\n");
    m.link("sys/class/vfio/21", "../../devices/virtual/vfio/21");
    let inventory = m.discover();
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    let node = &inventory.accelerators[0].char_devices[0];
    assert_eq!(
        (node.path.as_str(), node.major, node.minor),
        ("vfio/21", 510, 3)
    );
}

#[test]
fn malformed_local_cpulist_is_a_problem() {
    let m = Machine::new();
    m.write(&format!("{GPU_DIR}/numa_node"), "-1\n");
    m.write(&format!("{GPU_DIR}/local_cpulist"), "8-x\n");
    let inventory = m.discover();
    let gpu = &inventory.accelerators[0].pci;
    assert_eq!((gpu.numa_node, gpu.local_cpulist.as_deref()), (None, None));
    let problem = problem_about(&inventory, "0000:1b:00.0/local_cpulist");
    assert!(problem.message.contains("8-x"), "{problem}");
}

#[test]
fn non_numeric_numa_node_is_a_problem() {
    let m = Machine::new();
    m.write(&format!("{GPU_DIR}/numa_node"), "zero\n");
    let inventory = m.discover();
    assert_eq!(inventory.accelerators[0].pci.numa_node, None);
    let problem = problem_about(&inventory, "0000:1b:00.0/numa_node");
    assert!(problem.message.contains("zero"), "{problem}");
}

/// Every file of the tree replaced, one at a time, by each kind of garbage: discovery must
/// return an Inventory every time.
#[test]
fn garbage_in_any_file_never_panics() {
    let m = Machine::new();
    let mut files = Vec::new();
    collect_files(m.root(), &mut files);
    assert!(files.len() > 30, "the walk found the tree");
    let garbage: [&[u8]; 6] = [
        b"",
        b"\n",
        b"-1\n",
        b"\xff\xfe\x00garbage",
        b"99999999999999999999999",
        b": : :\n",
    ];
    for file in &files {
        let original = fs::read(file).unwrap();
        for bad in garbage {
            fs::write(file, bad).unwrap();
            let inventory = discover(&MachineRoots::under(m.root()))
                .unwrap_or_else(|e| panic!("{} = {bad:?}: {e}", file.display()));
            assert!(inventory.accelerators.len() + inventory.nics.len() <= 2);
        }
        fs::write(file, original).unwrap();
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            collect_files(&entry.path(), out);
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
}

#[test]
fn virtio_net_netdev_one_level_down_is_found() {
    let m = Machine::new();
    const VIRTIO: &str = "0000:00:03.0";
    let dir = "sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:00:03.0";
    m.write("sys/bus/pci/drivers/virtio-pci/.keep", "");
    m.add_function(VIRTIO, dir, "0x1af4", "0x1000", "0x020000", "virtio-pci");
    m.write(
        &format!("{dir}/virtio0/net/eth0/address"),
        "42:01:0a:00:00:02\n",
    );
    m.write(&format!("{dir}/virtio0/net/eth0/operstate"), "up\n");
    m.write(&format!("{dir}/virtio0/net/eth0/mtu"), "1460\n");
    m.write(&format!("{dir}/virtio0/net/eth0/speed"), "-1\n");
    m.write(&format!("{dir}/virtio0/net/eth0/type"), "1\n");
    let inv = m.discover();
    let nic = inv.nic(&addr(VIRTIO)).unwrap();
    assert_eq!(nic.if_name(), Some("eth0"));
    assert_eq!(nic.netdevs[0].mtu, Some(1460));
    assert!(inv.problems.is_empty(), "{:?}", inv.problems);
}
