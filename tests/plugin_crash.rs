//! Crash safety of the real `tandem plugin` binary: while 200 prepare/unprepare calls run over
//! its Unix socket, the process is SIGKILLed at random moments and restarted. Every claim the
//! plugin answered as prepared must keep its CDI spec and checkpoint entry, and no claim it
//! answered as unprepared may leave either behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/claims.rs"]
mod claims;
#[path = "support/plugin_harness.rs"]
mod plugin_harness;
#[path = "support/seeded_rng.rs"]
mod seeded_rng;

use claims::create_gpu_nic_claims;
use plugin_harness::{Answered, Operation, PluginLayout, call_one};
use seeded_rng::SeededRng;
use tandem::apiserver_fake::FakeApiServer;
use tandem::prepare::checkpoint::{self, ClaimState};
use tandem::sysfs::discover;
use tandem_kubelet_plugin::proto::dra_v1::Claim;
use tokio::process::Child;
use tokio::sync::Mutex;

const NODE: &str = "node-crash";
const NAMESPACE: &str = "crash";
const OPERATIONS: usize = 200;
const WORKERS: usize = 4;
/// Kills the run must see before it may end (within its time bound).
const MIN_KILLS: u32 = 8;

/// The plugin as this test runs it: no rescans to race with, info logs for a failure.
fn spawn_plugin(layout: &PluginLayout) -> Child {
    layout.spawn_plugin("1h", "info")
}

/// One call as the kubelet makes it; None when the plugin died under it.
async fn call(layout: &PluginLayout, claim: &Claim, operation: Operation) -> Option<Answered> {
    let mut client = layout.connect().await;
    let answer = call_one(&mut client, claim, operation)
        .await
        .ok()?
        .expect("claim left out of the answer");
    assert_eq!(answer.error, "", "{operation:?} of {} failed", claim.name);
    if operation == Operation::Prepare {
        assert_eq!(answer.devices, 2);
    }
    Some(operation.answered())
}

fn spec_exists(layout: &PluginLayout, uid: &str) -> bool {
    std::fs::read_dir(layout.cdi_dir()).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(uid))
    })
}

fn check(layout: &PluginLayout, claims: &[Claim], answered: &BTreeMap<String, Answered>) -> usize {
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

    let apiserver = FakeApiServer::start().await.unwrap();
    let layout = Arc::new(PluginLayout::create(NODE, "dgx-h100", &apiserver));
    let inventory = discover(layout.roots()).unwrap();

    // One GPU and one RDMA NIC per claim, no device in two claims.
    let claims = create_gpu_nic_claims(
        &apiserver.client(),
        &inventory,
        NAMESPACE,
        NODE,
        "claim",
        usize::MAX,
    )
    .await;
    assert!(claims.len() >= WORKERS * 2);

    let child = Arc::new(Mutex::new(spawn_plugin(&layout)));
    let finished = tokio_util::sync::CancellationToken::new();

    // The killer: SIGKILL at a random moment, restart, repeat until the calls are done.
    let kill_count = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let killer = {
        let (child, layout, finished) = (child.clone(), layout.clone(), finished.clone());
        let kill_count = kill_count.clone();
        let mut rng = SeededRng::new(seed ^ 0xdead_beef);
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
                *running = spawn_plugin(&layout);
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
        let mut rng = SeededRng::new(seed.wrapping_add(worker as u64 + 1));
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
                let result = call(&layout, claim, operation).await;
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
        *running = spawn_plugin(&layout);
    }
    drop(layout.connect().await);
    let checked = check(&layout, &claims, &answered);

    // Claims whose last call died: retry as the kubelet would, then they must hold too.
    for claim in &claims {
        if answered[&claim.uid] == Answered::Unknown {
            let result = call(&layout, claim, Operation::Unprepare).await;
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
