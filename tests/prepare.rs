//! Claim preparation end to end: a dgx-h100 fixture machine discovered from its sysfs tree,
//! ResourceClaims in the fake apiserver, and real CDI/state directories in a tempdir.

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem::apiserver_fake::FakeApiServer;
use tandem::prepare::checkpoint::{self, ClaimState, LoadOutcome};
use tandem::prepare::{ClaimRef, PrepareConfig, PrepareError, PreparedDevice, Preparer};
use tandem::topology::Inventory;
use tandem_kubelet_plugin::ClaimError;
use tempfile::TempDir;
use tokio::sync::watch;

const DRIVER: &str = "tandem.dev";
const NODE: &str = "node-a";
const NAMESPACE: &str = "ml";

struct Harness {
    dir: TempDir,
    api: FakeApiServer,
    inventory: Arc<Inventory>,
    inventory_tx: watch::Sender<Arc<Inventory>>,
    config: PrepareConfig,
    preparer: Preparer,
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let desc = tandem::fixture::builtin("dgx-h100").unwrap();
        let roots = tandem::fixture::write_machine(&desc, &dir.path().join("machine")).unwrap();
        set_boot_id(&roots.proc, "boot-1");
        let inventory = Arc::new(tandem::sysfs::discover(&roots).unwrap());
        let (inventory_tx, inventory_rx) = watch::channel(inventory.clone());
        let config = PrepareConfig {
            cdi_dir: dir.path().join("cdi"),
            state_dir: dir.path().join("state"),
            topology_dir: dir.path().join("run"),
            proc_root: roots.proc.clone(),
            ..PrepareConfig::new(DRIVER, NODE)
        };
        let api = FakeApiServer::start().await.unwrap();
        let preparer = Preparer::new(config.clone(), api.client(), inventory_rx).unwrap();
        Harness {
            dir,
            api,
            inventory,
            inventory_tx,
            config,
            preparer,
        }
    }

    /// A second Preparer over the same directories, as after a plugin restart.
    fn restarted(&self) -> Preparer {
        Preparer::new(
            self.config.clone(),
            self.api.client(),
            self.inventory_tx.subscribe(),
        )
        .unwrap()
    }

    fn claims_api(&self) -> Api<ResourceClaim> {
        Api::namespaced(self.api.client(), NAMESPACE)
    }

    /// Creates a claim with one request per distinct request name, and allocates it when
    /// `results` is Some: `(request, driver, device)` triples, plus opaque config entries.
    async fn claim(
        &self,
        name: &str,
        results: Option<&[(&str, &str, &str)]>,
        config: Value,
    ) -> ClaimRef {
        let mut requests: Vec<&str> = results
            .unwrap_or(&[("gpus", DRIVER, "")])
            .iter()
            .map(|r| r.0)
            .collect();
        requests.dedup();
        let requests: Vec<Value> = requests
            .iter()
            .map(|r| json!({"name": r, "exactly": {"deviceClassName": "gpu.tandem.dev"}}))
            .collect();
        let claim: ResourceClaim = serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"devices": {"requests": requests}},
        }))
        .unwrap();
        let created = self
            .claims_api()
            .create(&PostParams::default(), &claim)
            .await
            .unwrap();
        if let Some(results) = results {
            let results: Vec<Value> = results
                .iter()
                .map(|(request, driver, device)| {
                    json!({"request": request, "driver": driver, "pool": NODE, "device": device})
                })
                .collect();
            let status = json!({"status": {"allocation": {"devices": {"results": results, "config": config}}}});
            self.claims_api()
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
        ClaimRef {
            namespace: NAMESPACE.into(),
            name: name.into(),
            uid: created.metadata.uid.unwrap(),
        }
    }

    fn spec_path(&self, claim: &ClaimRef) -> PathBuf {
        self.config
            .cdi_dir
            .join(format!("tandem.dev-claim_{}.json", claim.uid))
    }

    fn topology_path(&self, claim: &ClaimRef) -> PathBuf {
        self.config
            .topology_dir
            .join(format!("{}.topology.json", claim.uid))
    }

    fn read_spec(&self, claim: &ClaimRef) -> Value {
        serde_json::from_slice(&std::fs::read(self.spec_path(claim)).unwrap()).unwrap()
    }

    fn cdi_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config.cdi_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn prepare_one(&self, claim: &ClaimRef) -> Result<Vec<PreparedDevice>, PrepareError> {
        let mut results = self.preparer.prepare(std::slice::from_ref(claim)).await;
        assert_eq!(results.len(), 1);
        results.remove(&claim.uid).unwrap()
    }

    fn claim_gets(&self, claim: &ClaimRef) -> usize {
        let path = format!("/resourceclaims/{}?", claim.name);
        self.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(&path))
            .count()
    }
}

fn set_boot_id(proc_root: &Path, id: &str) {
    let dir = proc_root.join("sys/kernel/random");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("boot_id"), format!("{id}\n")).unwrap();
}

