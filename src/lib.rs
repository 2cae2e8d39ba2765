//! Tandem: a Kubernetes DRA driver that hands out accelerators together with the RDMA NIC
//! closest to each of them.

/// The apiserver stand-in of the tests, the benches and `tandem demo`; never in a node's binary.
#[cfg(any(test, feature = "demo"))]
pub use tandem_testkit::apiserver_fake;
pub mod cli;
pub mod controller;
pub use tandem_core::hash;
/// Built-in fixture machines (sysfs/procfs/devfs trees shaped like real ones): tests, benches,
/// `tandem demo`, `tandem fixture` and `tandem topo --fixture`; never in a node's binary.
#[cfg(any(test, feature = "demo"))]
pub use tandem_testkit::fixture;
/// Crash-safe file writes and removals (atomic replace, counted flushes), shared by claim
/// preparation and the netattach record.
pub(crate) mod fsutil;
pub mod metrics_http;
pub mod names;
pub mod netattach;
pub mod plugin;
pub mod prepare;
pub mod slices;
pub mod sysfs;
pub mod topology;
