//! The cluster controller: keeps the DeviceClasses, publishes the fleet alignment view as
//! Node labels and assigns rails to NIC subnets. Replicas elect one leader through a Lease; only
//! the leader watches and writes. It reads our ResourceSlices and Nodes, never node sysfs.
//! The leader reconciles through kube's `Controller` (see `Controller::lead`): one over Nodes,
//! one over the leader Lease for the cluster-wide singletons.

pub mod alignment;
pub mod classes;
pub mod fleet;
pub mod index;
pub mod lease;
pub mod metrics;
pub mod rails;

use crate::names;
use alignment::FleetView;
use fleet::{FleetReconciler, NodeLabeller};
use futures::StreamExt;
use index::{SliceIndex, SliceRef};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceSlice};
use kube::api::Api;
use kube::runtime::controller::{
    Action, Config as RunConfig, Controller as KubeController, Error as RunError,
};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use lease::LeaseConfig;
use metrics::{Metrics, ReconcileKind};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    /// Quiet time after a trigger before reconciling its object (kube's controller
    /// debounce), so a burst of watch events (a node rewriting its pool) is one reconcile.
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

const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);
const MIN_RETRY_DELAY: Duration = Duration::from_millis(200);
const LEASE_RETRY_MIN: Duration = Duration::from_millis(500);
const LEASE_RETRY_MAX: Duration = Duration::from_secs(10);
/// Node reconciles at once (each at most one label PATCH and an Event).
const NODE_CONCURRENCY: u16 = 32;
/// How long a Node reconcile waits for the slice cache to hold the slice versions its
/// triggers saw before it goes ahead with what the cache has.
const FRESHNESS_WAIT: Duration = Duration::from_secs(2);
const FRESHNESS_POLL: Duration = Duration::from_millis(5);
const SYNC_POLL: Duration = Duration::from_millis(10);

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

    /// The leader's work, until leadership ends: the slice cache and two kube `Controller`s,
    /// started together (Node reconciles wait for the cache's first list).
    ///
    /// - Nodes: a `Controller<Node>`, triggered by each Node's own changes and, through
    ///   `watches`, by changes of the slices that name it; a reconcile labels one Node from
    ///   its slices in the cache. The trigger watch parses only what it maps by (`SliceRef`);
    ///   the cache is a watcher of its own (`SliceIndex`), trimmed.
    /// - The cluster singletons, the DeviceClasses and the rail ConfigMap: they must be
    ///   recreated when absent, and a `Controller` reconciles only objects its cache holds, so
    ///   they are reconciled together as the one object that exists while this replica leads,
    ///   its leader Lease: a `Controller<Lease>` triggered by changes of our classes and of the
    ///   rail ConfigMap (`watches`), by every change of the slice cache (`reconcile_all_on`),
    ///   and by the Lease's own renewals, which double as a periodic resync.
    async fn lead(&self, leadership: &CancellationToken) {
        let client = self.client.clone();
        let driver = self.config.driver.clone();
        let namespace = self.config.namespace.clone();
        let index = Arc::new(SliceIndex::new(&driver));
        let (changed_tx, changed_rx) = futures::channel::mpsc::unbounded::<()>();
        let slice_api: Api<ResourceSlice> = Api::all(client.clone());
        let slice_config = watcher::Config::default().fields(&format!("spec.driver={driver}"));
        let mut tasks = JoinSet::new();
        let cache = index.clone();
        let stream = watcher(slice_api, slice_config.clone()).default_backoff();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        let first_list = !cache.synced();
                        if cache.apply(event) {
                            if first_list && cache.synced() {
                                tracing::info!("slice cache synced");
                            }
                            let _ = changed_tx.unbounded_send(());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "slice watch failed; retrying"),
                }
            }
        });
        let nodes =
            KubeController::new(Api::<Node>::all(client.clone()), watcher::Config::default())
                .with_config(
                    RunConfig::default()
                        .debounce(self.config.debounce)
                        .concurrency(NODE_CONCURRENCY),
                );
        let context = Arc::new(Context {
            driver: driver.clone(),
            metrics: self.metrics.clone(),
            index: index.clone(),
            labeller: NodeLabeller::new(client.clone(), &self.config.identity),
            classes: Api::all(client.clone()),
            rails: tokio::sync::Mutex::new(FleetReconciler::new(
                client.clone(),
                &namespace,
                &self.config.identity,
            )),
            nodes: nodes.store(),
            view: Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
        });
        let expecting = index.clone();
        let nodes = nodes
            .watches(
                Api::<SliceRef>::all(client.clone()),
                slice_config,
                move |slice: SliceRef| {
                    expecting
                        .expect(slice)
                        .map(|node| ObjectRef::<Node>::new(&node))
                },
            )
            .run(reconcile_node, retry_policy, context.clone())
            .for_each(|result| {
                log_outcome("node", result);
                std::future::ready(())
            });

        let lease = ObjectRef::<Lease>::new(names::CONTROLLER_LEASE_NAME).within(&namespace);
        let ours: Vec<String> = classes::desired_classes(&driver)
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        let (class_lease, rails_lease) = (lease.clone(), lease);
        let singletons = KubeController::new(
            Api::<Lease>::namespaced(client.clone(), &namespace),
            watcher::Config::default()
                .fields(&format!("metadata.name={}", names::CONTROLLER_LEASE_NAME)),
        )
        .with_config(RunConfig::default().debounce(self.config.debounce))
        .watches(
            Api::<DeviceClass>::all(client.clone()),
            watcher::Config::default(),
            move |class: DeviceClass| {
                let name = class.metadata.name.unwrap_or_default();
                ours.contains(&name).then(|| class_lease.clone())
            },
        )
        .watches(
            Api::<ConfigMap>::namespaced(client, &namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", names::RAILS_CONFIGMAP)),
            move |_: ConfigMap| Some(rails_lease.clone()),
        )
        .reconcile_all_on(changed_rx)
        .run(reconcile_singletons, retry_policy, context)
        .for_each(|result| {
            log_outcome("singletons", result);
            std::future::ready(())
        });
        tokio::select! {
            () = leadership.cancelled() => {}
            _ = futures::future::join(nodes, singletons) => {
                tracing::error!("the controllers ended while leading");
            }
        }
    }
}

