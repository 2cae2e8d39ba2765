//! The on-disk record of prepared claims (`<state_dir>/checkpoint.json`): versioned, check-
//! summed, tagged with the boot ID, written atomically. It is the only state preparation keeps,
//! so that a restarted plugin, or the other instance during a rolling update, sees it all.
//!
//! Durability (docs/durability.md): a process keeps the checkpoint in memory ([`Store`]), read
//! once, and makes each change durable with one flush, shared by every call that changed it
//! meanwhile (group commit): the new content is written to a temp file, fdatasync'd, renamed
//! over the old. A killed process loses nothing that was written, flushed or not: the page
//! cache outlives it, and the claim files (CDI spec, topology file) are written before the
//! entry that owns them and removed after it, so start-up recovery deletes whatever a kill
//! left unowned. A power cut can lose the last renames (no directory fsync) and every file on
//! tmpfs, never half a checkpoint: the node boots with a new boot ID, under which the entries
//! of the old boot answer no prepare until the kubelet prepares them again from the apiserver.

use super::cdi::CdiSpec;
use super::topology_file::ClaimTopology;
use super::{PreparedDevice, RecordedDevice};
use crate::fsutil;
use crate::netattach::record::AttachedInterface;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

mod store;
#[cfg(test)]
mod tests;

pub use store::{Mem, Store, WillCommit};

pub const CHECKPOINT_FILE: &str = "checkpoint.json";
pub const CURRENT_VERSION: u32 = 1;
/// The state directory holds claim details; only root needs to read it.
const STATE_FILE_MODE: u32 = 0o600;
const STATE_DIR_MODE: u32 = 0o700;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimState {
    /// Recorded before the first side effect: files may exist partially.
    PrepareStarted,
    /// Every file is written and the kubelet may have been answered.
    PrepareCompleted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimEntry {
    pub namespace: String,
    pub name: String,
    pub state: ClaimState,
    /// The boot the claim was prepared in; empty when unknown (migrated from version 0).
    pub boot_id: String,
    pub devices: Vec<RecordedDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdi_spec_path: Option<PathBuf>,
    /// The spec as written, to write it again when it disappears (a reboot empties
    /// /var/run/cdi) without asking the apiserver or the inventory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdi_spec: Option<CdiSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<ClaimTopology>,
    /// Per-claim files besides the CDI spec (the topology file).
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The boot ID of the last writer.
    pub boot_id: String,
    /// By claim UID.
    pub claims: BTreeMap<String, ClaimEntry>,
    /// Interfaces of unprepared claims that could not be brought back from the pod yet (its
    /// namespace unreachable); the netattach reconcile retries them. By claim UID.
    pub pending_releases: BTreeMap<String, PendingRelease>,
}

/// What an unprepared claim left in a pod's network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRelease {
    pub namespace: String,
    pub name: String,
    pub interfaces: Vec<AttachedInterface>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct CheckpointError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What loading found besides the claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// No checkpoint yet.
    Fresh,
    /// Read; `migrated_from` is the older format version it was upgraded from.
    Loaded { migrated_from: Option<u32> },
    /// The file could not be trusted and was renamed to `set_aside_to`; we start empty.
    SetAside {
        set_aside_to: PathBuf,
        reason: String,
    },
}

pub fn checkpoint_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CHECKPOINT_FILE)
}

/// The part of the file the checksum covers: everything but the checksum, serialised the way
/// `save` writes it (struct fields in declaration order, claims sorted by UID).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChecksummedBody<'a> {
    version: u32,
    boot_id: &'a str,
    claims: &'a BTreeMap<String, ClaimEntry>,
    // Left out when empty, so files without pending releases hash as they always did.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pending_releases: &'a BTreeMap<String, PendingRelease>,
}

/// The file as `encode` writes it, field for field (the tests hold `encode` to it).
#[cfg(test)]
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileOut<'a> {
    version: u32,
    boot_id: &'a str,
    checksum: String,
    claims: &'a BTreeMap<String, ClaimEntry>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pending_releases: &'a BTreeMap<String, PendingRelease>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileV1 {
    version: u32,
    boot_id: String,
    checksum: String,
    claims: BTreeMap<String, ClaimEntry>,
    #[serde(default)]
    pending_releases: BTreeMap<String, PendingRelease>,
}

