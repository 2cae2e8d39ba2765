//! The Preparer: prepare, unprepare and start-up recovery over the checkpoint. Calls for
//! distinct claims run in parallel (claim GETs, file writes) and share their checkpoint flush
//! (group commit, [`checkpoint::Store`]); calls for the same claim wait for each other. The
//! checkpoint is read once and kept in memory, re-read only when another process replaced it.

use super::cdi::{self, CdiSpec};
use super::checkpoint::{self, Checkpoint, ClaimEntry, ClaimState, LoadOutcome, PendingRelease};
use super::error::PrepareError;
use super::plan::{self, ClaimPlan, DeviceHolders, PlanContext};
use super::topology_file::ClaimTopology;
use super::vendor_cdi::{self, VendorMatches, VendorSpecs};
use super::{CLAIMS_SUBDIR, PrepareConfig, PreparedDevice};
use crate::fsutil;
use crate::netattach::record::{self, AttachedInterface, NetAttachRecord, RecordError};
use crate::netattach::{DEFAULT_NETLINK_TIMEOUT, Netns};
use crate::topology::InventoryWatch;
use k8s_openapi::api::resource::v1::ResourceClaim;
use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tandem_kubelet_plugin::claim::{self, ClaimRef};

/// The runtime (any user) reads CDI specs and the mounted topology file.
const PUBLIC_FILE_MODE: u32 = 0o644;
const CDI_DIR_MODE: u32 = 0o755;
const PRIVATE_DIR_MODE: u32 = 0o700;
const TOPOLOGY_FILE_NAME: &str = "topology.json";

pub type PrepareResults = BTreeMap<String, Result<Vec<PreparedDevice>, PrepareError>>;
pub type UnprepareResults = BTreeMap<String, Result<(), PrepareError>>;