/// What the reconcilers share: the caches, the writers and the retry state.
struct Context {
    driver: String,
    metrics: Arc<Metrics>,
    index: Arc<SliceIndex>,
    labeller: NodeLabeller,
    classes: Api<DeviceClass>,
    rails: tokio::sync::Mutex<FleetReconciler>,
    nodes: Store<Node>,
    /// The fleet view and the slice cache generation it was computed at.
    view: Mutex<Option<(u64, Arc<FleetView>)>>,
    /// "Kind/name" → failed reconciles in a row, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

fn failure_key<K: kube::Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}",
        K::kind(&()),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

impl Context {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a reconcile of `kind` in the metrics and passes its result on.
    fn count(
        &self,
        kind: ReconcileKind,
        result: Result<(), ControllerError>,
    ) -> Result<(), ControllerError> {
        self.metrics.reconciled(kind);
        if result.is_err() {
            self.metrics.failed(kind);
        }
        result
    }

    /// The fleet view of the slice cache, computed again only when the cache changed.
    fn fleet_view(&self) -> Arc<FleetView> {
        let generation = self.index.generation();
        let mut memo = self
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, view)) = memo.as_ref()
            && *at == generation
        {
            return view.clone();
        }
        let (at, view) = self.index.view();
        let mut by_affinity: BTreeMap<String, i64> = BTreeMap::new();
        for alignment in view.nodes.values() {
            *by_affinity
                .entry(alignment.best_affinity_label().to_string())
                .or_default() += 1;
        }
        self.metrics.set_nodes_by_best_affinity(&by_affinity);
        let view = Arc::new(view);
        *memo = Some((at, view.clone()));
        view
    }
}

