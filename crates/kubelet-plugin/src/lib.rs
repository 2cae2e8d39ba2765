//! The kubelet side of a Kubernetes Dynamic Resource Allocation (DRA) driver, in Rust: what
//! Go drivers get from `k8s.io/dynamic-resource-allocation/kubeletplugin`. It knows nothing
//! of any device; a driver implements [`Driver`] and this crate does the rest:
//!
//! - **registration** with the kubelet's plugin watcher ([`registration`]), on a socket that
//!   accepts the `:authority` the kubelet really sends (a percent-encoded socket path, which
//!   the Rust `h2` server would otherwise reject; see [`authority`]);
//! - the **DRA gRPC services** `v1.DRAPlugin` and `v1beta1.DRAPlugin` over one handler
//!   ([`dra_service`]): every claim answered on its own, calls that survive the kubelet's
//!   cancellation, graceful drain on shutdown;
//! - the **device health stream** `v1alpha1.DRAResourceHealth` ([`health`]);
//! - **socket naming** and the **rolling-update lock** ([`sockets`]);
//! - an **apiserver client** whose requests share one HTTP/2 connection ([`apiserver`]);
//! - **claim fetching** and reading the driver's part of an allocation ([`claim`]);
//! - **ResourceSlice publishing** with the fewest apiserver writes ([`publish`]);
//! - a client for tests and tools that talks to the sockets as the kubelet does ([`client`]).
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use tandem_kubelet_plugin::{
//!     ClaimRef, DeviceHealthFeed, DeviceState, Driver, PluginConfig, PreparedDevice,
//! };
//!
//! struct Noop;
//!
//! impl Driver for Noop {
//!     type Error = std::io::Error;
//!
//!     async fn prepare(
//!         &self,
//!         claims: &[ClaimRef],
//!     ) -> BTreeMap<String, Result<Vec<PreparedDevice>, Self::Error>> {
//!         claims.iter().map(|c| (c.uid.clone(), Ok(Vec::new()))).collect()
//!     }
//!
//!     async fn unprepare(&self, claims: &[ClaimRef]) -> BTreeMap<String, Result<(), Self::Error>> {
//!         claims.iter().map(|c| (c.uid.clone(), Ok(()))).collect()
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PluginConfig::new("noop.example.com", "node-a");
//! let health = DeviceHealthFeed::fixed(vec![DeviceState {
//!     device_name: "dev-0".into(),
//!     problem: None,
//! }]);
//! let plugin = tandem_kubelet_plugin::start(&config, Arc::new(Noop), health).await?;
//! plugin.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/fake_driver.rs` is a complete driver with one fake device: it prepares claims
//! with a CDI device ID per claim, remembers them so a kubelet retry gets the same answer,
//! reports the device healthy, and shuts down gracefully on Ctrl-C or SIGTERM. Run it against
//! directories of your own (the defaults under `/var/lib/kubelet` need root):
//!
//! ```text
//! cargo run -p tandem-kubelet-plugin --example fake_driver -- --node-name node-a \
//!     --kubelet-registry-dir /tmp/fake/plugins_registry --kubelet-plugins-dir /tmp/fake/plugins
//! ```
//!
//! `tests/example_driver.rs` runs it on real sockets and talks to it as the kubelet does.

#![deny(missing_docs)]

pub mod apiserver;
pub mod authority;
pub mod claim;
pub mod client;
pub mod config;
pub mod dra_service;
pub mod driver;
pub mod health;
pub mod proto;
pub mod publish;
pub mod registration;
pub mod server;
pub mod sockets;

pub use claim::{ClaimError, ClaimRef};
pub use config::PluginConfig;
pub use driver::{CallObserver, Driver, Method, PreparedDevice};
pub use health::{DeviceHealthFeed, DeviceState};
pub use publish::{PublishError, PublishReport, Publisher};
pub use registration::{KubeletRegistration, RegistrationWatch};
pub use server::{RunningPlugin, ServeError, start, start_observed};
