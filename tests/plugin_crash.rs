//! Crash safety of the real `tandem plugin` binary: while 200 prepare/unprepare calls run over
//! its Unix socket, the process is SIGKILLed at random moments and restarted. Every claim the
//! plugin answered as prepared must keep its CDI spec and checkpoint entry, and no claim it
//! answered as unprepared may leave either behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/plugin_process.rs"]
mod plugin_process;

use plugin_process::plugin_command;
use tandem::apiserver_fake::FakeApiServer;
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::fixture;
use tandem::names;
use tandem::plugin::client::unix_channel;
use tandem::plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodeUnprepareResourcesRequest,
    dra_plugin_client::DraPluginClient,
};
use tandem::prepare::checkpoint::{self, ClaimState};
use tandem::sysfs::{MachineRoots, discover};
use tokio::process::Child;
use tokio::sync::Mutex;

const NODE: &str = "node-crash";
const NAMESPACE: &str = "crash";
const OPERATIONS: usize = 200;
const WORKERS: usize = 4;
/// Kills the run must see before it may end (within its time bound).
const MIN_KILLS: u32 = 8;

/// splitmix64: a seeded, reproducible stream without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the plugin last told the kubelet about a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answered {
    Prepared,
    Unprepared,
    /// The call died with the process: the kubelet would retry, and so do we at the end.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Prepare,
    Unprepare,
}

struct Layout {
    dir: PathBuf,
    roots: MachineRoots,
    kubeconfig: PathBuf,
}

impl Layout {
    fn dra_socket(&self) -> PathBuf {
        self.dir.join("plugins/tandem.dev/dra.sock")
    }
    fn registration_socket(&self) -> PathBuf {
        self.dir.join("plugins_registry/tandem.dev-reg.sock")
    }
    fn cdi_dir(&self) -> PathBuf {
        self.dir.join("cdi")
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn spawn_plugin(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("plugin.log"))
            .unwrap();
        plugin_command(
            NODE,
            &self.dir,
            &self.state_dir(),
            &self.roots,
            &self.kubeconfig,
        )
        .args(["--rescan-period", "1h"])
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .unwrap()
    }
}

/// Connects once the plugin listens; a killed plugin leaves its socket file behind, so the
/// file existing is not enough.
async fn connect(socket: &Path) -> DraPluginClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = unix_channel(socket).await {
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

/// One call as the kubelet makes it; None when the plugin died under it.
async fn call(socket: &Path, claim: &Claim, operation: Operation) -> Option<Answered> {
    let mut client = connect(socket).await;
    match operation {
        Operation::Prepare => {
            let response = client
                .node_prepare_resources(NodePrepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .ok()?
                .into_inner();
            let answer = response
                .claims
                .get(&claim.uid)
                .expect("claim left out of the answer");
            assert_eq!(answer.error, "", "prepare of {} failed", claim.name);
            assert_eq!(answer.devices.len(), 2);
            Some(Answered::Prepared)
        }
        Operation::Unprepare => {
            let response = client
                .node_unprepare_resources(NodeUnprepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .ok()?
                .into_inner();
            let answer = response
                .claims
                .get(&claim.uid)
                .expect("claim left out of the answer");
            assert_eq!(answer.error, "", "unprepare of {} failed", claim.name);
            Some(Answered::Unprepared)
        }
    }
}

fn spec_exists(layout: &Layout, uid: &str) -> bool {
    std::fs::read_dir(layout.cdi_dir()).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(uid))
    })
}