/// One Node: its labels and annotation from its slices, once the cache holds the slice
/// versions that triggered this reconcile (or after `FRESHNESS_WAIT`).
async fn reconcile_node(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    // Never from a cache without every slice: a node whose slices are not in would lose its
    // labels. The controllers start together with the cache's first list, so the lists of
    // Nodes and slices overlap.
    while !ctx.index.synced() {
        tokio::time::sleep(SYNC_POLL).await;
    }
    let deadline = tokio::time::Instant::now() + FRESHNESS_WAIT;
    let alignment = loop {
        match ctx.index.node(&name, false) {
            Ok(alignment) => break alignment,
            Err(()) if tokio::time::Instant::now() >= deadline => {
                tracing::debug!(node = %name, wait = ?FRESHNESS_WAIT, "slice cache still behind this node's triggers; going ahead with it");
                break ctx.index.node(&name, true).unwrap_or_default();
            }
            Err(()) => {
                tracing::trace!(node = %name, "slice cache behind this node's triggers; waiting");
                tokio::time::sleep(FRESHNESS_POLL).await;
            }
        }
    };
    let result = ctx
        .labeller
        .reconcile_node(&node, alignment.as_ref())
        .await
        .map(|patched| {
            if patched {
                tracing::debug!(node = %name, "node labels reconciled");
            }
        });
    ctx.count(ReconcileKind::Node, result)?;
    ctx.failures().remove(&failure_key(node.as_ref()));
    Ok(Action::await_change())
}

/// The DeviceClasses and the rails, keyed by the leader Lease.
async fn reconcile_singletons(
    lease: Arc<Lease>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let applied = classes::ensure_classes(&ctx.classes, &ctx.driver)
        .await
        .map(|applied| {
            for class in applied {
                tracing::info!(%class, "DeviceClass applied");
            }
        })
        .map_err(|(class, source)| ControllerError::ClassApply { class, source });
    let classes = ctx.count(ReconcileKind::DeviceClass, applied);
    if !ctx.index.synced() {
        // The rails wait for the whole fleet; the first list's end triggers this again.
        classes?;
        return Ok(Action::await_change());
    }
    let view = ctx.fleet_view();
    let node_uid = |node: &str| {
        ctx.nodes
            .get(&ObjectRef::new(node))
            .and_then(|n| n.metadata.uid.clone())
    };
    let rails = ctx
        .rails
        .lock()
        .await
        .reconcile_rails(&view, &node_uid)
        .await
        .map(|(rails, _)| ctx.metrics.set_rails(rails));
    let rails = ctx.count(ReconcileKind::Rails, rails);
    classes.and(rails)?;
    ctx.failures().remove(&failure_key(lease.as_ref()));
    Ok(Action::await_change())
}

/// Retries a failed reconcile of that object after 200 ms, doubling up to 10 s while it
/// keeps failing.
fn retry_policy<K: kube::Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &ControllerError,
    ctx: Arc<Context>,
) -> Action {
    let key = failure_key(object.as_ref());
    let failures = {
        let mut failures = ctx.failures();
        let count = failures.entry(key.clone()).or_default();
        *count = count.saturating_add(1);
        *count
    };
    let delay = MIN_RETRY_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY_DELAY);
    tracing::warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn log_outcome<K: kube::Resource, Q: std::error::Error>(
    controller: &str,
    result: Result<(ObjectRef<K>, Action), RunError<ControllerError, Q>>,
) where
    K::DynamicType: Debug,
{
    match result {
        Ok(_) | Err(RunError::ReconcilerFailed(..)) => {}
        // A trigger for an object that is not there (slices of a node without a Node).
        Err(RunError::ObjectNotFound(object)) => {
            tracing::trace!(controller, %object, "nothing to reconcile")
        }
        Err(e) => tracing::warn!(controller, error = %e, "controller error"),
    }
}
