//! Claim preparation over the real kubelet socket (`cargo bench --bench plugin`): the release
//! `tandem plugin` binary runs as a child against the in-process apiserver fake, and a tonic
//! client acting as the kubelet prepares and unprepares claims of 8 GPUs + 8 NICs, one at a
//! time and 16 at once, and 8 one-GPU claims sequentially, in 8 parallel calls and in one call.
//! Then the same three modes through an in-process `Preparer`, counting its disk flushes
//! (fsync/fdatasync). Also reports the idle plugin's resident memory. Prints Markdown rows.

use std::path::Path;
use std::time::{Duration, Instant};
#[path = "../tests/support/plugin_process.rs"]
mod plugin_process;

use plugin_process::plugin_command;
use tandem::apiserver_fake::FakeApiServer;
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::fixture::{self, MachineDescription};
use tandem::names;
use tandem::sysfs::discover;
use tandem::topology::pair_node;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodeUnprepareResourcesRequest,
    dra_plugin_client::DraPluginClient,
};
use tonic::transport::Channel;

const NAMESPACE: &str = "bench";

struct Node {
    _scratch: tempfile::TempDir,
    _state: tempfile::TempDir,
    child: tokio::process::Child,
    client: DraPluginClient<Channel>,
    claims: Vec<Claim>,
    /// Connections the apiserver fake had accepted before the plugin started.
    connections_before: u64,
}

/// Starts the plugin on `description` with `claims` claims of `per_claim` paired GPUs + NICs
/// each; with `vendor_spec`, the GPUs also have the vendor's CDI spec, as `nvidia-ctk cdi
/// generate` writes it on an NVIDIA node, in a directory of their own (otherwise the plugin
/// looks in its default /etc/cdi and /var/run/cdi, empty on a bench machine).
async fn start(
    apiserver: &FakeApiServer,
    node_name: &str,
    description: &MachineDescription,
    claims: usize,
    per_claim: usize,
    vendor_spec: bool,
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
    for (i, chunk) in pairs.chunks(per_claim).take(claims).enumerate() {
        assert_eq!(
            chunk.len(),
            per_claim,
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
        let uid = allocate(apiserver, node_name, &name, &requests).await;
        made.push(Claim {
            namespace: NAMESPACE.into(),
            name,
            uid,
        });
    }
    assert_eq!(made.len(), claims);

    let connections_before = apiserver.connection_count();
    let mut command = plugin_command(node_name, scratch.path(), state.path(), &roots, &kubeconfig);
    if vendor_spec {
        let vendor_dir = scratch.path().join("vendor-cdi");
        std::fs::create_dir_all(&vendor_dir).expect("vendor dir");
        let spec = fixture::nvidia_ctk_spec(&inventory, fixture::NvidiaNaming::IndexAndUuid);
        std::fs::write(vendor_dir.join("nvidia.yaml"), spec).expect("vendor spec");
        command.arg("--vendor-cdi-dirs").arg(&vendor_dir);
    }
    let child = command
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
        connections_before,
    }
}

/// Creates claim `name` on `node` allocated as `requests` say; its UID.
async fn allocate(
    apiserver: &FakeApiServer,
    node: &str,
    name: &str,
    requests: &[ClaimRequest],
) -> String {
    let created = create_allocated_claim(
        &apiserver.client(),
        NAMESPACE,
        name,
        names::DEFAULT_DRIVER_NAME,
        node,
        requests,
    )
    .await
    .expect("claim");
    created.metadata.uid.expect("uid")
}

async fn prepare(client: &mut DraPluginClient<Channel>, claim: &Claim) -> Duration {
    prepare_all(client, std::slice::from_ref(claim), 16).await
}

async fn unprepare(client: &mut DraPluginClient<Channel>, claim: &Claim) -> Duration {
    unprepare_all(client, std::slice::from_ref(claim)).await
}

