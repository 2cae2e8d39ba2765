//! Tandem on the kubelet's sockets: the kubelet-plugin crate serves [`Preparer`] as its
//! driver, the inventory as its health feed, and [`PluginMetrics`] counts the calls. Also the
//! reconcile of netattach claim statuses, which follows prepared claims.

pub mod driver;
pub mod health;
pub mod metrics;
pub mod netattach_reconcile;

use std::sync::Arc;

use tandem_kubelet_plugin::{Driver, PluginConfig, RunningPlugin, ServeError};
use tokio_util::sync::CancellationToken;

pub use health::inventory_health_feed;
pub use metrics::PluginMetrics;

#[cfg(doc)]
use crate::prepare::Preparer;
use crate::topology::InventoryWatch;

/// Serves `driver` (a [`Preparer`], or a stand-in in tests) on the kubelet's sockets with
/// `inventory`'s device health.
pub async fn start<D: Driver>(
    config: &PluginConfig,
    driver: Arc<D>,
    inventory: InventoryWatch,
) -> Result<RunningPlugin, ServeError> {
    tandem_kubelet_plugin::start(config, driver, inventory_health_feed(inventory)).await
}

/// [`start`], counting calls in `metrics` and mirroring the kubelet's registration into it.
pub async fn start_with_metrics<D: Driver>(
    config: &PluginConfig,
    driver: Arc<D>,
    inventory: InventoryWatch,
    metrics: Arc<PluginMetrics>,
) -> Result<RunningPlugin, ServeError> {
    let running = tandem_kubelet_plugin::start_observed(
        config,
        driver,
        inventory_health_feed(inventory),
        Some(metrics.clone()),
    )
    .await?;
    let shutdown: CancellationToken = running.shutdown_token();
    tokio::spawn(metrics.follow_registration(running.registration(), shutdown));
    Ok(running)
}
