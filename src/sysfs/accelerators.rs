//! Accelerators: NVIDIA GPUs (model, UUID and minor from the driver's procfs entry), AMD GPUs
//! (DRM nodes, product name, VRAM), class 0x12 accelerators (`accel` nodes), any of them bound
//! to vfio-pci; and the host-wide nodes they share (nvidiactl, nvidia-uvm, kfd).

use super::Scan;
use super::chardev::read_char_device;
use super::reader::SysDir;
use crate::topology::{Accelerator, AcceleratorKind, CharDevice, HostInfo, PciFunction};

/// `/dev/nvidia<minor>` and `/dev/nvidiactl` use the major the NVIDIA driver registers
/// statically (it appears as `nvidia-frontend` in `/proc/devices`).
const NVIDIA_MAJOR: u32 = 195;
const NVIDIACTL_MINOR: u32 = 255;
const NVIDIA_DRIVER: &str = "nvidia";
const AMD_DRIVER: &str = "amdgpu";
const VFIO_DRIVER: &str = "vfio-pci";

/// What `/proc/driver/nvidia/gpus/<BDF>/information` tells about one GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NvidiaInformation {
    pub model: Option<String>,
    pub uuid: Option<String>,
    /// The `Device Minor:` text; parsed by the caller so a bad value can name the file.
    pub minor: Option<String>,
}

/// Lines are `Key:<spaces or tabs>value`; unknown keys and lines without a colon are skipped
/// because the driver adds lines between releases.
pub fn parse_nvidia_information(text: &str) -> NvidiaInformation {
    let mut info = NvidiaInformation::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        let slot = match key.trim() {
            "Model" => &mut info.model,
            "GPU UUID" => &mut info.uuid,
            "Device Minor" => &mut info.minor,
            _ => continue,
        };
        *slot = Some(value.to_string());
    }
    info
}

/// The version in `/proc/driver/nvidia/version`'s first line: the first token after
/// `Kernel Module` that starts with a digit, which skips the `for x86_64` of the open modules
/// (`NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build ...`).
pub fn parse_nvidia_version(text: &str) -> Option<String> {
    let first = text.lines().next()?;
    let (_, rest) = first.split_once("Kernel Module")?;
    rest.split_whitespace()
        .find(|t| t.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string)
}

/// Whether reading this accelerator may need `/proc/devices` (a vfio-pci function whose
/// group lacks a `dev` file), which discovery reads once for the whole scan; such functions
/// are read after the parallel part of the scan.
pub fn may_need_proc_devices(pci: &PciFunction) -> bool {
    pci.driver.as_deref() == Some(VFIO_DRIVER)
}

pub fn read_accelerator(
    dir: &SysDir<'_>,
    pci: PciFunction,
    kind: AcceleratorKind,
    scan: &mut Scan<'_>,
) -> Accelerator {
    let vfio = pci.driver.as_deref() == Some(VFIO_DRIVER);
    let mut accelerator = Accelerator {
        model: String::new(),
        kind,
        uuid: None,
        minor: None,
        memory_bytes: None,
        vfio,
        char_devices: Vec::new(),
        pci,
    };
    let mut driver_model = None;
    if vfio {
        // A function bound to vfio-pci has no driver-specific files; the VFIO group is all the
        // container gets.
        accelerator
            .char_devices
            .extend(vfio_char_device(&accelerator.pci, scan));
    } else {
        match kind {
            AcceleratorKind::NvidiaGpu => driver_model = read_nvidia(&mut accelerator, scan),
            AcceleratorKind::AmdGpu => driver_model = read_amd(dir, &mut accelerator, scan),
            AcceleratorKind::ProcessingAccelerator => read_accel_nodes(dir, &mut accelerator, scan),
        }
    }
    accelerator.model = driver_model
        .or_else(|| accelerator.pci.device_name.clone())
        .unwrap_or_else(|| raw_model(&accelerator.pci));
    accelerator
}

/// The model of a device the PCI database does not know: vendor name (if known) and IDs.
fn raw_model(pci: &PciFunction) -> String {
    let vendor = pci.vendor_name.as_deref().unwrap_or("PCI device");
    format!("{vendor} {:04x}:{:04x}", pci.vendor_id, pci.device_id)
}

