//! Composition with the GPU vendor's CDI specs and driver roots: a dgx-h100 fixture machine
//! with an `nvidia-ctk cdi generate`-shaped spec (index-named, UUID-named, both, `all` only,
//! malformed, stale after a GPU disappeared), and claims prepared end to end with the vendor
//! device listed before ours, or with the driver root mounted and the spec passing the CDI
//! schema and the CDI library's validation rules.

#[path = "support/cdi_schema.rs"]
mod cdi_schema;
#[path = "support/claims.rs"]
mod claims;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem::apiserver_fake::FakeApiServer;
use tandem::fixture::{DeviceKind, MachineDescription, NvidiaNaming, nvidia_ctk_spec};
use tandem::prepare::driver_root::DriverRoot;
use tandem::prepare::vendor_cdi::{VendorMatches, VendorSpecs, match_inventory};
use tandem::prepare::{ClaimRef, PrepareConfig, Preparer};
use tandem::topology::{AcceleratorKind, Inventory};
use tempfile::TempDir;

fn discover(desc: &MachineDescription, dir: &Path) -> Inventory {
    let roots = tandem::fixture::write_machine(desc, dir).unwrap();
    tandem::sysfs::discover(&roots).unwrap()
}

fn dgx() -> (TempDir, Inventory) {
    let dir = tempfile::tempdir().unwrap();
    let inventory = discover(
        &tandem::fixture::builtin("dgx-h100").unwrap(),
        &dir.path().join("m"),
    );
    (dir, inventory)
}

fn gpus(inventory: &Inventory) -> Vec<&tandem::topology::Accelerator> {
    inventory
        .accelerators
        .iter()
        .filter(|a| a.kind == AcceleratorKind::NvidiaGpu)
        .collect()
}

/// Writes `files` into a fresh CDI directory and matches the inventory against it.
fn matches_for(inventory: &Inventory, files: &[(&str, &str)]) -> (TempDir, VendorMatches) {
    let cdi = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(cdi.path().join(name), text).unwrap();
    }
    let mut specs = VendorSpecs::new(vec![cdi.path().to_path_buf()], "tandem.dev");
    let found = match_inventory(&specs.refresh(), inventory);
    (cdi, found)
}

fn chosen(found: &VendorMatches) -> Vec<Option<String>> {
    found.values().map(|m| m.device_id.clone()).collect()
}

#[test]
fn index_named_devices_go_each_to_its_own_gpu() {
    let (_d, inventory) = dgx();
    let spec = nvidia_ctk_spec(&inventory, NvidiaNaming::Index);
    let (_c, found) = matches_for(&inventory, &[("nvidia.yaml", &spec)]);
    let gpus = gpus(&inventory);
    assert_eq!(found.len(), 8);
    for gpu in &gpus {
        let m = &found[&gpu.pci.address];
        assert_eq!(
            m.device_id.as_deref(),
            Some(format!("nvidia.com/gpu={}", gpu.minor.unwrap()).as_str()),
            "{}",
            gpu.pci.address
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        assert!(m.spec_path.as_ref().unwrap().ends_with("nvidia.yaml"));
    }
}

#[test]
fn uuid_named_devices_match_and_win_over_index_named_ones() {
    let (_d, inventory) = dgx();
    for naming in [NvidiaNaming::Uuid, NvidiaNaming::IndexAndUuid] {
        let spec = nvidia_ctk_spec(&inventory, naming);
        let (_c, found) = matches_for(&inventory, &[("nvidia.yaml", &spec)]);
        for gpu in gpus(&inventory) {
            assert_eq!(
                found[&gpu.pci.address].device_id,
                Some(format!("nvidia.com/gpu={}", gpu.uuid.as_deref().unwrap())),
                "{naming:?}"
            );
        }
    }
}

#[test]
fn an_all_only_spec_names_no_single_gpu_and_says_so() {
    let (_d, inventory) = dgx();
    let spec = nvidia_ctk_spec(&inventory, NvidiaNaming::AllOnly);
    let (cdi, found) = matches_for(&inventory, &[("nvidia.yaml", &spec)]);
    assert!(chosen(&found).iter().all(Option::is_none));
    let path = cdi.path().join("nvidia.yaml").display().to_string();
    for gpu in gpus(&inventory) {
        let warnings = &found[&gpu.pci.address].warnings;
        let name = tandem::names::accelerator_device_name(&gpu.pci.address);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(&path) && w.contains(&name)),
            "{warnings:?}"
        );
    }
}

