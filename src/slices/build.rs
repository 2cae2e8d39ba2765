//! Inventory → ResourceSlices, pure. One pool per node, devices named from their PCI address,
//! attributes for pairing and topology, and health taints; split into slices that respect the
//! apiserver's limits, in a fixed device order so one changed device rewrites one slice.

use crate::controller::rails::{Subnet, rail_for_subnet};
use crate::names;
use crate::topology::{
    Accelerator, DeviceRef, HealthIssue, Inventory, Nic, PciAddress, PciFunction, device_issues,
    nearest_switch, pair_groups, pair_node,
};
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceCapacity, DeviceTaint, ResourcePool, ResourceSlice,
    ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The apiserver's per-slice device limits.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
pub const MAX_DEVICES_PER_SLICE_WITH_TAINTS: usize = 64;
/// Longest string attribute value the apiserver accepts.
pub const MAX_ATTRIBUTE_STRING: usize = 64;
const MAX_OBJECT_NAME: usize = 253;

/// The Node the slices belong to; the UID makes the Node their owner (garbage collection when
/// the Node object goes). An empty UID leaves the owner reference out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceOptions {
    /// Publish DeviceTaints for unhealthy devices (the cluster needs the DRADeviceTaints gate).
    pub device_taints: bool,
    /// Devices per slice, clamped to the apiserver's limits.
    pub max_devices_per_slice: usize,
    /// The Kubernetes node IP: the NIC holding it is the node's own link to the cluster.
    pub node_ip: Option<IpAddr>,
    /// Publish NICs that carry the node IP or a default route too (off: a pod that took
    /// one would cut the node off the cluster).
    pub publish_management_nics: bool,
}

impl Default for SliceOptions {
    fn default() -> Self {
        Self {
            device_taints: false,
            max_devices_per_slice: MAX_DEVICES_PER_SLICE,
            node_ip: None,
            publish_management_nics: false,
        }
    }
}

impl SliceOptions {
    /// Devices per slice. With taints enabled any device may gain a taint at any time, so
    /// the tainted limit applies always: otherwise one link going down would re-split the pool.
    pub fn devices_per_slice(&self) -> usize {
        let limit = if self.device_taints {
            MAX_DEVICES_PER_SLICE_WITH_TAINTS
        } else {
            MAX_DEVICES_PER_SLICE
        };
        self.max_devices_per_slice.clamp(1, limit)
    }
}

/// What the node knows about its NICs' IP networks, outside sysfs: the addresses of each
/// netdev (`192.168.1.5/24` as the kernel reports them, read over netlink), which interfaces
/// a default route leaves through, how interfaces stack (bond or bridge ports, VLANs) and the
/// rail ConfigMap's data, when the controller has written one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkFacts {
    /// ifName → addresses with the prefix length the kernel holds for them.
    pub addresses: BTreeMap<String, Vec<String>>,
    /// Interfaces that a main-table default route (IPv4 or IPv6) leaves through.
    pub default_routes: BTreeSet<String>,
    /// ifName → the interfaces stacked directly on it: its bond, team or bridge, and VLANs
    /// or other links made on top of it. A NIC under a bond that holds the node IP carries
    /// the node's traffic as much as one holding it itself.
    pub upper_interfaces: BTreeMap<String, BTreeSet<String>>,
    /// Data of the rail ConfigMap (`tandem.dev/rail`); `None` publishes no rails.
    pub rails: Option<BTreeMap<String, String>>,
}

impl NetworkFacts {
    /// The subnet `tandem.dev/subnet` names for `if_name`: the prefix of its first IPv4
    /// address, else of its first global IPv6 address. The prefix length is the kernel's own
    /// (a GKE NIC holding a /32 publishes the /32), so every node of a fabric agrees on it.
    pub fn subnet_of(&self, if_name: &str) -> Option<Subnet> {
        let subnets: Vec<Subnet> = self
            .addresses
            .get(if_name)?
            .iter()
            .filter_map(|text| Subnet::parse(text).ok())
            .filter(|subnet| is_fabric_address(subnet.network()))
            .collect();
        let v4 = subnets.iter().find(|s| s.network().is_ipv4());
        v4.or_else(|| subnets.first()).copied()
    }
}

/// Why a NIC is the node's own link to the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ManagementReason {
    /// `via` (the NIC's netdev, or an interface stacked on it) holds the node IP.
    NodeIp { via: String, ip: IpAddr },
    /// A main-table default route leaves through `via`.
    DefaultRoute { via: String },
}

impl std::fmt::Display for ManagementReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NodeIp { via, ip } => write!(f, "{via} holds the node IP {ip}"),
            Self::DefaultRoute { via } => write!(f, "the default route leaves through {via}"),
        }
    }
}

/// A NIC the builder kept out of the slices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeftOutNic {
    /// The device name it would have had.
    pub device: String,
    pub if_name: Option<String>,
    pub reason: ManagementReason,
}

