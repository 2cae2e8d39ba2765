//! Who already holds each device: the claims of the checkpoint, the claims entered earlier in
//! the same call, and NICs whose netdev has not come back from an unprepared claim's pod.

use crate::prepare::RecordedDevice;
use crate::prepare::error::PrepareError;
use std::collections::BTreeMap;
use tandem_kubelet_plugin::claim::ClaimRef;

/// Who already holds a device, from the checkpoint and from claims prepared earlier in the same
/// call.
#[derive(Clone, Debug, Default)]
pub struct DeviceHolders {
    holders: BTreeMap<String, Vec<Holder>>,
}

#[derive(Clone, Debug)]
struct Holder {
    claim_uid: String,
    claim: String,
    share_id: bool,
    admin_access: bool,
}

impl DeviceHolders {
    pub fn add(&mut self, claim: &ClaimRef, devices: &[RecordedDevice]) {
        for d in devices {
            self.holders
                .entry(d.device.device_name.clone())
                .or_default()
                .push(Holder {
                    claim_uid: claim.uid.clone(),
                    claim: claim.to_string(),
                    share_id: d.device.share_id.is_some(),
                    admin_access: d.admin_access,
                });
        }
    }

    /// Marks `device` as unavailable for a reason other than a prepared claim (its netdev is
    /// still in the pod of an unprepared claim); it conflicts with every allocation.
    pub fn add_unavailable(&mut self, device: String, reason: String) {
        self.holders.entry(device).or_default().push(Holder {
            claim_uid: String::new(),
            claim: reason,
            share_id: false,
            admin_access: false,
        });
    }

    /// Refuses `claim` when another claim's hold on one of its planned `devices` excludes it,
    /// naming the first such device and its holder. Admin access coexists with anything (it is
    /// for monitoring and repair); shares coexist with shares.
    pub fn refuse_conflicts(
        &self,
        claim: &ClaimRef,
        devices: &[RecordedDevice],
    ) -> Result<(), PrepareError> {
        for d in devices {
            if let Some(other) = self.conflicting(&claim.uid, d) {
                return Err(PrepareError::DeviceInUse {
                    claim: claim.to_string(),
                    device: d.device.device_name.clone(),
                    other: other.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Another claim whose hold on `device` excludes this claim's.
    fn conflicting(&self, claim_uid: &str, device: &RecordedDevice) -> Option<&str> {
        self.holders
            .get(&device.device.device_name)?
            .iter()
            .filter(|h| h.claim_uid != claim_uid)
            .find(|h| {
                let compatible = device.admin_access
                    || h.admin_access
                    || (device.device.share_id.is_some() && h.share_id);
                !compatible
            })
            .map(|h| h.claim.as_str())
    }
}
