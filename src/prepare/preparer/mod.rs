//! The Preparer: prepare, unprepare and start-up recovery over the checkpoint. Calls for
//! distinct claims run in parallel (claim GETs, file writes) and share their checkpoint flush
//! (group commit, [`checkpoint::Store`]); calls for the same claim wait for each other. The
//! checkpoint is read once and kept in memory, re-read only when another process replaced it.
//!
//! This file holds the public surface and what every path shares; the paths themselves are
//! `prepare` (plan, write, group commit), `unprepare` (release, remove, forget, and the
//! netattach reconcile), `recover` (start-up), with the per-claim locks in `locks`.

mod locks;
mod prepare;
mod recover;
#[cfg(test)]
mod tests;
mod unprepare;

use super::cdi::{self, CdiSpec};
use super::checkpoint::{self, ClaimEntry, ClaimState, LoadOutcome};
use super::error::PrepareError;
use super::plan::{self, ClaimPlan};
use super::topology_file::ClaimTopology;
use super::vendor_cdi::{VendorMatches, VendorSpecs};
use super::{CLAIMS_SUBDIR, PrepareConfig, PreparedDevice};
use crate::fsutil;
use crate::netattach::record::AttachedInterface;
use crate::topology::InventoryWatch;
use k8s_openapi::api::resource::v1::ResourceClaim;
use locks::ClaimLocks;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tandem_kubelet_plugin::claim::{self, ClaimRef};

/// The runtime (any user) reads CDI specs and the mounted topology file.
const PUBLIC_FILE_MODE: u32 = 0o644;
const CDI_DIR_MODE: u32 = 0o755;
const PRIVATE_DIR_MODE: u32 = 0o700;
/// A claim's topology file is `<topology_dir>/<uid>.topology.json`, on tmpfs: a file of its
/// own on the state disk cost an inode allocation and a journalled rename and unlink per
/// claim (about a tenth of the plugin's CPU in 8 parallel prepares), and a directory of its own
/// a mkdir and an rmdir more. Claims prepared by older versions keep the path their
/// checkpoint entry records (`<state_dir>/claims/<uid>.topology.json` or
/// `claims/<uid>/topology.json`).
const TOPOLOGY_FILE_SUFFIX: &str = ".topology.json";

pub type PrepareResults = BTreeMap<String, Result<Vec<PreparedDevice>, PrepareError>>;
pub type UnprepareResults = BTreeMap<String, Result<(), PrepareError>>;
/// A claim of a prepare call with its ResourceClaim: `None` when the checkpoint answered it
/// at fetch time, so it was not fetched.
type Fetched = (ClaimRef, Option<Result<ResourceClaim, PrepareError>>);

/// What `recover()` found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    pub checkpoint: LoadOutcome,
    /// Claims that were PrepareStarted: their files were removed and their entries dropped.
    pub rolled_back: Vec<String>,
    /// CDI specs of our kind that no checkpoint entry owns.
    pub orphan_specs_removed: Vec<PathBuf>,
    /// Per-claim state under `claims/` that no checkpoint entry owns: directories, topology
    /// files, temp files of interrupted writes.
    pub orphan_claim_state_removed: Vec<PathBuf>,
    /// Temp files of interrupted atomic writes.
    pub temp_files_removed: Vec<PathBuf>,
    /// Completed claims of this boot whose files had vanished (an unprepare that died after
    /// removing them, an operator's cleanup) and were written again from the checkpoint: a
    /// claim the kubelet was told is prepared stays usable until it is told otherwise.
    pub restored: Vec<String>,
    /// Claims still prepared after recovery.
    pub prepared_claims: usize,
}

/// What one [`Preparer::reconcile_netattach`] pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetattachReport {
    /// Interfaces brought back to the host in this pass.
    pub released: usize,
    /// Interfaces of unprepared claims still in a pod's namespace.
    pub pending: usize,
    /// Prepared claims whose pods hold interfaces.
    pub attached: Vec<ClaimAttachments>,
}

/// The interfaces the hook recorded for one prepared claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimAttachments {
    pub claim: ClaimRef,
    pub interfaces: Vec<AttachedInterface>,
}

pub struct Preparer {
    inner: Arc<Inner>,
}

