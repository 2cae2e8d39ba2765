//! PCI functions: enumerating `bus/pci/devices`, placing each function in the PCIe tree from
//! the path its link leads to, and reading the facts every function carries (IDs, NUMA, link,
//! driver, IOMMU group, SR-IOV, AER).

use super::Problems;
use super::cpulist::CpuList;
use super::numa::NumaTopology;
use super::reader::{DirEntry, ReadError, SysDir};
use crate::topology::address::is_root_name;
use crate::topology::{AcceleratorKind, LostDevice, NumaSource, PciAddress, PciFunction, Sriov};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

pub const DEVICES_DIR: &str = "bus/pci/devices";

const VENDOR_NVIDIA: u16 = 0x10de;
const VENDOR_AMD: u16 = 0x1002;

/// What discovery does with a function, decided from its class and vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Nic,
    Accelerator(AcceleratorKind),
}

/// The role of a function, or `None` for what Tandem does not hand out: bridges (they are
/// read as the path to a device, not as devices), storage, USB and the like, and display
/// devices from other vendors, which on servers are the BMC's VGA (ASPEED, Matrox) and not
/// something to compute on.
pub fn role(class: u32, vendor: u16) -> Option<Role> {
    match class >> 16 {
        0x02 => Some(Role::Nic),
        0x03 if vendor == VENDOR_NVIDIA => Some(Role::Accelerator(AcceleratorKind::NvidiaGpu)),
        0x03 if vendor == VENDOR_AMD => Some(Role::Accelerator(AcceleratorKind::AmdGpu)),
        // AMD Instinct MI200/MI300 report processing accelerator (0x1200), yet are amdgpu
        // GPUs with DRM render nodes and /dev/kfd.
        0x12 if vendor == VENDOR_AMD => Some(Role::Accelerator(AcceleratorKind::AmdGpu)),
        0x12 => Some(Role::Accelerator(AcceleratorKind::ProcessingAccelerator)),
        _ => None,
    }
}

/// A function worth reading: its identity is known and its place in the tree is resolved.
pub struct Candidate<'r> {
    pub address: PciAddress,
    pub dir: SysDir<'r>,
    pub role: Role,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u32,
    pub pcie_root: String,
    pub bridges: Vec<PciAddress>,
}

/// A `bus/pci/devices` entry whose link has been followed to the function's directory.
pub struct ResolvedEntry {
    pub address: PciAddress,
    /// Root-relative, symlink-free directory of the function.
    pub rel: PathBuf,
    /// The `bus/pci/devices/<address>` link, for messages.
    pub link_path: PathBuf,
}

/// Follows one `bus/pci/devices` entry to its function's directory. An entry that is not a
/// PCI address or whose link leads nowhere becomes a problem and `None`.
pub fn resolve_entry(
    devices: &SysDir<'_>,
    entry: &DirEntry,
    problems: &mut Problems,
) -> Option<ResolvedEntry> {
    let link_path = devices.file_path(&entry.name);
    let Ok(address) = entry.name.parse::<PciAddress>() else {
        problems.message(
            None,
            link_path,
            "entry name is not a PCI address (dddd:bb:dd.f)",
        );
        return None;
    };
    match devices.entry_dir(entry) {
        Ok(dir) => Some(ResolvedEntry {
            address,
            rel: dir.rel().to_path_buf(),
            link_path,
        }),
        Err(ReadError::Missing { path }) => {
            let message = if path == link_path {
                "vanished during the scan".to_string()
            } else {
                format!("dangling symlink: {} does not exist", path.display())
            };
            problems.message(Some(address), link_path, message);
            None
        }
        Err(e) => {
            problems.add(Some(address), e);
            None
        }
    }
}