fn env_of(spec: &Value) -> BTreeMap<String, String> {
    spec["containerEdits"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn device_nodes(spec: &Value, device: &str) -> Vec<(String, i64, i64)> {
    let entry = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == device)
        .unwrap_or_else(|| panic!("no CDI device {device} in {spec}"));
    entry["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            assert_eq!(n["type"], "c");
            (
                n["path"].as_str().unwrap().to_string(),
                n["major"].as_i64().unwrap(),
                n["minor"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn node(path: &str, major: i64, minor: i64) -> (String, i64, i64) {
    (path.to_string(), major, minor)
}

const TWO_RAILS: &[(&str, &str, &str)] = &[
    ("gpus", DRIVER, "gpu-0000-1b-00-0"),
    ("gpus", DRIVER, "gpu-0000-43-00-0"),
    ("nics", DRIVER, "nic-0000-18-00-0"),
    ("nics", DRIVER, "nic-0000-40-00-0"),
];

#[tokio::test]
async fn happy_path_pairs_gpus_with_their_nics_and_writes_the_cdi_spec() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    let devices = h.prepare_one(&claim).await.unwrap();

    let kind = "tandem.dev/claim";
    let names: Vec<&str> = devices.iter().map(|d| d.device_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "gpu-0000-1b-00-0",
            "gpu-0000-43-00-0",
            "nic-0000-18-00-0",
            "nic-0000-40-00-0"
        ]
    );
    for d in &devices {
        assert_eq!(d.pool_name, NODE);
        assert_eq!(
            d.cdi_device_ids,
            vec![format!("{kind}={}-{}", claim.uid, d.device_name)]
        );
        let expected_request = if d.device_name.starts_with("gpu") {
            "gpus"
        } else {
            "nics"
        };
        assert_eq!(d.request_names, vec![expected_request]);
        assert_eq!(d.share_id, None);
    }

    let spec = h.read_spec(&claim);
    assert_eq!(spec["kind"], kind);
    // Kubernetes UIDs are hex UUIDs; a device name starting with a digit needs 0.5.0.
    let expected_version = if claim.uid.starts_with(|c: char| c.is_ascii_digit()) {
        "0.5.0"
    } else {
        "0.3.0"
    };
    assert_eq!(spec["cdiVersion"], expected_version);
    let gpu0 = format!("{}-gpu-0000-1b-00-0", claim.uid);
    assert_eq!(
        device_nodes(&spec, &gpu0),
        [
            node("/dev/nvidia0", 195, 0),
            node("/dev/nvidiactl", 195, 255),
            node("/dev/nvidia-uvm", 509, 0),
            node("/dev/nvidia-uvm-tools", 509, 1),
        ]
    );
    // The HCA's own nodes (uverbs, umad, issm: infiniband major 231, numbers from its sysfs
    // `dev` files) and the shared rdma_cm.
    let nic3 = format!("{}-nic-0000-40-00-0", claim.uid);
    let mlx5_3 = h
        .inventory
        .nics
        .iter()
        .find_map(|n| n.rdma.as_ref().filter(|r| r.name == "mlx5_3"))
        .unwrap();
    let mut expected: Vec<_> = mlx5_3
        .char_devices
        .iter()
        .map(|c| node(&format!("/dev/{}", c.path), c.major.into(), c.minor.into()))
        .collect();
    expected.push(node("/dev/infiniband/rdma_cm", 10, 58));
    let nodes = device_nodes(&spec, &nic3);
    assert_eq!(nodes, expected);
    assert!(
        nodes.contains(&node("/dev/infiniband/uverbs3", 231, 195)),
        "{nodes:?}"
    );
    assert_eq!(
        nodes
            .iter()
            .filter(|(p, major, _)| p.starts_with("/dev/infiniband/u") && *major == 231)
            .count(),
        2
    );
    // The numbers are the inventory's (sysfs `dev` files), not a guess.
    let inventory_gpu = h
        .inventory
        .accelerators
        .iter()
        .find(|a| a.minor == Some(1))
        .unwrap();
    let gpu1 = format!("{}-gpu-0000-43-00-0", claim.uid);
    let c = &inventory_gpu.char_devices[0];
    assert_eq!(
        device_nodes(&spec, &gpu1)[0],
        node(&format!("/dev/{}", c.path), c.major.into(), c.minor.into())
    );

    let env = env_of(&spec);
    assert_eq!(env["NCCL_IB_HCA"], "=mlx5_0,mlx5_3");
    assert_eq!(env["TANDEM_CLAIM_UID"], claim.uid);
    assert_eq!(env["TANDEM_GPUS"], "gpu-0000-1b-00-0,gpu-0000-43-00-0");
    assert_eq!(env["TANDEM_NICS"], "nic-0000-18-00-0,nic-0000-40-00-0");
    assert_eq!(
        env["TANDEM_PAIRS"],
        "gpu-0000-1b-00-0=nic-0000-18-00-0:PIX,gpu-0000-43-00-0=nic-0000-40-00-0:PIX"
    );
    assert_eq!(env["TANDEM_TOPOLOGY_FILE"], "/var/run/tandem/topology.json");
    assert!(!env.contains_key("CUDA_VISIBLE_DEVICES") && !env.contains_key("UCX_NET_DEVICES"));

    // Every device carries the topology mount (CDI refuses a device without edits).
    assert!(spec["containerEdits"].get("mounts").is_none());
    for device in spec["devices"].as_array().unwrap() {
        assert_eq!(
            device["containerEdits"]["mounts"].as_array().unwrap().len(),
            1
        );
    }
    let mounts = spec["devices"][0]["containerEdits"]["mounts"]
        .as_array()
        .unwrap();
    assert_eq!(
        mounts[0]["hostPath"],
        h.topology_path(&claim).to_str().unwrap()
    );
    assert_eq!(mounts[0]["containerPath"], "/var/run/tandem/topology.json");
    assert!(
        mounts[0]["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro"))
    );

    let topology: Value =
        serde_json::from_slice(&std::fs::read(h.topology_path(&claim)).unwrap()).unwrap();
    assert_eq!(topology["claimUid"], claim.uid);
    assert_eq!(
        topology["pairs"][0],
        json!({"gpu": "gpu-0000-1b-00-0", "nic": "nic-0000-18-00-0", "affinity": "PIX"})
    );
    assert_eq!(topology["nics"][1]["rdmaDevice"], "mlx5_3");
    assert_eq!(topology["gpus"][0]["pciBusID"], "0000:1b:00.0");

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&h.spec_path(&claim)), 0o644);
    assert_eq!(
        mode(&checkpoint::checkpoint_path(&h.config.state_dir)),
        0o600
    );
    let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    assert_eq!(cp.claims[&claim.uid].state, ClaimState::PrepareCompleted);
    assert_eq!(cp.boot_id, "boot-1");
    assert_eq!(
        h.cdi_files(),
        [format!("tandem.dev-claim_{}.json", claim.uid)]
    );
}

