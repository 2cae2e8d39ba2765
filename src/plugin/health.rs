//! What the kubelet's device health stream reports for this node: every accelerator and NIC
//! of the inventory under its slice device name, unhealthy with the reasons
//! `topology::health` finds.

use std::sync::Arc;

use tandem_kubelet_plugin::{DeviceHealthFeed, DeviceState};

use crate::names;
use crate::topology::{DeviceRef, HealthIssue, Inventory, InventoryWatch, device_issues};

/// The health stream's feed: each rescan's inventory.
pub fn inventory_health_feed(inventory: InventoryWatch) -> DeviceHealthFeed<Arc<Inventory>> {
    DeviceHealthFeed::new(inventory, |inventory: &Arc<Inventory>| {
        device_states(inventory)
    })
}

/// Every device of `inventory` with its health.
pub fn device_states(inventory: &Inventory) -> Vec<DeviceState> {
    let accelerators = inventory.accelerators.iter().map(|a| {
        (
            names::accelerator_device_name(&a.pci.address),
            DeviceRef::Accelerator(a),
        )
    });
    let nics = inventory
        .nics
        .iter()
        .map(|n| (names::nic_device_name(&n.pci.address), DeviceRef::Nic(n)));
    accelerators
        .chain(nics)
        .map(|(device_name, device)| {
            let issues = device_issues(device);
            DeviceState {
                device_name,
                problem: (!issues.is_empty()).then(|| describe(&issues)),
            }
        })
        .collect()
}

fn describe(issues: &[HealthIssue]) -> String {
    issues
        .iter()
        .map(|issue| match issue {
            HealthIssue::LinkDown => "link down (RDMA port not ACTIVE or netdev down)",
            HealthIssue::PcieFatal => "fatal PCIe (AER) errors reported",
        })
        .collect::<Vec<_>>()
        .join("; ")
}
