//! Allocated ResourceClaims on the apiserver fake, the way the scheduler leaves them: each on
//! one GPU of the fixture and the RDMA NIC at the same index, requested as `gpu` and `nic`.
//! Returns the kubelet's view of each claim (namespace, name, UID) for the DRA calls.

use tandem::cli::demo::{ClaimRequest, create_allocated_claim};
use tandem::names;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::proto::dra_v1::Claim;

/// Claim `name` on GPU `index` of `inventory` and its `index`th RDMA NIC, allocated from
/// `pool` (the node name, or another node's to test refusals).
pub async fn create_gpu_nic_claim(
    apiserver: &kube::Client,
    inventory: &Inventory,
    namespace: &str,
    name: &str,
    pool: &str,
    index: usize,
) -> Claim {
    let rdma_nics: Vec<_> = inventory.nics.iter().filter(|n| n.is_rdma()).collect();
    let requests = [
        ClaimRequest {
            name: "gpu".into(),
            device_class: names::DEVICE_CLASS_GPU.into(),
            devices: vec![names::accelerator_device_name(
                &inventory.accelerators[index].pci.address,
            )],
        },
        ClaimRequest {
            name: "nic".into(),
            device_class: names::DEVICE_CLASS_NIC.into(),
            devices: vec![names::nic_device_name(&rdma_nics[index].pci.address)],
        },
    ];
    let created = create_allocated_claim(
        apiserver,
        namespace,
        name,
        names::DEFAULT_DRIVER_NAME,
        pool,
        &requests,
    )
    .await
    .unwrap();
    Claim {
        namespace: namespace.into(),
        name: name.into(),
        uid: created.metadata.uid.unwrap(),
    }
}

/// Up to `limit` claims `<prefix>-0`, `<prefix>-1`, … on `node`, one per GPU/RDMA NIC pair,
/// so no device is in two claims.
#[allow(
    dead_code,
    reason = "hostile_input makes its claims one at a time with create_gpu_nic_claim"
)]
pub async fn create_gpu_nic_claims(
    apiserver: &kube::Client,
    inventory: &Inventory,
    namespace: &str,
    node: &str,
    prefix: &str,
    limit: usize,
) -> Vec<Claim> {
    let rdma_nics = inventory.nics.iter().filter(|n| n.is_rdma()).count();
    let pairs = inventory.accelerators.len().min(rdma_nics).min(limit);
    let mut claims = Vec::with_capacity(pairs);
    for index in 0..pairs {
        let name = format!("{prefix}-{index}");
        claims
            .push(create_gpu_nic_claim(apiserver, inventory, namespace, &name, node, index).await);
    }
    claims
}