#[tokio::test]
async fn repeated_prepare_answers_the_same_without_side_effects() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    let first = h.prepare_one(&claim).await.unwrap();
    let spec_meta = std::fs::metadata(h.spec_path(&claim)).unwrap();
    let checkpoint_before =
        std::fs::read(checkpoint::checkpoint_path(&h.config.state_dir)).unwrap();
    let gets = h.claim_gets(&claim);

    let second = h.prepare_one(&claim).await.unwrap();
    assert_eq!(first, second);
    let spec_after = std::fs::metadata(h.spec_path(&claim)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(spec_meta.ino(), spec_after.ino(), "spec rewritten");
    assert_eq!(
        checkpoint_before,
        std::fs::read(checkpoint::checkpoint_path(&h.config.state_dir)).unwrap()
    );
    assert_eq!(
        h.claim_gets(&claim),
        gets,
        "a completed claim is answered from the checkpoint"
    );

    // A restarted plugin answers the same from disk.
    let third = h.restarted().prepare(std::slice::from_ref(&claim)).await;
    assert_eq!(third[&claim.uid].as_ref().unwrap(), &first);
}

#[tokio::test]
async fn the_same_claim_twice_in_one_call_is_answered_once() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    let results = h.preparer.prepare(&[claim.clone(), claim.clone()]).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[&claim.uid].as_ref().unwrap().len(), 4);
    assert_eq!(h.claim_gets(&claim), 1);
}

#[tokio::test]
async fn unprepare_removes_everything_works_without_the_apiserver_and_is_idempotent() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    h.prepare_one(&claim).await.unwrap();
    h.claims_api()
        .delete(&claim.name, &DeleteParams::default())
        .await
        .unwrap();

    for _ in 0..2 {
        let results = h.preparer.unprepare(std::slice::from_ref(&claim)).await;
        assert!(results[&claim.uid].is_ok(), "{results:?}");
        assert!(!h.spec_path(&claim).exists());
        assert!(!h.topology_path(&claim).exists());
        let claims_dir = h.config.state_dir.join("claims");
        assert_eq!(std::fs::read_dir(&claims_dir).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(&h.config.topology_dir).unwrap().count(),
            0
        );
        let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
        assert!(cp.claims.is_empty());
    }
    assert!(h.cdi_files().is_empty());
}

