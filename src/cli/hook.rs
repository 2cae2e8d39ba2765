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
use std::str::FromStr;
use std::time::Duration;

/// Name of the subdirectory of the state directory that holds per-claim files.
const CLAIMS_SUBDIR: &str = "claims";

#[derive(Args, Debug)]
pub struct HookArgs {
    #[command(subcommand)]
    pub command: HookCommand,
}

#[derive(Subcommand, Debug)]
pub enum HookCommand {
    /// Move the claim's NICs into the container's network namespace (OCI createRuntime).
    Attach(AttachArgs),
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
    pub interfaces: Vec<InterfaceSpec>,
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

/// One `--interface host=eth1:pod=rdma0` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec(pub InterfaceRequest);

impl FromStr for InterfaceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut host = None;
        let mut pod = None;
        for part in s.split(':') {
            match part.split_once('=') {
                Some(("host", v)) => host = Some(v),
                Some(("pod", v)) => pod = Some(v),
                _ => return Err(format!("{s:?}: expected host=<ifname>:pod=<ifname>")),
            }
        }
        match (host, pod) {
            (Some(host), Some(pod)) => {
                for name in [host, pod] {
                    crate::netattach::validate_ifname(name).map_err(|e| e.to_string())?;
                }
                Ok(Self(InterfaceRequest {
                    host_name: host.to_string(),
                    pod_name: pod.to_string(),
                }))
            }
            _ => Err(format!("{s:?}: both host= and pod= are required")),
        }
    }
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
    }
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
    let claim_dir = claim_dir(&args.state_dir, &args.claim_uid);
    let host = Netns::open(&args.host_netns)?;
    let requests: Vec<InterfaceRequest> = args.interfaces.iter().map(|i| i.0.clone()).collect();
    let guards = Guards {
        node_ip: args.node_ip,
    };
    attach_recorded(
        &claim_dir,
        &host,
        &args.proc_root,
        pid,
        &requests,
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

/// `state_dir/claims/<uid>`, the directory claim preparation owns for the claim.
pub fn claim_dir(state_dir: &Path, claim_uid: &str) -> PathBuf {
    state_dir.join(CLAIMS_SUBDIR).join(claim_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_specs_parse_and_validate() {
        let spec: InterfaceSpec = "host=eth1:pod=rdma0".parse().unwrap();
        assert_eq!(spec.0.host_name, "eth1");
        assert_eq!(spec.0.pod_name, "rdma0");
        assert!("host=eth1".parse::<InterfaceSpec>().is_err());
        assert!("host=eth1:pod=a/b".parse::<InterfaceSpec>().is_err());
        assert!("eth1:rdma0".parse::<InterfaceSpec>().is_err());
    }
}
