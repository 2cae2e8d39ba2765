//! The node's device topology as plain data: the Inventory, PCI addresses, affinity levels,
//! the GPU-NIC pairing and pair groups. Pure functions only; no I/O.

pub mod address;
pub mod affinity;
pub mod groups;
pub mod health;
pub mod inventory;
pub mod pairing;

pub use address::PciAddress;
pub use affinity::{Affinity, affinity, nearest_switch};
pub use groups::pair_groups;
pub use health::{HealthIssue, device_issues};
pub use inventory::*;
pub use pairing::{Pair, Pairing, pair_devices, pair_node};

#[cfg(test)]
mod tests;