#[tokio::test]
async fn unprepare_of_an_unknown_claim_succeeds() {
    let h = Harness::new().await;
    let unknown = ClaimRef {
        namespace: "ml".into(),
        name: "never".into(),
        uid: "6d1f4a6e-0000-4000-8000-000000000001".into(),
    };
    let results = h.preparer.unprepare(std::slice::from_ref(&unknown)).await;
    assert!(results[&unknown.uid].is_ok(), "{results:?}");
    let escaping = ClaimRef {
        uid: "../../etc".into(),
        ..unknown
    };
    let results = h.preparer.unprepare(std::slice::from_ref(&escaping)).await;
    let e = results[&escaping.uid].as_ref().unwrap_err();
    assert!(
        matches!(e, PrepareError::Claim(ClaimError::InvalidClaimUid { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn a_replaced_claim_is_refused() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    let stale = ClaimRef {
        uid: "0f0f0f0f-dead-4bee-8000-000000000000".into(),
        ..claim
    };
    let e = h.prepare_one(&stale).await.unwrap_err();
    assert!(
        matches!(e, PrepareError::Claim(ClaimError::UidMismatch { .. })),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("ml/train (0f0f0f0f-dead-4bee-8000-000000000000)"),
        "{e}"
    );
    assert!(h.cdi_files().is_empty());
}

#[tokio::test]
async fn unallocated_and_missing_claims_are_refused() {
    let h = Harness::new().await;
    let claim = h.claim("pending", None, json!([])).await;
    let e = h.prepare_one(&claim).await.unwrap_err();
    assert!(
        matches!(e, PrepareError::Claim(ClaimError::NotAllocated { .. })),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("ml/pending ({})", claim.uid)),
        "{e}"
    );

    let missing = ClaimRef {
        name: "gone".into(),
        ..claim
    };
    let e = h.prepare_one(&missing).await.unwrap_err();
    assert!(
        matches!(e, PrepareError::Claim(ClaimError::ClaimNotFound { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn devices_of_another_driver_are_ignored() {
    let h = Harness::new().await;
    let claim = h
        .claim(
            "mixed",
            Some(&[
                ("gpus", DRIVER, "gpu-0000-1b-00-0"),
                ("other", "gpu.nvidia.com", "gpu-0"),
            ]),
            json!([]),
        )
        .await;
    let devices = h.prepare_one(&claim).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_name, "gpu-0000-1b-00-0");
    let spec = h.read_spec(&claim);
    assert_eq!(spec["devices"].as_array().unwrap().len(), 1);

    // A claim with nothing of ours succeeds with no devices and writes nothing.
    let theirs = h
        .claim(
            "theirs",
            Some(&[("other", "gpu.nvidia.com", "gpu-0")]),
            json!([]),
        )
        .await;
    assert_eq!(
        h.prepare_one(&theirs).await.unwrap(),
        Vec::<PreparedDevice>::new()
    );
    assert!(!h.spec_path(&theirs).exists());
}

#[tokio::test]
async fn a_plain_ethernet_nic_still_gets_a_cdi_device_with_edits() {
    let h = Harness::new().await;
    let claim = h
        .claim(
            "eth",
            Some(&[("nics", DRIVER, "nic-0000-0b-00-0")]),
            json!([]),
        )
        .await;
    let devices = h.prepare_one(&claim).await.unwrap();
    assert_eq!(devices.len(), 1);
    let spec = h.read_spec(&claim);
    let edits = &spec["devices"][0]["containerEdits"];
    assert!(edits.get("deviceNodes").is_none(), "{spec}");
    assert_eq!(
        edits["mounts"][0]["containerPath"],
        "/var/run/tandem/topology.json"
    );
    assert!(!env_of(&spec).contains_key("NCCL_IB_HCA"));
}

#[tokio::test]
async fn a_device_missing_from_the_inventory_is_refused() {
    let h = Harness::new().await;
    let claim = h
        .claim(
            "ghost",
            Some(&[
                ("gpus", DRIVER, "gpu-0000-1b-00-0"),
                ("gpus", DRIVER, "gpu-0000-ee-00-0"),
            ]),
            json!([]),
        )
        .await;
    let e = h.prepare_one(&claim).await.unwrap_err();
    assert!(matches!(e, PrepareError::DeviceNotFound { .. }), "{e}");
    assert!(e.to_string().contains("gpu-0000-ee-00-0"), "{e}");
    assert!(h.cdi_files().is_empty());
    let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    assert!(cp.claims.is_empty());
}

#[tokio::test]
async fn an_unhealthy_device_is_refused() {
    let h = Harness::new().await;
    let mut inventory = (*h.inventory).clone();
    let nic = inventory
        .nics
        .iter_mut()
        .find(|n| n.rdma.as_ref().is_some_and(|r| r.name == "mlx5_0"))
        .unwrap();
    nic.rdma.as_mut().unwrap().ports[0].state = Some("DOWN".into());
    h.inventory_tx.send(Arc::new(inventory)).unwrap();
    let claim = h
        .claim(
            "down",
            Some(&[("nics", DRIVER, "nic-0000-18-00-0")]),
            json!([]),
        )
        .await;
    let e = h.prepare_one(&claim).await.unwrap_err();
    assert!(matches!(e, PrepareError::DeviceUnhealthy { .. }), "{e}");
    assert!(e.to_string().contains("nic-0000-18-00-0"), "{e}");
}

#[tokio::test]
async fn a_device_prepared_for_another_claim_is_refused() {
    let h = Harness::new().await;
    let first = h
        .claim(
            "first",
            Some(&[("gpus", DRIVER, "gpu-0000-1b-00-0")]),
            json!([]),
        )
        .await;
    let second = h
        .claim(
            "second",
            Some(&[("gpus", DRIVER, "gpu-0000-1b-00-0")]),
            json!([]),
        )
        .await;
    h.prepare_one(&first).await.unwrap();
    let e = h.prepare_one(&second).await.unwrap_err();
    assert!(matches!(e, PrepareError::DeviceInUse { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("ml/first ({})", first.uid)),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("ml/second ({})", second.uid)),
        "{e}"
    );

    // Both in one call: the first (by UID) wins, the other is refused.
    h.preparer.unprepare(std::slice::from_ref(&first)).await;
    let results = h.preparer.prepare(&[first.clone(), second.clone()]).await;
    assert_eq!(
        results.values().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert_eq!(h.cdi_files().len(), 1);
}

/// Claims are planned outside the checkpoint's lock, in parallel, and entered under it: of
/// claims that race for one device in parallel calls, exactly one gets it, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_for_one_device_in_parallel_calls_get_it_once() {
    let h = Arc::new(Harness::new().await);
    let gpu = "gpu-0000-1b-00-0";
    let mut claims = Vec::new();
    for i in 0..8 {
        let name = format!("rival-{i}");
        claims.push(
            h.claim(&name, Some(&[("gpus", DRIVER, gpu)]), json!([]))
                .await,
        );
    }
    for round in 0..20 {
        let calls = claims.iter().map(|c| {
            let h = h.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let result = h.prepare_one(&c).await;
                (c, result)
            })
        });
        let mut winners = Vec::new();
        let mut refusals = Vec::new();
        for joined in futures::future::join_all(calls).await {
            match joined.unwrap() {
                (claim, Ok(_)) => winners.push(claim),
                (claim, Err(e)) => refusals.push((claim, e)),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?} {refusals:?}");
        let winner = &winners[0];
        for (claim, e) in &refusals {
            assert!(matches!(e, PrepareError::DeviceInUse { .. }), "{e}");
            assert!(e.to_string().contains(&winner.uid), "{e}");
            assert!(!h.topology_path(claim).exists());
        }
        assert_eq!(
            h.cdi_files(),
            vec![format!("tandem.dev-claim_{}.json", winner.uid)]
        );
        let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
        assert_eq!(cp.claims.keys().collect::<Vec<_>>(), vec![&winner.uid]);

        let results = h.preparer.unprepare(std::slice::from_ref(winner)).await;
        assert!(results[&winner.uid].is_ok(), "{results:?}");
    }
}

#[tokio::test]
async fn malformed_opaque_config_names_the_field() {
    let h = Harness::new().await;
    let config = json!([{
        "source": "FromClaim",
        "opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig", "env": "nccl", "nicAtach": "shared"
        }}
    }]);
    let claim = h
        .claim(
            "typo",
            Some(&[("gpus", DRIVER, "gpu-0000-1b-00-0")]),
            config,
        )
        .await;
    let e = h.prepare_one(&claim).await.unwrap_err();
    assert!(matches!(e, PrepareError::Config { .. }), "{e}");
    assert!(e.to_string().contains("\"nicAtach\""), "{e}");
    assert!(e.to_string().contains(&claim.uid), "{e}");

    let config = json!([{"source": "FromClass", "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig", "env": true
    }}}]);
    let claim = h
        .claim(
            "wrong-type",
            Some(&[("gpus", DRIVER, "gpu-0000-43-00-0")]),
            config,
        )
        .await;
    let e = h.prepare_one(&claim).await.unwrap_err();
    assert!(e.to_string().contains("\"env\""), "{e}");
    assert!(h.cdi_files().is_empty());
}

#[tokio::test]
async fn ucx_config_from_the_claim_overrides_the_class() {
    let h = Harness::new().await;
    let params =
        |env: &str| json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig", "env": env});
    let config = json!([
        {"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": params("ucx")}},
        {"source": "FromClass", "opaque": {"driver": DRIVER, "parameters": params("none")}},
    ]);
    let claim = h.claim("ucx", Some(TWO_RAILS), config).await;
    h.prepare_one(&claim).await.unwrap();
    let env = env_of(&h.read_spec(&claim));
    assert_eq!(env["UCX_NET_DEVICES"], "mlx5_0:1,mlx5_3:1");
    assert!(!env.contains_key("NCCL_IB_HCA"));
}

#[tokio::test]
async fn gpu_only_claim_with_shared_attach_gets_the_paired_nics_verbs_devices_only() {
    let h = Harness::new().await;
    let config = json!([{"source": "FromClass", "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig", "nicAttach": "shared"
    }}}]);
    let claim = h
        .claim(
            "gpus-only",
            Some(&[
                ("gpus", DRIVER, "gpu-0000-52-00-0"),
                ("gpus", DRIVER, "gpu-0000-9d-00-0"),
            ]),
            config,
        )
        .await;
    let devices = h.prepare_one(&claim).await.unwrap();
    assert_eq!(devices.len(), 2, "shared NICs are not claim devices");
    let spec = h.read_spec(&claim);
    let claim_nodes: Vec<String> = spec["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        claim_nodes,
        [
            "/dev/infiniband/uverbs4",
            "/dev/infiniband/rdma_cm",
            "/dev/infiniband/uverbs6"
        ]
    );
    let env = env_of(&spec);
    assert_eq!(env["NCCL_IB_HCA"], "=mlx5_4,mlx5_6");
    assert_eq!(env["TANDEM_NICS"], "nic-0000-4f-00-0,nic-0000-9a-00-0");
    let topology: Value =
        serde_json::from_slice(&std::fs::read(h.topology_path(&claim)).unwrap()).unwrap();
    assert_eq!(topology["nics"][0]["shared"], true);

    // Without the attach option, the same kind of claim gets no NIC at all.
    let plain = h
        .claim(
            "plain",
            Some(&[("gpus", DRIVER, "gpu-0000-61-00-0")]),
            json!([]),
        )
        .await;
    h.prepare_one(&plain).await.unwrap();
    let spec = h.read_spec(&plain);
    assert!(
        spec["containerEdits"].get("deviceNodes").is_none(),
        "{spec}"
    );
    assert_eq!(env_of(&spec)["TANDEM_PAIRS"], "");
}

