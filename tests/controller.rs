//! The cluster controller against the fake apiserver: DeviceClasses kept as configured, Node
//! labels that follow the slices of fixture machines, rails that never renumber, one leader
//! among replicas with handover, the metrics endpoint, and the shipped example claims.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod};
use k8s_openapi::api::resource::v1::{
    DeviceAllocationConfiguration, DeviceAttribute, DeviceClass, ResourceClaimTemplate,
    ResourceSlice,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::apiserver_fake::{FakeApiServer, InjectedFailure};
use tandem::controller::metrics::{Metrics, ReconcileKind};
use tandem::controller::rails::rail_for_subnet;
use tandem::controller::{Controller, ControllerConfig};
use tandem::fixture::{builtin, scratch_dir, write_machine};
use tandem::names;
use tandem::slices::{NodeIdentity, SliceOptions, build_slices};
use tandem::sysfs::discover;
use tandem::topology::{Inventory, pair_node};
use tandem_kubelet_plugin::Publisher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DRIVER: &str = names::DEFAULT_DRIVER_NAME;
const NAMESPACE: &str = "tandem-system";
const LEASE: Duration = Duration::from_secs(2);
const PATIENCE: Duration = Duration::from_secs(8);

struct Replica {
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Replica {
    fn start(server: &FakeApiServer, identity: &str) -> Replica {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let config = ControllerConfig {
            namespace: NAMESPACE.into(),
            lease_duration: LEASE,
            debounce: Duration::from_millis(20),
            ..ControllerConfig::new(identity)
        };
        let controller = Controller::new(server.client(), config);
        let metrics = controller.metrics();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { controller.run(token).await });
        Replica {
            task,
            shutdown,
            metrics,
        }
    }

    fn reconciles(&self) -> u64 {
        [
            ReconcileKind::DeviceClass,
            ReconcileKind::Node,
            ReconcileKind::Rails,
        ]
        .into_iter()
        .map(|k| self.metrics.reconciles(k))
        .sum()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// Polls `probe` until it yields a value; panics naming `what` after `PATIENCE`.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn dgx() -> Inventory {
    let dir = scratch_dir().unwrap();
    let roots = write_machine(&builtin("dgx-h100").unwrap(), dir.path()).unwrap();
    discover(&roots).unwrap()
}

fn slices_for(inventory: &Inventory, node: &str) -> Vec<ResourceSlice> {
    let identity = NodeIdentity {
        name: node.into(),
        uid: String::new(),
    };
    let options = SliceOptions {
        device_taints: true,
        ..Default::default()
    };
    build_slices(inventory, &identity, DRIVER, &options)
}

/// Gives the RDMA NICs, in device order, the subnets `subnet(i)` names (what the node plugin
/// will publish once it reads NIC addresses).
fn with_subnets(
    mut slices: Vec<ResourceSlice>,
    subnet: impl Fn(usize) -> Option<String>,
) -> Vec<ResourceSlice> {
    let rdma_key = names::driver_qualified(DRIVER, names::ATTR_RDMA);
    let mut index = 0;
    for slice in &mut slices {
        for device in slice.spec.devices.iter_mut().flatten() {
            let attributes = device.attributes.get_or_insert_with(BTreeMap::new);
            if attributes.get(&rdma_key).and_then(|a| a.bool) != Some(true) {
                continue;
            }
            if let Some(text) = subnet(index) {
                attributes.insert(
                    names::driver_qualified(DRIVER, names::ATTR_SUBNET),
                    DeviceAttribute {
                        string: Some(text),
                        ..Default::default()
                    },
                );
            }
            index += 1;
        }
    }
    slices
}

fn rdma_nic_count(inventory: &Inventory) -> usize {
    inventory.nics.iter().filter(|n| n.is_rdma()).count()
}

async fn publish(server: &FakeApiServer, node: &str, slices: &[ResourceSlice]) {
    Publisher::new(server.client(), DRIVER, node)
        .publish(slices)
        .await
        .unwrap();
}

async fn create_node(server: &FakeApiServer, name: &str) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
    }))
    .unwrap();
    Api::<Node>::all(server.client())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

