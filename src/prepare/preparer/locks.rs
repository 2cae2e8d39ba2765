//! Per-claim locks: the same claim is prepared or unprepared by one call at a time, different
//! claims in parallel.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tandem_kubelet_plugin::ClaimRef;

type ClaimLockMap = HashMap<String, Arc<tokio::sync::Mutex<()>>>;

/// Per-claim locks, created on demand and dropped with their last holder so the map stays as
/// small as the number of calls in flight.
#[derive(Default)]
pub(super) struct ClaimLocks(Arc<Mutex<ClaimLockMap>>);

/// The locks of one call's claims, released (and forgotten when unused) on drop.
pub(super) struct ClaimGuards {
    map: Arc<Mutex<ClaimLockMap>>,
    held: Vec<(String, tokio::sync::OwnedMutexGuard<()>)>,
}

impl ClaimLocks {
    /// Locks every claim of a call, in UID order so two calls sharing claims cannot deadlock.
    pub(super) async fn lock_all(&self, claims: &[ClaimRef]) -> ClaimGuards {
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

#[cfg(test)]
impl ClaimLocks {
    /// The UIDs in the map: those locked or waited for.
    pub(super) fn held(&self) -> Vec<String> {
        let mut uids: Vec<String> = lock_map(&self.0).keys().cloned().collect();
        uids.sort();
        uids
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
