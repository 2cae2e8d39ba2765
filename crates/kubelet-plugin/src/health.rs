//! The `v1alpha1.DRAResourceHealth` stream: every change of the driver's device states (and
//! every report interval, so the kubelet's health timeout never lapses) sends the complete
//! device list of this node with each device's health.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::proto::dra_health_v1alpha1::{
    DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesRequest,
    NodeWatchResourcesResponse, dra_resource_health_server::DraResourceHealth,
};

/// The kubelet caps messages at 1024 characters and truncates longer ones itself; staying
/// under keeps the text whole.
const MAX_MESSAGE_CHARS: usize = 1024;

/// One device's health as the driver sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The device's name in the driver's ResourceSlices.
    pub device_name: String,
    /// `None` when healthy; otherwise what is wrong, in words (the kubelet shows it).
    pub problem: Option<String>,
}

/// Where the health stream gets device states: a watch of the driver's own snapshot type
/// (an inventory, say) and how to read device states from it. Every change of the watch
/// sends a report.
pub struct DeviceHealthFeed<S> {
    updates: watch::Receiver<S>,
    read: ReadStates<S>,
}

/// How a feed reads device states from the driver's snapshot.
type ReadStates<S> = Arc<dyn Fn(&S) -> Vec<DeviceState> + Send + Sync>;

impl<S> Clone for DeviceHealthFeed<S> {
    fn clone(&self) -> Self {
        Self {
            updates: self.updates.clone(),
            read: self.read.clone(),
        }
    }
}

impl<S: Send + Sync + 'static> DeviceHealthFeed<S> {
    /// Reports what `read` finds in each value of `updates`.
    pub fn new(
        updates: watch::Receiver<S>,
        read: impl Fn(&S) -> Vec<DeviceState> + Send + Sync + 'static,
    ) -> Self {
        Self {
            updates,
            read: Arc::new(read),
        }
    }
}

impl DeviceHealthFeed<Vec<DeviceState>> {
    /// A feed whose device list never changes.
    pub fn fixed(devices: Vec<DeviceState>) -> Self {
        let (sender, updates) = watch::channel(devices);
        // Dropping the sender would end the changes, not the reports: the stream keeps
        // repeating the last list every interval.
        drop(sender);
        DeviceHealthFeed::new(updates, Clone::clone)
    }
}

/// The health stream's gRPC service.
pub struct HealthService<S> {
    pool_name: String,
    feed: DeviceHealthFeed<S>,
    report_interval: Duration,
    shutdown: CancellationToken,
}

impl<S: Send + Sync + 'static> HealthService<S> {
    /// `pool_name` must be the pool of the driver's ResourceSlices, because the kubelet
    /// matches health entries to allocated devices by pool and device name.
    pub fn new(
        pool_name: String,
        feed: DeviceHealthFeed<S>,
        report_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            pool_name,
            feed,
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

/// Health of every device in `devices`, plus devices from earlier reports of this stream
/// that are gone now (reported unhealthy, since a vanished device cannot serve a pod).
/// `seen` remembers device names across reports of one stream.
pub fn health_report(
    devices: &[DeviceState],
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
    let mut report = Vec::with_capacity(devices.len());
    let mut present_names = BTreeSet::new();
    for device in devices {
        let (health, message) = match &device.problem {
            None => (HealthStatus::Healthy, String::new()),
            Some(problem) => (HealthStatus::Unhealthy, problem.clone()),
        };
        present_names.insert(device.device_name.clone());
        report.push(entry(device.device_name.clone(), health, message));
    }
    for gone in seen.difference(&present_names) {
        report.push(entry(
            gone.clone(),
            HealthStatus::Unhealthy,
            "device is gone from the node".to_string(),
        ));
    }
    seen.extend(present_names);
    NodeWatchResourcesResponse { devices: report }
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
impl<S: Send + Sync + 'static> DraResourceHealth for HealthService<S> {
    type NodeWatchResourcesStream = HealthStream;

    async fn node_watch_resources(
        &self,
        _: Request<NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut updates = self.feed.updates.clone();
        let read = self.feed.read.clone();
        let pool_name = self.pool_name.clone();
        let interval = self.report_interval;
        let timeout_seconds = self.health_check_timeout_seconds();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            // Without changes (sender gone) the last list is still worth repeating.
            let mut rescans = true;
            loop {
                let devices = read(&updates.borrow_and_update());
                let report =
                    health_report(&devices, &pool_name, &mut seen, unix_now(), timeout_seconds);
                if tx.send(Ok(report)).await.is_err() {
                    return;
                }
                // The next report goes out on a change or when the interval is up.
                let next_repeat = tokio::time::sleep(interval);
                tokio::pin!(next_repeat);
                loop {
                    tokio::select! {
                        changed = updates.changed(), if rescans => {
                            if changed.is_ok() {
                                break;
                            }
                            // The sender is gone: nothing new to report before the interval.
                            rescans = false;
                        }
                        () = &mut next_repeat => break,
                        () = tx.closed() => return,
                        // Graceful server shutdown waits for open streams; this one would
                        // never end on its own.
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
