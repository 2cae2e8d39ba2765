//! The claim as the kubelet names it, fetching it from the apiserver, and reading our part of
//! its allocation. Names from the kubelet and the apiserver are validated here, before any of
//! them becomes part of a path.

use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, ResourceClaim};
use kube::Api;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a claim could not be fetched or its allocation read. Each names the claim as
/// `namespace/name (uid)`.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The kubelet sent a UID that is not a Kubernetes UID.
    #[error("claim {claim}: invalid claim UID: {reason}")]
    InvalidClaimUid {
        /// The claim, `namespace/name (uid)`.
        claim: String,
        /// What is wrong with the UID.
        reason: String,
    },

    /// No ResourceClaim under that name.
    #[error("claim {claim}: ResourceClaim not found in the apiserver")]
    ClaimNotFound {
        /// The claim, `namespace/name (uid)`.
        claim: String,
    },

    /// The apiserver answered the GET with an error.
    #[error("claim {claim}: fetching the ResourceClaim: {source}")]
    ApiServer {
        /// The claim, `namespace/name (uid)`.
        claim: String,
        /// The apiserver's or the client's error.
        #[source]
        source: kube::Error,
    },

    /// The apiserver did not answer in time.
    #[error("claim {claim}: the apiserver did not answer the claim fetch within {seconds} s")]
    ApiServerTimeout {
        /// The claim, `namespace/name (uid)`.
        claim: String,
        /// How long the fetch waited ([`CLAIM_FETCH_TIMEOUT`]).
        seconds: u64,
    },

    /// The name now belongs to another claim.
    #[error(
        "claim {claim}: the apiserver holds UID {found:?} under this name: the claim was replaced"
    )]
    UidMismatch {
        /// The claim, `namespace/name (uid)`, as the kubelet named it.
        claim: String,
        /// The UID of the claim the apiserver holds under that name.
        found: String,
    },

    /// The claim has no allocation.
    #[error("claim {claim}: not allocated (status.allocation is empty)")]
    NotAllocated {
        /// The claim, `namespace/name (uid)`.
        claim: String,
    },

    /// An allocated device name that is not a DNS label.
    #[error("claim {claim}: device {device:?}: {reason}")]
    InvalidDeviceName {
        /// The claim, `namespace/name (uid)`.
        claim: String,
        /// The device name as allocated.
        device: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A device of this driver allocated from another node's pool.
    #[error(
        "claim {claim}: device {device}: allocated from pool {pool:?}, but this node's pool is {node:?}"
    )]
    WrongPool {
        /// The claim, `namespace/name (uid)`.
        claim: String,
        /// The allocated device.
        device: String,
        /// The pool it was allocated from.
        pool: String,
        /// This node, whose name is our pool.
        node: String,
    },
}

/// A claim as the kubelet sends it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClaimRef {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// The claim's UID; the key of every answer. Unchecked: see [`validate_claim_uid`].
    pub uid: String,
}

impl fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// One device of our driver in the claim's allocation, merged over the results that name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatedDevice {
    /// Request names as in the allocation results (`main` or `main/sub`).
    pub requests: Vec<String>,
    /// The device's pool (this node's name).
    pub pool: String,
    /// The device's name in its ResourceSlice.
    pub device: String,
    /// The allocation's share ID, when the device is shared (DRA consumable capacity).
    pub share_id: Option<String>,
    /// Allocated with admin access (monitoring, say), alongside other claims.
    pub admin_access: bool,
}

impl AllocatedDevice {
    /// Request names for the kubelet: the main request, like the Go helper reports them,
    /// because containers reference requests, not subrequests.
    pub fn base_request_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .requests
            .iter()
            .map(|r| r.split('/').next().unwrap_or(r).to_string())
            .collect();
        names.dedup();
        names
    }

    /// Whether another claim may hold this device at the same time.
    pub fn may_share(&self) -> bool {
        self.share_id.is_some() || self.admin_access
    }
}

