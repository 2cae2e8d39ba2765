//! `tandem controller`: one replica of the cluster controller Deployment. Parses flags, serves
//! metrics and health, runs the leader-elected controller and shuts down on SIGTERM/SIGINT.

use crate::controller::{Controller, ControllerConfig, metrics};
use crate::names;
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// Namespace of the leader Lease and the rail ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = names::DEFAULT_CONTROLLER_NAMESPACE)]
    pub namespace: String,
    /// DRA driver name, also the attribute domain of the slices it reads.
    #[arg(long, default_value = names::DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// How long a leader that stopped renewing keeps the lease (failover time; whole
    /// seconds, at least 2), e.g. 15s.
    #[arg(long, default_value = "15s", value_parser = super::parse_duration)]
    pub lease_duration: Duration,
    /// kubeconfig file; without it the in-cluster config (or $KUBECONFIG) is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// This replica's name in the Lease (default: $POD_NAME, else the hostname).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Async worker threads; the default does not grow with the node's CPU count.
    #[arg(long, default_value_t = super::DEFAULT_WORKER_THREADS, value_parser = super::parse_thread_count)]
    pub worker_threads: usize,
}

/// `$HOSTNAME` (a pod's name in Kubernetes), else a per-process name.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("tandem-controller-{}", std::process::id()))
}

/// Logging is configured by main (`--log-format`, `RUST_LOG`).
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    super::runtime(args.worker_threads)?.block_on(serve(args))
}

async fn serve(args: ControllerArgs) -> anyhow::Result<()> {
    let identity = args
        .identity
        .clone()
        .filter(|i| !i.is_empty())
        .unwrap_or_else(hostname);
    let client = super::plugin::kube_client(args.kubeconfig.as_ref()).await?;
    let config = ControllerConfig {
        driver: args.driver_name.clone(),
        namespace: args.namespace.clone(),
        lease_duration: args.lease_duration,
        ..ControllerConfig::new(&identity)
    };
    tracing::info!(
        identity,
        namespace = %config.namespace,
        driver = %config.driver,
        lease_duration = ?config.lease_duration,
        "starting controller"
    );
    let controller = Controller::new(client, config);
    let shutdown = CancellationToken::new();
    let listener = metrics::bind(args.metrics_addr).await?;
    let endpoint = tokio::spawn(metrics::serve(
        listener,
        controller.metrics(),
        shutdown.clone(),
    ));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let signals = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        signals.cancel();
    });
    controller.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = endpoint.await;
    Ok(())
}
