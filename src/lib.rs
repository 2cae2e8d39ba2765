//! Tandem: a Kubernetes DRA driver that hands out accelerators together with the RDMA NIC
//! closest to each of them.

pub mod apiserver_fake;
pub mod cli;
pub mod controller;
pub mod fixture;
pub mod hash;
pub mod metrics_http;
pub mod names;
pub mod netattach;
pub mod plugin;
pub mod prepare;
pub mod slices;
pub mod sysfs;
pub mod topology;
