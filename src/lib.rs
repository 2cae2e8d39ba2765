//! Tandem: a Kubernetes DRA driver that hands out accelerators together with the RDMA NIC
//! closest to each of them.

pub mod fixture;
pub mod names;
pub mod sysfs;
pub mod topology;
