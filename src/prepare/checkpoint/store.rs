//! The checkpoint of one process, in memory, and its group commit ([`Store`]): the file is
//! read once, re-read only when another process replaced it, and each change is made durable
//! with one flush shared by every call that changed the memory meanwhile.

use super::{
    Checkpoint, CheckpointError, FileId, LoadOutcome, checkpoint_path, encode_for, load,
    write_bytes_flushed,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a commit waits for the calls that announced a commit and have not reached it
/// (fetching their claims, writing their files) so that one flush covers them too. Only a
/// call with such siblings waits; a lone call never does.
const GATHER_AT_MOST: Duration = Duration::from_millis(2);

/// The checkpoint of one process, in memory, and its group commit.
///
/// Changes are made to [`Mem`] under its lock (short, no I/O), each returning a version; then
/// [`Store::commit`] makes that version durable. Commits take turns at the file: the first in
/// line waits (at most [`GATHER_AT_MOST`]) for the calls that announced a commit with
/// [`Store::will_commit`] and have not reached it yet, then writes whatever the memory holds,
/// with one flush; the callers waiting meanwhile all wake when it ends, and those whose
/// version it covered return without writing. So N concurrent calls cost between 1 and N
/// flushes, never more than one each. A prepare announces itself once it holds its claims'
/// locks, before it fetches them: calls that arrive together (the kubelet starting several
/// pods) then share one flush, instead of the first flushing alone while the others still
/// wait for the apiserver; a commit waits for such a GET at most [`GATHER_AT_MOST`].
pub struct Store {
    state_dir: PathBuf,
    mem: Mutex<Mem>,
    /// Signalled when a call announced with `will_commit` reaches its commit (or gives up).
    arrived: Condvar,
    /// Locked only to look at or change [`IoState`], never across the I/O itself.
    io: Mutex<IoState>,
    /// The newest version on disk (flushed). Raised only by the holder of the I/O turn;
    /// waiters read it without the lock when they wake.
    durable: AtomicU64,
    /// [`GATHER_AT_MOST`]; tests lengthen it to tell a gather from none.
    gather_at_most: Duration,
}

/// A call's announcement that it will commit; reaching [`Store::commit`] (or dropping it)
/// withdraws it. It owns its store, so it can travel from the async part of a call, where it
/// is taken before the claims are fetched, to the blocking task that commits.
pub struct WillCommit {
    store: Arc<Store>,
    done: bool,
}

impl WillCommit {
    /// Makes `version` durable (see [`Store::commit`]).
    pub fn commit(mut self, version: u64) -> Result<(), CheckpointError> {
        self.withdraw();
        self.store.commit(version)
    }

    /// Makes `version` durable now, while this call still has its own commit to come (an
    /// unprepare recording a pending release before it removes the claim's files): the
    /// gather waits for the other announced calls, not for this one, which would hold it up
    /// the full [`GATHER_AT_MOST`] for nothing.
    pub fn commit_early(&self, version: u64) -> Result<(), CheckpointError> {
        self.store
            .commit_gathering(version, usize::from(!self.done))
    }

    fn withdraw(&mut self) {
        if !self.done {
            self.done = true;
            let coming = {
                let mut mem = lock(&self.store.mem);
                mem.coming -= 1;
                mem.coming
            };
            // A gathering commit waits for the count to fall to its own announcements, none
            // or one (`commit_early`): waking it at every arrival of a burst would only put
            // it back to sleep.
            if coming <= 1 {
                self.store.arrived.notify_all();
            }
        }
    }
}

impl Drop for WillCommit {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// The in-memory checkpoint. Lock it briefly; never across I/O that can block on the network.
pub struct Mem {
    pub checkpoint: Checkpoint,
    version: u64,
    /// Calls that announced a commit and have not reached it.
    coming: usize,
}

impl Mem {
    /// Marks the memory changed; the version to [`Store::commit`].
    pub fn changed(&mut self) -> u64 {
        self.version += 1;
        self.version
    }
}

struct IoState {
    /// A commit or a read of the file is in progress (one at a time).
    busy: bool,
    /// Threads waiting for the turn to end, each for its own version. They are unparked
    /// together when it ends and check the durable version without a lock: had they waited on
    /// a condition variable, each would take the lock again in turn after the flush, one
    /// context switch after another, before its call could answer.
    waiters: Vec<Thread>,
    /// The file as this process last saw it; `None` before the first read.
    seen: Option<Option<FileId>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// A store over `<state_dir>/checkpoint.json`; nothing is read until [`Store::refresh`].
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            mem: Mutex::new(Mem {
                checkpoint: Checkpoint::default(),
                version: 0,
                coming: 0,
            }),
            arrived: Condvar::new(),
            io: Mutex::new(IoState {
                busy: false,
                waiters: Vec::new(),
                seen: None,
            }),
            durable: AtomicU64::new(0),
            gather_at_most: GATHER_AT_MOST,
        }
    }

    #[cfg(test)]
    pub(super) fn with_gather_at_most(mut self, gather_at_most: Duration) -> Self {
        self.gather_at_most = gather_at_most;
        self
    }

    /// Reads the file into memory the first time, and again only when another process
    /// replaced it since (one `statx` otherwise). Returns how loading went when it read.
    ///
    /// Reading replaces the memory, so it must not happen while this process has changes in
    /// flight: another writer is only ever active between this process's calls (the
    /// serialize flock of rolling updates), and a commit of ours in progress means a call of
    /// ours is running, so then there is nothing to check and no call waits on the flush.
    pub fn refresh(&self) -> Result<Option<LoadOutcome>, CheckpointError> {
        // A turn in progress is a commit of ours: nothing to check (but the first read waits).
        let (turn, seen_before) = match self.io_turn(None, !self.loaded()) {
            Some((turn, io)) => (turn, io.seen),
            None => return Ok(None),
        };
        let path = checkpoint_path(&self.state_dir);
        if seen_before == Some(FileId::current(&path)?) {
            return Ok(None);
        }
        let (checkpoint, outcome) = load(&self.state_dir)?;
        // Loading may have set a bad file aside.
        let seen = FileId::current(&path)?;
        let version = {
            let mut mem = lock(&self.mem);
            mem.checkpoint = checkpoint;
            mem.changed()
        };
        turn.finish(version, seen);
        Ok(Some(outcome))
    }

    /// Takes the file's I/O turn, waiting (when `wait`) until no other commit or read is in
    /// progress; `None` when `version` is durable by then, or the turn is taken and this call
    /// does not wait. The turn ends when the returned [`IoTurn`] is finished or dropped (on
    /// an error), and the waiters go.
    fn io_turn(
        &self,
        version: Option<u64>,
        wait: bool,
    ) -> Option<(IoTurn<'_>, MutexGuard<'_, IoState>)> {
        let covered = || version.is_some_and(|v| self.durable.load(Ordering::Acquire) >= v);
        loop {
            let mut io = lock(&self.io);
            if covered() {
                return None;
            }
            if !io.busy {
                io.busy = true;
                return Some((IoTurn { store: self }, io));
            }
            if !wait {
                return None;
            }
            io.waiters.push(std::thread::current());
            drop(io);
            // An unpark that came before this park makes it return at once; a spurious
            // return loops.
            std::thread::park();
            if covered() {
                return None;
            }
        }
    }

    fn loaded(&self) -> bool {
        lock(&self.mem).version > 0
    }

    /// Reads the file whether or not it changed (start-up recovery reports how it went).
    pub fn reload(&self) -> Result<LoadOutcome, CheckpointError> {
        if let Some((turn, mut io)) = self.io_turn(None, true) {
            io.seen = None;
            // The guard first: ending the turn locks the state again.
            drop(io);
            drop(turn);
        }
        Ok(self
            .refresh()?
            .expect("a store that has not seen the file reads it"))
    }

    /// The in-memory checkpoint.
    pub fn mem(&self) -> MutexGuard<'_, Mem> {
        lock(&self.mem)
    }

    /// Announces that this call will change the memory and commit: a commit in progress
    /// meanwhile waits a little for it (group commit). Take it before the work that precedes
    /// the change (claim GETs, file writes) and commit through it; take it only once the call
    /// holds whatever another committing call might be waiting for (its claims' locks), or
    /// that call's commit waits the full [`GATHER_AT_MOST`] for nothing.
    pub fn will_commit(self: &Arc<Self>) -> WillCommit {
        lock(&self.mem).coming += 1;
        WillCommit {
            store: self.clone(),
            done: false,
        }
    }

    /// Makes `version` (and whatever else the memory holds by now) durable: one write and one
    /// flush, or none when a commit that began after `version` already did it.
    pub fn commit(&self, version: u64) -> Result<(), CheckpointError> {
        self.commit_gathering(version, 0)
    }

    /// [`Store::commit`] by a caller whose own `own` announcements are still counted: the
    /// gather waits only for the others.
    fn commit_gathering(&self, version: u64, own: usize) -> Result<(), CheckpointError> {
        // Durable already, or made durable by the flush this call waited for.
        let Some((turn, io)) = self.io_turn(Some(version), true) else {
            return Ok(());
        };
        drop(io);
        let (bytes, latest) = {
            let deadline = Instant::now() + self.gather_at_most;
            let mut mem = lock(&self.mem);
            while mem.coming > own {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                mem = self
                    .arrived
                    .wait_timeout(mem, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            (encode_for(&self.state_dir, &mem.checkpoint)?, mem.version)
        };
        let written = write_bytes_flushed(&self.state_dir, bytes)?;
        turn.finish(latest, Some(written));
        Ok(())
    }
}

/// The I/O turn of one commit or read; dropping it unfinished (an error) hands the turn on
/// with nothing made durable, so the next waiter whose version is not covered tries itself.
struct IoTurn<'a> {
    store: &'a Store,
}

impl IoTurn<'_> {
    /// `version` is on disk, as the file `seen`.
    fn finish(self, version: u64, seen: Option<FileId>) {
        let mut io = lock(&self.store.io);
        self.store.durable.fetch_max(version, Ordering::Release);
        io.seen = Some(seen);
    }
}

impl Drop for IoTurn<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut io = lock(&self.store.io);
            io.busy = false;
            std::mem::take(&mut io.waiters)
        };
        for waiter in waiters {
            waiter.unpark();
        }
    }
}
