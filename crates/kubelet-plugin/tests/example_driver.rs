//! Runs the example driver (`examples/fake_driver.rs`) on real Unix sockets in a temporary
//! directory and talks to it as the kubelet does: registration first, then the DRA services
//! at the endpoint GetInfo names, and the health stream.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_health_v1alpha1::dra_resource_health_client::DraResourceHealthClient;
use tandem_kubelet_plugin::proto::dra_health_v1alpha1::{HealthStatus, NodeWatchResourcesRequest};
use tandem_kubelet_plugin::proto::pluginregistration::registration_client::RegistrationClient;
use tandem_kubelet_plugin::proto::pluginregistration::{InfoRequest, RegistrationStatus};
use tandem_kubelet_plugin::proto::{dra_v1, dra_v1beta1};
use tandem_kubelet_plugin::sockets::{DEFAULT_KUBELET_PLUGINS_DIR, DEFAULT_KUBELET_REGISTRY_DIR};
use tandem_kubelet_plugin::{KubeletRegistration, RunningPlugin};

#[allow(dead_code)] // `main` and its signal handling are for the example binary only
#[path = "../examples/fake_driver.rs"]
mod fake_driver;

use fake_driver::{CDI_KIND, DEVICE_NAME, DRIVER_NAME, FakeDriver, Options};

const NODE: &str = "node-a";
const CLAIM_UID: &str = "3f2a61c4-1b0e-4d7c-9a51-7c2a9e0d1f22";
const OTHER_CLAIM_UID: &str = "8c0d2e7a-5f41-4b9e-b3a6-0e1f2d3c4b5a";
/// Long enough for a loaded CI machine, short enough that a hang fails the test.
const PATIENCE: Duration = Duration::from_secs(20);

/// The example driver, served on sockets under `dir` as its `main` would serve it.
struct Served {
    driver: Arc<FakeDriver>,
    plugin: RunningPlugin,
}

async fn serve(dir: &Path) -> Served {
    let options = Options {
        node_name: NODE.to_string(),
        registry_dir: dir.join("plugins_registry"),
        plugins_dir: dir.join("plugins"),
    };
    let mut config = options.config();
    config.health_report_interval = Duration::from_secs(1);
    let driver = Arc::new(FakeDriver::new(NODE));
    let plugin = fake_driver::serve(&config, driver.clone()).await.unwrap();
    Served { driver, plugin }
}

async fn shut_down(plugin: RunningPlugin) {
    tokio::time::timeout(PATIENCE, plugin.shutdown())
        .await
        .expect("graceful shutdown did not finish")
        .unwrap();
}

/// The endpoint the kubelet would dial after reading GetInfo on `registration`.
async fn registered_endpoint(registration: &Path) -> PathBuf {
    let mut client = RegistrationClient::new(unix_channel(registration).await.unwrap());
    let info = client.get_info(InfoRequest {}).await.unwrap().into_inner();
    PathBuf::from(info.endpoint)
}

fn v1_claim(namespace: &str, name: &str, uid: &str) -> dra_v1::Claim {
    dra_v1::Claim {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

fn v1beta1_claim(namespace: &str, name: &str, uid: &str) -> dra_v1beta1::Claim {
    dra_v1beta1::Claim {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[tokio::test]
async fn registration_as_the_kubelet_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let Served { plugin, .. } = serve(dir.path()).await;
    let paths = plugin.paths().clone();
    let registry = dir.path().join("plugins_registry");
    let plugins = dir.path().join("plugins");
    assert_eq!(
        paths.registration,
        registry.join("fake.example.com-reg.sock")
    );
    assert_eq!(paths.dra, plugins.join("fake.example.com/dra.sock"));

    let mut client = RegistrationClient::new(unix_channel(&paths.registration).await.unwrap());
    let info = client.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, DRIVER_NAME);
    assert_eq!(Path::new(&info.endpoint), paths.dra);
    assert!(Path::new(&info.endpoint).is_absolute(), "{}", info.endpoint);
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth"
        ]
    );

    let mut registration = plugin.registration();
    assert_eq!(*registration.borrow(), KubeletRegistration::Waiting);
    client
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let state = tokio::time::timeout(PATIENCE, registration.wait_for(|s| s.is_registered()))
        .await
        .expect("registration never turned Registered")
        .unwrap()
        .clone();
    assert_eq!(state, KubeletRegistration::Registered);
    assert_eq!(
        *plugin.registration().borrow(),
        KubeletRegistration::Registered
    );

    drop(client);
    shut_down(plugin).await;
}

