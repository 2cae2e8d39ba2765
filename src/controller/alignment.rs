//! The fleet alignment view, pure: from our ResourceSlices, per node, how many healthy GPUs and
//! RDMA NICs it has, how many GPUs have a healthy NIC at each affinity level, and the Node
//! labels and annotation that publish it; also each node's RDMA NICs with their subnets.

use super::rails::{NicSubnet, NodeNics};
use crate::names;
use crate::topology::Affinity;
use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Label value of `tandem.dev/best-affinity` when no GPU has a healthy NIC.
pub const NO_AFFINITY: &str = "none";

/// How well one node can pair GPUs with NICs right now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAlignment {
    /// Untainted accelerators.
    pub gpus: u32,
    /// Untainted RDMA NICs.
    pub rdma_nics: u32,
    /// Healthy GPUs whose paired NIC is healthy, by the pair's affinity (levels with none left out).
    pub pairs: BTreeMap<Affinity, u32>,
    /// Tainted devices of any kind.
    pub unhealthy: u32,
}

impl NodeAlignment {
    pub fn best_affinity(&self) -> Option<Affinity> {
        self.pairs
            .iter()
            .find(|(_, count)| **count > 0)
            .map(|(a, _)| *a)
    }

    pub fn paired(&self) -> u32 {
        self.pairs.values().sum()
    }

    /// The value of `tandem.dev/best-affinity`.
    pub fn best_affinity_label(&self) -> &'static str {
        self.best_affinity().map_or(NO_AFFINITY, |a| a.as_str())
    }

    /// Our Node labels.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (names::LABEL_GPUS.to_string(), self.gpus.to_string()),
            (
                names::LABEL_RDMA_NICS.to_string(),
                self.rdma_nics.to_string(),
            ),
            (
                names::LABEL_BEST_AFFINITY.to_string(),
                self.best_affinity_label().to_string(),
            ),
        ])
    }

    /// The `tandem.dev/alignment` annotation value.
    pub fn annotation(&self) -> String {
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_annotation(text: &str) -> Option<NodeAlignment> {
        serde_json::from_str(text).ok()
    }

    /// What got worse since `previous`, for an Event: the best affinity, or the number of
    /// GPUs that still have a healthy NIC.
    pub fn degradation_since(&self, previous: &NodeAlignment) -> Option<String> {
        // None (no healthy pair) ranks below SYS.
        let rank = |a: Option<Affinity>| a.map_or(Affinity::ALL.len(), |a| a.index());
        let mut worse = Vec::new();
        if rank(self.best_affinity()) > rank(previous.best_affinity()) {
            worse.push(format!(
                "best GPU-NIC affinity went from {} to {}",
                previous.best_affinity_label(),
                self.best_affinity_label()
            ));
        }
        if self.paired() < previous.paired() {
            worse.push(format!(
                "GPUs with a healthy NIC went from {} to {}",
                previous.paired(),
                self.paired()
            ));
        }
        if worse.is_empty() {
            return None;
        }
        Some(format!(
            "{} ({} unhealthy devices)",
            worse.join("; "),
            self.unhealthy
        ))
    }
}

/// What the controller knows from the slices: per node, its alignment and RDMA NICs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetView {
    pub nodes: BTreeMap<String, NodeAlignment>,
    pub nics: Vec<NodeNics>,
}

fn attribute<'a>(
    device: &'a Device,
    driver: &str,
    id: &str,
) -> Option<&'a k8s_openapi::api::resource::v1::DeviceAttribute> {
    device
        .attributes
        .as_ref()?
        .get(&names::driver_qualified(driver, id))
}

fn string_attribute<'a>(device: &'a Device, driver: &str, id: &str) -> Option<&'a str> {
    attribute(device, driver, id)?.string.as_deref()
}

fn is_healthy(device: &Device) -> bool {
    device.taints.as_ref().is_none_or(Vec::is_empty)
}

fn parse_affinity(text: &str) -> Option<Affinity> {
    Affinity::ALL.into_iter().find(|a| a.as_str() == text)
}

/// The alignment and RDMA NICs of one node's devices.
pub fn node_view(node: &str, devices: &[&Device], driver: &str) -> (NodeAlignment, NodeNics) {
    let mut alignment = NodeAlignment::default();
    let healthy_nics: BTreeSet<&str> = devices
        .iter()
        .filter(|d| string_attribute(d, driver, names::ATTR_KIND) == Some(names::KIND_NIC))
        .filter(|d| is_healthy(d))
        .map(|d| d.name.as_str())
        .collect();
    let mut nics = Vec::new();
    for device in devices {
        let healthy = is_healthy(device);
        if !healthy {
            alignment.unhealthy += 1;
        }
        match string_attribute(device, driver, names::ATTR_KIND) {
            Some(names::KIND_GPU) if healthy => {
                alignment.gpus += 1;
                let peer = string_attribute(device, driver, names::ATTR_PAIRED_WITH);
                let level = string_attribute(device, driver, names::ATTR_PAIR_AFFINITY)
                    .and_then(parse_affinity);
                if let (Some(peer), Some(level)) = (peer, level)
                    && healthy_nics.contains(peer)
                {
                    *alignment.pairs.entry(level).or_default() += 1;
                }
            }
            Some(names::KIND_NIC) => {
                let rdma =
                    attribute(device, driver, names::ATTR_RDMA).and_then(|a| a.bool) == Some(true);
                if !rdma {
                    continue;
                }
                if healthy {
                    alignment.rdma_nics += 1;
                }
                nics.push(NicSubnet {
                    device: device.name.clone(),
                    subnet: string_attribute(device, driver, names::ATTR_SUBNET)
                        .map(str::to_string),
                });
            }
            _ => {}
        }
    }
    nics.sort_by(|a, b| a.device.cmp(&b.device));
    (
        alignment,
        NodeNics {
            node: node.to_string(),
            nics,
        },
    )
}

