//! A node whose claim preparation and kubelet-facing gRPC service run inside the test process:
//! the dgx-h100 fixture machine in a scratch directory, a preparer on the apiserver fake (or a
//! client the test hands in) and the DRA and registration sockets served from that directory.

use std::path::PathBuf;
use std::sync::Arc;

use tandem::apiserver_fake::FakeApiServer;
use tandem::fixture;
use tandem::names;
use tandem::prepare::{PrepareConfig, Preparer};
use tandem::sysfs::discover;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_v1::dra_plugin_client::DraPluginClient;
use tandem_kubelet_plugin::{PluginConfig, RunningPlugin};
use tempfile::TempDir;
use tokio::sync::watch;
use tonic::transport::Channel;

pub struct InProcessNode {
    /// The scratch directory: fixture machine, kubelet sockets, and by default CDI and state.
    pub dir: TempDir,
    pub apiserver: FakeApiServer,
    pub inventory: Arc<Inventory>,
    #[allow(
        dead_code,
        reason = "hostile_input drives the preparer only through the plugin"
    )]
    pub preparer: Arc<Preparer>,
    pub plugin: RunningPlugin,
    pub cdi_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Held so the plugin's inventory watch stays open: the inventory never changes here.
    _inventory_tx: watch::Sender<Arc<Inventory>>,
}

impl InProcessNode {
    /// `node` with its CDI and state directories in a fresh scratch directory.
    pub async fn start(node: &str) -> InProcessNode {
        let dir = fixture::scratch_dir().unwrap();
        let cdi_dir = dir.path().join("cdi");
        let state_dir = dir.path().join("state");
        Self::start_with(node, dir, cdi_dir, state_dir, None).await
    }

    /// `node` in `dir` with the given CDI and state directories, whose preparer talks to
    /// `client` (default: the fake apiserver's). The checkpoint is recovered before serving,
    /// as the plugin does at start-up.
    pub async fn start_with(
        node: &str,
        dir: TempDir,
        cdi_dir: PathBuf,
        state_dir: PathBuf,
        client: Option<kube::Client>,
    ) -> InProcessNode {
        let roots = fixture::write_machine(
            &fixture::builtin("dgx-h100").unwrap(),
            &dir.path().join("machine"),
        )
        .unwrap();
        let inventory = Arc::new(discover(&roots).unwrap());
        let (inventory_tx, _) = watch::channel(inventory.clone());
        let apiserver = FakeApiServer::start().await.unwrap();
        let mut prepare_config = PrepareConfig::new(names::DEFAULT_DRIVER_NAME, node);
        prepare_config.cdi_dir = cdi_dir.clone();
        prepare_config.state_dir = state_dir.clone();
        prepare_config.topology_dir = dir.path().join("run");
        prepare_config.proc_root = roots.proc.clone();
        let client = client.unwrap_or_else(|| apiserver.client());
        let preparer =
            Arc::new(Preparer::new(prepare_config, client, inventory_tx.subscribe()).unwrap());
        preparer.recover().await.unwrap();
        let mut config = PluginConfig::new(tandem::names::DEFAULT_DRIVER_NAME, node);
        config.registry_dir = dir.path().join("plugins_registry");
        config.plugins_dir = dir.path().join("plugins");
        let plugin = tandem::plugin::start(&config, preparer.clone(), inventory_tx.subscribe())
            .await
            .unwrap();
        InProcessNode {
            dir,
            apiserver,
            inventory,
            preparer,
            plugin,
            cdi_dir,
            state_dir,
            _inventory_tx: inventory_tx,
        }
    }

    /// A kubelet-side client on the DRA socket.
    pub async fn client(&self) -> DraPluginClient<Channel> {
        DraPluginClient::new(unix_channel(&self.plugin.paths().dra).await.unwrap())
    }
}
