//! `tandem plugin`: the node agent the kubelet talks to. Discovers the machine, recovers
//! claims a previous run left half done, then serves registration, DRA v1/v1beta1 and the
//! health stream until SIGTERM/SIGINT, rescanning the machine periodically.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::machine::MachineArgs;
use crate::names;
use crate::plugin::metrics::{Endpoint, Liveness, PluginMetrics};
use crate::plugin::netattach_reconcile::ReconcileTarget;
use crate::prepare::{NetdevAttach, PrepareConfig, Preparer};
use crate::slices::{self, network};
use crate::slices::{NetworkFacts, NodeIdentity, SliceOptions};
use crate::sysfs::{MachineRoots, discover};
use crate::topology::{Inventory, InventoryWatch};
use tandem_kubelet_plugin::config::PluginConfig;
use tandem_kubelet_plugin::publish::{Publisher, node_uid};
use tandem_kubelet_plugin::registration::RegistrationWatch;

#[derive(Args, Debug)]
pub struct PluginArgs {
    /// Name of this node (the pool name of its ResourceSlices).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// DRA driver name (also the attribute domain).
    #[arg(long, env = "TANDEM_DRIVER_NAME", default_value = names::DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// Directory the kubelet watches for plugin registration sockets.
    #[arg(long, default_value = names::DEFAULT_KUBELET_REGISTRY_DIR)]
    pub kubelet_registry_dir: PathBuf,
    /// The kubelet's plugins directory; the DRA socket goes into `<dir>/<driver>/`.
    #[arg(long, default_value = names::DEFAULT_KUBELET_PLUGINS_DIR)]
    pub kubelet_plugins_dir: PathBuf,
    /// Where CDI spec files are written (the container runtime reads them from here).
    #[arg(long, default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
    /// Where the claim checkpoint and per-claim records live; must survive plugin restarts.
    #[arg(long, default_value = "/var/lib/tandem")]
    pub state_dir: PathBuf,
    /// Where the claims' topology files are written (tmpfs; containers mount them from the
    /// same host path).
    #[arg(long, default_value = crate::prepare::DEFAULT_TOPOLOGY_DIR)]
    pub topology_dir: PathBuf,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Where device nodes appear inside containers (the paths written into CDI specs).
    #[arg(long, default_value = "/dev")]
    pub container_dev_root: PathBuf,
    /// Host path of the `tandem` binary that CDI hooks run (netdev attach); none disables it.
    #[arg(long)]
    pub hook_path: Option<PathBuf>,
    /// How an exclusively attached NIC reaches the pod: `hook` (the OCI hook at --hook-path)
    /// or `cdi` (CDI 1.1 netDevices, moved by a runtime that implements them).
    #[arg(long, default_value = "hook")]
    pub netdev_attach: NetdevAttach,
    /// The Kubernetes node IP; the interface holding it is never moved into a pod, nor
    /// published unless --publish-management-nics.
    #[arg(long, env = "NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// Publish NICs that carry the node IP or a main-table default route as devices too.
    #[arg(long)]
    pub publish_management_nics: bool,
    /// The host network namespace, where released interfaces return (the plugin runs with
    /// hostNetwork, so its own).
    #[arg(long, default_value = "/proc/self/ns/net")]
    pub host_netns: PathBuf,
    /// Where the runtime pins pod network namespaces; searched to release an interface.
    #[arg(long, default_value = crate::netattach::record::RUN_NETNS_DIR)]
    pub netns_dir: PathBuf,
    /// How often interfaces not yet back from a pod are retried and claim statuses updated.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub netattach_reconcile_period: Duration,
    /// kubeconfig file; without it the in-cluster config (or $KUBECONFIG) is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This pod's UID: turns on rolling-update mode (per-pod socket names, file lock).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// How often the machine is rescanned (e.g. 30s, 2m, 500ms).
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    pub rescan_period: Duration,
    /// Publish device health problems as DeviceTaints on the ResourceSlices.
    #[arg(long)]
    pub device_taints: bool,
    /// Where /metrics, /healthz and /readyz are served: comma-separated `IP:PORT` and
    /// `unix:/path` entries (e.g. `0.0.0.0:9477,unix:/run/tandem-probe/http.sock`, the
    /// socket for `tandem probe`); empty disables the endpoint.
    #[arg(long, default_value = "0.0.0.0:9477")]
    pub metrics_addr: String,
    /// Async worker threads (file I/O runs on a separate blocking pool); the default does
    /// not grow with the node's CPU count.
    #[arg(long, default_value_t = super::DEFAULT_WORKER_THREADS, value_parser = super::parse_thread_count)]
    pub worker_threads: usize,
    /// Namespace of the cluster controller, whose rail ConfigMap gives NICs their rail.
    #[arg(long, default_value = names::DEFAULT_CONTROLLER_NAMESPACE)]
    pub controller_namespace: String,
    /// Directories of the GPU vendor's CDI specs (nvidia-ctk / GPU Operator, AMD), comma
    /// separated; read only. A prepared GPU lists the vendor's device for it before Tandem's,
    /// so the runtime adds the driver libraries and hooks. Empty: none read.
    #[arg(long, default_value = "/etc/cdi,/var/run/cdi", value_delimiter = ',')]
    pub vendor_cdi_dirs: Vec<PathBuf>,
    /// Host directory of the GPU driver's user space (GKE: /home/kubernetes/bin/nvidia, GPU
    /// Operator driver container: /run/nvidia/driver), mounted read-only into containers of
    /// GPUs that have no vendor CDI device. Must hold libcuda.so* (or ROCm's libraries) and be
    /// mounted into the plugin's pod at the same path.
    #[arg(long)]
    pub gpu_driver_root: Option<PathBuf>,
    /// Where --gpu-driver-root appears in containers (`lib64`, `bin` below it).
    #[arg(long, default_value = crate::prepare::driver_root::DEFAULT_DRIVER_MOUNT)]
    pub gpu_driver_mount: PathBuf,
    /// Also set NVIDIA_VISIBLE_DEVICES to the claim's GPU UUIDs, for nvidia-container-runtime
    /// in legacy mode; off where the runtime uses CDI.
    #[arg(long)]
    pub nvidia_legacy_env: bool,
}