/// Reads the NVIDIA driver's procfs entry; returns its `Model:`. Without the nvidia driver
/// bound (nouveau, unbound) the entry is not expected, so its absence is no problem then.
fn read_nvidia(accelerator: &mut Accelerator, scan: &mut Scan<'_>) -> Option<String> {
    let address = accelerator.pci.address;
    let device = Some(address);
    let expected = accelerator.pci.driver.as_deref() == Some(NVIDIA_DRIVER);
    let gpu_dir = format!("driver/nvidia/gpus/{address}");
    let text = match scan.proc.dir(&gpu_dir).and_then(|d| d.attr("information")) {
        Ok(text) => text,
        Err(e) if e.is_missing() && !expected => return None,
        Err(e) => {
            scan.problems.add(device, e);
            return None;
        }
    };
    let info = parse_nvidia_information(&text);
    let information_path = scan
        .proc
        .host_path(format!("{gpu_dir}/information").as_ref());
    accelerator.uuid = info.uuid;
    match info.minor.as_deref().map(|m| (m, m.parse::<u32>())) {
        Some((_, Ok(minor))) => {
            accelerator.minor = Some(minor);
            accelerator.char_devices.push(CharDevice {
                path: format!("nvidia{minor}"),
                major: NVIDIA_MAJOR,
                minor,
            });
        }
        Some((text, Err(_))) => scan.problems.message(
            device,
            information_path,
            format!("expected a number after \"Device Minor:\", found {text:?}"),
        ),
        None => scan
            .problems
            .message(device, information_path, "no \"Device Minor:\" line"),
    }
    info.model
}

/// DRM nodes, product name and VRAM size of an AMD GPU; returns the product name.
fn read_amd(
    dir: &SysDir<'_>,
    accelerator: &mut Accelerator,
    scan: &mut Scan<'_>,
) -> Option<String> {
    let device = Some(accelerator.pci.address);
    let bound = accelerator.pci.driver.as_deref() == Some(AMD_DRIVER);
    match dir.opt_subdir("drm") {
        Ok(Some(drm)) => {
            let entries = drm.entries().unwrap_or_else(|e| {
                scan.problems.add(device, e);
                Vec::new()
            });
            for entry in entries {
                let is_node = entry
                    .name
                    .strip_prefix("card")
                    .or_else(|| entry.name.strip_prefix("renderD"));
                if !is_node.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                {
                    continue;
                }
                let node = drm
                    .subdir(&entry.name)
                    .and_then(|d| read_char_device(&d, format!("dri/{}", entry.name)));
                match node {
                    Ok(c) => accelerator.char_devices.push(c),
                    Err(e) => scan.problems.add(device, e),
                }
            }
        }
        Ok(None) if !bound => {}
        Ok(None) => scan.problems.message(
            device,
            dir.file_path("drm"),
            "bound to amdgpu but has no DRM nodes",
        ),
        Err(e) => scan.problems.add(device, e),
    }
    accelerator.memory_bytes = scan.problems.keep(
        device,
        dir.opt_parsed("mem_info_vram_total", "a number of bytes", |s| {
            s.parse::<u64>().ok()
        }),
    );
    scan.problems
        .keep(device, dir.opt_attr("product_name"))
        .filter(|name| !name.is_empty())
}

/// `/dev/accel/accel<N>` nodes of a class 0x12 accelerator. Drivers that predate the accel
/// subsystem have none, so their absence is no problem.
fn read_accel_nodes(dir: &SysDir<'_>, accelerator: &mut Accelerator, scan: &mut Scan<'_>) {
    let device = Some(accelerator.pci.address);
    let accel = match dir.opt_subdir("accel") {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(e) => return scan.problems.add(device, e),
    };
    let entries = accel.entries().unwrap_or_else(|e| {
        scan.problems.add(device, e);
        Vec::new()
    });
    for entry in entries.iter().filter(|e| e.name.starts_with("accel")) {
        let node = accel
            .subdir(&entry.name)
            .and_then(|d| read_char_device(&d, format!("accel/{}", entry.name)));
        match node {
            Ok(c) => accelerator.char_devices.push(c),
            Err(e) => scan.problems.add(device, e),
        }
    }
}