/// One NodePrepareResources for `claims`, each of which must get `devices` devices.
async fn prepare_all(
    client: &mut DraPluginClient<Channel>,
    claims: &[Claim],
    devices: usize,
) -> Duration {
    let t = Instant::now();
    let response = client
        .node_prepare_resources(NodePrepareResourcesRequest {
            claims: claims.to_vec(),
        })
        .await
        .expect("prepare rpc")
        .into_inner();
    let elapsed = t.elapsed();
    for claim in claims {
        let result = &response.claims[&claim.uid];
        assert!(result.error.is_empty(), "{}", result.error);
        assert_eq!(result.devices.len(), devices);
    }
    elapsed
}

async fn unprepare_all(client: &mut DraPluginClient<Channel>, claims: &[Claim]) -> Duration {
    let t = Instant::now();
    let response = client
        .node_unprepare_resources(NodeUnprepareResourcesRequest {
            claims: claims.to_vec(),
        })
        .await
        .expect("unprepare rpc")
        .into_inner();
    let elapsed = t.elapsed();
    for claim in claims {
        assert!(response.claims[&claim.uid].error.is_empty());
    }
    elapsed
}

/// Per-call latencies of `rounds` rounds: all claims prepared in parallel calls (one claim
/// each, all on the one connection, as the kubelet sends the calls of different pods), then
/// all unprepared the same way; and each round's wall time.
async fn parallel_rounds(
    node: &Node,
    rounds: usize,
    devices: usize,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (mut prep, mut unprep, mut prep_rounds, mut unprep_rounds) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        for unprepare_now in [false, true] {
            let t = Instant::now();
            let tasks: Vec<_> = node
                .claims
                .iter()
                .cloned()
                .map(|claim| {
                    let mut client = node.client.clone();
                    tokio::spawn(async move {
                        let one = std::slice::from_ref(&claim);
                        if unprepare_now {
                            unprepare_all(&mut client, one).await
                        } else {
                            prepare_all(&mut client, one, devices).await
                        }
                    })
                })
                .collect();
            for task in tasks {
                let d = task.await.expect("task");
                if unprepare_now {
                    &mut unprep
                } else {
                    &mut prep
                }
                .push(d);
            }
            if unprepare_now {
                &mut unprep_rounds
            } else {
                &mut prep_rounds
            }
            .push(t.elapsed());
        }
    }
    (prep, unprep, prep_rounds, unprep_rounds)
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// CPU time (user + system, all threads) of process `pid` so far, in ms (10 ms ticks).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
        .unwrap_or_default();
    // Fields after the command name, which ends at the last ')': state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 10.0
}