/// The view over all slices of `driver`. Only a node's current pool generation counts: older
/// slices are what the scheduler ignores too while a node rewrites its pool.
pub fn fleet_view<'a>(
    slices: impl IntoIterator<Item = &'a ResourceSlice>,
    driver: &str,
) -> FleetView {
    let mut pools: BTreeMap<&str, (i64, Vec<&Device>)> = BTreeMap::new();
    for slice in slices {
        let spec = &slice.spec;
        let Some(node) = spec.node_name.as_deref() else {
            continue;
        };
        if spec.driver != driver {
            continue;
        }
        let generation = spec.pool.generation;
        let entry = pools.entry(node).or_insert((generation, Vec::new()));
        if generation > entry.0 {
            *entry = (generation, Vec::new());
        }
        if generation == entry.0 {
            entry.1.extend(spec.devices.iter().flatten());
        }
    }
    let mut view = FleetView::default();
    for (node, (_, mut devices)) in pools {
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        let (alignment, nics) = node_view(node, &devices, driver);
        view.nodes.insert(node.to_string(), alignment);
        view.nics.push(nics);
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1::{DeviceAttribute, DeviceTaint};

    const D: &str = "tandem.dev";

    fn device(name: &str, attrs: &[(&str, DeviceAttribute)], tainted: bool) -> Device {
        Device {
            name: name.into(),
            attributes: Some(
                attrs
                    .iter()
                    .map(|(k, v)| (names::driver_qualified(D, k), v.clone()))
                    .collect(),
            ),
            taints: tainted.then(|| {
                vec![DeviceTaint {
                    key: "tandem.dev/link-down".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> DeviceAttribute {
        DeviceAttribute {
            string: Some(v.into()),
            ..Default::default()
        }
    }

    fn gpu(name: &str, nic: &str, affinity: &str) -> Device {
        device(
            name,
            &[
                ("kind", s("gpu")),
                ("pairedWith", s(nic)),
                ("pairAffinity", s(affinity)),
            ],
            false,
        )
    }

    fn nic(name: &str, tainted: bool) -> Device {
        let rdma = DeviceAttribute {
            bool: Some(true),
            ..Default::default()
        };
        device(name, &[("kind", s("nic")), ("rdma", rdma)], tainted)
    }

    #[test]
    fn a_tainted_nic_takes_its_pair_out_of_the_best_affinity() {
        let devices = [
            gpu("gpu-0", "nic-0", "PIX"),
            gpu("gpu-1", "nic-1", "PHB"),
            nic("nic-0", true),
            nic("nic-1", false),
        ];
        let refs: Vec<&Device> = devices.iter().collect();
        let (alignment, nics) = node_view("n", &refs, D);
        assert_eq!(alignment.gpus, 2);
        assert_eq!(alignment.rdma_nics, 1);
        assert_eq!(alignment.unhealthy, 1);
        assert_eq!(alignment.best_affinity(), Some(Affinity::Phb));
        assert_eq!(alignment.labels()[names::LABEL_BEST_AFFINITY], "PHB");
        assert_eq!(nics.nics.len(), 2, "unhealthy NICs still sit on a rail");

        let healthy: NodeAlignment = NodeAlignment {
            gpus: 2,
            rdma_nics: 2,
            pairs: [(Affinity::Pix, 1), (Affinity::Phb, 1)].into(),
            unhealthy: 0,
        };
        let message = alignment.degradation_since(&healthy).unwrap();
        assert!(message.contains("from PIX to PHB"), "{message}");
        assert!(message.contains("from 2 to 1"), "{message}");
        assert_eq!(healthy.degradation_since(&alignment), None);
        assert_eq!(
            NodeAlignment::from_annotation(&alignment.annotation()),
            Some(alignment)
        );
    }

    #[test]
    fn only_the_newest_pool_generation_counts() {
        let slice = |generation: i64, devices: Vec<Device>| ResourceSlice {
            metadata: Default::default(),
            spec: k8s_openapi::api::resource::v1::ResourceSliceSpec {
                driver: D.into(),
                node_name: Some("n".into()),
                pool: k8s_openapi::api::resource::v1::ResourcePool {
                    name: "n".into(),
                    generation,
                    resource_slice_count: 1,
                },
                devices: Some(devices),
                ..Default::default()
            },
        };
        let slices = [
            slice(1, vec![gpu("gpu-0", "nic-0", "PIX"), nic("nic-0", false)]),
            slice(0, vec![gpu("gpu-9", "nic-9", "SYS")]),
        ];
        let view = fleet_view(&slices, D);
        assert_eq!(view.nodes["n"].gpus, 1);
        assert_eq!(view.nodes["n"].best_affinity(), Some(Affinity::Pix));
        assert!(fleet_view(&slices, "other.dev").nodes.is_empty());
    }
}
