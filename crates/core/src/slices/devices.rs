//! One DRA Device per accelerator and NIC: attributes for pairing, topology, subnet and rail,
//! capacities and health taints, in the fixed order that keeps slices stable.

use super::management::{
    LeftOutNic, ManagementReason, NetworkFacts, management_nics, management_reason,
};
use super::{MAX_ATTRIBUTE_STRING, SliceOptions};
use crate::names;
use crate::rails::rail_for_subnet;
use crate::topology::{
    Accelerator, DeviceRef, HealthIssue, Inventory, Nic, PciAddress, PciFunction, device_issues,
    nearest_switch, pair_groups, pair_node,
};
use k8s_openapi::api::resource::v1::{Device, DeviceAttribute, DeviceCapacity, DeviceTaint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::borrow::Cow;
use std::collections::BTreeMap;

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
pub(super) fn bytes_quantity(bytes: u64) -> Quantity {
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