#[test]
fn a_malformed_spec_is_skipped_with_a_warning_naming_it_and_others_still_match() {
    let (_d, inventory) = dgx();
    let good = nvidia_ctk_spec(&inventory, NvidiaNaming::Index);
    let (cdi, found) = matches_for(
        &inventory,
        &[
            ("broken.yaml", "kind: nvidia.com/gpu\ndevices: [\n"),
            ("nvidia.yaml", &good),
        ],
    );
    assert!(chosen(&found).iter().all(Option::is_some));
    let broken = cdi.path().join("broken.yaml").display().to_string();
    for m in found.values() {
        assert!(
            m.warnings.iter().any(|w| w.contains(&broken)),
            "{:?}",
            m.warnings
        );
    }
    let (_c, only_broken) = matches_for(&inventory, &[("nvidia.json", "{not json")]);
    assert!(chosen(&only_broken).iter().all(Option::is_none));
}

/// The spec was generated on the full machine; then the GPU of rail 3 failed and, after a
/// reboot, the driver numbered the remaining GPUs 0..6 in bus order. Every GPU still gets
/// only a device whose node is its own, and UUID-named devices that now point at another GPU
/// are refused as stale.
#[test]
fn a_stale_spec_after_a_gpu_disappeared_never_hands_a_gpu_another_ones_device() {
    let dir = tempfile::tempdir().unwrap();
    let full = tandem::fixture::builtin("dgx-h100").unwrap();
    let before = discover(&full, &dir.path().join("before"));
    let mut after_desc = full.clone();
    let gone = after_desc
        .devices
        .iter()
        .position(|d| d.path.ends_with("0000:61:00.0"))
        .unwrap();
    after_desc.devices.remove(gone);
    let mut minor = 0;
    for device in &mut after_desc.devices {
        if let DeviceKind::NvidiaGpu(gpu) = &mut device.kind {
            gpu.minor = Some(minor);
            minor += 1;
        }
    }
    let after = discover(&after_desc, &dir.path().join("after"));
    assert_eq!(gpus(&after).len(), 7);

    for naming in [NvidiaNaming::IndexAndUuid, NvidiaNaming::Uuid] {
        let spec = nvidia_ctk_spec(&before, naming);
        let (_c, found) = matches_for(&after, &[("nvidia.yaml", &spec)]);
        let parsed: serde_json::Value = serde_norway::from_str(&spec).unwrap();
        let mut used = BTreeSet::new();
        for gpu in gpus(&after) {
            let m = &found[&gpu.pci.address];
            let Some(id) = &m.device_id else {
                // Only UUID naming leaves a renumbered GPU without a device.
                assert_eq!(naming, NvidiaNaming::Uuid);
                continue;
            };
            assert!(used.insert(id.clone()), "{id} handed out twice");
            let name = id.strip_prefix("nvidia.com/gpu=").unwrap();
            let device = parsed["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == name)
                .unwrap();
            let own = format!("/dev/nvidia{}", gpu.minor.unwrap());
            assert_eq!(device["containerEdits"]["deviceNodes"][0]["path"], own);
            if name.starts_with("GPU-") {
                assert_eq!(Some(name), gpu.uuid.as_deref());
            }
        }
        let stale: Vec<&String> = found
            .values()
            .flat_map(|m| &m.warnings)
            .filter(|w| w.contains("stale"))
            .collect();
        assert!(!stale.is_empty(), "{naming:?}");
        // GPUs before the one that went keep their numbers and their UUID devices.
        let first = &gpus(&after)[0];
        assert_eq!(
            found[&first.pci.address].device_id,
            Some(format!("nvidia.com/gpu={}", first.uuid.as_deref().unwrap()))
        );
    }
}

#[test]
fn specs_are_re_read_when_they_change_and_our_own_specs_are_not_vendor_specs() {
    let (_d, inventory) = dgx();
    let cdi = tempfile::tempdir().unwrap();
    let mut specs = VendorSpecs::new(vec![cdi.path().to_path_buf()], "tandem.dev");
    assert!(specs.refresh().specs.is_empty());
    std::fs::write(
        cdi.path().join("tandem.dev-claim_u1.json"),
        r#"{"cdiVersion":"0.5.0","kind":"tandem.dev/claim","devices":[{"name":"u1-gpu","containerEdits":{"deviceNodes":[{"path":"/dev/nvidia0"}]}}]}"#,
    )
    .unwrap();
    let path = cdi.path().join("nvidia.yaml");
    std::fs::write(&path, nvidia_ctk_spec(&inventory, NvidiaNaming::AllOnly)).unwrap();
    let snapshot = specs.refresh();
    assert_eq!(snapshot.specs.len(), 1, "only the vendor's spec");
    assert!(
        chosen(&match_inventory(&snapshot, &inventory))
            .iter()
            .all(Option::is_none)
    );
    std::fs::write(&path, nvidia_ctk_spec(&inventory, NvidiaNaming::Index)).unwrap();
    assert!(
        chosen(&match_inventory(&specs.refresh(), &inventory))
            .iter()
            .all(Option::is_some)
    );
    std::fs::remove_file(&path).unwrap();
    assert!(specs.refresh().specs.is_empty());
}

#[test]
fn the_matching_is_kept_until_a_spec_or_the_inventory_changes() {
    let (_d, inventory) = dgx();
    let inventory = Arc::new(inventory);
    let cdi = tempfile::tempdir().unwrap();
    let mut specs = VendorSpecs::new(vec![cdi.path().to_path_buf()], "tandem.dev");
    let none = specs.matches(&inventory);
    assert!(chosen(&none).iter().all(Option::is_none));
    let path = cdi.path().join("nvidia.yaml");
    std::fs::write(&path, nvidia_ctk_spec(&inventory, NvidiaNaming::Index)).unwrap();
    let first = specs.matches(&inventory);
    assert!(
        chosen(&first).iter().all(Option::is_some),
        "a new spec is read"
    );
    // Nothing changed: the same matching, not made again.
    assert!(Arc::ptr_eq(&first, &specs.matches(&inventory)));
    // The spec rewritten with UUID names: matched again from the new text.
    std::fs::write(&path, nvidia_ctk_spec(&inventory, NvidiaNaming::Uuid)).unwrap();
    let rewritten = specs.matches(&inventory);
    assert!(
        chosen(&rewritten)
            .iter()
            .all(|id| id.as_deref().is_some_and(|id| id.contains("=GPU-"))),
        "{:?}",
        chosen(&rewritten)
    );
    // Another inventory (a rescan), even an equal one: matched again for it.
    let rescanned = Arc::new((*inventory).clone());
    let again = specs.matches(&rescanned);
    assert!(!Arc::ptr_eq(&rewritten, &again));
    assert_eq!(*rewritten, *again);
    // The spec gone: no vendor device any more.
    std::fs::remove_file(&path).unwrap();
    assert!(
        chosen(&specs.matches(&rescanned))
            .iter()
            .all(Option::is_none)
    );
}

struct Node {
    dir: TempDir,
    api: FakeApiServer,
    inventory: Arc<Inventory>,
}

impl Node {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let desc = tandem::fixture::builtin("dgx-h100").unwrap();
        let roots = tandem::fixture::write_machine(&desc, &dir.path().join("machine")).unwrap();
        let boot = roots.proc.join("sys/kernel/random");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join("boot_id"), "boot-1\n").unwrap();
        let inventory = Arc::new(tandem::sysfs::discover(&roots).unwrap());
        Node {
            dir,
            api: FakeApiServer::start().await.unwrap(),
            inventory,
        }
    }

    fn config(&self) -> PrepareConfig {
        PrepareConfig {
            cdi_dir: self.dir.path().join("cdi"),
            state_dir: self.dir.path().join("state"),
            topology_dir: self.dir.path().join("run"),
            proc_root: self.dir.path().join("machine/proc"),
            ..PrepareConfig::new(tandem::names::DEFAULT_DRIVER_NAME, "node-a")
        }
    }

    /// Prepares a claim on GPU `index` and its NIC; returns the GPU's CDI ids and the spec.
    async fn prepare(&self, config: PrepareConfig, index: usize) -> (Vec<String>, PathBuf) {
        let (_tx, rx) = tokio::sync::watch::channel(self.inventory.clone());
        let preparer = Preparer::new(config.clone(), self.api.client(), rx).unwrap();
        let claim = claims::create_gpu_nic_claim(
            &self.api.client(),
            &self.inventory,
            "ml",
            &format!("c{index}"),
            "node-a",
            index,
        )
        .await;
        let claim = ClaimRef {
            namespace: claim.namespace,
            name: claim.name,
            uid: claim.uid,
        };
        let mut results = preparer.prepare(std::slice::from_ref(&claim)).await;
        let devices = results.remove(&claim.uid).unwrap().unwrap();
        let gpu = devices
            .iter()
            .find(|d| d.device_name.starts_with("gpu-"))
            .unwrap();
        let spec = config
            .cdi_dir
            .join(format!("tandem.dev-claim_{}.json", claim.uid));
        (gpu.cdi_device_ids.clone(), spec)
    }
}

