//! Device health as the node itself can see it: link state of NICs and fatal PCIe errors.
//! A device that vanished is decided by comparing inventories over time, elsewhere.

use super::inventory::DeviceRef;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthIssue {
    /// An RDMA port that is not ACTIVE, or a netdev that is down.
    LinkDown,
    /// The AER fatal error counter is above zero (counters start at zero every boot).
    PcieFatal,
}

/// What is wrong with a device right now; empty when it is healthy.
pub fn device_issues(device: DeviceRef<'_>) -> Vec<HealthIssue> {
    let mut issues = Vec::new();
    if let DeviceRef::Nic(nic) = device {
        let port_down = nic.rdma.as_ref().is_some_and(|r| {
            r.ports
                .iter()
                .any(|p| p.state.as_deref().is_some_and(|s| s != "ACTIVE"))
        });
        let netdev_down = nic
            .netdevs
            .iter()
            .any(|n| n.operstate.as_deref().is_some_and(operstate_is_down));
        if port_down || netdev_down {
            issues.push(HealthIssue::LinkDown);
        }
    }
    if device.pci().aer_fatal.is_some_and(|n| n > 0) {
        issues.push(HealthIssue::PcieFatal);
    }
    issues
}

/// `unknown` is not down: some drivers never report a state, and their links still work.
fn operstate_is_down(state: &str) -> bool {
    matches!(state, "down" | "lowerlayerdown" | "notpresent" | "dormant")
}
