//! Slice building and publishing against the fake apiserver, which enforces the real
//! validation: fixtures must publish valid slices, publishing must be minimal, health must show
//! as taints, and the publisher must repair what others break.

use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tandem::apiserver_fake::{FakeApiServer, InjectedFailure};
use tandem::fixture::{
    DeviceKind, MachineDescription, builtin, builtin_names, synthetic, write_machine,
};
use tandem::slices::{NodeIdentity, SliceOptions, build_slices};
use tandem::sysfs::discover;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::Publisher;
use tokio_util::sync::CancellationToken;

#[path = "support/netns.rs"]
mod netns;

const DRIVER: &str = "tandem.dev";

fn node() -> NodeIdentity {
    NodeIdentity {
        name: "node-a".into(),
        uid: "6a1c1e9e-6d4e-4b7e-9a57-3d0c2f4b8d11".into(),
    }
}

fn inventory_of(desc: &MachineDescription) -> Inventory {
    let dir = tandem::fixture::scratch_dir().unwrap();
    let roots = write_machine(desc, dir.path()).unwrap();
    discover(&roots).unwrap()
}

fn taints_on() -> SliceOptions {
    SliceOptions {
        device_taints: true,
        ..Default::default()
    }
}

fn devices(slices: &[ResourceSlice]) -> Vec<&Device> {
    slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .collect()
}

fn string_attr<'a>(device: &'a Device, key: &str) -> Option<&'a str> {
    device.attributes.as_ref()?.get(key)?.string.as_deref()
}

async fn stored(server: &FakeApiServer) -> Vec<ResourceSlice> {
    let api: Api<ResourceSlice> = Api::all(server.client());
    api.list(&ListParams::default()).await.unwrap().items
}

/// Sets the first RDMA NIC's port state (as `/sys/class/infiniband/*/ports/1/state` shows it).
fn with_first_port_state(desc: &MachineDescription, state: &str) -> (MachineDescription, String) {
    let mut changed = desc.clone();
    let device = changed
        .devices
        .iter_mut()
        .find(|d| matches!(&d.kind, DeviceKind::Nic(n) if n.rdma.is_some()))
        .unwrap();
    let address = device.address().unwrap();
    if let DeviceKind::Nic(nic) = &mut device.kind {
        nic.rdma.as_mut().unwrap().ports[0].state = state.to_string();
    }
    (changed, tandem::names::nic_device_name(&address))
}