struct Inner {
    config: PrepareConfig,
    cdi_kind: String,
    client: kube::Client,
    inventory: InventoryWatch,
    /// The checkpoint in memory. Another process (rolling update) is kept out by the
    /// caller's file lock, and its writes are read back before the next call.
    store: Arc<checkpoint::Store>,
    /// One lock per claim UID with a call in flight: the same claim is prepared or unprepared
    /// by one call at a time, different claims in parallel.
    claim_locks: ClaimLocks,
    /// Read once at start: the boot cannot change under a running process.
    boot_id: String,
    /// Other vendors' CDI specs, re-read when they change.
    vendor_specs: Mutex<VendorSpecs>,
}

impl Preparer {
    pub fn new(
        config: PrepareConfig,
        client: kube::Client,
        inventory: InventoryWatch,
    ) -> Result<Self, PrepareError> {
        validate_config(&config)?;
        let state_io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PrepareError::StateIo { path, source }
        };
        fsutil::ensure_dir(&config.cdi_dir, CDI_DIR_MODE).map_err(state_io(&config.cdi_dir))?;
        fsutil::ensure_dir(&config.state_dir, PRIVATE_DIR_MODE)
            .map_err(state_io(&config.state_dir))?;
        let claims_dir = config.state_dir.join(CLAIMS_SUBDIR);
        fsutil::ensure_dir(&claims_dir, PRIVATE_DIR_MODE).map_err(state_io(&claims_dir))?;
        fsutil::ensure_dir(&config.topology_dir, PRIVATE_DIR_MODE)
            .map_err(state_io(&config.topology_dir))?;
        let vendor_specs = VendorSpecs::new(config.vendor_cdi_dirs.clone(), &config.driver_name);
        Ok(Self {
            inner: Arc::new(Inner {
                cdi_kind: crate::names::cdi_claim_kind(&config.driver_name),
                store: Arc::new(checkpoint::Store::new(&config.state_dir)),
                claim_locks: ClaimLocks::default(),
                boot_id: checkpoint::read_boot_id(&config.proc_root),
                config,
                client,
                inventory,
                vendor_specs: Mutex::new(vendor_specs),
            }),
        })
    }

    /// The vendor CDI device of each accelerator of the current inventory (for `/metrics`);
    /// `None` when no vendor directory is configured.
    pub fn vendor_devices(&self) -> Option<Arc<VendorMatches>> {
        let inventory = self.inner.inventory.borrow().clone();
        self.inner.vendor_matches(&inventory)
    }

    /// Start-up recovery. PrepareStarted claims are rolled back rather than finished: rolling
    /// back needs nothing but the checkpoint, and the kubelet retries the prepare it never got
    /// an answer for, which then starts clean. Orphan CDI specs of our kind and per-claim
    /// directories are deleted; a corrupt checkpoint is set aside.
    pub async fn recover(&self) -> Result<RecoveryReport, PrepareError> {
        self.checkpoint_task("recovery", Inner::recover_locked)
            .await
    }

    /// Runs one whole-checkpoint job on the blocking pool (it does file and netlink I/O); a
    /// task that died is an error naming the checkpoint.
    async fn checkpoint_task<T: Send + 'static>(
        &self,
        job: &'static str,
        work: fn(&Inner) -> Result<T, PrepareError>,
    ) -> Result<T, PrepareError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| PrepareError::State {
                path: checkpoint::checkpoint_path(&self.inner.config.state_dir),
                message: format!("{job} task failed: {e}"),
            })?
    }

    /// Prepares each distinct claim; one entry per claim UID, whatever happens to the others.
    /// The work runs to its end on the blocking pool even if the caller stops waiting (the
    /// kubelet cancels at its deadline): its retry then finds the claim prepared, or not
    /// touched, never half done.
    pub async fn prepare(&self, claims: &[ClaimRef]) -> PrepareResults {
        let (mut results, unique) = distinct_valid_claims(claims);
        if unique.is_empty() {
            return results;
        }
        let guards = self.inner.claim_locks.lock_all(&unique).await;
        // Claims completed in this boot are answered from the checkpoint alone; only the
        // others are fetched, concurrently, outside any lock but their own.
        let current = match self.inner.current_claims(&unique) {
            Ok(current) => current,
            Err(e) => {
                for claim in unique {
                    let error = self.inner.checkpoint_error(&claim, &e);
                    results.insert(claim.uid, Err(error));
                }
                return results;
            }
        };
        // Announced before the GETs, so that a commit starting meanwhile waits (briefly) for
        // this call and one flush covers both.
        let ticket = self.inner.store.will_commit();
        let work = self.fetch_claims(unique, current).await;
        let uids = claim_names(work.iter().map(|(c, _)| c));
        let inner = self.inner.clone();
        let job = move || {
            let _guards = guards;
            inner.prepare_claims(work, ticket)
        };
        run_blocking(job, uids, &mut results).await;
        results
    }

    /// Fetches the ResourceClaims of the claims that are not `current`, concurrently.
    async fn fetch_claims(&self, claims: Vec<ClaimRef>, current: Vec<bool>) -> Vec<Fetched> {
        let fetches = claims.iter().zip(current).map(|(c, current)| {
            let client = self.inner.client.clone();
            async move {
                if current {
                    None
                } else {
                    Some(
                        claim::fetch_claim(&client, c)
                            .await
                            .map_err(PrepareError::from),
                    )
                }
            }
        });
        let fetched = futures::future::join_all(fetches).await;
        claims.into_iter().zip(fetched).collect()
    }

    /// One netattach reconcile pass: retries the pending releases and lists the prepared
    /// claims' attached interfaces (for their ResourceClaim status).
    pub async fn reconcile_netattach(&self) -> Result<NetattachReport, PrepareError> {
        self.checkpoint_task("netattach reconcile", Inner::reconcile_netattach_locked)
            .await
    }

    /// Unprepares each distinct claim from the checkpoint alone. Unknown claims succeed.
    pub async fn unprepare(&self, claims: &[ClaimRef]) -> UnprepareResults {
        let (mut results, unique) = distinct_valid_claims(claims);
        if unique.is_empty() {
            return results;
        }
        let uids = claim_names(&unique);
        let guards = self.inner.claim_locks.lock_all(&unique).await;
        // Announced before the blocking pool picks the call up, so that calls arriving
        // together share one flush.
        let ticket = self.inner.store.will_commit();
        let inner = self.inner.clone();
        let job = move || {
            let _guards = guards;
            inner.unprepare_claims(unique, ticket)
        };
        run_blocking(job, uids, &mut results).await;
        results
    }
}

