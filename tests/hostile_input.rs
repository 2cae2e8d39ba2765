//! The hostile-input catalogue: one test per input a kubelet, an apiserver, an operator or a
//! broken disk can throw at claim preparation. Each must end in a clear per-claim error or a
//! safe retry, never a panic, never the loss of a claim prepared before. Also checks the
//! least-privilege file modes (sockets 0600, CDI specs 0644, checkpoint 0600).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::ResourceClaim;
#[path = "support/claims.rs"]
mod claims;
#[path = "support/in_process_node.rs"]
mod in_process_node;
#[path = "support/plugin_process.rs"]
mod plugin_process;
#[path = "support/tree_walk.rs"]
mod tree_walk;

use claims::create_gpu_nic_claim;
use in_process_node::InProcessNode;
use plugin_process::{plugin_command, register_as_kubelet};
use tandem::apiserver_fake::{FakeApiServer, InjectedFailure};
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::fixture;
use tandem::names;
use tandem::prepare::checkpoint::{self, ClaimState};
use tandem::prepare::{PrepareConfig, Preparer};
use tandem_kubelet_plugin::claim::{ClaimRef, our_allocation};
use tandem_kubelet_plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodePrepareResourcesResponse, NodeUnprepareResourcesRequest,
};
use tokio::sync::watch;
use tree_walk::entries_under;

const NODE: &str = "node-hostile";
const NAMESPACE: &str = "hostile";
/// The kubelet's deadline for one NodePrepareResources call.
const KUBELET_DEADLINE: Duration = Duration::from_secs(45);

/// The catalogue's helpers on the shared in-process node.
impl InProcessNode {
    /// Claim `name` for GPU `index` and its NIC, allocated from `pool`.
    async fn claim_in_pool(&self, name: &str, index: usize, pool: &str) -> Claim {
        create_gpu_nic_claim(
            &self.apiserver.client(),
            &self.inventory,
            NAMESPACE,
            name,
            pool,
            index,
        )
        .await
    }

    async fn claim(&self, name: &str, index: usize) -> Claim {
        self.claim_in_pool(name, index, NODE).await
    }

    async fn prepare(&self, claims: Vec<Claim>) -> NodePrepareResourcesResponse {
        self.client()
            .await
            .node_prepare_resources(NodePrepareResourcesRequest { claims })
            .await
            .expect("the RPC itself must never fail")
            .into_inner()
    }

    async fn unprepare(&self, claims: Vec<Claim>) -> Vec<String> {
        let answer = self
            .client()
            .await
            .node_unprepare_resources(NodeUnprepareResourcesRequest { claims })
            .await
            .expect("the RPC itself must never fail")
            .into_inner();
        answer.claims.into_values().map(|a| a.error).collect()
    }

    fn spec_path(&self, uid: &str) -> PathBuf {
        self.cdi_dir.join(format!("tandem.dev-claim_{uid}.json"))
    }

    /// A claim the kubelet was told is prepared: spec present, completed in the checkpoint.
    fn assert_prepared(&self, claim: &Claim) {
        assert!(
            self.spec_path(&claim.uid).exists(),
            "{}: spec missing",
            claim.name
        );
        let state = checkpoint::load_read_only(&self.state_dir).expect("checkpoint unreadable");
        assert_eq!(
            state.claims.get(&claim.uid).map(|e| e.state),
            Some(ClaimState::PrepareCompleted),
            "{}: not completed in the checkpoint",
            claim.name
        );
    }

