//! The plugin as the kubelet sees it: a tonic client over the real Unix sockets talks to the
//! registration, DRA v1, DRA v1beta1 and health services, backed by the real claim preparer,
//! a fixture machine and the in-process apiserver.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem::apiserver_fake::FakeApiServer;
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::fixture;
use tandem::names;
use tandem::prepare::{PrepareConfig, Preparer, checkpoint};
use tandem::sysfs::discover;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_health_v1alpha1::{
    HealthStatus, NodeWatchResourcesRequest, dra_resource_health_client::DraResourceHealthClient,
};
use tandem_kubelet_plugin::proto::pluginregistration::{
    InfoRequest, registration_client::RegistrationClient,
};
use tandem_kubelet_plugin::proto::{dra_v1, dra_v1beta1};
use tandem_kubelet_plugin::{PluginConfig, RunningPlugin};
use tempfile::TempDir;
use tokio::sync::watch;

const NODE: &str = "node-a";
const NAMESPACE: &str = "team-a";

/// A node: a fixture machine, the apiserver stand-in and a running plugin, all in a tempdir.
struct Node {
    dir: TempDir,
    apiserver: FakeApiServer,
    inventory: Arc<Inventory>,
    inventory_tx: watch::Sender<Arc<Inventory>>,
    plugin: Option<RunningPlugin>,
    config: PluginConfig,
}

impl Node {
    async fn start(fixture_name: &str, pod_uid: Option<&str>) -> Node {
        let dir = fixture::scratch_dir().unwrap();
        let description = fixture::builtin(fixture_name).unwrap();
        let roots = fixture::write_machine(&description, &dir.path().join("machine")).unwrap();
        let inventory = Arc::new(discover(&roots).unwrap());
        let (inventory_tx, _) = watch::channel(inventory.clone());
        let apiserver = FakeApiServer::start().await.unwrap();
        let mut config = PluginConfig::new(tandem::names::DEFAULT_DRIVER_NAME, NODE);
        config.registry_dir = dir.path().join("plugins_registry");
        config.plugins_dir = dir.path().join("plugins");
        config.pod_uid = pod_uid.map(String::from);
        config.registration_check_interval = Duration::from_millis(50);
        let mut node = Node {
            dir,
            apiserver,
            inventory,
            inventory_tx,
            plugin: None,
            config,
        };
        node.start_plugin().await;
        node
    }

    fn cdi_dir(&self) -> PathBuf {
        self.dir.path().join("cdi")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    async fn start_plugin(&mut self) {
        let mut prepare_config = PrepareConfig::new(names::DEFAULT_DRIVER_NAME, NODE);
        prepare_config.cdi_dir = self.cdi_dir();
        prepare_config.state_dir = self.state_dir();
        prepare_config.topology_dir = self.dir.path().join("run");
        prepare_config.proc_root = self.dir.path().join("machine/proc");
        let preparer = Preparer::new(
            prepare_config,
            self.apiserver.client(),
            self.inventory_tx.subscribe(),
        )
        .unwrap();
        preparer.recover().await.unwrap();
        let plugin = tandem::plugin::start(
            &self.config,
            Arc::new(preparer),
            self.inventory_tx.subscribe(),
        )
        .await
        .unwrap();
        self.plugin = Some(plugin);
    }

    fn plugin(&self) -> &RunningPlugin {
        self.plugin.as_ref().unwrap()
    }

    async fn stop_plugin(&mut self) {
        self.plugin.take().unwrap().shutdown().await.unwrap();
    }

    async fn v1(&self) -> dra_v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
        let channel = unix_channel(&self.plugin().paths().dra).await.unwrap();
        dra_v1::dra_plugin_client::DraPluginClient::new(channel)
    }