/// The functions some other function sits below. Only bridges have PCI functions below them
/// in sysfs, so every function named on the way to another one is a bridge, and its class
/// need not be read to know it.
pub fn bridges(resolved: &[ResolvedEntry]) -> HashSet<PciAddress> {
    resolved
        .iter()
        .flat_map(|entry| {
            let mut names = entry.rel.components().rev();
            names.next();
            names.filter_map(|c| c.as_os_str().to_str()?.parse::<PciAddress>().ok())
        })
        .collect()
}

/// Reads the identity of a function (class, vendor, device) and places it in the PCIe tree;
/// `None` for what Tandem does not hand out, and for what cannot be identified or placed
/// (then with a problem).
pub fn identify<'r>(
    address: PciAddress,
    dir: SysDir<'r>,
    link_path: &Path,
    problems: &mut Problems,
) -> Option<Candidate<'r>> {
    let device = Some(address);
    let class = dir
        .parsed("class", "a class code such as 0x030200", parse_class)
        .map_err(|e| problems.add(device, e))
        .ok()?;
    if class >> 16 != 0x02 && class >> 16 != 0x03 && class >> 16 != 0x12 {
        return None;
    }
    // From here on the class says what the function would be; losing it is reported as such.
    let likely = match class >> 16 {
        0x02 => LostDevice::Nic,
        _ => LostDevice::Accelerator,
    };
    let lose = |problems: &mut Problems, e: ReadError, kind: LostDevice| {
        let message = e.message();
        problems.lost(device, e.path().to_path_buf(), message, kind);
    };
    let vendor_id = dir
        .parsed("vendor", "a vendor ID such as 0x10de", parse_hex_u16)
        .map_err(|e| lose(problems, e, likely))
        .ok()?;
    let role = role(class, vendor_id)?;
    let lost = match role {
        Role::Nic => LostDevice::Nic,
        Role::Accelerator(_) => LostDevice::Accelerator,
    };
    let device_id = dir
        .parsed("device", "a device ID such as 0x2330", parse_hex_u16)
        .map_err(|e| lose(problems, e, lost))
        .ok()?;
    let (pcie_root, bridges) = match place_in_tree(dir.rel(), address) {
        Ok(placed) => placed,
        Err(why) => {
            problems.lost(
                device,
                link_path.to_path_buf(),
                format!("leads to {}: {why}", dir.rel().display()),
                lost,
            );
            return None;
        }
    };
    Some(Candidate {
        address,
        dir,
        role,
        vendor_id,
        device_id,
        class,
        pcie_root,
        bridges,
    })
}

/// From the resolved, root-relative directory of a function
/// (`devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:03.0/0000:1b:00.0`), its PCIe root
/// (`pci0000:15`) and the bridges between the root and the function. A nested host bridge
/// (Intel VMD puts `pci10000:e0` below a root port) is part of the path but not a bridge.
///
/// The root is the first `pciDDDD:BB` element, which is not always the first element below
/// `devices/`: Hyper-V passes each PCI device through on its own synthetic host bridge, a
/// VMBus device (`devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/<instance>/pci0001:00/
/// 0001:00:00.0`), and device-tree platforms hang their host bridges below a platform device.
/// Platform elements before the root must not be PCI functions; anything else is a shape we
/// do not know, and an error.
pub fn place_in_tree(rel: &Path, address: PciAddress) -> Result<(String, Vec<PciAddress>), String> {
    let mut names = rel.components().map(|c| match c {
        Component::Normal(n) => n.to_str(),
        _ => None,
    });
    if names.next() != Some(Some("devices")) {
        return Err("expected a path below devices/".to_string());
    }
    let mut platform = Vec::new();
    let root = loop {
        match names.next() {
            Some(Some(root)) if is_root_name(root) => break root.to_string(),
            Some(Some(name))
                if name.parse::<PciAddress>().is_err() && name != "virtual" && !name.is_empty() =>
            {
                platform.push(name);
            }
            _ => {
                return Err(
                    "expected devices/pciDDDD:BB/... or a platform bus such as VMBus leading to \
                     pciDDDD:BB"
                        .to_string(),
                );
            }
        }
    };
    let mut chain = Vec::new();
    for name in names {
        let Some(name) = name else {
            return Err("path is not UTF-8".to_string());
        };
        if is_root_name(name) {
            continue;
        }
        match name.parse::<PciAddress>() {
            Ok(a) => chain.push(a),
            Err(_) => return Err(format!("{name:?} is neither a PCI address nor a PCIe root")),
        }
    }
    match chain.pop() {
        Some(last) if last == address => Ok((root, chain)),
        Some(last) => Err(format!("directory is named {last}, not {address}")),
        None => Err("no device directory below the root".to_string()),
    }
}

