//! Tandem's test doubles, in a crate of their own so that the node agent's binary cannot link
//! them: the tests, the benches and `tandem demo` (the `tandem` package's default `demo`
//! feature) use them; the node image is built without.

/// The apiserver stand-in: resourceVersion, conflicts, watches, field selectors, server-side
/// apply and the real validation limits, served over HTTP for a kube client.
pub mod apiserver_fake;
/// Built-in fixture machines (sysfs/procfs/devfs trees shaped like real ones): tests, benches,
/// `tandem demo`, `tandem fixture` and `tandem topo --fixture`.
pub mod fixture;
