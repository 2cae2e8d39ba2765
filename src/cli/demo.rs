//! `tandem demo`: the whole node path in one process, on a built-in fixture machine and an
//! in-process apiserver stand-in, with no cluster and no root: discovery, the slice summary,
//! registration and prepare/unprepare over the real Unix sockets, and what was left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use k8s_openapi::api::resource::v1::{DeviceAttribute, ResourceClaim};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::apiserver_fake::FakeApiServer;
use crate::fixture;
use crate::names;
use crate::netattach::record::InterfaceRequest;
use crate::prepare::topology_file::ClaimTopology;
use crate::prepare::{PrepareConfig, Preparer, checkpoint};
use crate::slices::{NodeIdentity, SliceOptions, build_slices};
use crate::sysfs::discover;
use crate::topology::{Inventory, PciAddress, pair_groups};
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::config::PluginConfig;
use tandem_kubelet_plugin::proto::dra_v1::{self, dra_plugin_client::DraPluginClient};
use tandem_kubelet_plugin::proto::pluginregistration::{
    InfoRequest, RegistrationStatus, registration_client::RegistrationClient,
};

const DEMO_NODE: &str = "demo-node";
const DEMO_NAMESPACE: &str = "demo";
const DEMO_CLAIM: &str = "training-pairs";
const GPU_REQUEST: &str = "gpus";
const NIC_REQUEST: &str = "nics";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Built-in fixture machine to run on (see `tandem fixture --list`).
    #[arg(long, default_value = "dgx-h100")]
    pub fixture: String,
}

/// One request of a claim and the devices the scheduler allocated to it.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    pub name: String,
    pub device_class: String,
    pub devices: Vec<String>,
}

