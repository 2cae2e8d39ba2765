//! Soak: the real `tandem plugin` binary against the apiserver fake for `TANDEM_SOAK_SECONDS`,
//! with a kubelet-like client preparing and unpreparing at a steady rate, a killer SIGKILLing
//! and restarting the plugin at random moments, and a flipper toggling a NIC port between
//! ACTIVE and DOWN in the fixture. Asserts no lost claims, no leaks and bounded RSS, and prints
//! a Markdown table for BENCHMARKS.md. Without the variable the test only says it was skipped;
//! `hack/soak.sh` sets it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/claims.rs"]
mod claims;
#[path = "support/plugin_harness.rs"]
mod plugin_harness;
#[path = "support/seeded_rng.rs"]
mod seeded_rng;
#[path = "support/tree_walk.rs"]
mod tree_walk;

use claims::create_gpu_nic_claims;
use plugin_harness::{Answered, Operation, PluginLayout, call_one};
use seeded_rng::SeededRng;
use tandem::apiserver_fake::FakeApiServer;
use tandem::prepare::checkpoint::{self, ClaimState};
use tandem::sysfs::discover;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_v1::{
    NodeUnprepareResourcesRequest, dra_plugin_client::DraPluginClient,
};
use tokio::process::Child;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tree_walk::entries_under;

const NODE: &str = "node-soak";
const NAMESPACE: &str = "soak";
/// One kubelet call every this often.
const CALL_INTERVAL: Duration = Duration::from_millis(20);
/// RSS of the last quarter may exceed the first quarter's peak by this factor plus slack; the
/// slack absorbs allocator noise of a process that restarts every few seconds.
const RSS_GROWTH_FACTOR: f64 = 1.5;
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// The plugin as the soak runs it: rescanning often so the flipped port state reaches the
/// health checks.
fn spawn_plugin(layout: &PluginLayout) -> Child {
    layout.spawn_plugin("1s", "warn")
}

/// Resident set size of `pid` in KiB, from /proc/<pid>/status.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn spec_exists(layout: &PluginLayout, uid: &str) -> bool {
    layout
        .cdi_dir()
        .join(format!("tandem.dev-claim_{uid}.json"))
        .exists()
}

/// Claims answered prepared whose spec or completed checkpoint entry is gone. Reads the
/// checkpoint without repairing it, so the check never moves a file under the plugin.
fn lost_claims(layout: &PluginLayout, answered: &BTreeMap<String, Answered>) -> Vec<String> {
    let state = checkpoint::load_read_only(&layout.state_dir()).unwrap_or_default();
    answered
        .iter()
        .filter(|&(_, a)| *a == Answered::Prepared)
        .filter(|&(uid, _)| {
            !spec_exists(layout, uid)
                || state.claims.get(uid).map(|e| e.state) != Some(ClaimState::PrepareCompleted)
        })
        .map(|(uid, _)| uid.clone())
        .collect()
}

/// The `ports/1/state` files of the fixture's RDMA devices.
fn port_state_files(sys: &Path) -> Vec<PathBuf> {
    entries_under(sys)
        .into_iter()
        .filter(|(path, kind)| !kind.is_dir() && path.ends_with("ports/1/state"))
        .map(|(path, _)| path)
        .collect()
}

#[derive(Default)]
struct Tally {
    calls: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    lost_checks: u64,
    lost: Vec<String>,
}

