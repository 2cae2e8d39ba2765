//! Tandem's pure core: the node's devices and topology as plain data and the decisions made
//! on it (affinity levels, the GPU-NIC pairing, pair groups), the names other people depend
//! on, and the small parsers the machine reader shares with the fixture writer. No tokio, no
//! kube client, no filesystem: everything here takes data and returns data.

pub mod cpulist;
pub mod hash;
pub mod machine_roots;
pub mod names;
pub mod rails;
pub mod slices;
pub mod topology;