/// Reads the facts of a function beyond its identity. Facts the kernel always provides are
/// problems when unreadable; facts that only some functions have (driver, IOMMU group,
/// SR-IOV, AER, a PCIe link) are `None` when absent and problems only when unreadable.
pub fn read_function(
    candidate: &Candidate<'_>,
    numa: &NumaTopology,
    problems: &mut Problems,
) -> PciFunction {
    let dir = &candidate.dir;
    let device = Some(candidate.address);

    let subsystem_vendor_id = problems.keep(
        device,
        dir.parsed(
            "subsystem_vendor",
            "a vendor ID such as 0x10de",
            parse_hex_u16,
        )
        .map(Some),
    );
    let subsystem_device_id = problems.keep(
        device,
        dir.parsed(
            "subsystem_device",
            "a device ID such as 0x16c1",
            parse_hex_u16,
        )
        .map(Some),
    );
    let numa_node = problems.keep(
        device,
        dir.parsed("numa_node", "a NUMA node number or -1", parse_numa_node)
            .map(Some),
    );
    // Kept only when it parses, so that everything downstream can trust it.
    let local_cpulist = problems.keep(
        device,
        dir.parsed("local_cpulist", "a CPU list such as 0-55,112-167", |s| {
            CpuList::parse(s).ok().map(|cpus| (s.to_string(), cpus))
        })
        .map(Some),
    );
    let link_speed = problems
        .keep(device, dir.opt_attr("current_link_speed"))
        .filter(|s| !s.is_empty() && s != "Unknown");
    let link_width = problems.keep(
        device,
        dir.opt_parsed("current_link_width", "a lane count", |s| {
            s.parse::<u32>().ok()
        }),
    );
    let driver = problems.keep(device, dir.link_name("driver"));
    let iommu_group = problems.keep(
        device,
        dir.parsed_link_name(
            "iommu_group",
            "a link to kernel/iommu_groups/<number>",
            |n| n.parse::<u32>().ok(),
        ),
    );
    let physfn = problems.keep(
        device,
        dir.parsed_link_name(
            "physfn",
            "a link to the physical function's directory",
            |n| n.parse::<PciAddress>().ok(),
        ),
    );
    let total_vfs = problems.keep(
        device,
        dir.opt_parsed("sriov_totalvfs", "a number of VFs", |s| {
            s.parse::<u32>().ok()
        }),
    );
    let sriov = match total_vfs {
        Some(total_vfs) => problems.keep(
            device,
            dir.parsed("sriov_numvfs", "a number of VFs", |s| s.parse::<u32>().ok())
                .map(|num_vfs| Some(Sriov { total_vfs, num_vfs })),
        ),
        None => None,
    };
    let aer_fatal = problems.keep(
        device,
        dir.opt_parsed(
            "aer_dev_fatal",
            "counter lines ending in TOTAL_ERR_FATAL <n>",
            |s| aer_counter(s, "TOTAL_ERR_FATAL"),
        ),
    );

    let (numa_node, numa_source) = match numa_node {
        Some(NumaNodeFile::Node(n)) => (Some(n), NumaSource::Sysfs),
        Some(NumaNodeFile::Unset) => {
            let from_cpus = local_cpulist
                .as_ref()
                .and_then(|(_, cpus)| numa.node_for_cpus(cpus));
            match from_cpus {
                Some(n) => (Some(n), NumaSource::LocalCpulist),
                None => (None, NumaSource::Unknown),
            }
        }
        None => (None, NumaSource::Unknown),
    };

    let vendor_name = super::pci_names::vendor_name(candidate.vendor_id).map(str::to_string);
    let device_name =
        super::pci_names::device_name(candidate.vendor_id, candidate.device_id).map(str::to_string);

    PciFunction {
        address: candidate.address,
        vendor_id: candidate.vendor_id,
        device_id: candidate.device_id,
        class: candidate.class,
        subsystem_vendor_id,
        subsystem_device_id,
        vendor_name,
        device_name,
        numa_node,
        numa_source,
        local_cpulist: local_cpulist.map(|(text, _)| text),
        pcie_root: candidate.pcie_root.clone(),
        bridges: candidate.bridges.clone(),
        link_speed,
        link_width,
        driver,
        iommu_group,
        sriov,
        physfn,
        aer_fatal,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumaNodeFile {
    Node(u32),
    /// `-1`: the platform did not say.
    Unset,
}

pub fn parse_numa_node(text: &str) -> Option<NumaNodeFile> {
    if text == "-1" {
        return Some(NumaNodeFile::Unset);
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(NumaNodeFile::Node)
}

/// `0x10de` (the `0x` is optional) -> 0x10de; at most four hex digits.
pub fn parse_hex_u16(text: &str) -> Option<u16> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(digits, 16).ok()
}

/// `0x030200` -> 0x030200; at most six hex digits (24-bit class code).
pub fn parse_class(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

/// The value of one counter line (`TOTAL_ERR_FATAL 0`) of an `aer_dev_*` file.
pub fn aer_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next() != Some(key) {
            return None;
        }
        match (fields.next(), fields.next()) {
            (Some(v), None) => v.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn hex_ids_and_classes() {
        assert_eq!(parse_hex_u16("0x10de"), Some(0x10de));
        assert_eq!(parse_hex_u16("15b3"), Some(0x15b3));
        assert_eq!(parse_hex_u16("0xFFFF"), Some(0xffff));
        for bad in ["", "0x", "zzz", "0x10de0", "0x-1", " 0x10de", "0x10 de"] {
            assert_eq!(parse_hex_u16(bad), None, "{bad}");
        }
        assert_eq!(parse_class("0x030200"), Some(0x030200));
        assert_eq!(parse_class("0x1200"), Some(0x1200));
        for bad in ["", "garbage", "0x0302000", "0x03020g"] {
            assert_eq!(parse_class(bad), None, "{bad}");
        }
    }

    #[test]
    fn roles() {
        assert_eq!(role(0x020000, 0x15b3), Some(Role::Nic));
        assert_eq!(role(0x020700, 0x15b3), Some(Role::Nic));
        assert_eq!(
            role(0x030200, 0x10de),
            Some(Role::Accelerator(AcceleratorKind::NvidiaGpu))
        );
        assert_eq!(
            role(0x038000, 0x1002),
            Some(Role::Accelerator(AcceleratorKind::AmdGpu))
        );
        assert_eq!(
            role(0x120000, 0x1002),
            Some(Role::Accelerator(AcceleratorKind::AmdGpu)),
            "MI300X"
        );
        assert_eq!(
            role(0x120000, 0x1da3),
            Some(Role::Accelerator(AcceleratorKind::ProcessingAccelerator))
        );
        assert_eq!(role(0x030000, 0x1a03), None, "ASPEED BMC VGA");
        assert_eq!(role(0x060400, 0x10de), None, "bridge");
        assert_eq!(role(0x010802, 0x144d), None, "NVMe");
    }

    #[test]
    fn numa_node_file() {
        assert_eq!(parse_numa_node("-1"), Some(NumaNodeFile::Unset));
        assert_eq!(parse_numa_node("0"), Some(NumaNodeFile::Node(0)));
        assert_eq!(parse_numa_node("7"), Some(NumaNodeFile::Node(7)));
        for bad in ["", "-2", "x", "1.5", "99999999999"] {
            assert_eq!(parse_numa_node(bad), None, "{bad}");
        }
    }

    #[test]
    fn aer_counters() {
        let text = "Undefined 0\nDLP 0\nSDES 0\nTLP 0\nFCP 0\nCmpltTO 0\nCmpltAbrt 0\n\
                    UnxCmplt 0\nRxOF 0\nMalfTLP 0\nECRC 0\nUnsupReq 0\nACSViol 0\nTOTAL_ERR_FATAL 3\n";
        assert_eq!(aer_counter(text, "TOTAL_ERR_FATAL"), Some(3));
        assert_eq!(aer_counter(text, "DLP"), Some(0));
        assert_eq!(aer_counter("TOTAL_ERR_FATAL\n", "TOTAL_ERR_FATAL"), None);
        assert_eq!(aer_counter("TOTAL_ERR_FATAL x", "TOTAL_ERR_FATAL"), None);
        assert_eq!(aer_counter("TOTAL_ERR_FATAL 1 2", "TOTAL_ERR_FATAL"), None);
        assert_eq!(aer_counter("TOTAL_ERR_FATAL_X 1", "TOTAL_ERR_FATAL"), None);
        assert_eq!(aer_counter("", "TOTAL_ERR_FATAL"), None);
    }

    #[test]
    fn tree_placement() {
        let rel =
            Path::new("devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:03.0/0000:1b:00.0");
        let (root, bridges) = place_in_tree(rel, addr("0000:1b:00.0")).unwrap();
        assert_eq!(root, "pci0000:15");
        assert_eq!(
            bridges,
            vec![
                addr("0000:15:01.0"),
                addr("0000:16:00.0"),
                addr("0000:17:03.0")
            ]
        );

        let direct = Path::new("devices/pci0000:00/0000:00:02.0");
        assert_eq!(
            place_in_tree(direct, addr("0000:00:02.0")).unwrap().1,
            vec![]
        );

        let vmd =
            Path::new("devices/pci0000:00/0000:00:0e.0/pci10000:e0/10000:e0:1d.0/10000:e1:00.0");
        let (root, bridges) = place_in_tree(vmd, addr("10000:e1:00.0")).unwrap();
        assert_eq!(root, "pci0000:00");
        assert_eq!(bridges, vec![addr("0000:00:0e.0"), addr("10000:e0:1d.0")]);

        // Hyper-V: the device's own synthetic root, below its VMBus instance.
        let vmbus = Path::new(
            "devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/\
             47505500-0001-0000-3130-444531454238/pci0001:00/0001:00:00.0",
        );
        let (root, bridges) = place_in_tree(vmbus, addr("0001:00:00.0")).unwrap();
        assert_eq!((root.as_str(), bridges), ("pci0001:00", vec![]));
        // A five-hex-digit domain, as some hypervisors hand out.
        let wide = Path::new("devices/LNXSYSTM:00/VMBUS:00/x/pci1a2b3:00/1a2b3:00:00.0");
        assert_eq!(
            place_in_tree(wide, addr("1a2b3:00:00.0")).unwrap().0,
            "pci1a2b3:00"
        );

        for bad in [
            "devices/virtual/net/lo",
            "devices/virtual/pci0000:00/0000:1b:00.0",
            "devices/LNXSYSTM:00/0000:00:01.0/pci0000:00/0000:1b:00.0",
            "devices/LNXSYSTM:00/VMBUS:00/0000:1b:00.0",
            "bus/pci/devices/0000:1b:00.0",
            "devices/pci0000:15",
            "devices/pci0000:15/0000:1b:00.1",
            "devices/pci0000:15/weird/0000:1b:00.0",
        ] {
            assert!(
                place_in_tree(Path::new(bad), addr("0000:1b:00.0")).is_err(),
                "{bad}"
            );
        }
    }
}