/// Each claim's UID with its name, for the answers of a call whose task died.
fn claim_names<'a>(claims: impl IntoIterator<Item = &'a ClaimRef>) -> Vec<(String, String)> {
    claims
        .into_iter()
        .map(|c| (c.uid.clone(), c.to_string()))
        .collect()
}

/// Runs a call's work on the blocking pool and adds its answers to `results`; a task that
/// died answers each of `uids` with an internal error.
async fn run_blocking<T: Send + 'static>(
    job: impl FnOnce() -> BTreeMap<String, Result<T, PrepareError>> + Send + 'static,
    uids: Vec<(String, String)>,
    results: &mut BTreeMap<String, Result<T, PrepareError>>,
) {
    match tokio::task::spawn_blocking(job).await {
        Ok(answers) => results.extend(answers),
        Err(e) => {
            for (uid, claim) in uids {
                let reason = e.to_string();
                results.insert(uid, Err(PrepareError::Internal { claim, reason }));
            }
        }
    }
}

/// Whether a checkpoint entry can answer a prepare as it is. A claim completed in an earlier
/// boot is kept (its devices stay reserved and unprepare still finds it) but is prepared again
/// in full on the next prepare: the kubelet re-prepares every claim after a reboot, and by then
/// dynamic device numbers (nvidia-uvm, rdma_cm) may have changed and /var/run/cdi is empty,
/// so the spec is rebuilt from the current inventory rather than copied from the old one.
fn is_current(entry: &ClaimEntry, boot_id: &str) -> bool {
    entry.state == ClaimState::PrepareCompleted
        && entry.boot_id == boot_id
        && (entry.cdi_spec.is_some() || entry.devices.is_empty())
}