    fn spec_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.cdi_dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Every path under `root`, to prove a hostile input wrote nothing anywhere.
fn all_paths(root: &Path) -> BTreeSet<PathBuf> {
    entries_under(root)
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

#[tokio::test]
async fn devices_of_another_node_or_pool_are_refused() {
    let node = InProcessNode::start(NODE).await;
    let foreign = node.claim_in_pool("foreign", 0, "other-node").await;
    let answer = node.prepare(vec![foreign.clone()]).await;
    let error = &answer.claims[&foreign.uid].error;
    assert!(error.contains("other-node"), "{error}");
    assert!(
        error.contains(&foreign.uid),
        "error does not name the claim: {error}"
    );
    assert!(node.spec_files().is_empty());
}

#[tokio::test]
async fn device_names_with_separators_or_dots_are_refused() {
    // The apiserver's validation refuses such names, so build the claim as a compromised or
    // buggy apiserver would serve it and hand it to the preparer's allocation check.
    for device in ["../../etc/passwd", "gpu/../../x", "..", ".", "gpu.0000"] {
        let claim: ResourceClaim = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "dots", "namespace": NAMESPACE, "uid": "u-1" },
            "spec": {},
            "status": { "allocation": { "devices": { "results": [
                { "request": "gpu", "driver": names::DEFAULT_DRIVER_NAME, "pool": NODE, "device": device }
            ] } } }
        }))
        .unwrap();
        let claim_ref = ClaimRef {
            namespace: NAMESPACE.into(),
            name: "dots".into(),
            uid: "u-1".into(),
        };
        let error = our_allocation(&claim_ref, &claim, names::DEFAULT_DRIVER_NAME, NODE)
            .expect_err(device)
            .to_string();
        assert!(
            error.contains(device) || error.contains(&format!("{device:?}")),
            "{error}"
        );
        assert!(error.contains("hostile/dots"), "{error}");
    }
    // And the fake apiserver, like the real one, refuses to store them at all.
    let node = InProcessNode::start(NODE).await;
    let stored = create_allocated_claim(
        &node.apiserver.client(),
        NAMESPACE,
        "dots",
        names::DEFAULT_DRIVER_NAME,
        NODE,
        &[ClaimRequest {
            name: "gpu".into(),
            device_class: names::DEVICE_CLASS_GPU.into(),
            devices: vec!["../gpu".into()],
        }],
    )
    .await;
    assert!(stored.is_err(), "apiserver stored a device named ../gpu");
}

#[tokio::test]
async fn claim_uids_that_would_escape_the_directories_are_refused() {
    let node = InProcessNode::start(NODE).await;
    let before = all_paths(node.dir.path());
    let hostile: Vec<Claim> = [
        "../../../tmp/evil",
        "..",
        "a/../../b",
        "/etc/passwd",
        "x\0y",
    ]
    .iter()
    .map(|uid| Claim {
        namespace: NAMESPACE.into(),
        name: "escape".into(),
        uid: (*uid).into(),
    })
    .collect();
    let answer = node.prepare(hostile.clone()).await;
    assert_eq!(answer.claims.len(), hostile.len());
    for claim in &hostile {
        let error = &answer.claims[&claim.uid].error;
        assert!(error.contains("invalid claim UID"), "{error}");
    }
    for error in node.unprepare(hostile).await {
        assert!(error.contains("invalid claim UID"), "{error}");
    }
    assert_eq!(
        all_paths(node.dir.path()),
        before,
        "a hostile UID wrote a file"
    );
}

#[tokio::test]
async fn the_same_claim_twice_in_one_call_is_prepared_once() {
    let node = InProcessNode::start(NODE).await;
    let claim = node.claim("twice", 0).await;
    let answer = node.prepare(vec![claim.clone(), claim.clone()]).await;
    assert_eq!(answer.claims.len(), 1);
    assert_eq!(answer.claims[&claim.uid].error, "");
    assert_eq!(answer.claims[&claim.uid].devices.len(), 2);
    node.assert_prepared(&claim);
    assert_eq!(node.spec_files().len(), 1);
    let errors = node.unprepare(vec![claim.clone(), claim.clone()]).await;
    assert_eq!(errors, vec![String::new()]);
    assert!(node.spec_files().is_empty());
}