#[tokio::test]
async fn every_builtin_fixture_publishes_valid_slices() {
    let server = FakeApiServer::start().await.unwrap();
    for (i, name) in builtin_names().iter().enumerate() {
        let inventory = inventory_of(&builtin(name).unwrap());
        for (j, options) in [SliceOptions::default(), taints_on()]
            .into_iter()
            .enumerate()
        {
            // One node per fixture and option set, so every publish starts from nothing.
            let node = NodeIdentity {
                name: format!("{name}-{i}-{j}"),
                uid: format!("uid-{i}-{j}"),
            };
            let slices = build_slices(&inventory, &node, DRIVER, &options);
            let publisher = Publisher::new(server.client(), DRIVER, &node.name);
            let report = publisher
                .publish(&slices)
                .await
                .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
            assert_eq!(report.created, slices.len(), "{name}");
            let published = devices(&slices);
            assert_eq!(
                published.len(),
                inventory.accelerators.len() + inventory.nics.len(),
                "{name}"
            );
            for device in &published {
                let kind = string_attr(device, "tandem.dev/kind").unwrap();
                assert!(kind == "gpu" || kind == "nic", "{name}");
                assert_eq!(
                    string_attr(device, "resource.kubernetes.io/pciBusID")
                        .map(|s| s.replace([':', '.'], "-")),
                    Some(device.name[4..].to_string()),
                    "{name}: pciBusID matches the device name"
                );
                assert!(
                    string_attr(device, "resource.kubernetes.io/pcieRoot")
                        .unwrap()
                        .starts_with("pci")
                );
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn paired_devices_name_each_other() {
    let inventory = inventory_of(&builtin("dgx-h100").unwrap());
    let slices = build_slices(&inventory, &node(), DRIVER, &SliceOptions::default());
    let all = devices(&slices);
    let gpus: Vec<&&Device> = all.iter().filter(|d| d.name.starts_with("gpu-")).collect();
    assert!(!gpus.is_empty());
    for gpu in gpus {
        let nic_name = string_attr(gpu, "tandem.dev/pairedWith").expect("every DGX GPU has a NIC");
        let nic = all.iter().find(|d| d.name == nic_name).unwrap();
        assert_eq!(string_attr(nic, "tandem.dev/kind"), Some("nic"));
        assert_eq!(
            string_attr(gpu, "tandem.dev/pairGroup"),
            string_attr(nic, "tandem.dev/pairGroup")
        );
        assert!(string_attr(gpu, "tandem.dev/pairAffinity").is_some());
        assert!(
            gpu.capacity.is_none()
                || gpu
                    .capacity
                    .as_ref()
                    .unwrap()
                    .contains_key("tandem.dev/memory")
        );
    }
    let slice = &slices[0];
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Node", "node-a", Some(true))
    );
    assert_eq!(slice.spec.node_name.as_deref(), Some("node-a"));
    assert_eq!(slice.spec.pool.name, "node-a");
}

#[tokio::test]
async fn long_strings_are_truncated_and_accepted() {
    let mut inventory = inventory_of(&builtin("workstation").unwrap());
    let long_model = "Ü".repeat(20) + &"x".repeat(80);
    inventory.accelerators[0].model = long_model.clone();
    let slices = build_slices(&inventory, &node(), DRIVER, &SliceOptions::default());
    let gpu = devices(&slices)
        .into_iter()
        .find(|d| d.name.starts_with("gpu-"))
        .unwrap();
    let model = string_attr(gpu, "tandem.dev/model").unwrap();
    assert!(
        model.len() <= 64 && long_model.starts_with(model),
        "{model}"
    );
    let server = FakeApiServer::start().await.unwrap();
    Publisher::new(server.client(), DRIVER, "node-a")
        .publish(&slices)
        .await
        .unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn synthetic_1024_device_node_splits_within_limits() {
    let inventory = inventory_of(&synthetic(512, 512));
    assert_eq!(inventory.accelerators.len() + inventory.nics.len(), 1024);
    let server = FakeApiServer::start().await.unwrap();
    for (options, per_slice) in [(SliceOptions::default(), 128), (taints_on(), 64)] {
        let node = NodeIdentity {
            name: format!("big-{per_slice}"),
            uid: "u".into(),
        };
        let slices = build_slices(&inventory, &node, DRIVER, &options);
        assert_eq!(slices.len(), 1024 / per_slice);
        let names: BTreeSet<String> = slices
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names.len(), slices.len(), "slice names are unique");
        let mut device_names = BTreeSet::new();
        for slice in &slices {
            assert_eq!(slice.spec.pool.resource_slice_count, slices.len() as i64);
            assert_eq!(slice.spec.devices.as_ref().unwrap().len(), per_slice);
            for d in slice.spec.devices.iter().flatten() {
                assert!(
                    device_names.insert(d.name.clone()),
                    "{} appears twice",
                    d.name
                );
            }
        }
        assert_eq!(device_names.len(), 1024);
        let report = Publisher::new(server.client(), DRIVER, &node.name)
            .publish(&slices)
            .await
            .unwrap();
        assert_eq!(report.created, slices.len());
    }
    assert_eq!(stored(&server).await.len(), 8 + 16);
    server.shutdown().await;
}

#[tokio::test]
async fn large_fixture_splits_and_publishes() {
    let inventory = inventory_of(&builtin("large").unwrap());
    let total = inventory.accelerators.len() + inventory.nics.len();
    let slices = build_slices(&inventory, &node(), DRIVER, &taints_on());
    assert_eq!(slices.len(), total.div_ceil(64).max(1));
    let server = FakeApiServer::start().await.unwrap();
    Publisher::new(server.client(), DRIVER, "node-a")
        .publish(&slices)
        .await
        .unwrap();
    assert_eq!(stored(&server).await.len(), slices.len());
    server.shutdown().await;
}

#[tokio::test]
async fn unchanged_publish_makes_zero_writes() {
    let inventory = inventory_of(&builtin("dgx-h100").unwrap());
    let slices = build_slices(&inventory, &node(), DRIVER, &taints_on());
    let server = FakeApiServer::start().await.unwrap();
    let publisher = Publisher::new(server.client(), DRIVER, "node-a");
    publisher.publish(&slices).await.unwrap();
    let writes = server.write_count();
    // Rebuilt from a fresh discovery, as a rescan would.
    let again = build_slices(
        &inventory_of(&builtin("dgx-h100").unwrap()),
        &node(),
        DRIVER,
        &taints_on(),
    );
    let report = publisher.publish(&again).await.unwrap();
    assert_eq!(report.writes(), 0);
    assert_eq!(server.write_count(), writes, "no write requests at all");
    server.shutdown().await;
}

#[tokio::test]
async fn nic_port_down_taints_one_slice_and_recovery_clears_it() {
    let desc = builtin("dgx-h100").unwrap();
    let server = FakeApiServer::start().await.unwrap();
    let publisher = Publisher::new(server.client(), DRIVER, "node-a");
    // Small slices, so "one slice rewritten" means something.
    let options = SliceOptions {
        device_taints: true,
        max_devices_per_slice: 4,
        ..Default::default()
    };
    let healthy = build_slices(&inventory_of(&desc), &node(), DRIVER, &options);
    assert!(healthy.len() >= 4);
    let first = publisher.publish(&healthy).await.unwrap();
    assert!(
        devices(&stored(&server).await)
            .iter()
            .all(|d| d.taints.is_none())
    );

    let (down_desc, nic) = with_first_port_state(&desc, "1: DOWN");
    let down = build_slices(&inventory_of(&down_desc), &node(), DRIVER, &options);
    let report = publisher.publish(&down).await.unwrap();
    assert_eq!(
        (report.created, report.updated, report.deleted),
        (0, 1, 0),
        "one device changed, one slice rewritten"
    );
    assert_eq!(
        report.generation, first.generation,
        "same slice set, same generation"
    );
    let now = stored(&server).await;
    let tainted: Vec<&Device> = devices(&now)
        .into_iter()
        .filter(|d| d.taints.is_some())
        .collect();
    assert_eq!(tainted.len(), 1);
    assert_eq!(tainted[0].name, nic);
    let taint = &tainted[0].taints.as_ref().unwrap()[0];
    assert_eq!(
        (taint.key.as_str(), taint.effect.as_str()),
        ("tandem.dev/link-down", "NoSchedule")
    );
    assert!(taint.time_added.is_some(), "the server stamps timeAdded");

    // Without --device-taints the slice is unchanged: health then only guards prepare.
    let untainted = build_slices(
        &inventory_of(&down_desc),
        &node(),
        DRIVER,
        &SliceOptions {
            device_taints: false,
            max_devices_per_slice: 4,
            ..Default::default()
        },
    );
    assert!(devices(&untainted).iter().all(|d| d.taints.is_none()));

    let (up_desc, _) = with_first_port_state(&desc, "4: ACTIVE");
    let recovered = build_slices(&inventory_of(&up_desc), &node(), DRIVER, &options);
    let report = publisher.publish(&recovered).await.unwrap();
    assert_eq!(report.updated, 1);
    assert!(
        devices(&stored(&server).await)
            .iter()
            .all(|d| d.taints.is_none())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn slice_set_changes_bump_the_generation_and_drop_leftovers() {
    let server = FakeApiServer::start().await.unwrap();
    let publisher = Publisher::new(server.client(), DRIVER, "node-a");
    let small = SliceOptions {
        device_taints: false,
        max_devices_per_slice: 4,
        ..Default::default()
    };
    let inventory = inventory_of(&builtin("dgx-h100").unwrap());
    let many = build_slices(&inventory, &node(), DRIVER, &small);
    assert!(many.len() > 2);
    let first = publisher.publish(&many).await.unwrap();
    assert_eq!(first.generation, 0);

    let few = build_slices(&inventory, &node(), DRIVER, &SliceOptions::default());
    assert_eq!(few.len(), 1);
    let report = publisher.publish(&few).await.unwrap();
    assert_eq!(report.generation, 1);
    assert_eq!((report.updated, report.deleted), (1, many.len() - 1));
    let now = stored(&server).await;
    assert_eq!(now.len(), 1);
    assert_eq!(
        (
            now[0].spec.pool.generation,
            now[0].spec.pool.resource_slice_count
        ),
        (1, 1)
    );
    // Deletes came after the surviving slice was rewritten with the new generation.
    let requests = server.requests();
    let last_put = requests
        .iter()
        .rposition(|r| r.starts_with("PUT "))
        .unwrap();
    let first_delete = requests
        .iter()
        .position(|r| r.starts_with("DELETE "))
        .unwrap();
    assert!(last_put < first_delete, "{requests:#?}");

    // Other drivers' and other nodes' slices are never touched.
    let other_node = Publisher::new(server.client(), DRIVER, "node-b");
    let theirs = build_slices(
        &inventory,
        &NodeIdentity {
            name: "node-b".into(),
            uid: String::new(),
        },
        DRIVER,
        &SliceOptions::default(),
    );
    other_node.publish(&theirs).await.unwrap();
    publisher.publish(&few).await.unwrap();
    assert_eq!(stored(&server).await.len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn conflicting_updates_are_retried() {
    let server = FakeApiServer::start().await.unwrap();
    let publisher = Publisher::new(server.client(), DRIVER, "node-a");
    let desc = builtin("dgx-h100").unwrap();
    publisher
        .publish(&build_slices(
            &inventory_of(&desc),
            &node(),
            DRIVER,
            &taints_on(),
        ))
        .await
        .unwrap();

    // Someone else edits the slice, then our update carries a stale resourceVersion once more.
    let api: Api<ResourceSlice> = Api::all(server.client());
    let name = stored(&server).await[0].metadata.name.clone().unwrap();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"edited": "yes"}}})),
    )
    .await
    .unwrap();
    server.inject_failures(
        Some("PUT"),
        "/resourceslices/",
        2,
        InjectedFailure::Conflict,
    );
    let (down_desc, nic) = with_first_port_state(&desc, "1: DOWN");
    let report = publisher
        .publish(&build_slices(
            &inventory_of(&down_desc),
            &node(),
            DRIVER,
            &taints_on(),
        ))
        .await
        .unwrap();
    assert_eq!(report.updated, 1);
    let puts = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("PUT "))
        .count();
    assert_eq!(puts, 3, "two refused, one accepted");
    let now = stored(&server).await;
    let device = devices(&now).into_iter().find(|d| d.name == nic).unwrap();
    assert!(device.taints.is_some());
    assert_eq!(
        now[0].metadata.labels.as_ref().unwrap()["edited"],
        "yes",
        "others' labels survive"
    );
    server.shutdown().await;
}

