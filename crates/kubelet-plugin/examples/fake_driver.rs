//! A complete DRA driver with one fake device, `fake-0`, served to the kubelet with
//! `tandem-kubelet-plugin`.
//!
//! Preparing a claim hands the claim the fake device under the CDI device ID
//! `example.com/fake=<claim uid>`; the driver keeps prepared claims in memory, so a repeated
//! prepare (a kubelet retry) gets the same answer, and unprepare forgets the claim. The device
//! always reports healthy.
//!
//! ```text
//! cargo run -p tandem-kubelet-plugin --example fake_driver -- \
//!     --node-name node-a \
//!     --kubelet-registry-dir /tmp/fake/plugins_registry \
//!     --kubelet-plugins-dir /tmp/fake/plugins
//! ```
//!
//! Without the directory options it serves where a kubelet looks (`/var/lib/kubelet/...`,
//! which needs root). `NODE_NAME`, `KUBELET_REGISTRY_DIR` and `KUBELET_PLUGINS_DIR` set the same
//! as the options; options win. It serves until Ctrl-C or SIGTERM, then shuts down gracefully:
//! deregisters, lets calls in flight finish and removes its sockets.
//!
//! What a real driver adds: it reads the claim's allocation from the apiserver
//! (`claim::fetch_claim`, `claim::our_allocation`) for the devices and request names, writes
//! the CDI spec that its CDI device IDs name, and publishes its devices in ResourceSlices
//! (`Publisher`), so the scheduler can allocate them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tandem_kubelet_plugin::claim::validate_claim_uid;
use tandem_kubelet_plugin::sockets::{DEFAULT_KUBELET_PLUGINS_DIR, DEFAULT_KUBELET_REGISTRY_DIR};
use tandem_kubelet_plugin::{
    ClaimError, ClaimRef, DeviceHealthFeed, DeviceState, Driver, PluginConfig, PreparedDevice,
    RunningPlugin, ServeError,
};
use tokio::sync::Mutex;

/// The driver name: what DeviceClasses select and ResourceSlices carry.
pub const DRIVER_NAME: &str = "fake.example.com";
/// The only device of this driver, in the pool named after the node.
pub const DEVICE_NAME: &str = "fake-0";
/// CDI vendor and class of the device IDs this driver hands out (`<kind>=<claim uid>`).
pub const CDI_KIND: &str = "example.com/fake";

/// Why a claim could not be prepared or unprepared; its text is what the kubelet shows in the
/// pod's events.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// The kubelet sent a claim UID that is not a Kubernetes UID, so it cannot be part of a
    /// CDI device name.
    #[error(transparent)]
    InvalidClaim(#[from] ClaimError),
}

/// The driver: one fake device, and the claims prepared on it.
#[derive(Debug)]
pub struct FakeDriver {
    node_name: String,
    /// Prepared claims by UID, with what their prepare returned.
    prepared: Mutex<BTreeMap<String, Vec<PreparedDevice>>>,
}

impl FakeDriver {
    /// A driver on node `node_name`, whose name is also the device's pool.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            prepared: Mutex::new(BTreeMap::new()),
        }
    }

    /// UIDs of the claims prepared now.
    pub async fn prepared_claims(&self) -> Vec<String> {
        self.prepared.lock().await.keys().cloned().collect()
    }

    /// The device as prepared for `claim`.
    fn device_for(&self, claim: &ClaimRef) -> PreparedDevice {
        PreparedDevice {
            // A real driver reports the allocation's request names; this one reads no
            // allocation and names none, which stands for every request of the claim.
            request_names: Vec::new(),
            pool_name: self.node_name.clone(),
            device_name: DEVICE_NAME.to_string(),
            cdi_device_ids: vec![format!("{CDI_KIND}={}", claim.uid)],
            share_id: None,
        }
    }
}

impl Driver for FakeDriver {
    type Error = FakeError;

    async fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, FakeError>> {
        let mut prepared = self.prepared.lock().await;
        claims
            .iter()
            .map(|claim| {
                let result = validate_claim_uid(claim)
                    .map_err(FakeError::from)
                    .map(|()| {
                        prepared
                            .entry(claim.uid.clone())
                            .or_insert_with(|| vec![self.device_for(claim)])
                            .clone()
                    });
                (claim.uid.clone(), result)
            })
            .collect()
    }

    async fn unprepare(&self, claims: &[ClaimRef]) -> BTreeMap<String, Result<(), FakeError>> {
        let mut prepared = self.prepared.lock().await;
        claims
            .iter()
            .map(|claim| {
                // A claim that is not prepared (any more) is fine: the kubelet retries
                // unprepare after a lost answer.
                let result = validate_claim_uid(claim)
                    .map_err(FakeError::from)
                    .map(|()| {
                        prepared.remove(&claim.uid);
                    });
                (claim.uid.clone(), result)
            })
            .collect()
    }
}