/// `/dev/vfio/<group>`. The numbers come from the group's own `class/vfio/<group>/dev`; where
/// sysfs lacks it, the major is the `vfio` line of `/proc/devices` and the minor is taken to
/// be the group number (the vfio core numbers minors in group creation order, which matches
/// the group numbers on a host that binds its devices at boot).
fn vfio_char_device(pci: &PciFunction, scan: &mut Scan<'_>) -> Option<CharDevice> {
    let device = Some(pci.address);
    let Some(group) = pci.iommu_group else {
        scan.problems.message(
            device,
            scan.sys.host_path(
                format!("{}/{}/iommu_group", super::pci::DEVICES_DIR, pci.address).as_ref(),
            ),
            "bound to vfio-pci but has no IOMMU group",
        );
        return None;
    };
    let path = format!("vfio/{group}");
    match scan
        .sys
        .dir(format!("class/vfio/{group}"))
        .and_then(|d| read_char_device(&d, path.clone()))
    {
        Ok(c) => return Some(c),
        Err(e) if e.is_missing() => {}
        Err(e) => {
            scan.problems.add(device, e);
            return None;
        }
    }
    let major = scan
        .proc_devices
        .major("vfio", device, &mut scan.problems)?;
    Some(CharDevice {
        path,
        major,
        minor: group,
    })
}

/// Host-wide facts the accelerators need: the NVIDIA driver version and shared nodes.
pub fn read_host_info(accelerators: &[Accelerator], scan: &mut Scan<'_>) -> HostInfo {
    let mut host = HostInfo::default();
    let nvidia_bound = accelerators.iter().any(|a| {
        a.kind == AcceleratorKind::NvidiaGpu && a.pci.driver.as_deref() == Some(NVIDIA_DRIVER)
    });
    if nvidia_bound {
        let version = scan.proc.dir("driver/nvidia").and_then(|d| {
            d.parsed(
                "version",
                "a line such as \"NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15 ...\"",
                parse_nvidia_version,
            )
        });
        host.nvidia_driver_version = scan.problems.keep(None, version.map(Some));
        host.shared_char_devices.push(CharDevice {
            path: "nvidiactl".to_string(),
            major: NVIDIA_MAJOR,
            minor: NVIDIACTL_MINOR,
        });
        if let Some(major) = scan
            .proc_devices
            .major("nvidia-uvm", None, &mut scan.problems)
        {
            for (minor, name) in [(0, "nvidia-uvm"), (1, "nvidia-uvm-tools")] {
                host.shared_char_devices.push(CharDevice {
                    path: name.to_string(),
                    major,
                    minor,
                });
            }
        }
    }
    let amd_bound = accelerators
        .iter()
        .any(|a| a.kind == AcceleratorKind::AmdGpu && a.pci.driver.as_deref() == Some(AMD_DRIVER));
    if amd_bound {
        let kfd = scan
            .sys
            .dir("class/kfd/kfd")
            .and_then(|d| read_char_device(&d, "kfd".to_string()));
        match kfd {
            Ok(c) => host.shared_char_devices.push(c),
            Err(e) => scan.problems.add(None, e),
        }
    }
    host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_information_file() {
        let text = "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:             0\n\
                    GPU UUID:\tGPU-5b1a7a2c-1f3e-4c8e-9d3a-000000000001\nVideo BIOS: \t 96.00.74.00.01\n\
                    Bus Type: \t PCIe\nDMA Size: \t 52 bits\nBus Location: \t 0000:18:00.0\n\
                    Device Minor: \t 3\nGPU Excluded:\t No\n";
        let info = parse_nvidia_information(text);
        assert_eq!(info.model.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(
            info.uuid.as_deref(),
            Some("GPU-5b1a7a2c-1f3e-4c8e-9d3a-000000000001")
        );
        assert_eq!(info.minor.as_deref(), Some("3"));
    }

    #[test]
    fn nvidia_information_malformed() {
        assert_eq!(parse_nvidia_information(""), NvidiaInformation::default());
        let info = parse_nvidia_information("Model\nGPU UUID:   \nDevice Minor: x\n:::\n");
        assert_eq!(info.model, None);
        assert_eq!(info.uuid, None);
        assert_eq!(info.minor.as_deref(), Some("x"));
    }

    #[test]
    fn nvidia_version_file() {
        assert_eq!(
            parse_nvidia_version(
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n\
                 GCC version:  gcc version 12.3.0\n"
            )
            .as_deref(),
            Some("550.54.15")
        );
        assert_eq!(
            parse_nvidia_version(
                "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build  (dvs-builder@U16-I3-B03-4-3)\n"
            )
            .as_deref(),
            Some("570.124.06")
        );
        assert_eq!(parse_nvidia_version(""), None);
        assert_eq!(parse_nvidia_version("NVRM version: something else\n"), None);
        assert_eq!(
            parse_nvidia_version("NVRM version: NVIDIA UNIX Kernel Module\n"),
            None
        );
    }
}