impl Tally {
    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// A claim error's kind: the variant's words after `claim <ref>:` (device names removed).
fn error_kind(error: &str) -> String {
    let after_claim = error.split_once("): ").map_or(error, |(_, rest)| rest);
    let words: Vec<&str> = after_claim
        .split_whitespace()
        .filter(|w| !w.contains("-0000-") && !w.starts_with("gpu-") && !w.starts_with("nic-"))
        .take(4)
        .collect();
    format!("claim error: {}", words.join(" "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_plugin_under_kills_and_flapping_ports() {
    let Some(seconds) = std::env::var("TANDEM_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        eprintln!("soak skipped: set TANDEM_SOAK_SECONDS (hack/soak.sh does)");
        return;
    };
    let duration = Duration::from_secs(seconds);
    let seed = 0x50a4_u64;

    let apiserver = FakeApiServer::start().await.unwrap();
    let layout = Arc::new(PluginLayout::create(NODE, "dgx-h100", &apiserver));
    let inventory = discover(layout.roots()).unwrap();
    let port_files = port_state_files(&layout.roots().sys);
    assert!(!port_files.is_empty(), "fixture has no RDMA ports");
    let claims = create_gpu_nic_claims(
        &apiserver.client(),
        &inventory,
        NAMESPACE,
        NODE,
        "soak",
        usize::MAX,
    )
    .await;

    let started = Instant::now();
    let child = Arc::new(Mutex::new(spawn_plugin(&layout)));
    let finished = CancellationToken::new();

    // Killer and RSS sampler in one loop, so a sample never reads a pid being replaced.
    let killer = {
        let (child, layout, finished) = (child.clone(), layout.clone(), finished.clone());
        let mut rng = SeededRng::new(seed ^ 0xdead_beef);
        tokio::spawn(async move {
            let mut kills = 0u32;
            let mut samples: Vec<(Duration, u64)> = Vec::new();
            let mut next_kill = Instant::now() + Duration::from_millis(1000 + rng.below(4000));
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    () = finished.cancelled() => return (kills, samples),
                }
                let mut running = child.lock().await;
                if let Some(rss) = running.id().and_then(rss_kib) {
                    samples.push((started.elapsed(), rss));
                }
                if Instant::now() >= next_kill {
                    running.start_kill().unwrap();
                    running.wait().await.unwrap();
                    kills += 1;
                    *running = spawn_plugin(&layout);
                    next_kill = Instant::now() + Duration::from_millis(1000 + rng.below(4000));
                }
            }
        })
    };

    // Flipper: one NIC port goes DOWN and comes back, over and over.
    let flipper = {
        let finished = finished.clone();
        let file = port_files[0].clone();
        tokio::spawn(async move {
            let mut flips = 0u32;
            let mut down = false;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(1500)) => {}
                    () = finished.cancelled() => break,
                }
                down = !down;
                let text = if down { "1: DOWN\n" } else { "4: ACTIVE\n" };
                std::fs::write(&file, text).unwrap();
                flips += 1;
            }
            std::fs::write(&file, "4: ACTIVE\n").unwrap();
            flips
        })
    };

    // The kubelet: one call every CALL_INTERVAL, one claim at a time, as it calls per pod.
    let mut tally = Tally::default();
    let mut answered: BTreeMap<String, Answered> = claims
        .iter()
        .map(|c| (c.uid.clone(), Answered::Unprepared))
        .collect();
    let mut rng = SeededRng::new(seed);
    let mut ticker = tokio::time::interval(CALL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < duration {
        ticker.tick().await;
        let claim = &claims[rng.below(claims.len() as u64) as usize];
        let operation = if rng.below(2) == 0 {
            Operation::Prepare
        } else {
            Operation::Unprepare
        };
        tally.calls += 1;
        let Ok(channel) = unix_channel(&layout.dra_socket()).await else {
            tally.error("connect refused (plugin restarting)");
            answered.insert(claim.uid.clone(), Answered::Unknown);
            continue;
        };
        let mut client = DraPluginClient::new(channel);
        let state = match call_one(&mut client, claim, operation).await {
            Err(_) => {
                tally.error("rpc failed (plugin killed mid-call)");
                Answered::Unknown
            }
            Ok(None) => {
                tally.error("claim missing from answer");
                Answered::Unknown
            }
            Ok(Some(answer)) if !answer.error.is_empty() => {
                tally.error(&error_kind(&answer.error));
                Answered::Unknown
            }
            Ok(Some(_)) => {
                tally.ok += 1;
                operation.answered()
            }
        };
        answered.insert(claim.uid.clone(), state);
        // Only this loop changes claims, so between its calls the files must match its answers.
        if tally.calls.is_multiple_of(10) {
            tally.lost_checks += 1;
            for uid in lost_claims(&layout, &answered) {
                if !tally.lost.contains(&uid) {
                    tally.lost.push(uid);
                }
            }
        }
    }
    finished.cancel();
    let (kills, samples) = killer.await.unwrap();
    let flips = flipper.await.unwrap();

    // A last kill so recovery runs on what the run left, then the final checks.
    {
        let mut running = child.lock().await;
        running.start_kill().unwrap();
        running.wait().await.unwrap();
        *running = spawn_plugin(&layout);
    }
    let mut client = layout.connect().await;
    tally.lost.extend(lost_claims(&layout, &answered));
    tally.lost.dedup();

    // The kubelet unprepares every claim as its pods go; nothing may stay behind.
    let answer = client
        .node_unprepare_resources(NodeUnprepareResourcesRequest {
            claims: claims.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for claim in &claims {
        assert_eq!(answer.claims[&claim.uid].error, "", "{}", claim.name);
    }
    let leaked_specs: Vec<String> = std::fs::read_dir(layout.cdi_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let (state, _) = checkpoint::load(&layout.state_dir()).unwrap();
    let leaked_entries: Vec<&String> = state.claims.keys().collect();
    drop(client);
    drop(child.lock().await);

    // Memory: peak of the first quarter of the run against peak of the last quarter.
    let quarter = duration / 4;
    let peak = |from: Duration, to: Duration| {
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|&(_, rss)| rss)
            .max()
            .unwrap_or(0)
    };
    let first_peak = peak(Duration::ZERO, quarter);
    let last_peak = peak(duration - quarter, duration + Duration::from_secs(1));
    let bound = (first_peak as f64 * RSS_GROWTH_FACTOR) as u64 + RSS_SLACK_KIB;
    let min_rss = samples.iter().map(|s| s.1).min().unwrap_or(0);
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(0);

    let mut table = String::new();
    table.push_str(&format!(
        "Soak of `tandem plugin` ({seconds} s, fixture dgx-h100, {} claims, one call per {} ms, \
         seed {seed:#x})\n\n| metric | value |\n|---|---|\n",
        claims.len(),
        CALL_INTERVAL.as_millis()
    ));
    let mut row = |k: &str, v: String| table.push_str(&format!("| {k} | {v} |\n"));
    row(
        "wall time",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    row("calls made", tally.calls.to_string());
    row("calls answered without error", tally.ok.to_string());
    for (kind, count) in &tally.errors {
        row(&format!("errors: {kind}"), count.to_string());
    }
    row("SIGKILLs + restarts", kills.to_string());
    row("port state flips", flips.to_string());
    row(
        "lost-claim checks (every 10 calls + final)",
        (tally.lost_checks + 1).to_string(),
    );
    row("claims lost", tally.lost.len().to_string());
    row("leaked CDI specs", leaked_specs.len().to_string());
    row(
        "leaked checkpoint entries",
        leaked_entries.len().to_string(),
    );
    row("RSS samples", samples.len().to_string());
    row("RSS min / max", format!("{min_rss} / {max_rss} KiB"));
    row("RSS peak, first quarter", format!("{first_peak} KiB"));
    row(
        "RSS peak, last quarter",
        format!("{last_peak} KiB (bound {bound} KiB)"),
    );
    println!("\n{table}");

    assert!(tally.lost.is_empty(), "claims lost: {:?}", tally.lost);
    assert!(leaked_specs.is_empty(), "leaked specs: {leaked_specs:?}");
    assert!(
        leaked_entries.is_empty(),
        "leaked checkpoint entries: {leaked_entries:?}"
    );
    assert!(
        samples.len() >= 4,
        "only {} RSS samples were taken",
        samples.len()
    );
    assert!(
        last_peak <= bound,
        "RSS grew: first-quarter peak {first_peak} KiB, last-quarter peak {last_peak} KiB"
    );
    assert!(
        tally.ok * 2 >= tally.calls,
        "only {} of {} calls succeeded",
        tally.ok,
        tally.calls
    );
    if seconds >= 20 {
        assert!(kills >= 3, "only {kills} kills: crashes were not exercised");
    }
    apiserver.shutdown().await;
}
