//! The node's devices and topology: the pure core's `topology` (Inventory, affinity, pairing,
//! pair groups), plus how the node agent hands each rescan's Inventory around.

pub use tandem_core::topology::*;

/// The latest inventory, as rescans publish it. Readers clone the Arc and never block a rescan.
pub type InventoryWatch = tokio::sync::watch::Receiver<std::sync::Arc<Inventory>>;