/// The number after `name` in a `/proc/.../status` text, 0 when absent.
fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Context switches of the process's live threads so far, voluntary (a thread waited: a
/// futex, a socket, a flush) and not. A thread that exits takes its count with it, so take
/// differences with `saturating_sub`.
fn context_switches(pid: u32) -> u64 {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status_field(&status, "voluntary_ctxt_switches:")
                + status_field(&status, "nonvoluntary_ctxt_switches:")
        })
        .sum()
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
        .unwrap_or_default();
    (
        status_field(&status, "VmRSS:"),
        status_field(&status, "VmHWM:"),
    )
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    // TANDEM_BENCH_APISERVER_TLS=1: the fake serves HTTPS with h2 offered by ALPN, as a real
    // apiserver does (the claim GETs then go over TLS, multiplexed on one HTTP/2 connection);
    // otherwise plain HTTP/1.1, as in the earlier rows of BENCHMARKS.md.
    let apiserver = if std::env::var("TANDEM_BENCH_APISERVER_TLS").as_deref() == Ok("1") {
        FakeApiServer::start_tls().await
    } else {
        FakeApiServer::start().await
    }
    .expect("apiserver");
    if let Some(cycles) = std::env::var("TANDEM_BENCH_FOOTPRINT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return footprint(&apiserver, cycles).await;
    }
    const ROUNDS: usize = 200;
    // TANDEM_BENCH_ONLY=small: only the 8 one-GPU claims, for profiling that path
    // (TANDEM_BENCH_ROUNDS of each mode).
    if std::env::var("TANDEM_BENCH_ONLY").as_deref() == Ok("small") {
        let rounds = std::env::var("TANDEM_BENCH_ROUNDS").ok();
        return small_claims(
            &apiserver,
            rounds.and_then(|r| r.parse().ok()).unwrap_or(ROUNDS),
        )
        .await;
    }

    // Sequential: one claim of the 8 DGX H100 GPUs with their rail HCAs.
    let mut node = start(
        &apiserver,
        "dgx-h100",
        &fixture::builtin("dgx-h100").expect("fixture"),
        1,
        8,
        false,
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

    // 16 in parallel: 16 claims of 8 + 8 on a 128-GPU synthetic node, each in a call of its
    // own on the one connection, as the kubelet sends concurrent pod starts.
    let node = start(
        &apiserver,
        "synthetic-256",
        &fixture::synthetic(128, 128),
        16,
        8,
        false,
    )
    .await;
    let (prep, unprep, _, _) = parallel_rounds(&node, (ROUNDS / 16).max(4), 16).await;
    let calls = prep.len();
    let (p50, p99) = percentiles(prep);
    println!("| prepare 8 GPUs + 8 NICs | 16 in parallel | {p50:.2} | {p99:.2} | {calls} |");
    let (p50, p99) = percentiles(unprep);
    println!("| unprepare | 16 in parallel | {p50:.2} | {p99:.2} | {calls} |");
    let Node { mut child, .. } = node;
    child.kill().await.ok();

    small_claims(&apiserver, ROUNDS).await;

    println!();
    println!("| plugin memory (dgx-h100) | KiB |");
    println!("|---|---:|");
    println!("| idle RSS after start | {idle_rss} |");
    println!("| RSS after {ROUNDS} prepare/unprepare rounds | {rss_after} |");
    println!("| peak RSS (VmHWM) | {hwm} |");

    flushes(&apiserver).await;
}