/// An operator (or a tmpfs remount) removes the CDI, state and topology directories under
/// the running plugin: the next prepare makes them again, with their modes, and commits its
/// claim.
#[tokio::test]
async fn cdi_and_state_directories_removed_while_running_are_made_again() {
    let node = InProcessNode::start(NODE).await;
    let claim = node.claim("after-rm", 0).await;
    let topology_dir = node.dir.path().join("run");
    std::fs::remove_dir_all(&node.cdi_dir).unwrap();
    std::fs::remove_dir_all(&node.state_dir).unwrap();
    std::fs::remove_dir_all(&topology_dir).unwrap();
    let answer = node.prepare(vec![claim.clone()]).await;
    assert_eq!(answer.claims[&claim.uid].error, "");
    node.assert_prepared(&claim);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&node.cdi_dir), 0o755);
    assert_eq!(mode(&node.state_dir), 0o700);
    assert_eq!(mode(&topology_dir), 0o700);
    assert_eq!(std::fs::read_dir(&topology_dir).unwrap().count(), 1);
    assert_eq!(
        node.unprepare(vec![claim.clone()]).await,
        vec![String::new()]
    );
    assert!(node.spec_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_claims_in_one_call_are_all_answered_in_time() {
    let node = InProcessNode::start(NODE).await;
    let real = node.claim("real", 0).await;
    let mut claims: Vec<Claim> = (0..9_999)
        .map(|i| Claim {
            namespace: NAMESPACE.into(),
            name: format!("missing-{i}"),
            uid: format!("00000000-0000-0000-0000-{i:012}"),
        })
        .collect();
    claims.insert(5_000, real.clone());
    let started = Instant::now();
    let answer = node.prepare(claims.clone()).await;
    let took = started.elapsed();
    assert_eq!(answer.claims.len(), 10_000);
    assert_eq!(answer.claims[&real.uid].error, "");
    let missing = answer
        .claims
        .values()
        .filter(|a| a.error.contains("not found"))
        .count();
    assert_eq!(missing, 9_999);
    assert!(took < KUBELET_DEADLINE, "10,000 claims took {took:?}");
    eprintln!("10,000 claims answered in {took:?}");
    node.assert_prepared(&real);
    let started = Instant::now();
    let errors = node.unprepare(claims).await;
    assert_eq!(errors.len(), 10_000);
    assert!(errors.iter().all(String::is_empty));
    assert!(started.elapsed() < KUBELET_DEADLINE);
}

/// A small tmpfs when this process may mount one (root in a VM or privileged container);
/// None otherwise, and the caller falls back to what an unprivileged user can do.
fn mount_tmpfs(at: &Path, size: &str) -> bool {
    std::fs::create_dir_all(at).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={size},mode=0700").as_str()),
    )
    .is_ok()
}

