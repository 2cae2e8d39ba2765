//! The prepare path of a call: every claim is sorted by its checkpoint entry under the memory
//! lock, planned outside it (in parallel with the claims of other calls), and entered under it
//! again, where a device another claim took meanwhile refuses it (so two claims never hold the
//! same device); its files are written outside the lock, and the entries of all written claims
//! are committed in one flush shared with the other calls in flight. [`Inner::prepare_claims`]
//! runs these steps in order.

use super::{Fetched, Inner, PrepareResults, is_current};
use crate::prepare::PreparedDevice;
use crate::prepare::checkpoint::{Checkpoint, CheckpointError, ClaimEntry, ClaimState, WillCommit};
use crate::prepare::error::PrepareError;
use crate::prepare::plan::{self, ClaimPlan, DeviceHolders, PlanContext};
use crate::prepare::vendor_cdi::VendorMatches;
use crate::topology::Inventory;
use k8s_openapi::api::resource::v1::ResourceClaim;
use tandem_kubelet_plugin::claim::{self, ClaimRef};

/// A claim that passed planning and waits for its files.
pub(super) struct Planned {
    pub(super) claim: ClaimRef,
    pub(super) plan: ClaimPlan,
}

/// What a claim's checkpoint entry means for preparing it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Reuse {
    /// No entry, or one of an earlier boot (kept, so its devices stay reserved, until the new
    /// plan replaces it): plan the claim in full.
    Plan,
    /// Completed in this boot: answered from the entry, its vanished files restored.
    Current,
    /// An earlier attempt died half-way (and recover() has not run, e.g. the other instance
    /// of a rolling update crashed): drop the entry and its files, then plan afresh.
    RollBack,
    /// The entry is of another claim under the same UID (`namespace/name` recorded): refused.
    IdentityMismatch { recorded: String },
}

/// Decides what the checkpoint entry of `claim`, if any, is worth to a prepare in this boot.
pub(super) fn reuse(entry: Option<&ClaimEntry>, claim: &ClaimRef, boot_id: &str) -> Reuse {
    let Some(entry) = entry else {
        return Reuse::Plan;
    };
    if entry.namespace != claim.namespace || entry.name != claim.name {
        return Reuse::IdentityMismatch {
            recorded: format!("{}/{}", entry.namespace, entry.name),
        };
    }
    if is_current(entry, boot_id) {
        Reuse::Current
    } else if entry.state == ClaimState::PrepareStarted {
        Reuse::RollBack
    } else {
        Reuse::Plan
    }
}

/// Who holds which device before a call plans anything: the claims of the checkpoint, and the
/// NICs whose netdev is still in the pod of an unprepared claim (pending releases).
pub(super) fn device_holders(cp: &Checkpoint) -> DeviceHolders {
    let mut holders = DeviceHolders::default();
    for (uid, entry) in &cp.claims {
        let holder = ClaimRef {
            namespace: entry.namespace.clone(),
            name: entry.name.clone(),
            uid: uid.clone(),
        };
        holders.add(&holder, &entry.devices);
    }
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
    holders
}

/// The claims of one call, sorted under the memory lock.
#[derive(Default)]
struct Batch {
    answers: PrepareResults,
    /// Completed in this boot: answered from their entries.
    current: Vec<(ClaimRef, ClaimEntry)>,
    /// Entries of interrupted attempts, dropped from the checkpoint: their files go.
    stale: Vec<(ClaimRef, ClaimEntry)>,
    /// To plan, each with its ResourceClaim (or why it has none).
    to_plan: Vec<Fetched>,
    /// Planned and entered as PrepareStarted: their files are written next.
    planned: Vec<Planned>,
    /// The checkpoint changed besides the planned entries (stale entries dropped, pending
    /// releases done).
    dirty: bool,
}

/// A claim planned outside the lock, with the entry that will hold its devices.
struct Unentered {
    planned: Planned,
    entry: ClaimEntry,
}

/// Claims whose files could not be written, with the reason.
type Failed = Vec<(ClaimRef, PrepareError)>;

impl Inner {
    pub(super) fn prepare_claims(&self, work: Vec<Fetched>, ticket: WillCommit) -> PrepareResults {
        let inventory = self.inventory.borrow().clone();
        let vendor = self.vendor_matches(&inventory);
        // Sort under the memory lock (no I/O but the rare pending-release retry); plan outside
        // it; enter the plans under it again. A planned claim enters the checkpoint as
        // PrepareStarted and holds its devices from then on.
        let mut batch = self.sort_batch(work);
        let plans = self.plan_sorted(&mut batch, &inventory, vendor.as_deref());
        let version = self.enter_plans(&mut batch, plans);
        // A call with nothing to commit must not hold up the commits of others.
        let ticket = version.map(|_| ticket);
        let Batch {
            mut answers,
            current,
            stale,
            planned,
            ..
        } = batch;

        // Files, outside every lock but the claims' own. Completed claims whose files
        // vanished get them back; the rest are written before the entry that owns them is
        // committed, so a kill in between leaves files recover() deletes as orphans.
        self.answer_current(current, &mut answers);
        for (claim, entry) in stale {
            self.clean_up(&claim, &entry);
        }
        let (written, failed) = self.write_planned(planned);
        let (Some(version), Some(ticket)) = (version, ticket) else {
            return answers;
        };
        let version = self.settle_writes(&written, &failed, version);
        for (claim, e) in failed {
            answers.insert(claim.uid, Err(e));
        }

        // One flush, shared with every call whose changes are in memory by now.
        match ticket.commit(version) {
            Ok(()) => answer_prepared(written, &mut answers),
            Err(e) => self.undo_written(written, &e, &mut answers),
        }
        answers
    }