/// Logging is configured by main (`--log-format`, `RUST_LOG`).
pub fn run(args: PluginArgs) -> anyhow::Result<()> {
    super::runtime(args.worker_threads)?.block_on(serve(args))
}

/// The apiserver client of the node agent and the controller: its requests share one
/// HTTP/2 connection (`tandem_kubelet_plugin::apiserver`).
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let Some(path) = kubeconfig else {
        let config = kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster or $KUBECONFIG configuration")?;
        return tandem_kubelet_plugin::apiserver::client(config)
            .context("building a client from the in-cluster or $KUBECONFIG configuration");
    };
    let file = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    tandem_kubelet_plugin::apiserver::client(config)
        .with_context(|| format!("building a client from kubeconfig {}", path.display()))
}

async fn discover_blocking(roots: MachineRoots) -> anyhow::Result<Inventory> {
    let sys = roots.sys.clone();
    tokio::task::spawn_blocking(move || discover(&roots))
        .await
        .context("discovery task failed")?
        .with_context(|| format!("discovering devices under {}", sys.display()))
}

async fn serve(args: PluginArgs) -> anyhow::Result<()> {
    // Checked first: a wrong driver root is a configuration error, not a node problem.
    let driver_root = args
        .gpu_driver_root
        .as_deref()
        .map(|root| crate::prepare::driver_root::DriverRoot::discover(root, &args.gpu_driver_mount))
        .transpose()?;
    let roots = args.machine.roots();
    let inventory = discover_blocking(roots.clone()).await?;
    tracing::info!(
        node = %args.node_name,
        accelerators = inventory.accelerators.len(),
        nics = inventory.nics.len(),
        problems = inventory.problems.len(),
        "discovered devices"
    );
    for problem in &inventory.problems {
        tracing::warn!(%problem, "discovery problem");
    }
    if inventory.lost_accelerators() > 0 {
        tracing::error!(
            node = %args.node_name,
            lost = inventory.lost_accelerators(),
            "accelerators found but not placed: they are missing from the slices (see the discovery problems above)"
        );
    }
    let metrics = Arc::new(PluginMetrics::new());
    metrics.observe_inventory(&inventory);
    // Bound before the kubelet sockets exist, so a taken port fails the start cleanly.
    let metrics_addrs = crate::metrics_http::parse_listen_addrs(&args.metrics_addr)
        .with_context(|| format!("--metrics-addr {:?}", args.metrics_addr))?;
    let metrics_listeners = crate::metrics_http::bind_all(&metrics_addrs).await?;
    let (inventory_tx, inventory_rx) = watch::channel(Arc::new(inventory));

    let client = kube_client(args.kubeconfig.as_ref()).await?;
    let prepare_config = PrepareConfig {
        cdi_dir: args.cdi_dir.clone(),
        state_dir: args.state_dir.clone(),
        topology_dir: args.topology_dir.clone(),
        dev_root_in_container: args.container_dev_root.clone(),
        hook_path: args.hook_path.clone(),
        netdev_attach: args.netdev_attach,
        node_ip: args.node_ip,
        proc_root: args.machine.proc_root.clone(),
        host_netns: args.host_netns.clone(),
        run_netns_dir: args.netns_dir.clone(),
        vendor_cdi_dirs: args
            .vendor_cdi_dirs
            .iter()
            .filter(|d| !d.as_os_str().is_empty())
            .cloned()
            .collect(),
        driver_root,
        nvidia_legacy_env: args.nvidia_legacy_env,
        ..PrepareConfig::new(args.driver_name.clone(), args.node_name.clone())
    };
    let preparer = Preparer::new(prepare_config, client.clone(), inventory_rx.clone())
        .context("setting up claim preparation")?;
    if let Some(found) = preparer.vendor_devices() {
        metrics.observe_vendor_devices(&found);
        for (address, vendor) in found.iter() {
            match &vendor.device_id {
                Some(id) => {
                    tracing::info!(device = %names::accelerator_device_name(address), vendor_device = %id, "GPU has a vendor CDI device")
                }
                None => {
                    tracing::info!(device = %names::accelerator_device_name(address), "GPU has no vendor CDI device")
                }
            }
        }
    }
    // Before serving: the kubelet may retry a prepare that the previous run left half done.
    let recovery = preparer
        .recover()
        .await
        .context("recovering claims from the checkpoint")?;
    tracing::info!(?recovery, "checkpoint recovered");

    let mut config = PluginConfig::new(args.driver_name.clone(), args.node_name.clone());
    config.registry_dir = args.kubelet_registry_dir.clone();
    config.plugins_dir = args.kubelet_plugins_dir.clone();
    config.pod_uid = args.pod_uid.clone().filter(|uid| !uid.is_empty());
    config.health_report_interval = args.rescan_period;
    let preparer = Arc::new(preparer);
    let running = crate::plugin::start_with_metrics(
        &config,
        preparer.clone(),
        inventory_rx.clone(),
        metrics.clone(),
    )
    .await
    .context("starting the kubelet plugin servers")?;
    let shutdown = running.shutdown_token();
    let endpoint = Arc::new(Endpoint {
        metrics: metrics.clone(),
        liveness: Liveness::of(&running),
    });
    let endpoints: Vec<_> = metrics_listeners
        .into_iter()
        .map(|listener| {
            tokio::spawn(crate::metrics_http::serve(
                listener,
                endpoint.clone(),
                shutdown.clone(),
            ))
        })
        .collect();

    // Rescans every period, and soon after any netlink link event (a port going down).
    let link_events = Arc::new(tokio::sync::Notify::new());
    if let Err(error) = slices::spawn_link_watcher(link_events.clone(), shutdown.clone()) {
        tracing::warn!(%error, "cannot watch netlink link events; relying on periodic rescans");
    }
    let state_dir = args.state_dir.clone();
    let attached: slices::AttachedNics =
        Arc::new(move || crate::netattach::record::attached_pci_addresses(&state_dir));
    let rescans = tokio::spawn(slices::run_rescans(
        roots,
        args.rescan_period,
        link_events,
        inventory_tx,
        Some(attached),
        shutdown.clone(),
    ));
    // Vendor specs change when the GPU Operator or an admin regenerates them: the gauge
    // follows at the rescan period (each pass stats the files, parses only changed ones).
    {
        let preparer = preparer.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let period = args.rescan_period;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {}
                }
                let p = preparer.clone();
                if let Ok(Some(found)) =
                    tokio::task::spawn_blocking(move || p.vendor_devices()).await
                {
                    metrics.observe_vendor_devices(&found);
                }
            }
        });
    }
    let netattach = tokio::spawn(crate::plugin::netattach_reconcile::run(
        preparer,
        ReconcileTarget {
            client: client.clone(),
            driver: args.driver_name.clone(),
            pool: args.node_name.clone(),
            period: args.netattach_reconcile_period,
            metrics: Some(metrics.clone()),
            serialize: running
                .paths()
                .serialize_lock
                .clone()
                .map(tandem_kubelet_plugin::sockets::SerializeLock::new),
        },
        shutdown.clone(),
    ));
    let slices = tokio::spawn(publish_slices(
        running.registration(),
        SliceTarget {
            client,
            state_dir: args.state_dir.clone(),
            driver: args.driver_name.clone(),
            node: args.node_name.clone(),
            options: SliceOptions {
                device_taints: args.device_taints,
                node_ip: args.node_ip,
                publish_management_nics: args.publish_management_nics,
                ..SliceOptions::default()
            },
            controller_namespace: args.controller_namespace.clone(),
            rescan_period: args.rescan_period,
            metrics,
        },
        inventory_rx,
        shutdown.clone(),
    ));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = shutdown.cancelled() => tracing::warn!("plugin server stopped on its own"),
    }
    shutdown.cancel();
    let served = running.wait().await;
    let _ = rescans.await;
    let _ = slices.await;
    let _ = netattach.await;
    for endpoint in endpoints {
        let _ = endpoint.await;
    }
    served.context("kubelet plugin server")
}

