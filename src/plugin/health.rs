//! The `v1alpha1.DRAResourceHealth` stream: every inventory change (and every report
//! interval, so the kubelet's health timeout never lapses) sends the complete device list of
//! this node with each device's health as `topology::health` sees it.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::dra_health_v1alpha1::{
    DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesRequest,
    NodeWatchResourcesResponse, dra_resource_health_server::DraResourceHealth,
};
use crate::names;
use crate::topology::{DeviceRef, HealthIssue, Inventory, InventoryWatch, device_issues};

/// The kubelet caps messages at 1024 characters and truncates longer ones itself; staying
/// under keeps the text whole.
const MAX_MESSAGE_CHARS: usize = 1024;

#[derive(Clone, Debug)]
pub struct HealthService {
    pool_name: String,
    inventory: InventoryWatch,
    report_interval: Duration,
    shutdown: CancellationToken,
}

impl HealthService {
    /// `pool_name` must be the pool of our ResourceSlices, because the kubelet matches
    /// health entries to allocated devices by pool and device name.
    pub fn new(
        pool_name: String,
        inventory: InventoryWatch,
        report_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            pool_name,
            inventory,
            report_interval,
            shutdown,
        }
    }

    /// Three report intervals: one lost or late report does not turn devices Unknown.
    pub fn health_check_timeout_seconds(&self) -> i64 {
        let seconds = self.report_interval.as_secs().saturating_mul(3).max(1);
        i64::try_from(seconds).unwrap_or(i64::MAX)
    }
}

/// Health of every device in `inventory`, plus devices from earlier reports of this stream
/// that are gone now (reported unhealthy, since a vanished device cannot serve a pod).
/// `seen` remembers device names across reports of one stream.
pub fn health_report(
    inventory: &Inventory,
    pool_name: &str,
    seen: &mut BTreeSet<String>,
    now_unix: i64,
    timeout_seconds: i64,
) -> NodeWatchResourcesResponse {
    let entry = |device_name: String, health: HealthStatus, message: String| DeviceHealth {
        device: Some(DeviceIdentifier {
            pool_name: pool_name.to_string(),
            device_name,
        }),
        health: health as i32,
        last_updated_time: now_unix,
        health_check_timeout_seconds: timeout_seconds,
        message: truncate_message(message),
    };
    let present: Vec<(String, DeviceRef<'_>)> = inventory
        .accelerators
        .iter()
        .map(|a| {
            (
                names::accelerator_device_name(&a.pci.address),
                DeviceRef::Accelerator(a),
            )
        })
        .chain(
            inventory
                .nics
                .iter()
                .map(|n| (names::nic_device_name(&n.pci.address), DeviceRef::Nic(n))),
        )
        .collect();
    let mut devices = Vec::with_capacity(present.len());
    let mut present_names = BTreeSet::new();
    for (name, device) in present {
        let issues = device_issues(device);
        let (health, message) = if issues.is_empty() {
            (HealthStatus::Healthy, String::new())
        } else {
            (HealthStatus::Unhealthy, describe(&issues))
        };
        present_names.insert(name.clone());
        devices.push(entry(name, health, message));
    }
    for gone in seen.difference(&present_names) {
        devices.push(entry(
            gone.clone(),
            HealthStatus::Unhealthy,
            "device is gone from the node".to_string(),
        ));
    }
    seen.extend(present_names);
    NodeWatchResourcesResponse { devices }
}

fn describe(issues: &[HealthIssue]) -> String {
    issues
        .iter()
        .map(|issue| match issue {
            HealthIssue::LinkDown => "link down (RDMA port not ACTIVE or netdev down)",
            HealthIssue::PcieFatal => "fatal PCIe (AER) errors reported",
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn truncate_message(message: String) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        return message;
    }
    let mut cut: String = message.chars().take(MAX_MESSAGE_CHARS - 3).collect();
    cut.push_str("...");
    cut
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<NodeWatchResourcesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = HealthStream;

    async fn node_watch_resources(
        &self,
        _: Request<NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut inventory = self.inventory.clone();
        let pool_name = self.pool_name.clone();
        let interval = self.report_interval;
        let timeout_seconds = self.health_check_timeout_seconds();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            // Without rescans (sender gone) the last inventory is still worth repeating.
            let mut rescans = true;
            loop {
                let snapshot = inventory.borrow_and_update().clone();
                let report = health_report(
                    &snapshot,
                    &pool_name,
                    &mut seen,
                    unix_now(),
                    timeout_seconds,
                );
                if tx.send(Ok(report)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = inventory.changed(), if rescans => {
                        rescans = changed.is_ok();
                    }
                    () = tokio::time::sleep(interval) => {}
                    () = tx.closed() => return,
                    // Graceful server shutdown waits for open streams; this one would
                    // never end on its own.
                    () = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
