//! Cluster controller at fleet scale (`cargo bench --bench controller`): N nodes with 16
//! devices each (8 GPUs, 8 RDMA NICs) in the in-process fake apiserver, the controller in a
//! child process. Measures the first full reconcile (every Node labelled, from process start),
//! the time to reflect one node's change in its labels, and the controller's resident memory.
//! Prints a Markdown table.
//! `TANDEM_BENCH_NODES` overrides the node count (default 5000).

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, PostParams};
use std::time::{Duration, Instant};
use tandem::apiserver_fake::FakeApiServer;
use tandem::controller::{Controller, ControllerConfig};
use tandem::fixture::{scratch_dir, synthetic, write_machine};
use tandem::names;
use tandem::slices::{NodeIdentity, SliceOptions, build_slices};
use tandem::sysfs::discover;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::Publisher;
use tokio_util::sync::CancellationToken;

const DRIVER: &str = names::DEFAULT_DRIVER_NAME;

/// Current and peak resident set size of process `pid` in MiB, from the kernel's accounting.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The child side: only the controller, against the fake at `url`, until killed. A process
/// of its own, so its memory is not mixed with the fake apiserver's.
fn controller_child(url: &str) {
    // RUST_LOG (e.g. `tandem::controller=info`) shows the controller's log on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let config = kube::Config::new(url.parse().expect("fake url"));
        let client = kube::Client::try_from(config).expect("client");
        let controller = Controller::new(client, ControllerConfig::new("bench"));
        controller.run(CancellationToken::new()).await;
    });
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

fn node_patches(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH /api/v1/nodes/"))
        .count()
}

async fn populate(server: &FakeApiServer, inventory: &Inventory, nodes: usize) {
    let node_api: Api<Node> = Api::all(server.client());
    let slice_api: Api<ResourceSlice> = Api::all(server.client());
    futures::stream::iter(0..nodes)
        .for_each_concurrent(32, |i| {
            let (node_api, slice_api) = (node_api.clone(), slice_api.clone());
            async move {
                let name = format!("node-{i:05}");
                let node: Node = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
                }))
                .expect("node object");
                node_api
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("create node");
                for slice in slices_for(inventory, &name) {
                    slice_api
                        .create(&PostParams::default(), &slice)
                        .await
                        .expect("create slice");
                }
            }
        })
        .await;
}

async fn run(nodes: usize) {
    let dir = scratch_dir().expect("scratch dir");
    let roots = write_machine(&synthetic(8, 8), dir.path()).expect("write fixture");
    let inventory = discover(&roots).expect("discover");
    let server = FakeApiServer::start().await.expect("fake apiserver");
    let t_setup = Instant::now();
    populate(&server, &inventory, nodes).await;
    let setup = t_setup.elapsed();

    let exe = std::env::current_exe().expect("own executable");
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .env(CHILD_ENV, server.url())
        .kill_on_drop(true)
        .spawn()
        .expect("controller process");
    let pid = child.id().expect("child pid");
    while node_patches(&server) < nodes {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let full = t0.elapsed();
    let (rss_full, _) = rss_mib(pid);

    // One node's first NIC goes down.
    let mut down = inventory.clone();
    if let Some(rdma) = down.nics.iter_mut().find_map(|n| n.rdma.as_mut())
        && let Some(port) = rdma.ports.first_mut()
    {
        port.state = Some("DOWN".into());
    }
    let changed = "node-00000";
    let node_api: Api<Node> = Api::all(server.client());
    let label = |n: &Node| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(names::LABEL_RDMA_NICS).cloned())
    };
    let before = label(&node_api.get(changed).await.expect("get node"));
    let t1 = Instant::now();
    Publisher::new(server.client(), DRIVER, changed)
        .publish(&slices_for(&down, changed))
        .await
        .expect("publish change");
    loop {
        if label(&node_api.get(changed).await.expect("get node")) != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let one = t1.elapsed();
    let (rss, peak) = rss_mib(pid);
    let _ = child.kill().await;
    println!(
        "| {nodes} x {} | {:.1} | {:.2} | {:.0} | {:.0} / {:.0} | {:.0} |",
        inventory.accelerators.len() + inventory.nics.len(),
        setup.as_secs_f64(),
        full.as_secs_f64(),
        one.as_secs_f64() * 1000.0,
        rss_full,
        rss,
        peak,
    );
}

const CHILD_ENV: &str = "TANDEM_BENCH_CONTROLLER_URL";

fn main() {
    if let Ok(url) = std::env::var(CHILD_ENV) {
        controller_child(&url);
        return;
    }
    // `cargo test --benches` runs this with `--test`; keep that fast.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let nodes: usize = std::env::var("TANDEM_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!(
        "| nodes x devices | fake setup s | first full reconcile s | one node change ms | controller RSS MiB (after reconcile / after change) | controller peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    runtime.block_on(run(nodes));
}
