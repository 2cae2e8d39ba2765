//! AMD Instinct end to end on the 8x MI300X OAM fixture: class 0x120000 functions are found
//! as AMD GPUs with their DRM nodes, each pairs with the NIC on its own switch, and a claim's
//! CDI spec holds /dev/kfd and the render and card nodes of its GPUs only.

#[path = "support/cdi_schema.rs"]
mod cdi_schema;

use std::sync::Arc;
use tandem::apiserver_fake::FakeApiServer;
use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::prepare::{ClaimRef, PrepareConfig, Preparer};
use tandem::topology::{AcceleratorKind, Affinity, Inventory, pair_node};

fn mi300x() -> (tempfile::TempDir, tandem::sysfs::MachineRoots, Inventory) {
    let dir = tempfile::tempdir().unwrap();
    let desc = tandem::fixture::builtin("mi300x").unwrap();
    let roots = tandem::fixture::write_machine(&desc, &dir.path().join("machine")).unwrap();
    let inventory = tandem::sysfs::discover(&roots).unwrap();
    (dir, roots, inventory)
}

#[test]
fn eight_mi300x_are_amd_gpus_with_their_drm_nodes_and_pair_below_their_switch() {
    let (_dir, _roots, inventory) = mi300x();
    assert!(inventory.problems.is_empty(), "{:#?}", inventory.problems);
    assert_eq!(inventory.accelerators.len(), 8);
    for (i, gpu) in inventory.accelerators.iter().enumerate() {
        assert_eq!(gpu.kind, AcceleratorKind::AmdGpu, "{}", gpu.pci.address);
        assert_eq!(gpu.pci.class, 0x120000);
        assert_eq!(gpu.model, "AMD Instinct MI300X OAM");
        let paths: Vec<&str> = gpu.char_devices.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                format!("dri/card{}", i + 1),
                format!("dri/renderD{}", 128 + i)
            ]
        );
    }
    assert!(
        inventory
            .host
            .shared_char_devices
            .iter()
            .any(|c| c.path == "kfd")
    );
    let pairing = pair_node(&inventory);
    assert_eq!(pairing.pairs.len(), 8);
    for pair in &pairing.pairs {
        assert_eq!(pair.affinity, Affinity::Pix, "{pair:?}");
        // The NIC sits one bus above its GPU, on the same switch.
        assert_eq!(pair.nic.bus, pair.accelerator.bus + 1, "{pair:?}");
    }
}

#[tokio::test]
async fn a_claim_gets_kfd_and_only_its_gpus_render_and_card_nodes() {
    let (dir, roots, inventory) = mi300x();
    let boot = roots.proc.join("sys/kernel/random");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::write(boot.join("boot_id"), "boot-1\n").unwrap();
    let api = FakeApiServer::start().await.unwrap();
    let config = PrepareConfig {
        cdi_dir: dir.path().join("cdi"),
        state_dir: dir.path().join("state"),
        topology_dir: dir.path().join("run"),
        proc_root: roots.proc.clone(),
        ..PrepareConfig::new(tandem::names::DEFAULT_DRIVER_NAME, "node-a")
    };
    let inventory = Arc::new(inventory);
    let (_tx, rx) = tokio::sync::watch::channel(inventory.clone());
    let preparer = Preparer::new(config.clone(), api.client(), rx).unwrap();
    let chosen = [2usize, 5];
    let request = ClaimRequest {
        name: "gpus".into(),
        device_class: tandem::names::DEVICE_CLASS_GPU.into(),
        devices: chosen
            .iter()
            .map(|&i| {
                tandem::names::accelerator_device_name(&inventory.accelerators[i].pci.address)
            })
            .collect(),
    };
    let created = create_allocated_claim(
        &api.client(),
        "ml",
        "rocm",
        tandem::names::DEFAULT_DRIVER_NAME,
        "node-a",
        &[request],
    )
    .await
    .unwrap();
    let claim = ClaimRef {
        namespace: "ml".into(),
        name: "rocm".into(),
        uid: created.metadata.uid.unwrap(),
    };
    let mut results = preparer.prepare(std::slice::from_ref(&claim)).await;
    let devices = results.remove(&claim.uid).unwrap().unwrap();
    assert_eq!(devices.len(), 2);
    let bytes = std::fs::read(
        config
            .cdi_dir
            .join(format!("tandem.dev-claim_{}.json", claim.uid)),
    )
    .unwrap();
    cdi_schema::validate(&bytes).unwrap();
    let spec: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut nodes: Vec<String> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| {
            d["containerEdits"]["deviceNodes"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|n| n["path"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(
        nodes,
        [
            "/dev/dri/card3",
            "/dev/dri/card6",
            "/dev/dri/renderD130",
            "/dev/dri/renderD133",
            "/dev/kfd"
        ]
    );
    // Only the claim's render nodes are in the container, so no HIP/ROCR_VISIBLE_DEVICES.
    assert!(!spec.to_string().contains("VISIBLE_DEVICES"));
}

#[test]
fn an_amd_container_toolkit_spec_gives_each_gpu_its_own_amd_device() {
    let (dir, _roots, inventory) = mi300x();
    // amd.com/gpu devices by index with the GPU's render and card nodes, plus `all`.
    let mut devices: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            serde_json::json!({"name": i.to_string(), "containerEdits": {"deviceNodes": [
                {"path": format!("/dev/dri/card{}", i + 1)},
                {"path": format!("/dev/dri/renderD{}", 128 + i)},
                {"path": "/dev/kfd"},
            ]}})
        })
        .collect();
    devices.push(serde_json::json!({"name": "all", "containerEdits": {"deviceNodes": [{"path": "/dev/kfd"}]}}));
    let cdi = dir.path().join("cdi");
    std::fs::create_dir_all(&cdi).unwrap();
    std::fs::write(
        cdi.join("amd.json"),
        serde_json::json!({"cdiVersion": "0.5.0", "kind": "amd.com/gpu", "devices": devices})
            .to_string(),
    )
    .unwrap();
    let mut specs = tandem::prepare::vendor_cdi::VendorSpecs::new(vec![cdi], "tandem.dev");
    let found = tandem::prepare::vendor_cdi::match_inventory(&specs.refresh(), &inventory);
    for (i, gpu) in inventory.accelerators.iter().enumerate() {
        assert_eq!(
            found[&gpu.pci.address].device_id,
            Some(format!("amd.com/gpu={i}"))
        );
    }
}