/// Creates a ResourceClaim and records an allocation of `requests` from `driver`'s pool
/// `pool` in its status, the way the scheduler would.
pub async fn create_allocated_claim(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    driver: &str,
    pool: &str,
    requests: &[ClaimRequest],
) -> Result<ResourceClaim, kube::Error> {
    let api: Api<ResourceClaim> = Api::namespaced(client.clone(), namespace);
    let spec_requests: Vec<Value> = requests
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "exactly": {
                    "deviceClassName": r.device_class,
                    "allocationMode": "ExactCount",
                    "count": r.devices.len(),
                }
            })
        })
        .collect();
    let claim: ResourceClaim = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "devices": { "requests": spec_requests } },
    }))
    .map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &claim).await?;
    let results: Vec<Value> = requests
        .iter()
        .flat_map(|r| {
            r.devices.iter().map(move |device| {
                json!({ "request": r.name, "driver": driver, "pool": pool, "device": device })
            })
        })
        .collect();
    let status = json!({ "status": { "allocation": { "devices": { "results": results } } } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(demo(&args.fixture))
}

fn heading(step: u32, title: &str) {
    println!("\n== {step}. {title}");
}

/// What the demo claim gets: GPUs, RDMA NICs and the pairGroups they come from.
struct Picked {
    gpus: Vec<PciAddress>,
    nics: Vec<PciAddress>,
    groups: Vec<String>,
}

/// The pairable devices of one pairGroup.
#[derive(Default)]
struct GroupMembers {
    gpus: Vec<PciAddress>,
    nics: Vec<PciAddress>,
    numa_node: Option<u32>,
}

/// Two GPUs and two RDMA NICs that the pairing puts together: one pairGroup holding both
/// pairs when the machine has one, else two pairGroups of one NUMA node (a DGX has one GPU and
/// one NIC under each PCIe switch), else the first two of each.
fn pick_devices(inventory: &Inventory) -> Picked {
    let groups = pair_groups(inventory);
    let mut by_group: BTreeMap<&str, GroupMembers> = BTreeMap::new();
    for accelerator in &inventory.accelerators {
        if let Some(group) = groups.get(&accelerator.pci.address) {
            let members = by_group.entry(group).or_default();
            members.gpus.push(accelerator.pci.address);
            members.numa_node = members.numa_node.or(accelerator.pci.numa_node);
        }
    }
    for nic in inventory.nics.iter().filter(|n| n.is_rdma()) {
        if let Some(group) = groups.get(&nic.pci.address) {
            by_group
                .entry(group)
                .or_default()
                .nics
                .push(nic.pci.address);
        }
    }
    if let Some((group, members)) = by_group
        .iter()
        .find(|(_, m)| m.gpus.len() >= 2 && m.nics.len() >= 2)
    {
        return Picked {
            gpus: members.gpus[..2].to_vec(),
            nics: members.nics[..2].to_vec(),
            groups: vec![group.to_string()],
        };
    }
    let complete: Vec<(&&str, &GroupMembers)> = by_group
        .iter()
        .filter(|(_, m)| !m.gpus.is_empty() && !m.nics.is_empty())
        .collect();
    for (i, (first, a)) in complete.iter().enumerate() {
        if let Some((second, b)) = complete[i + 1..]
            .iter()
            .find(|(_, b)| b.numa_node == a.numa_node)
        {
            return Picked {
                gpus: vec![a.gpus[0], b.gpus[0]],
                nics: vec![a.nics[0], b.nics[0]],
                groups: vec![first.to_string(), second.to_string()],
            };
        }
    }
    Picked {
        gpus: inventory
            .accelerators
            .iter()
            .take(2)
            .map(|a| a.pci.address)
            .collect(),
        nics: inventory
            .nics
            .iter()
            .filter(|n| n.is_rdma())
            .take(2)
            .map(|n| n.pci.address)
            .collect(),
        groups: Vec::new(),
    }
}

fn attribute_text(value: &DeviceAttribute) -> String {
    if let Some(s) = &value.string {
        s.clone()
    } else if let Some(i) = value.int {
        i.to_string()
    } else if let Some(b) = value.bool {
        b.to_string()
    } else if let Some(v) = &value.version {
        v.clone()
    } else {
        "?".to_string()
    }
}

/// The slices `tandem plugin` would publish for this machine, one line per device with the
/// attributes a claim selects on.
fn print_slice_summary(inventory: &Inventory, driver: &str) {
    const SHOWN: &[&str] = &[
        names::ATTR_MODEL,
        names::ATTR_NUMA_NODE,
        names::ATTR_PCIE_ROOT,
        names::ATTR_PAIR_GROUP,
        names::ATTR_PAIRED_WITH,
        names::ATTR_PAIR_AFFINITY,
        names::ATTR_RDMA_DEVICE,
    ];
    let node = NodeIdentity {
        name: DEMO_NODE.to_string(),
        uid: String::new(),
    };
    let slices = build_slices(inventory, &node, driver, &SliceOptions::default());
    for slice in &slices {
        let devices = slice.spec.devices.as_deref().unwrap_or_default();
        println!(
            "ResourceSlice {} (driver {}, pool {}, {} devices)",
            slice.metadata.name.as_deref().unwrap_or("?"),
            slice.spec.driver,
            slice.spec.pool.name,
            devices.len()
        );
        for device in devices {
            let attributes = device.attributes.clone().unwrap_or_default();
            let shown: Vec<String> = SHOWN
                .iter()
                .filter_map(|key| {
                    let short = key.rsplit('/').next().unwrap_or(key);
                    attributes
                        .iter()
                        .find(|(k, _)| k.as_str() == *key || k.rsplit('/').next() == Some(short))
                        .map(|(_, v)| format!("{short}={}", attribute_text(v)))
                })
                .collect();
            println!("  {:<18} {}", device.name, shown.join(" "));
        }
    }
}

/// The spec-wide container edits, then each device's.
fn container_edits(spec: &Value) -> Vec<&Value> {
    let devices = spec["devices"].as_array().into_iter().flatten();
    spec.get("containerEdits")
        .into_iter()
        .chain(devices.filter_map(|d| d.get("containerEdits")))
        .collect()
}

fn cdi_specs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut specs = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
                specs.push(entry.path());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    }
    specs.sort();
    Ok(specs)
}

