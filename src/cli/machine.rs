//! The discovery roots every node-side subcommand takes: `--sysfs-root`, `--proc-root`,
//! `--dev-root`, or a built-in fixture machine.

use crate::sysfs::MachineRoots;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct MachineArgs {
    /// Root of sysfs to read the machine from.
    #[arg(long, default_value = "/sys", env = "TANDEM_SYSFS_ROOT")]
    pub sysfs_root: PathBuf,
    /// Root of procfs to read the machine from.
    #[arg(long, default_value = "/proc", env = "TANDEM_PROC_ROOT")]
    pub proc_root: PathBuf,
    /// Root of devfs (device nodes), as the containers see it.
    #[arg(long, default_value = "/dev", env = "TANDEM_DEV_ROOT")]
    pub dev_root: PathBuf,
}

impl MachineArgs {
    pub fn roots(&self) -> MachineRoots {
        MachineRoots {
            sys: self.sysfs_root.clone(),
            proc: self.proc_root.clone(),
            dev: self.dev_root.clone(),
        }
    }
}