/// The claims to work on: the first occurrence of each UID (the kubelet may repeat a claim;
/// it gets one answer and the work is done once), and an error answer for each invalid UID.
fn distinct_valid_claims<T>(
    claims: &[ClaimRef],
) -> (BTreeMap<String, Result<T, PrepareError>>, Vec<ClaimRef>) {
    let mut rejected = BTreeMap::new();
    let mut unique: Vec<ClaimRef> = Vec::new();
    for c in claims {
        if rejected.contains_key(&c.uid) || unique.iter().any(|u| u.uid == c.uid) {
            continue;
        }
        match claim::validate_claim_uid(c) {
            Ok(()) => unique.push(c.clone()),
            Err(e) => {
                rejected.insert(c.uid.clone(), Err(e.into()));
            }
        }
    }
    (rejected, unique)
}

fn validate_config(config: &PrepareConfig) -> Result<(), PrepareError> {
    let driver = &config.driver_name;
    let driver_ok =
        !driver.is_empty() && driver.len() <= 63 && driver.split('.').all(claim::is_dns_label);
    if !driver_ok {
        return Err(PrepareError::InvalidConfig {
            field: "driver_name",
            reason: format!("{driver:?} is not a DNS subdomain of at most 63 characters"),
        });
    }
    if config.node_name.is_empty() || config.node_name.contains('/') {
        return Err(PrepareError::InvalidConfig {
            field: "node_name",
            reason: format!("{:?} is not a node name", config.node_name),
        });
    }
    // The runtime resolves the CDI spec's mount source on the host: a relative state
    // directory would name nothing there.
    for (field, path) in [
        ("cdi_dir", &config.cdi_dir),
        ("state_dir", &config.state_dir),
        ("topology_dir", &config.topology_dir),
    ] {
        if !path.is_absolute() {
            return Err(PrepareError::InvalidConfig {
                field,
                reason: format!("{} is not absolute", path.display()),
            });
        }
    }
    if !config.dev_root_in_container.is_absolute() {
        return Err(PrepareError::InvalidConfig {
            field: "dev_root_in_container",
            reason: format!("{} is not absolute", config.dev_root_in_container.display()),
        });
    }
    Ok(())
}