/// Polls the stored slices until `check` holds.
async fn wait_for_slices(api: &Api<ResourceSlice>, check: impl Fn(&[ResourceSlice]) -> bool) {
    for _ in 0..100 {
        let items = api.list(&ListParams::default()).await.unwrap().items;
        if check(&items) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn watch_repairs_deleted_and_edited_slices_and_shutdown_keeps_them() {
    let server = FakeApiServer::start().await.unwrap();
    let slices = build_slices(
        &inventory_of(&builtin("dgx-h100").unwrap()),
        &node(),
        DRIVER,
        &SliceOptions {
            device_taints: false,
            max_devices_per_slice: 8,
            ..Default::default()
        },
    );
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(slices.clone()));
    let shutdown = CancellationToken::new();
    let publisher = Publisher::new(server.client(), DRIVER, "node-a");
    let task = tokio::spawn(publisher.run(rx, shutdown.clone()));
    let api: Api<ResourceSlice> = Api::all(server.client());
    let count = slices.len();
    wait_for_slices(&api, |items| items.len() == count).await;

    let victim = slices[0].metadata.name.clone().unwrap();
    api.delete(&victim, &DeleteParams::default()).await.unwrap();
    wait_for_slices(&api, |items| {
        items
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(&victim))
    })
    .await;

    // An edit of the spec (another device list) is put back too.
    api.patch(
        &victim,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"devices": []}})),
    )
    .await
    .unwrap();
    wait_for_slices(&api, |items| {
        items.iter().any(|s| {
            s.metadata.name.as_deref() == Some(&victim)
                && !s.spec.devices.as_ref().is_none_or(Vec::is_empty)
        })
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored(&server).await.len(),
        count,
        "shutdown deletes nothing"
    );
    server.shutdown().await;
}

