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
use std::collections::BTreeMap;
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
}

impl Default for SliceOptions {
    fn default() -> Self {
        Self {
            device_taints: false,
            max_devices_per_slice: MAX_DEVICES_PER_SLICE,
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
/// netdev (`192.168.1.5/24` as the kernel reports them, read over netlink) and the rail
/// ConfigMap's data, when the controller has written one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkFacts {
    /// ifName → addresses with the prefix length the kernel holds for them.
    pub addresses: BTreeMap<String, Vec<String>>,
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

/// [`build_devices`], with NIC subnets and rails from `network`.
pub fn build_devices_with_network(
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
        };
        assert_eq!(plain.devices_per_slice(), 128);
        let tainted = SliceOptions {
            device_taints: true,
            max_devices_per_slice: 128,
        };
        assert_eq!(tainted.devices_per_slice(), 64);
        let tiny = SliceOptions {
            device_taints: false,
            max_devices_per_slice: 0,
        };
        assert_eq!(tiny.devices_per_slice(), 1);
    }
}
