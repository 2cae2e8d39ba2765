//! Makes the apiserver hold exactly our desired ResourceSlices with the fewest writes: list
//! ours, write only what differs, bump the pool generation only when the slice set changes,
//! delete leftovers last, retry conflicts; and a watch loop that repairs edits made by others.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceSlice, ResourceSliceSpec};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often one slice write is tried when the apiserver answers with a conflict or a
/// transient error before the publish gives up (the loop retries the whole publish later).
const WRITE_ATTEMPTS: u32 = 6;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Why a publish, or the lookup of the Node, failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Listing our ResourceSlices failed.
    #[error("listing ResourceSlices of driver {driver} on node {node}: {source}")]
    List {
        /// The driver.
        driver: String,
        /// The node.
        node: String,
        /// The apiserver's or the client's error.
        #[source]
        source: kube::Error,
    },
    /// Creating, updating or deleting a slice failed with an error not worth retrying.
    #[error("writing ResourceSlice {name}: {source}")]
    Write {
        /// The slice.
        name: String,
        /// The apiserver's or the client's error.
        #[source]
        source: kube::Error,
    },
    /// Someone else kept writing the slice; the publish gave up for now.
    #[error("ResourceSlice {name}: still conflicting after {attempts} attempts")]
    Conflicts {
        /// The slice.
        name: String,
        /// How often the write was tried.
        attempts: u32,
    },
    /// A desired slice cannot be written without a name.
    #[error("a desired ResourceSlice has no metadata.name")]
    Unnamed,
    /// Getting the Node (for the slices' owner reference) failed.
    #[error("looking up Node {node}: {source}")]
    Node {
        /// The node.
        node: String,
        /// The apiserver's or the client's error.
        #[source]
        source: kube::Error,
    },
}

/// What one publish did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Slices created.
    pub created: usize,
    /// Slices replaced because they differed from the desired ones.
    pub updated: usize,
    /// Leftover slices deleted.
    pub deleted: usize,
    /// The pool generation the slices now carry.
    pub generation: i64,
}

impl PublishReport {
    /// Apiserver writes of this publish; zero when everything already matched.
    pub fn writes(&self) -> usize {
        self.created + self.updated + self.deleted
    }
}

/// The Node's UID, for the slices' owner reference (garbage collection with the Node).
pub async fn node_uid(client: kube::Client, node: &str) -> Result<String, PublishError> {
    let nodes: Api<Node> = Api::all(client);
    let found = nodes.get(node).await.map_err(|source| PublishError::Node {
        node: node.to_string(),
        source,
    })?;
    Ok(found.metadata.uid.unwrap_or_default())
}

fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Worth another try right away: someone else wrote first, or the server was briefly unwell.
fn is_retryable(error: &kube::Error) -> bool {
    matches!(api_code(error), Some(409 | 429 | 500 | 502 | 503 | 504))
}

/// The spec as compared: `timeAdded` is set by the server when we leave it out, so it is not
/// a difference we caused.
fn comparable_spec(spec: &ResourceSliceSpec) -> ResourceSliceSpec {
    let mut spec = spec.clone();
    for device in spec.devices.iter_mut().flatten() {
        for taint in device.taints.iter_mut().flatten() {
            taint.time_added = None;
        }
    }
    spec
}

/// Same spec and owner as desired; server-set metadata does not count.
pub fn same_slice(existing: &ResourceSlice, desired: &ResourceSlice) -> bool {
    let owners = |s: &ResourceSlice| s.metadata.owner_references.clone().unwrap_or_default();
    comparable_spec(&existing.spec) == comparable_spec(&desired.spec)
        && owners(existing) == owners(desired)
}

/// Keeps the `timeAdded` the server gave taints that are still there, so an unrelated change
/// to the slice does not make old taints look new.
fn carry_taint_times(desired: &mut ResourceSliceSpec, existing: &ResourceSliceSpec) {
    let mut times = BTreeMap::new();
    for device in existing.devices.iter().flatten() {
        for taint in device.taints.iter().flatten() {
            if let Some(time) = &taint.time_added {
                times.insert(
                    (device.name.clone(), taint.key.clone(), taint.effect.clone()),
                    time.clone(),
                );
            }
        }
    }
    for device in desired.devices.iter_mut().flatten() {
        for taint in device.taints.iter_mut().flatten() {
            if taint.time_added.is_none() {
                taint.time_added = times
                    .get(&(device.name.clone(), taint.key.clone(), taint.effect.clone()))
                    .cloned();
            }
        }
    }
}

enum Written {
    Created,
    Updated,
}

