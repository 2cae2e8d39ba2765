//! The ResourceClaim `status.devices` entries of attached NICs: what the pod sees (interface
//! name, addresses, hardware address) and a `Ready` condition, built purely from the hook's
//! record and written with server-side apply under the driver's field manager.

use super::record::{AttachPhase, AttachedInterface};
use crate::topology::PciAddress;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, NetworkDeviceData, ResourceClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tandem_kubelet_plugin::ClaimRef;

/// The condition type the kubelet and users read; dranet uses the same one.
pub const READY_CONDITION: &str = "Ready";
/// `status.devices[].networkData.ips` holds at most this many entries.
const MAX_IPS: usize = 16;

/// One device's status, without the condition's transition time: comparing these tells
/// whether the claim needs a write.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceStatus {
    pub device: String,
    pub interface_name: String,
    pub ips: Vec<String>,
    pub hardware_address: Option<String>,
    pub ready: bool,
    pub message: String,
}

/// The status of each recorded interface whose NIC is known by PCI address (records written
/// before addresses were recorded cannot name their device and are left out), sorted by
/// device name.
pub fn device_statuses(interfaces: &[AttachedInterface]) -> Vec<DeviceStatus> {
    let mut statuses: Vec<DeviceStatus> = interfaces
        .iter()
        .filter_map(|interface| {
            let address: PciAddress = interface.pci_address.as_deref()?.parse().ok()?;
            let ready = interface.phase == AttachPhase::Attached;
            let snapshot = &interface.snapshot;
            let message = if ready {
                let rdma = match (&interface.rdma_device, interface.rdma_moved) {
                    (Some(device), true) => format!(", RDMA device {device} moved with it"),
                    (Some(device), false) => format!(", RDMA device {device} shared"),
                    (None, _) => String::new(),
                };
                format!(
                    "host interface {} attached as {}{rdma}",
                    snapshot.host_name, interface.pod_name
                )
            } else {
                format!(
                    "host interface {} is being attached as {}",
                    snapshot.host_name, interface.pod_name
                )
            };
            Some(DeviceStatus {
                device: crate::names::nic_device_name(&address),
                interface_name: interface.pod_name.clone(),
                ips: snapshot
                    .addresses
                    .iter()
                    .filter(|a| !super::is_link_local_v6(a.address))
                    .take(MAX_IPS)
                    .map(|a| format!("{}/{}", a.address, a.prefix_len))
                    .collect(),
                hardware_address: snapshot.hardware_address.clone(),
                ready,
                message,
            })
        })
        .collect();
    statuses.sort_by(|a, b| a.device.cmp(&b.device));
    statuses.dedup_by(|a, b| a.device == b.device);
    statuses
}

/// The API object for one device; `now` becomes the condition's transition time.
pub fn allocated_device_status(
    driver: &str,
    pool: &str,
    status: &DeviceStatus,
    now: Time,
) -> AllocatedDeviceStatus {
    AllocatedDeviceStatus {
        driver: driver.to_string(),
        pool: pool.to_string(),
        device: status.device.clone(),
        network_data: Some(NetworkDeviceData {
            interface_name: Some(status.interface_name.clone()),
            ips: Some(status.ips.clone()),
            hardware_address: status.hardware_address.clone(),
        }),
        conditions: Some(vec![Condition {
            type_: READY_CONDITION.to_string(),
            status: if status.ready { "True" } else { "False" }.to_string(),
            reason: if status.ready {
                "InterfaceAttached"
            } else {
                "InterfaceAttaching"
            }
            .to_string(),
            message: status.message.clone(),
            last_transition_time: now,
            observed_generation: None,
        }]),
        ..AllocatedDeviceStatus::default()
    }
}

/// Applies the claim's device statuses with server-side apply under `driver` as field
/// manager: the apiserver merges them with other drivers' entries by (driver, pool, device).
pub async fn apply_claim_status(
    client: kube::Client,
    driver: &str,
    pool: &str,
    claim: &ClaimRef,
    statuses: &[DeviceStatus],
) -> Result<(), kube::Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let devices: Vec<AllocatedDeviceStatus> = statuses
        .iter()
        .map(|s| allocated_device_status(driver, pool, s, now.clone()))
        .collect();
    let patch = serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": claim.name, "namespace": claim.namespace, "uid": claim.uid},
        "status": {"devices": devices},
    });
    let api: Api<ResourceClaim> = Api::namespaced(client, &claim.namespace);
    api.patch_status(
        &claim.name,
        &PatchParams::apply(driver).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netattach::record::NetnsRef;
    use crate::netattach::{InterfaceAddress, InterfaceSnapshot};

    fn interface(pci: Option<&str>, phase: AttachPhase) -> AttachedInterface {
        AttachedInterface {
            pod_name: "rdma0".into(),
            netns: NetnsRef {
                pid: 1,
                dev: 4,
                inode: 4026532000,
            },
            phase,
            snapshot: InterfaceSnapshot {
                host_name: "ens1f0".into(),
                mtu: 9000,
                hardware_address: Some("0c:42:a1:00:00:01".into()),
                addresses: vec![
                    InterfaceAddress {
                        address: "10.1.0.2".parse().unwrap(),
                        prefix_len: 24,
                    },
                    InterfaceAddress {
                        address: "fe80::1".parse().unwrap(),
                        prefix_len: 64,
                    },
                    InterfaceAddress {
                        address: "fd00::2".parse().unwrap(),
                        prefix_len: 64,
                    },
                ],
                routes: Vec::new(),
                rules: Vec::new(),
                was_up: true,
            },
            pci_address: pci.map(str::to_string),
            rdma_device: Some("mlx5_0".into()),
            rdma_moved: true,
        }
    }

    #[test]
    fn attached_interfaces_become_ready_device_statuses_in_cidr_form() {
        let statuses = device_statuses(&[
            interface(Some("0000:18:00.0"), AttachPhase::Attached),
            interface(None, AttachPhase::Attached),
        ]);
        assert_eq!(
            statuses.len(),
            1,
            "an entry without PCI address names no device"
        );
        let status = &statuses[0];
        assert_eq!(status.device, "nic-0000-18-00-0");
        assert_eq!(status.interface_name, "rdma0");
        // Link-local addresses are the kernel's, re-made in the pod; not reported.
        assert_eq!(status.ips, ["10.1.0.2/24", "fd00::2/64"]);
        assert!(status.ready);
        assert!(
            status.message.contains("mlx5_0 moved"),
            "{}",
            status.message
        );

        let api = allocated_device_status(
            "tandem.dev",
            "node-a",
            status,
            Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        let json = serde_json::to_value(&api).unwrap();
        assert_eq!(json["networkData"]["hardwareAddress"], "0c:42:a1:00:00:01");
        assert_eq!(json["conditions"][0]["type"], "Ready");
        assert_eq!(json["conditions"][0]["status"], "True");
        assert_eq!(json["pool"], "node-a");
    }

    #[test]
    fn an_interface_caught_mid_attach_is_not_ready() {
        let statuses = device_statuses(&[interface(Some("0000:18:00.0"), AttachPhase::Intent)]);
        assert!(!statuses[0].ready);
        let api = allocated_device_status(
            "tandem.dev",
            "n",
            &statuses[0],
            Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        assert_eq!(api.conditions.unwrap()[0].status, "False");
    }
}
