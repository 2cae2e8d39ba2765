//! `tandem hook attach`: the OCI `createRuntime` hook that a claim's CDI spec names. It reads
//! the container state from stdin, finds the pod's network namespace from the pid and moves
//! the claim's exclusive NICs into it, recording each step in the claim's state directory.

use crate::netattach::record::{InterfaceRequest, attach_recorded};
use crate::netattach::{DEFAULT_NETLINK_TIMEOUT, Guards, Netns};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct HookArgs {
    #[command(subcommand)]
    pub command: HookCommand,
}

#[derive(Subcommand, Debug)]
pub enum HookCommand {
    /// Move the claim's NICs into the container's network namespace (OCI createRuntime).
    Attach(AttachArgs),
    /// Copy this binary to the host path that CDI specs name (a DaemonSet init container).
    Install(InstallArgs),
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Destination file, e.g. `/opt/tandem/bin/tandem` on a hostPath mounted at that path.
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// UID of the ResourceClaim; names the state subdirectory the record goes to.
    #[arg(long)]
    pub claim_uid: String,
    /// The plugin's state directory (`/var/lib/tandem`).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// `host=<ifname>:pod=<ifname>`, once per NIC.
    #[arg(long = "interface", required = true)]
    pub interfaces: Vec<InterfaceRequest>,
    /// procfs root, for `/proc/<pid>/ns/net`.
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// The namespace the NICs live in when not attached; the runtime runs hooks in it.
    #[arg(long, default_value = "/proc/self/ns/net")]
    pub host_netns: PathBuf,
    /// Refuse to move the interface holding this address (the Kubernetes node IP).
    #[arg(long)]
    pub node_ip: Option<IpAddr>,
    /// Upper bound on each netlink request, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_NETLINK_TIMEOUT.as_millis() as u64)]
    pub timeout_ms: u64,
}

/// The fields of the OCI runtime state the hook needs.
#[derive(Debug, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub pid: Option<u32>,
}

pub fn run(args: HookArgs) -> anyhow::Result<()> {
    match args.command {
        HookCommand::Attach(args) => {
            let mut stdin = String::new();
            std::io::stdin()
                .read_to_string(&mut stdin)
                .context("reading the OCI container state from stdin")?;
            attach(&args, &stdin)
        }
        HookCommand::Install(args) => {
            let source = std::env::current_exe().context("locating the running binary")?;
            install(&source, &args.to)
        }
    }
}

/// Copies `source` to `to` through a temp file and a rename: a runtime starting a container
/// at that moment runs either the old binary or the new one, never half of one. The rename
/// also works while the old file is being executed, where writing over it would fail
/// (ETXTBSY).
pub fn install(source: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .with_context(|| format!("--to {} has no parent directory", to.display()))?;
    crate::fsutil::ensure_dir(dir, 0o755).with_context(|| format!("creating {}", dir.display()))?;
    crate::fsutil::write_atomic(to, &bytes, 0o755)
        .with_context(|| format!("installing the hook binary at {}", to.display()))?;
    tracing::info!(path = %to.display(), bytes = bytes.len(), "hook binary installed");
    Ok(())
}

/// The hook's work, with the container state passed in rather than read from stdin.
pub fn attach(args: &AttachArgs, state_json: &str) -> anyhow::Result<()> {
    let state: ContainerState =
        serde_json::from_str(state_json).context("parsing the OCI container state from stdin")?;
    let Some(pid) = state.pid.filter(|p| *p > 0) else {
        bail!(
            "container {}: the OCI state has no pid; the hook must run at createRuntime",
            state.id
        );
    };
    if args.claim_uid.is_empty() || args.claim_uid.contains('/') || args.claim_uid.starts_with('.')
    {
        bail!("invalid --claim-uid {:?}", args.claim_uid);
    }
    let claim_dir = crate::prepare::claim_state_dir(&args.state_dir, &args.claim_uid);
    let host = Netns::open(&args.host_netns)?;
    let requests = &args.interfaces;
    let guards = Guards {
        node_ip: args.node_ip,
    };
    attach_recorded(
        &claim_dir,
        &host,
        &args.proc_root,
        pid,
        requests,
        &guards,
        Duration::from_millis(args.timeout_ms),
    )
    .with_context(|| {
        format!(
            "claim {}: attaching NICs to container {} (pid {pid})",
            args.claim_uid, state.id
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn install_copies_an_executable_and_replaces_an_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("tandem-new");
        std::fs::write(&source, b"#!/bin/sh\necho new\n").unwrap();
        let to = dir.path().join("opt/tandem/bin/tandem");
        install(&source, &to).unwrap();
        std::fs::write(&source, b"#!/bin/sh\necho newer\n").unwrap();
        install(&source, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"#!/bin/sh\necho newer\n");
        let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        let leftovers: Vec<_> = std::fs::read_dir(to.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["tandem"], "temp files left behind");
        let err = install(&dir.path().join("missing"), &to).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }
}
