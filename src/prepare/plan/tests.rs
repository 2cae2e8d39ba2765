//! Unit tests of claim planning, on the built-in `dgx-h100` fixture machine.

use super::*;
use crate::names::{accelerator_device_name, nic_device_name};
use crate::netattach::record::InterfaceRequest;
use crate::prepare::PreparedDevice;
use crate::prepare::cdi::NetDevice;
use env_vars::VENDOR_GOOGLE;
use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, OpaqueDeviceConfiguration};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use std::path::PathBuf;

fn inventory() -> (tempfile::TempDir, Inventory) {
    let dir = tempfile::tempdir().unwrap();
    let desc = crate::fixture::builtin("dgx-h100").unwrap();
    let roots = crate::fixture::write_machine(&desc, dir.path()).unwrap();
    let inventory = crate::sysfs::discover(&roots).unwrap();
    (dir, inventory)
}

fn claim(uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ml".into(),
        name: format!("claim-{uid}"),
        uid: uid.into(),
    }
}

fn allocated(request: &str, device: &str) -> AllocatedDevice {
    AllocatedDevice {
        requests: vec![request.into()],
        pool: "node-a".into(),
        device: device.into(),
        share_id: None,
        admin_access: false,
    }
}

fn plan(
    inventory: &Inventory,
    uid: &str,
    allocation: &OurAllocation,
    holders: &DeviceHolders,
) -> Result<ClaimPlan, PrepareError> {
    let topology = PathBuf::from("/var/lib/tandem/claims/u/topology.json");
    let ctx = PlanContext {
        driver_name: "tandem.dev",
        dev_root_in_container: Path::new("/dev"),
        topology_host_path: &topology,
        inventory,
        netdev_mover: None,
        vendor: None,
        driver_root: None,
        nvidia_legacy_env: false,
    };
    let plan = plan_claim(&ctx, &claim(uid), allocation)?;
    holders.refuse_conflicts(&claim(uid), &plan.devices)?;
    Ok(plan)
}

fn recorded(device: &AllocatedDevice) -> RecordedDevice {
    RecordedDevice {
        device: PreparedDevice {
            request_names: device.base_request_names(),
            pool_name: device.pool.clone(),
            device_name: device.device.clone(),
            cdi_device_ids: Vec::new(),
            share_id: device.share_id.clone(),
        },
        admin_access: device.admin_access,
    }
}

#[test]
fn exclusive_holds_conflict_shares_and_admin_access_do_not() {
    let (_dir, inventory) = inventory();
    let gpu = "gpu-0000-1b-00-0";
    let exclusive = allocated("gpus", gpu);
    let shared = AllocatedDevice {
        share_id: Some("s1".into()),
        ..allocated("gpus", gpu)
    };
    let admin = AllocatedDevice {
        admin_access: true,
        ..allocated("gpus", gpu)
    };
    let only = |d: &AllocatedDevice| OurAllocation {
        devices: vec![d.clone()],
        config: Vec::new(),
    };
    let held_by = |d: &AllocatedDevice| {
        let mut holders = DeviceHolders::default();
        holders.add(&claim("first"), &[recorded(d)]);
        holders
    };
    let in_use =
        |r: Result<ClaimPlan, PrepareError>| matches!(r, Err(PrepareError::DeviceInUse { .. }));
    assert!(in_use(plan(
        &inventory,
        "second",
        &only(&exclusive),
        &held_by(&exclusive)
    )));
    assert!(in_use(plan(
        &inventory,
        "second",
        &only(&shared),
        &held_by(&exclusive)
    )));
    assert!(in_use(plan(
        &inventory,
        "second",
        &only(&exclusive),
        &held_by(&shared)
    )));
    assert!(plan(&inventory, "second", &only(&shared), &held_by(&shared)).is_ok());
    assert!(plan(&inventory, "second", &only(&admin), &held_by(&exclusive)).is_ok());
    assert!(plan(&inventory, "second", &only(&exclusive), &held_by(&admin)).is_ok());
    // A claim never conflicts with its own earlier record (re-prepare after a reboot).
    assert!(plan(&inventory, "first", &only(&exclusive), &held_by(&exclusive)).is_ok());
}