#[tokio::test]
async fn a_prepared_gpu_lists_the_vendor_device_before_ours_and_without_a_spec_only_ours() {
    let node = Node::new().await;
    let vendor_dir = node.dir.path().join("etc-cdi");
    std::fs::create_dir_all(&vendor_dir).unwrap();
    // An empty vendor directory: prepared as without the flag.
    let config = PrepareConfig {
        vendor_cdi_dirs: vec![vendor_dir.clone()],
        ..node.config()
    };
    let (ids, _) = node.prepare(config.clone(), 0).await;
    assert_eq!(ids.len(), 1);
    assert!(ids[0].starts_with("tandem.dev/claim="), "{ids:?}");

    std::fs::write(
        vendor_dir.join("nvidia.yaml"),
        nvidia_ctk_spec(&node.inventory, NvidiaNaming::IndexAndUuid),
    )
    .unwrap();
    let (ids, spec) = node.prepare(config, 1).await;
    let gpu = &node.inventory.accelerators[1];
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(
        ids[0],
        format!("nvidia.com/gpu={}", gpu.uuid.as_deref().unwrap())
    );
    assert!(ids[1].starts_with("tandem.dev/claim="));
    // The vendor directory is read, never written.
    let names: Vec<_> = std::fs::read_dir(&vendor_dir).unwrap().collect();
    assert_eq!(names.len(), 1);
    cdi_schema::validate(&std::fs::read(spec).unwrap()).unwrap();
}

