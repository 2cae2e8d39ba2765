//! The unprepare path: a claim's interfaces come back from its pod (what cannot, yet, goes to
//! the checkpoint's pending releases first), its files go, then the entries of the whole call
//! are forgotten in one commit. The periodic netattach reconcile retries pending releases.

use super::{
    ClaimAttachments, Inner, NetattachReport, UnprepareResults, io_error, state_error, with_path,
};
use crate::fsutil;
use crate::netattach::record::{self, AttachedInterface, NetAttachRecord, RecordError};
use crate::netattach::{DEFAULT_NETLINK_TIMEOUT, Netns};
use crate::prepare::checkpoint::{Checkpoint, ClaimEntry, ClaimState, PendingRelease, WillCommit};
use crate::prepare::error::PrepareError;
use std::collections::BTreeSet;
use std::path::PathBuf;
use tandem_kubelet_plugin::ClaimRef;

/// Claims whose files are gone, each with the entry taken out of the checkpoint in memory
/// (`None`: the checkpoint did not know the claim).
type Forgotten = Vec<(ClaimRef, Option<ClaimEntry>)>;

impl Inner {
    pub(super) fn unprepare_claims(
        &self,
        claims: Vec<ClaimRef>,
        ticket: WillCommit,
    ) -> UnprepareResults {
        let mut answers = UnprepareResults::new();
        if let Err(e) = self.refresh() {
            for claim in claims {
                answers.insert(claim.uid.clone(), Err(self.checkpoint_error(&claim, &e)));
            }
            return answers;
        }
        // Files go first, then the entries, in one commit for the whole call.
        let removed = self.release_and_remove(claims, &ticket, &mut answers);
        let (version, forgotten) = self.forget(removed);
        let result = version.map_or(Ok(()), |v| ticket.commit(v));
        if result.is_err() {
            self.remember(&forgotten);
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

    /// Releases the interfaces and removes the files of each claim; returns the claims whose
    /// files are gone, and answers the others with their error.
    fn release_and_remove(
        &self,
        claims: Vec<ClaimRef>,
        ticket: &WillCommit,
        answers: &mut UnprepareResults,
    ) -> Vec<ClaimRef> {
        let mut removed: Vec<ClaimRef> = Vec::new();
        for claim in claims {
            let uid = claim.uid.clone();
            let entry = self.store.mem().checkpoint.claims.get(&uid).cloned();
            let entry = entry.unwrap_or_else(|| unknown_entry(&claim));
            if let Err(e) = self.release_before_removal(&claim, Some(ticket)) {
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
        removed
    }

    /// Takes the entries of `removed` out of the checkpoint in memory; returns the version to
    /// commit, if any entry was there.
    fn forget(&self, removed: Vec<ClaimRef>) -> (Option<u64>, Forgotten) {
        let mut mem = self.store.mem();
        let forgotten: Forgotten = removed
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
    }

    /// Not forgotten on disk: keep the entries in memory too, so the kubelet's retry (files
    /// already gone, which is fine) commits their removal.
    fn remember(&self, forgotten: &Forgotten) {
        let mut mem = self.store.mem();
        for (claim, entry) in forgotten {
            if let Some(entry) = entry {
                mem.checkpoint
                    .claims
                    .insert(claim.uid.clone(), entry.clone());
            }
        }
        mem.changed();
    }

    /// Brings back the NICs the hook moved into the claim's pod and returns those that cannot
    /// come back yet (their namespace unreachable), which the caller must keep in the
    /// checkpoint's pending releases before the claim directory, and the record in it, go.
    fn release_claim_interfaces(
        &self,
        claim: &ClaimRef,
    ) -> Result<Vec<AttachedInterface>, PrepareError> {
        let claim_dir = self.claim_dir(&claim.uid);
        let record_error = |source: RecordError| PrepareError::NetattachRecord {
            path: claim_dir.join(record::RECORD_FILE),
            source,
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
    pub(super) fn retry_pending_releases(&self, cp: &mut Checkpoint) -> usize {
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
    /// extra flush, only when an interface could not come back). `ticket`: the call's own
    /// announced commit, which that flush must not wait for.
    pub(super) fn release_before_removal(
        &self,
        claim: &ClaimRef,
        ticket: Option<&WillCommit>,
    ) -> Result<(), PrepareError> {
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
        let committed = match ticket {
            Some(ticket) => ticket.commit_early(version),
            None => self.store.commit(version),
        };
        if let Err(e) = committed {
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

    pub(super) fn reconcile_netattach_locked(&self) -> Result<NetattachReport, PrepareError> {
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
    pub(super) fn remove_claim_files(
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
}

/// The entry of a claim the checkpoint does not know: unprepare still removes the files
/// derived from its UID.
fn unknown_entry(claim: &ClaimRef) -> ClaimEntry {
    ClaimEntry {
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        state: ClaimState::PrepareCompleted,
        boot_id: String::new(),
        devices: Vec::new(),
        cdi_spec_path: None,
        cdi_spec: None,
        topology: None,
        files: Vec::new(),
    }
}