#[test]
fn inventory_device_paths_that_leave_the_dev_root_are_refused() {
    let (_dir, mut inventory) = inventory();
    inventory.accelerators[0].char_devices[0].path = "../sda".into();
    let allocation = OurAllocation {
        devices: vec![allocated("gpus", "gpu-0000-1b-00-0")],
        config: Vec::new(),
    };
    let e = plan(&inventory, "u", &allocation, &DeviceHolders::default()).unwrap_err();
    assert!(matches!(e, PrepareError::BadDeviceNodePath { .. }), "{e}");
    assert!(e.to_string().contains("gpu-0000-1b-00-0"), "{e}");
}

#[test]
fn requests_asking_for_different_env_flavours_conflict() {
    let (_dir, inventory) = inventory();
    let env = |request: &str, flavour: &str| DeviceAllocationConfiguration {
        source: "FromClaim".into(),
        requests: Some(vec![request.into()]),
        opaque: Some(OpaqueDeviceConfiguration {
            driver: "tandem.dev".into(),
            parameters: RawExtension(serde_json::json!({
                "apiVersion": "tandem.dev/v1alpha1", "kind": "ClaimConfig", "env": flavour
            })),
        }),
    };
    let allocation = OurAllocation {
        devices: vec![
            allocated("gpus", "gpu-0000-1b-00-0"),
            allocated("nics", "nic-0000-18-00-0"),
        ],
        config: vec![env("gpus", "nccl"), env("nics", "ucx")],
    };
    let e = plan(&inventory, "u", &allocation, &DeviceHolders::default()).unwrap_err();
    assert!(matches!(e, PrepareError::ConflictingConfig { .. }), "{e}");
}

#[test]
fn admin_access_reaches_an_unhealthy_device() {
    let (_dir, mut inventory) = inventory();
    inventory.accelerators[0].pci.aer_fatal = Some(2);
    let mut device = allocated("gpus", "gpu-0000-1b-00-0");
    let allocation = |d: &AllocatedDevice| OurAllocation {
        devices: vec![d.clone()],
        config: Vec::new(),
    };
    let e = plan(
        &inventory,
        "u",
        &allocation(&device),
        &DeviceHolders::default(),
    )
    .unwrap_err();
    assert!(matches!(e, PrepareError::DeviceUnhealthy { .. }), "{e}");
    device.admin_access = true;
    assert!(
        plan(
            &inventory,
            "u",
            &allocation(&device),
            &DeviceHolders::default()
        )
        .is_ok()
    );
}

fn plan_with_mover(
    inventory: &Inventory,
    allocation: &OurAllocation,
    mover: NetdevMover<'_>,
) -> Result<ClaimPlan, PrepareError> {
    let topology = PathBuf::from("/var/lib/tandem/claims/u/topology.json");
    let ctx = PlanContext {
        driver_name: "tandem.dev",
        dev_root_in_container: Path::new("/dev"),
        topology_host_path: &topology,
        inventory,
        netdev_mover: Some(mover),
        vendor: None,
        driver_root: None,
        nvidia_legacy_env: false,
    };
    plan_claim(&ctx, &claim("u"), allocation)
}

fn plan_with_hook(
    inventory: &Inventory,
    allocation: &OurAllocation,
) -> Result<ClaimPlan, PrepareError> {
    plan_with_mover(
        inventory,
        allocation,
        NetdevMover::Hook(NetattachHook {
            path: Path::new("/opt/tandem/bin/tandem"),
            state_dir: Path::new("/var/lib/tandem"),
            node_ip: Some("192.0.2.10".parse().unwrap()),
        }),
    )
}

fn claim_config(requests: &[&str], fields: serde_json::Value) -> DeviceAllocationConfiguration {
    let mut parameters = serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "ClaimConfig",
    });
    for (k, v) in fields.as_object().unwrap() {
        parameters[k] = v.clone();
    }
    DeviceAllocationConfiguration {
        source: "FromClaim".into(),
        requests: Some(requests.iter().map(|r| r.to_string()).collect()),
        opaque: Some(k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration {
            driver: "tandem.dev".into(),
            parameters: k8s_openapi::apimachinery::pkg::runtime::RawExtension(parameters),
        }),
    }
}

