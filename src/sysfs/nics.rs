//! Network functions: their netdevs (`<pci dir>/net/<ifname>`), their RDMA device
//! (`<pci dir>/infiniband/<ibdev>` with ports) and the verbs/MAD char devices that belong to it;
//! plus the host-wide `rdma_cm` node.

use super::chardev::read_char_device;
use super::reader::SysDir;
use super::{Problems, Scan};
use crate::topology::{CharDevice, Netdev, Nic, PciAddress, PciFunction, RdmaDevice, RdmaPort};

/// `4: ACTIVE` -> `ACTIVE`, `5: LinkUp` -> `LinkUp`: the kernel prints the numeric state, a
/// colon and its name.
pub fn parse_port_state(text: &str) -> Option<String> {
    let (number, name) = text.split_once(':')?;
    let number = number.trim();
    let name = name.trim();
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) || name.is_empty() {
        return None;
    }
    Some(name.to_string())
}

/// `400 Gb/sec (4X NDR)` -> 400. Fractional rates of old single-lane links (`2.5 Gb/sec`)
/// are rounded down, since the Inventory counts whole Gb/s.
pub fn parse_rate_gbps(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace();
    let number = fields.next()?;
    if fields.next() != Some("Gb/sec") {
        return None;
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) {
        return None;
    }
    whole.parse().ok()
}

/// Netdev `speed` in Mb/s; the kernel prints -1 (or nothing readable) while the link is down.
fn parse_speed(text: &str) -> Option<Option<u64>> {
    let speed: i64 = text.parse().ok()?;
    Some(u64::try_from(speed).ok())
}

fn parse_u32(text: &str) -> Option<u32> {
    text.parse().ok()
}

pub fn read_nic(dir: &SysDir<'_>, pci: PciFunction, problems: &mut Problems) -> Nic {
    let device = Some(pci.address);
    let mut netdev_dirs = subdirs(dir, "net", device, problems);
    // virtio-net hangs its netdev one level down: `<pci dir>/virtio<N>/net/<ifname>`.
    if pci.driver.as_deref() == Some("virtio-pci") {
        let entries = dir.entries().unwrap_or_else(|e| {
            problems.add(device, e);
            Vec::new()
        });
        for entry in entries.iter().filter(|e| e.name.starts_with("virtio")) {
            match dir.subdir(&entry.name) {
                Ok(virtio) => netdev_dirs.extend(subdirs(&virtio, "net", device, problems)),
                Err(e) => problems.add(device, e),
            }
        }
        netdev_dirs.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let netdevs: Vec<Netdev> = netdev_dirs
        .into_iter()
        .map(|(name, net)| read_netdev(name, &net, device, problems))
        .collect();
    let mut rdma = read_rdma_device(dir, device, problems);
    if let Some(rdma) = rdma.as_mut() {
        attach_char_devices(dir, rdma, device, problems);
    }
    let frontend = frontend_reason(dir, &netdevs, rdma.as_ref(), device, problems);
    Nic {
        pci,
        netdevs,
        rdma,
        frontend,
    }
}

/// Driver of the Hyper-V synthetic NIC, a VMBus device.
const NETVSC_DRIVER: &str = "hv_netvsc";
/// Azure's udev rules name the RDMA device of an accelerated-networking VF `mlx5_an<N>` (and
/// the InfiniBand VFs `mlx5_ib<N>`).
const ACCELERATED_NETWORKING_IBDEV: &str = "mlx5_an";

/// Why sysfs says this NIC is the node's frontend rather than a compute-fabric port: its
/// netdev is enslaved (`master`) to a Hyper-V synthetic NIC, which makes it Azure's
/// accelerated-networking VF of that interface, or its RDMA device carries Azure's name for
/// one. A bond or bridge master says nothing by itself: RoCE fabrics bond ports too.
fn frontend_reason(
    dir: &SysDir<'_>,
    netdevs: &[Netdev],
    rdma: Option<&RdmaDevice>,
    device: Option<PciAddress>,
    problems: &mut Problems,
) -> Option<String> {
    let net = dir.opt_subdir("net").ok().flatten();
    for netdev in netdevs {
        let Some(net) = &net else { break };
        let master = match net
            .subdir(&netdev.name)
            .and_then(|d| d.opt_subdir("master"))
        {
            Ok(Some(master)) => master,
            Ok(None) => continue,
            Err(e) => {
                problems.add(device, e);
                continue;
            }
        };
        let driver = master
            .opt_subdir("device")
            .ok()
            .flatten()
            .and_then(|d| d.link_name("driver").ok().flatten());
        if driver.as_deref() == Some(NETVSC_DRIVER) {
            let master_name = master
                .rel()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Some(format!(
                "{} is the accelerated-networking VF of {master_name} ({NETVSC_DRIVER})",
                netdev.name
            ));
        }
    }
    let rdma = rdma?;
    rdma.name
        .strip_prefix(ACCELERATED_NETWORKING_IBDEV)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| {
            format!(
                "RDMA device {} is named as an accelerated-networking VF",
                rdma.name
            )
        })
}