    async fn v1beta1(
        &self,
    ) -> dra_v1beta1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
        let channel = unix_channel(&self.plugin().paths().dra).await.unwrap();
        dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel)
    }

    /// Creates `name` allocated to GPUs `gpus` and NICs `nics` (indexes into the inventory)
    /// and returns the kubelet's view of it.
    async fn claim(&self, name: &str, gpus: &[usize], nics: &[usize]) -> dra_v1::Claim {
        let rdma_nics: Vec<_> = self.inventory.nics.iter().filter(|n| n.is_rdma()).collect();
        let mut requests = vec![ClaimRequest {
            name: "gpus".into(),
            device_class: names::DEVICE_CLASS_GPU.into(),
            devices: gpus
                .iter()
                .map(|&i| {
                    names::accelerator_device_name(&self.inventory.accelerators[i].pci.address)
                })
                .collect(),
        }];
        if !nics.is_empty() {
            requests.push(ClaimRequest {
                name: "nics".into(),
                device_class: names::DEVICE_CLASS_NIC.into(),
                devices: nics
                    .iter()
                    .map(|&i| names::nic_device_name(&rdma_nics[i].pci.address))
                    .collect(),
            });
        }
        let created = create_allocated_claim(
            &self.apiserver.client(),
            NAMESPACE,
            name,
            names::DEFAULT_DRIVER_NAME,
            NODE,
            &requests,
        )
        .await
        .unwrap();
        dra_v1::Claim {
            namespace: NAMESPACE.into(),
            name: name.into(),
            uid: created.metadata.uid.unwrap(),
        }
    }

    fn spec_files(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.cdi_dir()) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn spec_of(&self, uid: &str) -> Option<PathBuf> {
        self.spec_files()
            .into_iter()
            .find(|p| p.file_name().unwrap().to_string_lossy().contains(uid))
    }

    fn checkpointed(&self) -> BTreeSet<String> {
        let (state, _) = checkpoint::load(&self.state_dir()).unwrap();
        state.claims.into_keys().collect()
    }
}

fn beta(claim: &dra_v1::Claim) -> dra_v1beta1::Claim {
    dra_v1beta1::Claim {
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        uid: claim.uid.clone(),
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn registration_get_info_names_driver_endpoint_and_versions() {
    let node = Node::start("dgx-h100", None).await;
    let paths = node.plugin().paths().clone();
    assert_eq!(
        paths.registration,
        node.dir.path().join("plugins_registry/tandem.dev-reg.sock")
    );
    let mut registration =
        RegistrationClient::new(unix_channel(&paths.registration).await.unwrap());
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, "tandem.dev");
    assert_eq!(
        Path::new(&info.endpoint),
        node.dir.path().join("plugins/tandem.dev/dra.sock")
    );
    assert!(Path::new(&info.endpoint).is_absolute());
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth"
        ]
    );
    // The endpoint it names is where the DRA service answers.
    let mut dra = dra_v1::dra_plugin_client::DraPluginClient::new(
        unix_channel(Path::new(&info.endpoint)).await.unwrap(),
    );
    let empty = dra
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest { claims: vec![] })
        .await
        .unwrap();
    assert!(empty.into_inner().claims.is_empty());
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        (mode(&paths.registration), mode(&paths.dra)),
        (0o600, 0o600)
    );
}

#[tokio::test]
async fn v1_prepare_and_unprepare_write_and_remove_the_cdi_spec() {
    let node = Node::start("dgx-h100", None).await;
    let claim = node.claim("pairs", &[0, 1], &[0, 1]).await;
    let mut dra = node.v1().await;
    let response = dra
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let answer = &response.claims[&claim.uid];
    assert_eq!(answer.error, "");
    let devices: BTreeSet<_> = answer
        .devices
        .iter()
        .map(|d| d.device_name.as_str())
        .collect();
    assert_eq!(devices.len(), 4);
    for device in &answer.devices {
        assert_eq!(device.pool_name, NODE);
        assert_eq!(device.share_id, None);
        let expected_request = if device.device_name.starts_with("gpu-") {
            "gpus"
        } else {
            "nics"
        };
        assert_eq!(device.request_names, [expected_request]);
        assert_eq!(device.cdi_device_ids.len(), 1);
        assert!(device.cdi_device_ids[0].starts_with("tandem.dev/claim="));
    }
    let spec_path = node.spec_of(&claim.uid).expect("a CDI spec for the claim");
    let spec = std::fs::read_to_string(&spec_path).unwrap();
    for device in &answer.devices {
        let cdi_name = device.cdi_device_ids[0].split_once('=').unwrap().1;
        assert!(spec.contains(cdi_name), "{cdi_name} missing from {spec}");
    }
    assert!(node.checkpointed().contains(&claim.uid));

    let unprepared = dra
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unprepared.claims[&claim.uid].error, "");
    assert!(!spec_path.exists());
    assert!(node.spec_files().is_empty());
    assert!(node.checkpointed().is_empty());
}