#[tokio::test]
async fn a_deleted_cdi_spec_is_recreated_by_the_next_prepare() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    let first = h.prepare_one(&claim).await.unwrap();
    let original = std::fs::read(h.spec_path(&claim)).unwrap();
    std::fs::remove_file(h.spec_path(&claim)).unwrap();
    std::fs::remove_file(h.topology_path(&claim)).unwrap();
    let again = h.prepare_one(&claim).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(std::fs::read(h.spec_path(&claim)).unwrap(), original);
    assert!(h.topology_path(&claim).exists());
}

#[tokio::test]
async fn after_a_reboot_completed_claims_are_prepared_again_from_the_current_inventory() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    let first = h.prepare_one(&claim).await.unwrap();
    // Reboot: /var/run/cdi is empty, the boot ID is new, nvidia-uvm got another major.
    std::fs::remove_file(h.spec_path(&claim)).unwrap();
    set_boot_id(&h.config.proc_root, "boot-2");
    let mut inventory = (*h.inventory).clone();
    for c in &mut inventory.host.shared_char_devices {
        if c.path.starts_with("nvidia-uvm") {
            c.major = 511;
        }
    }
    h.inventory_tx.send(Arc::new(inventory)).unwrap();
    // A reboot restarts the plugin, which reads the boot ID once, at start.
    let rebooted = h.restarted();
    let report = rebooted.recover().await.unwrap();
    assert_eq!(
        report.prepared_claims, 1,
        "completed claims survive a reboot"
    );

    let again = rebooted
        .prepare(std::slice::from_ref(&claim))
        .await
        .remove(&claim.uid)
        .unwrap()
        .unwrap();
    assert_eq!(first, again);
    let spec = h.read_spec(&claim);
    let gpu0 = format!("{}-gpu-0000-1b-00-0", claim.uid);
    assert!(device_nodes(&spec, &gpu0).contains(&node("/dev/nvidia-uvm", 511, 0)));
    let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    assert_eq!(cp.claims[&claim.uid].boot_id, "boot-2");
}