/// Polls until the taint keys of device `name` (None: not published) satisfy `check`.
async fn wait_for_nic(
    api: &Api<ResourceSlice>,
    name: &str,
    what: &str,
    check: impl Fn(Option<Vec<String>>) -> bool,
) {
    for _ in 0..200 {
        let items = api.list(&ListParams::default()).await.unwrap().items;
        let device = items
            .iter()
            .flat_map(|s| s.spec.devices.iter().flatten())
            .find(|d| d.name == name);
        let taints = device.map(|d| d.taints.iter().flatten().map(|t| t.key.clone()).collect());
        if !items.is_empty() && check(taints) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The whole node pipeline on a fixture tree: rescans → slice builder → publisher.
#[tokio::test]
async fn rescans_carry_link_state_and_vanished_devices_into_the_slices() {
    use tandem::slices::{run_rescans, run_slice_builder};
    let dir = tandem::fixture::scratch_dir().unwrap();
    let roots = write_machine(&builtin("dgx-h100").unwrap(), dir.path()).unwrap();
    let initial = discover(&roots).unwrap();
    let nic = initial.nics.iter().find(|n| n.rdma.is_some()).unwrap();
    let nic_name = tandem::names::nic_device_name(&nic.pci.address);
    let device_dir = roots
        .sys
        .join("bus/pci/devices")
        .join(nic.pci.address.to_string());
    let state_file = device_dir
        .join("infiniband")
        .join(&nic.rdma.as_ref().unwrap().name)
        .join("ports/1/state");
    assert!(state_file.exists(), "{}", state_file.display());

    let shutdown = CancellationToken::new();
    let trigger = Arc::new(tokio::sync::Notify::new());
    let period = Duration::from_secs(1);
    let (inventory_tx, inventory_rx) = tokio::sync::watch::channel(Arc::new(initial));
    let (desired_tx, desired_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let (_network_tx, network_rx) =
        tokio::sync::watch::channel(tandem::slices::NetworkFacts::default());
    let server = FakeApiServer::start().await.unwrap();
    let tasks = vec![
        tokio::spawn(run_rescans(
            roots.clone(),
            period,
            trigger.clone(),
            inventory_tx,
            None,
            shutdown.clone(),
        )),
        tokio::spawn(run_slice_builder(
            inventory_rx,
            network_rx,
            node(),
            DRIVER.into(),
            taints_on(),
            period,
            desired_tx,
            shutdown.clone(),
        )),
        tokio::spawn(
            Publisher::new(server.client(), DRIVER, "node-a").run(desired_rx, shutdown.clone()),
        ),
    ];
    let api: Api<ResourceSlice> = Api::all(server.client());
    wait_for_nic(&api, &nic_name, "healthy NIC published", |t| {
        t == Some(vec![])
    })
    .await;

    std::fs::write(&state_file, "1: DOWN\n").unwrap();
    trigger.notify_one();
    wait_for_nic(&api, &nic_name, "link-down taint", |t| {
        t == Some(vec!["tandem.dev/link-down".into()])
    })
    .await;

    std::fs::write(&state_file, "4: ACTIVE\n").unwrap();
    trigger.notify_one();
    wait_for_nic(&api, &nic_name, "taint cleared", |t| t == Some(vec![])).await;

    // The function falls off the bus: it stays one period with the gone taint, then goes.
    std::fs::remove_file(&device_dir).unwrap();
    trigger.notify_one();
    wait_for_nic(&api, &nic_name, "gone taint", |t| {
        t == Some(vec!["tandem.dev/gone".into()])
    })
    .await;
    wait_for_nic(&api, &nic_name, "device dropped", |t| t.is_none()).await;

    shutdown.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
    server.shutdown().await;
}

/// A link change in the watcher's network namespace fires the trigger: the watcher runs on a
/// thread that entered a namespace of its own, where bringing `lo` up is the change.
#[test]
fn link_watcher_fires_on_a_link_change() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED link_watcher_fires_on_a_link_change: needs root for a network namespace"
        );
        return;
    }
    let fired = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let trigger = Arc::new(tokio::sync::Notify::new());
                let shutdown = CancellationToken::new();
                let task =
                    tandem::slices::spawn_link_watcher(trigger.clone(), shutdown.clone()).unwrap();
                let (connection, handle, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(connection);
                handle
                    .link()
                    .set(rtnetlink::LinkUnspec::new_with_index(1).up().build())
                    .execute()
                    .await
                    .unwrap();
                let fired = tokio::time::timeout(Duration::from_secs(5), trigger.notified())
                    .await
                    .is_ok();
                shutdown.cancel();
                task.await.unwrap();
                fired
            })
    })
    .join()
    .unwrap();
    assert!(fired, "no trigger within 5 s of bringing lo up");
}