/// 8 one-GPU claims (each GPU with its rail NIC) on the DGX H100: one claim per call one after
/// another, 8 calls at once, and all 8 in one call; `rounds` of each.
async fn small_claims(apiserver: &FakeApiServer, rounds: usize) {
    let mut node = start(
        apiserver,
        "dgx-h100-small",
        &fixture::builtin("dgx-h100").expect("fixture"),
        8,
        1,
        false,
    )
    .await;
    let claims = node.claims.clone();
    let pid = node.child.id().expect("pid");
    let switches_before = context_switches(pid);
    let (mut prep, mut unprep) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let claim = &claims[round % claims.len()];
        prep.push(prepare_all(&mut node.client, std::slice::from_ref(claim), 2).await);
        unprep.push(unprepare_all(&mut node.client, std::slice::from_ref(claim)).await);
    }
    println!();
    println!("| 8 one-GPU claims (GPU + rail NIC each) | mode | p50 ms | p99 ms | calls |");
    println!("|---|---|---:|---:|---:|");
    let (p50, p99) = percentiles(prep);
    println!("| prepare, one claim per call | sequential | {p50:.2} | {p99:.2} | {rounds} |");
    let (p50, p99) = percentiles(unprep);
    println!("| unprepare, one claim per call | sequential | {p50:.2} | {p99:.2} | {rounds} |");
    let sequential_switches = context_switches(pid).saturating_sub(switches_before);
    let cpu_before = (cpu_ms(pid), cpu_ms(std::process::id()));
    let switches_before = context_switches(pid);
    let (prep, unprep, prep_rounds, unprep_rounds) = parallel_rounds(&node, rounds, 2).await;
    let parallel_switches = context_switches(pid).saturating_sub(switches_before);
    let cpu_after = (cpu_ms(pid), cpu_ms(std::process::id()));
    let calls = prep.len();
    let (p50, p99) = percentiles(prep);
    println!(
        "| prepare, 8 parallel calls: each call | 8 in parallel | {p50:.2} | {p99:.2} | {calls} |"
    );
    let (p50, p99) = percentiles(prep_rounds);
    println!(
        "| prepare, 8 parallel calls: whole round | 8 in parallel | {p50:.2} | {p99:.2} | {rounds} |"
    );
    let (p50, p99) = percentiles(unprep);
    println!(
        "| unprepare, 8 parallel calls: each call | 8 in parallel | {p50:.2} | {p99:.2} | {calls} |"
    );
    let (p50, p99) = percentiles(unprep_rounds);
    println!(
        "| unprepare, 8 parallel calls: whole round | 8 in parallel | {p50:.2} | {p99:.2} | {rounds} |"
    );
    // Where the CPU of the parallel rounds went: the plugin, and this process (the kubelet
    // client and the apiserver fake, which on a real node run elsewhere), per round of a
    // prepare and an unprepare.
    let per_round = |before: f64, after: f64| (after - before) / rounds as f64;
    println!(
        "| CPU per round of 8 parallel prepares + 8 unprepares: plugin / client + apiserver fake | ms | {:.2} / {:.2} | | {rounds} |",
        per_round(cpu_before.0, cpu_after.0),
        per_round(cpu_before.1, cpu_after.1)
    );
    // Each one a futex wait or a wait for I/O of some thread of the plugin, and its wake-up:
    // on this VM a hand-off between threads costs more than most steps of a prepare.
    println!(
        "| plugin context switches per prepare + unprepare: sequential / 8 parallel calls | count | {:.1} / {:.1} | | {rounds} |",
        sequential_switches as f64 / rounds as f64,
        parallel_switches as f64 / (rounds * claims.len()) as f64
    );
    let (mut prep, mut unprep) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        prep.push(prepare_all(&mut node.client, &claims, 2).await);
        unprep.push(unprepare_all(&mut node.client, &claims).await);
    }
    let (p50, p99) = percentiles(prep);
    println!("| prepare, 8 claims in one call | one call | {p50:.2} | {p99:.2} | {rounds} |");
    let (p50, p99) = percentiles(unprep);
    println!("| unprepare, 8 claims in one call | one call | {p50:.2} | {p99:.2} | {rounds} |");
    // Each one a TCP (and, over HTTPS, TLS) handshake with the apiserver.
    println!(
        "| connections the plugin opened to the apiserver, all modes | count | {} | | |",
        apiserver.connection_count() - node.connections_before
    );
    node.child.kill().await.ok();

    // The same sequential calls on a node whose GPUs have the vendor's CDI spec, which every
    // prepare checks for changes and matches against the inventory.
    let mut node = start(
        apiserver,
        "dgx-h100-vendor",
        &fixture::builtin("dgx-h100").expect("fixture"),
        8,
        1,
        true,
    )
    .await;
    let claims = node.claims.clone();
    // The vendor's device is matched: the GPU's answer lists it before ours.
    let answer = node
        .client
        .node_prepare_resources(NodePrepareResourcesRequest {
            claims: vec![claims[0].clone()],
        })
        .await
        .expect("prepare rpc")
        .into_inner();
    let ids: Vec<&String> = answer.claims[&claims[0].uid]
        .devices
        .iter()
        .flat_map(|d| &d.cdi_device_ids)
        .collect();
    assert!(
        ids.iter().any(|id| id.starts_with("nvidia.com/gpu=")),
        "no vendor device in {ids:?}"
    );
    unprepare_all(&mut node.client, &claims[..1]).await;
    let mut prep = Vec::new();
    for round in 0..rounds {
        let claim = &claims[round % claims.len()];
        prep.push(prepare_all(&mut node.client, std::slice::from_ref(claim), 2).await);
        unprepare_all(&mut node.client, std::slice::from_ref(claim)).await;
    }
    let (p50, p99) = percentiles(prep);
    println!(
        "| prepare, one claim per call, with the vendor's CDI spec (nvidia-ctk, 8 GPUs) | sequential | {p50:.2} | {p99:.2} | {rounds} |"
    );
    node.child.kill().await.ok();
}