    /// Sorts every claim of the call by its checkpoint entry, under the memory lock: answered
    /// from the entry, rolled back, refused, or to plan.
    fn sort_batch(&self, work: Vec<Fetched>) -> Batch {
        let mut mem = self.store.mem();
        let cp = &mut mem.checkpoint;
        // A NIC whose netdev has not come back from an earlier pod cannot be attached
        // again; one more try now, and what stays is refused with the reason.
        let mut batch = Batch {
            dirty: self.retry_pending_releases(cp) > 0,
            ..Batch::default()
        };
        for (claim, fetched) in work {
            let uid = claim.uid.clone();
            match reuse(cp.claims.get(&uid), &claim, &self.boot_id) {
                Reuse::IdentityMismatch { recorded } => {
                    let claim = claim.to_string();
                    let error = PrepareError::ClaimIdentityMismatch { claim, recorded };
                    batch.answers.insert(uid, Err(error));
                }
                Reuse::Current => {
                    if let Some(entry) = cp.claims.get(&uid) {
                        batch.current.push((claim, entry.clone()));
                    }
                }
                Reuse::RollBack => {
                    if let Some(entry) = cp.claims.remove(&uid) {
                        batch.stale.push((claim.clone(), entry));
                    }
                    batch.dirty = true;
                    batch.to_plan.push((claim, fetched));
                }
                Reuse::Plan => batch.to_plan.push((claim, fetched)),
            }
        }
        batch
    }

    /// Plans the claims to plan, outside every lock but the claims' own (planning reads the
    /// ResourceClaim, the inventory and the configuration, nothing else); answers those that
    /// cannot be prepared, or hold nothing of ours.
    fn plan_sorted(
        &self,
        batch: &mut Batch,
        inventory: &Inventory,
        vendor: Option<&VendorMatches>,
    ) -> Vec<Unentered> {
        let mut plans = Vec::new();
        for (claim, fetched) in std::mem::take(&mut batch.to_plan) {
            let uid = claim.uid.clone();
            match self.plan_one(&claim, fetched, inventory, vendor) {
                Err(e) => {
                    tracing::warn!(claim = %claim, error = %e, "claim not prepared");
                    batch.answers.insert(uid, Err(e));
                }
                Ok(plan) if plan.spec.is_none() => {
                    // Nothing of ours in the claim: nothing to write or remember.
                    batch.answers.insert(uid, Ok(Vec::new()));
                }
                Ok(plan) => {
                    let entry = self.started_entry(&claim, &plan);
                    plans.push(Unentered {
                        planned: Planned { claim, plan },
                        entry,
                    });
                }
            }
        }
        plans
    }

    /// Enters the planned claims into the checkpoint as PrepareStarted, under the memory lock,
    /// each unless a device of it is held by another claim: one of the checkpoint (entered by
    /// another call meanwhile, or still waiting for its NIC to come back from a pod) or one
    /// entered before it in this call. Returns the checkpoint version to commit, if the call
    /// changed it.
    fn enter_plans(&self, batch: &mut Batch, plans: Vec<Unentered>) -> Option<u64> {
        if plans.is_empty() && !batch.dirty {
            return None;
        }
        let mut mem = self.store.mem();
        let cp = &mut mem.checkpoint;
        let mut holders = device_holders(cp);
        for Unentered { planned, entry } in plans {
            let claim = &planned.claim;
            if let Err(e) = holders.refuse_conflicts(claim, &planned.plan.devices) {
                tracing::warn!(claim = %claim, error = %e, "claim not prepared");
                batch.answers.insert(claim.uid.clone(), Err(e));
                continue;
            }
            holders.add(claim, &planned.plan.devices);
            cp.claims.insert(claim.uid.clone(), entry);
            batch.planned.push(planned);
        }
        if !batch.planned.is_empty() {
            cp.boot_id = self.boot_id.clone();
        }
        (batch.dirty || !batch.planned.is_empty()).then(|| mem.changed())
    }