/// Interfaces stacked on `if_name` at any depth, `if_name` first, then nearest first.
fn interface_and_uppers<'a>(network: &'a NetworkFacts, if_name: &'a str) -> Vec<&'a str> {
    let mut found = vec![if_name];
    let mut next = 0;
    while let Some(current) = found.get(next).copied() {
        next += 1;
        for upper in network.upper_interfaces.get(current).into_iter().flatten() {
            if !found.contains(&upper.as_str()) {
                found.push(upper);
            }
        }
    }
    found
}

fn holds_address(network: &NetworkFacts, if_name: &str, ip: IpAddr) -> bool {
    network
        .addresses
        .get(if_name)
        .into_iter()
        .flatten()
        .filter_map(|text| text.split('/').next()?.parse::<IpAddr>().ok())
        .any(|address| address == ip)
}

fn management_reason(
    nic: &Nic,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Option<ManagementReason> {
    for netdev in &nic.netdevs {
        for via in interface_and_uppers(network, &netdev.name) {
            if let Some(ip) = options.node_ip
                && holds_address(network, via, ip)
            {
                return Some(ManagementReason::NodeIp {
                    via: via.to_string(),
                    ip,
                });
            }
            if network.default_routes.contains(via) {
                return Some(ManagementReason::DefaultRoute {
                    via: via.to_string(),
                });
            }
        }
    }
    None
}

/// The NICs that carry the node IP or a default route, which the slices leave out unless
/// `options.publish_management_nics` says otherwise.
pub fn management_nics(
    inventory: &Inventory,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Vec<LeftOutNic> {
    if options.publish_management_nics {
        return Vec::new();
    }
    inventory
        .nics
        .iter()
        .filter_map(|nic| {
            Some(LeftOutNic {
                device: names::nic_device_name(&nic.pci.address),
                if_name: nic.if_name().map(str::to_string),
                reason: management_reason(nic, options, network)?,
            })
        })
        .collect()
}

/// Loopback and link-local addresses say nothing about the fabric a NIC sits on.
fn is_fabric_address(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unicast_link_local()
                && !v6.is_unspecified()
                && !v6.is_multicast()
        }
    }
}

/// `s` cut to at most 64 bytes on a character boundary.
pub fn bounded_string(s: &str) -> String {
    if s.len() <= MAX_ATTRIBUTE_STRING {
        return s.to_string();
    }
    let mut end = MAX_ATTRIBUTE_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn string_attribute(value: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(bounded_string(value)),
        ..Default::default()
    }
}

fn int_attribute(value: i64) -> DeviceAttribute {
    DeviceAttribute {
        int: Some(value),
        ..Default::default()
    }
}

fn bool_attribute(value: bool) -> DeviceAttribute {
    DeviceAttribute {
        bool: Some(value),
        ..Default::default()
    }
}

/// `80Gi` when the byte count is a whole number of GiB, else the plain byte count.
fn bytes_quantity(bytes: u64) -> Quantity {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        Quantity(format!("{}Gi", bytes / GIB))
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        Quantity(format!("{}Mi", bytes / MIB))
    } else {
        Quantity(bytes.to_string())
    }
}

/// The taint a health issue publishes.
pub fn health_taint(driver: &str, issue: HealthIssue) -> DeviceTaint {
    let key = match issue {
        HealthIssue::LinkDown => names::TAINT_LINK_DOWN,
        HealthIssue::PcieFatal => names::TAINT_PCIE_FATAL,
    };
    DeviceTaint {
        key: names::driver_qualified(driver, key),
        effect: "NoSchedule".into(),
        ..Default::default()
    }
}

/// The taint of a device that vanished from the PCI bus: running pods lose it anyway.
pub fn gone_taint(driver: &str) -> DeviceTaint {
    DeviceTaint {
        key: names::driver_qualified(driver, names::TAINT_GONE),
        effect: "NoExecute".into(),
        ..Default::default()
    }
}

/// Facts every device carries, whatever its kind.
struct CommonFacts<'a> {
    pci: &'a PciFunction,
    kind: &'static str,
    model: String,
    pair_group: Option<&'a String>,
    paired_with: Option<(String, &'static str)>,
    /// The accelerator whose NIC set this device is (or heads), and the set's size.
    pair_set: Option<(String, usize)>,
}

struct Attributes<'a> {
    driver: &'a str,
    map: BTreeMap<String, DeviceAttribute>,
}

impl Attributes<'_> {
    fn set(&mut self, id: &str, value: DeviceAttribute) {
        self.map
            .insert(names::driver_qualified(self.driver, id), value);
    }
}

fn vendor_of(pci: &PciFunction) -> String {
    pci.vendor_name
        .clone()
        .unwrap_or_else(|| format!("{:04x}", pci.vendor_id))
}

