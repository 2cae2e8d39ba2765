//! `tandem plugin`: the node agent the kubelet talks to. Discovers the machine, recovers
//! claims a previous run left half done, then serves registration, DRA v1/v1beta1 and the
//! health stream until SIGTERM/SIGINT, rescanning the machine periodically.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::machine::MachineArgs;
use crate::names;
use crate::plugin::config::PluginConfig;
use crate::plugin::server;
use crate::prepare::{PrepareConfig, Preparer};
use crate::slices::{NodeIdentity, Publisher, SliceOptions, build_slices, node_identity};
use crate::sysfs::{MachineRoots, discover};
use crate::topology::{Inventory, InventoryWatch};

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
    /// Where the claim checkpoint and per-claim files live; must survive plugin restarts.
    #[arg(long, default_value = "/var/lib/tandem")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Where device nodes appear inside containers (the paths written into CDI specs).
    #[arg(long, default_value = "/dev")]
    pub container_dev_root: PathBuf,
    /// Host path of the `tandem` binary that CDI hooks run (netdev attach); none disables it.
    #[arg(long)]
    pub hook_path: Option<PathBuf>,
    /// kubeconfig file; without it the in-cluster config (or $KUBECONFIG) is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This pod's UID: turns on rolling-update mode (per-pod socket names, file lock).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// How often the machine is rescanned (e.g. 30s, 2m, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub rescan_period: Duration,
    /// Publish device health problems as DeviceTaints on the ResourceSlices.
    #[arg(long)]
    pub device_taints: bool,
}

/// `30s`, `2m`, `500ms`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 2m or 500ms"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(value),
        "ms" => Duration::from_millis(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    if duration.is_zero() {
        return Err(format!("duration {text:?} must be above zero"));
    }
    Ok(duration)
}

/// Logging is configured by main (`--log-format`, `RUST_LOG`).
pub fn run(args: PluginArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let Some(path) = kubeconfig else {
        return kube::Client::try_default()
            .await
            .context("no --kubeconfig and no in-cluster or $KUBECONFIG configuration");
    };
    let file = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    kube::Client::try_from(config)
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
    let (inventory_tx, inventory_rx) = watch::channel(Arc::new(inventory));

    let client = kube_client(args.kubeconfig.as_ref()).await?;
    let prepare_config = PrepareConfig {
        cdi_dir: args.cdi_dir.clone(),
        state_dir: args.state_dir.clone(),
        dev_root_in_container: args.container_dev_root.clone(),
        hook_path: args.hook_path.clone(),
        proc_root: args.machine.proc_root.clone(),
        ..PrepareConfig::new(args.driver_name.clone(), args.node_name.clone())
    };
    let preparer = Preparer::new(prepare_config, client.clone(), inventory_rx.clone())
        .context("setting up claim preparation")?;
    // Before serving: the kubelet may retry a prepare that the previous run left half done.
    let recovery = preparer
        .recover()
        .await
        .context("recovering claims from the checkpoint")?;
    tracing::info!(?recovery, "checkpoint recovered");

    let mut config = PluginConfig::new(args.node_name.clone());
    config.driver_name = args.driver_name.clone();
    config.registry_dir = args.kubelet_registry_dir.clone();
    config.plugins_dir = args.kubelet_plugins_dir.clone();
    config.pod_uid = args.pod_uid.clone().filter(|uid| !uid.is_empty());
    config.health_report_interval = args.rescan_period;
    let running = server::start(&config, Arc::new(preparer), inventory_rx.clone())
        .await
        .context("starting the kubelet plugin servers")?;
    let shutdown = running.shutdown_token();

    let rescans = tokio::spawn(rescan_inventory(
        roots,
        inventory_tx,
        args.rescan_period,
        shutdown.clone(),
    ));
    let slices = tokio::spawn(publish_slices(
        client,
        args.driver_name.clone(),
        args.node_name.clone(),
        SliceOptions {
            device_taints: args.device_taints,
            ..SliceOptions::default()
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
    served.context("kubelet plugin server")
}

/// Keeps this node's ResourceSlices matching the inventory until shutdown.
async fn publish_slices(
    client: kube::Client,
    driver: String,
    node: String,
    options: SliceOptions,
    mut inventory: InventoryWatch,
    shutdown: CancellationToken,
) {
    let identity = match node_identity(client.clone(), &node).await {
        Ok(identity) => identity,
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
    let build =
        |inventory: &Inventory| Arc::new(build_slices(inventory, &identity, &driver, &options));
    let (desired_tx, desired_rx) = watch::channel(build(&inventory.borrow_and_update()));
    let publisher = Publisher::new(client, &driver, &node);
    let publishing = tokio::spawn(publisher.run(desired_rx, shutdown.clone()));
    loop {
        tokio::select! {
            changed = inventory.changed() => {
                if changed.is_err() {
                    break;
                }
                let slices = build(&inventory.borrow_and_update());
                desired_tx.send_replace(slices);
            }
            () = shutdown.cancelled() => break,
        }
    }
    let _ = publishing.await;
}

/// Rediscovers the machine every `period` and publishes the inventory when it changed, so
/// health reports, slices and preparation see links going down and devices vanishing.
pub async fn rescan_inventory(
    roots: MachineRoots,
    sender: watch::Sender<Arc<Inventory>>,
    period: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.cancelled() => return,
        }
        match discover_blocking(roots.clone()).await {
            Ok(inventory) => {
                let changed = sender.send_if_modified(|current| {
                    if **current == inventory {
                        return false;
                    }
                    *current = Arc::new(inventory);
                    true
                });
                if changed {
                    tracing::info!("device inventory changed");
                }
            }
            // Keep serving the last good inventory: one unreadable scan must not drop devices.
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "rescan failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }
}
