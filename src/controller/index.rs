//! The leader's cache of this driver's ResourceSlices: each slice cut down to what the fleet
//! view reads, indexed by node, fed by a watcher the leader runs.
//!
//! The Node controller is triggered by a watch of its own on the same slices (kube's
//! `Controller::watches`), so a trigger can come before this cache holds the event behind
//! it. The trigger's mapper records the slice's resourceVersion as an expectation
//! ([`SliceIndex::expect`]); a Node reconcile reads the node's slices only once the cache
//! holds every version expected for that node ([`SliceIndex::node`]), so it never labels a
//! node from slices older than the event that woke it.

use super::alignment::{FleetView, NodeAlignment, fleet_view};
use crate::names;
use k8s_openapi::api::resource::v1::ResourceSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A ResourceSlice as the Node controller's trigger watch reads it: metadata and node name.
/// The devices are skipped while parsing, so that second watch of every slice costs little
/// time and memory.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SliceRef {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: SliceRefSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceRefSpec {
    pub node_name: Option<String>,
}

impl k8s_openapi::Resource for SliceRef {
    const API_VERSION: &'static str = <ResourceSlice as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <ResourceSlice as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <ResourceSlice as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <ResourceSlice as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str =
        <ResourceSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for SliceRef {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Tombstones (deleted slices' last resourceVersions) kept for expectations to match; past
/// this many the oldest are not worth tracking: they are dropped all at once, and a reconcile
/// that expected one waits out its bound instead.
const MAX_TOMBSTONES: usize = 4096;

#[derive(Default)]
struct State {
    /// Slice name → the slice, trimmed.
    slices: HashMap<String, Arc<ResourceSlice>>,
    /// Node name → names of its slices.
    by_node: HashMap<String, BTreeSet<String>>,
    /// The slices of a relist in progress.
    relist: Option<HashMap<String, Arc<ResourceSlice>>>,
    /// Deleted slice → its resourceVersion at deletion ("" when a relist found it gone).
    gone: HashMap<String, String>,
    /// Node → slice → the resourceVersion a trigger for that node saw.
    expected: HashMap<String, HashMap<String, String>>,
    /// Bumped on every change of the slices.
    generation: u64,
    synced: bool,
}

impl State {
    fn index(&mut self, name: &str, slice: &ResourceSlice) {
        if let Some(node) = slice.spec.node_name.as_deref() {
            self.by_node
                .entry(node.to_string())
                .or_default()
                .insert(name.to_string());
        }
    }

    fn unindex(&mut self, name: &str, slice: &ResourceSlice) {
        if let Some(node) = slice.spec.node_name.as_deref()
            && let Some(names) = self.by_node.get_mut(node)
        {
            names.remove(name);
            if names.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    fn bury(&mut self, name: String, version: String) {
        if self.gone.len() >= MAX_TOMBSTONES {
            self.gone.clear();
        }
        self.gone.insert(name, version);
    }

    /// Whether the cache holds every slice version a trigger for `node` saw.
    fn fresh(&self, node: &str) -> bool {
        self.expected.get(node).is_none_or(|expected| {
            expected.iter().all(|(slice, version)| {
                let held = self
                    .slices
                    .get(slice)
                    .and_then(|s| s.metadata.resource_version.as_ref());
                held == Some(version) || self.gone.get(slice) == Some(version)
            })
        })
    }
}

/// This driver's slices, trimmed and by node.
pub struct SliceIndex {
    driver: String,
    state: Mutex<State>,
}

fn version(slice: &ResourceSlice) -> String {
    slice.metadata.resource_version.clone().unwrap_or_default()
}

impl SliceIndex {
    pub fn new(driver: &str) -> Self {
        Self {
            driver: driver.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one watcher event in; true when the slices changed.
    pub fn apply(&self, event: watcher::Event<ResourceSlice>) -> bool {
        let mut state = self.state();
        match event {
            watcher::Event::Init => {
                state.relist = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(mut slice) => {
                let Some(name) = slice.metadata.name.clone() else {
                    return false;
                };
                trim_slice(&mut slice);
                state
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(name, Arc::new(slice));
                false
            }
            watcher::Event::InitDone => {
                let fresh = state.relist.take().unwrap_or_default();
                let old = std::mem::take(&mut state.slices);
                for name in old.into_keys() {
                    if !fresh.contains_key(&name) {
                        state.bury(name, String::new());
                    }
                }
                state.by_node.clear();
                for (name, slice) in &fresh {
                    if let Some(node) = slice.spec.node_name.as_deref() {
                        state
                            .by_node
                            .entry(node.to_string())
                            .or_default()
                            .insert(name.clone());
                    }
                }
                state.slices = fresh;
                state.generation += 1;
                state.synced = true;
                true
            }
            watcher::Event::Apply(mut slice) => {
                let Some(name) = slice.metadata.name.clone() else {
                    return false;
                };
                trim_slice(&mut slice);
                if let Some(previous) = state.slices.remove(&name) {
                    state.unindex(&name, &previous);
                }
                state.index(&name, &slice);
                state.gone.remove(&name);
                state.slices.insert(name, Arc::new(slice));
                state.generation += 1;
                true
            }
            watcher::Event::Delete(slice) => {
                let Some(name) = slice.metadata.name.clone() else {
                    return false;
                };
                if let Some(previous) = state.slices.remove(&name) {
                    state.unindex(&name, &previous);
                }
                state.bury(name, version(&slice));
                state.generation += 1;
                true
            }
        }
    }

    /// Whether the first list is in.
    pub fn synced(&self) -> bool {
        self.state().synced
    }

    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Records that a trigger saw `slice` at its resourceVersion; the node it names, if any.
    pub fn expect(&self, slice: SliceRef) -> Option<String> {
        let node = slice.spec.node_name?;
        let name = slice.metadata.name?;
        let version = slice.metadata.resource_version.unwrap_or_default();
        self.state()
            .expected
            .entry(node.clone())
            .or_default()
            .insert(name, version);
        Some(node)
    }

    /// `node`'s alignment from its slices (None: it has none of ours), once the cache holds
    /// what its triggers saw; Err(()) while it does not, unless `anyway`.
    #[allow(clippy::result_unit_err)]
    pub fn node(&self, node: &str, anyway: bool) -> Result<Option<NodeAlignment>, ()> {
        let mut state = self.state();
        if !anyway && !state.fresh(node) {
            return Err(());
        }
        if let Some(expected) = state.expected.remove(node) {
            for (slice, version) in expected {
                if state.gone.get(&slice) == Some(&version) {
                    state.gone.remove(&slice);
                }
            }
        }
        let Some(names) = state.by_node.get(node) else {
            return Ok(None);
        };
        let slices: Vec<&ResourceSlice> = names
            .iter()
            .filter_map(|n| state.slices.get(n))
            .map(|s| s.as_ref())
            .collect();
        Ok(fleet_view(slices, &self.driver).nodes.remove(node))
    }

    /// The whole fleet's view and the generation it was computed at.
    pub fn view(&self) -> (u64, FleetView) {
        let state = self.state();
        let view = fleet_view(state.slices.values().map(|s| s.as_ref()), &self.driver);
        (state.generation, view)
    }
}

/// Only what the fleet view reads stays cached: with thousands of nodes the full slices
/// (every attribute and capacity of every device) would dominate the controller's memory.
pub fn trim_slice(slice: &mut ResourceSlice) {
    slice.metadata.managed_fields = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1::{ResourcePool, ResourceSliceSpec};

    /// What the trigger watch reads of `slice`, parsed from its JSON as from the wire.
    fn seen(slice: &ResourceSlice) -> SliceRef {
        serde_json::from_value(serde_json::to_value(slice).unwrap()).unwrap()
    }

    fn slice(name: &str, node: &str, version: &str) -> ResourceSlice {
        ResourceSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            spec: ResourceSliceSpec {
                driver: "tandem.dev".into(),
                node_name: Some(node.into()),
                pool: ResourcePool {
                    name: node.into(),
                    generation: 1,
                    resource_slice_count: 1,
                },
                devices: Some(Vec::new()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_node_waits_for_the_slice_versions_its_triggers_saw() {
        let index = SliceIndex::new("tandem.dev");
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(slice("a-1", "a", "1")));
        assert!(!index.synced());
        assert!(index.apply(watcher::Event::InitDone));
        assert!(index.synced());
        assert_eq!(index.node("a", false), Ok(Some(NodeAlignment::default())));
        assert_eq!(index.node("b", false), Ok(None));

        // A trigger saw version 2 before the cache did.
        assert_eq!(
            index.expect(seen(&slice("a-1", "a", "2"))).as_deref(),
            Some("a")
        );
        assert_eq!(index.node("a", false), Err(()));
        index.apply(watcher::Event::Apply(slice("a-1", "a", "2")));
        assert!(index.node("a", false).is_ok());

        // A deletion the trigger saw first, then the cache.
        index.expect(seen(&slice("a-1", "a", "3")));
        assert_eq!(index.node("a", false), Err(()));
        index.apply(watcher::Event::Delete(slice("a-1", "a", "3")));
        assert_eq!(index.node("a", false), Ok(None));

        // An expectation the cache never meets (a relist skipped it) gives way when asked.
        index.expect(seen(&slice("a-2", "a", "9")));
        assert_eq!(index.node("a", false), Err(()));
        assert_eq!(index.node("a", true), Ok(None));
        assert_eq!(index.node("a", false), Ok(None));
    }

    #[test]
    fn a_relist_drops_what_is_gone() {
        let index = SliceIndex::new("tandem.dev");
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(slice("a-1", "a", "1")));
        index.apply(watcher::Event::InitApply(slice("b-1", "b", "1")));
        index.apply(watcher::Event::InitDone);
        let before = index.generation();
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(slice("b-1", "b", "1")));
        assert!(index.node("a", false).unwrap().is_some(), "kept until done");
        index.apply(watcher::Event::InitDone);
        assert!(index.generation() > before);
        assert_eq!(index.node("a", false), Ok(None));
        assert_eq!(index.view().1.nodes.len(), 1);
    }
}
