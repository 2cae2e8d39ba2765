//! Node plugin metrics (`tandem_plugin_*`, Prometheus text format) and the probes the
//! DaemonSet points at: `/healthz` (both kubelet sockets exist, servers running) and `/readyz`
//! (discovery done, the kubelet registered this instance, and the first ResourceSlice publish
//! succeeded), plus `tandem_kubelet_registered`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::metrics_http::{Reply, Responder};
use crate::topology::{DeviceRef, Inventory, device_issues};
use tandem_kubelet_plugin::driver::{CallObserver, Method};
use tandem_kubelet_plugin::registration::RegistrationWatch;
use tandem_kubelet_plugin::sockets;

fn outcome(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    kind: &'static str,
    health: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VendorDeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    result: &'static str,
}

/// Every plugin metric plus the readiness state; shared by the gRPC handler, the slice
/// publisher, the rescan loop and the HTTP endpoint.
pub struct PluginMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<MethodLabels, Histogram>,
    prepared_claims: Gauge,
    /// UIDs behind `prepared_claims`: a repeated prepare of one claim must not count twice.
    prepared: Mutex<BTreeSet<String>>,
    devices: Family<DeviceLabels, Gauge>,
    publishes: Family<PublishLabels, Counter>,
    last_publish: Gauge<f64, AtomicU64>,
    discovery_problems: Gauge,
    discovery_lost_accelerators: Gauge,
    vendor_cdi_devices: Family<VendorDeviceLabels, Gauge>,
    netattach_pending: Gauge,
    netattach_attached: Gauge,
    claim_status_writes: Family<PublishLabels, Counter>,
    kubelet_registered: Gauge,
    discovered: AtomicBool,
    registered: AtomicBool,
    published: AtomicBool,
}

