//! The cluster controller: keeps the DeviceClasses, publishes the fleet alignment view as
//! Node labels and assigns rails to NIC subnets. Replicas elect one leader through a Lease; only
//! the leader watches and writes. It reads our ResourceSlices and Nodes, never node sysfs.

pub mod alignment;
pub mod classes;
pub mod fleet;
pub mod lease;
pub mod metrics;
pub mod rails;

use crate::names;
use alignment::fleet_view;
use fleet::FleetReconciler;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceSlice};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use lease::LeaseConfig;
use metrics::{Metrics, ReconcileKind};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("binding the metrics endpoint {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("applying DeviceClass {class}: {source}")]
    ClassApply {
        class: String,
        #[source]
        source: kube::Error,
    },
    #[error("patching the labels of Node {node}: {source}")]
    NodePatch {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("rail ConfigMap {namespace}/{name}: {source}")]
    Rails {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("recording a {reason} Event on Node {node}: {source}")]
    Event {
        node: String,
        reason: String,
        #[source]
        source: kube::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    pub driver: String,
    /// Where the Lease and the rail ConfigMap live.
    pub namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    pub lease_duration: Duration,
    /// Quiet time after a change before reconciling, so a burst of watch events (a node
    /// rewriting its pool) is handled in one pass.
    pub debounce: Duration,
}

impl ControllerConfig {
    pub fn new(identity: &str) -> Self {
        Self {
            driver: names::DEFAULT_DRIVER_NAME.to_string(),
            namespace: names::DEFAULT_CONTROLLER_NAMESPACE.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            debounce: Duration::from_millis(50),
        }
    }
}

const CLASSES: u8 = 1;
const FLEET: u8 = 2;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);
const LEASE_RETRY_MIN: Duration = Duration::from_millis(500);
const LEASE_RETRY_MAX: Duration = Duration::from_secs(10);

/// Which parts have to be reconciled; watch tasks mark, the reconcile loop takes.
#[derive(Default)]
struct Dirty {
    parts: AtomicU8,
    wake: Notify,
}

impl Dirty {
    fn mark(&self, parts: u8) {
        self.parts.fetch_or(parts, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn take(&self) -> u8 {
        self.parts.swap(0, Ordering::SeqCst)
    }
}

/// Mirrors `api` into a store, each object cut down by `trim` first; every change marks
/// `parts` dirty.
fn watch_into<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    dirty: Arc<Dirty>,
    parts: u8,
) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    tracing::trace!(kind, "watch event");
                    dirty.mark(parts);
                }
                Ok(watcher::Event::InitDone) => {
                    tracing::debug!(kind, "watch (re)listed");
                    dirty.mark(parts);
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    reader
}

fn drop_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Only what the fleet view reads stays cached: with thousands of nodes the full slices
/// (every attribute and capacity of every device) would dominate the controller's memory.
fn trim_slice(slice: &mut ResourceSlice) {
    drop_managed_fields(slice);
    slice.metadata.owner_references = None;
    let driver = slice.spec.driver.clone();
    let kept: Vec<String> = [
        names::ATTR_KIND,
        names::ATTR_RDMA,
        names::ATTR_PAIRED_WITH,
        names::ATTR_PAIR_AFFINITY,
        names::ATTR_SUBNET,
    ]
    .iter()
    .map(|id| names::driver_qualified(&driver, id))
    .collect();
    for device in slice.spec.devices.iter_mut().flatten() {
        device.capacity = None;
        device.consumes_counters = None;
        if let Some(attributes) = device.attributes.as_mut() {
            attributes.retain(|key, _| kept.contains(key));
        }
    }
}

/// Labels and annotations are all the controller reads of a Node; real Nodes carry large
/// status (image lists, conditions) that would otherwise be cached for every node.
fn trim_node(node: &mut Node) {
    drop_managed_fields(node);
    node.spec = None;
    node.status = None;
}

/// One controller replica.
pub struct Controller {
    client: kube::Client,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
}

