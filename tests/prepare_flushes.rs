//! The flush budget of claim preparation and its behaviour under cancellation. A process-wide
//! counter sees every fsync/fdatasync of the prepare path, so this file holds a single test:
//! another test running beside it in the same process would add its flushes to the count.
//!
//! - one NodePrepareResources and one NodeUnprepareResources (`tandem demo`): at most 2
//! - 8 claims in one call: at most one flush per call
//! - 8 calls in parallel for distinct claims: at most one flush each (group commit may share)
//! - a claim already prepared in this boot: no flush
//! - 8 calls at once for the same claim: one GET, one flush, the same answer for all
//! - a call the kubelet cancels at its deadline still completes, and its retry answers the
//!   same devices without fetching the claim again or flushing again

#[path = "support/claims.rs"]
mod claims;

use std::sync::Arc;
use std::time::Duration;
use tandem::apiserver_fake::FakeApiServer;
use tandem::prepare::checkpoint::{self, ClaimState};
use tandem::prepare::{ClaimRef, PrepareConfig, Preparer, flush_count};
use tandem_kubelet_plugin::dra_service::DraHandler;
use tokio::sync::watch;

const NODE: &str = "node-flush";
const NAMESPACE: &str = "flush";

fn refs(claims: &[tandem_kubelet_plugin::proto::dra_v1::Claim]) -> Vec<ClaimRef> {
    claims.iter().cloned().map(ClaimRef::from).collect()
}

