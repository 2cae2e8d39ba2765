//! The per-claim record of attached interfaces (`claims/<uid>/netattach.json`). The hook
//! writes an entry before it moves an interface and marks it attached afterwards, so that
//! unprepare (or a later retry) can bring back whatever left the host, even after a crash.

use super::netlink::{Netns, interface_in_netns, move_and_configure, release, snapshot};
use super::rdma::{RdmaMove, move_rdma_device};
use super::{Guards, InterfaceSnapshot, NetAttachError, validate_ifname};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The subdirectory of the state directory that holds one directory per prepared claim
/// (topology file, netattach record). Defined here, below preparation, because the attach
/// hook and the netattach reconcile find records by it too.
pub const CLAIMS_SUBDIR: &str = "claims";

/// `<state_dir>/claims/<uid>`: the claim's own state directory, shared by preparation and
/// the attach hook.
pub fn claim_state_dir(state_dir: &Path, claim_uid: &str) -> PathBuf {
    state_dir.join(CLAIMS_SUBDIR).join(claim_uid)
}

/// File name of the record inside the claim's state directory.
pub const RECORD_FILE: &str = "netattach.json";
const RECORD_MODE: u32 = 0o600;
/// Where `ip netns` (and containerd/CRI-O) pin named network namespaces.
pub const RUN_NETNS_DIR: &str = "/run/netns";

