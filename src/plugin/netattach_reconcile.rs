//! The netattach reconcile loop: right after start and then every period, it retries the
//! interfaces that an unprepare could not bring back from a pod yet, and writes each prepared
//! claim's `status.devices` for the NICs its pod holds, only when they changed.

use crate::netattach::status::{DeviceStatus, apply_claim_status, device_statuses};
use crate::plugin::metrics::PluginMetrics;
use crate::prepare::{ClaimRef, NetattachReport, Preparer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_kubelet_plugin::sockets::SerializeLock;
use tokio_util::sync::CancellationToken;

/// Where statuses go and how often the loop runs.
pub struct ReconcileTarget {
    pub client: kube::Client,
    pub driver: String,
    /// The node name, which is the pool of its devices.
    pub pool: String,
    pub period: Duration,
    pub metrics: Option<Arc<PluginMetrics>>,
    /// The rolling-update lock the kubelet calls take: the other plugin pod may be
    /// preparing from the same checkpoint.
    pub serialize: Option<SerializeLock>,
}

/// The claims whose statuses differ from what was last written, with their new statuses.
/// `written` forgets claims that no longer hold interfaces.
pub fn status_changes(
    report: &NetattachReport,
    written: &mut BTreeMap<String, Vec<DeviceStatus>>,
) -> Vec<(ClaimRef, Vec<DeviceStatus>)> {
    written.retain(|uid, _| report.attached.iter().any(|a| &a.claim.uid == uid));
    report
        .attached
        .iter()
        .filter_map(|attachments| {
            let statuses = device_statuses(&attachments.interfaces);
            let unchanged = written.get(&attachments.claim.uid) == Some(&statuses);
            (!statuses.is_empty() && !unchanged).then(|| (attachments.claim.clone(), statuses))
        })
        .collect()
}

pub async fn run(preparer: Arc<Preparer>, target: ReconcileTarget, shutdown: CancellationToken) {
    let mut written: BTreeMap<String, Vec<DeviceStatus>> = BTreeMap::new();
    loop {
        let reconciled = match &target.serialize {
            Some(lock) => match lock.acquire().await {
                Ok(_guard) => preparer.reconcile_netattach().await,
                Err(error) => Err(crate::prepare::PrepareError::State {
                    path: lock.path().to_path_buf(),
                    message: error.to_string(),
                }),
            },
            None => preparer.reconcile_netattach().await,
        };
        match reconciled {
            Ok(report) => {
                if report.released > 0 {
                    tracing::info!(
                        released = report.released,
                        pending = report.pending,
                        "interfaces of unprepared claims came back to the host"
                    );
                }
                if let Some(metrics) = &target.metrics {
                    let attached = report.attached.iter().map(|a| a.interfaces.len()).sum();
                    metrics.observe_netattach(report.pending, attached);
                }
                for (claim, statuses) in status_changes(&report, &mut written) {
                    let result = apply_claim_status(
                        target.client.clone(),
                        &target.driver,
                        &target.pool,
                        &claim,
                        &statuses,
                    )
                    .await;
                    if let Some(metrics) = &target.metrics {
                        metrics.record_claim_status_write(result.is_ok());
                    }
                    match result {
                        Ok(()) => {
                            tracing::info!(claim = %claim, devices = statuses.len(),
                                "claim status updated with attached interfaces");
                            written.insert(claim.uid.clone(), statuses);
                        }
                        // Retried next period: `written` still lacks it.
                        Err(error) => {
                            tracing::warn!(claim = %claim, %error, "writing the claim status failed")
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "netattach reconcile failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(target.period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netattach::InterfaceSnapshot;
    use crate::netattach::record::{AttachPhase, AttachedInterface, NetnsRef};
    use crate::prepare::ClaimAttachments;

    fn attachments(uid: &str, phase: AttachPhase) -> ClaimAttachments {
        ClaimAttachments {
            claim: ClaimRef {
                namespace: "ns".into(),
                name: format!("claim-{uid}"),
                uid: uid.into(),
            },
            interfaces: vec![AttachedInterface {
                pod_name: "rdma0".into(),
                netns: NetnsRef {
                    pid: 7,
                    dev: 4,
                    inode: 5,
                },
                phase,
                snapshot: InterfaceSnapshot {
                    host_name: "ens1f0".into(),
                    mtu: 1500,
                    hardware_address: None,
                    addresses: Vec::new(),
                    routes: Vec::new(),
                    rules: Vec::new(),
                    was_up: true,
                },
                pci_address: Some("0000:18:00.0".into()),
                rdma_device: None,
                rdma_moved: false,
            }],
        }
    }

    #[test]
    fn only_new_or_changed_statuses_are_written_and_gone_claims_are_forgotten() {
        let mut written = BTreeMap::new();
        let report = NetattachReport {
            attached: vec![attachments("a", AttachPhase::Intent)],
            ..NetattachReport::default()
        };
        let changes = status_changes(&report, &mut written);
        assert_eq!(changes.len(), 1);
        written.insert("a".to_string(), changes[0].1.clone());
        assert!(status_changes(&report, &mut written).is_empty());

        // The hook finished: Ready flips, so the claim is written again.
        let report = NetattachReport {
            attached: vec![attachments("a", AttachPhase::Attached)],
            ..NetattachReport::default()
        };
        let changes = status_changes(&report, &mut written);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].1[0].ready);

        // Unprepared: nothing to write and the memory of it goes.
        assert!(status_changes(&NetattachReport::default(), &mut written).is_empty());
        assert!(written.is_empty());
    }
}