#[tokio::test]
async fn prepare_and_unprepare_over_v1_and_v1beta1() {
    let dir = tempfile::tempdir().unwrap();
    let Served { driver, plugin } = serve(dir.path()).await;
    let endpoint = registered_endpoint(&plugin.paths().registration).await;
    let mut v1 =
        dra_v1::dra_plugin_client::DraPluginClient::new(unix_channel(&endpoint).await.unwrap());
    let mut v1beta1 = dra_v1beta1::dra_plugin_client::DraPluginClient::new(
        unix_channel(&endpoint).await.unwrap(),
    );

    let prepare_v1 = dra_v1::NodePrepareResourcesRequest {
        claims: vec![v1_claim("default", "train", CLAIM_UID)],
    };
    let first = v1
        .node_prepare_resources(prepare_v1.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.claims.len(), 1);
    let answer = &first.claims[CLAIM_UID];
    assert_eq!(answer.error, "");
    assert_eq!(
        answer.devices,
        [dra_v1::Device {
            request_names: Vec::new(),
            pool_name: NODE.into(),
            device_name: DEVICE_NAME.into(),
            cdi_device_ids: vec![format!("example.com/fake={CLAIM_UID}")],
            share_id: None,
        }]
    );
    assert_eq!(CDI_KIND, "example.com/fake");
    assert_eq!(driver.prepared_claims().await, [CLAIM_UID]);

    // A kubelet retry of the same claim gets the same answer, on either API version.
    let again = v1
        .node_prepare_resources(prepare_v1)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    let beta = v1beta1
        .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1_claim("default", "train", CLAIM_UID)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beta.claims[CLAIM_UID].error, "");
    assert_eq!(
        beta.claims[CLAIM_UID].devices,
        [dra_v1beta1::Device {
            request_names: Vec::new(),
            pool_name: NODE.into(),
            device_name: DEVICE_NAME.into(),
            cdi_device_ids: vec![format!("example.com/fake={CLAIM_UID}")],
        }]
    );

    // A second claim, prepared over v1beta1 only.
    let other = v1beta1
        .node_prepare_resources(dra_v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1_claim("ml", "eval", OTHER_CLAIM_UID)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        other.claims[OTHER_CLAIM_UID].devices[0].cdi_device_ids,
        [format!("example.com/fake={OTHER_CLAIM_UID}")]
    );
    assert_eq!(driver.prepared_claims().await, [CLAIM_UID, OTHER_CLAIM_UID]);

    let unprepared = v1
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: vec![v1_claim("default", "train", CLAIM_UID)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unprepared.claims.len(), 1);
    assert_eq!(unprepared.claims[CLAIM_UID].error, "");
    assert_eq!(driver.prepared_claims().await, [OTHER_CLAIM_UID]);

    let unprepared = v1beta1
        .node_unprepare_resources(dra_v1beta1::NodeUnprepareResourcesRequest {
            claims: vec![
                v1beta1_claim("ml", "eval", OTHER_CLAIM_UID),
                // Already unprepared: still a success.
                v1beta1_claim("default", "train", CLAIM_UID),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unprepared.claims.len(), 2);
    assert!(unprepared.claims.values().all(|c| c.error.is_empty()));
    assert!(driver.prepared_claims().await.is_empty());

    drop((v1, v1beta1));
    shut_down(plugin).await;
}

#[tokio::test]
async fn an_invalid_claim_uid_gets_the_typed_error_and_spares_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let Served { driver, plugin } = serve(dir.path()).await;
    let mut v1 = dra_v1::dra_plugin_client::DraPluginClient::new(
        unix_channel(&plugin.paths().dra).await.unwrap(),
    );
    let answer = v1
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![
                v1_claim("default", "escape", "../etc"),
                v1_claim("default", "train", CLAIM_UID),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let bad = &answer.claims["../etc"];
    assert_eq!(
        bad.error,
        "claim default/escape (../etc): invalid claim UID: only letters, digits and '-' are allowed"
    );
    assert!(bad.devices.is_empty());
    assert_eq!(answer.claims[CLAIM_UID].error, "");
    assert_eq!(answer.claims[CLAIM_UID].devices.len(), 1);
    assert_eq!(driver.prepared_claims().await, [CLAIM_UID]);

    let unprepared = v1
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: vec![v1_claim("default", "escape", "../etc")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        unprepared.claims["../etc"]
            .error
            .contains("invalid claim UID"),
        "{:?}",
        unprepared.claims
    );

    drop(v1);
    shut_down(plugin).await;
}

#[tokio::test]
async fn the_health_stream_reports_the_fake_device_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let Served { plugin, .. } = serve(dir.path()).await;
    let mut health = DraResourceHealthClient::new(unix_channel(&plugin.paths().dra).await.unwrap());
    let mut stream = health
        .node_watch_resources(NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    // The first report comes right away, and the stream keeps repeating the list once per
    // report interval (1 s here), not sooner: a fixed feed has no changes to report.
    for round in 0..2 {
        let started = std::time::Instant::now();
        let report = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("no health report")
            .unwrap()
            .expect("the health stream ended");
        assert_eq!(report.devices.len(), 1, "{report:?}");
        let device = &report.devices[0];
        let id = device.device.as_ref().unwrap();
        assert_eq!(id.pool_name, NODE);
        assert_eq!(id.device_name, DEVICE_NAME);
        assert_eq!(device.health, HealthStatus::Healthy as i32);
        assert_eq!(device.message, "");
        assert_eq!(device.health_check_timeout_seconds, 3);
        assert!(device.last_updated_time > 0);
        if round == 1 {
            assert!(
                started.elapsed() >= Duration::from_millis(500),
                "a repeated report came {:?} after the first, before the 1 s interval",
                started.elapsed()
            );
        }
    }

    // Shutdown ends the open stream instead of waiting for it.
    shut_down(plugin).await;
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the health stream outlived the shutdown");
}

#[tokio::test]
async fn graceful_shutdown_removes_both_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let Served { plugin, .. } = serve(dir.path()).await;
    let paths = plugin.paths().clone();
    assert!(tandem_kubelet_plugin::sockets::socket_exists(
        &paths.registration
    ));
    assert!(tandem_kubelet_plugin::sockets::socket_exists(&paths.dra));
    // A kubelet still connected to both sockets does not hold the shutdown up.
    let _registration = RegistrationClient::new(unix_channel(&paths.registration).await.unwrap());
    let _dra =
        dra_v1::dra_plugin_client::DraPluginClient::new(unix_channel(&paths.dra).await.unwrap());

    shut_down(plugin).await;
    assert!(
        !paths.registration.exists(),
        "{}",
        paths.registration.display()
    );
    assert!(!paths.dra.exists(), "{}", paths.dra.display());
    assert!(unix_channel(&paths.dra).await.is_err());
}