#[tokio::test]
async fn a_corrupt_checkpoint_is_set_aside_instead_of_failing() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    h.prepare_one(&claim).await.unwrap();
    let path = checkpoint::checkpoint_path(&h.config.state_dir);
    std::fs::write(&path, b"{\"version\":1,\"claims\":{\"trunc").unwrap();

    let report = h.restarted().recover().await.unwrap();
    let LoadOutcome::SetAside { set_aside_to, .. } = &report.checkpoint else {
        panic!("{report:?}");
    };
    assert!(
        set_aside_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("checkpoint.json.corrupt-")
    );
    assert_eq!(
        std::fs::read(set_aside_to).unwrap(),
        b"{\"version\":1,\"claims\":{\"trunc"
    );
    // With the record gone, the spec is an orphan: nothing may stay behind unowned.
    assert_eq!(report.orphan_specs_removed, vec![h.spec_path(&claim)]);
    // And the plugin keeps working: the kubelet's next prepare starts over.
    h.prepare_one(&claim).await.unwrap();
    assert!(h.spec_path(&claim).exists());
}

#[tokio::test]
async fn recover_rolls_back_prepare_started_claims() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    h.prepare_one(&claim).await.unwrap();
    // As if the process died between recording PrepareStarted and PrepareCompleted.
    let (mut cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    cp.claims.get_mut(&claim.uid).unwrap().state = ClaimState::PrepareStarted;
    checkpoint::save(&h.config.state_dir, &cp).unwrap();

    let report = h.restarted().recover().await.unwrap();
    assert_eq!(report.rolled_back, vec![claim.uid.clone()]);
    assert!(!h.spec_path(&claim).exists());
    assert!(!h.topology_path(&claim).exists());
    let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    assert!(cp.claims.is_empty());
    // The kubelet's retry prepares it fresh.
    assert_eq!(h.prepare_one(&claim).await.unwrap().len(), 4);
}

