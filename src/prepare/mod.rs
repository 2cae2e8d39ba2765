//! Claim preparation: turns an allocated ResourceClaim into a CDI spec, container environment
//! and a mounted per-claim topology file, with every step recorded in an on-disk checkpoint so
//! that a crash at any point is rolled back on the next start. The kubelet gRPC server calls
//! [`Preparer`]; everything here works on files and the apiserver, never on sockets.

pub mod cdi;
pub mod checkpoint;
pub mod config;
pub mod driver_root;
pub mod env;
mod error;
pub mod plan;
mod preparer;
pub mod topology_file;
pub mod vendor_cdi;

pub use crate::fsutil::flush_count;
pub use crate::netattach::record::{CLAIMS_SUBDIR, claim_state_dir};
pub use error::PrepareError;
pub use preparer::{ClaimAttachments, NetattachReport, Preparer, RecoveryReport};
pub use tandem_kubelet_plugin::{ClaimRef, PreparedDevice};

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;

/// A prepared device as the checkpoint keeps it: what the kubelet got, plus what decides
/// whether another claim may hold the same device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedDevice {
    #[serde(flatten)]
    pub device: PreparedDevice,
    #[serde(default)]
    pub admin_access: bool,
}

/// Where the claims' topology files go by default: tmpfs on a systemd host.
pub const DEFAULT_TOPOLOGY_DIR: &str = "/var/run/tandem";

/// Where preparation writes and what it calls itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareConfig {
    /// The DRA driver name (`tandem.dev`); also the CDI vendor.
    pub driver_name: String,
    /// This node's name, which is also the pool name of its devices.
    pub node_name: String,
    /// Where CDI specs go (`/var/run/cdi`); the runtime reads them from the same path.
    pub cdi_dir: PathBuf,
    /// The checkpoint and per-claim records (hook records, older topology files): on disk,
    /// to survive restarts.
    pub state_dir: PathBuf,
    /// The claims' topology files (`<uid>.topology.json`), which CDI bind-mounts into
    /// containers: a tmpfs directory (`/var/run/tandem`), the same path on the host. A reboot
    /// empties it, and the kubelet prepares every claim again after one.
    pub topology_dir: PathBuf,
    /// Where device nodes appear in containers (`/dev`).
    pub dev_root_in_container: PathBuf,
    /// Host path of the `tandem` binary that runtimes run as the `tandem hook attach` OCI
    /// hook. When set, NICs allocated in a claim (unless `nicAttach` says otherwise) get a
    /// `createRuntime` hook that moves their netdev into the pod; when unset, NICs hand out
    /// RDMA char devices only. Unprepare releases what the hook recorded either way.
    pub hook_path: Option<PathBuf>,
    /// How exclusively attached NICs reach the pod: the hook above, or CDI `netDevices`.
    pub netdev_attach: NetdevAttach,
    /// The Kubernetes node IP, passed to the hook so the interface holding it never moves.
    pub node_ip: Option<IpAddr>,
    /// procfs root (`/proc`), for the boot ID.
    pub proc_root: PathBuf,
    /// Where released interfaces go back to: the plugin's own network namespace, which is
    /// the host's because the DaemonSet runs with hostNetwork.
    pub host_netns: PathBuf,
    /// The real procfs (`/proc`, never a fixture), to find a pod's namespace by pid.
    pub netns_proc_root: PathBuf,
    /// Where runtimes pin pod network namespaces (`/run/netns`).
    pub run_netns_dir: PathBuf,
    /// Directories of other vendors' CDI specs (`/etc/cdi`, `/var/run/cdi`), read only, to
    /// list a GPU's vendor device before ours. Empty: none read.
    pub vendor_cdi_dirs: Vec<PathBuf>,
    /// The GPU driver's libraries and binaries to mount into containers of GPUs that have no
    /// vendor CDI device (`--gpu-driver-root`), checked at start-up.
    pub driver_root: Option<driver_root::DriverRoot>,
    /// `NVIDIA_VISIBLE_DEVICES=<uuids>` for nvidia-container-runtime in legacy mode.
    pub nvidia_legacy_env: bool,
}

/// Which CDI edit moves an exclusively attached NIC's netdev into the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetdevAttach {
    /// `createRuntime` hook `tandem hook attach` (needs `hook_path`): addresses, routes,
    /// rules and RDMA device move along, the claim status is written, release restores all.
    #[default]
    Hook,
    /// CDI 1.1 `netDevices`: the runtime moves the interface (containerd 2.2+ with a
    /// runtime implementing runtime-spec `linux.netDevices`).
    Cdi,
}

impl std::str::FromStr for NetdevAttach {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hook" => Ok(Self::Hook),
            "cdi" => Ok(Self::Cdi),
            other => Err(format!("{other:?}: expected \"hook\" or \"cdi\"")),
        }
    }
}

impl PrepareConfig {
    /// The defaults a DaemonSet pod uses: `/var/run/cdi`, `/var/lib/tandem`,
    /// `/var/run/tandem`, `/dev`, `/proc`, no hook, no vendor specs, no driver root.
    pub fn new(driver_name: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self {
            driver_name: driver_name.into(),
            node_name: node_name.into(),
            cdi_dir: PathBuf::from("/var/run/cdi"),
            state_dir: PathBuf::from("/var/lib/tandem"),
            topology_dir: PathBuf::from(DEFAULT_TOPOLOGY_DIR),
            dev_root_in_container: PathBuf::from("/dev"),
            hook_path: None,
            netdev_attach: NetdevAttach::Hook,
            node_ip: None,
            proc_root: PathBuf::from("/proc"),
            host_netns: PathBuf::from("/proc/self/ns/net"),
            netns_proc_root: PathBuf::from("/proc"),
            run_netns_dir: PathBuf::from(crate::netattach::record::RUN_NETNS_DIR),
            vendor_cdi_dirs: Vec::new(),
            driver_root: None,
            nvidia_legacy_env: false,
        }
    }
}