/// Version 0: the pre-release layout, kept readable so that no prepared claim is ever
/// forgotten by an upgrade. It had no version, checksum or boot ID, listed claims in an array
/// with a `prepared` flag, and did not keep the spec content:
/// `{"claims":[{"uid":"..","namespace":"..","name":"..","prepared":true,
///   "devices":[{"requestNames":[..],"poolName":"..","deviceName":"..","cdiDeviceIds":[..]}],
///   "cdiSpecPath":"/var/run/cdi/tandem.dev-claim_<uid>.json"}]}`
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileV0 {
    claims: Vec<ClaimV0>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimV0 {
    uid: String,
    namespace: String,
    name: String,
    prepared: bool,
    devices: Vec<PreparedDevice>,
    cdi_spec_path: Option<PathBuf>,
}

type BodyParts<'a> = (
    &'a BTreeMap<String, ClaimEntry>,
    &'a BTreeMap<String, PendingRelease>,
);

// The checksum guards against torn writes, bit rot and hand edits, not against an attacker
// (who can write the file can write a matching hash), so a cryptographic hash buys nothing.
use crate::hash::fnv1a64;

fn checksum(checkpoint_boot_id: &str, checkpoint: BodyParts<'_>) -> Result<String, String> {
    let body = ChecksummedBody {
        version: CURRENT_VERSION,
        boot_id: checkpoint_boot_id,
        claims: checkpoint.0,
        pending_releases: checkpoint.1,
    };
    let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    Ok(checksum_of(&bytes))
}

/// The checksum field's value for a serialised `ChecksummedBody`.
fn checksum_of(body: &[u8]) -> String {
    format!("fnv1a64:{:016x}", fnv1a64(body))
}

/// Brings any known format version up to the current one. Returns the checkpoint and the
/// version it was read as; an unknown version is an error (a newer Tandem wrote it).
pub fn migrate(value: serde_json::Value) -> Result<(Checkpoint, u32), String> {
    let version = match value.get("version") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("version {v} is not a format version number"))?,
    };
    match version {
        0 => {
            let old: FileV0 =
                serde_json::from_value(value).map_err(|e| format!("version 0: {e}"))?;
            let claims = old
                .claims
                .into_iter()
                .map(|c| {
                    let entry = ClaimEntry {
                        namespace: c.namespace,
                        name: c.name,
                        state: if c.prepared {
                            ClaimState::PrepareCompleted
                        } else {
                            ClaimState::PrepareStarted
                        },
                        // Unknown boot: the next prepare of the claim rebuilds it in full,
                        // which also rebuilds the spec content version 0 did not keep.
                        boot_id: String::new(),
                        devices: c
                            .devices
                            .into_iter()
                            .map(|device| RecordedDevice {
                                device,
                                admin_access: false,
                            })
                            .collect(),
                        cdi_spec_path: c.cdi_spec_path,
                        cdi_spec: None,
                        topology: None,
                        files: Vec::new(),
                    };
                    (c.uid, entry)
                })
                .collect();
            Ok((
                Checkpoint {
                    boot_id: String::new(),
                    claims,
                    pending_releases: BTreeMap::new(),
                },
                0,
            ))
        }
        1 => {
            let file: FileV1 =
                serde_json::from_value(value).map_err(|e| format!("version 1: {e}"))?;
            debug_assert_eq!(file.version, 1);
            let expected = checksum(&file.boot_id, (&file.claims, &file.pending_releases))?;
            if expected != file.checksum {
                return Err(format!(
                    "checksum mismatch: file says {}, content hashes to {expected}",
                    file.checksum
                ));
            }
            Ok((
                Checkpoint {
                    boot_id: file.boot_id,
                    claims: file.claims,
                    pending_releases: file.pending_releases,
                },
                1,
            ))
        }
        newer => Err(format!(
            "format version {newer} is newer than this Tandem understands ({CURRENT_VERSION})"
        )),
    }
}

/// Reads the checkpoint. A file that cannot be trusted (unreadable, not JSON, checksum
/// mismatch, unknown version) is renamed aside with an error log and an empty checkpoint is
/// returned: refusing to start would crash-loop the plugin and block every pod on the node.
/// Only failing to move the bad file aside is an error.
pub fn load(state_dir: &Path) -> Result<(Checkpoint, LoadOutcome), CheckpointError> {
    let path = checkpoint_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok((Checkpoint::default(), LoadOutcome::Fresh));
        }
        Err(e) => Err(format!("unreadable: {e}")),
    };
    let parsed = bytes.and_then(|bytes| {
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
        migrate(value)
    });
    match parsed {
        Ok((checkpoint, version)) => {
            let migrated_from = (version != CURRENT_VERSION).then_some(version);
            Ok((checkpoint, LoadOutcome::Loaded { migrated_from }))
        }
        Err(reason) => {
            let set_aside_to = set_aside(&path)?;
            tracing::error!(
                checkpoint = %path.display(),
                set_aside_to = %set_aside_to.display(),
                %reason,
                "checkpoint cannot be trusted; moved aside, starting with no prepared claims"
            );
            Ok((
                Checkpoint::default(),
                LoadOutcome::SetAside {
                    set_aside_to,
                    reason,
                },
            ))
        }
    }
}