/// The GPU, the NIC paired with it and another NIC with a netdev.
fn gpu_and_two_nics(inventory: &Inventory) -> (&Accelerator, &Nic, &Nic) {
    let gpu = &inventory.accelerators[0];
    let paired = crate::topology::pair_devices(
        &[&gpu.pci],
        &inventory.nics.iter().map(|n| &n.pci).collect::<Vec<_>>(),
    );
    let first_nic = inventory
        .nics
        .iter()
        .find(|n| n.pci.address == paired.pairs[0].nic)
        .unwrap();
    let other_nic = inventory
        .nics
        .iter()
        .find(|n| n.pci.address != first_nic.pci.address && n.if_name().is_some())
        .unwrap();
    (gpu, first_nic, other_nic)
}

fn nic_hooks(plan: &ClaimPlan) -> Vec<(String, Vec<String>)> {
    plan.spec
        .as_ref()
        .unwrap()
        .devices
        .iter()
        .flat_map(|d| {
            d.container_edits
                .hooks
                .iter()
                .map(|h| (h.hook_name.clone(), h.args.clone()))
        })
        .collect()
}

#[test]
fn exclusive_nics_get_the_attach_hook_in_pairing_order_unless_config_says_none() {
    let (_dir, inventory) = inventory();
    let (gpu, first_nic, other_nic) = gpu_and_two_nics(&inventory);
    let allocation = OurAllocation {
        devices: vec![
            allocated("gpus", &accelerator_device_name(&gpu.pci.address)),
            allocated("nics", &nic_device_name(&other_nic.pci.address)),
            allocated("nics", &nic_device_name(&first_nic.pci.address)),
        ],
        config: Vec::new(),
    };
    let hooks = nic_hooks(&plan_with_hook(&inventory, &allocation).unwrap());
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    let first_if = first_nic.if_name().unwrap();
    let other_if = other_nic.if_name().unwrap();
    for (name, args) in &hooks {
        assert_eq!(name, "createRuntime");
        assert_eq!(&args[..5], ["tandem", "hook", "attach", "--claim-uid", "u"]);
        assert!(args.contains(&"/var/lib/tandem".to_string()), "{args:?}");
        assert!(
            args.windows(2).any(|w| w == ["--node-ip", "192.0.2.10"]),
            "{args:?}"
        );
    }
    let interfaces: Vec<InterfaceRequest> = hooks
        .iter()
        .map(|(_, a)| a.last().unwrap().parse().unwrap())
        .collect();
    let expect = |nic: &Nic, host: &str, pod: &str| InterfaceRequest {
        host_name: host.to_string(),
        pod_name: pod.to_string(),
        pci_address: Some(nic.pci.address.to_string()),
        rdma_device: nic.rdma.as_ref().map(|r| r.name.clone()),
    };
    assert!(
        interfaces.contains(&expect(first_nic, first_if, "rdma0")),
        "{interfaces:?}"
    );
    assert!(
        interfaces.contains(&expect(other_nic, other_if, "rdma1")),
        "{interfaces:?}"
    );

    // No hook path: the behaviour before netattach, nothing moves.
    assert!(
        nic_hooks(&plan(&inventory, "u", &allocation, &DeviceHolders::default()).unwrap())
            .is_empty()
    );

    // An explicit `none` keeps the netdevs on the host even with the hook configured.
    let mut with_none = allocation.clone();
    with_none.config = vec![
        k8s_openapi::api::resource::v1::DeviceAllocationConfiguration {
            source: "FromClaim".into(),
            requests: Some(vec!["nics".into()]),
            opaque: Some(k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration {
                driver: "tandem.dev".into(),
                parameters: k8s_openapi::apimachinery::pkg::runtime::RawExtension(
                    serde_json::json!({
                        "apiVersion": "tandem.dev/v1alpha1",
                        "kind": "ClaimConfig",
                        "nicAttach": "none"
                    }),
                ),
            }),
        },
    ];
    assert!(nic_hooks(&plan_with_hook(&inventory, &with_none).unwrap()).is_empty());

    // An explicit `exclusive` on a node without the hook is refused, naming the request,
    // rather than quietly handing out the NIC without its netdev.
    let mut with_exclusive = with_none.clone();
    if let Some(opaque) = with_exclusive.config[0].opaque.as_mut() {
        opaque.parameters.0["nicAttach"] = "exclusive".into();
    }
    let refused = plan(&inventory, "u", &with_exclusive, &DeviceHolders::default())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("\"nics\"") && refused.contains("--hook-path"),
        "{refused}"
    );
    assert_eq!(
        nic_hooks(&plan_with_hook(&inventory, &with_exclusive).unwrap()).len(),
        2
    );
}