/// The health stream's source: `fake-0`, healthy, for good.
pub fn health_feed() -> DeviceHealthFeed<Vec<DeviceState>> {
    DeviceHealthFeed::fixed(vec![DeviceState {
        device_name: DEVICE_NAME.to_string(),
        problem: None,
    }])
}

/// Where to serve: the node and the kubelet's directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// This node's name (`--node-name` or `NODE_NAME`); also the device's pool.
    pub node_name: String,
    /// Where the kubelet's plugin watcher looks for registration sockets.
    pub registry_dir: PathBuf,
    /// Where the plugin's own directory and DRA socket go.
    pub plugins_dir: PathBuf,
}

/// The command line could not be understood.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0}\nusage: fake_driver [--node-name NAME] [--kubelet-registry-dir DIR] [--kubelet-plugins-dir DIR]"
)]
pub struct UsageError(String);

impl Options {
    /// Reads `args` (without the program name), falling back to `env` and then to the
    /// kubelet's default directories. The node name has no default.
    pub fn parse(
        args: impl IntoIterator<Item = OsString>,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, UsageError> {
        let mut node_name = env("NODE_NAME");
        let mut registry_dir = env("KUBELET_REGISTRY_DIR");
        let mut plugins_dir = env("KUBELET_PLUGINS_DIR");
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let slot = match arg.to_str() {
                Some("--node-name") => &mut node_name,
                Some("--kubelet-registry-dir") => &mut registry_dir,
                Some("--kubelet-plugins-dir") => &mut plugins_dir,
                _ => return Err(UsageError(format!("unknown argument {arg:?}"))),
            };
            let value = args
                .next()
                .ok_or_else(|| UsageError(format!("{arg:?} needs a value")))?;
            *slot = Some(value);
        }
        let node_name = node_name
            .filter(|name| !name.is_empty())
            .ok_or_else(|| {
                UsageError("the node name is required (--node-name or NODE_NAME)".into())
            })?
            .into_string()
            .map_err(|name| UsageError(format!("node name {name:?} is not UTF-8")))?;
        Ok(Self {
            node_name,
            registry_dir: registry_dir
                .map_or_else(|| DEFAULT_KUBELET_REGISTRY_DIR.into(), PathBuf::from),
            plugins_dir: plugins_dir
                .map_or_else(|| DEFAULT_KUBELET_PLUGINS_DIR.into(), PathBuf::from),
        })
    }

    /// The plugin configuration for these options.
    pub fn config(&self) -> PluginConfig {
        let mut config = PluginConfig::new(DRIVER_NAME, &self.node_name);
        config.registry_dir = self.registry_dir.clone();
        config.plugins_dir = self.plugins_dir.clone();
        config
    }
}

/// Binds the sockets and serves `driver` and the fake device's health until shut down.
pub async fn serve(
    config: &PluginConfig,
    driver: Arc<FakeDriver>,
) -> Result<RunningPlugin, ServeError> {
    tandem_kubelet_plugin::start(config, driver, health_feed()).await
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, the signal the kubelet's pod shutdown sends.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted,
        _ = terminate.recv() => Ok(()),
    }
}

/// Serves the fake driver as `options` say until Ctrl-C or SIGTERM, then shuts down
/// gracefully; returns early if the server fails.
pub async fn run(options: &Options) -> Result<(), ServeError> {
    let config = options.config();
    let plugin = serve(&config, Arc::new(FakeDriver::new(&options.node_name))).await?;
    eprintln!(
        "{DRIVER_NAME}: serving {DEVICE_NAME} on node {}: registration {}, DRA {}",
        options.node_name,
        plugin.paths().registration.display(),
        plugin.paths().dra.display()
    );
    // Waiting on the plugin, not on the signal, also ends the process when the server fails.
    let shutdown = plugin.shutdown_token();
    tokio::spawn(async move {
        if let Err(e) = shutdown_signal().await {
            eprintln!("{DRIVER_NAME}: cannot wait for signals ({e}); shutting down");
        }
        shutdown.cancel();
    });
    plugin.wait().await?;
    eprintln!("{DRIVER_NAME}: shut down, sockets removed");
    Ok(())
}

#[allow(dead_code)] // unused where a test includes this file as a module
#[tokio::main]
async fn main() -> ExitCode {
    let options = match Options::parse(std::env::args_os().skip(1), |name: &str| {
        std::env::var_os(name)
    }) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{DRIVER_NAME}: {e}");
            ExitCode::FAILURE
        }
    }
}
