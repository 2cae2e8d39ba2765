//! Why a claim could not be prepared or unprepared. Every claim error names the claim as
//! `namespace/name (uid)` and, where one is at fault, the device or field.

use super::config::ConfigError;
use std::path::PathBuf;
use tandem_kubelet_plugin::claim::ClaimError;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Fetching the claim or reading its allocation failed.
    #[error(transparent)]
    Claim(#[from] ClaimError),

    #[error("claim {claim}: device {device}: not in this node's inventory")]
    DeviceNotFound { claim: String, device: String },

    #[error("claim {claim}: device {device}: unhealthy ({issues})")]
    DeviceUnhealthy {
        claim: String,
        device: String,
        issues: String,
    },

    #[error("claim {claim}: device {device}: already prepared for claim {other}")]
    DeviceInUse {
        claim: String,
        device: String,
        other: String,
    },

    #[error("claim {claim}: {source}")]
    Config {
        claim: String,
        #[source]
        source: ConfigError,
    },

    #[error("claim {claim}: conflicting configuration: {reason}")]
    ConflictingConfig { claim: String, reason: String },

    #[error(
        "claim {claim}: device {device}: device node {path:?} from the inventory is not a plain path below the dev root"
    )]
    BadDeviceNodePath {
        claim: String,
        device: String,
        path: String,
    },

    #[error("claim {claim}: the checkpoint records this UID for claim {recorded}")]
    ClaimIdentityMismatch { claim: String, recorded: String },

    #[error("claim {claim}: {path}: {source}")]
    Io {
        claim: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("claim {claim}: checkpoint {path}: {message}")]
    Checkpoint {
        claim: String,
        path: PathBuf,
        message: String,
    },

    #[error("claim {claim}: its checkpoint entry changed while the claim was being fetched; retry")]
    Retry { claim: String },

    #[error("claim {claim}: preparation task failed: {reason}")]
    Internal { claim: String, reason: String },

    #[error("checkpoint {path}: {message}")]
    State { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    StateIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A claim's netattach record (what the attach hook moved into its pod) could not be
    /// read or written, so its interfaces cannot be released yet.
    #[error("{path}: {source}")]
    NetattachRecord {
        path: PathBuf,
        #[source]
        source: crate::netattach::record::RecordError,
    },

    #[error("invalid prepare configuration: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}