fn common_attributes<'a>(driver: &'a str, facts: &CommonFacts<'_>) -> Attributes<'a> {
    let mut attrs = Attributes {
        driver,
        map: BTreeMap::new(),
    };
    attrs.set(names::ATTR_KIND, string_attribute(facts.kind));
    attrs.set(names::ATTR_VENDOR, string_attribute(&vendor_of(facts.pci)));
    attrs.set(names::ATTR_MODEL, string_attribute(&facts.model));
    if let Some(numa) = facts.pci.numa_node {
        attrs.set(names::ATTR_NUMA_NODE, int_attribute(i64::from(numa)));
    }
    if let Some(switch) = nearest_switch(facts.pci) {
        attrs.set(
            names::ATTR_PCIE_SWITCH,
            string_attribute(&switch.to_string()),
        );
    }
    if let Some(group) = facts.pair_group {
        attrs.set(names::ATTR_PAIR_GROUP, string_attribute(group));
    }
    if let Some((peer, affinity)) = &facts.paired_with {
        attrs.set(names::ATTR_PAIRED_WITH, string_attribute(peer));
        attrs.set(names::ATTR_PAIR_AFFINITY, string_attribute(affinity));
    }
    if let Some((set, size)) = &facts.pair_set {
        attrs.set(names::ATTR_PAIR_SET, string_attribute(set));
        if facts.kind == names::KIND_GPU {
            let size = i64::try_from(*size).unwrap_or(i64::MAX);
            attrs.set(names::ATTR_PAIRED_NIC_COUNT, int_attribute(size));
        }
    }
    attrs.map.insert(
        names::ATTR_PCIE_ROOT.into(),
        string_attribute(&facts.pci.pcie_root),
    );
    attrs.map.insert(
        names::ATTR_PCI_BUS_ID.into(),
        string_attribute(&facts.pci.address.to_string()),
    );
    attrs
}

fn taints_for(
    driver: &str,
    device: DeviceRef<'_>,
    options: &SliceOptions,
) -> Option<Vec<DeviceTaint>> {
    if !options.device_taints {
        return None;
    }
    let mut issues = device_issues(device);
    issues.sort();
    issues.dedup();
    let taints: Vec<DeviceTaint> = issues
        .into_iter()
        .map(|i| health_taint(driver, i))
        .collect();
    (!taints.is_empty()).then_some(taints)
}

fn accelerator_device(
    driver: &str,
    accelerator: &Accelerator,
    common: CommonFacts<'_>,
    options: &SliceOptions,
) -> Device {
    let mut attrs = common_attributes(driver, &common);
    if let Some(uuid) = &accelerator.uuid {
        attrs.set(names::ATTR_UUID, string_attribute(uuid));
    }
    let capacity = accelerator.memory_bytes.map(|bytes| {
        BTreeMap::from([(
            names::driver_qualified(driver, names::CAPACITY_MEMORY),
            DeviceCapacity {
                value: bytes_quantity(bytes),
                ..Default::default()
            },
        )])
    });
    Device {
        name: names::accelerator_device_name(&accelerator.pci.address),
        attributes: Some(attrs.map),
        capacity,
        taints: taints_for(driver, DeviceRef::Accelerator(accelerator), options),
        ..Default::default()
    }
}

fn nic_device(
    driver: &str,
    nic: &Nic,
    common: CommonFacts<'_>,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Device {
    let mut attrs = common_attributes(driver, &common);
    if let Some(if_name) = nic.if_name() {
        attrs.set(names::ATTR_IF_NAME, string_attribute(if_name));
        if let Some(subnet) = network.subnet_of(if_name) {
            let subnet = subnet.to_string();
            attrs.set(names::ATTR_SUBNET, string_attribute(&subnet));
            let rail = network
                .rails
                .as_ref()
                .and_then(|data| rail_for_subnet(data, &subnet));
            if let Some(rail) = rail {
                attrs.set(names::ATTR_RAIL, int_attribute(rail));
            }
        }
    }
    attrs.set(names::ATTR_RDMA, bool_attribute(nic.is_rdma()));
    attrs.set(names::ATTR_ROLE, string_attribute(nic.role().as_str()));
    let first_port = nic.rdma.as_ref().and_then(|r| r.ports.first());
    if let Some(rdma) = &nic.rdma {
        attrs.set(names::ATTR_RDMA_DEVICE, string_attribute(&rdma.name));
    }
    if let Some(layer) = first_port.and_then(|p| p.link_layer.as_deref()) {
        attrs.set(names::ATTR_LINK_LAYER, string_attribute(layer));
    }
    let speed_gbps = first_port.and_then(|p| p.rate_gbps).or_else(|| {
        nic.netdevs
            .first()
            .and_then(|n| n.speed_mbps)
            .map(|mbps| mbps / 1000)
    });
    if let Some(gbps) = speed_gbps.and_then(|g| i64::try_from(g).ok()) {
        attrs.set(names::ATTR_LINK_SPEED_GBPS, int_attribute(gbps));
    }
    if let Some(mac) = nic.netdevs.first().and_then(|n| n.mac.as_deref()) {
        attrs.set(names::ATTR_MAC, string_attribute(mac));
    }
    Device {
        name: names::nic_device_name(&nic.pci.address),
        attributes: Some(attrs.map),
        taints: taints_for(driver, DeviceRef::Nic(nic), options),
        ..Default::default()
    }
}

