//! The real `tandem plugin` binary in a scratch directory, driven the way the kubelet drives
//! it: the fixture machine, kubeconfig, kubelet sockets, CDI and state directories laid out in
//! one place, the process spawned and respawned there, and one-claim prepare/unprepare calls.

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[path = "plugin_process.rs"]
mod plugin_process;

use plugin_process::plugin_command;
use tandem::apiserver_fake::FakeApiServer;
use tandem::fixture;
use tandem::sysfs::MachineRoots;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodeUnprepareResourcesRequest,
    dra_plugin_client::DraPluginClient,
};
use tempfile::TempDir;
use tokio::process::Child;
use tonic::transport::Channel;

/// One plugin's world on disk, kept across the plugin's restarts; removed when dropped.
pub struct PluginLayout {
    dir: TempDir,
    node: String,
    roots: MachineRoots,
    kubeconfig: PathBuf,
}

impl PluginLayout {
    /// A fresh scratch directory holding the builtin `fixture_name` machine and a kubeconfig
    /// for `apiserver`, for a plugin serving `node`.
    pub fn create(node: &str, fixture_name: &str, apiserver: &FakeApiServer) -> PluginLayout {
        let dir = tempfile::tempdir().unwrap();
        let roots = fixture::write_machine(
            &fixture::builtin(fixture_name).unwrap(),
            &dir.path().join("machine"),
        )
        .unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        apiserver.write_kubeconfig(&kubeconfig).unwrap();
        PluginLayout {
            dir,
            node: node.to_string(),
            roots,
            kubeconfig,
        }
    }

    /// Where the fixture machine's sysfs, procfs and devfs are.
    pub fn roots(&self) -> &MachineRoots {
        &self.roots
    }

    pub fn dra_socket(&self) -> PathBuf {
        self.dir.path().join("plugins/tandem.dev/dra.sock")
    }

    #[allow(
        dead_code,
        reason = "only plugin_crash stops the plugin cleanly and checks this socket is gone"
    )]
    pub fn registration_socket(&self) -> PathBuf {
        self.dir.path().join("plugins_registry/tandem.dev-reg.sock")
    }

    /// Where [`Self::spawn_plugin`] appends the plugin's stderr.
    #[allow(dead_code, reason = "only kubelet_wire reads the plugin's log")]
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("plugin.log")
    }

    pub fn cdi_dir(&self) -> PathBuf {
        self.dir.path().join("cdi")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the plugin with `--rescan-period rescan_period` and `RUST_LOG=log_level`; its
    /// stderr is appended to `plugin.log`, so the log of every restart is kept for a failure.
    pub fn spawn_plugin(&self, rescan_period: &str, log_level: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        plugin_command(
            &self.node,
            self.dir.path(),
            &self.state_dir(),
            &self.roots,
            &self.kubeconfig,
        )
        .args(["--rescan-period", rescan_period])
        .env("RUST_LOG", log_level)
        .stderr(log)
        .spawn()
        .unwrap()
    }

    /// Connects once the plugin listens; a killed plugin leaves its socket file behind, so the
    /// file existing is not enough.
    pub async fn connect(&self) -> DraPluginClient<Channel> {
        let socket = self.dra_socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = unix_channel(&socket).await {
                return DraPluginClient::new(channel);
            }
            assert!(
                Instant::now() < deadline,
                "plugin did not come up on {}",
                socket.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The two calls the kubelet makes per claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Prepare,
    Unprepare,
}

impl Operation {
    /// What the kubelet may take the claim to be once the call succeeded.
    pub fn answered(self) -> Answered {
        match self {
            Operation::Prepare => Answered::Prepared,
            Operation::Unprepare => Answered::Unprepared,
        }
    }
}

/// What the plugin last told the kubelet about a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    Prepared,
    Unprepared,
    /// The call died with the process, or was refused or failed: nothing may be assumed, and
    /// the kubelet would retry.
    Unknown,
}

/// The plugin's answer for the one claim of a call.
pub struct ClaimAnswer {
    /// Empty when the claim succeeded.
    pub error: String,
    /// CDI devices handed back; always 0 for an unprepare.
    #[allow(dead_code, reason = "the soak counts errors only")]
    pub devices: usize,
}

/// `operation` on `claim` alone, as the kubelet calls per pod. Err when the RPC failed (the
/// plugin died under it); Ok(None) when the answer left the claim out.
pub async fn call_one(
    client: &mut DraPluginClient<Channel>,
    claim: &Claim,
    operation: Operation,
) -> Result<Option<ClaimAnswer>, tonic::Status> {
    let claims = vec![claim.clone()];
    let answer = match operation {
        Operation::Prepare => {
            let request = NodePrepareResourcesRequest { claims };
            let mut response = client.node_prepare_resources(request).await?.into_inner();
            response
                .claims
                .remove(&claim.uid)
                .map(|a| (a.error, a.devices.len()))
        }
        Operation::Unprepare => {
            let request = NodeUnprepareResourcesRequest { claims };
            let mut response = client.node_unprepare_resources(request).await?.into_inner();
            response.claims.remove(&claim.uid).map(|a| (a.error, 0))
        }
    };
    Ok(answer.map(|(error, devices)| ClaimAnswer { error, devices }))
}