#[tokio::test]
async fn recover_deletes_only_our_orphan_specs_and_leftovers() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    h.prepare_one(&claim).await.unwrap();
    let cdi = &h.config.cdi_dir;
    let orphan = cdi.join("tandem.dev-claim_11111111-2222-4333-8444-555555555555.json");
    std::fs::write(
        &orphan,
        r#"{"cdiVersion":"0.5.0","kind":"tandem.dev/claim","devices":[]}"#,
    )
    .unwrap();
    let foreign = cdi.join("nvidia.com-gpu.json");
    std::fs::write(
        &foreign,
        r#"{"cdiVersion":"0.5.0","kind":"nvidia.com/gpu","devices":[]}"#,
    )
    .unwrap();
    let temp = cdi.join(".tandem.dev-claim_x.json.abc123.tmp");
    std::fs::write(&temp, "{").unwrap();
    let orphan_dir = h
        .config
        .state_dir
        .join("claims/11111111-2222-4333-8444-555555555555");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let claims_dir = h.config.state_dir.join("claims");
    let orphan_topology = claims_dir.join("11111111-2222-4333-8444-666666666666.topology.json");
    std::fs::write(&orphan_topology, "{}").unwrap();
    let owned_topology_temp = claims_dir.join(format!(".{}.topology.json.x1y2z3.tmp", claim.uid));
    std::fs::write(&owned_topology_temp, "{").unwrap();
    // The topology directory (tmpfs) may hold what is not ours: only our names go.
    let run = &h.config.topology_dir;
    let orphan_run_topology = run.join("11111111-2222-4333-8444-777777777777.topology.json");
    std::fs::write(&orphan_run_topology, "{}").unwrap();
    let owned_run_temp = run.join(format!(".{}.topology.json.q9w8e7.tmp", claim.uid));
    std::fs::write(&owned_run_temp, "{").unwrap();
    let foreign_run = run.join("other-tool.json");
    std::fs::write(&foreign_run, "{}").unwrap();

    let report = h.restarted().recover().await.unwrap();
    assert_eq!(report.orphan_specs_removed, vec![orphan.clone()]);
    assert_eq!(report.temp_files_removed, vec![temp.clone()]);
    let mut removed = report.orphan_claim_state_removed.clone();
    removed.sort();
    let mut expected = vec![
        orphan_dir.clone(),
        orphan_topology.clone(),
        owned_topology_temp.clone(),
        orphan_run_topology.clone(),
        owned_run_temp.clone(),
    ];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(!orphan.exists() && !temp.exists() && !orphan_dir.exists());
    assert!(!orphan_topology.exists() && !owned_topology_temp.exists());
    assert!(!orphan_run_topology.exists() && !owned_run_temp.exists());
    assert!(foreign_run.exists(), "a file not named as ours stays");
    assert!(
        h.topology_path(&claim).exists(),
        "an owned topology file stays"
    );
    assert!(
        foreign.exists(),
        "another vendor's spec is not ours to delete"
    );
    assert!(h.spec_path(&claim).exists(), "an owned spec stays");
    assert_eq!(report.prepared_claims, 1);
    assert!(report.restored.is_empty());
    assert!(h.dir.path().join("machine").exists());
}

#[tokio::test]
async fn recover_restores_the_files_of_a_claim_still_recorded_as_prepared() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    h.prepare_one(&claim).await.unwrap();
    let original = std::fs::read(h.spec_path(&claim)).unwrap();
    // As if an unprepare died after removing the files, before dropping the entry: the
    // kubelet has not been told the claim is gone, so it must stay usable.
    std::fs::remove_file(h.spec_path(&claim)).unwrap();
    std::fs::remove_dir_all(h.topology_path(&claim).parent().unwrap()).unwrap();
    let report = h.restarted().recover().await.unwrap();
    assert_eq!(report.restored, vec![claim.uid.clone()]);
    assert_eq!(std::fs::read(h.spec_path(&claim)).unwrap(), original);
    assert!(h.topology_path(&claim).exists());
}