fn remount(at: &Path, read_only: bool) -> bool {
    let mut flags = nix::mount::MsFlags::MS_REMOUNT;
    if read_only {
        flags |= nix::mount::MsFlags::MS_RDONLY;
    }
    nix::mount::mount(None::<&str>, at, None::<&str>, flags, None::<&str>).is_ok()
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Read-only state directory: a read-only remount of a tmpfs where possible (root), else mode
/// 0500 (which binds only non-root). New claims fail with an error naming the path; the claim
/// prepared before stays prepared and answers from the checkpoint; after the disk recovers a
/// retry succeeds.
#[tokio::test]
async fn read_only_state_directory_gives_clear_errors_and_loses_nothing() {
    let dir = fixture::scratch_dir().unwrap();
    let state_dir = dir.path().join("state");
    let mounted = mount_tmpfs(&state_dir, "4m");
    // Unmounted before the temp dir goes, so its removal does not hit a busy mount point.
    let unmount = mounted.then(|| Unmount(state_dir.clone()));
    let cdi_dir = dir.path().join("cdi");
    let node = InProcessNode::start_with(NODE, dir, cdi_dir, state_dir.clone(), None).await;
    let before = node.claim("before", 0).await;
    let after = node.claim("after", 1).await;
    let leaving = node.claim("leaving", 2).await;
    let answer = node.prepare(vec![before.clone(), leaving.clone()]).await;
    assert!(answer.claims.values().all(|a| a.error.is_empty()));

    let read_only = if mounted {
        assert!(remount(&state_dir, true), "read-only remount failed");
        "read-only tmpfs"
    } else {
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        "mode 0500"
    };
    eprintln!("state directory made read-only by {read_only}");
    if !mounted && nix::unistd::geteuid().is_root() {
        eprintln!("root ignores mode 0500 and no tmpfs could be mounted: nothing to test");
        return;
    }
    let answer = node.prepare(vec![before.clone(), after.clone()]).await;
    assert_eq!(answer.claims[&before.uid].error, "", "prepared claim lost");
    let error = &answer.claims[&after.uid].error;
    assert!(
        error.contains(&after.uid) && error.contains("state"),
        "{error}"
    );
    // The kubelet is told the unprepare failed and retries it; the claim it did not touch
    // stays prepared.
    let errors = node.unprepare(vec![leaving.clone()]).await;
    assert!(
        errors[0].contains(&leaving.uid),
        "unprepare on a read-only disk: {errors:?}"
    );
    node.assert_prepared(&before);

    if mounted {
        assert!(remount(&state_dir, false));
    } else {
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    assert_eq!(
        node.prepare(vec![after.clone()]).await.claims[&after.uid].error,
        ""
    );
    node.assert_prepared(&before);
    node.assert_prepared(&after);
    assert_eq!(
        node.unprepare(vec![leaving.clone()]).await,
        vec![String::new()]
    );
    assert!(!node.spec_path(&leaving.uid).exists());
    let state = checkpoint::load_read_only(&state_dir).unwrap();
    assert!(
        !state.claims.contains_key(&leaving.uid),
        "retried unprepare leaked an entry"
    );
    drop(unmount);
}

/// Full state directory: a tiny tmpfs filled to ENOSPC where mountable; otherwise a plain file
/// stands where the state directory should be (every write fails the same way for any user).
#[tokio::test]
async fn full_state_directory_gives_clear_errors_and_loses_nothing() {
    let dir = fixture::scratch_dir().unwrap();
    let state_dir = dir.path().join("state");
    let mounted = mount_tmpfs(&state_dir, "256k");
    // Unmounted before the temp dir goes, so its removal does not hit a busy mount point.
    let unmount = mounted.then(|| Unmount(state_dir.clone()));
    let cdi_dir = dir.path().join("cdi");
    let node = InProcessNode::start_with(NODE, dir, cdi_dir, state_dir.clone(), None).await;
    let before = node.claim("before", 0).await;
    let after = node.claim("after", 1).await;
    assert_eq!(
        node.prepare(vec![before.clone()]).await.claims[&before.uid].error,
        ""
    );

    let filler = state_dir.join("filler");
    let moved_state = state_dir.with_extension("moved");
    if mounted {
        eprintln!("state directory filled: 256 KiB tmpfs");
        let chunk = vec![0u8; 4096];
        let mut file = std::fs::File::create(&filler).unwrap();
        while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    } else {
        // The state directory replaced by a file: as unwritable as a full disk.
        eprintln!("state directory 'full': a file stands where {state_dir:?} should be");
        std::fs::rename(&state_dir, &moved_state).unwrap();
        std::fs::write(&state_dir, b"not a directory").unwrap();
    }
    let answer = node.prepare(vec![before.clone(), after.clone()]).await;
    assert_eq!(answer.claims[&before.uid].error, "", "prepared claim lost");
    let error = &answer.claims[&after.uid].error;
    assert!(error.contains(&after.uid), "{error}");
    assert!(
        error.contains("No space") || error.contains("directory") || error.contains("exists"),
        "{error}"
    );
    node.assert_prepared(&before);
    assert!(
        !node.spec_path(&after.uid).exists(),
        "half-prepared claim left a spec"
    );

    if mounted {
        std::fs::remove_file(&filler).unwrap();
    } else {
        std::fs::remove_file(&state_dir).unwrap();
        std::fs::rename(&moved_state, &state_dir).unwrap();
    }
    assert_eq!(
        node.prepare(vec![after.clone()]).await.claims[&after.uid].error,
        ""
    );
    node.assert_prepared(&before);
    node.assert_prepared(&after);
    drop(unmount);
}

/// A CDI directory that is a symlink is resolved, not refused: `/var/run` is itself a symlink
/// to `/run` on most distributions, and the runtime resolves the same link, so the spec lands
/// where the runtime reads it. A dangling link is an error naming the path at start-up.
#[tokio::test]
async fn cdi_directory_symlink_is_resolved_and_dangling_one_refused() {
    let dir = fixture::scratch_dir().unwrap();
    let real_cdi = dir.path().join("elsewhere/cdi");
    std::fs::create_dir_all(&real_cdi).unwrap();
    let link = dir.path().join("cdi");
    std::os::unix::fs::symlink(&real_cdi, &link).unwrap();
    let state_dir = dir.path().join("state");
    let node = InProcessNode::start_with(NODE, dir, link.clone(), state_dir, None).await;
    let claim = node.claim("linked", 0).await;
    assert_eq!(
        node.prepare(vec![claim.clone()]).await.claims[&claim.uid].error,
        ""
    );
    assert!(
        real_cdi
            .join(format!("tandem.dev-claim_{}.json", claim.uid))
            .exists()
    );
    assert!(
        std::fs::symlink_metadata(&link).unwrap().is_symlink(),
        "link replaced"
    );
    assert_eq!(
        node.unprepare(vec![claim.clone()]).await,
        vec![String::new()]
    );
    assert_eq!(std::fs::read_dir(&real_cdi).unwrap().count(), 0);

    let dangling = node.dir.path().join("dangling-cdi");
    std::os::unix::fs::symlink(node.dir.path().join("nowhere/at/all"), &dangling).unwrap();
    let (_tx, rx) = watch::channel(node.inventory.clone());
    let mut config = PrepareConfig::new(names::DEFAULT_DRIVER_NAME, NODE);
    config.cdi_dir = dangling.clone();
    config.state_dir = node.dir.path().join("state2");
    config.topology_dir = node.dir.path().join("run2");
    let error = Preparer::new(config, node.apiserver.client(), rx)
        .err()
        .expect("a dangling CDI directory link must be refused")
        .to_string();
    assert!(error.contains("dangling-cdi"), "{error}");
}

/// An apiserver that accepts connections and never answers: each claim gets its own error
/// within the preparer's fetch timeout, well before the kubelet's 45 s, and a claim prepared
/// before is still answered from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_apiserver_times_out_before_the_kubelet_deadline() {
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = black_hole.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            open.push(socket);
        }
    });
    let uri: hyper::Uri = format!("http://{address}").parse().unwrap();
    let hung = kube::Client::try_from(kube::Config::new(uri)).unwrap();
    let dir = fixture::scratch_dir().unwrap();
    let (cdi_dir, state_dir) = (dir.path().join("cdi"), dir.path().join("state"));
    let node = InProcessNode::start_with(NODE, dir, cdi_dir, state_dir, Some(hung)).await;
    let claim = node.claim("slow", 0).await;
    let started = Instant::now();
    let answer = node.prepare(vec![claim.clone()]).await;
    let took = started.elapsed();
    let error = &answer.claims[&claim.uid].error;
    assert!(
        error.contains("did not answer") && error.contains(&claim.uid),
        "{error}"
    );
    assert!(took < KUBELET_DEADLINE, "answered after {took:?}");
    assert!(node.spec_files().is_empty());
    held.abort();
}

