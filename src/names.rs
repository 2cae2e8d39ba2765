//! Names other people depend on (design.md): the pure core's `names`, and the kubelet's socket
//! conventions, which the kubelet-plugin crate spells.

pub use tandem_core::names::*;
/// Kubelet plugin sockets (design.md): `<registry dir>/<driver>-reg.sock` and
/// `<plugins dir>/<driver>/dra.sock`; rolling updates put the pod UID into both names.
pub use tandem_kubelet_plugin::sockets::{
    DEFAULT_KUBELET_PLUGINS_DIR, DEFAULT_KUBELET_REGISTRY_DIR, DRA_SOCKET_STEM,
    REGISTRATION_SOCKET_SUFFIX, SERIALIZE_LOCK_FILE,
};