/// A claim prepared by a version that kept its topology file in a directory of its own
/// (`claims/<uid>/topology.json`, as its checkpoint entry and CDI spec name it): restored at
/// that path, and unprepared with the directory.
#[tokio::test]
async fn claims_of_the_older_per_claim_directory_layout_are_restored_and_removed() {
    let h = Harness::new().await;
    let claim = h.claim("train", Some(TWO_RAILS), json!([])).await;
    h.prepare_one(&claim).await.unwrap();
    let old_dir = h.config.state_dir.join("claims").join(&claim.uid);
    let old_path = old_dir.join("topology.json");
    std::fs::create_dir(&old_dir).unwrap();
    std::fs::rename(h.topology_path(&claim), &old_path).unwrap();
    let (mut cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    let entry = cp.claims.get_mut(&claim.uid).unwrap();
    entry.files = vec![old_path.clone()];
    checkpoint::save(&h.config.state_dir, &cp).unwrap();

    let preparer = h.restarted();
    let report = preparer.recover().await.unwrap();
    assert!(report.orphan_claim_state_removed.is_empty(), "{report:?}");
    std::fs::remove_file(&old_path).unwrap();
    let report = h.restarted().recover().await.unwrap();
    assert_eq!(report.restored, vec![claim.uid.clone()]);
    assert!(old_path.exists(), "restored where the entry records it");
    assert!(!h.topology_path(&claim).exists());

    let results = preparer.unprepare(std::slice::from_ref(&claim)).await;
    assert!(results[&claim.uid].is_ok(), "{results:?}");
    assert!(!old_dir.exists());
}

#[tokio::test]
async fn sixty_four_claims_prepared_concurrently_through_one_preparer() {
    let h = Arc::new(Harness::new().await);
    let devices: Vec<String> = h
        .inventory
        .accelerators
        .iter()
        .map(|a| tandem::names::accelerator_device_name(&a.pci.address))
        .chain(
            h.inventory
                .nics
                .iter()
                .map(|n| tandem::names::nic_device_name(&n.pci.address)),
        )
        .collect();
    let mut claims = Vec::new();
    for i in 0..64 {
        let name = format!("c{i}");
        let claim = match devices.get(i) {
            Some(device) => {
                h.claim(&name, Some(&[("r", DRIVER, device.as_str())]), json!([]))
                    .await
            }
            None => {
                h.claim(&name, Some(&[("r", "gpu.nvidia.com", "gpu-0")]), json!([]))
                    .await
            }
        };
        claims.push(claim);
    }
    let calls = claims.iter().map(|c| {
        let h = h.clone();
        let c = c.clone();
        tokio::spawn(async move {
            (
                c.uid.clone(),
                h.preparer.prepare(std::slice::from_ref(&c)).await,
            )
        })
    });
    for joined in futures::future::join_all(calls).await {
        let (uid, results) = joined.unwrap();
        assert!(results[&uid].is_ok(), "{results:?}");
    }
    let with_devices = devices.len().min(64);
    assert_eq!(h.cdi_files().len(), with_devices);
    let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    assert_eq!(cp.claims.len(), with_devices);
    assert!(
        cp.claims
            .values()
            .all(|e| e.state == ClaimState::PrepareCompleted)
    );

    let calls = claims.iter().map(|c| {
        let h = h.clone();
        let c = c.clone();
        tokio::spawn(async move {
            (
                c.uid.clone(),
                h.preparer.unprepare(std::slice::from_ref(&c)).await,
            )
        })
    });
    for joined in futures::future::join_all(calls).await {
        let (uid, results) = joined.unwrap();
        assert!(results[&uid].is_ok(), "{results:?}");
    }
    assert!(h.cdi_files().is_empty());
    let (cp, _) = checkpoint::load(&h.config.state_dir).unwrap();
    assert!(cp.claims.is_empty());
}

#[tokio::test]
async fn a_version_0_checkpoint_is_upgraded_and_its_claims_kept() {
    let h = Harness::new().await;
    let claim = h
        .claim(
            "old",
            Some(&[("gpus", DRIVER, "gpu-0000-1b-00-0")]),
            json!([]),
        )
        .await;
    let id = format!("tandem.dev/claim={}-gpu-0000-1b-00-0", claim.uid);
    std::fs::write(
        h.spec_path(&claim),
        r#"{"cdiVersion":"0.3.0","kind":"tandem.dev/claim","devices":[]}"#,
    )
    .unwrap();
    let v0 = json!({"claims": [{
        "uid": claim.uid, "namespace": NAMESPACE, "name": "old", "prepared": true,
        "devices": [{"requestNames": ["gpus"], "poolName": NODE, "deviceName": "gpu-0000-1b-00-0", "cdiDeviceIds": [id]}],
        "cdiSpecPath": h.spec_path(&claim),
    }]});
    std::fs::write(
        checkpoint::checkpoint_path(&h.config.state_dir),
        v0.to_string(),
    )
    .unwrap();

    let report = h.restarted().recover().await.unwrap();
    assert_eq!(
        report.checkpoint,
        LoadOutcome::Loaded {
            migrated_from: Some(0)
        }
    );
    assert!(
        report.orphan_specs_removed.is_empty(),
        "the migrated claim owns its spec"
    );
    let raw: Value = serde_json::from_slice(
        &std::fs::read(checkpoint::checkpoint_path(&h.config.state_dir)).unwrap(),
    )
    .unwrap();
    assert_eq!(raw["version"], 1);

    // The device stays reserved for the old claim.
    let rival = h
        .claim(
            "rival",
            Some(&[("gpus", DRIVER, "gpu-0000-1b-00-0")]),
            json!([]),
        )
        .await;
    assert!(matches!(
        h.prepare_one(&rival).await,
        Err(PrepareError::DeviceInUse { .. })
    ));
    // Version 0 kept no spec content, so the next prepare rebuilds it in full.
    let devices = h.prepare_one(&claim).await.unwrap();
    assert_eq!(devices[0].cdi_device_ids, vec![id]);
    assert_eq!(h.read_spec(&claim)["devices"].as_array().unwrap().len(), 1);
}