#[test]
fn interface_names_come_from_config_and_clash_is_refused() {
    let (_dir, inventory) = inventory();
    let (gpu, first_nic, other_nic) = gpu_and_two_nics(&inventory);
    let pod_names = |allocation: &OurAllocation| -> Result<Vec<String>, PrepareError> {
        let plan = plan_with_hook(&inventory, allocation)?;
        let mut names: Vec<String> = nic_hooks(&plan)
            .iter()
            .map(|(_, a)| {
                a.last()
                    .unwrap()
                    .parse::<InterfaceRequest>()
                    .unwrap()
                    .pod_name
            })
            .collect();
        names.sort();
        Ok(names)
    };
    let mut allocation = OurAllocation {
        devices: vec![
            allocated("gpus", &accelerator_device_name(&gpu.pci.address)),
            allocated("fast", &nic_device_name(&first_nic.pci.address)),
            allocated("slow", &nic_device_name(&other_nic.pci.address)),
        ],
        config: vec![claim_config(
            &["fast"],
            serde_json::json!({"interfaceName": "net1"}),
        )],
    };
    // The named request gets its name; the other keeps the default sequence.
    assert_eq!(pod_names(&allocation).unwrap(), ["net1", "rdma0"]);
    // One name for a request with several NICs: an index is appended.
    allocation.devices[2].requests = vec!["fast".into()];
    assert_eq!(pod_names(&allocation).unwrap(), ["net10", "net11"]);
    // A name that collides with the default of another NIC is refused, naming the clash.
    allocation.devices[2].requests = vec!["slow".into()];
    allocation.config = vec![claim_config(
        &["fast"],
        serde_json::json!({"interfaceName": "rdma0"}),
    )];
    let refused = pod_names(&allocation).unwrap_err().to_string();
    assert!(refused.contains("\"rdma0\""), "{refused}");
    // Names that cannot be interface names never reach a hook.
    allocation.config = vec![claim_config(
        &["fast"],
        serde_json::json!({"interfaceName": "a/b"}),
    )];
    assert!(plan_with_hook(&inventory, &allocation).is_err());
}

