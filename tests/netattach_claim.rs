//! An exclusively allocated NIC through the whole claim path in real network namespaces:
//! the Preparer writes the claim's CDI spec, the test runs the spec's createRuntime hook the
//! way a runtime does (the real `tandem` binary, OCI state on stdin, inside the "host"
//! namespace), the claim status is applied to the apiserver fake, and unprepare brings the
//! interface back intact. A veth named like the fixture's NIC plays the NIC, in namespaces of
//! its own so no real interface is touched. Tests print why and return when not root.

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::Api;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use tandem::apiserver_fake::FakeApiServer;
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::netattach::status::apply_claim_status;
use tandem::plugin::netattach_reconcile::status_changes;
use tandem::prepare::{ClaimRef, PrepareConfig, Preparer};
use tempfile::TempDir;
use tokio::sync::watch;

const DRIVER: &str = "tandem.dev";
const NODE: &str = "node-a";
const NAMESPACE: &str = "ml";
/// dgx-h100: GPU 0000:1b:00.0 sits under the same switch as NIC 0000:18:00.0 (ibp24s0).
const GPU: &str = "gpu-0000-1b-00-0";
const NIC: &str = "nic-0000-18-00-0";
const NIC_IFNAME: &str = "ibp24s0";

#[path = "support/netns.rs"]
mod netns;
use netns::{add_netns_or_skip, delete_netns, ip, unique_tag};

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// A "host" namespace holding veth `ibp24s0` (10.210.N.2/24, MTU 9000, a route via
/// 10.210.N.1) and a "pod" namespace with a process in it, as a pod sandbox has. Both go on
/// drop.
struct Lab {
    host_ns: String,
    pod_ns: String,
    pod_process: Child,
    octet: u32,
}

