//! Root-relative machine reader: PCI functions, accelerators, NICs/RDMA and NUMA nodes,
//! read from sysfs/procfs into an Inventory. Only a missing or empty sysfs root fails the
//! whole discovery; anything else wrong on the machine becomes a `DiscoveryProblem`.

pub mod accelerators;
pub mod chardev;
pub mod nics;
pub mod numa;
pub mod pci;
mod pci_names;
pub mod reader;
/// CPU lists as the kernel prints them (the core parses them; the fixture writer prints them).
pub use tandem_core::cpulist;
pub use tandem_core::machine_roots::MachineRoots;

use crate::topology::{DiscoveryProblem, Inventory, LostDevice, PciAddress};
use pci::Role;
use reader::{ReadError, RootedReader};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

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
        self.push(DiscoveryProblem {
            device,
            path,
            message: message.into(),
            lost: None,
        });
    }

    /// A device of a known kind that could not be placed and is left out of the inventory.
    pub fn lost(
        &mut self,
        device: Option<PciAddress>,
        path: PathBuf,
        message: impl Into<String>,
        lost: LostDevice,
    ) {
        self.push(DiscoveryProblem {
            device,
            path,
            message: message.into(),
            lost: Some(lost),
        });
    }

    fn push(&mut self, problem: DiscoveryProblem) {
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

    /// Takes over problems collected elsewhere (another thread), after those already here.
    pub fn append(&mut self, mut other: Problems) {
        self.list.append(&mut other.list);
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

    // Each syscall is the cost of discovery, so the per-function work runs on a few threads,
    // each with its own readers and problem lists; results and problems are put back in the
    // order a single thread would have met them.
    let devices_rel = devices.rel().to_path_buf();
    let resolved = map_in_parallel(
        entries,
        || RootedReader::new(&roots.sys),
        |reader, entry| {
            let mut found = Problems::default();
            let devices = reader.resolved_dir(devices_rel.clone());
            (pci::resolve_entry(&devices, &entry, &mut found), found)
        },
    );
    let mut entries = Vec::with_capacity(resolved.len());
    for (entry, found) in resolved {
        problems.append(found);
        entries.extend(entry);
    }
    let bridges = pci::bridges(&entries);
    entries.retain(|e| !bridges.contains(&e.address));
    let scanned = map_in_parallel(
        entries,
        || {
            (
                RootedReader::new(&roots.sys),
                RootedReader::new(&roots.proc),
            )
        },
        |(sys, proc), entry| scan_function(sys, proc, &numa, entry),
    );

    let mut found = Vec::with_capacity(scanned.len());
    for function in scanned {
        problems.append(function.identify_problems);
        found.extend(function.found);
    }
    found.sort_by_key(|f| f.address);
    let mut scan = Scan {
        sys: &sys,
        proc: &proc,
        proc_devices: chardev::LazyProcDevices::new(&proc),
        problems,
    };
    let mut accelerators = Vec::new();
    let mut nics = Vec::new();
    for function in found {
        scan.problems.append(function.problems);
        match function.device {
            ScannedDevice::Nic(nic) => nics.push(nic),
            ScannedDevice::Accelerator(accelerator) => accelerators.push(accelerator),
            ScannedDevice::NeedsProcDevices { rel, pci, kind } => {
                let dir = sys.resolved_dir(rel);
                accelerators.push(accelerators::read_accelerator(&dir, pci, kind, &mut scan));
            }
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

/// Most threads one discovery uses: the work is syscalls on one tree, which stops scaling
/// well before a large machine's core count.
const MAX_DISCOVERY_THREADS: usize = 4;
/// Fewer items than this per thread cost more to hand out than to read on one thread: on a
/// busy 2-core machine a DGX-sized node (about 60 entries) was slower on two threads.
const MIN_ITEMS_PER_THREAD: usize = 32;

/// What one function yielded, read on whichever discovery thread it was handed to.
struct ScannedFunction {
    /// Problems met while identifying the function, reported before any device's facts.
    identify_problems: Problems,
    found: Option<FoundFunction>,
}

struct FoundFunction {
    address: PciAddress,
    device: ScannedDevice,
    /// Problems met while reading its facts, reported in address order.
    problems: Problems,
}

enum ScannedDevice {
    Nic(crate::topology::Nic),
    Accelerator(crate::topology::Accelerator),
    /// Read on the main thread, which holds the scan's one copy of `/proc/devices`.
    NeedsProcDevices {
        rel: PathBuf,
        pci: crate::topology::PciFunction,
        kind: crate::topology::AcceleratorKind,
    },
}

fn scan_function(
    sys: &RootedReader,
    proc: &RootedReader,
    numa: &numa::NumaTopology,
    entry: pci::ResolvedEntry,
) -> ScannedFunction {
    let mut identify_problems = Problems::default();
    let dir = sys.resolved_dir(entry.rel);
    let Some(candidate) =
        pci::identify(entry.address, dir, &entry.link_path, &mut identify_problems)
    else {
        return ScannedFunction {
            identify_problems,
            found: None,
        };
    };
    let mut problems = Problems::default();
    let function = pci::read_function(&candidate, numa, &mut problems);
    let device = match candidate.role {
        Role::Nic => ScannedDevice::Nic(nics::read_nic(&candidate.dir, function, &mut problems)),
        Role::Accelerator(kind) if accelerators::may_need_proc_devices(&function) => {
            ScannedDevice::NeedsProcDevices {
                rel: candidate.dir.rel().to_path_buf(),
                pci: function,
                kind,
            }
        }
        Role::Accelerator(kind) => {
            let mut scan = Scan {
                sys,
                proc,
                proc_devices: chardev::LazyProcDevices::new(proc),
                problems,
            };
            let accelerator =
                accelerators::read_accelerator(&candidate.dir, function, kind, &mut scan);
            problems = scan.problems;
            ScannedDevice::Accelerator(accelerator)
        }
    };
    ScannedFunction {
        identify_problems,
        found: Some(FoundFunction {
            address: candidate.address,
            device,
            problems,
        }),
    }
}

/// `work` applied to every item, on up to `MAX_DISCOVERY_THREADS` threads that each start
/// from `make_worker()` (their own readers: a reader's caches are not shared). Items are
/// dealt out round-robin so that runs of cheap or costly functions spread over the threads;
/// the results come back in the order of `items`. A thread that cannot be started leaves
/// its share to the calling thread.
fn map_in_parallel<T, R, W>(
    items: Vec<T>,
    make_worker: impl Fn() -> W + Sync,
    work: impl Fn(&mut W, T) -> R + Sync,
) -> Vec<R>
where
    T: Send,
    R: Send,
{
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = available
        .min(MAX_DISCOVERY_THREADS)
        .min(items.len() / MIN_ITEMS_PER_THREAD)
        .max(1);
    let total = items.len();
    let mut shares: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
    for (index, item) in items.into_iter().enumerate() {
        shares[index % threads].push((index, item));
    }
    let run = |share: Vec<(usize, T)>| {
        let mut worker = make_worker();
        share
            .into_iter()
            .map(|(index, item)| (index, work(&mut worker, item)))
            .collect::<Vec<_>>()
    };
    // Each share waits in a slot that its thread empties; a share whose thread could not be
    // started is still in its slot afterwards, and the calling thread reads it.
    type Slot<T> = Mutex<Option<Vec<(usize, T)>>>;
    let slots: Vec<Slot<T>> = shares.into_iter().map(|s| Mutex::new(Some(s))).collect();
    let take = |slot: &Slot<T>| {
        slot.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default()
    };
    let mut done: Vec<(usize, R)> = Vec::with_capacity(total);
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for slot in slots.iter().skip(1) {
            let started = std::thread::Builder::new()
                .name("tandem-discovery".to_string())
                .spawn_scoped(scope, || run(take(slot)));
            match started {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    tracing::debug!(error = %e, "discovery thread not started; scanning its share here");
                }
            }
        }
        for slot in &slots {
            done.extend(run(take(slot)));
        }
        for handle in handles {
            match handle.join() {
                Ok(results) => done.extend(results),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    done.sort_unstable_by_key(|(index, _)| *index);
    done.into_iter().map(|(_, result)| result).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_results_keep_item_order() {
        let items: Vec<u32> = (0..100).collect();
        let results = map_in_parallel(items, || std::thread::current().id(), |_, item| item * 3);
        assert_eq!(results, (0..100).map(|i| i * 3).collect::<Vec<_>>());
        let few = map_in_parallel(vec![5u32, 1, 4], || (), |_, item| item + 1);
        assert_eq!(few, vec![6, 2, 5]);
        assert!(map_in_parallel(Vec::<u32>::new(), || (), |_, item| item).is_empty());
    }
}