    /// Plans a claim from its ResourceClaim. A claim that was not fetched (its entry was
    /// current then, and is not any more) is answered with a retry.
    fn plan_one(
        &self,
        claim: &ClaimRef,
        fetched: Option<Result<ResourceClaim, PrepareError>>,
        inventory: &Inventory,
        vendor: Option<&VendorMatches>,
    ) -> Result<ClaimPlan, PrepareError> {
        let resource = fetched.unwrap_or_else(|| {
            Err(PrepareError::Retry {
                claim: claim.to_string(),
            })
        })?;
        let allocation = claim::our_allocation(
            claim,
            &resource,
            &self.config.driver_name,
            &self.config.node_name,
        )?;
        let topology_path = self.topology_path(&claim.uid);
        let ctx = PlanContext {
            driver_name: &self.config.driver_name,
            dev_root_in_container: &self.config.dev_root_in_container,
            topology_host_path: &topology_path,
            inventory,
            netdev_mover: self.netdev_mover(),
            vendor,
            driver_root: self.config.driver_root.as_ref(),
            nvidia_legacy_env: self.config.nvidia_legacy_env,
        };
        if let Some(vendor) = vendor {
            log_vendor_warnings(claim, &allocation, inventory, vendor);
        }
        plan::plan_claim(&ctx, claim, &allocation)
    }

    /// The PrepareStarted entry of a planned claim: it owns the files about to be written.
    fn started_entry(&self, claim: &ClaimRef, plan: &ClaimPlan) -> ClaimEntry {
        ClaimEntry {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            state: ClaimState::PrepareStarted,
            boot_id: self.boot_id.clone(),
            devices: plan.devices.clone(),
            cdi_spec_path: Some(self.spec_path(&claim.uid)),
            cdi_spec: plan.spec.clone(),
            topology: Some(plan.topology.clone()),
            files: vec![self.topology_path(&claim.uid)],
        }
    }

    /// Answers the claims completed in this boot from their entries, restoring vanished files.
    fn answer_current(&self, current: Vec<(ClaimRef, ClaimEntry)>, answers: &mut PrepareResults) {
        for (claim, entry) in current {
            let answer = self
                .restore_missing_files(&claim, &entry)
                .map(|()| entry.devices.iter().map(|d| d.device.clone()).collect());
            answers.insert(claim.uid.clone(), answer);
        }
    }

    /// Writes the files of each planned claim; returns those written and those that failed.
    fn write_planned(&self, planned: Vec<Planned>) -> (Vec<Planned>, Failed) {
        let mut written: Vec<Planned> = Vec::new();
        let mut failed: Failed = Vec::new();
        for p in planned {
            match self.write_claim_files(&p.claim, &p.plan) {
                Ok(()) => written.push(p),
                Err(e) => {
                    tracing::warn!(claim = %p.claim, error = %e, "writing claim files failed");
                    failed.push((p.claim, e));
                }
            }
        }
        (written, failed)
    }

    /// Marks the written claims completed and drops the entries (and files) of those whose
    /// files failed; returns the checkpoint version to commit.
    fn settle_writes(&self, written: &[Planned], failed: &Failed, version: u64) -> u64 {
        if written.is_empty() && failed.is_empty() {
            return version;
        }
        let (version, removed) = {
            let mut mem = self.store.mem();
            for p in written {
                if let Some(entry) = mem.checkpoint.claims.get_mut(&p.claim.uid) {
                    entry.state = ClaimState::PrepareCompleted;
                }
            }
            let removed: Vec<(&ClaimRef, Option<ClaimEntry>)> = failed
                .iter()
                .map(|(claim, _)| (claim, mem.checkpoint.claims.remove(&claim.uid)))
                .collect();
            (mem.changed(), removed)
        };
        for (claim, entry) in removed {
            if let Some(entry) = entry {
                self.clean_up(claim, &entry);
            }
        }
        version
    }

    /// The commit failed: undo in memory and on disk, so the kubelet's retry (or recover())
    /// finds a clean slate; the next commit writes the memory without these claims.
    fn undo_written(
        &self,
        written: Vec<Planned>,
        e: &CheckpointError,
        answers: &mut PrepareResults,
    ) {
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
            if let Some(entry) = entry {
                self.clean_up(&p.claim, &entry);
            }
            answers.insert(p.claim.uid.clone(), Err(self.checkpoint_error(&p.claim, e)));
        }
    }

    /// Removes the files of a claim whose entry was dropped; a failure is left to recover().
    fn clean_up(&self, claim: &ClaimRef, entry: &ClaimEntry) {
        if let Err(cleanup) = self.remove_claim_files(&claim.uid, entry) {
            tracing::warn!(claim = %claim, error = %cleanup.1, "cleanup failed; recover() retries");
        }
    }
}

/// Answers the claims whose entries were committed with their prepared devices.
fn answer_prepared(written: Vec<Planned>, answers: &mut PrepareResults) {
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
}

/// Logs, for each accelerator of the claim, why it gets no vendor device (or why a spec was
/// passed over): the claim is prepared all the same, with Tandem's own edits.
fn log_vendor_warnings(
    claim: &ClaimRef,
    allocation: &claim::OurAllocation,
    inventory: &Inventory,
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