/// Disk flushes per call, counted in-process (`tandem::prepare::flush_count`) around the same
/// Preparer the plugin runs, over the same 8 one-GPU claims and state on disk.
async fn flushes(apiserver: &FakeApiServer) {
    use tandem::prepare::{ClaimRef, PrepareConfig, Preparer, flush_count};
    let scratch = fixture::scratch_dir().expect("scratch dir");
    let state = tempfile::tempdir().expect("state dir");
    let node_name = "dgx-h100-flush";
    let roots = fixture::write_machine(
        &fixture::builtin("dgx-h100").expect("fixture"),
        &scratch.path().join("machine"),
    )
    .expect("fixture");
    let inventory = discover(&roots).expect("discover");
    let pairs = pair_node(&inventory).pairs;
    let mut claims = Vec::new();
    for (i, pair) in pairs.iter().take(8).enumerate() {
        let name = format!("{node_name}-{i}");
        let requests = [
            ClaimRequest {
                name: "gpus".into(),
                device_class: names::DEVICE_CLASS_GPU.into(),
                devices: vec![names::accelerator_device_name(&pair.accelerator)],
            },
            ClaimRequest {
                name: "nics".into(),
                device_class: names::DEVICE_CLASS_NIC.into(),
                devices: vec![names::nic_device_name(&pair.nic)],
            },
        ];
        let uid = allocate(apiserver, node_name, &name, &requests).await;
        claims.push(ClaimRef {
            namespace: NAMESPACE.into(),
            name,
            uid,
        });
    }
    let config = PrepareConfig {
        cdi_dir: scratch.path().join("cdi"),
        state_dir: state.path().to_path_buf(),
        topology_dir: scratch.path().join("run"),
        proc_root: roots.proc.clone(),
        ..PrepareConfig::new(names::DEFAULT_DRIVER_NAME, node_name)
    };
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(inventory));
    let preparer =
        std::sync::Arc::new(Preparer::new(config, apiserver.client(), rx).expect("preparer"));
    preparer.recover().await.expect("recover");
    const ROUNDS: usize = 25;
    let (mut seq, mut par, mut one) = ([0u64; 2], [0u64; 2], [0u64; 2]);
    for _ in 0..ROUNDS {
        for c in &claims {
            let before = flush_count();
            assert!(preparer.prepare(std::slice::from_ref(c)).await[&c.uid].is_ok());
            seq[0] += flush_count() - before;
            let before = flush_count();
            assert!(preparer.unprepare(std::slice::from_ref(c)).await[&c.uid].is_ok());
            seq[1] += flush_count() - before;
        }
        for (i, slot) in par.iter_mut().enumerate() {
            let before = flush_count();
            let calls = claims.iter().cloned().map(|c| {
                let preparer = preparer.clone();
                tokio::spawn(async move {
                    let one = std::slice::from_ref(&c);
                    if i == 0 {
                        preparer.prepare(one).await[&c.uid].is_ok()
                    } else {
                        preparer.unprepare(one).await[&c.uid].is_ok()
                    }
                })
            });
            for ok in futures::future::join_all(calls).await {
                assert!(ok.expect("task"));
            }
            *slot += flush_count() - before;
        }
        let before = flush_count();
        let answers = preparer.prepare(&claims).await;
        assert!(answers.values().all(Result::is_ok));
        one[0] += flush_count() - before;
        let before = flush_count();
        let answers = preparer.unprepare(&claims).await;
        assert!(answers.values().all(Result::is_ok));
        one[1] += flush_count() - before;
    }
    let per_call = |total: u64, calls: usize| total as f64 / calls as f64;
    let n = ROUNDS * claims.len();
    println!();
    println!(
        "| flushes (fsync + fdatasync), in-process Preparer, 8 one-GPU claims | prepare, per call | unprepare, per call | calls |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| one claim per call, sequential | {:.2} | {:.2} | {n} |",
        per_call(seq[0], n),
        per_call(seq[1], n)
    );
    println!(
        "| 8 parallel calls of one claim | {:.2} | {:.2} | {n} |",
        per_call(par[0], n),
        per_call(par[1], n)
    );
    println!(
        "| 8 claims in one call | {:.2} | {:.2} | {ROUNDS} |",
        per_call(one[0], ROUNDS),
        per_call(one[1], ROUNDS)
    );
}

