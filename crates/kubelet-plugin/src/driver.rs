//! What a DRA driver implements to be served to the kubelet: prepare and unprepare a batch of
//! claims, each answered with its own result. Everything kubelet-facing (registration, the v1
//! and v1beta1 wire formats, cancellation, rolling-update serialization) is this crate's job.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::claim::ClaimRef;

/// A DRA driver's node side. Results are keyed by claim UID; a claim missing from the map is
/// answered with an error naming it. An error's `Display` text is what the kubelet shows in
/// the pod's events, so it should name the claim and the thing at fault.
///
/// Calls may overlap (the kubelet prepares pods in parallel), also for the same claim after a
/// kubelet retry; a driver must make preparing a prepared claim return the same devices.
/// Calls run on their own task: a kubelet that cancels a call at its deadline does not stop
/// one half way, and its retry should find the work done.
pub trait Driver: Send + Sync + 'static {
    /// Why one claim could not be prepared or unprepared.
    type Error: std::error::Error + Send + 'static;

    /// Prepares every claim of one `NodePrepareResources` call.
    fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> impl Future<Output = BTreeMap<String, Result<Vec<PreparedDevice>, Self::Error>>> + Send;

    /// Releases every claim of one `NodeUnprepareResources` call; unpreparing a claim that is
    /// not prepared succeeds.
    fn unprepare(
        &self,
        claims: &[ClaimRef],
    ) -> impl Future<Output = BTreeMap<String, Result<(), Self::Error>>> + Send;
}

/// One prepared device as the kubelet's `Device` message carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// Main request names (`req`, never `req/sub`); empty would mean "all requests".
    pub request_names: Vec<String>,
    /// The pool of the device's ResourceSlice.
    pub pool_name: String,
    /// The device's name in its ResourceSlice.
    pub device_name: String,
    /// Fully qualified CDI device IDs (`vendor/class=name`) the runtime applies.
    pub cdi_device_ids: Vec<String>,
    /// The allocation's share ID (DRA consumable capacity); only the v1 API carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
}

/// Which kubelet call finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `NodePrepareResources`.
    Prepare,
    /// `NodeUnprepareResources`.
    Unprepare,
}

impl Method {
    /// `prepare` or `unprepare`, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Prepare => "prepare",
            Method::Unprepare => "unprepare",
        }
    }
}

/// Told about every finished kubelet call, e.g. to count it in metrics.
pub trait CallObserver: Send + Sync + 'static {
    /// `outcomes` holds each claim UID of the call with whether it succeeded.
    fn call_finished(&self, method: Method, elapsed: Duration, outcomes: &[(&str, bool)]);
}