fn nic_model(pci: &PciFunction) -> String {
    pci.device_name
        .clone()
        .unwrap_or_else(|| format!("{:04x}:{:04x}", pci.vendor_id, pci.device_id))
}

/// Every device of the inventory, sorted by name (accelerators first, then by address).
pub fn build_devices(inventory: &Inventory, driver: &str, options: &SliceOptions) -> Vec<Device> {
    build_devices_with_network(inventory, driver, options, &NetworkFacts::default())
}

/// [`build_devices`], with NIC subnets and rails from `network`, and without the NICs that
/// carry the node IP or a default route (see [`build_devices_leaving_out`]).
pub fn build_devices_with_network(
    inventory: &Inventory,
    driver: &str,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Vec<Device> {
    build_devices_leaving_out(inventory, driver, options, network).0
}

/// The devices, and the management NICs left out of them. Pairing runs without those NICs
/// too, so no published GPU names a peer that is not published.
pub fn build_devices_leaving_out(
    inventory: &Inventory,
    driver: &str,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> (Vec<Device>, Vec<LeftOutNic>) {
    let left_out = management_nics(inventory, options, network);
    // Published management NICs are frontends: the role says so, and pairing takes them
    // only when no compute-fabric NIC is left (the same knowledge that leaves them out).
    let published_management: Vec<(PciAddress, ManagementReason)> = if options
        .publish_management_nics
    {
        inventory
            .nics
            .iter()
            .filter_map(|nic| Some((nic.pci.address, management_reason(nic, options, network)?)))
            .collect()
    } else {
        Vec::new()
    };
    let inventory = if left_out.is_empty() && published_management.is_empty() {
        Cow::Borrowed(inventory)
    } else {
        let mut kept = inventory.clone();
        kept.nics.retain(|nic| {
            let name = names::nic_device_name(&nic.pci.address);
            !left_out.iter().any(|l| l.device == name)
        });
        for nic in &mut kept.nics {
            if let Some((_, reason)) = published_management
                .iter()
                .find(|(address, _)| *address == nic.pci.address)
                && nic.frontend.is_none()
            {
                nic.frontend = Some(reason.to_string());
            }
        }
        Cow::Owned(kept)
    };
    (devices_of(&inventory, driver, options, network), left_out)
}

fn devices_of(
    inventory: &Inventory,
    driver: &str,
    options: &SliceOptions,
    network: &NetworkFacts,
) -> Vec<Device> {
    let groups = pair_groups(inventory);
    let pairing = pair_node(inventory);
    // A NIC shared by several accelerators names the lowest-addressed one.
    let mut nic_peer: BTreeMap<PciAddress, (String, &'static str)> = BTreeMap::new();
    for pair in &pairing.pairs {
        nic_peer.entry(pair.nic).or_insert_with(|| {
            (
                names::accelerator_device_name(&pair.accelerator),
                pair.affinity.as_str(),
            )
        });
    }
    // NIC sets: every accelerator heads its own; a NIC shared by several accelerators
    // belongs to the lowest-addressed one's.
    let mut pair_set: BTreeMap<PciAddress, (String, usize)> = BTreeMap::new();
    for pair in pairing.primary_pairs() {
        let name = names::accelerator_device_name(&pair.accelerator);
        let size = pairing.nics_of(&pair.accelerator).count();
        pair_set.insert(pair.accelerator, (name.clone(), size));
        for member in pairing.nics_of(&pair.accelerator) {
            pair_set
                .entry(member.nic)
                .or_insert_with(|| (name.clone(), size));
        }
    }
    let mut devices = Vec::with_capacity(inventory.accelerators.len() + inventory.nics.len());
    for accelerator in &inventory.accelerators {
        let address = accelerator.pci.address;
        let common = CommonFacts {
            pci: &accelerator.pci,
            kind: names::KIND_GPU,
            model: accelerator.model.clone(),
            pair_group: groups.get(&address),
            paired_with: pairing
                .nic_for(&address)
                .map(|p| (names::nic_device_name(&p.nic), p.affinity.as_str())),
            pair_set: pair_set.get(&address).cloned(),
        };
        devices.push(accelerator_device(driver, accelerator, common, options));
    }
    for nic in &inventory.nics {
        let address = nic.pci.address;
        let common = CommonFacts {
            pci: &nic.pci,
            kind: names::KIND_NIC,
            model: nic_model(&nic.pci),
            pair_group: groups.get(&address),
            paired_with: nic_peer.get(&address).cloned(),
            pair_set: pair_set.get(&address).cloned(),
        };
        devices.push(nic_device(driver, nic, common, options, network));
    }
    // Names sort accelerators before NICs and each kind by address: the slice a device lands
    // in then depends only on which devices exist, not on how discovery ordered them.
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `<node>-<driver>-<index>` when that is a valid object name, else a stable hashed form:
/// a node name with a long last label plus the driver can overflow a DNS label.
pub fn slice_name(node: &str, driver: &str, index: usize) -> String {
    let candidate = format!("{node}-{}-{index}", driver.to_lowercase());
    if candidate.len() <= MAX_OBJECT_NAME && candidate.split('.').all(is_dns_label) {
        return candidate;
    }
    let readable: String = node
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let readable = readable.trim_matches('-');
    let hash = crate::hash::fnv1a64(format!("{node}/{driver}").as_bytes());
    if readable.is_empty() {
        format!("tandem-{hash:016x}-{index}")
    } else {
        format!("{readable}-{hash:016x}-{index}")
    }
}

/// Lays `devices` (already in their final order) out over slices of the node's pool.
/// Pool generation is left at 0: the publisher owns it.
pub fn build_slices_from_devices(
    devices: Vec<Device>,
    node: &NodeIdentity,
    driver: &str,
    options: &SliceOptions,
) -> Vec<ResourceSlice> {
    let per_slice = options.devices_per_slice();
    let mut chunks: Vec<Vec<Device>> = Vec::new();
    let mut devices = devices.into_iter().peekable();
    while devices.peek().is_some() {
        chunks.push(devices.by_ref().take(per_slice).collect());
    }
    if chunks.is_empty() {
        // An empty slice still tells the scheduler this node's pool exists and is empty.
        chunks.push(Vec::new());
    }
    let count = chunks.len() as i64;
    let owner = (!node.uid.is_empty()).then(|| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.name.clone(),
            uid: node.uid.clone(),
            controller: Some(true),
            ..Default::default()
        }]
    });
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, chunk)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(&node.name, driver, index)),
                owner_references: owner.clone(),
                ..Default::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_string(),
                node_name: Some(node.name.clone()),
                pool: ResourcePool {
                    name: node.name.clone(),
                    generation: 0,
                    resource_slice_count: count,
                },
                devices: Some(chunk),
                ..Default::default()
            },
        })
        .collect()
}

