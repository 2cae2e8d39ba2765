//! Claim preparation over the real kubelet socket (`cargo bench --bench plugin`): the release
//! `tandem plugin` binary runs as a child against the in-process apiserver fake, and a tonic
//! client acting as the kubelet prepares and unprepares claims of 8 GPUs + 8 NICs, one at a
//! time and 16 at once. Also reports the idle plugin's resident memory. Prints Markdown rows.

use std::path::Path;
use std::time::{Duration, Instant};
#[path = "../tests/support/plugin_process.rs"]
mod plugin_process;

use plugin_process::plugin_command;
use tandem::apiserver_fake::FakeApiServer;
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::fixture::{self, MachineDescription};
use tandem::names;
use tandem::plugin::client::unix_channel;
use tandem::plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodeUnprepareResourcesRequest,
    dra_plugin_client::DraPluginClient,
};
use tandem::sysfs::discover;
use tandem::topology::pair_node;
use tonic::transport::Channel;

const NAMESPACE: &str = "bench";

struct Node {
    _scratch: tempfile::TempDir,
    _state: tempfile::TempDir,
    child: tokio::process::Child,
    client: DraPluginClient<Channel>,
    claims: Vec<Claim>,
}

/// Starts the plugin on `description` with `claims` claims of 8 paired GPUs + NICs each.
async fn start(
    apiserver: &FakeApiServer,
    node_name: &str,
    description: &MachineDescription,
    claims: usize,
) -> Node {
    let scratch = fixture::scratch_dir().expect("scratch dir");
    // The checkpoint lives on disk as it does on a node (/var/lib/tandem); CDI specs on tmpfs
    // as /var/run/cdi is.
    let state = tempfile::tempdir().expect("state dir");
    let roots =
        fixture::write_machine(description, &scratch.path().join("machine")).expect("fixture");
    let inventory = discover(&roots).expect("discover");
    let pairs = pair_node(&inventory).pairs;
    let kubeconfig = scratch.path().join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig).expect("kubeconfig");

    // The Node object, so the plugin's slices get their owner reference as on a cluster.
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(apiserver.client());
    let node_object: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": node_name } }))
            .expect("node");
    nodes
        .create(&Default::default(), &node_object)
        .await
        .expect("create node");

    let mut made = Vec::new();
    for (i, chunk) in pairs.chunks(8).take(claims).enumerate() {
        assert_eq!(
            chunk.len(),
            8,
            "fixture too small for {claims} claims of 8 pairs"
        );
        let name = format!("{node_name}-claim-{i}");
        let requests = [
            ClaimRequest {
                name: "gpus".into(),
                device_class: names::DEVICE_CLASS_GPU.into(),
                devices: chunk
                    .iter()
                    .map(|p| names::accelerator_device_name(&p.accelerator))
                    .collect(),
            },
            ClaimRequest {
                name: "nics".into(),
                device_class: names::DEVICE_CLASS_NIC.into(),
                devices: chunk
                    .iter()
                    .map(|p| names::nic_device_name(&p.nic))
                    .collect(),
            },
        ];
        let created = create_allocated_claim(
            &apiserver.client(),
            NAMESPACE,
            &name,
            names::DEFAULT_DRIVER_NAME,
            node_name,
            &requests,
        )
        .await
        .expect("claim");
        made.push(Claim {
            namespace: NAMESPACE.into(),
            name,
            uid: created.metadata.uid.expect("uid"),
        });
    }
    assert_eq!(made.len(), claims);

    let child = plugin_command(node_name, scratch.path(), state.path(), &roots, &kubeconfig)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn tandem plugin");
    let socket = scratch.path().join("plugins/tandem.dev/dra.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        if let Ok(channel) = unix_channel(&socket).await {
            break DraPluginClient::new(channel);
        }
        assert!(Instant::now() < deadline, "plugin did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Node {
        _scratch: scratch,
        _state: state,
        child,
        client,
        claims: made,
    }
}

async fn prepare(client: &mut DraPluginClient<Channel>, claim: &Claim) -> Duration {
    let t = Instant::now();
    let response = client
        .node_prepare_resources(NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .expect("prepare rpc")
        .into_inner();
    let result = &response.claims[&claim.uid];
    assert!(result.error.is_empty(), "{}", result.error);
    assert_eq!(result.devices.len(), 16);
    t.elapsed()
}

async fn unprepare(client: &mut DraPluginClient<Channel>, claim: &Claim) -> Duration {
    let t = Instant::now();
    let response = client
        .node_unprepare_resources(NodeUnprepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await
        .expect("unprepare rpc")
        .into_inner();
    assert!(response.claims[&claim.uid].error.is_empty());
    t.elapsed()
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let apiserver = FakeApiServer::start().await.expect("apiserver");
    const ROUNDS: usize = 200;

    // Sequential: one claim of the 8 DGX H100 GPUs with their rail HCAs.
    let mut node = start(
        &apiserver,
        "dgx-h100",
        &fixture::builtin("dgx-h100").expect("fixture"),
        1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = node.child.id().expect("pid");
    let (idle_rss, _) = rss_kib(pid);
    let claim = node.claims[0].clone();
    let (mut prep, mut unprep) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        prep.push(prepare(&mut node.client, &claim).await);
        unprep.push(unprepare(&mut node.client, &claim).await);
    }
    let (rss_after, hwm) = rss_kib(pid);
    println!("| operation | mode | p50 ms | p99 ms | calls |");
    println!("|---|---|---:|---:|---:|");
    let (p50, p99) = percentiles(prep);
    println!("| prepare 8 GPUs + 8 NICs | sequential | {p50:.2} | {p99:.2} | {ROUNDS} |");
    let (p50, p99) = percentiles(unprep);
    println!("| unprepare | sequential | {p50:.2} | {p99:.2} | {ROUNDS} |");
    node.child.kill().await.ok();

    // 16 in parallel: 16 claims of 8 + 8 on a 128-GPU synthetic node, each on its own
    // connection as concurrent pod starts would be.
    let mut node = start(
        &apiserver,
        "synthetic-256",
        &fixture::synthetic(128, 128),
        16,
    )
    .await;
    let (mut prep, mut unprep) = (Vec::new(), Vec::new());
    for _ in 0..(ROUNDS / 16).max(4) {
        let tasks: Vec<_> = node
            .claims
            .iter()
            .cloned()
            .map(|claim| {
                let mut client = node.client.clone();
                tokio::spawn(async move {
                    let p = prepare(&mut client, &claim).await;
                    let u = unprepare(&mut client, &claim).await;
                    (p, u)
                })
            })
            .collect();
        for t in tasks {
            let (p, u) = t.await.expect("task");
            prep.push(p);
            unprep.push(u);
        }
    }
    let calls = prep.len();
    let (p50, p99) = percentiles(prep);
    println!("| prepare 8 GPUs + 8 NICs | 16 in parallel | {p50:.2} | {p99:.2} | {calls} |");
    let (p50, p99) = percentiles(unprep);
    println!("| unprepare | 16 in parallel | {p50:.2} | {p99:.2} | {calls} |");
    node.child.kill().await.ok();

    println!();
    println!("| plugin memory (dgx-h100) | KiB |");
    println!("|---|---:|");
    println!("| idle RSS after start | {idle_rss} |");
    println!("| RSS after {ROUNDS} prepare/unprepare rounds | {rss_after} |");
    println!("| peak RSS (VmHWM) | {hwm} |");
}