impl Controller {
    pub fn new(client: kube::Client, config: ControllerConfig) -> Self {
        Self {
            client,
            config,
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Campaigns for the lease and reconciles while leading, until `shutdown` fires; then
    /// releases the lease so another replica takes over at once.
    pub async fn run(&self, shutdown: CancellationToken) {
        let config = LeaseConfig {
            namespace: self.config.namespace.clone(),
            name: names::CONTROLLER_LEASE_NAME.to_string(),
            identity: self.config.identity.clone(),
            duration: self.config.lease_duration,
        };
        let mut retry = LEASE_RETRY_MIN;
        while !shutdown.is_cancelled() {
            let manager = match lease::lease_manager(self.client.clone(), &config).await {
                Ok(manager) => manager,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election unavailable; retrying");
                    Self::pause(&shutdown, &mut retry).await;
                    continue;
                }
            };
            match self.campaign(&manager, &shutdown).await {
                Ok(()) => retry = LEASE_RETRY_MIN,
                // Leadership is not to be trusted when the lease cannot be read or renewed:
                // step down, then campaign with a fresh view of the lease.
                Err(e) => {
                    tracing::warn!(identity = %self.config.identity, error = %e, "leader election failed; campaigning again");
                    Self::pause(&shutdown, &mut retry).await;
                }
            }
            if shutdown.is_cancelled() {
                match manager.release().await {
                    Ok(()) => {
                        tracing::info!(identity = %self.config.identity, "released the lease")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not release the lease; it expires on its own");
                    }
                }
            }
        }
    }

    async fn pause(shutdown: &CancellationToken, retry: &mut Duration) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(*retry) => {}
        }
        *retry = (*retry * 2).min(LEASE_RETRY_MAX);
    }

    /// Follows the lease until `shutdown` (Ok) or an error of the election (Err), leading
    /// while this replica holds it. `changed` returns when holding flips; dropping `lead` on
    /// lost leadership stops every watch and write at once.
    async fn campaign(
        &self,
        manager: &kube_lease_manager::LeaseManager,
        shutdown: &CancellationToken,
    ) -> Result<(), kube_lease_manager::LeaseManagerError> {
        loop {
            let leading = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                changed = manager.changed() => changed?,
            };
            if !leading {
                continue;
            }
            tracing::info!(identity = %self.config.identity, "became leader");
            self.metrics.set_leader(true);
            let leadership = shutdown.child_token();
            let outcome = tokio::select! {
                changed = manager.changed() => changed.map(|_| ()),
                () = self.lead(&leadership) => Ok(()),
            };
            leadership.cancel();
            self.metrics.set_leader(false);
            outcome?;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            tracing::warn!(identity = %self.config.identity, "lost leadership; campaigning again");
        }
    }

    /// The leader's work: watches, then reconcile passes whenever something changed.
    async fn lead(&self, leadership: &CancellationToken) {
        let dirty = Arc::new(Dirty::default());
        let mut tasks = JoinSet::new();
        let driver = &self.config.driver;
        let classes: Store<DeviceClass> = watch_into(
            &mut tasks,
            Api::all(self.client.clone()),
            watcher::Config::default(),
            drop_managed_fields,
            dirty.clone(),
            CLASSES,
        );
        let slices: Store<ResourceSlice> = watch_into(
            &mut tasks,
            Api::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.driver={driver}")),
            trim_slice,
            dirty.clone(),
            FLEET,
        );
        let nodes: Store<Node> = watch_into(
            &mut tasks,
            Api::all(self.client.clone()),
            watcher::Config::default(),
            trim_node,
            dirty.clone(),
            FLEET,
        );
        let configmaps: Store<ConfigMap> = watch_into(
            &mut tasks,
            Api::namespaced(self.client.clone(), &self.config.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", names::RAILS_CONFIGMAP)),
            drop_managed_fields,
            dirty.clone(),
            FLEET,
        );
        for ready in [
            classes.wait_until_ready().await,
            slices.wait_until_ready().await,
            nodes.wait_until_ready().await,
            configmaps.wait_until_ready().await,
        ] {
            if ready.is_err() {
                // Only when a watch task died, which it does not do on its own.
                tracing::error!("a watch ended before its first list; leading without it");
            }
        }
        tracing::info!(identity = %self.config.identity, "caches synced; reconciling");
        let mut fleet = FleetReconciler::new(
            self.client.clone(),
            &self.config.namespace,
            &self.config.identity,
        );
        let class_api: Api<DeviceClass> = Api::all(self.client.clone());
        dirty.mark(CLASSES | FLEET);
        let mut delay = Duration::ZERO;
        loop {
            tokio::select! {
                () = leadership.cancelled() => return,
                () = dirty.wake.notified() => {}
            }
            tokio::time::sleep(self.config.debounce.max(delay)).await;
            let parts = dirty.take();
            tracing::trace!(parts, "reconcile pass");
            let mut failed = 0;
            if parts & CLASSES != 0 {
                let result = self.reconcile_classes(&class_api, &classes).await;
                if !self.count(ReconcileKind::DeviceClass, result) {
                    failed |= CLASSES;
                }
            }
            if parts & FLEET != 0
                && !self
                    .reconcile_fleet(&mut fleet, &slices, &nodes, &configmaps)
                    .await
            {
                failed |= FLEET;
            }
            if failed == 0 {
                delay = Duration::ZERO;
            } else {
                delay = (delay * 2).clamp(Duration::from_millis(200), MAX_RETRY_DELAY);
                dirty.mark(failed);
            }
        }
    }

    /// Records a reconcile in the metrics; true when it succeeded.
    fn count(&self, kind: ReconcileKind, result: Result<(), ControllerError>) -> bool {
        self.metrics.reconciled(kind);
        match result {
            Ok(()) => true,
            Err(e) => {
                self.metrics.failed(kind);
                tracing::warn!(kind = kind.as_str(), error = %e, "reconcile failed; retrying");
                false
            }
        }
    }

    /// Class passes run only on class watch events (or retries), and the reflector stores an
    /// event before it is handed on, so the cache here is never older than our last apply.
    async fn reconcile_classes(
        &self,
        api: &Api<DeviceClass>,
        cache: &Store<DeviceClass>,
    ) -> Result<(), ControllerError> {
        for desired in classes::desired_classes(&self.config.driver) {
            let name = desired.metadata.name.clone().unwrap_or_default();
            let current = cache.get(&ObjectRef::new(&name));
            if current
                .as_deref()
                .is_some_and(|c| classes::class_matches(c, &desired))
            {
                continue;
            }
            classes::apply_class(api, &desired)
                .await
                .map_err(|source| ControllerError::ClassApply {
                    class: name.clone(),
                    source,
                })?;
            tracing::info!(class = %name, "DeviceClass applied");
        }
        Ok(())
    }

    /// Labels and rails from the caches; true when both went through.
    async fn reconcile_fleet(
        &self,
        fleet: &mut FleetReconciler,
        slices: &Store<ResourceSlice>,
        nodes: &Store<Node>,
        configmaps: &Store<ConfigMap>,
    ) -> bool {
        let slices = slices.state();
        let view = fleet_view(slices.iter().map(|s| s.as_ref()), &self.config.driver);
        let nodes = nodes.state();
        let mut by_affinity: BTreeMap<String, i64> = BTreeMap::new();
        for alignment in view.nodes.values() {
            *by_affinity
                .entry(alignment.best_affinity_label().to_string())
                .or_default() += 1;
        }
        self.metrics.set_nodes_by_best_affinity(&by_affinity);
        let labelled = fleet.reconcile_nodes(&view, &nodes).await.map(|patched| {
            if patched > 0 {
                tracing::debug!(patched, "node labels reconciled");
            }
        });
        let labels_ok = self.count(ReconcileKind::Node, labelled);
        let node_uids: HashMap<String, String> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.uid.clone()?)))
            .collect();
        let cached =
            configmaps.get(&ObjectRef::new(names::RAILS_CONFIGMAP).within(&self.config.namespace));
        let rails = fleet
            .reconcile_rails(&view, cached.as_deref(), &node_uids)
            .await
            .map(|(rails, _)| self.metrics.set_rails(rails));
        let rails_ok = self.count(ReconcileKind::Rails, rails);
        labels_ok && rails_ok
    }
}