/// Publishes one node's pool for one driver.
#[derive(Clone)]
pub struct Publisher {
    api: Api<ResourceSlice>,
    driver: String,
    node: String,
    /// Told the outcome of every publish `run` attempts (true: succeeded), for metrics.
    observer: Option<Arc<dyn Fn(bool) + Send + Sync>>,
}

impl Publisher {
    /// Publishes the slices of driver `driver` on node `node` (whose name is the pool).
    pub fn new(client: kube::Client, driver: &str, node: &str) -> Self {
        Self {
            api: Api::all(client),
            driver: driver.to_string(),
            node: node.to_string(),
            observer: None,
        }
    }

    /// Calls `observer` with the outcome of every publish that `run` attempts.
    pub fn observe_publishes(mut self, observer: Arc<dyn Fn(bool) + Send + Sync>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// `spec.driver=<driver>,spec.nodeName=<node>`: exactly the slices this publisher owns.
    pub fn field_selector(&self) -> String {
        format!("spec.driver={},spec.nodeName={}", self.driver, self.node)
    }

    async fn list_ours(&self) -> Result<BTreeMap<String, ResourceSlice>, PublishError> {
        let list = self
            .api
            .list(&ListParams::default().fields(&self.field_selector()))
            .await
            .map_err(|source| PublishError::List {
                driver: self.driver.clone(),
                node: self.node.clone(),
                source,
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name.clone().map(|n| (n, s)))
            .collect())
    }

    /// Makes the apiserver hold exactly `desired` (their pool generation is decided here).
    pub async fn publish(&self, desired: &[ResourceSlice]) -> Result<PublishReport, PublishError> {
        let existing = self.list_ours().await?;
        let mut wanted: BTreeMap<String, ResourceSlice> = BTreeMap::new();
        for slice in desired {
            let name = slice.metadata.name.clone().ok_or(PublishError::Unnamed)?;
            wanted.insert(name, slice.clone());
        }
        let generation = self.next_generation(&existing, &wanted);
        let mut report = PublishReport {
            generation,
            ..Default::default()
        };
        for (name, slice) in &mut wanted {
            slice.spec.pool.generation = generation;
            match self
                .converge(name, slice, existing.get(name).cloned())
                .await?
            {
                Some(Written::Created) => report.created += 1,
                Some(Written::Updated) => report.updated += 1,
                None => {}
            }
        }
        // Only after the new pool is complete, so consumers never see it shrink to nothing.
        for (name, current) in &existing {
            if !wanted.contains_key(name) && self.delete(name, current).await? {
                report.deleted += 1;
            }
        }
        if report.writes() > 0 {
            tracing::info!(
                node = %self.node,
                generation,
                created = report.created,
                updated = report.updated,
                deleted = report.deleted,
                "published ResourceSlices"
            );
        }
        Ok(report)
    }

    /// The current generation while the set of slices stays the same, the next one when it
    /// changes (slices added or removed, or a pool left half-written by an earlier run).
    fn next_generation(
        &self,
        existing: &BTreeMap<String, ResourceSlice>,
        wanted: &BTreeMap<String, ResourceSlice>,
    ) -> i64 {
        let ours: Vec<&ResourceSlice> = existing
            .values()
            .filter(|s| s.spec.pool.name == self.node)
            .collect();
        let Some(current) = ours.iter().map(|s| s.spec.pool.generation).max() else {
            return 0;
        };
        let generations: BTreeSet<i64> = ours.iter().map(|s| s.spec.pool.generation).collect();
        let existing_names: BTreeSet<&String> = existing.keys().collect();
        let wanted_names: BTreeSet<&String> = wanted.keys().collect();
        let set_changed =
            existing_names != wanted_names || generations.len() > 1 || ours.len() != existing.len();
        if set_changed { current + 1 } else { current }
    }

    /// Writes `desired` over whatever is there (`current`, as last read), re-reading after a
    /// conflict, a vanished object or a transient error. None when nothing needed writing.
    async fn converge(
        &self,
        name: &str,
        desired: &ResourceSlice,
        mut current: Option<ResourceSlice>,
    ) -> Result<Option<Written>, PublishError> {
        for _ in 0..WRITE_ATTEMPTS {
            let result = match &current {
                None => self
                    .api
                    .create(&PostParams::default(), desired)
                    .await
                    .map(|_| Written::Created),
                Some(existing) if same_slice(existing, desired) => return Ok(None),
                Some(existing) => {
                    let mut replacement = existing.clone();
                    replacement.spec = desired.spec.clone();
                    carry_taint_times(&mut replacement.spec, &existing.spec);
                    replacement.metadata.owner_references =
                        desired.metadata.owner_references.clone();
                    self.api
                        .replace(name, &PostParams::default(), &replacement)
                        .await
                        .map(|_| Written::Updated)
                }
            };
            match result {
                Ok(written) => return Ok(Some(written)),
                Err(e) if is_retryable(&e) || api_code(&e) == Some(404) => {
                    tracing::debug!(slice = name, error = %e, "ResourceSlice write refused; re-reading");
                    match self.api.get_opt(name).await {
                        Ok(fresh) => current = fresh,
                        Err(e) if is_retryable(&e) => {}
                        Err(source) => {
                            return Err(PublishError::Write {
                                name: name.into(),
                                source,
                            });
                        }
                    }
                }
                Err(source) => {
                    return Err(PublishError::Write {
                        name: name.into(),
                        source,
                    });
                }
            }
        }
        Err(PublishError::Conflicts {
            name: name.into(),
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Deletes the slice we listed, and only that one (UID precondition); true when deleted.
    async fn delete(&self, name: &str, current: &ResourceSlice) -> Result<bool, PublishError> {
        let mut uid = current.metadata.uid.clone();
        for _ in 0..WRITE_ATTEMPTS {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match self.api.delete(name, &params).await {
                Ok(_) => return Ok(true),
                Err(e) if api_code(&e) == Some(404) => return Ok(false),
                Err(e) if is_retryable(&e) => match self.api.get_opt(name).await {
                    // Recreated under the same name since we listed: still ours, still unwanted.
                    Ok(Some(fresh)) => uid = fresh.metadata.uid,
                    Ok(None) => return Ok(false),
                    Err(e) if is_retryable(&e) => {}
                    Err(source) => {
                        return Err(PublishError::Write {
                            name: name.into(),
                            source,
                        });
                    }
                },
                Err(source) => {
                    return Err(PublishError::Write {
                        name: name.into(),
                        source,
                    });
                }
            }
        }
        Err(PublishError::Conflicts {
            name: name.into(),
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Publishes every new desired set, and republishes when a watch shows our slices edited,
    /// deleted or joined by a stranger. Returns on `shutdown` without deleting anything: the
    /// kubelet wipes a node's slices once the plugin is gone for good.
    pub async fn run(
        self,
        mut desired: watch::Receiver<Arc<Vec<ResourceSlice>>>,
        shutdown: CancellationToken,
    ) {
        let config = watcher::Config::default().fields(&self.field_selector());
        let mut events = watcher(self.api.clone(), config).boxed();
        let mut current = desired.borrow_and_update().clone();
        let mut published_generation: Option<i64> = None;
        let mut pending = true;
        let mut retry_delay = Duration::from_millis(250);
        let retry_at = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(retry_at);
        loop {
            if pending && retry_at.is_elapsed() {
                let published = self.publish(&current).await;
                if let Some(observer) = &self.observer {
                    observer(published.is_ok());
                }
                match published {
                    Ok(report) => {
                        pending = false;
                        published_generation = Some(report.generation);
                        retry_delay = Duration::from_millis(250);
                    }
                    Err(error) => {
                        tracing::warn!(node = %self.node, %error, retry_in = ?retry_delay, "publishing ResourceSlices failed");
                        retry_at
                            .as_mut()
                            .reset(tokio::time::Instant::now() + retry_delay);
                        retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    current = desired.borrow_and_update().clone();
                    pending = true;
                }
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        if self.needs_repair(&event, &current, published_generation) {
                            tracing::info!(node = %self.node, "ResourceSlices changed behind our back; repairing");
                            pending = true;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(node = %self.node, %error, "watching ResourceSlices failed");
                        // A failing watch must not hold up shutdown for up to MAX_RETRY_DELAY.
                        tokio::select! {
                            () = tokio::time::sleep(retry_delay) => {}
                            () = shutdown.cancelled() => return,
                        }
                    }
                    None => return,
                },
                _ = &mut retry_at, if pending => {}
            }
        }
    }

    fn needs_repair(
        &self,
        event: &watcher::Event<ResourceSlice>,
        desired: &[ResourceSlice],
        generation: Option<i64>,
    ) -> bool {
        let find = |name: &Option<String>| desired.iter().find(|d| d.metadata.name == *name);
        match event {
            watcher::Event::Apply(seen) | watcher::Event::InitApply(seen) => {
                match (find(&seen.metadata.name), generation) {
                    (Some(wanted), Some(generation)) => {
                        let mut wanted = wanted.clone();
                        wanted.spec.pool.generation = generation;
                        !same_slice(seen, &wanted)
                    }
                    (Some(_), None) => true,
                    // A slice for our driver and node that we do not want.
                    (None, _) => true,
                }
            }
            watcher::Event::Delete(gone) => find(&gone.metadata.name).is_some(),
            // Deletions while no watch was open show only as absence: compare once in full.
            watcher::Event::InitDone => true,
            watcher::Event::Init => false,
        }
    }
}