/// What `recover()` found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    pub checkpoint: LoadOutcome,
    /// Claims that were PrepareStarted: their files were removed and their entries dropped.
    pub rolled_back: Vec<String>,
    /// CDI specs of our kind that no checkpoint entry owns.
    pub orphan_specs_removed: Vec<PathBuf>,
    /// Per-claim state directories that no checkpoint entry owns.
    pub orphan_claim_dirs_removed: Vec<PathBuf>,
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
    store: checkpoint::Store,
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
        let vendor_specs = VendorSpecs::new(config.vendor_cdi_dirs.clone(), &config.driver_name);
        Ok(Self {
            inner: Arc::new(Inner {
                cdi_kind: crate::names::cdi_claim_kind(&config.driver_name),
                store: checkpoint::Store::new(&config.state_dir),
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
    pub fn vendor_devices(&self) -> Option<VendorMatches> {
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
        let current: Vec<bool> = match self.inner.refresh() {
            Ok(()) => {
                let mem = self.inner.store.mem();
                unique
                    .iter()
                    .map(|c| {
                        mem.checkpoint
                            .claims
                            .get(&c.uid)
                            .is_some_and(|e| is_current(e, &self.inner.boot_id))
                    })
                    .collect()
            }
            Err(e) => {
                for claim in unique {
                    let error = self.inner.checkpoint_error(&claim, &e);
                    results.insert(claim.uid, Err(error));
                }
                return results;
            }
        };
        let fetches = unique.iter().zip(current).map(|(c, current)| {
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
        let work: Vec<(ClaimRef, Option<Result<ResourceClaim, PrepareError>>)> =
            unique.into_iter().zip(fetched).collect();
        let uids: Vec<(String, String)> = work
            .iter()
            .map(|(c, _)| (c.uid.clone(), c.to_string()))
            .collect();

        let inner = self.inner.clone();
        let job = move || {
            let _guards = guards;
            inner.prepare_claims(work)
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(answers) => results.extend(answers),
            Err(e) => {
                for (uid, claim) in uids {
                    let reason = e.to_string();
                    results.insert(uid, Err(PrepareError::Internal { claim, reason }));
                }
            }
        }
        results
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
        let uids: Vec<(String, String)> = unique
            .iter()
            .map(|c| (c.uid.clone(), c.to_string()))
            .collect();
        let guards = self.inner.claim_locks.lock_all(&unique).await;
        let inner = self.inner.clone();
        let job = move || {
            let _guards = guards;
            inner.unprepare_claims(unique)
        };
        match tokio::task::spawn_blocking(job).await {
            Ok(answers) => results.extend(answers),
            Err(e) => {
                for (uid, claim) in uids {
                    let reason = e.to_string();
                    results.insert(uid, Err(PrepareError::Internal { claim, reason }));
                }
            }
        }
        results
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

/// A claim that passed planning and waits for its files.
struct Planned {
    claim: ClaimRef,
    plan: ClaimPlan,
}

type ClaimLockMap = HashMap<String, Arc<tokio::sync::Mutex<()>>>;

/// Per-claim locks, created on demand and dropped with their last holder so the map stays as
/// small as the number of calls in flight.
#[derive(Default)]
struct ClaimLocks(Arc<Mutex<ClaimLockMap>>);

/// The locks of one call's claims, released (and forgotten when unused) on drop.
struct ClaimGuards {
    map: Arc<Mutex<ClaimLockMap>>,
    held: Vec<(String, tokio::sync::OwnedMutexGuard<()>)>,
}

impl ClaimLocks {
    /// Locks every claim of a call, in UID order so two calls sharing claims cannot deadlock.
    async fn lock_all(&self, claims: &[ClaimRef]) -> ClaimGuards {
        let uids: BTreeSet<&str> = claims.iter().map(|c| c.uid.as_str()).collect();
        let mut held = Vec::with_capacity(uids.len());
        for uid in uids {
            let lock = lock_map(&self.0)
                .entry(uid.to_string())
                .or_default()
                .clone();
            held.push((uid.to_string(), lock.lock_owned().await));
        }
        ClaimGuards {
            map: self.0.clone(),
            held,
        }
    }
}

impl Drop for ClaimGuards {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        let mut map = lock_map(&self.map);
        for (uid, guard) in held {
            drop(guard);
            // The map's reference is the last: no call holds or waits for this claim.
            if map.get(&uid).is_some_and(|l| Arc::strong_count(l) == 1) {
                map.remove(&uid);
            }
        }
    }
}

fn lock_map(map: &Mutex<ClaimLockMap>) -> std::sync::MutexGuard<'_, ClaimLockMap> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    fn vendor_matches(&self, inventory: &crate::topology::Inventory) -> Option<VendorMatches> {
        if self.config.vendor_cdi_dirs.is_empty() {
            return None;
        }
        let snapshot = self
            .vendor_specs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .refresh();
        Some(vendor_cdi::match_inventory(&snapshot, inventory))
    }

    fn claim_dir(&self, uid: &str) -> PathBuf {
        super::claim_state_dir(&self.config.state_dir, uid)
    }

    fn spec_path(&self, uid: &str) -> PathBuf {
        self.config
            .cdi_dir
            .join(cdi::spec_file_name(&self.config.driver_name, uid))
    }

    fn checkpoint_error(&self, claim: &ClaimRef, e: &checkpoint::CheckpointError) -> PrepareError {
        PrepareError::Checkpoint {
            claim: claim.to_string(),
            path: e.path.clone(),
            message: e.source.to_string(),
        }
    }

    /// Re-reads the checkpoint if another process replaced it since this one last saw it.
    fn refresh(&self) -> Result<(), checkpoint::CheckpointError> {
        if let Some(outcome) = self.store.refresh()? {
            tracing::debug!(?outcome, "checkpoint read");
        }
        Ok(())
    }

    fn prepare_claims(
        &self,
        work: Vec<(ClaimRef, Option<Result<ResourceClaim, PrepareError>>)>,
    ) -> PrepareResults {
        let boot_id = self.boot_id.as_str();
        let mut answers = PrepareResults::new();
        let inventory = self.inventory.borrow().clone();
        let vendor = self.vendor_matches(&inventory);
        let mut current: Vec<(ClaimRef, ClaimEntry)> = Vec::new();
        let mut stale: Vec<(ClaimRef, ClaimEntry)> = Vec::new();
        let mut planned: Vec<Planned> = Vec::new();

        // Plan under the memory lock (no I/O but the rare pending-release retry), so that two
        // calls never plan the same device: a planned claim enters the checkpoint at once, as
        // PrepareStarted, and holds its devices from then on.
        let ticket = self.store.will_commit();
        let version = {
            let mut mem = self.store.mem();
            let cp = &mut mem.checkpoint;
            let mut holders = DeviceHolders::default();
            for (uid, entry) in &cp.claims {
                let holder = ClaimRef {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    uid: uid.clone(),
                };
                holders.add(&holder, &entry.devices);
            }
            // A NIC whose netdev has not come back from an earlier pod cannot be attached
            // again; one more try now, and what stays is refused with the reason.
            let mut dirty = self.retry_pending_releases(cp) > 0;
            for (uid, pending) in &cp.pending_releases {
                for interface in &pending.interfaces {
                    let Some(address) = interface
                        .pci_address
                        .as_deref()
                        .and_then(|a| a.parse::<crate::topology::PciAddress>().ok())
                    else {
                        continue;
                    };
                    holders.add_unavailable(
                        crate::names::nic_device_name(&address),
                        format!(
                            "{}/{} {uid} (unprepared, but its interface {} is still in its pod's network namespace)",
                            pending.namespace, pending.name, interface.snapshot.host_name
                        ),
                    );
                }
            }
            for (claim, fetched) in work {
                let uid = claim.uid.clone();
                if let Some(entry) = cp.claims.get(&uid) {
                    if entry.namespace != claim.namespace || entry.name != claim.name {
                        let recorded = format!("{}/{}", entry.namespace, entry.name);
                        answers.insert(
                            uid,
                            Err(PrepareError::ClaimIdentityMismatch {
                                claim: claim.to_string(),
                                recorded,
                            }),
                        );
                        continue;
                    }
                    if is_current(entry, boot_id) {
                        current.push((claim, entry.clone()));
                        continue;
                    }
                    if entry.state == ClaimState::PrepareStarted {
                        // A previous attempt died half-way (and recover() has not run, e.g.
                        // the other instance of a rolling update crashed): start clean.
                        if let Some(entry) = cp.claims.remove(&uid) {
                            stale.push((claim.clone(), entry));
                        }
                        dirty = true;
                    }
                }
                let answer = fetched
                    .unwrap_or_else(|| {
                        Err(PrepareError::Retry {
                            claim: claim.to_string(),
                        })
                    })
                    .and_then(|resource| {
                        claim::our_allocation(
                            &claim,
                            &resource,
                            &self.config.driver_name,
                            &self.config.node_name,
                        )
                        .map_err(PrepareError::from)
                    })
                    .and_then(|allocation| {
                        let topology_path = self.claim_dir(&uid).join(TOPOLOGY_FILE_NAME);
                        let ctx = PlanContext {
                            driver_name: &self.config.driver_name,
                            dev_root_in_container: &self.config.dev_root_in_container,
                            topology_host_path: &topology_path,
                            inventory: &inventory,
                            netdev_mover: self.netdev_mover(),
                            vendor: vendor.as_ref(),
                            driver_root: self.config.driver_root.as_ref(),
                            nvidia_legacy_env: self.config.nvidia_legacy_env,
                        };
                        if let Some(vendor) = &vendor {
                            log_vendor_warnings(&claim, &allocation, &inventory, vendor);
                        }
                        plan::plan_claim(&ctx, &claim, &allocation, &holders)
                    });
                match answer {
                    Err(e) => {
                        tracing::warn!(claim = %claim, error = %e, "claim not prepared");
                        answers.insert(uid, Err(e));
                    }
                    Ok(plan) if plan.spec.is_none() => {
                        // Nothing of ours in the claim: nothing to write or remember.
                        answers.insert(uid, Ok(Vec::new()));
                    }
                    Ok(plan) => {
                        holders.add(&claim, &plan.devices);
                        let entry = ClaimEntry {
                            namespace: claim.namespace.clone(),
                            name: claim.name.clone(),
                            state: ClaimState::PrepareStarted,
                            boot_id: boot_id.to_string(),
                            devices: plan.devices.clone(),
                            cdi_spec_path: Some(self.spec_path(&uid)),
                            cdi_spec: plan.spec.clone(),
                            topology: Some(plan.topology.clone()),
                            files: vec![self.claim_dir(&uid).join(TOPOLOGY_FILE_NAME)],
                        };
                        cp.claims.insert(uid, entry);
                        planned.push(Planned { claim, plan });
                    }
                }
            }
            if !planned.is_empty() {
                cp.boot_id = boot_id.to_string();
            }
            (dirty || !planned.is_empty()).then(|| mem.changed())
        };
        // A call with nothing to commit must not hold up the commits of others.
        let ticket = version.map(|_| ticket);

        // Files, outside every lock but the claims' own. Completed claims whose files
        // vanished get them back; the rest are written before the entry that owns them is
        // committed, so a kill in between leaves files recover() deletes as orphans.
        for (claim, entry) in current {
            let answer = self
                .restore_missing_files(&claim, &entry)
                .map(|()| entry.devices.iter().map(|d| d.device.clone()).collect());
            answers.insert(claim.uid.clone(), answer);
        }
        for (claim, entry) in stale {
            if let Err(e) = self.remove_claim_files(&claim.uid, &entry) {
                tracing::warn!(claim = %claim, error = %e.1, "cleanup failed; recover() retries");
            }
        }
        let mut written: Vec<Planned> = Vec::new();
        let mut failed: Vec<(ClaimRef, PrepareError)> = Vec::new();
        for p in planned {
            match self.write_claim_files(&p.claim, &p.plan) {
                Ok(()) => written.push(p),
                Err(e) => {
                    tracing::warn!(claim = %p.claim, error = %e, "writing claim files failed");
                    failed.push((p.claim, e));
                }
            }
        }
        let (Some(mut version), Some(ticket)) = (version, ticket) else {
            return answers;
        };
        if !written.is_empty() || !failed.is_empty() {
            let mut mem = self.store.mem();
            for p in &written {
                if let Some(entry) = mem.checkpoint.claims.get_mut(&p.claim.uid) {
                    entry.state = ClaimState::PrepareCompleted;
                }
            }
            let removed: Vec<(ClaimRef, Option<ClaimEntry>)> = failed
                .iter()
                .map(|(claim, _)| (claim.clone(), mem.checkpoint.claims.remove(&claim.uid)))
                .collect();
            version = mem.changed();
            drop(mem);
            for (claim, entry) in removed {
                if let Some(entry) = entry
                    && let Err(cleanup) = self.remove_claim_files(&claim.uid, &entry)
                {
                    tracing::warn!(claim = %claim, error = %cleanup.1, "cleanup failed; recover() retries");
                }
            }
        }
        for (claim, e) in failed {
            answers.insert(claim.uid, Err(e));
        }

        // One flush, shared with every call whose changes are in memory by now.
        if let Err(e) = ticket.commit(version) {
            // Undo in memory and on disk, so the kubelet's retry (or recover()) finds a clean
            // slate; the next commit writes the memory without these claims.
            let removed: Vec<(Planned, Option<ClaimEntry>)> = {
                let mut mem = self.store.mem();
                let removed = written
                    .into_iter()
                    .map(|p| {
                        let entry = mem.checkpoint.claims.remove(&p.claim.uid);
                        (p, entry)
                    })
                    .collect();
                mem.changed();
                removed
            };
            for (p, entry) in removed {
                if let Some(entry) = entry
                    && let Err(cleanup) = self.remove_claim_files(&p.claim.uid, &entry)
                {
                    tracing::warn!(claim = %p.claim, error = %cleanup.1, "cleanup failed; recover() retries");
                }
                answers.insert(
                    p.claim.uid.clone(),
                    Err(self.checkpoint_error(&p.claim, &e)),
                );
            }
            return answers;
        }
        for p in written {
            let devices: Vec<PreparedDevice> =
                p.plan.devices.iter().map(|d| d.device.clone()).collect();
            tracing::info!(
                claim = %p.claim,
                devices = ?devices.iter().map(|d| d.device_name.as_str()).collect::<Vec<_>>(),
                "claim prepared"
            );
            answers.insert(p.claim.uid.clone(), Ok(devices));
        }
        answers
    }

    fn write_claim_files(&self, claim: &ClaimRef, plan: &ClaimPlan) -> Result<(), PrepareError> {
        self.write_topology(claim, &plan.topology)?;
        if let Some(spec) = &plan.spec {
            self.write_spec(claim, &self.spec_path(&claim.uid), spec)?;
        }
        Ok(())
    }

    fn write_topology(
        &self,
        claim: &ClaimRef,
        topology: &ClaimTopology,
    ) -> Result<(), PrepareError> {
        let dir = self.claim_dir(&claim.uid);
        fsutil::ensure_dir(&dir, PRIVATE_DIR_MODE).map_err(|source| PrepareError::Io {
            claim: claim.to_string(),
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(TOPOLOGY_FILE_NAME);
        write_json(claim, &path, topology)
    }

    fn write_spec(
        &self,
        claim: &ClaimRef,
        path: &Path,
        spec: &CdiSpec,
    ) -> Result<(), PrepareError> {
        fsutil::ensure_dir(&self.config.cdi_dir, CDI_DIR_MODE).map_err(|source| {
            PrepareError::Io {
                claim: claim.to_string(),
                path: self.config.cdi_dir.clone(),
                source,
            }
        })?;
        write_json(claim, path, spec)
    }

    /// A completed claim whose files vanished (a reboot empties /var/run/cdi; an operator
    /// cleaned up) gets them back from the checkpoint, unchanged.
    fn restore_missing_files(
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
        if let Some(topology) = &entry.topology
            && !self.claim_dir(&claim.uid).join(TOPOLOGY_FILE_NAME).exists()
        {
            self.write_topology(claim, topology)?;
        }
        Ok(())
    }

    /// Brings back the NICs the hook moved into the claim's pod and returns those that cannot
    /// come back yet (their namespace unreachable), which the caller must keep in the
    /// checkpoint's pending releases before the claim directory, and the record in it, go.
    fn release_claim_interfaces(
        &self,
        claim: &ClaimRef,
    ) -> Result<Vec<AttachedInterface>, PrepareError> {
        let claim_dir = self.claim_dir(&claim.uid);
        let record_error = |e: RecordError| PrepareError::StateIo {
            path: claim_dir.join(record::RECORD_FILE),
            source: std::io::Error::other(e.to_string()),
        };
        match record::release_claim_dir(
            &claim_dir,
            &self.config.host_netns,
            &self.config.netns_proc_root,
            &self.config.run_netns_dir,
            DEFAULT_NETLINK_TIMEOUT,
        ) {
            Ok(_) => return Ok(Vec::new()),
            Err(e @ (RecordError::Io { .. } | RecordError::Parse { .. })) => {
                return Err(record_error(e));
            }
            // What did not come back is still in the record on disk.
            Err(error) => tracing::warn!(claim = %claim, %error,
                "interface not yet released; the netattach reconcile retries it"),
        }
        Ok(NetAttachRecord::load(&claim_dir)
            .map_err(record_error)?
            .interfaces)
    }

    /// Retries every pending release; returns how many interfaces came back.
    fn retry_pending_releases(&self, cp: &mut Checkpoint) -> usize {
        if cp.pending_releases.is_empty() {
            return 0;
        }
        let host = match Netns::open(&self.config.host_netns) {
            Ok(host) => host,
            Err(error) => {
                tracing::warn!(%error, "cannot open the host network namespace; pending releases wait");
                return 0;
            }
        };
        let mut released = 0;
        cp.pending_releases.retain(|uid, pending| {
            let mut record = NetAttachRecord {
                interfaces: std::mem::take(&mut pending.interfaces),
            };
            let before = record.interfaces.len();
            let failures = record::release_interfaces(
                &mut record,
                &host,
                &self.config.netns_proc_root,
                &self.config.run_netns_dir,
                DEFAULT_NETLINK_TIMEOUT,
            );
            for failure in &failures {
                tracing::info!(claim_uid = %uid, namespace = %pending.namespace, name = %pending.name,
                    error = %failure, "interface not yet released");
            }
            released += before - record.interfaces.len();
            pending.interfaces = record.interfaces;
            !pending.interfaces.is_empty()
        });
        released
    }

    /// Releases a claim's interfaces ahead of removing its files: what stays in the pod is
    /// committed to the checkpoint's pending releases first, so no crash can lose it (an
    /// extra flush, only when an interface could not come back).
    fn release_before_removal(&self, claim: &ClaimRef) -> Result<(), PrepareError> {
        let leftover = self.release_claim_interfaces(claim)?;
        if leftover.is_empty() {
            return Ok(());
        }
        let (version, previous) = {
            let mut mem = self.store.mem();
            let previous = mem.checkpoint.pending_releases.insert(
                claim.uid.clone(),
                PendingRelease {
                    namespace: claim.namespace.clone(),
                    name: claim.name.clone(),
                    interfaces: leftover,
                },
            );
            (mem.changed(), previous)
        };
        if let Err(e) = self.store.commit(version) {
            let mut mem = self.store.mem();
            match previous {
                Some(previous) => mem
                    .checkpoint
                    .pending_releases
                    .insert(claim.uid.clone(), previous),
                None => mem.checkpoint.pending_releases.remove(&claim.uid),
            };
            mem.changed();
            return Err(self.checkpoint_error(claim, &e));
        }
        Ok(())
    }

    fn reconcile_netattach_locked(&self) -> Result<NetattachReport, PrepareError> {
        self.refresh().map_err(state_error)?;
        let (released, version, claims, pending) = {
            let mut mem = self.store.mem();
            let released = self.retry_pending_releases(&mut mem.checkpoint);
            let version = (released > 0).then(|| mem.changed());
            let claims: Vec<ClaimRef> = mem
                .checkpoint
                .claims
                .iter()
                .map(|(uid, entry)| ClaimRef {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    uid: uid.clone(),
                })
                .collect();
            let pending = mem
                .checkpoint
                .pending_releases
                .values()
                .map(|p| p.interfaces.len())
                .sum();
            (released, version, claims, pending)
        };
        if let Some(version) = version {
            self.store.commit(version).map_err(state_error)?;
        }
        let mut attached = Vec::new();
        for claim in claims {
            let claim_dir = self.claim_dir(&claim.uid);
            match NetAttachRecord::load(&claim_dir) {
                Ok(record) if !record.interfaces.is_empty() => attached.push(ClaimAttachments {
                    claim,
                    interfaces: record.interfaces,
                }),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(claim_uid = %claim.uid, %error, "unreadable netattach record")
                }
            }
        }
        Ok(NetattachReport {
            released,
            pending,
            attached,
        })
    }

    /// Removes every file a claim may own: the recorded ones and the ones derived from its
    /// UID (a crash can leave a file behind before its path was recorded). The unlinks are not
    /// flushed: after a power cut a file may come back without its entry, and recover() deletes
    /// it as an orphan.
    fn remove_claim_files(
        &self,
        uid: &str,
        entry: &ClaimEntry,
    ) -> Result<(), (PathBuf, std::io::Error)> {
        let mut paths: BTreeSet<PathBuf> = entry.files.iter().cloned().collect();
        paths.extend(entry.cdi_spec_path.clone());
        paths.insert(self.spec_path(uid));
        for path in &paths {
            fsutil::remove_file_if_present(path).map_err(|e| with_path(path, e))?;
        }
        let dir = self.claim_dir(uid);
        fsutil::remove_dir_if_present(&dir).map_err(|e| with_path(&dir, e))?;
        Ok(())
    }

    fn unprepare_claims(&self, claims: Vec<ClaimRef>) -> UnprepareResults {
        let mut answers = UnprepareResults::new();
        if let Err(e) = self.refresh() {
            for claim in claims {
                answers.insert(claim.uid.clone(), Err(self.checkpoint_error(&claim, &e)));
            }
            return answers;
        }
        // Files go first, then the entries, in one commit for the whole call.
        let ticket = self.store.will_commit();
        let mut removed: Vec<ClaimRef> = Vec::new();
        for claim in claims {
            let uid = claim.uid.clone();
            let entry = self.store.mem().checkpoint.claims.get(&uid).cloned();
            let entry = entry.unwrap_or_else(|| ClaimEntry {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                state: ClaimState::PrepareCompleted,
                boot_id: String::new(),
                devices: Vec::new(),
                cdi_spec_path: None,
                cdi_spec: None,
                topology: None,
                files: Vec::new(),
            });
            if let Err(e) = self.release_before_removal(&claim) {
                answers.insert(uid, Err(e));
                continue;
            }
            match self.remove_claim_files(&uid, &entry) {
                Ok(()) => removed.push(claim),
                Err(e) => {
                    answers.insert(uid, Err(io_error(&claim, e)));
                }
            }
        }
        let (version, forgotten) = {
            let mut mem = self.store.mem();
            let forgotten: Vec<(ClaimRef, Option<ClaimEntry>)> = removed
                .into_iter()
                .map(|claim| {
                    let entry = mem.checkpoint.claims.remove(&claim.uid);
                    (claim, entry)
                })
                .collect();
            let version = forgotten
                .iter()
                .any(|(_, entry)| entry.is_some())
                .then(|| mem.changed());
            (version, forgotten)
        };
        let result = version.map_or(Ok(()), |v| ticket.commit(v));
        if result.is_err() {
            // Not forgotten on disk: keep the entries in memory too, so the kubelet's retry
            // (files already gone, which is fine) commits their removal.
            let mut mem = self.store.mem();
            for (claim, entry) in &forgotten {
                if let Some(entry) = entry {
                    mem.checkpoint
                        .claims
                        .insert(claim.uid.clone(), entry.clone());
                }
            }
            mem.changed();
        }
        for (claim, entry) in forgotten {
            let answer = match &result {
                Ok(()) => {
                    if entry.is_some() {
                        tracing::info!(claim = %claim, "claim unprepared");
                    }
                    Ok(())
                }
                Err(e) => Err(self.checkpoint_error(&claim, e)),
            };
            answers.insert(claim.uid.clone(), answer);
        }
        answers
    }

    fn recover_locked(&self) -> Result<RecoveryReport, PrepareError> {
        let outcome = self.store.reload().map_err(state_error)?;
        let mut rolled_back = Vec::new();
        let started: Vec<(String, ClaimEntry)> = self
            .store
            .mem()
            .checkpoint
            .claims
            .iter()
            .filter(|(_, e)| e.state == ClaimState::PrepareStarted)
            .map(|(uid, e)| (uid.clone(), e.clone()))
            .collect();
        for (uid, entry) in started {
            let claim = ClaimRef {
                namespace: entry.namespace.clone(),
                name: entry.name.clone(),
                uid: uid.clone(),
            };
            self.release_before_removal(&claim)?;
            self.remove_claim_files(&uid, &entry)
                .map_err(|(path, source)| PrepareError::StateIo { path, source })?;
            tracing::warn!(claim_uid = %uid, namespace = %entry.namespace, name = %entry.name,
                "rolled back a claim whose preparation was interrupted");
            self.store.mem().checkpoint.claims.remove(&uid);
            rolled_back.push(uid);
        }
        let needs_save = !rolled_back.is_empty()
            || matches!(
                outcome,
                LoadOutcome::Loaded {
                    migrated_from: Some(_)
                } | LoadOutcome::SetAside { .. }
            );
        if needs_save {
            let version = {
                let mut mem = self.store.mem();
                if mem.checkpoint.boot_id.is_empty() {
                    mem.checkpoint.boot_id = self.boot_id.clone();
                }
                mem.changed()
            };
            self.store.commit(version).map_err(state_error)?;
        }
        let cp = self.store.mem().checkpoint.clone();

        let boot_id = self.boot_id.clone();
        let mut restored = Vec::new();
        for (uid, entry) in &cp.claims {
            let missing = entry.cdi_spec_path.as_ref().is_some_and(|p| !p.exists())
                || (entry.topology.is_some()
                    && !self.claim_dir(uid).join(TOPOLOGY_FILE_NAME).exists());
            // Claims of an earlier boot are rebuilt by the kubelet's next prepare instead,
            // against the current device numbers.
            if missing && is_current(entry, &boot_id) {
                let claim = ClaimRef {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    uid: uid.clone(),
                };
                self.restore_missing_files(&claim, entry)?;
                restored.push(uid.clone());
            }
        }

        let owned: BTreeSet<PathBuf> = cp
            .claims
            .values()
            .filter_map(|e| e.cdi_spec_path.clone())
            .collect();
        let temp_prefix = format!(".{}", cdi::spec_file_prefix(&self.config.driver_name));
        let mut orphan_specs_removed = Vec::new();
        let mut temp_files_removed = Vec::new();
        for path in list_dir(&self.config.cdi_dir)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with(&temp_prefix) && name.ends_with(fsutil::TEMP_SUFFIX) {
                remove_logged(&path, &mut temp_files_removed)?;
            } else if name.ends_with(".json")
                && !owned.contains(&path)
                && cdi::is_spec_of_kind(&path, &self.cdi_kind)
            {
                remove_logged(&path, &mut orphan_specs_removed)?;
            }
        }
        let checkpoint_temp_prefix = format!(".{}.", checkpoint::CHECKPOINT_FILE);
        for path in list_dir(&self.config.state_dir)? {
            let is_temp = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&checkpoint_temp_prefix) && n.ends_with(fsutil::TEMP_SUFFIX)
            });
            if is_temp {
                remove_logged(&path, &mut temp_files_removed)?;
            }
        }
        let mut orphan_claim_dirs_removed = Vec::new();
        for path in list_dir(&self.config.state_dir.join(CLAIMS_SUBDIR))? {
            let owned = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|uid| cp.claims.contains_key(uid));
            if !owned && path.is_dir() {
                fsutil::remove_dir_if_present(&path).map_err(|source| PrepareError::StateIo {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!(dir = %path.display(), "removed orphan claim directory");
                orphan_claim_dirs_removed.push(path);
            }
        }
        Ok(RecoveryReport {
            checkpoint: outcome,
            rolled_back,
            orphan_specs_removed,
            orphan_claim_dirs_removed,
            temp_files_removed,
            restored,
            prepared_claims: cp.claims.len(),
        })
    }
}

/// A checkpoint that cannot be read or written, for whole-checkpoint jobs (no claim to name).
/// Logs, for each accelerator of the claim, why it gets no vendor device (or why a spec was
/// passed over): the claim is prepared all the same, with Tandem's own edits.
fn log_vendor_warnings(
    claim: &ClaimRef,
    allocation: &claim::OurAllocation,
    inventory: &crate::topology::Inventory,
    vendor: &VendorMatches,
) {
    for allocated in &allocation.devices {
        let Some(crate::topology::DeviceRef::Accelerator(a)) =
            inventory.device_by_name(&allocated.device)
        else {
            continue;
        };
        let Some(found) = vendor.get(&a.pci.address) else {
            continue;
        };
        for warning in &found.warnings {
            tracing::warn!(claim = %claim, device = %allocated.device, "{warning}");
        }
    }
}

fn state_error(e: checkpoint::CheckpointError) -> PrepareError {
    PrepareError::State {
        path: e.path,
        message: e.source.to_string(),
    }
}

fn write_json<T: serde::Serialize>(
    claim: &ClaimRef,
    path: &Path,
    value: &T,
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
    fsutil::replace(path, &bytes, PUBLIC_FILE_MODE).map_err(io)
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

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, PrepareError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PrepareError::StateIo {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PrepareError::StateIo {
            path: dir.to_path_buf(),
            source,
        })?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}

fn remove_logged(path: &Path, removed: &mut Vec<PathBuf>) -> Result<(), PrepareError> {
    if fsutil::remove_file_if_present(path).map_err(|source| PrepareError::StateIo {
        path: path.to_path_buf(),
        source,
    })? {
        tracing::info!(path = %path.display(), "removed leftover file");
        removed.push(path.to_path_buf());
    }
    Ok(())
}