/// Our driver's part of an allocation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OurAllocation {
    /// Our devices, one entry per device.
    pub devices: Vec<AllocatedDevice>,
    /// The allocation's device configuration, as the apiserver holds it (all drivers'
    /// entries: each names the requests it applies to).
    pub config: Vec<DeviceAllocationConfiguration>,
}

/// A DNS label (RFC 1123): what Kubernetes requires of device names, and safe as a single path
/// component (no `/`, no `.`/`..`).
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Checks a claim UID before it names a file: Kubernetes UIDs are UUIDs, so letters, digits and
/// dashes are all we accept; that also keeps `<uid>-<device>` a valid CDI device name.
pub fn validate_claim_uid(claim: &ClaimRef) -> Result<(), ClaimError> {
    let uid = &claim.uid;
    let reason = if uid.is_empty() {
        Some("empty".to_string())
    } else if uid.len() > 64 {
        Some(format!("{} characters, at most 64 allowed", uid.len()))
    } else if !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Some("only letters, digits and '-' are allowed".to_string())
    } else if !uid.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("must start with a letter or digit".to_string())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ClaimError::InvalidClaimUid {
            claim: claim.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// How long one claim fetch may take: the kubelet gives a whole NodePrepareResources call 45 s,
/// so a hung apiserver must turn into a per-claim error (which the kubelet retries) well before.
pub const CLAIM_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// GETs the claim and checks it is the one the kubelet means (same UID).
pub async fn fetch_claim(
    client: &kube::Client,
    claim: &ClaimRef,
) -> Result<ResourceClaim, ClaimError> {
    let api: Api<ResourceClaim> = Api::namespaced(client.clone(), &claim.namespace);
    let Ok(answer) = tokio::time::timeout(CLAIM_FETCH_TIMEOUT, api.get(&claim.name)).await else {
        return Err(ClaimError::ApiServerTimeout {
            claim: claim.to_string(),
            seconds: CLAIM_FETCH_TIMEOUT.as_secs(),
        });
    };
    let fetched = match answer {
        Ok(fetched) => fetched,
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            return Err(ClaimError::ClaimNotFound {
                claim: claim.to_string(),
            });
        }
        Err(source) => {
            return Err(ClaimError::ApiServer {
                claim: claim.to_string(),
                source,
            });
        }
    };
    let found = fetched.metadata.uid.clone().unwrap_or_default();
    if found != claim.uid {
        return Err(ClaimError::UidMismatch {
            claim: claim.to_string(),
            found,
        });
    }
    Ok(fetched)
}