/// 500s from the apiserver: the claim gets an error, nothing is written, and the kubelet's
/// retry succeeds once the apiserver recovers; claims prepared earlier are untouched.
#[tokio::test]
async fn apiserver_500s_give_a_retryable_error() {
    let node = InProcessNode::start(NODE).await;
    let earlier = node.claim("earlier", 0).await;
    let claim = node.claim("flaky", 1).await;
    assert_eq!(
        node.prepare(vec![earlier.clone()]).await.claims[&earlier.uid].error,
        ""
    );
    node.apiserver.inject_failures(
        Some("GET"),
        "resourceclaims/flaky",
        1,
        InjectedFailure::InternalError,
    );
    let answer = node.prepare(vec![earlier.clone(), claim.clone()]).await;
    let error = &answer.claims[&claim.uid].error;
    assert!(
        error.contains("flaky") && error.contains("fetching"),
        "{error}"
    );
    assert_eq!(answer.claims[&earlier.uid].error, "");
    assert!(!node.spec_path(&claim.uid).exists());
    let retry = node.prepare(vec![claim.clone()]).await;
    assert_eq!(retry.claims[&claim.uid].error, "");
    node.assert_prepared(&earlier);
    node.assert_prepared(&claim);
}

/// Least privilege: the kubelet sockets are 0600 (whoever connects can prepare devices), the
/// CDI spec is 0644 (the runtime reads it) and the checkpoint 0600 (claim details, root only).
#[tokio::test]
async fn sockets_specs_and_checkpoint_have_least_privilege_modes() {
    let node = InProcessNode::start(NODE).await;
    let claim = node.claim("modes", 0).await;
    assert_eq!(
        node.prepare(vec![claim.clone()]).await.claims[&claim.uid].error,
        ""
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let paths = node.plugin.paths().clone();
    assert_eq!(mode(&paths.dra), 0o600, "{}", paths.dra.display());
    assert_eq!(
        mode(&paths.registration),
        0o600,
        "{}",
        paths.registration.display()
    );
    assert_eq!(mode(&node.spec_path(&claim.uid)), 0o644);
    assert_eq!(mode(&checkpoint::checkpoint_path(&node.state_dir)), 0o600);
    assert_eq!(mode(&node.state_dir), 0o700);
}

/// A TCP proxy in front of the apiserver whose open connections can all be cut at once, the
/// way a load balancer restart or an apiserver crash drops every watch.
struct CuttableProxy {
    address: std::net::SocketAddr,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracked = connections.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(task);
            }
        });
        CuttableProxy {
            address,
            connections,
            acceptor,
        }
    }

    /// Drops every open connection; returns how many there were.
    fn cut(&self) -> usize {
        let open: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        let live = open.iter().filter(|t| !t.is_finished()).count();
        open.into_iter().for_each(|t| t.abort());
        live
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

/// A scratch directory holding the dgx-h100 fixture machine, for tests that run the real
/// `tandem plugin` binary on it.
fn dgx_machine() -> (tempfile::TempDir, tandem::sysfs::MachineRoots) {
    let dir = fixture::scratch_dir().unwrap();
    let roots = fixture::write_machine(
        &fixture::builtin("dgx-h100").unwrap(),
        &dir.path().join("machine"),
    )
    .unwrap();
    (dir, roots)
}

/// `tandem plugin` on a `dgx_machine()`, its state in `dir/state`.
fn dgx_plugin(
    dir: &tempfile::TempDir,
    roots: &tandem::sysfs::MachineRoots,
    kubeconfig: &Path,
) -> tokio::process::Command {
    plugin_command(
        NODE,
        dir.path(),
        &dir.path().join("state"),
        roots,
        kubeconfig,
    )
}

/// The apiserver drops every connection mid-watch, then someone deletes the node's slices: the
/// plugin's publisher reconnects and puts them back, and the plugin keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_publisher_survives_connections_dropped_mid_watch() {
    publisher_survives_a_cut(false).await;
}