#[test]
fn options_come_from_args_then_env_then_the_kubelet_defaults() {
    let env = |name: &str| match name {
        "NODE_NAME" => Some(OsString::from("from-env")),
        "KUBELET_PLUGINS_DIR" => Some(OsString::from("/env/plugins")),
        _ => None,
    };
    let options = Options::parse(Vec::<OsString>::new(), env).unwrap();
    assert_eq!(
        options,
        Options {
            node_name: "from-env".into(),
            registry_dir: DEFAULT_KUBELET_REGISTRY_DIR.into(),
            plugins_dir: "/env/plugins".into(),
        }
    );

    let args = ["--node-name", "node-b", "--kubelet-registry-dir", "/r"].map(OsString::from);
    let options = Options::parse(args, env).unwrap();
    assert_eq!(options.node_name, "node-b");
    assert_eq!(options.registry_dir, Path::new("/r"));
    let config = options.config();
    assert_eq!(config.driver_name, DRIVER_NAME);
    assert_eq!(config.node_name, "node-b");
    assert_eq!(config.plugins_dir, Path::new("/env/plugins"));

    let no_env = |_: &str| None;
    let options = Options::parse(["--node-name", "n"].map(OsString::from), no_env).unwrap();
    assert_eq!(options.plugins_dir, Path::new(DEFAULT_KUBELET_PLUGINS_DIR));
    let missing = Options::parse(Vec::<OsString>::new(), no_env).unwrap_err();
    assert!(
        missing.to_string().contains("node name is required"),
        "{missing}"
    );
    let dangling = Options::parse(["--node-name"].map(OsString::from), no_env).unwrap_err();
    assert!(dangling.to_string().contains("needs a value"), "{dangling}");
    let unknown = Options::parse(["--verbose"].map(OsString::from), no_env).unwrap_err();
    assert!(
        unknown.to_string().contains("unknown argument"),
        "{unknown}"
    );
}
