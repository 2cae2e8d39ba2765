//! Root-relative machine reader: PCI functions, accelerators, NICs/RDMA and NUMA nodes,
//! read from sysfs/procfs into an Inventory. Only a missing or empty sysfs root fails the
//! whole discovery; anything else wrong on the machine becomes a `DiscoveryProblem`.

pub mod accelerators;
pub mod chardev;
pub mod cpulist;
pub mod nics;
pub mod numa;
pub mod pci;
pub mod reader;
pub mod roots;

pub use roots::MachineRoots;

use crate::topology::{DiscoveryProblem, Inventory, PciAddress};
use pci::Role;
use reader::{ReadError, RootedReader};
use std::path::PathBuf;

/// A failure that leaves nothing to discover: the sysfs root is not a sysfs tree at all.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("sysfs root {}: does not exist (expected a directory such as /sys)", path.display())]
    RootMissing { path: PathBuf },
    #[error("sysfs root {}: is not a directory (expected a directory such as /sys)", path.display())]
    RootNotDirectory { path: PathBuf },
    #[error("sysfs root {}: cannot be read: {source}", path.display())]
    RootUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{error} (expected the kernel's PCI device list)")]
    Unreadable { error: ReadError },
    #[error(
        "sysfs root {}: empty root, {} is missing (expected the kernel's PCI device list)",
        root.display(),
        devices.display()
    )]
    EmptyRoot { root: PathBuf, devices: PathBuf },
}

/// Collects what discovery could not read or understand, in the order it was met.
#[derive(Debug, Default)]
pub struct Problems {
    list: Vec<DiscoveryProblem>,
}

impl Problems {
    pub fn add(&mut self, device: Option<PciAddress>, error: ReadError) {
        let message = error.message();
        self.message(device, error.path().to_path_buf(), message);
    }

    pub fn message(
        &mut self,
        device: Option<PciAddress>,
        path: PathBuf,
        message: impl Into<String>,
    ) {
        let problem = DiscoveryProblem {
            device,
            path,
            message: message.into(),
        };
        tracing::warn!(device = ?problem.device, path = %problem.path.display(), "discovery: {}", problem.message);
        self.list.push(problem);
    }

    /// The value of an optional fact; on error, a problem and `None`.
    pub fn keep<T>(
        &mut self,
        device: Option<PciAddress>,
        read: Result<Option<T>, ReadError>,
    ) -> Option<T> {
        read.unwrap_or_else(|e| {
            self.add(device, e);
            None
        })
    }

    pub fn into_vec(self) -> Vec<DiscoveryProblem> {
        self.list
    }
}

/// What the per-kind readers share during one discovery.
pub struct Scan<'r> {
    pub sys: &'r RootedReader,
    pub proc: &'r RootedReader,
    pub proc_devices: chardev::LazyProcDevices<'r>,
    pub problems: Problems,
}

/// Reads the machine below `roots` into an Inventory: accelerators and NICs sorted by PCI
/// address, NUMA nodes, host-wide device nodes, and every problem met on the way.
pub fn discover(roots: &MachineRoots) -> Result<Inventory, DiscoveryError> {
    let devices_path = roots.sys.join(pci::DEVICES_DIR);
    check_root(&roots.sys)?;

    let sys = RootedReader::new(&roots.sys);
    let proc = RootedReader::new(&roots.proc);
    // Without a readable device list there is no machine to describe: an error, not an
    // empty Inventory that would look like a node without devices.
    let devices = sys
        .dir(pci::DEVICES_DIR)
        .and_then(|d| d.entries().map(|entries| (d, entries)));
    let (devices, entries) = match devices {
        Ok(found) => found,
        Err(e) if e.is_missing() || e.is_not_directory() => {
            return Err(DiscoveryError::EmptyRoot {
                root: roots.sys.clone(),
                devices: devices_path,
            });
        }
        Err(e) => return Err(DiscoveryError::Unreadable { error: e }),
    };
    let mut problems = Problems::default();
    let numa = numa::NumaTopology::read(&sys, &mut problems);
    let mut scan = Scan {
        sys: &sys,
        proc: &proc,
        proc_devices: chardev::LazyProcDevices::new(&proc),
        problems,
    };
    let mut accelerators = Vec::new();
    let mut nics = Vec::new();
    for candidate in pci::candidates(&devices, entries, &mut scan.problems) {
        let function = pci::read_function(&candidate, &numa, &mut scan.problems);
        match candidate.role {
            Role::Nic => nics.push(nics::read_nic(&candidate.dir, function, &mut scan.problems)),
            Role::Accelerator(kind) => accelerators.push(accelerators::read_accelerator(
                &candidate.dir,
                function,
                kind,
                &mut scan,
            )),
        }
    }
    let mut host = accelerators::read_host_info(&accelerators, &mut scan);
    host.shared_char_devices
        .extend(nics::read_shared_char_devices(&nics, &mut scan));
    let problems = scan.problems;

    Ok(Inventory {
        accelerators,
        nics,
        numa_nodes: numa.nodes,
        host,
        problems: problems.into_vec(),
    })
}

/// A root that is missing or not a directory means the flag points at the wrong place, and
/// an empty Inventory would hide that.
fn check_root(root: &std::path::Path) -> Result<(), DiscoveryError> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(DiscoveryError::RootNotDirectory {
                path: root.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DiscoveryError::RootMissing {
                path: root.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(DiscoveryError::RootUnreadable {
                path: root.to_path_buf(),
                source,
            });
        }
    }
    Ok(())
}