/// The same over HTTPS, where the plugin's watch and its other requests share one HTTP/2
/// connection: the cut ends them all at once, and the next request opens a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_publisher_survives_its_http2_connection_dropped_mid_watch() {
    publisher_survives_a_cut(true).await;
}

async fn publisher_survives_a_cut(tls: bool) {
    use k8s_openapi::api::resource::v1::ResourceSlice;
    use kube::api::{Api, DeleteParams, ListParams};

    let (dir, roots) = dgx_machine();
    let apiserver = if tls {
        FakeApiServer::start_tls().await.unwrap()
    } else {
        FakeApiServer::start().await.unwrap()
    };
    let proxy = CuttableProxy::start(apiserver.address().to_string()).await;
    let kubeconfig = dir.path().join("kubeconfig");
    // The proxy listens on 127.0.0.1 too, which the test certificate names.
    let scheme = if tls { "https" } else { "http" };
    let server = format!("{scheme}://{}", proxy.address);
    tandem::apiserver_fake::write_kubeconfig_for(&kubeconfig, &server, tls).unwrap();
    let mut plugin = dgx_plugin(&dir, &roots, &kubeconfig)
        .args(["--rescan-period", "1s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Slices are published once the kubelet has registered the plugin.
    register_as_kubelet(&dir.path().join("plugins_registry/tandem.dev-reg.sock")).await;
    let slices: Api<ResourceSlice> = Api::all(apiserver.client());
    let ours = ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    let wait_for_slices = async |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let count = slices.list(&ours).await.unwrap().items.len();
            if count > 0 {
                return count;
            }
            assert!(Instant::now() < deadline, "no slices {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let published = wait_for_slices("published at start").await;
    // Let the publisher's watch settle on its connection before cutting it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connections = apiserver.connection_count();
    let cut = proxy.cut();
    assert!(cut > 0, "no open connection to cut");
    for slice in slices.list(&ours).await.unwrap() {
        let name = slice.metadata.name.unwrap();
        slices
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let republished = wait_for_slices("republished after the cut").await;
    assert_eq!(republished, published);
    assert!(
        apiserver.connection_count() > connections,
        "the plugin did not reconnect"
    );
    if tls {
        assert!(
            apiserver.http2_request_count() > 0,
            "the plugin did not speak HTTP/2"
        );
    }
    assert!(
        plugin.try_wait().unwrap().is_none(),
        "plugin exited after the connections dropped"
    );
    plugin.start_kill().unwrap();
    plugin.wait().await.unwrap();
}

/// A node with many CPUs: tokio would start one worker per CPU (224 on a DGX H100), each with
/// its stack and malloc arena. TOKIO_WORKER_THREADS=64 stands in for such a node, since tokio
/// reads it where it would count CPUs; the plugin still runs `--worker-threads` (default 2)
/// workers, so its whole thread count stays small.
#[tokio::test]
async fn many_cpus_do_not_multiply_the_plugins_threads() {
    let (dir, roots) = dgx_machine();
    let apiserver = FakeApiServer::start().await.unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig).unwrap();
    let socket = dir.path().join("plugins/tandem.dev/dra.sock");
    let threads_of = async |extra: &[&str]| {
        // A killed plugin leaves its socket file: wait for this run's own.
        let _ = std::fs::remove_file(&socket);
        let mut plugin = dgx_plugin(&dir, &roots, &kubeconfig)
            .args(extra)
            .env("TOKIO_WORKER_THREADS", "64")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the plugin did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = plugin.id().unwrap();
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count();
        plugin.start_kill().unwrap();
        plugin.wait().await.unwrap();
        threads
    };
    let default = threads_of(&[]).await;
    assert!(
        default < 16,
        "{default} threads: the worker count followed TOKIO_WORKER_THREADS=64"
    );
    let asked = threads_of(&["--worker-threads", "40"]).await;
    assert!(asked > 40, "{asked} threads with --worker-threads 40");
}