/// How long the first slices wait for the rail ConfigMap's watch to list it.
const FIRST_RAILS_WAIT: Duration = Duration::from_secs(5);

/// Where and how `publish_slices` publishes.
struct SliceTarget {
    client: kube::Client,
    /// Where the attach records are: NICs in pods keep their host addresses in the slices.
    state_dir: PathBuf,
    driver: String,
    node: String,
    options: SliceOptions,
    controller_namespace: String,
    /// How often NIC addresses are re-read, and how long a vanished device stays published
    /// with the `gone` taint (the rail ConfigMap is watched).
    rescan_period: Duration,
    metrics: Arc<PluginMetrics>,
}

/// Re-reads NIC addresses and routes (netlink) into `facts`. A failed read keeps the last
/// value: a transient error must not strip subnets from every NIC.
async fn refresh_network(target: &SliceTarget, facts: &mut NetworkFacts) {
    match network::interface_dump().await {
        Ok(mut interfaces) => {
            let state_dir = target.state_dir.clone();
            let recorded = tokio::task::spawn_blocking(move || {
                crate::netattach::record::recorded_interfaces(&state_dir)
            })
            .await
            .unwrap_or_default();
            network::keep_attached_addresses(&mut interfaces.addresses, &recorded);
            interfaces.store_in(facts);
        }
        Err(error) => tracing::warn!(%error, "reading NIC addresses failed; keeping the last ones"),
    }
}

