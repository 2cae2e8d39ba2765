//! The kubelet-facing node agent: plugin registration, the DRA gRPC services (v1 and
//! v1beta1 over one handler), the device health stream, and the Unix sockets they live on.

pub mod authority;
pub mod client;
pub mod config;
pub mod dra_service;
pub mod health;
pub mod metrics;
pub mod netattach_reconcile;
pub mod proto;
pub mod registration;
pub mod server;
pub mod sockets;

pub use config::PluginConfig;
pub use dra_service::ClaimPreparer;
pub use server::{RunningPlugin, ServeError, start};