/// Flushes made while `f` runs.
async fn flushes<T>(f: impl std::future::Future<Output = T>) -> (u64, T) {
    let before = flush_count();
    let out = f.await;
    (flush_count() - before, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_and_unprepare_flush_at_most_once_per_call_and_survive_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let desc = tandem::fixture::builtin("dgx-h100").unwrap();
    let roots = tandem::fixture::write_machine(&desc, &dir.path().join("machine")).unwrap();
    let inventory = Arc::new(tandem::sysfs::discover(&roots).unwrap());
    let (_inventory_tx, inventory_rx) = watch::channel(inventory.clone());
    let config = PrepareConfig {
        cdi_dir: dir.path().join("cdi"),
        state_dir: dir.path().join("state"),
        topology_dir: dir.path().join("run"),
        proc_root: roots.proc.clone(),
        ..PrepareConfig::new("tandem.dev", NODE)
    };
    let api = FakeApiServer::start().await.unwrap();
    let preparer = Arc::new(Preparer::new(config.clone(), api.client(), inventory_rx).unwrap());
    let (recovery_flushes, report) = flushes(preparer.recover()).await;
    report.unwrap();
    assert_eq!(recovery_flushes, 0, "a fresh start writes nothing");
    let claims =
        claims::create_gpu_nic_claims(&api.client(), &inventory, NAMESPACE, NODE, "c", 8).await;
    assert_eq!(claims.len(), 8);
    let claims = refs(&claims);

    // What `tandem demo` does: one prepare, one unprepare.
    let one = std::slice::from_ref(&claims[0]);
    let (n, results) = flushes(preparer.prepare(one)).await;
    assert!(results[&claims[0].uid].is_ok(), "{results:?}");
    assert_eq!(n, 1, "one prepare call, one flush");
    let (n, results) = flushes(preparer.prepare(one)).await;
    assert!(results[&claims[0].uid].is_ok());
    assert_eq!(
        n, 0,
        "a claim prepared in this boot is answered from memory"
    );
    let (n, results) = flushes(preparer.unprepare(one)).await;
    assert!(results[&claims[0].uid].is_ok());
    assert_eq!(n, 1, "one unprepare call, one flush");

    // 8 claims in one call.
    let (n, results) = flushes(preparer.prepare(&claims)).await;
    assert!(results.values().all(Result::is_ok), "{results:?}");
    assert_eq!(n, 1, "8 claims in one prepare call, one flush");
    let (n, results) = flushes(preparer.unprepare(&claims)).await;
    assert!(results.values().all(Result::is_ok), "{results:?}");
    assert_eq!(n, 1, "8 claims in one unprepare call, one flush");

    // 8 calls in parallel, one claim each.
    let parallel = |unprepare: bool| {
        let calls = claims.iter().map(|c| {
            let preparer = preparer.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let one = std::slice::from_ref(&c);
                if unprepare {
                    preparer.unprepare(one).await[&c.uid].is_ok()
                } else {
                    preparer.prepare(one).await[&c.uid].is_ok()
                }
            })
        });
        futures::future::join_all(calls)
    };
    let (n, oks) = flushes(parallel(false)).await;
    assert!(oks.into_iter().all(|ok| ok.unwrap()));
    assert!((1..=8).contains(&n), "8 parallel prepares made {n} flushes");
    let (state, _) = checkpoint::load(&config.state_dir).unwrap();
    assert_eq!(state.claims.len(), 8);
    assert!(
        state
            .claims
            .values()
            .all(|e| e.state == ClaimState::PrepareCompleted)
    );
    let (n, oks) = flushes(parallel(true)).await;
    assert!(oks.into_iter().all(|ok| ok.unwrap()));
    assert!(
        (1..=8).contains(&n),
        "8 parallel unprepares made {n} flushes"
    );
    let (state, _) = checkpoint::load(&config.state_dir).unwrap();
    assert!(state.claims.is_empty());

    // Calls for the same claim wait for each other: the first fetches and prepares it, the
    // others find it prepared (no GET, no flush) and answer the same devices.
    let claim = claims[5].clone();
    let gets_before = claim_gets(&api, &claim);
    let same = (0..8).map(|_| {
        let preparer = preparer.clone();
        let claim = claim.clone();
        tokio::spawn(async move {
            preparer.prepare(std::slice::from_ref(&claim)).await[&claim.uid]
                .as_ref()
                .unwrap()
                .clone()
        })
    });
    let (n, answers) = flushes(futures::future::join_all(same)).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert!(answers.iter().all(|a| *a == answers[0]));
    assert_eq!(n, 1, "8 calls for one claim: prepared once");
    assert_eq!(claim_gets(&api, &claim) - gets_before, 1);
    assert!(preparer.unprepare(std::slice::from_ref(&claim)).await[&claim.uid].is_ok());

    // The kubelet gives up on a call (its deadline): the handler's own task finishes the
    // work, and the retry, which waits for it on the claim's lock, answers the same.
    let handler = DraHandler::new(preparer.clone(), None);
    let claim = claims[3].clone();
    let gets_before = claim_gets(&api, &claim);
    let before = flush_count();
    let cancelled =
        tokio::time::timeout(Duration::ZERO, handler.prepare(vec![claim.clone()])).await;
    assert!(
        cancelled.is_err(),
        "the call was still running when cancelled"
    );
    let retried = handler.prepare(vec![claim.clone()]).await;
    let devices = retried[&claim.uid].as_ref().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(flush_count() - before, 1, "the cancelled call's one flush");
    assert_eq!(
        claim_gets(&api, &claim) - gets_before,
        1,
        "the retry is answered from the checkpoint, not fetched again"
    );
    let (state, _) = checkpoint::load(&config.state_dir).unwrap();
    assert_eq!(state.claims[&claim.uid].state, ClaimState::PrepareCompleted);
    // A restarted plugin reads the same: the cancelled call's answer was durable.
    let restarted =
        Preparer::new(config.clone(), api.client(), watch::channel(inventory).1).unwrap();
    let again = restarted.prepare(std::slice::from_ref(&claim)).await;
    assert_eq!(again[&claim.uid].as_ref().unwrap(), devices);

    // An unprepare given up on (it may also have finished within its first poll: it fetches
    // nothing): the retry succeeds and nothing is left behind.
    let _ = tokio::time::timeout(Duration::ZERO, handler.unprepare(vec![claim.clone()])).await;
    assert!(handler.unprepare(vec![claim.clone()]).await[&claim.uid].is_ok());
    let (state, _) = checkpoint::load(&config.state_dir).unwrap();
    assert!(state.claims.is_empty());
    let specs = std::fs::read_dir(&config.cdi_dir).unwrap().count();
    assert_eq!(specs, 0, "no CDI spec left");
}

fn claim_gets(api: &FakeApiServer, claim: &ClaimRef) -> usize {
    let path = format!("/resourceclaims/{}?", claim.name);
    api.requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains(&path))
        .count()
}