#[tokio::test]
async fn driver_root_mode_mounts_the_driver_read_only_and_the_spec_is_valid_cdi() {
    let node = Node::new().await;
    let root = node.dir.path().join("home/kubernetes/bin/nvidia");
    std::fs::create_dir_all(root.join("lib64")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("lib64/libcuda.so.580.95.05"), b"").unwrap();
    std::fs::write(root.join("bin/nvidia-smi"), b"").unwrap();
    let driver_root = DriverRoot::discover(&root, Path::new("/usr/local/nvidia")).unwrap();
    let config = PrepareConfig {
        driver_root: Some(driver_root),
        nvidia_legacy_env: true,
        ..node.config()
    };
    let (ids, spec_path) = node.prepare(config, 2).await;
    assert_eq!(ids.len(), 1);
    let bytes = std::fs::read(&spec_path).unwrap();
    cdi_schema::validate(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let spec: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let gpu = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"].as_str().unwrap().contains("-gpu-"))
        .unwrap();
    let mounts = gpu["containerEdits"]["mounts"].as_array().unwrap();
    let lib = mounts
        .iter()
        .find(|m| m["containerPath"] == "/usr/local/nvidia/lib64")
        .unwrap();
    assert_eq!(lib["hostPath"], root.join("lib64").to_str().unwrap());
    assert!(
        lib["options"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("ro"))
    );
    assert!(
        mounts
            .iter()
            .any(|m| m["containerPath"] == "/usr/local/nvidia/bin")
    );
    let env: Vec<&str> = gpu["containerEdits"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(env.contains(&"LD_LIBRARY_PATH=/usr/local/nvidia/lib64"));
    assert!(
        env.iter()
            .any(|e| e.starts_with("PATH=/usr/local/nvidia/bin:"))
    );
    // Legacy runtime env: the claim's GPU UUID, and nothing of it without the flag.
    let claim_env: Vec<&str> = spec["containerEdits"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let uuid = node.inventory.accelerators[2].uuid.clone().unwrap();
    assert!(claim_env.contains(&format!("NVIDIA_VISIBLE_DEVICES={uuid}").as_str()));
    let (_, plain) = node.prepare(node.config(), 3).await;
    let plain: serde_json::Value = serde_json::from_slice(&std::fs::read(plain).unwrap()).unwrap();
    assert!(!plain.to_string().contains("NVIDIA_VISIBLE_DEVICES"));
    assert!(!plain.to_string().contains("/usr/local/nvidia"));
}

fn tandem(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn topo_shows_which_gpus_have_a_vendor_device() {
    // The dgx-h100 fixture carries the GPU Operator's spec: every GPU has its UUID device.
    let json = tandem(&["topo", "--fixture", "dgx-h100", "-o", "json"]);
    let vendor = json["vendorCdiDevices"].as_object().unwrap();
    assert_eq!(vendor.len(), 8);
    assert!(
        vendor
            .values()
            .all(|v| v.as_str().unwrap().starts_with("nvidia.com/gpu=GPU-"))
    );
    // A fixture without a vendor spec prints what it always printed.
    let json = tandem(&["topo", "--fixture", "gke-a4", "-o", "json"]);
    assert!(json.get("vendorCdiDevices").is_none());

    // A node's own directories: an `all`-only spec gives no GPU a device of its own.
    let (dir, inventory) = dgx();
    let cdi = dir.path().join("cdi");
    std::fs::create_dir_all(&cdi).unwrap();
    std::fs::write(
        cdi.join("nvidia.yaml"),
        nvidia_ctk_spec(&inventory, NvidiaNaming::AllOnly),
    )
    .unwrap();
    let m = dir.path().join("m");
    let json = tandem(&[
        "topo",
        "--sysfs-root",
        m.join("sys").to_str().unwrap(),
        "--proc-root",
        m.join("proc").to_str().unwrap(),
        "--dev-root",
        m.join("dev").to_str().unwrap(),
        "--vendor-cdi-dirs",
        cdi.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let vendor = json["vendorCdiDevices"].as_object().unwrap();
    assert_eq!(vendor.len(), 8);
    assert!(vendor.values().all(serde_json::Value::is_null));
}
