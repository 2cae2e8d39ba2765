//! ResourceSlices for this node: building them from the Inventory (pure), and rebuilding them
//! when the machine changes. Publishing them with the fewest apiserver writes is the
//! kubelet-plugin crate's `Publisher`.

/// Slice building lives in the pure core.
pub use tandem_core::slices as build;
#[cfg(test)]
mod build_tests;
pub mod network;
pub mod rescan;

pub use build::{
    LeftOutNic, ManagementReason, NetworkFacts, NodeIdentity, SliceOptions, build_devices,
    build_devices_leaving_out, build_devices_with_network, build_slices, build_slices_from_devices,
    management_nics,
};
pub use rescan::{
    AttachedNics, GoneTracker, keep_attached_nics, run_rescans, run_slice_builder,
    spawn_link_watcher,
};
