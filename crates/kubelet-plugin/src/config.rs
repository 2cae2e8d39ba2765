//! What the kubelet-facing server needs to know: the driver and node, where the kubelet's
//! directories are, rolling-update identity, and how often it re-checks and reports.

use std::path::PathBuf;
use std::time::Duration;

use super::sockets::{DEFAULT_KUBELET_PLUGINS_DIR, DEFAULT_KUBELET_REGISTRY_DIR, SocketPaths};

/// Everything [`start`](crate::start) needs besides the driver: start from
/// [`PluginConfig::new`] and change what differs.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// The driver name (a DNS subdomain): the kubelet matches it to the `driver` of allocated
    /// devices, and it names the sockets.
    pub driver_name: String,
    /// Also the pool name of our ResourceSlices, so health reports name devices the way the
    /// kubelet knows them.
    pub node_name: String,
    /// The directory the kubelet's plugin watcher watches for registration sockets
    /// (`<kubelet root>/plugins_registry`).
    pub registry_dir: PathBuf,
    /// The parent of the plugin's own directory, which holds the DRA socket
    /// (`<kubelet root>/plugins`).
    pub plugins_dir: PathBuf,
    /// Set in rolling-update mode: per-pod socket names and a filesystem lock.
    pub pod_uid: Option<String>,
    /// How often the registration socket's existence is checked (the kubelet wipes its
    /// registry directory when it restarts, which silently deregisters us).
    pub registration_check_interval: Duration,
    /// How often the health stream repeats the device list when nothing changed.
    pub health_report_interval: Duration,
    /// How often a warning repeats while the kubelet has not registered this instance.
    pub registration_warn_interval: Duration,
}

impl PluginConfig {
    /// The kubelet's default directories and timings for driver `driver_name` (a DNS
    /// subdomain, e.g. `gpu.example.com`) on node `node_name`.
    pub fn new(driver_name: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self {
            driver_name: driver_name.into(),
            node_name: node_name.into(),
            registry_dir: PathBuf::from(DEFAULT_KUBELET_REGISTRY_DIR),
            plugins_dir: PathBuf::from(DEFAULT_KUBELET_PLUGINS_DIR),
            pod_uid: None,
            registration_check_interval: Duration::from_secs(5),
            health_report_interval: Duration::from_secs(30),
            registration_warn_interval: Duration::from_secs(60),
        }
    }

    /// Where the sockets (and, in rolling-update mode, the lock file) go, as given: relative
    /// directories stay relative here.
    pub fn socket_paths(&self) -> SocketPaths {
        SocketPaths::new(
            &self.driver_name,
            &self.registry_dir,
            &self.plugins_dir,
            self.pod_uid.as_deref(),
        )
    }
}