#[tokio::test]
async fn link_watcher_starts_and_stops() {
    let shutdown = CancellationToken::new();
    let task =
        tandem::slices::spawn_link_watcher(Arc::new(tokio::sync::Notify::new()), shutdown.clone())
            .unwrap();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// Deletes the namespace on drop, pass or fail.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        netns::delete_netns(&[&self.0]);
    }
}

/// [`tandem::slices::network::interface_dump`] run inside the named namespace: on a thread of
/// its own that enters it first, since a netlink socket belongs to its creator's namespace.
fn dump_in(namespace: &str) -> tandem::slices::network::InterfaceDump {
    let path = std::path::Path::new("/run/netns").join(namespace);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(tandem::slices::network::interface_dump())
            .unwrap()
    })
    .join()
    .unwrap()
}

/// The node, with the interfaces read over real netlink in a network namespace that
/// plays the host: eth0 carries the main default route, the node IP sits on a bridge over
/// gpu1rdma0, gpu3rdma0 carries an IPv6 default, and gpu0rdma0 has a default only in its own
/// table (per-NIC source routing). Only eth0, gpu1rdma0 and gpu3rdma0 stay out of the slices.
#[tokio::test]
async fn management_interfaces_read_over_netlink_stay_out_of_published_slices() {
    use netns::ip;
    use tandem::slices::{
        ManagementReason, NetworkFacts, build_devices_leaving_out, build_slices_from_devices,
    };
    let (tag, _) = netns::unique_tag();
    let namespace = format!("tslc{tag}");
    if !netns::add_netns_or_skip(&namespace) {
        return;
    }
    let _guard = NetnsGuard(namespace.clone());
    let n = namespace.as_str();
    let bridge = std::process::Command::new("ip")
        .args(["-n", n, "link", "add", "br7", "type", "bridge"])
        .output()
        .unwrap();
    if !bridge.status.success() {
        eprintln!(
            "skipping: cannot create a bridge: {}",
            String::from_utf8_lossy(&bridge.stderr)
        );
        return;
    }
    for (i, name) in ["eth0", "gpu0rdma0", "gpu1rdma0", "gpu2rdma0", "gpu3rdma0"]
        .iter()
        .enumerate()
    {
        let peer = format!("peer{i}");
        ip(&[
            "-n", n, "link", "add", name, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["-n", n, "link", "set", &peer, "up"]);
        ip(&["-n", n, "link", "set", name, "up"]);
    }
    ip(&["-n", n, "link", "set", "br7", "up"]);
    ip(&["-n", n, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    ip(&[
        "-n",
        n,
        "route",
        "add",
        "default",
        "via",
        "10.77.0.1",
        "dev",
        "eth0",
    ]);
    ip(&["-n", n, "addr", "add", "10.88.0.2/24", "dev", "gpu0rdma0"]);
    ip(&[
        "-n",
        n,
        "route",
        "add",
        "default",
        "via",
        "10.88.0.1",
        "dev",
        "gpu0rdma0",
        "table",
        "100",
    ]);
    ip(&["-n", n, "link", "set", "gpu1rdma0", "master", "br7"]);
    ip(&["-n", n, "addr", "add", "10.99.0.2/24", "dev", "br7"]);
    ip(&["-n", n, "addr", "add", "10.89.0.2/24", "dev", "gpu2rdma0"]);
    ip(&[
        "-n",
        n,
        "-6",
        "addr",
        "add",
        "fd00:3::2/64",
        "dev",
        "gpu3rdma0",
        "nodad",
    ]);
    ip(&[
        "-n",
        n,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:3::1",
        "dev",
        "gpu3rdma0",
    ]);

    let dump = dump_in(&namespace);
    assert_eq!(
        dump.default_routes,
        BTreeSet::from(["eth0".to_string(), "gpu3rdma0".to_string()]),
        "{dump:?}"
    );
    assert!(
        dump.upper_interfaces["gpu1rdma0"].contains("br7"),
        "{dump:?}"
    );
    let mut facts = NetworkFacts::default();
    dump.store_in(&mut facts);

    let inventory = inventory_of(&builtin("gke-a4").unwrap());
    let name_of = |if_name: &str| {
        let nic = inventory
            .nics
            .iter()
            .find(|n| n.if_name() == Some(if_name))
            .unwrap();
        tandem::names::nic_device_name(&nic.pci.address)
    };
    let options = SliceOptions {
        node_ip: Some("10.99.0.2".parse().unwrap()),
        ..Default::default()
    };
    let (built, left_out) = build_devices_leaving_out(&inventory, DRIVER, &options, &facts);
    let reasons: Vec<(String, ManagementReason)> =
        left_out.into_iter().map(|l| (l.device, l.reason)).collect();
    let mut expected = vec![
        (
            name_of("eth0"),
            ManagementReason::DefaultRoute { via: "eth0".into() },
        ),
        (
            name_of("gpu1rdma0"),
            ManagementReason::NodeIp {
                via: "br7".into(),
                ip: "10.99.0.2".parse().unwrap(),
            },
        ),
        (
            name_of("gpu3rdma0"),
            ManagementReason::DefaultRoute {
                via: "gpu3rdma0".into(),
            },
        ),
    ];
    expected.sort();
    let mut reasons = reasons;
    reasons.sort();
    assert_eq!(reasons, expected);

    // Published through the fake apiserver: the left-out NICs are nowhere in the stored
    // slices, every other NIC is, with its subnet.
    let server = FakeApiServer::start().await.unwrap();
    let slices = build_slices_from_devices(built, &node(), DRIVER, &options);
    Publisher::new(server.client(), DRIVER, "node-a")
        .publish(&slices)
        .await
        .unwrap();
    let published = stored(&server).await;
    let names: BTreeSet<String> = devices(&published).iter().map(|d| d.name.clone()).collect();
    for (device, _) in &expected {
        assert!(!names.contains(device), "{device} published");
    }
    for if_name in ["gpu0rdma0", "gpu2rdma0", "gpu4rdma0"] {
        assert!(names.contains(&name_of(if_name)), "{if_name} missing");
    }
    let gpu0 = devices(&published)
        .into_iter()
        .find(|d| d.name == name_of("gpu0rdma0"))
        .unwrap();
    assert_eq!(string_attr(gpu0, "tandem.dev/subnet"), Some("10.88.0.0/24"));

    // The operator asks for them: everything is published.
    let asked = SliceOptions {
        publish_management_nics: true,
        ..options
    };
    let (all, left_out) = build_devices_leaving_out(&inventory, DRIVER, &asked, &facts);
    assert!(left_out.is_empty());
    assert_eq!(
        all.len(),
        inventory.accelerators.len() + inventory.nics.len()
    );
    server.shutdown().await;
}