/// Keeps this node's ResourceSlices matching the inventory, the NICs' subnets and the rail
/// map until shutdown: a network refresher feeds `slices::run_slice_builder`, whose desired
/// slices `Publisher::run` makes true in the apiserver while the kubelet has us registered
/// (see [`publish_while_registered`]).
async fn publish_slices(
    registration: RegistrationWatch,
    target: SliceTarget,
    inventory: InventoryWatch,
    shutdown: CancellationToken,
) {
    let node = target.node.clone();
    let identity = match node_uid(target.client.clone(), &node).await {
        Ok(uid) => NodeIdentity {
            name: node.clone(),
            uid,
        },
        // Slices without an owner still work; only their garbage collection with the Node
        // object is lost, and the kubelet wipes them when the plugin goes away anyway.
        Err(error) => {
            tracing::warn!(%node, %error, "cannot read the Node; publishing slices without owner");
            NodeIdentity {
                name: node.clone(),
                uid: String::new(),
            }
        }
    };
    let (rails_tx, mut rails_rx) = watch::channel(None);
    let rails_watch = tokio::spawn(network::watch_rail_configmap(
        target.client.clone(),
        target.controller_namespace.clone(),
        rails_tx,
        shutdown.clone(),
    ));
    let mut facts = NetworkFacts::default();
    refresh_network(&target, &mut facts).await;
    // The first slices carry the rails when the apiserver answers soon: no second write for them.
    if let Ok(Ok(())) = tokio::time::timeout(FIRST_RAILS_WAIT, rails_rx.changed()).await {
        facts.rails = rails_rx.borrow_and_update().clone();
    }
    let (network_tx, network_rx) = watch::channel(facts.clone());
    let refresher = {
        let (target, shutdown) = (&target, shutdown.clone());
        async move {
            let mut refresh = tokio::time::interval(target.rescan_period);
            refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate, and the facts were just read.
            refresh.tick().await;
            loop {
                tokio::select! {
                    _ = refresh.tick() => refresh_network(target, &mut facts).await,
                    // The rails arrive from their watch, not on the rescan period.
                    changed = rails_rx.changed() => match changed {
                        Ok(()) => facts.rails = rails_rx.borrow_and_update().clone(),
                        Err(_) => return,
                    },
                    () = shutdown.cancelled() => return,
                }
                network_tx.send_if_modified(|current| {
                    let changed = *current != facts;
                    if changed {
                        *current = facts.clone();
                    }
                    changed
                });
            }
        }
    };
    let metrics_follow_inventory = {
        let (mut inventory, metrics, shutdown) =
            (inventory.clone(), target.metrics.clone(), shutdown.clone());
        async move {
            loop {
                metrics.observe_inventory(&inventory.borrow_and_update());
                tokio::select! {
                    changed = inventory.changed() => if changed.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    let (desired_tx, mut desired_rx) = watch::channel(Arc::new(Vec::new()));
    let builder = tokio::spawn(slices::run_slice_builder(
        inventory,
        network_rx,
        identity,
        target.driver.clone(),
        target.options.clone(),
        target.rescan_period,
        desired_tx,
        shutdown.clone(),
    ));
    // The publisher starts from the first built set, never from the empty placeholder, which
    // would delete the node's slices for a moment.
    if desired_rx.changed().await.is_err() {
        let _ = builder.await;
        return;
    }
    let metrics = target.metrics.clone();
    let observe: Arc<dyn Fn(bool) + Send + Sync> = Arc::new(move |ok| metrics.record_publish(ok));
    let (client, driver) = (target.client.clone(), target.driver.clone());
    let publisher =
        move || Publisher::new(client.clone(), &driver, &node).observe_publishes(observe.clone());
    let publishing = tokio::spawn(publish_while_registered(
        registration,
        publisher,
        desired_rx,
        shutdown.clone(),
    ));
    tokio::join!(refresher, metrics_follow_inventory);
    let _ = rails_watch.await;
    let _ = builder.await;
    let _ = publishing.await;
}

/// Publishes only while the kubelet has this instance registered: a slice is an offer of
/// devices, and a claim allocated from it waits forever if the kubelet cannot reach us to
/// prepare it. The kubelet deletes a driver's slices when it loses the plugin and never
/// recreates them, so each new registration starts a publisher that lists and writes what is
/// missing; a lost one pauses it (the kubelet does the wiping, 30 s after the last instance
/// disconnects).
async fn publish_while_registered(
    mut registration: RegistrationWatch,
    publisher: impl Fn() -> Publisher,
    desired: watch::Receiver<Arc<Vec<k8s_openapi::api::resource::v1::ResourceSlice>>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            waited = registration.wait_for(|state| state.is_registered()) => {
                if waited.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => return,
        }
        tracing::info!("the kubelet registered this plugin: publishing ResourceSlices");
        let paused = shutdown.child_token();
        let running = tokio::spawn(publisher().run(desired.clone(), paused.clone()));
        tokio::select! {
            lost = registration.wait_for(|state| !state.is_registered()) => {
                tracing::warn!(
                    state = ?lost.map(|state| state.clone()).ok(),
                    "the kubelet no longer has this plugin registered: ResourceSlice publishing \
                     paused until it registers again"
                );
            }
            () = shutdown.cancelled() => {}
        }
        paused.cancel();
        let _ = running.await;
    }
}