/// The subdirectories of `<dir>/<name>`, sorted by name; none when `<dir>/<name>` is absent.
fn subdirs<'r>(
    dir: &SysDir<'r>,
    name: &str,
    device: Option<PciAddress>,
    problems: &mut Problems,
) -> Vec<(String, SysDir<'r>)> {
    let parent = match dir.opt_subdir(name) {
        Ok(Some(p)) => p,
        Ok(None) => return Vec::new(),
        Err(e) => {
            problems.add(device, e);
            return Vec::new();
        }
    };
    let entries = match parent.entries() {
        Ok(e) => e,
        Err(e) => {
            problems.add(device, e);
            return Vec::new();
        }
    };
    let mut found = Vec::with_capacity(entries.len());
    for entry in entries {
        match parent.subdir(&entry.name) {
            Ok(d) => found.push((entry.name, d)),
            Err(e) => problems.add(device, e),
        }
    }
    found
}

fn read_netdev(
    name: String,
    net: &SysDir<'_>,
    device: Option<PciAddress>,
    problems: &mut Problems,
) -> Netdev {
    let mac = problems.keep(device, net.attr("address").map(Some));
    let mtu = problems.keep(
        device,
        net.parsed("mtu", "an MTU in bytes", parse_u32).map(Some),
    );
    let operstate = problems.keep(device, net.attr("operstate").map(Some));
    let speed_mbps = match net.parsed("speed", "a speed in Mb/s or -1", parse_speed) {
        Ok(speed) => speed,
        // Several drivers answer EINVAL instead of -1 while the link is down.
        Err(e) if e.is_invalid_argument() => None,
        Err(e) => {
            problems.add(device, e);
            None
        }
    };
    let if_type = problems.keep(
        device,
        net.parsed("type", "an ARPHRD number", parse_u32).map(Some),
    );
    Netdev {
        name,
        mac,
        mtu,
        operstate,
        speed_mbps,
        if_type,
    }
}

/// The function's RDMA device. A PCI function registers at most one; should a tree show more,
/// the first by name is kept and the rest reported.
fn read_rdma_device(
    dir: &SysDir<'_>,
    device: Option<PciAddress>,
    problems: &mut Problems,
) -> Option<RdmaDevice> {
    let mut ibdevs = subdirs(dir, "infiniband", device, problems).into_iter();
    let (name, ib) = ibdevs.next()?;
    for (extra, extra_dir) in ibdevs {
        problems.message(
            device,
            extra_dir.path(),
            format!("a second RDMA device on one function; keeping {name}, ignoring {extra}"),
        );
    }
    let node_guid = problems.keep(device, ib.attr("node_guid").map(Some));
    let mut ports: Vec<RdmaPort> = subdirs(&ib, "ports", device, problems)
        .into_iter()
        .filter_map(|(number, port)| {
            let number = number.parse::<u32>().ok()?;
            Some(read_port(number, &port, device, problems))
        })
        .collect();
    ports.sort_by_key(|p| p.number);
    Some(RdmaDevice {
        name,
        node_guid,
        ports,
        char_devices: Vec::new(),
    })
}

