//! Keeps the inventory and the desired slices current: rediscovery every period and soon after
//! netlink link events (debounced), and `gone` tracking, which keeps a vanished device in the
//! slices for one period with a NoExecute taint so running pods learn it fell off the bus.

use super::build::{
    LeftOutNic, NetworkFacts, NodeIdentity, SliceOptions, build_devices_leaving_out,
    build_slices_from_devices, gone_taint,
};
use crate::sysfs::{MachineRoots, discover};
use crate::topology::{Inventory, InventoryWatch, PciAddress};
use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Link events come in bursts (a port flapping, a bond re-forming): one rescan per burst.
pub const RESCAN_DEBOUNCE: Duration = Duration::from_millis(250);

/// The PCI addresses of NICs whose netdev sits in a pod's network namespace right now.
pub type AttachedNics = Arc<dyn Fn() -> BTreeSet<PciAddress> + Send + Sync>;

/// Rediscovers the machine every `period`, and `RESCAN_DEBOUNCE` after `trigger` fires, and
/// publishes the inventory when it differs from the last one. A failed discovery keeps the last
/// inventory: a transient sysfs read error must not make every device vanish. NICs that
/// `attached` names keep their host-side facts (see [`keep_attached_nics`]).
pub async fn run_rescans(
    roots: MachineRoots,
    period: Duration,
    trigger: Arc<Notify>,
    inventory: watch::Sender<Arc<Inventory>>,
    attached: Option<AttachedNics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
            _ = trigger.notified() => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RESCAN_DEBOUNCE) => {}
                }
            }
        }
        let scan_roots = roots.clone();
        let attached = attached.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            discover(&scan_roots).map(|found| (found, attached.map(|f| f())))
        })
        .await;
        match scanned {
            Ok(Ok((mut found, attached))) => {
                let changed = inventory.send_if_modified(|current| {
                    if let Some(attached) = &attached {
                        keep_attached_nics(&mut found, current, attached);
                    }
                    if **current == found {
                        return false;
                    }
                    *current = Arc::new(found);
                    true
                });
                if changed {
                    tracing::info!(sysfs = %roots.sys.display(), "inventory changed");
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "rescan failed; keeping the last inventory"),
            Err(error) => tracing::warn!(%error, "rescan task failed; keeping the last inventory"),
        }
    }
}

/// A netdev moved into a pod's namespace vanishes from the host's sysfs (and in RDMA
/// exclusive mode its RDMA device too), so a rescan would publish the allocated NIC as a
/// bare PCI function: no `ifName`, `rdma` false, no subnet. For NICs in `attached`, the facts
/// of the `previous` inventory are kept until the interface is back.
pub fn keep_attached_nics(
    found: &mut Inventory,
    previous: &Inventory,
    attached: &BTreeSet<PciAddress>,
) {
    for nic in found
        .nics
        .iter_mut()
        .filter(|n| attached.contains(&n.pci.address))
    {
        let Some(before) = previous
            .nics
            .iter()
            .find(|p| p.pci.address == nic.pci.address)
        else {
            continue;
        };
        if nic.netdevs.is_empty() {
            nic.netdevs = before.netdevs.clone();
        }
        if nic.rdma.is_none() {
            nic.rdma = before.rdma.clone();
        }
    }
}

/// Fires `trigger` on every rtnetlink link message (netdev up/down/added/removed), and when
/// the kernel reports that it dropped some (an overrun: something changed, rescan). The
/// subscription only listens to the kernel; it reads no host files.
pub fn spawn_link_watcher(
    trigger: Arc<Notify>,
    shutdown: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    use futures::StreamExt;
    let (connection, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])?;
    Ok(tokio::spawn(async move {
        let connection = tokio::spawn(connection);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                message = messages.next() => {
                    if message.is_none() {
                        tracing::warn!("netlink link watch ended; relying on periodic rescans");
                        break;
                    }
                    trigger.notify_one();
                }
            }
        }
        connection.abort();
    }))
}

/// Remembers the devices of the last build so a device that disappears stays published, with
/// the `gone` taint, for `hold` (one rescan period).
#[derive(Debug)]
pub struct GoneTracker {
    hold: Duration,
    previous: BTreeMap<String, Device>,
    gone: BTreeMap<String, (Device, Instant)>,
}

impl GoneTracker {
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            previous: BTreeMap::new(),
            gone: BTreeMap::new(),
        }
    }

    /// `current` plus the recently vanished devices, sorted by name like `build_devices`.
    pub fn devices(&mut self, current: Vec<Device>, driver: &str, now: Instant) -> Vec<Device> {
        let present: BTreeMap<String, Device> =
            current.into_iter().map(|d| (d.name.clone(), d)).collect();
        let hold = self.hold;
        self.gone.retain(|name, (_, since)| {
            !present.contains_key(name) && now.duration_since(*since) < hold
        });
        for (name, device) in &self.previous {
            if !present.contains_key(name) && !self.gone.contains_key(name) {
                let mut vanished = device.clone();
                vanished.taints = Some(vec![gone_taint(driver)]);
                tracing::warn!(device = %name, "device vanished from the PCI bus");
                self.gone.insert(name.clone(), (vanished, now));
            }
        }
        self.previous = present.clone();
        let mut merged: BTreeMap<String, Device> = present;
        for (name, (device, _)) in &self.gone {
            merged.insert(name.clone(), device.clone());
        }
        merged.into_values().collect()
    }

    /// When the oldest gone entry expires, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.gone
            .values()
            .map(|(_, since)| *since + self.hold)
            .min()
    }
}

