//! The leader's writes for the fleet view: Node labels and annotation from the alignment view
//! (one Node per reconcile), `AlignmentDegraded` and `RailMismatch` Events, and the rail
//! ConfigMap. Each reconcile writes only what differs.

use super::ControllerError;
use super::alignment::{FleetView, NodeAlignment};
use super::rails::{RailMisfit, plan_rails, rails_from_configmap};
use crate::names;
use k8s_openapi::api::core::v1::{ConfigMap, Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Namespace of Events about cluster-scoped objects such as Nodes.
const NODE_EVENT_NAMESPACE: &str = "default";
/// Attempts at a rail ConfigMap write that keeps losing optimistic-concurrency races.
const RAIL_WRITE_ATTEMPTS: usize = 5;

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn our_label_keys() -> [&'static str; 3] {
    [
        names::LABEL_GPUS,
        names::LABEL_RDMA_NICS,
        names::LABEL_BEST_AFFINITY,
    ]
}

/// The merge patch that makes `node`'s labels and annotation say `alignment` (None: remove
/// ours), or None when they already do.
pub fn node_patch(node: &Node, alignment: Option<&NodeAlignment>) -> Option<Value> {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut label_patch = Map::new();
    let mut annotation_patch = Map::new();
    match alignment {
        Some(alignment) => {
            for (key, value) in alignment.labels() {
                if labels.get(&key) != Some(&value) {
                    label_patch.insert(key, Value::String(value));
                }
            }
            let wanted = alignment.annotation();
            // Compare parsed: another serialiser may order keys differently.
            let current = annotations
                .get(names::ANNOTATION_ALIGNMENT)
                .and_then(|a| NodeAlignment::from_annotation(a));
            if current.as_ref() != Some(alignment) {
                annotation_patch.insert(names::ANNOTATION_ALIGNMENT.into(), Value::String(wanted));
            }
        }
        None => {
            for key in our_label_keys() {
                if labels.contains_key(key) {
                    label_patch.insert(key.into(), Value::Null);
                }
            }
            if annotations.contains_key(names::ANNOTATION_ALIGNMENT) {
                annotation_patch.insert(names::ANNOTATION_ALIGNMENT.into(), Value::Null);
            }
        }
    }
    if label_patch.is_empty() && annotation_patch.is_empty() {
        return None;
    }
    let mut metadata = Map::new();
    if !label_patch.is_empty() {
        metadata.insert("labels".into(), Value::Object(label_patch));
    }
    if !annotation_patch.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotation_patch));
    }
    Some(serde_json::json!({ "metadata": metadata }))
}

/// The alignment a Node's annotation recorded last time, if any.
pub fn recorded_alignment(node: &Node) -> Option<NodeAlignment> {
    node.metadata
        .annotations
        .as_ref()?
        .get(names::ANNOTATION_ALIGNMENT)
        .and_then(|a| NodeAlignment::from_annotation(a))
}

/// Writes Warning Events on Nodes. Names derive from node, reason and message, so the same
/// news twice (or from two replicas in turn) bumps one Event's count instead of adding another.
pub struct NodeEvents {
    api: Api<Event>,
    identity: String,
}

impl NodeEvents {
    pub fn new(client: kube::Client, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, NODE_EVENT_NAMESPACE),
            identity: identity.to_string(),
        }
    }

    pub async fn record(
        &self,
        node: &str,
        node_uid: Option<&str>,
        reason: &str,
        message: &str,
    ) -> Result<(), ControllerError> {
        let prefix: String = node.chars().take(200).collect();
        let name = format!(
            "{prefix}.{:016x}",
            crate::hash::fnv1a64(format!("{reason}\0{message}").as_bytes())
        );
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(NODE_EVENT_NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                uid: node_uid.map(str::to_string),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now.clone()),
            source: Some(EventSource {
                component: Some(names::CONTROLLER_FIELD_MANAGER.into()),
                host: None,
            }),
            reporting_component: Some(names::CONTROLLER_FIELD_MANAGER.into()),
            reporting_instance: Some(self.identity.clone()),
            ..Default::default()
        };
        let failed = |source| ControllerError::Event {
            node: node.to_string(),
            reason: reason.to_string(),
            source,
        };
        tracing::warn!(node, reason, message, "node event");
        match self.api.create(&PostParams::default(), &event).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => {
                let Some(mut existing) = self.api.get_opt(&name).await.map_err(failed)? else {
                    return Ok(());
                };
                existing.count = Some(existing.count.unwrap_or(1).saturating_add(1));
                existing.last_timestamp = Some(now);
                match self
                    .api
                    .replace(&name, &PostParams::default(), &existing)
                    .await
                {
                    // A concurrent bump already counted this occurrence.
                    Err(e) if !is_conflict(&e) => Err(failed(e)),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(failed(e)),
        }
    }
}

