//! The checkpoint of one process, in memory, and its group commit ([`Store`]): the file is
//! read once, re-read only when another process replaced it, and each change is made durable
//! with one flush shared by every call that changed the memory meanwhile.

use super::{
    Checkpoint, CheckpointError, FileId, LoadOutcome, checkpoint_path, encode_for, load,
    write_bytes_flushed,
};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a commit waits for calls that are between their change and their commit (writing
/// their claim files) so that one flush covers them too. Only a call with such siblings
/// waits; a lone call never does.
const GATHER_AT_MOST: Duration = Duration::from_millis(2);

/// The checkpoint of one process, in memory, and its group commit.
///
/// Changes are made to [`Mem`] under its lock (short, no I/O), each returning a version; then
/// [`Store::commit`] makes that version durable. Commits queue on one I/O lock: the first in
/// line waits (at most [`GATHER_AT_MOST`]) for the calls that announced a commit with
/// [`Store::will_commit`] and have not reached it yet, then writes whatever the memory holds,
/// with one flush, and every caller whose version that covered returns without writing. So N
/// concurrent calls cost between 1 and N flushes, never more than one each, and none waits on
/// another's apiserver GET.
pub struct Store {
    state_dir: PathBuf,
    mem: Mutex<Mem>,
    /// Signalled when a call announced with `will_commit` reaches its commit (or gives up).
    arrived: Condvar,
    io: Mutex<IoState>,
}

/// A call's announcement that it will commit; reaching [`Store::commit`] (or dropping it)
/// withdraws it.
pub struct WillCommit<'a> {
    store: &'a Store,
    done: bool,
}

impl WillCommit<'_> {
    /// Makes `version` durable (see [`Store::commit`]).
    pub fn commit(mut self, version: u64) -> Result<(), CheckpointError> {
        self.withdraw();
        self.store.commit(version)
    }

    fn withdraw(&mut self) {
        if !self.done {
            self.done = true;
            lock(&self.store.mem).coming -= 1;
            self.store.arrived.notify_all();
        }
    }
}

impl Drop for WillCommit<'_> {
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
    /// The newest version on disk (flushed).
    durable: u64,
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
                durable: 0,
                seen: None,
            }),
        }
    }

    /// Reads the file into memory the first time, and again only when another process
    /// replaced it since (one `statx` otherwise). Returns how loading went when it read.
    ///
    /// Reading replaces the memory, so it must not happen while this process has changes in
    /// flight: another writer is only ever active between this process's calls (the
    /// serialize flock of rolling updates), and a commit of ours in progress means a call of
    /// ours is running, so then there is nothing to check and no call waits on the flush.
    pub fn refresh(&self) -> Result<Option<LoadOutcome>, CheckpointError> {
        let mut io = match self.io.try_lock() {
            Ok(io) => io,
            Err(std::sync::TryLockError::WouldBlock) if self.loaded() => return Ok(None),
            Err(_) => lock(&self.io),
        };
        let path = checkpoint_path(&self.state_dir);
        if io.seen == Some(FileId::current(&path)?) {
            return Ok(None);
        }
        let (checkpoint, outcome) = load(&self.state_dir)?;
        // Loading may have set a bad file aside.
        let seen = FileId::current(&path)?;
        let mut mem = lock(&self.mem);
        mem.checkpoint = checkpoint;
        io.durable = mem.changed();
        io.seen = Some(seen);
        Ok(Some(outcome))
    }

    fn loaded(&self) -> bool {
        lock(&self.mem).version > 0
    }

    /// Reads the file whether or not it changed (start-up recovery reports how it went).
    pub fn reload(&self) -> Result<LoadOutcome, CheckpointError> {
        lock(&self.io).seen = None;
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
    /// the change (file writes), commit through it.
    pub fn will_commit(&self) -> WillCommit<'_> {
        lock(&self.mem).coming += 1;
        WillCommit {
            store: self,
            done: false,
        }
    }

    /// Makes `version` (and whatever else the memory holds by now) durable: one write and one
    /// flush, or none when a commit that began after `version` already did it.
    pub fn commit(&self, version: u64) -> Result<(), CheckpointError> {
        let mut io = lock(&self.io);
        if io.durable >= version {
            return Ok(());
        }
        let (bytes, latest) = {
            let deadline = Instant::now() + GATHER_AT_MOST;
            let mut mem = lock(&self.mem);
            while mem.coming > 0 {
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
        io.seen = Some(Some(written));
        io.durable = latest;
        Ok(())
    }
}