#[tokio::test]
async fn v1beta1_prepare_and_unprepare_behave_like_v1() {
    let node = Node::start("dgx-h100", None).await;
    let claim = node.claim("beta", &[2], &[2]).await;
    let mut dra = node.v1beta1().await;
    let response = dra
        .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
            claims: vec![beta(&claim)],
        })
        .await
        .unwrap()
        .into_inner();
    let answer = &response.claims[&claim.uid];
    assert_eq!(answer.error, "");
    assert_eq!(answer.devices.len(), 2);
    assert!(answer.devices.iter().all(|d| d.cdi_device_ids.len() == 1));
    assert!(node.spec_of(&claim.uid).is_some());
    let unprepared = dra
        .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
            claims: vec![beta(&claim)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unprepared.claims[&claim.uid].error, "");
    assert!(node.spec_files().is_empty());
}

#[tokio::test]
async fn repeated_prepare_returns_the_same_answer_without_rewriting() {
    let node = Node::start("dgx-h100", None).await;
    let claim = node.claim("again", &[0], &[0]).await;
    let mut v1 = node.v1().await;
    let request = dra_v1::NodePrepareResourcesRequest {
        claims: vec![claim.clone()],
    };
    let first = v1
        .node_prepare_resources(request.clone())
        .await
        .unwrap()
        .into_inner();
    let spec_path = node.spec_of(&claim.uid).unwrap();
    let written = std::fs::metadata(&spec_path).unwrap().modified().unwrap();
    let second = v1
        .node_prepare_resources(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(
        std::fs::metadata(&spec_path).unwrap().modified().unwrap(),
        written
    );
    // The other API version sees the same prepared claim.
    let mut beta_client = node.v1beta1().await;
    let third = beta_client
        .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
            claims: vec![beta(&claim)],
        })
        .await
        .unwrap()
        .into_inner();
    let names = |devices: Vec<String>| devices.into_iter().collect::<BTreeSet<_>>();
    assert_eq!(
        names(
            third.claims[&claim.uid]
                .devices
                .iter()
                .map(|d| d.device_name.clone())
                .collect()
        ),
        names(
            first.claims[&claim.uid]
                .devices
                .iter()
                .map(|d| d.device_name.clone())
                .collect()
        )
    );
}

#[tokio::test]
async fn unprepare_of_unknown_claims_succeeds_in_both_versions() {
    let node = Node::start("dgx-h100", None).await;
    let unknown = dra_v1::Claim {
        namespace: NAMESPACE.into(),
        name: "never-prepared".into(),
        uid: "0b9f3c9e-0000-4000-8000-000000000001".into(),
    };
    let v1 = node
        .v1()
        .await
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: vec![unknown.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.claims[&unknown.uid].error, "");
    let v1beta1 = node
        .v1beta1()
        .await
        .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
            claims: vec![beta(&unknown)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1beta1.claims[&unknown.uid].error, "");
}

