//! Where the machine's sysfs, procfs and devfs live. Every host path Tandem reads is joined
//! onto one of these roots, so tests and `tandem fixture` trees stand in for the real machine.

use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineRoots {
    pub sys: PathBuf,
    pub proc: PathBuf,
    pub dev: PathBuf,
}

impl MachineRoots {
    /// The real machine: `/sys`, `/proc`, `/dev`.
    pub fn host() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
        }
    }

    /// The layout `tandem fixture NAME --out DIR` writes: `DIR/sys`, `DIR/proc`, `DIR/dev`.
    pub fn under(dir: &Path) -> Self {
        Self {
            sys: dir.join("sys"),
            proc: dir.join("proc"),
            dev: dir.join("dev"),
        }
    }
}