/// Where an attached interface went. The pid is only a hint: the container that ran the hook
/// may be gone while its pod's namespace lives on, so release finds the namespace by inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetnsRef {
    pub pid: u32,
    pub dev: u64,
    pub inode: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttachPhase {
    /// Recorded, move maybe not done: release must check both namespaces.
    Intent,
    /// Moved and configured inside the pod.
    Attached,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedInterface {
    pub pod_name: String,
    pub netns: NetnsRef,
    pub phase: AttachPhase,
    pub snapshot: InterfaceSnapshot,
    /// PCI address of the NIC, so a later claim for the same NIC can find a release that is
    /// still pending (the netdev is invisible to the host while it sits in the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// The NIC's RDMA device (`mlx5_0`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_device: Option<String>,
    /// Whether the RDMA device went into the pod with the netdev (RDMA netns mode
    /// `exclusive`); release brings it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rdma_moved: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetAttachRecord {
    pub interfaces: Vec<AttachedInterface>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("netattach record {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("netattach record {path} is not valid JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    NetAttach(#[from] NetAttachError),
    #[error(transparent)]
    Rdma(#[from] super::rdma::RdmaError),
    #[error("claim {claim_dir}: {} interface(s) not released yet: {}", .failures.len(), .failures.join("; "))]
    Unreleased {
        claim_dir: PathBuf,
        failures: Vec<String>,
    },
}

impl NetAttachRecord {
    /// Loads the record of a claim directory; a missing file is an empty record.
    pub fn load(claim_dir: &Path) -> Result<Self, RecordError> {
        let path = claim_dir.join(RECORD_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }

    /// Writes the record atomically; an empty record removes the file.
    pub fn save(&self, claim_dir: &Path) -> Result<(), RecordError> {
        let path = claim_dir.join(RECORD_FILE);
        let io_error = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        if self.interfaces.is_empty() {
            fsutil::remove_file_if_present(&path).map_err(io_error)?;
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Parse {
            path: path.clone(),
            source,
        })?;
        fsutil::ensure_dir(claim_dir, 0o700).map_err(io_error)?;
        fsutil::write_atomic(&path, &bytes, RECORD_MODE).map_err(io_error)
    }
}

/// Every interface recorded in any claim's record under `state_dir` (attached or being
/// attached): their netdevs may be in pods, out of the host's sysfs and address dump.
/// Unreadable records are skipped; callers ask again on their next pass.
pub fn recorded_interfaces(state_dir: &Path) -> Vec<AttachedInterface> {
    let claims = state_dir.join(CLAIMS_SUBDIR);
    fs::read_dir(&claims)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| NetAttachRecord::load(&entry.path()).ok())
        .flat_map(|record| record.interfaces)
        .collect()
}

/// The PCI addresses of [`recorded_interfaces`].
pub fn attached_pci_addresses(
    state_dir: &Path,
) -> std::collections::BTreeSet<crate::topology::PciAddress> {
    recorded_interfaces(state_dir)
        .into_iter()
        .filter_map(|i| i.pci_address?.parse().ok())
        .collect()
}

/// One interface the hook is asked to attach: the hook's `--interface` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceRequest {
    pub host_name: String,
    pub pod_name: String,
    pub pci_address: Option<String>,
    pub rdma_device: Option<String>,
}

/// The hook argument is `host=eth1,pod=rdma0,pci=0000:18:00.0,rdma=mlx5_0` (`pci` and `rdma`
/// optional). Specs written before PCI addresses were added use `:` between the two names
/// (`host=eth1:pod=rdma0`); they stay valid because a prepared claim keeps its spec.
impl InterfaceRequest {
    /// The argument as preparation writes it into the CDI hook.
    pub fn to_arg(&self) -> String {
        let mut arg = format!("host={},pod={}", self.host_name, self.pod_name);
        if let Some(pci) = &self.pci_address {
            arg.push_str(&format!(",pci={pci}"));
        }
        if let Some(rdma) = &self.rdma_device {
            arg.push_str(&format!(",rdma={rdma}"));
        }
        arg
    }
}

impl std::str::FromStr for InterfaceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let separator = if s.contains(',') { ',' } else { ':' };
        let (mut host, mut pod, mut pci, mut rdma) = (None, None, None, None);
        for part in s.split(separator) {
            let slot = match part.split_once('=') {
                Some(("host", v)) => (&mut host, v),
                Some(("pod", v)) => (&mut pod, v),
                Some(("pci", v)) if separator == ',' => (&mut pci, v),
                Some(("rdma", v)) if separator == ',' => (&mut rdma, v),
                _ => {
                    return Err(format!(
                        "{s:?}: expected host=<ifname>,pod=<ifname>[,pci=<address>][,rdma=<device>]"
                    ));
                }
            };
            if slot.0.replace(slot.1).is_some() {
                return Err(format!("{s:?}: {:?} given twice", part));
            }
        }
        let (Some(host), Some(pod)) = (host, pod) else {
            return Err(format!("{s:?}: both host= and pod= are required"));
        };
        for name in [host, pod] {
            validate_ifname(name).map_err(|e| e.to_string())?;
        }
        if let Some(pci) = pci
            && pci.parse::<crate::topology::PciAddress>().is_err()
        {
            return Err(format!("{s:?}: pci={pci:?} is not a PCI address"));
        }
        if let Some(rdma) = rdma {
            validate_ifname(rdma).map_err(|e| format!("{s:?}: rdma device: {e}"))?;
        }
        Ok(Self {
            host_name: host.to_string(),
            pod_name: pod.to_string(),
            pci_address: pci.map(str::to_string),
            rdma_device: rdma.map(str::to_string),
        })
    }
}

/// Identifies the namespace file at `path` for the record.
pub fn netns_ref(path: &Path, pid: u32) -> Result<NetnsRef, NetAttachError> {
    let meta = fs::metadata(path).map_err(|source| NetAttachError::OpenNamespace {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(NetnsRef {
        pid,
        dev: meta.dev(),
        inode: meta.ino(),
    })
}

/// Attaches each requested interface to the namespace of `pid` (under `proc_root`),
/// recording intent before each move and completion after it. Interfaces already present
/// in the pod are left alone, so the hook of a pod's second container succeeds.
pub fn attach_recorded(
    claim_dir: &Path,
    host: &Netns,
    proc_root: &Path,
    pid: u32,
    requests: &[InterfaceRequest],
    guards: &Guards,
    timeout: Duration,
) -> Result<NetAttachRecord, RecordError> {
    for r in requests {
        validate_ifname(&r.host_name)?;
        validate_ifname(&r.pod_name)?;
    }
    let ns_path = proc_root.join(pid.to_string()).join("ns/net");
    let target = Netns::open(&ns_path)?;
    let ns_ref = netns_ref(&ns_path, pid)?;
    if host.identity()? == (ns_ref.dev, ns_ref.inode) {
        return Err(NetAttachError::Guarded {
            ifname: requests
                .iter()
                .map(|r| r.host_name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            reason: format!("pid {pid} shares the host network namespace (hostNetwork pod)"),
        }
        .into());
    }
    let mut record = NetAttachRecord::load(claim_dir)?;
    for request in requests {
        if interface_in_netns(&target, &request.pod_name, timeout)? {
            if let Some(entry) = record
                .interfaces
                .iter_mut()
                .find(|e| e.pod_name == request.pod_name && same_ns(&e.netns, &ns_ref))
                && entry.phase == AttachPhase::Intent
            {
                // A crash after the move left the entry at Intent; the link is there, so
                // finish the configuration idempotently and mark it.
                move_back_safe_configure(host, &target, entry, timeout)?;
                entry.rdma_moved =
                    move_rdma_along(host, &target, entry.rdma_device.as_deref(), timeout)?;
                entry.phase = AttachPhase::Attached;
                record.save(claim_dir)?;
            }
            continue;
        }
        let snap = snapshot(host, &request.host_name, guards, timeout)?;
        record
            .interfaces
            .retain(|e| e.snapshot.host_name != request.host_name);
        record.interfaces.push(AttachedInterface {
            pod_name: request.pod_name.clone(),
            netns: ns_ref,
            phase: AttachPhase::Intent,
            snapshot: snap.clone(),
            pci_address: request.pci_address.clone(),
            rdma_device: request.rdma_device.clone(),
            rdma_moved: false,
        });
        record.save(claim_dir)?;
        let moved = move_and_configure(host, &target, &snap, &request.pod_name, timeout)
            .map_err(RecordError::from)
            .and_then(|()| move_rdma_along(host, &target, request.rdma_device.as_deref(), timeout));
        let rdma_moved = match moved {
            Ok(rdma_moved) => rdma_moved,
            Err(e) => {
                // Put the interface back now rather than leaving a half-configured NIC in a
                // pod that will fail to start; the entry stays if even that fails.
                let entry = record
                    .interfaces
                    .iter()
                    .find(|i| i.snapshot.host_name == request.host_name)
                    .cloned();
                if let Some(entry) = entry
                    && release_from(&entry, host, Some(&target), timeout).is_ok()
                {
                    record
                        .interfaces
                        .retain(|i| i.snapshot.host_name != request.host_name);
                    record.save(claim_dir)?;
                }
                return Err(e);
            }
        };
        if let Some(entry) = record
            .interfaces
            .iter_mut()
            .find(|e| e.snapshot.host_name == request.host_name)
        {
            entry.phase = AttachPhase::Attached;
            entry.rdma_moved = rdma_moved;
        }
        record.save(claim_dir)?;
    }
    Ok(record)
}

fn move_back_safe_configure(
    host: &Netns,
    target: &Netns,
    entry: &AttachedInterface,
    timeout: Duration,
) -> Result<(), NetAttachError> {
    // Release-and-reattach is the one path that is known to leave a complete configuration
    // whatever step the crash interrupted.
    release(
        host,
        Some(target),
        &entry.snapshot,
        &entry.pod_name,
        timeout,
    )?;
    move_and_configure(host, target, &entry.snapshot, &entry.pod_name, timeout)
}

fn same_ns(a: &NetnsRef, b: &NetnsRef) -> bool {
    a.dev == b.dev && a.inode == b.inode
}

/// Finds a live namespace with the recorded identity: the recorded pid first, then any
/// process under `proc_root`, then the named namespaces in `run_netns_dir`.
pub fn find_netns(proc_root: &Path, run_netns_dir: &Path, wanted: &NetnsRef) -> Option<PathBuf> {
    let matches = |path: &Path| {
        fs::metadata(path)
            .map(|m| m.dev() == wanted.dev && m.ino() == wanted.inode)
            .unwrap_or(false)
    };
    let hinted = proc_root.join(wanted.pid.to_string()).join("ns/net");
    if matches(&hinted) {
        return Some(hinted);
    }
    let proc_candidates = fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let pid = name.to_str()?;
            pid.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| e.path().join("ns/net"))
        });
    let named = fs::read_dir(run_netns_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    proc_candidates.chain(named).find(|p| matches(p))
}

/// Releases every interface recorded for the claim. Released entries leave the record at
/// once; the rest stay for the next unprepare or reconcile, and the error names them.
pub fn release_recorded(
    claim_dir: &Path,
    host: &Netns,
    proc_root: &Path,
    run_netns_dir: &Path,
    timeout: Duration,
) -> Result<usize, RecordError> {
    let mut record = NetAttachRecord::load(claim_dir)?;
    let before = record.interfaces.len();
    let failures = release_interfaces(&mut record, host, proc_root, run_netns_dir, timeout);
    record.save(claim_dir)?;
    if failures.is_empty() {
        Ok(before)
    } else {
        Err(RecordError::Unreleased {
            claim_dir: claim_dir.to_path_buf(),
            failures,
        })
    }
}

/// Brings back every interface of `record` it can, removing those from it; returns one
/// message per interface that stays (its namespace unreachable, a netlink failure).
pub fn release_interfaces(
    record: &mut NetAttachRecord,
    host: &Netns,
    proc_root: &Path,
    run_netns_dir: &Path,
    timeout: Duration,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut remaining = Vec::new();
    for entry in std::mem::take(&mut record.interfaces) {
        match release_one(&entry, host, proc_root, run_netns_dir, timeout) {
            Ok(()) => {
                tracing::info!(interface = %entry.snapshot.host_name, pod_name = %entry.pod_name,
                    "interface released to the host");
            }
            Err(e) => {
                failures.push(e.to_string());
                remaining.push(entry);
            }
        }
    }
    record.interfaces = remaining;
    failures
}

fn release_one(
    entry: &AttachedInterface,
    host: &Netns,
    proc_root: &Path,
    run_netns_dir: &Path,
    timeout: Duration,
) -> Result<(), RecordError> {
    let target = find_netns(proc_root, run_netns_dir, &entry.netns)
        .map(|p| Netns::open(&p))
        .transpose()?;
    release_from(entry, host, target.as_ref(), timeout)
}

/// Brings the entry's RDMA device (whatever `rdma_moved` says: a crash may have come between
/// the move and the record) and then its netdev back from `target`. Without a live target the
/// kernel has already returned both to the host namespace.
fn release_from(
    entry: &AttachedInterface,
    host: &Netns,
    target: Option<&Netns>,
    timeout: Duration,
) -> Result<(), RecordError> {
    if let (Some(target), Some(device)) = (target, entry.rdma_device.as_deref()) {
        move_rdma_device(target, host, device, timeout)?;
    }
    release(host, target, &entry.snapshot, &entry.pod_name, timeout)?;
    Ok(())
}

/// Moves the NIC's RDMA device into the pod when the kernel's RDMA netns mode is exclusive
/// (in shared mode every namespace sees it already). Returns whether it moved.
fn move_rdma_along(
    host: &Netns,
    target: &Netns,
    device: Option<&str>,
    timeout: Duration,
) -> Result<bool, RecordError> {
    let Some(device) = device else {
        return Ok(false);
    };
    Ok(match move_rdma_device(host, target, device, timeout)? {
        RdmaMove::Moved | RdmaMove::AlreadyThere => true,
        RdmaMove::SharedMode | RdmaMove::NoRdmaSubsystem => false,
    })
}

/// [`release_recorded`] for callers that hold paths: opens the host namespace only when the
/// claim has something recorded, so claims without exclusive NICs never touch netlink.
pub fn release_claim_dir(
    claim_dir: &Path,
    host_netns: &Path,
    proc_root: &Path,
    run_netns_dir: &Path,
    timeout: Duration,
) -> Result<usize, RecordError> {
    if NetAttachRecord::load(claim_dir)?.interfaces.is_empty() {
        return Ok(0);
    }
    let host = Netns::open(host_netns)?;
    release_recorded(claim_dir, &host, proc_root, run_netns_dir, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_arguments_parse_validate_and_round_trip() {
        // The form written before PCI addresses were recorded.
        let old: InterfaceRequest = "host=eth1:pod=rdma0".parse().unwrap();
        assert_eq!(old.host_name, "eth1");
        assert_eq!(old.pod_name, "rdma0");
        assert_eq!(old.pci_address, None);
        let full = "host=ens1f0,pod=rdma1,pci=0000:18:00.0,rdma=mlx5_0";
        let request: InterfaceRequest = full.parse().unwrap();
        assert_eq!(request.pci_address.as_deref(), Some("0000:18:00.0"));
        assert_eq!(request.rdma_device.as_deref(), Some("mlx5_0"));
        assert_eq!(request.to_arg(), full);
        for bad in [
            "host=eth1",
            "host=eth1:pod=a/b",
            "eth1:rdma0",
            "host=eth1,pod=rdma0,pci=nonsense",
            "host=eth1,pod=rdma0,rdma=a/b",
            "host=eth1,host=eth2,pod=rdma0",
            "host=eth1:pod=rdma0:pci=0000",
        ] {
            assert!(bad.parse::<InterfaceRequest>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn records_written_before_pci_and_rdma_fields_still_load() {
        let old = r#"{"interfaces":[{"podName":"rdma0","netns":{"pid":1,"dev":4,"inode":9},
            "phase":"attached","snapshot":{"hostName":"eth1","mtu":1500,"addresses":[],
            "routes":[],"wasUp":true}}]}"#;
        let record: NetAttachRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.interfaces[0].pci_address, None);
        assert!(!record.interfaces[0].rdma_moved);
    }
}