fn check(layout: &Layout, claims: &[Claim], answered: &BTreeMap<String, Answered>) -> usize {
    let (state, _) = checkpoint::load(&layout.state_dir()).unwrap();
    let mut checked = 0;
    for claim in claims {
        let entry = state.claims.get(&claim.uid);
        match answered[&claim.uid] {
            Answered::Prepared => {
                assert!(
                    spec_exists(layout, &claim.uid),
                    "{}: prepared but CDI spec missing",
                    claim.name
                );
                assert_eq!(
                    entry.map(|e| e.state),
                    Some(ClaimState::PrepareCompleted),
                    "{}: prepared but not completed in the checkpoint",
                    claim.name
                );
                checked += 1;
            }
            Answered::Unprepared => {
                assert!(
                    !spec_exists(layout, &claim.uid),
                    "{}: unprepared but CDI spec left",
                    claim.name
                );
                assert!(
                    entry.is_none(),
                    "{}: unprepared but still checkpointed",
                    claim.name
                );
                checked += 1;
            }
            Answered::Unknown => {}
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_prepare_and_unprepare_loses_nothing() {
    let seed = std::env::var("TANDEM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a9d_e11a_u64);
    eprintln!("crash test seed {seed} (set TANDEM_CRASH_SEED to replay)");
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let roots = fixture::write_machine(
        &fixture::builtin("dgx-h100").unwrap(),
        &dir.path().join("machine"),
    )
    .unwrap();
    let inventory = discover(&roots).unwrap();
    let apiserver = FakeApiServer::start().await.unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig).unwrap();
    let layout = Arc::new(Layout {
        dir: dir.path().to_path_buf(),
        roots,
        kubeconfig,
    });

    // One GPU and one RDMA NIC per claim, no device in two claims.
    let rdma_nics: Vec<_> = inventory.nics.iter().filter(|n| n.is_rdma()).collect();
    let mut claims = Vec::new();
    for (i, (gpu, nic)) in inventory.accelerators.iter().zip(&rdma_nics).enumerate() {
        let name = format!("claim-{i}");
        let requests = [
            ClaimRequest {
                name: "gpu".into(),
                device_class: names::DEVICE_CLASS_GPU.into(),
                devices: vec![names::accelerator_device_name(&gpu.pci.address)],
            },
            ClaimRequest {
                name: "nic".into(),
                device_class: names::DEVICE_CLASS_NIC.into(),
                devices: vec![names::nic_device_name(&nic.pci.address)],
            },
        ];
        let created = create_allocated_claim(
            &apiserver.client(),
            NAMESPACE,
            &name,
            names::DEFAULT_DRIVER_NAME,
            NODE,
            &requests,
        )
        .await
        .unwrap();
        claims.push(Claim {
            namespace: NAMESPACE.into(),
            name,
            uid: created.metadata.uid.unwrap(),
        });
    }
    assert!(claims.len() >= WORKERS * 2);

    let child = Arc::new(Mutex::new(layout.spawn_plugin()));
    let finished = tokio_util::sync::CancellationToken::new();

    // The killer: SIGKILL at a random moment, restart, repeat until the calls are done.
    let kill_count = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let killer = {
        let (child, layout, finished) = (child.clone(), layout.clone(), finished.clone());
        let kill_count = kill_count.clone();
        let mut rng = Rng(seed ^ 0xdead_beef);
        tokio::spawn(async move {
            let mut kills = 0u32;
            loop {
                let pause = Duration::from_millis(50 + rng.below(400));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = finished.cancelled() => return kills,
                }
                let mut running = child.lock().await;
                running.start_kill().unwrap();
                running.wait().await.unwrap();
                kills += 1;
                kill_count.store(kills, std::sync::atomic::Ordering::SeqCst);
                *running = layout.spawn_plugin();
            }
        })
    };

    // Workers: each owns a disjoint set of claims and calls on them one at a time, as the
    // kubelet does per claim; together they make at least OPERATIONS calls, and go on until
    // the plugin was killed MIN_KILLS times (a fast machine finishes 200 calls between few
    // kills), within a time bound.
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let mine: Vec<Claim> = claims
            .iter()
            .skip(worker)
            .step_by(WORKERS)
            .cloned()
            .collect();
        let layout = layout.clone();
        let kill_count = kill_count.clone();
        let mut rng = Rng(seed.wrapping_add(worker as u64 + 1));
        workers.push(tokio::spawn(async move {
            let mut answered: BTreeMap<String, Answered> = mine
                .iter()
                .map(|c| (c.uid.clone(), Answered::Unprepared))
                .collect();
            let mut definitive = 0usize;
            let mut calls = 0usize;
            let deadline = Instant::now() + Duration::from_secs(60);
            while calls < OPERATIONS / WORKERS
                || (kill_count.load(std::sync::atomic::Ordering::SeqCst) < MIN_KILLS
                    && Instant::now() < deadline)
            {
                calls += 1;
                let claim = &mine[rng.below(mine.len() as u64) as usize];
                let operation = if rng.below(2) == 0 {
                    Operation::Prepare
                } else {
                    Operation::Unprepare
                };
                let result = call(&layout.dra_socket(), claim, operation).await;
                definitive += usize::from(result.is_some());
                answered.insert(claim.uid.clone(), result.unwrap_or(Answered::Unknown));
            }
            (answered, definitive, calls)
        }));
    }
    let mut answered = BTreeMap::new();
    let mut definitive = 0;
    let mut calls = 0;
    for worker in workers {
        let (mine, count, made) = worker.await.unwrap();
        answered.extend(mine);
        definitive += count;
        calls += made;
    }
    finished.cancel();
    let kills = killer.await.unwrap();

    // One last crash, so that recovery runs on whatever the last kill left, then check.
    {
        let mut running = child.lock().await;
        running.start_kill().unwrap();
        running.wait().await.unwrap();
        *running = layout.spawn_plugin();
    }
    drop(connect(&layout.dra_socket()).await);
    let checked = check(&layout, &claims, &answered);

    // Claims whose last call died: retry as the kubelet would, then they must hold too.
    for claim in &claims {
        if answered[&claim.uid] == Answered::Unknown {
            let result = call(&layout.dra_socket(), claim, Operation::Unprepare).await;
            answered.insert(
                claim.uid.clone(),
                result.expect("plugin died without a killer"),
            );
        }
    }
    assert_eq!(check(&layout, &claims, &answered), claims.len());

    // SIGTERM: the plugin stops cleanly and removes its sockets.
    let mut running = child.lock().await;
    let pid = running.id().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), running.wait())
        .await
        .expect("plugin did not exit after SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "plugin exited with {status} after SIGTERM"
    );
    assert!(!layout.dra_socket().exists());
    assert!(!layout.registration_socket().exists());

    eprintln!(
        "{calls} calls, {definitive} answered, {kills} kills, {checked} claims checked mid-run, {:?}",
        started.elapsed()
    );
    assert!(
        kills >= MIN_KILLS,
        "only {kills} kills: the test did not exercise crashes"
    );
    assert!(
        definitive >= calls / 2,
        "only {definitive} of {calls} calls were answered"
    );
    apiserver.shutdown().await;
}