/// A GKE TPU v5e host (ct5lp-hightpu-4t shape): four chips on one root complex, the
/// first two with accel nodes (`accel1`, `accel0`: numbered by the driver, not by bus),
/// the last two bound to vfio-pci.
fn tpu_host() -> (tempfile::TempDir, Inventory) {
    let mut desc = crate::fixture::builtin("gpu-only").unwrap();
    let template = desc
        .devices
        .iter()
        .find(|d| matches!(d.kind, crate::fixture::DeviceKind::Accelerator(_)))
        .unwrap()
        .clone();
    desc.name = "tpu-v5e".into();
    desc.devices = (0..4u8)
        .map(|i| {
            let mut chip = template.clone();
            chip.path = format!("0000:00:{:02x}.0", 4 + i);
            chip.id = crate::fixture::PciId::new(VENDOR_GOOGLE, 0x0063);
            chip.class = 0x120000;
            chip.numa = Some(0);
            chip.kind = crate::fixture::DeviceKind::Accelerator(crate::fixture::AcceleratorSpec {
                driver: "google-tpu".into(),
                index: Some(u32::from(i)),
            });
            if i >= 2 {
                chip.overrides.driver = Some(crate::fixture::VFIO_DRIVER.into());
                chip.overrides.iommu_group = Some(10 + u32::from(i));
            }
            chip
        })
        .collect();
    // accel1 for the first chip, accel0 for the second.
    for (i, chip) in desc.devices.iter_mut().enumerate().take(2) {
        chip.kind = crate::fixture::DeviceKind::Accelerator(crate::fixture::AcceleratorSpec {
            driver: "google-tpu".into(),
            index: Some(1 - i as u32),
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let roots = crate::fixture::write_machine(&desc, dir.path()).unwrap();
    (dir, crate::sysfs::discover(&roots).unwrap())
}

#[test]
fn tpu_claims_get_their_chip_nodes_and_gke_tpu_env() {
    let (_dir, tpus) = tpu_host();
    assert!(tpus.problems.is_empty(), "{:?}", tpus.problems);
    let names: Vec<String> = tpus
        .accelerators
        .iter()
        .map(|a| accelerator_device_name(&a.pci.address))
        .collect();
    let claim_of = |picked: &[usize]| {
        let allocation = OurAllocation {
            devices: picked
                .iter()
                .map(|&i| allocated("tpus", &names[i]))
                .collect(),
            config: Vec::new(),
        };
        plan(&tpus, "u", &allocation, &DeviceHolders::default())
            .unwrap()
            .spec
            .unwrap()
    };
    let env_of = |spec: &CdiSpec| -> Vec<String> {
        spec.container_edits
            .env
            .iter()
            .filter(|e| e.starts_with("TPU_"))
            .cloned()
            .collect()
    };
    let nodes_of = |spec: &CdiSpec| -> Vec<String> {
        let mut nodes: Vec<String> = spec
            .devices
            .iter()
            .flat_map(|d| {
                d.container_edits
                    .device_nodes
                    .iter()
                    .map(|n| n.path.clone())
            })
            .collect();
        nodes.sort();
        nodes
    };
    // The first chip by bus order carries accel1: its chip index is 1.
    let first = claim_of(&[0]);
    assert_eq!(nodes_of(&first), ["/dev/accel/accel1"]);
    assert_eq!(
        env_of(&first),
        [
            "TPU_VISIBLE_CHIPS=1",
            "TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1",
            "TPU_PROCESS_BOUNDS=1,1,1"
        ]
    );
    // The two vfio chips: their groups, chips 2 and 3.
    let vfio = claim_of(&[2, 3]);
    assert_eq!(nodes_of(&vfio), ["/dev/vfio/12", "/dev/vfio/13"]);
    assert_eq!(env_of(&vfio)[0], "TPU_VISIBLE_CHIPS=2,3");
    assert_eq!(env_of(&vfio)[1], "TPU_CHIPS_PER_PROCESS_BOUNDS=1,2,1");
    let all = claim_of(&[0, 1, 2, 3]);
    assert_eq!(env_of(&all)[0], "TPU_VISIBLE_CHIPS=0,1,2,3");
    assert_eq!(env_of(&all)[1], "TPU_CHIPS_PER_PROCESS_BOUNDS=2,2,1");
    // GPUs get no TPU env.
    let (_d, dgx) = inventory();
    let gpu = OurAllocation {
        devices: vec![allocated("gpus", "gpu-0000-1b-00-0")],
        config: Vec::new(),
    };
    let spec = plan(&dgx, "u", &gpu, &DeviceHolders::default())
        .unwrap()
        .spec
        .unwrap();
    assert!(env_of(&spec).is_empty());
}

#[test]
fn cdi_mode_emits_net_devices_instead_of_the_hook() {
    let (_dir, inventory) = inventory();
    let (gpu, first_nic, _) = gpu_and_two_nics(&inventory);
    let allocation = OurAllocation {
        devices: vec![
            allocated("gpus", &accelerator_device_name(&gpu.pci.address)),
            allocated("nics", &nic_device_name(&first_nic.pci.address)),
        ],
        config: Vec::new(),
    };
    let plan = plan_with_mover(&inventory, &allocation, NetdevMover::Cdi).unwrap();
    assert!(nic_hooks(&plan).is_empty());
    let spec = plan.spec.unwrap();
    let net_devices: Vec<&NetDevice> = spec
        .devices
        .iter()
        .flat_map(|d| &d.container_edits.net_devices)
        .collect();
    assert_eq!(
        net_devices,
        [&NetDevice {
            host_interface_name: first_nic.if_name().unwrap().to_string(),
            name: "rdma0".into(),
        }]
    );
    assert_eq!(spec.cdi_version, "1.1.0");
}