/// The node's ResourceSlices for `inventory`.
pub fn build_slices(
    inventory: &Inventory,
    node: &NodeIdentity,
    driver: &str,
    options: &SliceOptions,
) -> Vec<ResourceSlice> {
    build_slices_from_devices(
        build_devices(inventory, driver, options),
        node,
        driver,
        options,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_cut_on_character_boundaries() {
        assert_eq!(bounded_string("short"), "short");
        let long = "é".repeat(40); // 80 bytes
        let cut = bounded_string(&long);
        assert!(cut.len() <= 64 && cut.len() >= 63, "{}", cut.len());
        assert!(long.starts_with(&cut));
        assert_eq!(bounded_string(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn slice_names_are_valid_and_stable() {
        assert_eq!(slice_name("node-a", "tandem.dev", 3), "node-a-tandem.dev-3");
        let long_label = format!("n{}", "x".repeat(60));
        let name = slice_name(&long_label, "tandem.dev", 0);
        assert!(name.split('.').all(is_dns_label), "{name}");
        assert_eq!(name, slice_name(&long_label, "tandem.dev", 0));
        assert_ne!(name, slice_name(&long_label, "other.dev", 0));
        let huge = vec!["abc"; 80].join(".");
        let name = slice_name(&huge, "tandem.dev", 1);
        assert!(
            name.len() <= 253 && name.split('.').all(is_dns_label),
            "{name}"
        );
    }

    #[test]
    fn quantities_use_binary_units_when_exact() {
        assert_eq!(bytes_quantity(80 << 30).0, "80Gi");
        assert_eq!(bytes_quantity(1536 << 20).0, "1536Mi");
        assert_eq!(bytes_quantity(1000).0, "1000");
    }

    fn facts(addresses: &[(&str, &[&str])], rails: Option<&[(&str, &str)]>) -> NetworkFacts {
        NetworkFacts {
            default_routes: BTreeSet::new(),
            upper_interfaces: BTreeMap::new(),
            addresses: addresses
                .iter()
                .map(|(name, list)| {
                    (
                        name.to_string(),
                        list.iter().map(|a| a.to_string()).collect(),
                    )
                })
                .collect(),
            rails: rails.map(|r| {
                r.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
        }
    }

    #[test]
    fn subnet_is_the_kernel_prefix_of_the_first_fabric_address() {
        let network = facts(
            &[
                ("eth24", &["192.168.1.5/24"]),
                // GKE gives each NIC a /32: the /32 is what every node agrees on.
                ("gpu0rdma0", &["10.128.0.17/32"]),
                ("ib6", &["fe80::1/64", "fd00:1:2:3::9/64"]),
                ("ib7", &["fe80::2/64", "2001:db8:7::4/64", "172.16.7.2/16"]),
                ("link-local-only", &["169.254.3.3/16", "fe80::3/64"]),
            ],
            None,
        );
        let subnet = |name| network.subnet_of(name).map(|s| s.to_string());
        assert_eq!(subnet("eth24").as_deref(), Some("192.168.1.0/24"));
        assert_eq!(subnet("gpu0rdma0").as_deref(), Some("10.128.0.17/32"));
        assert_eq!(subnet("ib6").as_deref(), Some("fd00:1:2:3::/64"));
        assert_eq!(
            subnet("ib7").as_deref(),
            Some("172.16.0.0/16"),
            "IPv4 first"
        );
        assert_eq!(subnet("link-local-only"), None);
        assert_eq!(subnet("absent"), None);
    }

    #[test]
    fn nics_with_addresses_publish_subnet_and_rail() {
        let dir = crate::fixture::scratch_dir().unwrap();
        let machine = crate::fixture::builtin("dgx-h100").unwrap();
        let roots = crate::fixture::write_machine(&machine, dir.path()).unwrap();
        let inventory = crate::sysfs::discover(&roots).unwrap();
        let mut names_of_nics: Vec<&str> =
            inventory.nics.iter().filter_map(|n| n.if_name()).collect();
        names_of_nics.truncate(3);
        let [first, second, third] = names_of_nics[..] else {
            panic!("dgx-h100 has fewer than 3 named NICs");
        };
        let network = facts(
            &[
                (first, &["192.168.1.5/24"]),
                (second, &["192.168.2.5/24"]),
                (third, &["fd00:3::5/64"]),
            ],
            // Rail keys as the controller writes them; the third subnet has no rail yet.
            Some(&[("192.168.1.0_24", "0"), ("192.168.2.0_24", "1")]),
        );
        let devices = build_devices_with_network(
            &inventory,
            "tandem.dev",
            &SliceOptions::default(),
            &network,
        );
        let attrs_of = |if_name: &str| {
            devices
                .iter()
                .filter_map(|d| d.attributes.as_ref())
                .find(|a| {
                    a.get("tandem.dev/ifName").and_then(|v| v.string.as_deref()) == Some(if_name)
                })
                .unwrap()
                .clone()
        };
        let subnet = |a: &BTreeMap<String, DeviceAttribute>| {
            a.get("tandem.dev/subnet").and_then(|v| v.string.clone())
        };
        let rail =
            |a: &BTreeMap<String, DeviceAttribute>| a.get("tandem.dev/rail").and_then(|v| v.int);
        let a = attrs_of(first);
        assert_eq!(
            (subnet(&a).as_deref(), rail(&a)),
            (Some("192.168.1.0/24"), Some(0))
        );
        let b = attrs_of(second);
        assert_eq!(
            (subnet(&b).as_deref(), rail(&b)),
            (Some("192.168.2.0/24"), Some(1))
        );
        let c = attrs_of(third);
        assert_eq!(
            (subnet(&c).as_deref(), rail(&c)),
            (Some("fd00:3::/64"), None)
        );
        let without = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
        assert!(
            without
                .iter()
                .filter_map(|d| d.attributes.as_ref())
                .all(|a| {
                    !a.contains_key("tandem.dev/subnet") && !a.contains_key("tandem.dev/rail")
                })
        );

        // No rail ConfigMap: subnets only.
        let no_rails = NetworkFacts {
            rails: None,
            ..network
        };
        let devices = build_devices_with_network(
            &inventory,
            "tandem.dev",
            &SliceOptions::default(),
            &no_rails,
        );
        assert!(
            devices
                .iter()
                .filter_map(|d| d.attributes.as_ref())
                .all(|a| !a.contains_key("tandem.dev/rail"))
        );
        assert_eq!(
            devices
                .iter()
                .filter_map(|d| d.attributes.as_ref())
                .filter(|a| a.contains_key("tandem.dev/subnet"))
                .count(),
            3
        );
    }

    #[test]
    fn per_slice_limit_depends_on_taints() {
        let plain = SliceOptions {
            device_taints: false,
            max_devices_per_slice: 500,
            ..Default::default()
        };
        assert_eq!(plain.devices_per_slice(), 128);
        let tainted = SliceOptions {
            device_taints: true,
            max_devices_per_slice: 128,
            ..Default::default()
        };
        assert_eq!(tainted.devices_per_slice(), 64);
        let tiny = SliceOptions {
            device_taints: false,
            max_devices_per_slice: 0,
            ..Default::default()
        };
        assert_eq!(tiny.devices_per_slice(), 1);
    }

    fn machine(name: &str) -> Inventory {
        let dir = crate::fixture::scratch_dir().unwrap();
        let roots =
            crate::fixture::write_machine(&crate::fixture::builtin(name).unwrap(), dir.path())
                .unwrap();
        crate::sysfs::discover(&roots).unwrap()
    }

    fn nic_named<'a>(inventory: &'a Inventory, if_name: &str) -> &'a Nic {
        inventory
            .nics
            .iter()
            .find(|n| n.if_name() == Some(if_name))
            .unwrap_or_else(|| panic!("no {if_name}"))
    }

    fn device_names(devices: &[Device]) -> Vec<&str> {
        devices.iter().map(|d| d.name.as_str()).collect()
    }

    fn paired_with(devices: &[Device], name: &str) -> Option<String> {
        devices
            .iter()
            .find(|d| d.name == name)?
            .attributes
            .as_ref()?
            .get("tandem.dev/pairedWith")?
            .string
            .clone()
    }

    #[test]
    fn the_nic_carrying_the_default_route_is_left_out_unless_asked_for() {
        // The reported node: no accelerator, no RDMA NIC, just the VM's eth0 with the
        // default route (gke-a4's gVNIC without the rest of the machine).
        let mut inventory = machine("gke-a4");
        inventory.accelerators.clear();
        inventory.nics.retain(|n| !n.is_rdma());
        let eth0 = names::nic_device_name(&nic_named(&inventory, "eth0").pci.address);
        let mut network = facts(&[("eth0", &["10.128.0.5/32"])], None);
        network.default_routes.insert("eth0".into());

        let options = SliceOptions::default();
        let (devices, left_out) =
            build_devices_leaving_out(&inventory, "tandem.dev", &options, &network);
        assert!(devices.is_empty(), "{:?}", device_names(&devices));
        assert_eq!(
            left_out,
            [LeftOutNic {
                device: eth0.clone(),
                if_name: Some("eth0".into()),
                reason: ManagementReason::DefaultRoute { via: "eth0".into() },
            }]
        );
        assert_eq!(
            left_out[0].reason.to_string(),
            "the default route leaves through eth0"
        );
        let slices = build_slices_from_devices(
            devices,
            &NodeIdentity {
                name: "vm".into(),
                uid: String::new(),
            },
            "tandem.dev",
            &options,
        );
        assert_eq!(slices.len(), 1, "the pool exists, empty");
        assert_eq!(slices[0].spec.devices.as_ref().map(Vec::len), Some(0));

        let asked = SliceOptions {
            publish_management_nics: true,
            ..SliceOptions::default()
        };
        let (devices, left_out) =
            build_devices_leaving_out(&inventory, "tandem.dev", &asked, &network);
        assert_eq!(device_names(&devices), [eth0.as_str()]);
        assert!(left_out.is_empty());
    }

    #[test]
    fn the_nic_holding_the_node_ip_is_left_out_and_the_rdma_nics_are_untouched() {
        let inventory = machine("gke-a4");
        let eth0 = names::nic_device_name(&nic_named(&inventory, "eth0").pci.address);
        let all = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
        for node_ip in ["10.128.0.5", "fd00:10::5"] {
            let options = SliceOptions {
                node_ip: Some(node_ip.parse().unwrap()),
                ..SliceOptions::default()
            };
            // No default route at all (a node routed by BGP, say): the node IP decides.
            let network = facts(
                &[("eth0", &["10.128.0.5/32", "fd00:10::5/64", "fe80::1/64"])],
                None,
            );
            let (devices, left_out) =
                build_devices_leaving_out(&inventory, "tandem.dev", &options, &network);
            assert_eq!(left_out.len(), 1, "{left_out:?}");
            assert_eq!(left_out[0].device, eth0);
            assert_eq!(
                left_out[0].reason,
                ManagementReason::NodeIp {
                    via: "eth0".into(),
                    ip: node_ip.parse().unwrap()
                }
            );
            // Every other device is exactly what it was, pairing attributes included.
            let expected: Vec<&Device> = all.iter().filter(|d| d.name != eth0).collect();
            assert_eq!(devices.iter().collect::<Vec<_>>(), expected, "{node_ip}");
        }
        // A node IP that no interface holds leaves everything in.
        let elsewhere = SliceOptions {
            node_ip: Some("192.0.2.1".parse().unwrap()),
            ..SliceOptions::default()
        };
        let network = facts(&[("eth0", &["10.128.0.5/32"])], None);
        assert!(management_nics(&inventory, &elsewhere, &network).is_empty());
        assert_eq!(
            build_devices_with_network(&inventory, "tandem.dev", &elsewhere, &network).len(),
            all.len()
        );
    }

    #[test]
    fn a_nic_under_a_bridge_or_vlan_that_holds_the_node_ip_is_left_out() {
        let inventory = machine("gke-a4");
        let rdma1 = names::nic_device_name(&nic_named(&inventory, "gpu1rdma0").pci.address);
        let options = SliceOptions {
            node_ip: Some("10.0.0.7".parse().unwrap()),
            ..SliceOptions::default()
        };
        // gpu1rdma0 is a port of br0; the node IP sits on a VLAN on br0.
        let mut network = facts(&[("br0.100", &["10.0.0.7/24"])], None);
        network.upper_interfaces = BTreeMap::from([
            ("gpu1rdma0".to_string(), BTreeSet::from(["br0".to_string()])),
            ("br0".to_string(), BTreeSet::from(["br0.100".to_string()])),
            // A loop in the facts must not hang the builder.
            (
                "br0.100".to_string(),
                BTreeSet::from(["gpu1rdma0".to_string()]),
            ),
        ]);
        let left_out = management_nics(&inventory, &options, &network);
        assert_eq!(left_out.len(), 1, "{left_out:?}");
        assert_eq!(left_out[0].device, rdma1);
        assert_eq!(
            left_out[0].reason.to_string(),
            "br0.100 holds the node IP 10.0.0.7"
        );
    }

    #[test]
    fn a_gpu_is_not_paired_with_a_management_nic_that_is_not_published() {
        // The workstation pairs its GPU with the only (plain) NIC, which carries the default
        // route: left out, the GPU must not name it as its peer.
        let inventory = machine("workstation");
        let nic = names::nic_device_name(&nic_named(&inventory, "enp5s0").pci.address);
        let gpu = names::accelerator_device_name(&inventory.accelerators[0].pci.address);
        let mut network = NetworkFacts::default();
        network.default_routes.insert("enp5s0".into());
        let asked = SliceOptions {
            publish_management_nics: true,
            ..SliceOptions::default()
        };
        let published = build_devices_with_network(&inventory, "tandem.dev", &asked, &network);
        assert_eq!(paired_with(&published, &gpu), Some(nic.clone()));

        let devices = build_devices_with_network(
            &inventory,
            "tandem.dev",
            &SliceOptions::default(),
            &network,
        );
        assert_eq!(device_names(&devices), [gpu.as_str()]);
        assert_eq!(paired_with(&devices, &gpu), None);
        assert!(
            !devices[0]
                .attributes
                .as_ref()
                .unwrap()
                .contains_key("tandem.dev/pairGroup")
        );
    }

    fn attr<'a>(devices: &'a [Device], name: &str, id: &str) -> Option<&'a DeviceAttribute> {
        devices
            .iter()
            .find(|d| d.name == name)?
            .attributes
            .as_ref()?
            .get(&format!("tandem.dev/{id}"))
    }

    #[test]
    fn nics_carry_their_role_and_a_published_management_nic_is_paired_last() {
        // Azure ND H100 v5: the accelerated-networking VF is a frontend by sysfs alone.
        let inventory = machine("azure-nd-h100-v5");
        let devices = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
        let role = |name: &str| attr(&devices, name, "role").and_then(|a| a.string.clone());
        assert_eq!(role("nic-00b5-00-02-0").as_deref(), Some("frontend"));
        assert_eq!(role("nic-0101-00-00-0").as_deref(), Some("fabric"));
        assert_eq!(attr(&devices, "nic-00b5-00-02-0", "pairedWith"), None);

        // A RoCE port that carries the default route, published on request: a frontend,
        // so the GPU of its switch takes it only if no fabric NIC is left. On gke-a4 each
        // switch has two GPUs and two NICs, so GPU 0 then goes to a fabric NIC elsewhere.
        let inventory = machine("gke-a4");
        let rdma0 = nic_named(&inventory, "gpu0rdma0");
        let rdma0_name = names::nic_device_name(&rdma0.pci.address);
        let mut network = NetworkFacts::default();
        network.default_routes.insert("gpu0rdma0".into());
        let asked = SliceOptions {
            publish_management_nics: true,
            ..SliceOptions::default()
        };
        let devices = build_devices_with_network(&inventory, "tandem.dev", &asked, &network);
        assert_eq!(
            attr(&devices, &rdma0_name, "role").and_then(|a| a.string.as_deref()),
            Some("frontend")
        );
        assert_eq!(attr(&devices, &rdma0_name, "pairedWith"), None);
        let paired: Vec<String> = devices
            .iter()
            .filter(|d| d.name.starts_with("gpu-"))
            .filter_map(|d| {
                d.attributes
                    .as_ref()?
                    .get("tandem.dev/pairedWith")?
                    .string
                    .clone()
            })
            .collect();
        assert_eq!(paired.len(), 8, "every GPU still paired: {paired:?}");
        assert!(!paired.contains(&rdma0_name));
    }

    #[test]
    fn a_gpu_and_its_nic_set_share_pair_set() {
        let inventory = machine("aws-p5");
        let devices = build_devices(&inventory, "tandem.dev", &SliceOptions::default());
        let gpu = names::accelerator_device_name(&inventory.accelerators[0].pci.address);
        assert_eq!(
            attr(&devices, &gpu, "pairedNicCount").and_then(|a| a.int),
            Some(4)
        );
        let members: Vec<&str> = devices
            .iter()
            .filter(|d| {
                d.attributes
                    .as_ref()
                    .and_then(|a| a.get("tandem.dev/pairSet"))
                    .and_then(|v| v.string.as_deref())
                    == Some(gpu.as_str())
            })
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(members.len(), 5, "the GPU and its four EFA: {members:?}");
        assert!(members[1..].iter().all(|m| m.starts_with("nic-")));
        for nic in &members[1..] {
            assert_eq!(
                attr(&devices, nic, "pairedWith").and_then(|a| a.string.as_deref()),
                Some(gpu.as_str())
            );
            assert_eq!(
                attr(&devices, nic, "role").and_then(|a| a.string.as_deref()),
                Some("fabric")
            );
        }
        // The ENA is no fabric NIC and in no set.
        assert_eq!(
            attr(&devices, "nic-0000-00-05-0", "role").and_then(|a| a.string.as_deref()),
            Some("frontend")
        );
        assert_eq!(attr(&devices, "nic-0000-00-05-0", "pairSet"), None);
    }
}