async fn demo(fixture_name: &str) -> anyhow::Result<()> {
    let Some(description) = fixture::builtin(fixture_name) else {
        bail!(
            "unknown fixture {fixture_name:?}; built-in fixtures: {}",
            fixture::builtin_names().join(", ")
        );
    };
    let work = fixture::scratch_dir().context("creating a temporary directory")?;
    let driver = names::DEFAULT_DRIVER_NAME;
    println!(
        "tandem demo on the built-in machine {fixture_name:?} (everything under {})",
        work.path().display()
    );

    heading(1, "Discovery");
    let roots = fixture::write_machine(&description, &work.path().join("machine"))
        .with_context(|| format!("writing fixture {fixture_name}"))?;
    let inventory = discover(&roots).context("discovering the fixture machine")?;
    // The GPU vendor's CDI spec as its toolkit leaves it in /etc/cdi, for machines that
    // come with one: prepared GPUs then list the vendor's device next to ours.
    let vendor_dir = roots.sys.with_file_name("etc").join("cdi");
    let vendor_spec = fixture::write_builtin_vendor_spec(fixture_name, &inventory, &vendor_dir)
        .with_context(|| format!("writing the vendor CDI spec under {}", vendor_dir.display()))?;
    println!(
        "read {} under {}: {} accelerators, {} NICs ({} with RDMA), {} NUMA nodes",
        fixture_name,
        roots.sys.display(),
        inventory.accelerators.len(),
        inventory.nics.len(),
        inventory.nics.iter().filter(|n| n.is_rdma()).count(),
        inventory.numa_nodes.len()
    );
    if vendor_spec {
        println!(
            "vendor CDI spec (as nvidia-ctk cdi generate writes it): {}",
            vendor_dir.join("nvidia.yaml").display()
        );
    }

    heading(2, "The ResourceSlice this node would publish");
    print_slice_summary(&inventory, driver);

    heading(3, "Apiserver stand-in and an allocated claim");
    let apiserver = FakeApiServer::start()
        .await
        .context("starting the in-process apiserver")?;
    let client = apiserver.client();
    let Picked { gpus, nics, groups } = pick_devices(&inventory);
    if gpus.is_empty() {
        bail!("fixture {fixture_name} has no accelerator to allocate");
    }
    let requests = [
        ClaimRequest {
            name: GPU_REQUEST.into(),
            device_class: names::DEVICE_CLASS_GPU.into(),
            devices: gpus.iter().map(names::accelerator_device_name).collect(),
        },
        ClaimRequest {
            name: NIC_REQUEST.into(),
            device_class: names::DEVICE_CLASS_NIC.into(),
            devices: nics.iter().map(names::nic_device_name).collect(),
        },
    ];
    let requests: Vec<ClaimRequest> = requests
        .into_iter()
        .filter(|r| !r.devices.is_empty())
        .collect();
    let claim = create_allocated_claim(
        &client,
        DEMO_NAMESPACE,
        DEMO_CLAIM,
        driver,
        DEMO_NODE,
        &requests,
    )
    .await
    .context("creating the demo ResourceClaim")?;
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    println!("apiserver on {}", apiserver.url());
    println!("claim {DEMO_NAMESPACE}/{DEMO_CLAIM} (uid {uid}) allocated to:");
    for request in &requests {
        println!("  {:<5} {}", request.name, request.devices.join(", "));
    }
    match groups.as_slice() {
        [] => println!("  (no pairGroup on this machine holds a GPU and an RDMA NIC)"),
        [group] => println!("  all from pairGroup {group}"),
        groups => println!(
            "  from pairGroups {} (one GPU + NIC each)",
            groups.join(" and ")
        ),
    }

    heading(4, "The plugin, on Unix sockets");
    let cdi_dir = work.path().join("cdi");
    let state_dir = work.path().join("state");
    let (_inventory_tx, inventory_rx) = watch::channel(Arc::new(inventory));
    let mut prepare_config = PrepareConfig::new(driver, DEMO_NODE);
    prepare_config.cdi_dir = cdi_dir.clone();
    prepare_config.state_dir = state_dir.clone();
    prepare_config.topology_dir = work.path().join("run");
    prepare_config.proc_root = roots.proc.clone();
    // As on a production node: NICs of the claim get the attach hook in their CDI devices.
    // The demo shows it; running it needs root and a pod's network namespace.
    prepare_config.hook_path = std::env::current_exe().ok();
    if vendor_spec {
        prepare_config.vendor_cdi_dirs = vec![vendor_dir.clone()];
    }
    let preparer = Preparer::new(prepare_config, client.clone(), inventory_rx.clone())
        .context("setting up claim preparation")?;
    preparer
        .recover()
        .await
        .context("recovering the (empty) checkpoint")?;
    let mut plugin_config = PluginConfig::new(names::DEFAULT_DRIVER_NAME, DEMO_NODE);
    plugin_config.registry_dir = work.path().join("plugins_registry");
    plugin_config.plugins_dir = work.path().join("plugins");
    let running = crate::plugin::start(&plugin_config, Arc::new(preparer), inventory_rx)
        .await
        .context("starting the plugin servers")?;
    let paths = running.paths().clone();
    println!("registration socket {}", paths.registration.display());
    println!("DRA socket          {}", paths.dra.display());

    heading(5, "Kubelet: registration");
    let mut registration = RegistrationClient::new(unix_channel(&paths.registration).await?);
    let info = registration.get_info(InfoRequest {}).await?.into_inner();
    println!(
        "GetInfo: type={} name={} endpoint={}",
        info.r#type, info.name, info.endpoint
    );
    println!("         supported_versions={:?}", info.supported_versions);
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await?;
    println!("NotifyRegistrationStatus: registered");

    heading(6, "Kubelet: NodePrepareResources (v1)");
    let mut dra = DraPluginClient::new(unix_channel(Path::new(&info.endpoint)).await?);
    let kubelet_claim = dra_v1::Claim {
        namespace: DEMO_NAMESPACE.into(),
        uid: uid.clone(),
        name: DEMO_CLAIM.into(),
    };
    let prepared = dra
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![kubelet_claim.clone()],
        })
        .await?
        .into_inner();
    let Some(answer) = prepared.claims.get(&uid) else {
        bail!("the plugin left claim {uid} out of its answer");
    };
    if !answer.error.is_empty() {
        bail!("preparing the demo claim failed: {}", answer.error);
    }
    let own_kind = format!("{}=", names::cdi_claim_kind(driver));
    for device in &answer.devices {
        // The runtime applies every id; the vendor's comes first.
        let (ours, vendor): (Vec<&String>, Vec<&String>) = device
            .cdi_device_ids
            .iter()
            .partition(|id| id.starts_with(&own_kind));
        let ours: Vec<&str> = ours.iter().map(|s| s.as_str()).collect();
        let vendor: Vec<&str> = vendor.iter().map(|s| s.as_str()).collect();
        let vendor = if vendor.is_empty() {
            String::new()
        } else {
            format!("  vendor={}", vendor.join(","))
        };
        println!(
            "  {:<18} request={:<5} cdi={}{vendor}",
            device.device_name,
            device.request_names.join(","),
            ours.join(","),
        );
    }
    let specs = cdi_specs(&cdi_dir)?;
    let Some(spec_path) = specs.first() else {
        bail!("no CDI spec was written to {}", cdi_dir.display());
    };
    let spec_text = std::fs::read_to_string(spec_path)
        .with_context(|| format!("reading {}", spec_path.display()))?;
    let spec: Value = serde_json::from_str(&spec_text)
        .with_context(|| format!("parsing {}", spec_path.display()))?;

    let edits = container_edits(&spec);
    let topology_host_path = edits
        .iter()
        .filter_map(|e| e.get("mounts").and_then(Value::as_array))
        .flatten()
        .find(|m| m["containerPath"] == names::CONTAINER_TOPOLOGY_FILE)
        .and_then(|m| m["hostPath"].as_str())
        .map(PathBuf::from);
    println!(
        "\nPairs (from the topology file mounted at {}):",
        names::CONTAINER_TOPOLOGY_FILE
    );
    match topology_host_path {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let topology: ClaimTopology = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            for pair in &topology.pairs {
                println!("  {} <-> {}  ({})", pair.gpu, pair.nic, pair.affinity);
            }
            if let Some(reason) = &topology.reason {
                println!("  note: {reason}");
            }
        }
        None => println!("  (the spec mounts no topology file)"),
    }

    println!("\nCDI spec {}:", spec_path.display());
    println!("{}", serde_json::to_string_pretty(&spec)?);

    println!("\nContainer environment:");
    // The runtime merges the edits of the spec and of every device the container gets; a
    // variable set by several devices of the claim appears once.
    let mut seen = std::collections::BTreeSet::new();
    let variables = edits
        .iter()
        .filter_map(|e| e.get("env").and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str);
    for variable in variables {
        if seen.insert(variable) {
            println!("  {variable}");
        }
    }

    println!(
        "\nNICs the runtime moves into the pod (createRuntime hook `tandem hook attach`; not run here, it needs root and the pod's network namespace):"
    );
    let moves: Vec<InterfaceRequest> = edits
        .iter()
        .filter_map(|e| e.get("hooks").and_then(Value::as_array))
        .flatten()
        .filter_map(|hook| hook["args"].as_array())
        .filter_map(|args| {
            let position = args.iter().position(|a| a == "--interface")?;
            args.get(position + 1)?.as_str()?.parse().ok()
        })
        .collect();
    if moves.is_empty() {
        println!("  none");
    }
    for request in &moves {
        println!(
            "  {} -> {} in the pod (PCI {}, RDMA device {}), with its addresses, MTU, routes and rules",
            request.host_name,
            request.pod_name,
            request.pci_address.as_deref().unwrap_or("?"),
            request.rdma_device.as_deref().unwrap_or("none")
        );
    }

    heading(7, "Kubelet: NodeUnprepareResources (v1)");
    let unprepared = dra
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: vec![kubelet_claim],
        })
        .await?
        .into_inner();
    match unprepared.claims.get(&uid) {
        Some(answer) if answer.error.is_empty() => println!("claim {uid}: unprepared"),
        Some(answer) => bail!("unpreparing the demo claim failed: {}", answer.error),
        None => bail!("the plugin left claim {uid} out of its unprepare answer"),
    }
    let left = cdi_specs(&cdi_dir)?;
    println!(
        "CDI specs left in {}: {}",
        cdi_dir.display(),
        if left.is_empty() {
            "none".to_string()
        } else {
            format!("{left:?}")
        }
    );
    let (state, _) = checkpoint::load(&state_dir).context("reading the checkpoint")?;
    let entry = state.claims.contains_key(&uid);
    println!(
        "checkpoint entry for {uid}: {}",
        if entry { "still there" } else { "none" }
    );
    if !left.is_empty() || entry {
        bail!("unprepare left state behind");
    }

    heading(8, "Shutdown");
    running.shutdown().await.context("stopping the plugin")?;
    let sockets_left = [&paths.registration, &paths.dra]
        .into_iter()
        .filter(|p| p.exists())
        .count();
    println!("plugin stopped; sockets left: {sockets_left}");
    apiserver.shutdown().await;
    if sockets_left > 0 {
        bail!("the plugin left its sockets behind");
    }
    println!(
        "\ndone: a kubelet would have started the pod with the devices, pairs and environment above."
    );
    Ok(())
}