/// Takes the allocation results of `driver_name`, checks their names and pool, and merges
/// results that name the same device (one device may serve several requests).
pub fn our_allocation(
    claim: &ClaimRef,
    fetched: &ResourceClaim,
    driver_name: &str,
    node_name: &str,
) -> Result<OurAllocation, ClaimError> {
    let allocation = fetched
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .ok_or_else(|| ClaimError::NotAllocated {
            claim: claim.to_string(),
        })?;
    let Some(devices) = allocation.devices.as_ref() else {
        return Ok(OurAllocation::default());
    };
    let mut ours: Vec<AllocatedDevice> = Vec::new();
    for result in devices.results.iter().flatten() {
        if result.driver != driver_name {
            continue;
        }
        if !is_dns_label(&result.device) {
            return Err(ClaimError::InvalidDeviceName {
                claim: claim.to_string(),
                device: result.device.clone(),
                reason: "not a DNS label (lowercase letters, digits, '-'; at most 63)".into(),
            });
        }
        if result.pool != node_name {
            return Err(ClaimError::WrongPool {
                claim: claim.to_string(),
                device: result.device.clone(),
                pool: result.pool.clone(),
                node: node_name.to_string(),
            });
        }
        let admin_access = result.admin_access.unwrap_or(false);
        match ours.iter_mut().find(|d| d.device == result.device) {
            Some(existing) => {
                if !existing.requests.contains(&result.request) {
                    existing.requests.push(result.request.clone());
                }
                existing.admin_access |= admin_access;
                if existing.share_id.is_none() {
                    existing.share_id = result.share_id.clone();
                }
            }
            None => ours.push(AllocatedDevice {
                requests: vec![result.request.clone()],
                pool: result.pool.clone(),
                device: result.device.clone(),
                share_id: result.share_id.clone(),
                admin_access,
            }),
        }
    }
    Ok(OurAllocation {
        devices: ours,
        config: devices.config.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1::{
        AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult,
        ResourceClaimStatus,
    };

    fn claim_ref() -> ClaimRef {
        ClaimRef {
            namespace: "ml".into(),
            name: "train".into(),
            uid: "0b1c-42".into(),
        }
    }

    fn result(
        request: &str,
        driver: &str,
        pool: &str,
        device: &str,
    ) -> DeviceRequestAllocationResult {
        DeviceRequestAllocationResult {
            request: request.into(),
            driver: driver.into(),
            pool: pool.into(),
            device: device.into(),
            ..Default::default()
        }
    }

    fn allocated(results: Vec<DeviceRequestAllocationResult>) -> ResourceClaim {
        ResourceClaim {
            status: Some(ResourceClaimStatus {
                allocation: Some(AllocationResult {
                    devices: Some(DeviceAllocationResult {
                        results: Some(results),
                        config: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn display_names_namespace_name_and_uid() {
        assert_eq!(claim_ref().to_string(), "ml/train (0b1c-42)");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("gpu-0000-1b-00-0"));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a.b",
            "-a",
            "a-",
            "GPU",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn claim_uids_that_could_escape_a_path_are_rejected() {
        for bad in ["", "..", "a/b", "../x", "-x", "a.b", &"a".repeat(65)] {
            let c = ClaimRef {
                uid: bad.to_string(),
                ..claim_ref()
            };
            let e = validate_claim_uid(&c).unwrap_err();
            assert!(e.to_string().contains("ml/train"), "{e}");
        }
        validate_claim_uid(&ClaimRef {
            uid: "3f2a61c4-1b0e-4d7c-9a51-7c2a9e0d1f22".into(),
            ..claim_ref()
        })
        .unwrap();
    }

    #[test]
    fn other_drivers_are_skipped_and_results_merge_per_device() {
        let claim = allocated(vec![
            result("gpus", "tandem.dev", "node-a", "gpu-0000-1b-00-0"),
            result("other", "gpu.nvidia.com", "node-a", "gpu-0"),
            result("all", "tandem.dev", "node-a", "gpu-0000-1b-00-0"),
            result("nics/rdma", "tandem.dev", "node-a", "nic-0000-18-00-0"),
        ]);
        let ours = our_allocation(&claim_ref(), &claim, "tandem.dev", "node-a").unwrap();
        assert_eq!(ours.devices.len(), 2);
        assert_eq!(ours.devices[0].requests, vec!["gpus", "all"]);
        assert_eq!(ours.devices[1].base_request_names(), vec!["nics"]);
    }

    #[test]
    fn bad_names_pools_and_missing_allocation_are_errors_naming_the_claim() {
        let e =
            our_allocation(&claim_ref(), &ResourceClaim::default(), "tandem.dev", "n").unwrap_err();
        assert!(matches!(e, ClaimError::NotAllocated { .. }), "{e}");
        for device in ["../etc", "a/b", ".", ".."] {
            let claim = allocated(vec![result("r", "tandem.dev", "n", device)]);
            let e = our_allocation(&claim_ref(), &claim, "tandem.dev", "n").unwrap_err();
            assert!(matches!(e, ClaimError::InvalidDeviceName { .. }), "{e}");
            assert!(e.to_string().contains("ml/train (0b1c-42)"), "{e}");
        }
        let claim = allocated(vec![result(
            "r",
            "tandem.dev",
            "other-node",
            "gpu-0000-1b-00-0",
        )]);
        let e = our_allocation(&claim_ref(), &claim, "tandem.dev", "n").unwrap_err();
        assert!(e.to_string().contains("other-node"), "{e}");
    }
}