/// Writes one Node's labels and annotation at a time (the Node controller's reconcile), with
/// an Event where alignment got worse.
pub struct NodeLabeller {
    nodes: Api<Node>,
    events: NodeEvents,
    /// Node → its resourceVersion before our patch, and the patch: while the Node as the
    /// controller's cache has it still shows that version and we would send the same patch,
    /// it is in flight already (a slice event can trigger a reconcile before the Node watch
    /// delivers our own write).
    pending: Mutex<HashMap<String, (String, Value)>>,
}

impl NodeLabeller {
    pub fn new(client: kube::Client, identity: &str) -> Self {
        Self {
            nodes: Api::all(client.clone()),
            events: NodeEvents::new(client, identity),
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Value)>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Brings `node`'s labels and annotation in line with `alignment` (None: the node has none
    /// of our slices). True when it patched.
    pub async fn reconcile_node(
        &self,
        node: &Node,
        alignment: Option<&NodeAlignment>,
    ) -> Result<bool, ControllerError> {
        let Some(name) = node.metadata.name.as_deref() else {
            return Ok(false);
        };
        let version = node.metadata.resource_version.clone().unwrap_or_default();
        let Some(patch) = node_patch(node, alignment) else {
            self.pending().remove(name);
            return Ok(false);
        };
        let in_flight = (version.clone(), patch.clone());
        if self.pending().get(name) == Some(&in_flight) {
            return Ok(false);
        }
        let mut first_error = None;
        if let (Some(now), Some(before)) = (alignment, recorded_alignment(node))
            && let Some(message) = now.degradation_since(&before)
            && let Err(e) = self
                .events
                .record(
                    name,
                    node.metadata.uid.as_deref(),
                    names::REASON_ALIGNMENT_DEGRADED,
                    &message,
                )
                .await
        {
            first_error = Some(e);
        }
        let params = PatchParams {
            field_manager: Some(names::CONTROLLER_FIELD_MANAGER.into()),
            ..Default::default()
        };
        let patched = match self.nodes.patch(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {
                self.pending().insert(name.to_string(), in_flight);
                tracing::info!(node = name, labels = %patch, "node alignment labels updated");
                true
            }
            // The Node went away between the cache and the patch: nothing to label.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                self.pending().remove(name);
                false
            }
            Err(source) => {
                return Err(ControllerError::NodePatch {
                    node: name.to_string(),
                    source,
                });
            }
        };
        match first_error {
            Some(e) => Err(e),
            None => Ok(patched),
        }
    }
}

/// The leader's memory between rail reconciles: the rail ConfigMap as last read or written,
/// and the rail misfits already reported.
pub struct FleetReconciler {
    configmaps: Api<ConfigMap>,
    events: NodeEvents,
    namespace: String,
    /// The rail ConfigMap's data as last seen; kept when the ConfigMap is deleted so the
    /// rails come back with the same numbers.
    rail_data: BTreeMap<String, String>,
    /// resourceVersion of the rail ConfigMap as last seen; None while it does not exist.
    rail_version: Option<String>,
    reported_misfits: HashMap<String, String>,
}

impl FleetReconciler {
    pub fn new(client: kube::Client, namespace: &str, identity: &str) -> Self {
        Self {
            configmaps: Api::namespaced(client.clone(), namespace),
            events: NodeEvents::new(client, identity),
            namespace: namespace.to_string(),
            rail_data: BTreeMap::new(),
            rail_version: None,
            reported_misfits: HashMap::new(),
        }
    }

    fn rails_error(&self, source: kube::Error) -> ControllerError {
        ControllerError::Rails {
            namespace: self.namespace.clone(),
            name: names::RAILS_CONFIGMAP.to_string(),
            source,
        }
    }

    async fn load_rails(&mut self) -> Result<(), ControllerError> {
        let current = self
            .configmaps
            .get_opt(names::RAILS_CONFIGMAP)
            .await
            .map_err(|e| self.rails_error(e))?;
        self.adopt_rails(current.as_ref());
        Ok(())
    }

    fn adopt_rails(&mut self, current: Option<&ConfigMap>) {
        match current {
            Some(cm) => {
                self.rail_data = cm.data.clone().unwrap_or_default();
                self.rail_version = cm.metadata.resource_version.clone();
            }
            None => self.rail_version = None,
        }
    }