#[tokio::test]
async fn one_bad_claim_fails_alone_and_every_claim_is_answered_once() {
    let node = Node::start("dgx-h100", None).await;
    let good = node.claim("good", &[0], &[0]).await;
    let replaced = dra_v1::Claim {
        uid: "0b9f3c9e-0000-4000-8000-0000000000aa".into(),
        ..node.claim("replaced", &[1], &[1]).await
    };
    let missing = dra_v1::Claim {
        namespace: NAMESPACE.into(),
        name: "missing".into(),
        uid: "0b9f3c9e-0000-4000-8000-0000000000bb".into(),
    };
    let empty_name = dra_v1::Claim {
        namespace: NAMESPACE.into(),
        name: String::new(),
        uid: "0b9f3c9e-0000-4000-8000-0000000000cc".into(),
    };
    let response = node
        .v1()
        .await
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![
                good.clone(),
                replaced.clone(),
                missing.clone(),
                good.clone(),
                empty_name.clone(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.claims.len(), 4);
    assert_eq!(response.claims[&good.uid].error, "");
    assert_eq!(response.claims[&good.uid].devices.len(), 2);
    for (bad, what) in [(&replaced, "team-a/replaced"), (&missing, "team-a/missing")] {
        let error = &response.claims[&bad.uid].error;
        assert!(
            error.contains(what),
            "error for {what} does not name it: {error}"
        );
        assert!(response.claims[&bad.uid].devices.is_empty());
    }
    assert!(response.claims[&empty_name.uid].error.contains("name"));
    assert!(node.spec_of(&good.uid).is_some());
    assert!(node.spec_of(&replaced.uid).is_none());
}

#[tokio::test]
async fn stale_socket_files_are_replaced_at_start() {
    let mut node = Node::start("dgx-h100", None).await;
    let paths = node.plugin().paths().clone();
    node.stop_plugin().await;
    // What a crashed run leaves: files in the sockets' places.
    std::fs::write(&paths.registration, b"stale").unwrap();
    std::fs::write(&paths.dra, b"stale").unwrap();
    node.start_plugin().await;
    assert!(is_socket(&paths.registration));
    assert!(is_socket(&paths.dra));
    let mut registration =
        RegistrationClient::new(unix_channel(&paths.registration).await.unwrap());
    assert_eq!(
        registration
            .get_info(InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .name,
        "tandem.dev"
    );
}

#[tokio::test]
async fn shutdown_removes_our_sockets_after_in_flight_calls() {
    // Rolling-update mode, so that holding the serialize lock keeps a prepare in flight.
    let mut node = Node::start("dgx-h100", Some("0d3c4b5a-6f70-4182-93a4-b5c6d7e8f901")).await;
    let paths = node.plugin().paths().clone();
    let claim = node.claim("last-call", &[0], &[0]).await;
    let lock =
        tandem_kubelet_plugin::sockets::SerializeLock::new(paths.serialize_lock.clone().unwrap());
    let held = lock.acquire().await.unwrap();
    let mut dra = node.v1().await;
    let uid = claim.uid.clone();
    let call = tokio::spawn(async move {
        dra.node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![claim],
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!call.is_finished());

    let shutdown = tokio::spawn(node.plugin.take().unwrap().shutdown());
    // Deregistration comes first; the DRA socket stays while the call is in flight.
    for _ in 0..100 {
        if !paths.registration.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!paths.registration.exists());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown did not wait for the call in flight"
    );
    assert!(paths.dra.exists());

    drop(held);
    let response = call.await.unwrap().unwrap().into_inner();
    assert_eq!(response.claims[&uid].error, "");
    assert!(node.spec_of(&uid).is_some());
    shutdown.await.unwrap().unwrap();
    assert!(!paths.dra.exists());
}

#[tokio::test]
async fn registration_socket_is_recreated_after_the_kubelet_wipes_it() {
    let node = Node::start("dgx-h100", None).await;
    let path = node.plugin().paths().registration.clone();
    std::fs::remove_file(&path).unwrap();
    let mut recreated = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if is_socket(&path) {
            recreated = true;
            break;
        }
    }
    assert!(recreated, "{} was not recreated", path.display());
    let mut registration = RegistrationClient::new(unix_channel(&path).await.unwrap());
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "tandem.dev");
}

#[tokio::test]
async fn rolling_update_uses_per_pod_names_and_the_serialize_lock() {
    let uid = "5f0c7a2e-1111-4222-8333-444455556666";
    let node = Node::start("dgx-h100", Some(uid)).await;
    let paths = node.plugin().paths().clone();
    assert_eq!(
        paths.registration,
        node.dir
            .path()
            .join(format!("plugins_registry/tandem.dev-{uid}-reg.sock"))
    );
    assert_eq!(
        paths.dra,
        node.dir
            .path()
            .join(format!("plugins/tandem.dev/dra-{uid}.sock"))
    );
    assert!(is_socket(&paths.registration) && is_socket(&paths.dra));
    let mut registration =
        RegistrationClient::new(unix_channel(&paths.registration).await.unwrap());
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Path::new(&info.endpoint), paths.dra);

    // A second pod of the rolling update holds the lock: our prepare must wait for it.
    let lock_path = node.dir.path().join("plugins/tandem.dev/serialize.lock");
    let claim = node.claim("rolling", &[0], &[0]).await;
    let holder = tandem_kubelet_plugin::sockets::SerializeLock::new(lock_path.clone());
    let held = holder.acquire().await.unwrap();
    let mut dra = node.v1().await;
    let call = tokio::spawn(async move {
        dra.node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![claim],
        })
        .await
        .unwrap()
        .into_inner()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !call.is_finished(),
        "prepare ran while another instance held {}",
        lock_path.display()
    );
    assert!(node.spec_files().is_empty());
    drop(held);
    let response = call.await.unwrap();
    assert!(response.claims.values().all(|c| c.error.is_empty()));
    assert_eq!(node.spec_files().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_claims_prepared_concurrently() {
    let node = Node::start("large", None).await;
    let mut claims = Vec::new();
    for i in 0..64 {
        claims.push(node.claim(&format!("job-{i}"), &[i], &[i]).await);
    }
    let mut calls = Vec::new();
    for (i, claim) in claims.iter().cloned().enumerate() {
        let channel = unix_channel(&node.plugin().paths().dra).await.unwrap();
        calls.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let mut v1 = dra_v1::dra_plugin_client::DraPluginClient::new(channel);
                let response = v1
                    .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
                        claims: vec![claim.clone()],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                response.claims[&claim.uid].error.clone()
            } else {
                let mut v1beta1 = dra_v1beta1::dra_plugin_client::DraPluginClient::new(channel);
                let response = v1beta1
                    .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
                        claims: vec![beta(&claim)],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                response.claims[&claim.uid].error.clone()
            }
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), "");
    }
    assert_eq!(node.spec_files().len(), 64);
    let expected: BTreeSet<String> = claims.iter().map(|c| c.uid.clone()).collect();
    assert_eq!(node.checkpointed(), expected);
    let unprepared = node
        .v1()
        .await
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: claims.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unprepared.claims.len(), 64);
    assert!(unprepared.claims.values().all(|c| c.error.is_empty()));
    assert!(node.spec_files().is_empty());
}