/// How long the footprint run leaves the plugin idle after its cycles before the last sample.
const IDLE_AFTER_CYCLES: Duration = Duration::from_secs(15);

/// `hack/footprint.sh`: the plugin's resident memory idle on dgx-h100, after `cycles`
/// prepare/unprepare rounds of one 8 GPU + 8 NIC claim, and idle again after them.
async fn footprint(apiserver: &FakeApiServer, cycles: usize) {
    let mut node = start(
        apiserver,
        "dgx-h100",
        &fixture::builtin("dgx-h100").expect("fixture"),
        1,
        8,
        false,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = node.child.id().expect("pid");
    let (idle_rss, _) = rss_kib(pid);
    let idle_parts = rss_parts(pid);
    let claim = node.claims[0].clone();
    let mut samples = Vec::new();
    for cycle in 1..=cycles {
        prepare(&mut node.client, &claim).await;
        unprepare(&mut node.client, &claim).await;
        if cycle % (cycles / 4).max(1) == 0 {
            samples.push((cycle, rss_kib(pid).0, rss_parts(pid)));
        }
    }
    // Then idle again, past the blocking pool's keep-alive (10 s), as a node between bursts
    // of pod starts: what the agent keeps of the work it did.
    tokio::time::sleep(IDLE_AFTER_CYCLES).await;
    let (idle_after, hwm) = rss_kib(pid);
    let idle_after_parts = rss_parts(pid);
    println!("| plugin memory (dgx-h100) | KiB |");
    println!("|---|---:|");
    println!("| idle RSS after start | {idle_rss} |");
    for (cycle, rss, _) in &samples {
        println!("| RSS after {cycle} prepare/unprepare cycles | {rss} |");
    }
    println!(
        "| idle RSS {} s after the last cycle | {idle_after} |",
        IDLE_AFTER_CYCLES.as_secs()
    );
    println!("| peak RSS (VmHWM) | {hwm} |");
    println!();
    // Each part at each sample: a leak grows the anonymous part without end; the binary's
    // own file pages grow only until every path taken has been paged in.
    print!("| RSS by part (`/proc/<pid>/smaps`), KiB | idle |");
    for (cycle, _, _) in &samples {
        print!(" after {cycle} cycles |");
    }
    println!(" idle after |");
    println!("|---|---:|{}", "---:|".repeat(samples.len() + 1));
    for (i, (part, idle)) in idle_parts.into_iter().enumerate() {
        print!("| {part} | {idle} |");
        for (_, _, parts) in &samples {
            print!(" {} |", parts[i].1);
        }
        println!(" {} |", idle_after_parts[i].1);
    }
    node.child.kill().await.ok();
}

/// The process's resident memory by part, from `/proc/<pid>/smaps`: anonymous pages (heap,
/// stacks, relocated data), the clean file pages of its own binary and of everything else it
/// maps (libc, ld.so).
fn rss_parts(pid: u32) -> Vec<(&'static str, u64)> {
    let proc = Path::new("/proc").join(pid.to_string());
    let exe = std::fs::read_link(proc.join("exe")).unwrap_or_default();
    let smaps = std::fs::read_to_string(proc.join("smaps")).unwrap_or_default();
    let (mut anon, mut own_file, mut other_file, mut total) = (0, 0, 0, 0);
    let mut is_own = false;
    let kib = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut rss = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header line: its path is the last field, if any.
            is_own = line
                .split_whitespace()
                .nth(5)
                .is_some_and(|path| Path::new(path) == exe);
        } else if first == "Rss:" {
            rss = kib(line);
            total += rss;
        } else if first == "Anonymous:" {
            let a = kib(line);
            anon += a;
            if is_own {
                own_file += rss - a;
            } else {
                other_file += rss - a;
            }
        }
    }
    vec![
        ("total", total),
        ("anonymous (heap, stacks, relocated data)", anon),
        ("clean file pages of the tandem binary", own_file),
        ("clean file pages of shared libraries", other_file),
    ]
}