    /// Gives every subnet of the fitting nodes a rail, storing new ones in the ConfigMap, and
    /// reports nodes that do not fit (`node_uid` names their Node's UID for the Event).
    pub async fn reconcile_rails(
        &mut self,
        view: &FleetView,
        node_uid: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<(usize, Vec<RailMisfit>), ControllerError> {
        // A read each pass: the ConfigMap may have been deleted, edited or written by us.
        self.load_rails().await?;
        let mut plan = plan_rails(&rails_from_configmap(&self.rail_data), &view.nics);
        for _ in 0..RAIL_WRITE_ATTEMPTS {
            plan = plan_rails(&rails_from_configmap(&self.rail_data), &view.nics);
            let mut data = self.rail_data.clone();
            for (subnet, rail) in &plan.added {
                data.insert(subnet.configmap_key(), rail.to_string());
            }
            let exists = self.rail_version.is_some();
            if (exists && plan.added.is_empty()) || (!exists && data.is_empty()) {
                break;
            }
            let configmap = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(names::RAILS_CONFIGMAP.into()),
                    namespace: Some(self.namespace.clone()),
                    resource_version: self.rail_version.clone(),
                    labels: Some(BTreeMap::from([(
                        names::LABEL_MANAGED_BY.to_string(),
                        names::MANAGED_BY_VALUE.to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            let params = PostParams {
                field_manager: Some(names::CONTROLLER_FIELD_MANAGER.into()),
                ..Default::default()
            };
            let written = if exists {
                self.configmaps
                    .replace(names::RAILS_CONFIGMAP, &params, &configmap)
                    .await
            } else {
                self.configmaps.create(&params, &configmap).await
            };
            match written {
                Ok(cm) => {
                    for (subnet, rail) in &plan.added {
                        tracing::info!(%subnet, rail, "assigned rail");
                    }
                    self.adopt_rails(Some(&cm));
                    break;
                }
                Err(e) if is_conflict(&e) => self.load_rails().await?,
                Err(e) => return Err(self.rails_error(e)),
            }
        }
        self.report_misfits(&plan.misfits, node_uid).await?;
        Ok((plan.rails.len(), plan.misfits))
    }

    async fn report_misfits(
        &mut self,
        misfits: &[RailMisfit],
        node_uid: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<(), ControllerError> {
        self.reported_misfits
            .retain(|node, _| misfits.iter().any(|m| m.node == *node));
        for misfit in misfits {
            if self.reported_misfits.get(&misfit.node) == Some(&misfit.message) {
                continue;
            }
            self.events
                .record(
                    &misfit.node,
                    node_uid(&misfit.node).as_deref(),
                    names::REASON_RAIL_MISMATCH,
                    &misfit.message,
                )
                .await?;
            self.reported_misfits
                .insert(misfit.node.clone(), misfit.message.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Affinity;

    fn node_with(labels: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn patches_touch_only_our_keys_and_only_when_needed() {
        let alignment = NodeAlignment {
            gpus: 8,
            rdma_nics: 8,
            pairs: [(Affinity::Pix, 8)].into(),
            unhealthy: 0,
        };
        let bare = node_with(&[("kubernetes.io/hostname", "n")]);
        let patch = node_patch(&bare, Some(&alignment)).unwrap();
        assert_eq!(
            patch["metadata"]["labels"][names::LABEL_BEST_AFFINITY],
            "PIX"
        );
        assert!(
            patch["metadata"]["labels"]
                .get("kubernetes.io/hostname")
                .is_none()
        );

        let mut labelled = node_with(&[
            (names::LABEL_GPUS, "8"),
            (names::LABEL_RDMA_NICS, "8"),
            (names::LABEL_BEST_AFFINITY, "PIX"),
            ("team", "a"),
        ]);
        labelled.metadata.annotations = Some(
            [(
                names::ANNOTATION_ALIGNMENT.to_string(),
                alignment.annotation(),
            )]
            .into(),
        );
        assert_eq!(node_patch(&labelled, Some(&alignment)), None);
        assert_eq!(recorded_alignment(&labelled), Some(alignment));
        let removal = node_patch(&labelled, None).unwrap();
        assert_eq!(
            removal["metadata"]["labels"][names::LABEL_GPUS],
            Value::Null
        );
        assert!(removal["metadata"]["labels"].get("team").is_none());
        assert_eq!(
            removal["metadata"]["annotations"][names::ANNOTATION_ALIGNMENT],
            Value::Null
        );
        assert_eq!(node_patch(&bare, None), None);
    }
}