impl Lab {
    fn new() -> Option<Self> {
        let (tag, n) = unique_tag();
        let host_ns = format!("tdch{tag}");
        if !add_netns_or_skip(&host_ns) {
            return None;
        }
        let pod_ns = format!("tdcp{tag}");
        ip(&["netns", "add", &pod_ns]);
        let pod_process = Command::new("ip")
            .args(["netns", "exec", &pod_ns, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let lab = Lab {
            host_ns,
            pod_ns,
            pod_process,
            octet: 10 + n,
        };
        let h = lab.host_ns.as_str();
        ip(&[
            "-n", h, "link", "add", NIC_IFNAME, "type", "veth", "peer", "name", "tdcpeer",
        ]);
        ip(&["-n", h, "link", "set", NIC_IFNAME, "mtu", "9000", "up"]);
        ip(&["-n", h, "link", "set", "tdcpeer", "up"]);
        ip(&["-n", h, "addr", "add", &lab.address(), "dev", NIC_IFNAME]);
        ip(&[
            "-n",
            h,
            "route",
            "add",
            &format!("10.211.{}.0/24", lab.octet),
            "via",
            &format!("10.210.{}.1", lab.octet),
            "dev",
            NIC_IFNAME,
        ]);
        // `ip netns exec` execs the command, so the child's pid is the sleeping process once
        // it has entered the pod namespace.
        let pod_ns = inode(&lab.ns_path(&lab.pod_ns));
        for _ in 0..500 {
            if pod_ns.is_some()
                && inode(Path::new(&format!("/proc/{}/ns/net", lab.pid()))) == pod_ns
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Some(lab)
    }

    fn address(&self) -> String {
        format!("10.210.{}.2/24", self.octet)
    }

    fn pid(&self) -> u32 {
        self.pod_process.id()
    }

    fn ns_path(&self, name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }

    /// `ip -o addr` lines mentioning `name` in namespace `ns` (empty when absent).
    fn addresses(&self, ns: &str, name: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "addr", "show", "dev", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn link(&self, ns: &str, name: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show", "dev", name])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a CDI hook as a runtime would at createRuntime: from the host namespace, with the
    /// OCI state of a container whose pid is in the pod namespace.
    fn run_hook(&self, hook: &Value, container: &str) -> std::process::Output {
        let path = hook["path"].as_str().unwrap();
        let args: Vec<&str> = hook["args"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|a| a.as_str().unwrap())
            .collect();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.host_ns, path])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let state = serde_json::json!({
            "ociVersion": "1.2.0", "id": container, "status": "creating",
            "pid": self.pid(), "bundle": "/run/containerd/bundle",
        });
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(state.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.pod_process.kill();
        let _ = self.pod_process.wait();
        delete_netns(&[&self.pod_ns, &self.host_ns]);
    }
}

struct Node {
    _dir: TempDir,
    api: FakeApiServer,
    config: PrepareConfig,
    inventory: watch::Sender<Arc<tandem::topology::Inventory>>,
}

impl Node {
    async fn new(lab: &Lab) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let desc = tandem::fixture::builtin("dgx-h100").unwrap();
        let roots = tandem::fixture::write_machine(&desc, &dir.path().join("machine")).unwrap();
        let inventory = Arc::new(tandem::sysfs::discover(&roots).unwrap());
        let (inventory, _) = watch::channel(inventory);
        let config = PrepareConfig {
            cdi_dir: dir.path().join("cdi"),
            state_dir: dir.path().join("state"),
            topology_dir: dir.path().join("run"),
            proc_root: roots.proc.clone(),
            hook_path: Some(PathBuf::from(env!("CARGO_BIN_EXE_tandem"))),
            host_netns: lab.ns_path(&lab.host_ns),
            ..PrepareConfig::new(DRIVER, NODE)
        };
        Node {
            _dir: dir,
            api: FakeApiServer::start().await.unwrap(),
            config,
            inventory,
        }
    }

    /// A Preparer over the node's directories; a new one is a restarted plugin.
    fn preparer(&self, config: &PrepareConfig) -> Preparer {
        Preparer::new(
            config.clone(),
            self.api.client(),
            self.inventory.subscribe(),
        )
        .unwrap()
    }

    async fn claim(&self, name: &str) -> ClaimRef {
        let claim = create_allocated_claim(
            &self.api.client(),
            NAMESPACE,
            name,
            DRIVER,
            NODE,
            &[
                ClaimRequest {
                    name: "gpu".into(),
                    device_class: "gpu.tandem.dev".into(),
                    devices: vec![GPU.into()],
                },
                ClaimRequest {
                    name: "nic".into(),
                    device_class: "nic.tandem.dev".into(),
                    devices: vec![NIC.into()],
                },
            ],
        )
        .await
        .unwrap();
        ClaimRef {
            namespace: NAMESPACE.into(),
            name: name.into(),
            uid: claim.metadata.uid.unwrap(),
        }
    }

    fn spec(&self, claim: &ClaimRef) -> Value {
        let path = self
            .config
            .cdi_dir
            .join(format!("{DRIVER}-claim_{}.json", claim.uid));
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }
}

/// Prepares one claim; its answer.
async fn prepare_one(preparer: &Preparer, claim: &ClaimRef) -> Result<(), String> {
    let mut answers = preparer.prepare(std::slice::from_ref(claim)).await;
    answers
        .remove(&claim.uid)
        .unwrap()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Unprepares one claim, which must succeed.
async fn unprepare_one(preparer: &Preparer, claim: &ClaimRef) {
    let mut answers = preparer.unprepare(std::slice::from_ref(claim)).await;
    answers.remove(&claim.uid).unwrap().unwrap();
}

/// Runs the NIC's hook for one container; it must succeed.
fn attach_ok(lab: &Lab, hook: &Value, container: &str) {
    let out = lab.run_hook(hook, container);
    assert!(
        out.status.success(),
        "hook failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The createRuntime hook on the NIC's CDI device.
fn nic_hook(spec: &Value) -> Value {
    let devices = spec["devices"].as_array().unwrap();
    let hooks: Vec<&Value> = devices
        .iter()
        .filter(|d| d["name"].as_str().unwrap().ends_with(NIC))
        .flat_map(|d| {
            d["containerEdits"]["hooks"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .collect();
    assert_eq!(hooks.len(), 1, "{spec:#}");
    assert_eq!(hooks[0]["hookName"], "createRuntime");
    hooks[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_nic_moves_into_the_pod_through_the_cdi_hook_and_comes_back_on_unprepare() {
    let Some(lab) = Lab::new() else { return };
    let node = Node::new(&lab).await;
    let preparer = node.preparer(&node.config);
    let claim = node.claim("train").await;

    prepare_one(&preparer, &claim).await.unwrap();
    let hook = nic_hook(&node.spec(&claim));

    // First container: the interface moves in, renamed and configured.
    attach_ok(&lab, &hook, "ctr-1");
    assert!(lab.link(&lab.host_ns, NIC_IFNAME).is_none());
    let in_pod = lab.link(&lab.pod_ns, "rdma0").expect("rdma0 in the pod");
    assert!(in_pod.contains("mtu 9000"), "{in_pod}");
    assert!(lab.addresses(&lab.pod_ns, "rdma0").contains(&lab.address()));
    let routes = ip(&["-n", &lab.pod_ns, "route", "show", "dev", "rdma0"]);
    assert!(
        routes.contains(&format!(
            "10.211.{}.0/24 via 10.210.{}.1",
            lab.octet, lab.octet
        )),
        "{routes}"
    );

    // The rescans keep publishing the NIC with its host facts while its netdev is away.
    let attached = tandem::netattach::record::attached_pci_addresses(&node.config.state_dir);
    assert_eq!(
        attached
            .iter()
            .map(tandem::names::nic_device_name)
            .collect::<Vec<_>>(),
        [NIC]
    );

    // Second container of the same pod: a no-op that succeeds.
    attach_ok(&lab, &hook, "ctr-2");
    assert!(lab.link(&lab.pod_ns, "rdma0").is_some());

    // The reconcile sees the attachment; its status lands on the claim.
    let report = preparer.reconcile_netattach().await.unwrap();
    assert_eq!(report.pending, 0);
    let mut written = Default::default();
    let changes = status_changes(&report, &mut written);
    assert_eq!(changes.len(), 1);
    apply_claim_status(
        node.api.client(),
        DRIVER,
        NODE,
        &changes[0].0,
        &changes[0].1,
    )
    .await
    .unwrap();
    let stored: ResourceClaim = Api::namespaced(node.api.client(), NAMESPACE)
        .get("train")
        .await
        .unwrap();
    let devices = stored.status.unwrap().devices.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device, NIC);
    let network = devices[0].network_data.as_ref().unwrap();
    assert_eq!(network.interface_name.as_deref(), Some("rdma0"));
    assert_eq!(network.ips.as_deref(), Some(&[lab.address()][..]));
    assert!(network.hardware_address.is_some());
    let ready = &devices[0].conditions.as_ref().unwrap()[0];
    assert_eq!(
        (ready.type_.as_str(), ready.status.as_str()),
        ("Ready", "True")
    );

    // Unprepare: back on the host with its name, address, MTU and route.
    unprepare_one(&preparer, &claim).await;
    assert!(lab.link(&lab.pod_ns, "rdma0").is_none());
    let back = lab
        .link(&lab.host_ns, NIC_IFNAME)
        .expect("back on the host");
    assert!(back.contains("mtu 9000") && back.contains("UP"), "{back}");
    assert!(
        lab.addresses(&lab.host_ns, NIC_IFNAME)
            .contains(&lab.address())
    );
    let routes = ip(&["-n", &lab.host_ns, "route", "show", "dev", NIC_IFNAME]);
    assert!(
        routes.contains(&format!(
            "10.211.{}.0/24 via 10.210.{}.1",
            lab.octet, lab.octet
        )),
        "{routes}"
    );
    let report = preparer.reconcile_netattach().await.unwrap();
    assert_eq!((report.pending, report.attached.len()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interface_that_cannot_come_back_stays_pending_across_a_restart_until_it_does() {
    let Some(lab) = Lab::new() else { return };
    let node = Node::new(&lab).await;
    // A plugin that cannot see the pod's namespace (no /run/netns mount, no host pids).
    let blind_dir = tempfile::tempdir().unwrap();
    let blind = PrepareConfig {
        netns_proc_root: blind_dir.path().to_path_buf(),
        run_netns_dir: blind_dir.path().to_path_buf(),
        ..node.config.clone()
    };
    let preparer = node.preparer(&blind);
    let claim = node.claim("first").await;
    prepare_one(&preparer, &claim).await.unwrap();
    attach_ok(&lab, &nic_hook(&node.spec(&claim)), "ctr-1");

    // Unprepare answers the kubelet, and keeps what it could not release.
    unprepare_one(&preparer, &claim).await;
    assert!(
        !node
            .config
            .cdi_dir
            .join(format!("{DRIVER}-claim_{}.json", claim.uid))
            .exists()
    );
    assert!(lab.link(&lab.pod_ns, "rdma0").is_some());
    let (cp, _) = tandem::prepare::checkpoint::load(&node.config.state_dir).unwrap();
    assert!(cp.claims.is_empty());
    assert_eq!(cp.pending_releases[&claim.uid].interfaces.len(), 1);

    // The NIC cannot go to another claim while its netdev is away, and the error says why.
    let next = node.claim("second").await;
    let refused = prepare_one(&preparer, &next).await.unwrap_err();
    assert!(
        refused.contains(NIC) && refused.contains("still in its pod's network namespace"),
        "{refused}"
    );
    assert_eq!(preparer.reconcile_netattach().await.unwrap().pending, 1);

    // A restarted plugin that can see the namespace finds the entry in the checkpoint and
    // brings the interface home on its first reconcile.
    drop(preparer);
    let restarted = node.preparer(&node.config);
    restarted.recover().await.unwrap();
    let report = restarted.reconcile_netattach().await.unwrap();
    assert_eq!((report.released, report.pending), (1, 0));
    assert!(lab.link(&lab.pod_ns, "rdma0").is_none());
    assert!(
        lab.addresses(&lab.host_ns, NIC_IFNAME)
            .contains(&lab.address())
    );
    let (cp, _) = tandem::prepare::checkpoint::load(&node.config.state_dir).unwrap();
    assert!(cp.pending_releases.is_empty());
    // And now the second claim gets the NIC.
    prepare_one(&restarted, &next).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_refuses_the_interface_holding_the_node_ip() {
    let Some(lab) = Lab::new() else { return };
    let node = Node::new(&lab).await;
    let guarded = PrepareConfig {
        node_ip: Some(format!("10.210.{}.2", lab.octet).parse().unwrap()),
        ..node.config.clone()
    };
    let preparer = node.preparer(&guarded);
    let claim = node.claim("guarded").await;
    prepare_one(&preparer, &claim).await.unwrap();
    let out = lab.run_hook(&nic_hook(&node.spec(&claim)), "ctr-1");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(NIC_IFNAME) && stderr.contains("node IP"),
        "{stderr}"
    );
    assert!(lab.link(&lab.host_ns, NIC_IFNAME).is_some());
    assert!(lab.link(&lab.pod_ns, "rdma0").is_none());
}
