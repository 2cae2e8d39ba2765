//! The node's device topology as plain data: the Inventory, PCI addresses, affinity levels,
//! the GPU-NIC pairing and pair groups. Pure functions only; no I/O.

pub mod address;
pub mod inventory;

pub use address::PciAddress;
pub use inventory::*;