/// Reads the checkpoint without repairing anything: `None` when it is missing or cannot be
/// trusted. For observers (tests, the soak) that must never move a file under the plugin.
pub fn load_read_only(state_dir: &Path) -> Option<Checkpoint> {
    let bytes = std::fs::read(checkpoint_path(state_dir)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    migrate(value).ok().map(|(checkpoint, _)| checkpoint)
}

/// Renames `path` to `<path>.corrupt-<unix seconds>` (with a counter if that exists).
fn set_aside(path: &Path) -> Result<PathBuf, CheckpointError> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{}.corrupt-{seconds}", path.display());
    let mut target = PathBuf::from(&base);
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    let io_error = |source| CheckpointError {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &target).map_err(io_error)?;
    if let Some(dir) = path.parent() {
        fsutil::sync_dir(dir).map_err(io_error)?;
    }
    Ok(target)
}

/// The checkpoint in the current format, checksummed: the body the checksum covers is
/// serialised once, and the checksum field goes in after `bootId`, where `FileOut` has it.
fn encode(checkpoint: &Checkpoint) -> Result<Vec<u8>, String> {
    let body = ChecksummedBody {
        version: CURRENT_VERSION,
        boot_id: &checkpoint.boot_id,
        claims: &checkpoint.claims,
        pending_releases: &checkpoint.pending_releases,
    };
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let head = format!(
        "{{\"version\":{CURRENT_VERSION},\"bootId\":{},",
        serde_json::to_string(&checkpoint.boot_id).map_err(|e| e.to_string())?
    );
    if !body.starts_with(head.as_bytes()) {
        return Err("the checkpoint body does not start with its version and boot ID".into());
    }
    let checksum = format!("\"checksum\":\"{}\",", checksum_of(&body));
    let mut file = Vec::with_capacity(body.len() + checksum.len());
    file.extend_from_slice(head.as_bytes());
    file.extend_from_slice(checksum.as_bytes());
    file.extend_from_slice(&body[head.len()..]);
    Ok(file)
}

/// Writes the checkpoint atomically in the current format, with one flush (the temp file's
/// fdatasync before the rename).
pub fn save(state_dir: &Path, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    write_flushed(state_dir, checkpoint).map(|_| ())
}

fn write_flushed(state_dir: &Path, checkpoint: &Checkpoint) -> Result<FileId, CheckpointError> {
    write_bytes_flushed(state_dir, encode_for(state_dir, checkpoint)?)
}

fn encode_for(state_dir: &Path, checkpoint: &Checkpoint) -> Result<Vec<u8>, CheckpointError> {
    encode(checkpoint).map_err(|e| CheckpointError {
        path: checkpoint_path(state_dir),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

fn write_bytes_flushed(state_dir: &Path, bytes: Vec<u8>) -> Result<FileId, CheckpointError> {
    let path = checkpoint_path(state_dir);
    let io_error = |source| CheckpointError {
        path: path.clone(),
        source,
    };
    let file = fsutil::in_dir(state_dir, STATE_DIR_MODE, || {
        fsutil::replace_flushed(&path, &bytes, STATE_FILE_MODE)
    })
    .map_err(io_error)?;
    let meta = file.metadata().map_err(io_error)?;
    Ok(FileId::of(&meta))
}

/// Which file the checkpoint path named when this process last wrote or read it. Every writer
/// replaces the file by rename, so a change by another process (the other instance of a
/// rolling update, under the serialize flock; an operator) shows as another inode, size or
/// change time, and is read back before this process's next change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    fn current(path: &Path) -> Result<Option<Self>, CheckpointError> {
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(Self::of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// The kernel's boot ID (`<proc>/sys/kernel/random/boot_id`). It tells whether a completed
/// claim was prepared in this boot; an unreadable one is logged and treated as unknown (empty).
pub fn read_boot_id(proc_root: &Path) -> String {
    let path = proc_root.join("sys/kernel/random/boot_id");
    match std::fs::read_to_string(&path) {
        Ok(id) => id.trim().to_string(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the boot ID");
            String::new()
        }
    }
}