#[tokio::test]
async fn health_stream_reports_every_device_and_follows_inventory_changes() {
    let node = Node::start("dgx-h100", None).await;
    let channel = unix_channel(&node.plugin().paths().dra).await.unwrap();
    let mut health = DraResourceHealthClient::new(channel);
    let mut stream = health
        .node_watch_resources(NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let device_count = node.inventory.accelerators.len() + node.inventory.nics.len();
    assert_eq!(first.devices.len(), device_count);
    for device in &first.devices {
        let id = device.device.as_ref().unwrap();
        assert_eq!(id.pool_name, NODE);
        assert!(device.health_check_timeout_seconds > 0);
        assert!(device.last_updated_time > 0);
    }

    let healthy_in =
        |report: &tandem_kubelet_plugin::proto::dra_health_v1alpha1::NodeWatchResourcesResponse,
         name: &str| {
            report.devices.iter().any(|d| {
                d.device.as_ref().unwrap().device_name == name
                    && d.health == HealthStatus::Healthy as i32
            })
        };
    let healthy_count =
        |report: &tandem_kubelet_plugin::proto::dra_health_v1alpha1::NodeWatchResourcesResponse| {
            report
                .devices
                .iter()
                .filter(|d| d.health == HealthStatus::Healthy as i32)
                .count()
        };

    // Take a healthy RDMA NIC's port down and drop the last GPU from the machine.
    let mut changed = (*node.inventory).clone();
    let nic_index = changed
        .nics
        .iter()
        .position(|n| n.is_rdma() && healthy_in(&first, &names::nic_device_name(&n.pci.address)))
        .unwrap();
    let nic_name = names::nic_device_name(&changed.nics[nic_index].pci.address);
    for port in &mut changed.nics[nic_index].rdma.as_mut().unwrap().ports {
        port.state = Some("DOWN".into());
    }
    let gone = changed.accelerators.pop().unwrap();
    let gone_name = names::accelerator_device_name(&gone.pci.address);
    assert!(healthy_in(&first, &gone_name));
    node.inventory_tx.send(Arc::new(changed)).unwrap();

    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.devices.len(), device_count);
    let status_of = |name: &str| {
        second
            .devices
            .iter()
            .find(|d| d.device.as_ref().unwrap().device_name == name)
            .unwrap()
            .clone()
    };
    assert_eq!(status_of(&nic_name).health, HealthStatus::Unhealthy as i32);
    assert!(status_of(&nic_name).message.contains("link down"));
    assert_eq!(status_of(&gone_name).health, HealthStatus::Unhealthy as i32);
    assert_eq!(healthy_count(&second), healthy_count(&first) - 2);
}

#[test]
fn demo_runs_end_to_end() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "GetInfo: type=DRAPlugin name=tandem.dev",
        "NCCL_IB_HCA=",
        "(PIX)",
        "CDI specs left in",
        "checkpoint entry for",
        "sockets left: 0",
        // The DGX's first pair's NIC, moved into the pod as rdma0 by the attach hook.
        "ibp24s0 -> rdma0 in the pod (PCI 0000:18:00.0, RDMA device mlx5_0)",
        // The dgx-h100 carries the GPU Operator's spec: each GPU shows its vendor device.
        "vendor=nvidia.com/gpu=GPU-",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
}
