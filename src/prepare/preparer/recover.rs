//! Start-up recovery: interrupted preparations are rolled back, vanished files of completed
//! claims restored, and leftovers (orphan CDI specs and per-claim state, temp files of
//! interrupted writes) deleted. [`Inner::recover_locked`] runs these steps in order.

use super::{Inner, RecoveryReport, TOPOLOGY_FILE_SUFFIX, is_current, state_error};
use crate::fsutil;
use crate::prepare::CLAIMS_SUBDIR;
use crate::prepare::cdi;
use crate::prepare::checkpoint::{self, Checkpoint, ClaimEntry, ClaimState, LoadOutcome};
use crate::prepare::error::PrepareError;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tandem_kubelet_plugin::ClaimRef;

impl Inner {
    pub(super) fn recover_locked(&self) -> Result<RecoveryReport, PrepareError> {
        let outcome = self.store.reload().map_err(state_error)?;
        let rolled_back = self.roll_back_started()?;
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
        let restored = self.restore_vanished(&cp)?;
        let mut temp_files_removed = Vec::new();
        let orphan_specs_removed = self.remove_orphan_specs(&cp, &mut temp_files_removed)?;
        self.remove_checkpoint_temps(&mut temp_files_removed)?;
        let orphan_claim_state_removed = self.remove_orphan_claim_state(&cp)?;
        Ok(RecoveryReport {
            checkpoint: outcome,
            rolled_back,
            orphan_specs_removed,
            orphan_claim_state_removed,
            temp_files_removed,
            restored,
            prepared_claims: cp.claims.len(),
        })
    }

    /// Rolls back the PrepareStarted claims: interfaces released, files removed, entries
    /// dropped from memory (the caller commits). Returns their UIDs.
    fn roll_back_started(&self) -> Result<Vec<String>, PrepareError> {
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
            self.release_before_removal(&claim, None)?;
            self.remove_claim_files(&uid, &entry)
                .map_err(|(path, source)| PrepareError::StateIo { path, source })?;
            tracing::warn!(claim_uid = %uid, namespace = %entry.namespace, name = %entry.name,
                "rolled back a claim whose preparation was interrupted");
            self.store.mem().checkpoint.claims.remove(&uid);
            rolled_back.push(uid);
        }
        Ok(rolled_back)
    }

    /// Writes again the files of this boot's completed claims that vanished. Claims of an
    /// earlier boot are rebuilt by the kubelet's next prepare instead, against the current
    /// device numbers.
    fn restore_vanished(&self, cp: &Checkpoint) -> Result<Vec<String>, PrepareError> {
        let mut restored = Vec::new();
        for (uid, entry) in &cp.claims {
            let missing = entry.cdi_spec_path.as_ref().is_some_and(|p| !p.exists())
                || (entry.topology.is_some() && !self.recorded_topology_path(uid, entry).exists());
            if missing && is_current(entry, &self.boot_id) {
                let claim = ClaimRef {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    uid: uid.clone(),
                };
                self.restore_missing_files(&claim, entry)?;
                restored.push(uid.clone());
            }
        }
        Ok(restored)
    }

    /// Deletes the CDI specs of our kind that no entry owns (returned) and our temp files in
    /// the CDI directory (added to `temp_files_removed`).
    fn remove_orphan_specs(
        &self,
        cp: &Checkpoint,
        temp_files_removed: &mut Vec<PathBuf>,
    ) -> Result<Vec<PathBuf>, PrepareError> {
        let owned: BTreeSet<PathBuf> = cp
            .claims
            .values()
            .filter_map(|e| e.cdi_spec_path.clone())
            .collect();
        let temp_prefix = format!(".{}", cdi::spec_file_prefix(&self.config.driver_name));
        let mut orphan_specs_removed = Vec::new();
        for path in list_dir(&self.config.cdi_dir)? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with(&temp_prefix) && name.ends_with(fsutil::TEMP_SUFFIX) {
                remove_logged(&path, temp_files_removed)?;
            } else if name.ends_with(".json")
                && !owned.contains(&path)
                && cdi::is_spec_of_kind(&path, &self.cdi_kind)
            {
                remove_logged(&path, &mut orphan_specs_removed)?;
            }
        }
        Ok(orphan_specs_removed)
    }

    /// Deletes the temp files of interrupted checkpoint writes.
    fn remove_checkpoint_temps(
        &self,
        temp_files_removed: &mut Vec<PathBuf>,
    ) -> Result<(), PrepareError> {
        let checkpoint_temp_prefix = format!(".{}.", checkpoint::CHECKPOINT_FILE);
        for path in list_dir(&self.config.state_dir)? {
            let is_temp = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&checkpoint_temp_prefix) && n.ends_with(fsutil::TEMP_SUFFIX)
            });
            if is_temp {
                remove_logged(&path, temp_files_removed)?;
            }
        }
        Ok(())
    }

    /// Deletes what no entry owns under `claims/` (per-claim directories, i.e. hook records
    /// and the older layouts' topology files, and temp files of interrupted writes), and the
    /// topology files and their temp files in the topology directory that no entry owns.
    fn remove_orphan_claim_state(&self, cp: &Checkpoint) -> Result<Vec<PathBuf>, PrepareError> {
        let mut orphan_claim_state_removed = Vec::new();
        let owned = |name: &str| {
            let uid = name.strip_suffix(TOPOLOGY_FILE_SUFFIX).unwrap_or(name);
            let temp = name.starts_with('.') && name.ends_with(fsutil::TEMP_SUFFIX);
            cp.claims.contains_key(uid) && !temp
        };
        let claims_dir = self.config.state_dir.join(CLAIMS_SUBDIR);
        let mut candidates = list_dir(&claims_dir)?;
        if self.config.topology_dir != claims_dir {
            // The topology directory may be shared (it is the operator's choice): only
            // names of ours go.
            candidates.extend(
                list_dir(&self.config.topology_dir)?
                    .into_iter()
                    .filter(|path| {
                        path.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.contains(TOPOLOGY_FILE_SUFFIX))
                    }),
            );
        }
        for path in candidates {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if owned(name) {
                continue;
            }
            let removed = if path.is_dir() {
                fsutil::remove_dir_if_present(&path)
            } else {
                fsutil::remove_file_if_present(&path)
            };
            removed.map_err(|source| PrepareError::StateIo {
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "removed orphan claim state");
            orphan_claim_state_removed.push(path);
        }
        Ok(orphan_claim_state_removed)
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