fn read_port(
    number: u32,
    port: &SysDir<'_>,
    device: Option<PciAddress>,
    problems: &mut Problems,
) -> RdmaPort {
    const STATE: &str = "a port state such as \"4: ACTIVE\"";
    let state = problems.keep(
        device,
        port.parsed("state", STATE, parse_port_state).map(Some),
    );
    let phys_state = problems.keep(
        device,
        port.parsed("phys_state", STATE, parse_port_state).map(Some),
    );
    let link_layer = problems.keep(device, port.attr("link_layer").map(Some));
    let rate_gbps = match port.parsed(
        "rate",
        "a rate such as \"400 Gb/sec (4X NDR)\"",
        parse_rate_gbps,
    ) {
        Ok(rate) => Some(rate),
        // The kernel answers EINVAL when the port cannot report a speed (link down).
        Err(e) if e.is_invalid_argument() => None,
        Err(e) => {
            problems.add(device, e);
            None
        }
    };
    RdmaPort {
        number,
        state,
        phys_state,
        link_layer,
        rate_gbps,
    }
}

/// Verbs (`uverbsN`) and MAD (`umadN`, `issmN`) nodes of the function, each attached to the
/// RDMA device named by its `ibdev` file.
fn attach_char_devices(
    dir: &SysDir<'_>,
    rdma: &mut RdmaDevice,
    device: Option<PciAddress>,
    problems: &mut Problems,
) {
    let verbs = subdirs(dir, "infiniband_verbs", device, problems)
        .into_iter()
        .filter(|(name, _)| name.starts_with("uverbs"));
    let mad = subdirs(dir, "infiniband_mad", device, problems)
        .into_iter()
        .filter(|(name, _)| name.starts_with("umad") || name.starts_with("issm"));
    for (name, node) in verbs.chain(mad) {
        let ibdev = match node.attr("ibdev") {
            Ok(ibdev) => ibdev,
            Err(e) => {
                problems.add(device, e);
                continue;
            }
        };
        if ibdev != rdma.name {
            problems.message(
                device,
                node.file_path("ibdev"),
                format!(
                    "names RDMA device {ibdev:?}, but this function's is {:?}",
                    rdma.name
                ),
            );
            continue;
        }
        match read_char_device(&node, format!("infiniband/{name}")) {
            Ok(c) => rdma.char_devices.push(c),
            Err(e) => problems.add(device, e),
        }
    }
}

/// `/dev/infiniband/rdma_cm`, shared by every RDMA device, when the rdma_ucm module provides
/// it; without RDMA devices it is of no use and not read.
pub fn read_shared_char_devices(nics: &[Nic], scan: &mut Scan<'_>) -> Option<CharDevice> {
    if !nics.iter().any(Nic::is_rdma) {
        return None;
    }
    let rdma_cm = scan
        .sys
        .dir("class/misc/rdma_cm")
        .and_then(|d| read_char_device(&d, "infiniband/rdma_cm".to_string()));
    match rdma_cm {
        Ok(c) => Some(c),
        Err(e) if e.is_missing() => None,
        Err(e) => {
            scan.problems.add(None, e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_states() {
        assert_eq!(parse_port_state("4: ACTIVE").as_deref(), Some("ACTIVE"));
        assert_eq!(parse_port_state("1: DOWN").as_deref(), Some("DOWN"));
        assert_eq!(parse_port_state("5: LinkUp").as_deref(), Some("LinkUp"));
        assert_eq!(
            parse_port_state("3:  Disabled ").as_deref(),
            Some("Disabled")
        );
        for bad in ["", "ACTIVE", "4:", ": ACTIVE", "x: ACTIVE", "4 ACTIVE"] {
            assert_eq!(parse_port_state(bad), None, "{bad}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate_gbps("400 Gb/sec (4X NDR)"), Some(400));
        assert_eq!(parse_rate_gbps("100 Gb/sec (4X EDR)"), Some(100));
        assert_eq!(parse_rate_gbps("200 Gb/sec (2X HDR)"), Some(200));
        assert_eq!(parse_rate_gbps("2.5 Gb/sec (1X SDR)"), Some(2));
        assert_eq!(parse_rate_gbps("100 Gb/sec"), Some(100));
        for bad in [
            "",
            "fast",
            "400",
            "400 Mb/sec",
            "x Gb/sec",
            "-1 Gb/sec",
            "4.x Gb/sec",
            ".5 Gb/sec",
        ] {
            assert_eq!(parse_rate_gbps(bad), None, "{bad}");
        }
    }

    #[test]
    fn speeds() {
        assert_eq!(parse_speed("100000"), Some(Some(100_000)));
        assert_eq!(parse_speed("-1"), Some(None));
        assert_eq!(parse_speed("fast"), None);
        assert_eq!(parse_speed(""), None);
    }
}