impl Default for PluginMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let kubelet_registered = Gauge::default();
        registry.register(
            "tandem_kubelet_registered",
            "1 while the kubelet has this plugin instance registered (NotifyRegistrationStatus \
             registered=true and the registration socket still in place), else 0",
            kubelet_registered.clone(),
        );
        let plugin = registry.sub_registry_with_prefix("tandem_plugin");
        let requests = Family::<RequestLabels, Counter>::default();
        // 1 ms .. ~33 s: a prepare that moves netdevs or waits on the apiserver takes seconds.
        let durations = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let prepared_claims = Gauge::default();
        let devices = Family::<DeviceLabels, Gauge>::default();
        let publishes = Family::<PublishLabels, Counter>::default();
        let last_publish = Gauge::<f64, AtomicU64>::default();
        let discovery_problems = Gauge::default();
        let discovery_lost_accelerators = Gauge::default();
        let vendor_cdi_devices = Family::<VendorDeviceLabels, Gauge>::default();
        plugin.register(
            "gpu_vendor_cdi_device",
            "1 for a GPU that a vendor CDI spec (--vendor-cdi-dirs) has a device for, which \
             prepared claims list before Tandem's; 0 for one it has none for",
            vendor_cdi_devices.clone(),
        );
        let netattach_pending = Gauge::default();
        let netattach_attached = Gauge::default();
        let claim_status_writes = Family::<PublishLabels, Counter>::default();
        plugin.register(
            "netattach_pending_releases",
            "Interfaces of unprepared claims not yet back from their pod's network namespace",
            netattach_pending.clone(),
        );
        plugin.register(
            "netattach_attached_interfaces",
            "Interfaces the attach hook moved into pods of prepared claims",
            netattach_attached.clone(),
        );
        plugin.register(
            "claim_status_writes",
            "ResourceClaim status.devices writes for attached interfaces, by result",
            claim_status_writes.clone(),
        );
        plugin.register(
            "requests",
            "Claims in kubelet prepare/unprepare calls, by method and outcome",
            requests.clone(),
        );
        plugin.register(
            "request_duration_seconds",
            "Time to answer a kubelet prepare/unprepare call",
            durations.clone(),
        );
        plugin.register(
            "prepared_claims",
            "Claims prepared by this plugin process and not unprepared since",
            prepared_claims.clone(),
        );
        plugin.register(
            "devices",
            "Devices in the current inventory by kind and health",
            devices.clone(),
        );
        plugin.register(
            "slice_publish",
            "ResourceSlice publish attempts by result",
            publishes.clone(),
        );
        plugin.register(
            "last_publish_timestamp_seconds",
            "Unix time of the last successful ResourceSlice publish",
            last_publish.clone(),
        );
        plugin.register(
            "discovery_problems",
            "Problems the last discovery reported (unreadable or unexpected sysfs entries)",
            discovery_problems.clone(),
        );
        plugin.register(
            "discovery_lost_accelerators",
            "Accelerators the last discovery found but could not place (unknown sysfs path \
             shape, unreadable identity): they are missing from the slices",
            discovery_lost_accelerators.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            prepared_claims,
            prepared: Mutex::new(BTreeSet::new()),
            devices,
            publishes,
            last_publish,
            discovery_problems,
            discovery_lost_accelerators,
            vendor_cdi_devices,
            netattach_pending,
            netattach_attached,
            claim_status_writes,
            kubelet_registered,
            discovered: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            published: AtomicBool::new(false),
        }
    }

    /// Records one kubelet call: its duration and each claim's outcome (by claim UID).
    pub fn record_call<'a>(
        &self,
        method: Method,
        elapsed: Duration,
        outcomes: impl IntoIterator<Item = (&'a str, bool)>,
    ) {
        self.durations
            .get_or_create(&MethodLabels {
                method: method.as_str(),
            })
            .observe(elapsed.as_secs_f64());
        // A poisoned lock only means another recorder panicked; the set is still usable.
        let mut prepared = self
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (uid, ok) in outcomes {
            self.requests
                .get_or_create(&RequestLabels {
                    method: method.as_str(),
                    status: outcome(ok),
                })
                .inc();
            match (method, ok) {
                (Method::Prepare, true) => {
                    prepared.insert(uid.to_string());
                }
                (Method::Unprepare, true) => {
                    prepared.remove(uid);
                }
                _ => {}
            }
        }
        self.prepared_claims
            .set(i64::try_from(prepared.len()).unwrap_or(i64::MAX));
    }

    /// The state one netattach reconcile pass left.
    pub fn observe_netattach(&self, pending: usize, attached: usize) {
        self.netattach_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.netattach_attached
            .set(i64::try_from(attached).unwrap_or(i64::MAX));
    }

    /// One claim status write and whether it succeeded.
    pub fn record_claim_status_write(&self, ok: bool) {
        self.claim_status_writes
            .get_or_create(&PublishLabels {
                result: outcome(ok),
            })
            .inc();
    }

    /// Claims of `method` counted with `ok` (true) or error (false) outcome.
    pub fn requests(&self, method: Method, ok: bool) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.as_str(),
                status: outcome(ok),
            })
            .get()
    }

    /// Replaces the device gauges with the counts of `inventory`, and marks discovery done.
    pub fn observe_inventory(&self, inventory: &Inventory) {
        self.devices.clear();
        let devices = inventory
            .accelerators
            .iter()
            .map(DeviceRef::Accelerator)
            .chain(inventory.nics.iter().map(DeviceRef::Nic));
        for device in devices {
            let kind = match device {
                DeviceRef::Accelerator(_) => crate::names::KIND_GPU,
                DeviceRef::Nic(_) => crate::names::KIND_NIC,
            };
            let health = if device_issues(device).is_empty() {
                "healthy"
            } else {
                "unhealthy"
            };
            self.devices
                .get_or_create(&DeviceLabels { kind, health })
                .inc();
        }
        self.discovery_problems
            .set(i64::try_from(inventory.problems.len()).unwrap_or(i64::MAX));
        self.discovery_lost_accelerators
            .set(i64::try_from(inventory.lost_accelerators()).unwrap_or(i64::MAX));
        self.discovered.store(true, Ordering::Release);
    }

    /// Replaces the per-GPU vendor CDI gauges with `matches` (GPU by device name).
    pub fn observe_vendor_devices(&self, matches: &crate::prepare::vendor_cdi::VendorMatches) {
        self.vendor_cdi_devices.clear();
        for (address, found) in matches {
            self.vendor_cdi_devices
                .get_or_create(&VendorDeviceLabels {
                    device: crate::names::accelerator_device_name(address),
                })
                .set(i64::from(found.device_id.is_some()));
        }
    }

    /// Records a publish attempt; the first success makes the plugin ready.
    pub fn record_publish(&self, succeeded: bool) {
        self.publishes
            .get_or_create(&PublishLabels {
                result: outcome(succeeded),
            })
            .inc();
        if succeeded {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.last_publish.set(now);
            self.published.store(true, Ordering::Release);
        }
    }

    /// Records whether the kubelet has this instance registered.
    pub fn set_registered(&self, registered: bool) {
        self.kubelet_registered.set(i64::from(registered));
        self.registered.store(registered, Ordering::Release);
    }

    /// Mirrors `registration` into [`Self::set_registered`] until shutdown.
    pub async fn follow_registration(
        self: Arc<Self>,
        mut registration: RegistrationWatch,
        shutdown: CancellationToken,
    ) {
        loop {
            self.set_registered(registration.borrow_and_update().is_registered());
            tokio::select! {
                changed = registration.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.discovered.load(Ordering::Acquire) {
            Some("device discovery has not finished")
        } else if !self.registered.load(Ordering::Acquire) {
            Some(
                "the kubelet has not registered this plugin instance yet \
                 (no NotifyRegistrationStatus(registered=true) since the registration socket was created)",
            )
        } else if !self.published.load(Ordering::Acquire) {
            Some("the first ResourceSlice publish has not succeeded yet")
        } else {
            None
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// What `/healthz` checks: the kubelet sockets are still there (the kubelet or an operator may
/// wipe them) and the gRPC servers have not stopped (their shutdown token fires when they do).
#[derive(Clone, Debug)]
pub struct Liveness {
    pub sockets: Vec<PathBuf>,
    pub servers_stopped: CancellationToken,
}

impl Liveness {
    /// Watches the sockets and servers of `plugin`.
    pub fn of(plugin: &tandem_kubelet_plugin::RunningPlugin) -> Self {
        Self {
            sockets: vec![
                plugin.paths().registration.clone(),
                plugin.paths().dra.clone(),
            ],
            servers_stopped: plugin.shutdown_token(),
        }
    }

    /// `None` when alive, else why not.
    pub fn problem(&self) -> Option<String> {
        if self.servers_stopped.is_cancelled() {
            return Some("the kubelet plugin servers have stopped".into());
        }
        self.sockets
            .iter()
            .find(|path| !sockets::socket_exists(path))
            .map(|path| format!("socket {} is missing", path.display()))
    }
}

/// The plugin's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
pub struct Endpoint {
    pub metrics: Arc<PluginMetrics>,
    pub liveness: Liveness,
}

impl Responder for Endpoint {
    fn get(&self, path: &str) -> Option<Reply> {
        let check = |problem: Option<String>| match problem {
            None => Reply::text(StatusCode::OK, "ok\n"),
            Some(reason) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        };
        match path {
            "/metrics" => Some(Reply::metrics(self.metrics.encode())),
            "/healthz" => Some(check(self.liveness.problem())),
            "/readyz" => {
                Some(check(self.liveness.problem().or_else(|| {
                    self.metrics.not_ready_reason().map(String::from)
                })))
            }
            _ => None,
        }
    }
}

impl CallObserver for PluginMetrics {
    fn call_finished(&self, method: Method, elapsed: Duration, outcomes: &[(&str, bool)]) {
        self.record_call(method, elapsed, outcomes.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerators_found_but_not_placed_are_counted() {
        use crate::topology::{DiscoveryProblem, Inventory, LostDevice};
        let metrics = PluginMetrics::new();
        let problem = |lost| DiscoveryProblem {
            device: Some("0001:00:00.0".parse().unwrap()),
            path: "/sys/bus/pci/devices/0001:00:00.0".into(),
            message: "leads to an unknown path shape".into(),
            lost,
        };
        let inventory = Inventory {
            problems: vec![
                problem(Some(LostDevice::Accelerator)),
                problem(Some(LostDevice::Nic)),
                problem(None),
            ],
            ..Inventory::default()
        };
        metrics.observe_inventory(&inventory);
        let text = metrics.encode();
        assert!(
            text.contains("tandem_plugin_discovery_lost_accelerators 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tandem_plugin_discovery_problems 3\n"),
            "{text}"
        );
    }

    #[test]
    fn each_gpu_shows_whether_it_has_a_vendor_cdi_device() {
        use crate::prepare::vendor_cdi::{AcceleratorVendor, VendorMatches};
        let metrics = PluginMetrics::new();
        let mut found = VendorMatches::new();
        found.insert(
            "0000:1b:00.0".parse().unwrap(),
            AcceleratorVendor {
                device_id: Some("nvidia.com/gpu=0".into()),
                ..AcceleratorVendor::default()
            },
        );
        found.insert(
            "0000:43:00.0".parse().unwrap(),
            AcceleratorVendor::default(),
        );
        metrics.observe_vendor_devices(&found);
        let text = metrics.encode();
        assert!(
            text.contains(r#"tandem_plugin_gpu_vendor_cdi_device{device="gpu-0000-1b-00-0"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tandem_plugin_gpu_vendor_cdi_device{device="gpu-0000-43-00-0"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn repeated_prepares_count_each_claim_once_in_the_gauge() {
        let metrics = PluginMetrics::new();
        let ms = Duration::from_millis(3);
        metrics.record_call(Method::Prepare, ms, [("a", true), ("b", false)]);
        metrics.record_call(Method::Prepare, ms, [("a", true)]);
        assert_eq!(metrics.requests(Method::Prepare, true), 2);
        assert_eq!(metrics.requests(Method::Prepare, false), 1);
        assert_eq!(metrics.prepared_claims.get(), 1);
        metrics.record_call(Method::Unprepare, ms, [("a", true)]);
        assert_eq!(metrics.prepared_claims.get(), 0);
        let text = metrics.encode();
        assert!(
            text.contains(r#"tandem_plugin_requests_total{method="prepare",status="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tandem_plugin_request_duration_seconds_count{method="unprepare"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn readiness_waits_for_discovery_registration_and_the_first_publish() {
        let metrics = PluginMetrics::new();
        assert!(metrics.not_ready_reason().is_some());
        metrics.observe_inventory(&Inventory::default());
        assert!(
            metrics
                .not_ready_reason()
                .is_some_and(|r| r.contains("registered"))
        );
        assert!(metrics.encode().contains("tandem_kubelet_registered 0"));
        metrics.set_registered(true);
        assert!(metrics.encode().contains("tandem_kubelet_registered 1"));
        assert!(
            metrics
                .not_ready_reason()
                .is_some_and(|r| r.contains("publish"))
        );
        metrics.record_publish(false);
        assert!(metrics.not_ready_reason().is_some());
        metrics.record_publish(true);
        assert_eq!(metrics.not_ready_reason(), None);
        let text = metrics.encode();
        assert!(
            text.contains(r#"tandem_plugin_slice_publish_total{result="error"} 1"#),
            "{text}"
        );
    }
}