async fn labels_of(server: &FakeApiServer, node: &str) -> BTreeMap<String, String> {
    Api::<Node>::all(server.client())
        .get(node)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default()
}

async fn node_events(server: &FakeApiServer, node: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(server.client(), "default")
        .list(&ListParams::default().fields(&format!("involvedObject.name={node},reason={reason}")))
        .await
        .unwrap()
        .items
}

async fn rails(server: &FakeApiServer) -> Option<BTreeMap<String, String>> {
    Api::<ConfigMap>::namespaced(server.client(), NAMESPACE)
        .get_opt(names::RAILS_CONFIGMAP)
        .await
        .unwrap()
        .map(|cm| cm.data.unwrap_or_default())
}

async fn lease_holder(server: &FakeApiServer) -> Option<String> {
    Api::<Lease>::namespaced(server.client(), NAMESPACE)
        .get_opt(names::CONTROLLER_LEASE_NAME)
        .await
        .unwrap()?
        .spec?
        .holder_identity
}

fn expression(class: &DeviceClass) -> String {
    class.spec.selectors.as_ref().unwrap()[0]
        .cel
        .as_ref()
        .unwrap()
        .expression
        .clone()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn device_classes_are_restored_after_deletion_and_hand_edits() {
    let server = FakeApiServer::start().await.unwrap();
    let replica = Replica::start(&server, "replica-a");
    let classes: Api<DeviceClass> = Api::all(server.client());
    let gpu_expression = eventually("the GPU class", || async {
        classes
            .get_opt(names::DEVICE_CLASS_GPU)
            .await
            .unwrap()
            .map(|c| expression(&c))
    })
    .await;
    assert!(gpu_expression.contains(r#"device.attributes["tandem.dev"].kind == "gpu""#));
    let nic = eventually("the NIC class", || async {
        classes.get_opt(names::DEVICE_CLASS_NIC).await.unwrap()
    })
    .await;
    let managers: Vec<String> = nic
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&names::CONTROLLER_FIELD_MANAGER.to_string()));
    let nic_expression = expression(&nic);
    assert!(
        nic_expression.contains(r#".rdma == true"#),
        "{nic_expression}"
    );

    classes
        .delete(names::DEVICE_CLASS_GPU, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted GPU class to come back", || async {
        classes.get_opt(names::DEVICE_CLASS_GPU).await.unwrap()
    })
    .await;

    let hand_edit = json!({"spec": {"selectors": [{"cel": {"expression": "device.driver == \"tandem.dev\""}}]}});
    classes
        .patch(
            names::DEVICE_CLASS_NIC,
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..Default::default()
            },
            &Patch::Merge(&hand_edit),
        )
        .await
        .unwrap();
    eventually("the edited NIC class to be restored", || async {
        let class = classes.get(names::DEVICE_CLASS_NIC).await.unwrap();
        (expression(&class) == nic_expression).then_some(())
    })
    .await;

    // Settled: the controller's own writes do not keep it writing (lease renewals aside).
    let writes = |server: &FakeApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| !r.starts_with("GET ") && !r.contains("/leases"))
            .count()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = writes(&server);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(writes(&server), settled, "no write loop once settled");

    // The metrics endpoint, over a real socket.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let endpoint = tokio::spawn(tandem::controller::metrics::serve(
        listener,
        replica.metrics.clone(),
        stop.clone(),
    ));
    let metrics = http_get(addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(r#"tandem_controller_reconciles_total{kind="deviceclass"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("tandem_controller_leader 1"), "{metrics}");
    let health = http_get(addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
        "{health}"
    );
    assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    stop.cancel();
    endpoint.await.unwrap();
    replica.stop().await;
}

#[tokio::test]
async fn node_labels_follow_slices_as_a_nic_goes_down_and_back() {
    let server = FakeApiServer::start().await.unwrap();
    let inventory = dgx();
    let gpus = inventory.accelerators.len().to_string();
    let nics = rdma_nic_count(&inventory);
    let pairing = pair_node(&inventory);
    let best = pairing.pairs.iter().map(|p| p.affinity).min().unwrap();
    create_node(&server, "gpu-1").await;
    publish(&server, "gpu-1", &slices_for(&inventory, "gpu-1")).await;
    // The first label writes fail: the controller retries rather than giving up.
    server.inject_failures(
        Some("PATCH"),
        "/api/v1/nodes/gpu-1",
        2,
        InjectedFailure::InternalError,
    );
    let replica = Replica::start(&server, "replica-a");

    let expect = |gpus: &str, nics: usize, best: &str| {
        BTreeMap::from([
            (names::LABEL_GPUS.to_string(), gpus.to_string()),
            (names::LABEL_RDMA_NICS.to_string(), nics.to_string()),
            (names::LABEL_BEST_AFFINITY.to_string(), best.to_string()),
            ("kubernetes.io/hostname".to_string(), "gpu-1".to_string()),
        ])
    };
    let healthy = expect(&gpus, nics, best.as_str());
    eventually("labels of the healthy node", || async {
        (labels_of(&server, "gpu-1").await == healthy).then_some(())
    })
    .await;
    assert!(
        node_events(&server, "gpu-1", names::REASON_ALIGNMENT_DEGRADED)
            .await
            .is_empty()
    );
    assert_eq!(replica.metrics.errors(ReconcileKind::Node), 2);

    // The link of the NIC paired with the first GPU goes down: the node plugin taints it.
    let mut down = inventory.clone();
    let nic_address = pairing.pairs[0].nic;
    let nic = down
        .nics
        .iter_mut()
        .find(|n| n.pci.address == nic_address)
        .unwrap();
    nic.rdma.as_mut().unwrap().ports[0].state = Some("DOWN".into());
    publish(&server, "gpu-1", &slices_for(&down, "gpu-1")).await;
    let degraded = expect(&gpus, nics - 1, best.as_str());
    eventually("labels with one NIC down", || async {
        (labels_of(&server, "gpu-1").await == degraded).then_some(())
    })
    .await;
    let events = eventually("an AlignmentDegraded event", || async {
        let events = node_events(&server, "gpu-1", names::REASON_ALIGNMENT_DEGRADED).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    let paired = pairing.pairs.len();
    let message = events[0].message.clone().unwrap();
    assert!(
        message.contains(&format!("went from {paired} to {}", paired - 1)),
        "{message}"
    );
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));

    // The link comes back: labels recover, and getting better is no news.
    publish(&server, "gpu-1", &slices_for(&inventory, "gpu-1")).await;
    eventually("labels after the NIC came back", || async {
        (labels_of(&server, "gpu-1").await == healthy).then_some(())
    })
    .await;
    assert_eq!(
        node_events(&server, "gpu-1", names::REASON_ALIGNMENT_DEGRADED)
            .await
            .len(),
        1
    );

    // The node loses all our slices (plugin removed): our labels and annotation go, others stay.
    publish(&server, "gpu-1", &[]).await;
    eventually("our labels to be removed", || async {
        let labels = labels_of(&server, "gpu-1").await;
        (labels.len() == 1 && labels.contains_key("kubernetes.io/hostname")).then_some(())
    })
    .await;
    let node = Api::<Node>::all(server.client())
        .get("gpu-1")
        .await
        .unwrap();
    assert!(
        !node
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(names::ANNOTATION_ALIGNMENT)
    );
    let text = replica.metrics.encode();
    assert!(
        text.contains("tandem_controller_reconciles_total{kind=\"node\"}"),
        "{text}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn a_change_of_one_nodes_slices_reconciles_that_node_alone() {
    let server = FakeApiServer::start().await.unwrap();
    let inventory = dgx();
    let nics = rdma_nic_count(&inventory);
    let fleet: Vec<String> = (0..8).map(|i| format!("gpu-{i}")).collect();
    for node in &fleet {
        create_node(&server, node).await;
        publish(&server, node, &slices_for(&inventory, node)).await;
    }
    let replica = Replica::start(&server, "replica-a");
    for node in &fleet {
        eventually("labels of every node", || async {
            let labels = labels_of(&server, node).await;
            (labels.get(names::LABEL_RDMA_NICS) == Some(&nics.to_string())).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconciled = replica.metrics.reconciles(ReconcileKind::Node);
    let patches: Vec<usize> = fleet.iter().map(|n| node_patches(&server, n)).collect();

    let mut down = inventory.clone();
    let rdma = down.nics.iter_mut().find_map(|n| n.rdma.as_mut()).unwrap();
    rdma.ports[0].state = Some("DOWN".into());
    publish(&server, "gpu-3", &slices_for(&down, "gpu-3")).await;
    eventually("gpu-3 with one NIC less", || async {
        let labels = labels_of(&server, "gpu-3").await;
        (labels.get(names::LABEL_RDMA_NICS) == Some(&(nics - 1).to_string())).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The slice events and the echo of our own label write: a few reconciles of gpu-3, not a
    // pass over the fleet.
    let more = replica.metrics.reconciles(ReconcileKind::Node) - reconciled;
    assert!(
        (1..fleet.len() as u64).contains(&more),
        "{more} node reconciles"
    );
    for (node, before) in fleet.iter().zip(patches) {
        let expected = before + usize::from(node == "gpu-3");
        assert_eq!(node_patches(&server, node), expected, "{node}");
    }
    replica.stop().await;
}

/// PATCHes of Node `node` so far (the label and annotation writes).
fn node_patches(server: &FakeApiServer, node: &str) -> usize {
    let prefix = format!("PATCH /api/v1/nodes/{node}?");
    server
        .requests()
        .iter()
        .filter(|r| r.starts_with(&prefix))
        .count()
}

async fn create_node_with(
    server: &FakeApiServer,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) {
    let mut node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    node.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    node.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Api::<Node>::all(server.client())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

/// Labels and annotations of `node`.
async fn metadata_of(
    server: &FakeApiServer,
    node: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let node = Api::<Node>::all(server.client()).get(node).await.unwrap();
    (
        node.metadata.labels.unwrap_or_default(),
        node.metadata.annotations.unwrap_or_default(),
    )
}

/// Deletes `node`'s ResourceSlices directly, as the kubelet does when a plugin goes away.
async fn wipe_slices(server: &FakeApiServer, node: &str) {
    let slices: Api<ResourceSlice> = Api::all(server.client());
    let selector = format!("spec.nodeName={node},spec.driver={DRIVER}");
    slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().fields(&selector),
        )
        .await
        .unwrap();
    let left = slices
        .list(&ListParams::default().fields(&selector))
        .await
        .unwrap();
    assert!(left.items.is_empty(), "slices of {node} left: {left:?}");
}

fn owned(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn has_any_of_ours(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> bool {
    [
        names::LABEL_GPUS,
        names::LABEL_RDMA_NICS,
        names::LABEL_BEST_AFFINITY,
    ]
    .iter()
    .any(|k| labels.contains_key(*k))
        || annotations.contains_key(names::ANNOTATION_ALIGNMENT)
}

#[tokio::test]
async fn nodes_without_slices_lose_exactly_our_labels_even_after_a_restart() {
    let server = FakeApiServer::start().await.unwrap();
    let inventory = dgx();
    let foreign_labels = [("kubernetes.io/hostname", "gpu-1"), ("team", "a")];
    let foreign_annotations = [("example.com/owner", "infra")];
    create_node_with(&server, "gpu-1", &foreign_labels, &foreign_annotations).await;
    create_node_with(&server, "gpu-2", &[("team", "b")], &[]).await;
    // A tandem.dev/ label that is not ours and a CPU node that never runs the plugin.
    create_node_with(
        &server,
        "cpu-1",
        &[("tandem.dev/owner", "ops")],
        &foreign_annotations,
    )
    .await;
    for node in ["gpu-1", "gpu-2"] {
        publish(&server, node, &slices_for(&inventory, node)).await;
    }
    let replica = Replica::start(&server, "replica-a");
    for node in ["gpu-1", "gpu-2"] {
        eventually("labels and annotation of a node with slices", || async {
            let (labels, annotations) = metadata_of(&server, node).await;
            (labels.get(names::LABEL_GPUS) == Some(&inventory.accelerators.len().to_string())
                && annotations.contains_key(names::ANNOTATION_ALIGNMENT))
            .then_some(())
        })
        .await;
    }

    // gpu-1's slices are wiped: one write takes ours off, everything else stays.
    let before = node_patches(&server, "gpu-1");
    wipe_slices(&server, "gpu-1").await;
    eventually("gpu-1 without our labels and annotation", || async {
        let (labels, annotations) = metadata_of(&server, "gpu-1").await;
        (!has_any_of_ours(&labels, &annotations)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metadata_of(&server, "gpu-1").await,
        (owned(&foreign_labels), owned(&foreign_annotations))
    );
    assert_eq!(
        node_patches(&server, "gpu-1") - before,
        1,
        "one removal write"
    );
    replica.stop().await;

    // While no controller runs, gpu-2's slices go, and a node appears that a previous
    // controller labelled but that has no slices now: no deletion event will ever say so.
    wipe_slices(&server, "gpu-2").await;
    let (stale_labels, stale_annotations) = metadata_of(&server, "gpu-2").await;
    assert!(has_any_of_ours(&stale_labels, &stale_annotations));
    let leftover_annotation = stale_annotations[names::ANNOTATION_ALIGNMENT].clone();
    create_node_with(
        &server,
        "old-1",
        &[(names::LABEL_BEST_AFFINITY, "PIX"), ("team", "c")],
        &[(names::ANNOTATION_ALIGNMENT, &leftover_annotation)],
    )
    .await;
    let before: Vec<usize> = ["gpu-1", "gpu-2", "old-1"]
        .iter()
        .map(|n| node_patches(&server, n))
        .collect();
    let replica = Replica::start(&server, "replica-b");
    for (node, kept) in [
        ("gpu-2", owned(&[("team", "b")])),
        ("old-1", owned(&[("team", "c")])),
    ] {
        let (labels, annotations) = eventually("a fresh controller to clean up", || async {
            let (labels, annotations) = metadata_of(&server, node).await;
            (!has_any_of_ours(&labels, &annotations)).then_some((labels, annotations))
        })
        .await;
        assert_eq!(labels, kept, "{node}");
        assert!(annotations.is_empty(), "{node}: {annotations:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<usize> = ["gpu-1", "gpu-2", "old-1"]
        .iter()
        .map(|n| node_patches(&server, n))
        .collect();
    assert_eq!(
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        [0, 1, 1],
        "one write per node that had ours, none for gpu-1 (already clean)"
    );
    assert!(replica.metrics.reconciles(ReconcileKind::Node) > 0);
    assert_eq!(
        node_patches(&server, "cpu-1"),
        0,
        "a node that never had slices"
    );
    assert_eq!(
        metadata_of(&server, "cpu-1").await,
        (
            owned(&[("tandem.dev/owner", "ops")]),
            owned(&foreign_annotations)
        )
    );
    replica.stop().await;
}

#[tokio::test]
async fn rails_stay_stable_as_nodes_join_and_leave_and_across_restarts() {
    let server = FakeApiServer::start().await.unwrap();
    let inventory = dgx();
    let nics = rdma_nic_count(&inventory);
    assert!(nics >= 4, "dgx-h100 has a NIC per rail");
    let rail_subnet = |i: usize| format!("10.{i}.0.0/16");
    for node in ["a", "b", "c", "d", "e"] {
        create_node(&server, node).await;
    }
    let replica = Replica::start(&server, "replica-a");

    // Node a joins: its NICs, in GPU order, become rails 0..n.
    let fleet = with_subnets(slices_for(&inventory, "a"), |i| Some(rail_subnet(i)));
    publish(&server, "a", &fleet).await;
    let first = eventually("the first rails", || async {
        rails(&server).await.filter(|d| d.len() == nics)
    })
    .await;
    for i in 0..nics {
        assert_eq!(rail_for_subnet(&first, &rail_subnet(i)), Some(i as i64));
    }

    // Node b on the same rails changes nothing; node c brings a new subnet in NIC 0's place.
    publish(
        &server,
        "b",
        &with_subnets(slices_for(&inventory, "b"), |i| Some(rail_subnet(i))),
    )
    .await;
    let c = with_subnets(slices_for(&inventory, "c"), |i| {
        Some(if i == 0 {
            "10.200.0.0/16".into()
        } else {
            rail_subnet(i)
        })
    });
    publish(&server, "c", &c).await;
    let second = eventually("a rail for the new subnet", || async {
        rails(&server).await.filter(|d| d.len() == nics + 1)
    })
    .await;
    assert_eq!(rail_for_subnet(&second, "10.200.0.0/16"), Some(nics as i64));
    for i in 0..nics {
        assert_eq!(rail_for_subnet(&second, &rail_subnet(i)), Some(i as i64));
    }

    // Node a leaves; then the controller restarts; then the ConfigMap is deleted by hand.
    publish(&server, "a", &[]).await;
    replica.stop().await;
    let replica = Replica::start(&server, "replica-b");
    let d = with_subnets(slices_for(&inventory, "d"), |i| {
        Some(if i == 1 {
            "10.201.0.0/16".into()
        } else {
            rail_subnet(i)
        })
    });
    publish(&server, "d", &d).await;
    let third = eventually("a rail for the subnet seen after the restart", || async {
        rails(&server).await.filter(|d| d.len() == nics + 2)
    })
    .await;
    assert_eq!(
        rail_for_subnet(&third, "10.201.0.0/16"),
        Some(nics as i64 + 1)
    );
    for (key, value) in &second {
        assert_eq!(third.get(key), Some(value), "rail of {key} moved");
    }
    Api::<ConfigMap>::namespaced(server.client(), NAMESPACE)
        .delete(names::RAILS_CONFIGMAP, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the rail ConfigMap back with the same numbers", || async {
        rails(&server).await.filter(|d| *d == third)
    })
    .await;

    // Node e has two NICs on one subnet: an Event, and its other new subnet gets no rail.
    let e = with_subnets(slices_for(&inventory, "e"), |i| {
        Some(match i {
            0 | 1 => rail_subnet(0),
            2 => "10.202.0.0/16".into(),
            _ => rail_subnet(i),
        })
    });
    publish(&server, "e", &e).await;
    let events = eventually("a RailMismatch event on e", || async {
        let events = node_events(&server, "e", names::REASON_RAIL_MISMATCH).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    let message = events[0].message.clone().unwrap();
    assert!(message.contains(&rail_subnet(0)), "{message}");
    assert_eq!(rails(&server).await, Some(third.clone()));
    replica.stop().await;
}

#[tokio::test]
async fn one_leader_acts_and_a_standby_takes_over() {
    let server = FakeApiServer::start().await.unwrap();
    let a = Replica::start(&server, "replica-a");
    let b = Replica::start(&server, "replica-b");
    let holder = eventually("a lease holder", || lease_holder(&server)).await;
    let classes: Api<DeviceClass> = Api::all(server.client());
    eventually("the classes", || async {
        classes.get_opt(names::DEVICE_CLASS_NIC).await.unwrap()
    })
    .await;
    let (leader, standby) = if holder == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    // For a while, exactly one replica leads and only it reconciles.
    for _ in 0..40 {
        assert!(leader.metrics.is_leader());
        assert!(!standby.metrics.is_leader());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(leader.reconciles() > 0);
    assert_eq!(standby.reconciles(), 0, "the standby never acts");

    // The leader dies without releasing the lease; the standby leads within the lease time.
    leader.task.abort();
    let killed = Instant::now();
    classes
        .delete(names::DEVICE_CLASS_GPU, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the standby to restore the class", || async {
        classes.get_opt(names::DEVICE_CLASS_GPU).await.unwrap()
    })
    .await;
    let takeover = killed.elapsed();
    // The standby waits out the lease from the last renewal (at most the lease duration),
    // clears the expired holder, waits 100-1000 ms (kube-lease-manager's spread against
    // racing standbys), then takes it.
    assert!(
        takeover < LEASE + Duration::from_millis(1500),
        "takeover took {takeover:?}"
    );
    assert!(standby.metrics.is_leader());
    assert!(standby.reconciles() > 0);
    assert_ne!(lease_holder(&server).await, Some(holder));

    // A graceful stop releases the lease: a third replica leads well before it would expire.
    let third = Replica::start(&server, "replica-c");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.metrics.is_leader());
    let stopped = Instant::now();
    standby.stop().await;
    eventually("the third replica to lead", || async {
        (lease_holder(&server).await.as_deref() == Some("replica-c")).then_some(())
    })
    .await;
    assert!(stopped.elapsed() < LEASE, "took {:?}", stopped.elapsed());
    third.stop().await;
    assert_eq!(lease_holder(&server).await, None, "released on shutdown");
}

#[test]
fn example_claims_parse_and_name_our_classes_and_attributes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let pair_group = names::driver_qualified(DRIVER, names::ATTR_PAIR_GROUP);
    let pair_set = names::driver_qualified(DRIVER, names::ATTR_PAIR_SET);
    let mut templates = 0;
    let mut shared_nic = false;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut pods = Vec::new();
        let mut file_templates = Vec::new();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
            match value["kind"].as_str() {
                Some("ResourceClaimTemplate") => file_templates
                    .push(serde_json::from_value::<ResourceClaimTemplate>(value).unwrap()),
                Some("Pod") => pods.push(serde_json::from_value::<Pod>(value).unwrap()),
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
        }
        assert_eq!(
            (file_templates.len(), pods.len()),
            (1, 1),
            "{}",
            path.display()
        );
        let template = &file_templates[0];
        let devices = template.spec.spec.devices.as_ref().unwrap();
        let requests = devices.requests.as_ref().unwrap();
        for request in requests {
            // A plain request, or a prioritized list of subrequests (largest NIC set first).
            let classes: Vec<&str> = match &request.exactly {
                Some(exactly) => vec![exactly.device_class_name.as_str()],
                None => request
                    .first_available
                    .iter()
                    .flatten()
                    .map(|sub| sub.device_class_name.as_str())
                    .collect(),
            };
            assert!(!classes.is_empty(), "{}", path.display());
            for class in classes {
                assert!(
                    [names::DEVICE_CLASS_GPU, names::DEVICE_CLASS_NIC].contains(&class),
                    "{}: class {class}",
                    path.display()
                );
            }
        }
        for constraint in devices.constraints.iter().flatten() {
            assert!(
                [pair_group.as_str(), pair_set.as_str()]
                    .contains(&constraint.match_attribute.as_deref().unwrap_or_default()),
                "{}: {:?}",
                path.display(),
                constraint.match_attribute
            );
            for name in constraint.requests.iter().flatten() {
                assert!(
                    requests.iter().any(|r| r.name == *name),
                    "{}: {name}",
                    path.display()
                );
            }
        }
        for config in devices.config.iter().flatten() {
            let entry = DeviceAllocationConfiguration {
                source: "FromClaim".into(),
                opaque: config.opaque.clone(),
                requests: config.requests.clone(),
            };
            let request_names: Vec<&str> = requests.iter().map(|r| r.name.as_str()).collect();
            let resolved =
                tandem::prepare::config::resolve(DRIVER, &[entry], &request_names).unwrap();
            shared_nic |= resolved
                .values()
                .any(|c| c.nic_attach == tandem::prepare::config::NicAttach::Shared);
        }
        let pod = &pods[0];
        let claims = pod.spec.as_ref().unwrap().resource_claims.as_ref().unwrap();
        assert_eq!(
            claims[0].resource_claim_template_name.as_deref(),
            template.metadata.name.as_deref(),
            "{}",
            path.display()
        );
        templates += 1;
    }
    assert_eq!(templates, 5);
    assert!(shared_nic, "one example attaches the GPU's NIC shared");
}