/// Rebuilds the desired slices on every inventory or network change (and when a gone entry
/// expires) and publishes them for `Publisher::run` when they differ.
#[allow(clippy::too_many_arguments)]
pub async fn run_slice_builder(
    mut inventory: InventoryWatch,
    mut network: watch::Receiver<NetworkFacts>,
    node: NodeIdentity,
    driver: String,
    options: SliceOptions,
    gone_hold: Duration,
    desired: watch::Sender<Arc<Vec<ResourceSlice>>>,
    shutdown: CancellationToken,
) {
    let mut tracker = GoneTracker::new(gone_hold);
    let mut left_out: Vec<LeftOutNic> = Vec::new();
    // Without a network source (sender gone) the last facts stay in use.
    let mut network_open = true;
    loop {
        let current = inventory.borrow_and_update().clone();
        let facts = network.borrow_and_update().clone();
        let (mut devices, now_left_out) =
            build_devices_leaving_out(&current, &driver, &options, &facts);
        log_left_out_changes(&left_out, &now_left_out, &node.name);
        left_out = now_left_out;
        if options.device_taints {
            devices = tracker.devices(devices, &driver, Instant::now());
        }
        let slices = build_slices_from_devices(devices, &node, &driver, &options);
        desired.send_if_modified(|published| {
            if **published == slices {
                return false;
            }
            *published = Arc::new(slices);
            true
        });
        let expiry = tracker.next_expiry();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = inventory.changed() => if changed.is_err() { return },
            changed = network.changed(), if network_open => network_open = changed.is_ok(),
            _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {}
        }
    }
}

/// Logs the NICs newly left out of the slices and the ones published again, so each change
/// is said once rather than on every rebuild.
fn log_left_out_changes(before: &[LeftOutNic], now: &[LeftOutNic], node: &str) {
    for nic in now.iter().filter(|n| !before.contains(n)) {
        tracing::info!(
            node,
            device = %nic.device,
            interface = nic.if_name.as_deref().unwrap_or("-"),
            reason = %nic.reason,
            "NIC left out of the ResourceSlices: it carries the node's own traffic \
             (--publish-management-nics publishes it)"
        );
    }
    for nic in before
        .iter()
        .filter(|b| !now.iter().any(|n| n.device == b.device))
    {
        tracing::info!(
            node,
            device = %nic.device,
            interface = nic.if_name.as_deref().unwrap_or("-"),
            "NIC no longer carries the node IP or a default route; publishing it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str) -> Device {
        Device {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nics_attached_to_pods_keep_their_host_facts_and_others_do_not() {
        let dir = crate::fixture::scratch_dir().unwrap();
        let desc = crate::fixture::builtin("dgx-h100").unwrap();
        let roots = crate::fixture::write_machine(&desc, dir.path()).unwrap();
        let previous = discover(&roots).unwrap();
        let rdma_nics: Vec<PciAddress> = previous
            .nics
            .iter()
            .filter(|n| n.rdma.is_some() && !n.netdevs.is_empty())
            .map(|n| n.pci.address)
            .take(2)
            .collect();
        // Both netdevs (and RDMA devices) left the host's view; only the first is in a pod.
        let mut found = previous.clone();
        for nic in found
            .nics
            .iter_mut()
            .filter(|n| rdma_nics.contains(&n.pci.address))
        {
            nic.netdevs.clear();
            nic.rdma = None;
        }
        let attached: BTreeSet<PciAddress> = [rdma_nics[0]].into();
        keep_attached_nics(&mut found, &previous, &attached);
        let nic = |inventory: &Inventory, address: PciAddress| {
            inventory
                .nics
                .iter()
                .find(|n| n.pci.address == address)
                .cloned()
                .unwrap()
        };
        assert_eq!(nic(&found, rdma_nics[0]), nic(&previous, rdma_nics[0]));
        let unattached = nic(&found, rdma_nics[1]);
        assert!(unattached.netdevs.is_empty() && unattached.rdma.is_none());
    }

    #[test]
    fn vanished_devices_stay_tainted_for_one_hold_period() {
        let start = Instant::now();
        let hold = Duration::from_secs(30);
        let mut tracker = GoneTracker::new(hold);
        let both = tracker.devices(vec![device("gpu-a"), device("nic-b")], "tandem.dev", start);
        assert_eq!(both.len(), 2);
        assert!(both.iter().all(|d| d.taints.is_none()));

        let later = start + Duration::from_secs(10);
        let after = tracker.devices(vec![device("gpu-a")], "tandem.dev", later);
        let names: Vec<&str> = after.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["gpu-a", "nic-b"]);
        let taint = &after[1].taints.as_ref().unwrap()[0];
        assert_eq!(
            (taint.key.as_str(), taint.effect.as_str()),
            ("tandem.dev/gone", "NoExecute")
        );
        assert_eq!(tracker.next_expiry(), Some(later + hold));

        let still = tracker.devices(
            vec![device("gpu-a")],
            "tandem.dev",
            later + Duration::from_secs(29),
        );
        assert_eq!(still.len(), 2, "within the hold period");
        let expired = tracker.devices(vec![device("gpu-a")], "tandem.dev", later + hold);
        assert_eq!(expired.len(), 1);
        assert_eq!(tracker.next_expiry(), None);
    }

    #[test]
    fn a_returning_device_loses_the_gone_taint() {
        let start = Instant::now();
        let mut tracker = GoneTracker::new(Duration::from_secs(30));
        tracker.devices(vec![device("nic-b")], "tandem.dev", start);
        tracker.devices(vec![], "tandem.dev", start + Duration::from_secs(1));
        let back = tracker.devices(
            vec![device("nic-b")],
            "tandem.dev",
            start + Duration::from_secs(2),
        );
        assert_eq!(back.len(), 1);
        assert!(back[0].taints.is_none());
    }
}