impl Inner {
    fn netdev_mover(&self) -> Option<plan::NetdevMover<'_>> {
        match self.config.netdev_attach {
            super::NetdevAttach::Cdi => Some(plan::NetdevMover::Cdi),
            super::NetdevAttach::Hook => self.config.hook_path.as_deref().map(|path| {
                plan::NetdevMover::Hook(plan::NetattachHook {
                    path,
                    state_dir: &self.config.state_dir,
                    node_ip: self.config.node_ip,
                })
            }),
        }
    }

    /// The vendor devices of the inventory's accelerators, from specs re-read where they
    /// changed; `None` when no vendor directory is configured.
    fn vendor_matches(
        &self,
        inventory: &Arc<crate::topology::Inventory>,
    ) -> Option<Arc<VendorMatches>> {
        if self.config.vendor_cdi_dirs.is_empty() {
            return None;
        }
        let matches = self
            .vendor_specs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .matches(inventory);
        Some(matches)
    }

    pub(super) fn claim_dir(&self, uid: &str) -> PathBuf {
        super::claim_state_dir(&self.config.state_dir, uid)
    }

    /// The topology file an entry owns: the path it records (older entries name
    /// `<state_dir>/claims/<uid>.topology.json` or `claims/<uid>/topology.json`), else where a
    /// claim prepared now has it.
    pub(super) fn recorded_topology_path(&self, uid: &str, entry: &ClaimEntry) -> PathBuf {
        entry
            .files
            .iter()
            .find(|f| f.to_str().is_some_and(|f| f.ends_with("topology.json")))
            .cloned()
            .unwrap_or_else(|| self.topology_path(uid))
    }

    pub(super) fn spec_path(&self, uid: &str) -> PathBuf {
        self.config
            .cdi_dir
            .join(cdi::spec_file_name(&self.config.driver_name, uid))
    }

    pub(super) fn checkpoint_error(
        &self,
        claim: &ClaimRef,
        e: &checkpoint::CheckpointError,
    ) -> PrepareError {
        PrepareError::Checkpoint {
            claim: claim.to_string(),
            path: e.path.clone(),
            message: e.source.to_string(),
        }
    }

    /// Re-reads the checkpoint if another process replaced it since this one last saw it.
    pub(super) fn refresh(&self) -> Result<(), checkpoint::CheckpointError> {
        if let Some(outcome) = self.store.refresh()? {
            tracing::debug!(?outcome, "checkpoint read");
        }
        Ok(())
    }

    /// For each claim, whether its checkpoint entry answers a prepare as it is (after
    /// re-reading a checkpoint that another process replaced).
    fn current_claims(
        &self,
        claims: &[ClaimRef],
    ) -> Result<Vec<bool>, checkpoint::CheckpointError> {
        self.refresh()?;
        let mem = self.store.mem();
        Ok(claims
            .iter()
            .map(|c| {
                mem.checkpoint
                    .claims
                    .get(&c.uid)
                    .is_some_and(|e| is_current(e, &self.boot_id))
            })
            .collect())
    }

    pub(super) fn write_claim_files(
        &self,
        claim: &ClaimRef,
        plan: &ClaimPlan,
    ) -> Result<(), PrepareError> {
        self.write_topology(claim, &self.topology_path(&claim.uid), &plan.topology)?;
        if let Some(spec) = &plan.spec {
            self.write_spec(claim, &self.spec_path(&claim.uid), spec)?;
        }
        Ok(())
    }

    /// Where a claim prepared now keeps its topology file.
    pub(super) fn topology_path(&self, uid: &str) -> PathBuf {
        self.config
            .topology_dir
            .join(format!("{uid}{TOPOLOGY_FILE_SUFFIX}"))
    }

    /// Writes the topology file at `path`; its directory (the topology directory, made at
    /// start, or for an entry of an older layout the one it records) is made again only if it
    /// went missing.
    pub(super) fn write_topology(
        &self,
        claim: &ClaimRef,
        path: &Path,
        topology: &ClaimTopology,
    ) -> Result<(), PrepareError> {
        let dir = path.parent().unwrap_or(&self.config.topology_dir);
        write_json(claim, path, topology, dir, PRIVATE_DIR_MODE)
    }

    pub(super) fn write_spec(
        &self,
        claim: &ClaimRef,
        path: &Path,
        spec: &CdiSpec,
    ) -> Result<(), PrepareError> {
        // The CDI directory (made at start) is made again only if it went missing since.
        let dir = path.parent().unwrap_or(&self.config.cdi_dir);
        write_json(claim, path, spec, dir, CDI_DIR_MODE)
    }

    /// A completed claim whose files vanished (a reboot empties /var/run/cdi; an operator
    /// cleaned up) gets them back from the checkpoint, unchanged.
    pub(super) fn restore_missing_files(
        &self,
        claim: &ClaimRef,
        entry: &ClaimEntry,
    ) -> Result<(), PrepareError> {
        if let (Some(path), Some(spec)) = (&entry.cdi_spec_path, &entry.cdi_spec)
            && !path.exists()
        {
            tracing::info!(claim = %claim, spec = %path.display(), "re-creating missing CDI spec");
            self.write_spec(claim, path, spec)?;
        }
        if let Some(topology) = &entry.topology {
            let path = self.recorded_topology_path(&claim.uid, entry);
            if !path.exists() {
                self.write_topology(claim, &path, topology)?;
            }
        }
        Ok(())
    }
}

/// A checkpoint that cannot be read or written, for whole-checkpoint jobs (no claim to name).
fn state_error(e: checkpoint::CheckpointError) -> PrepareError {
    PrepareError::State {
        path: e.path,
        message: e.source.to_string(),
    }
}

/// Writes `value` as JSON to `path` in directory `dir`, which is made (with `dir_mode`) if it
/// went missing.
fn write_json<T: serde::Serialize>(
    claim: &ClaimRef,
    path: &Path,
    value: &T,
    dir: &Path,
    dir_mode: u32,
) -> Result<(), PrepareError> {
    let io = |source| PrepareError::Io {
        claim: claim.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    // No flush: the CDI spec is on tmpfs, and the topology file belongs to an entry that a
    // reboot (new boot ID) makes stale; a killed process loses nothing either way.
    fsutil::in_dir(dir, dir_mode, || {
        fsutil::replace(path, &bytes, PUBLIC_FILE_MODE)
    })
    .map_err(io)
}

fn with_path(path: &Path, e: std::io::Error) -> (PathBuf, std::io::Error) {
    (path.to_path_buf(), e)
}

fn io_error(claim: &ClaimRef, (path, source): (PathBuf, std::io::Error)) -> PrepareError {
    PrepareError::Io {
        claim: claim.to_string(),
        path,
        source,
    }
}
