//! The container environment of a prepared claim: the `TANDEM_*` summary always, plus the
//! NCCL or UCX device selection in GPU order. Pure: computed from the claim topology alone.
//!
//! `NCCL_SOCKET_IFNAME` is deliberately not set: the NICs' netdevs stay in the host network
//! namespace, so naming them would point NCCL's bootstrap at interfaces the pod cannot see;
//! the pod's own interface is what bootstrap must use. GPU runtime variables
//! (`NVIDIA_VISIBLE_DEVICES`, `CUDA_VISIBLE_DEVICES`) are left to the GPU vendor's tooling;
//! TPU chips get the env GKE's TPU device plugin sets ([`tpu_env`]).

use super::config::EnvFlavour;
use super::topology_file::ClaimTopology;
use crate::names::{
    CONTAINER_TOPOLOGY_FILE, ENV_CLAIM_UID, ENV_GPUS, ENV_NICS, ENV_PAIRS, ENV_TOPOLOGY_FILE,
};

/// `KEY=VALUE` entries in a stable order.
pub fn claim_env(flavour: EnvFlavour, topology: &ClaimTopology) -> Vec<String> {
    let gpus: Vec<&str> = topology.gpus.iter().map(|g| g.name.as_str()).collect();
    let nics: Vec<&str> = topology.nics.iter().map(|n| n.name.as_str()).collect();
    let pairs: Vec<String> = topology
        .pairs
        .iter()
        .map(|p| format!("{}={}:{}", p.gpu, p.nic, p.affinity))
        .collect();
    let mut env = vec![
        format!("{ENV_CLAIM_UID}={}", topology.claim_uid),
        format!("{ENV_GPUS}={}", gpus.join(",")),
        format!("{ENV_NICS}={}", nics.join(",")),
        format!("{ENV_PAIRS}={}", pairs.join(",")),
        format!("{ENV_TOPOLOGY_FILE}={CONTAINER_TOPOLOGY_FILE}"),
    ];
    let hcas = ordered_hcas(topology);
    match flavour {
        EnvFlavour::Nccl if !hcas.is_empty() => {
            // The leading '=' makes NCCL match these names exactly: without it `mlx5_1`
            // would also select `mlx5_10`.
            let names: Vec<&str> = hcas.iter().map(|(name, _)| *name).collect();
            env.push(format!("NCCL_IB_HCA=={}", names.join(",")));
        }
        EnvFlavour::Ucx if !hcas.is_empty() => {
            let devices: Vec<String> = hcas
                .iter()
                .map(|(name, port)| format!("{name}:{port}"))
                .collect();
            env.push(format!("UCX_NET_DEVICES={}", devices.join(",")));
        }
        _ => {}
    }
    env
}

/// The environment GKE's TPU device plugin gives a container holding `chips` (the host's chip
/// indices, ascending): which chips libtpu opens, and that this one process drives all of
/// them as one slice of the host (`TPU_CHIPS_PER_PROCESS_BOUNDS` is the chip grid: 1 chip
/// `1,1,1`, 2 chips `1,2,1`, 4 chips `2,2,1`, 8 chips `2,4,1`).
pub fn tpu_env(chips: &[u32]) -> Vec<String> {
    if chips.is_empty() {
        return Vec::new();
    }
    let bounds = match chips.len() {
        1 => "1,1,1".to_string(),
        2 => "1,2,1".to_string(),
        4 => "2,2,1".to_string(),
        8 => "2,4,1".to_string(),
        n => format!("1,{n},1"),
    };
    let visible: Vec<String> = chips.iter().map(u32::to_string).collect();
    vec![
        format!("TPU_VISIBLE_CHIPS={}", visible.join(",")),
        format!("TPU_CHIPS_PER_PROCESS_BOUNDS={bounds}"),
        "TPU_PROCESS_BOUNDS=1,1,1".to_string(),
    ]
}

/// RDMA devices with their port, in GPU order: the NIC paired with the first GPU first, so
/// that rank-local device selection in NCCL/UCX lines up with the pairs. NICs of the claim
/// without a GPU to pair with follow in their own order.
fn ordered_hcas(topology: &ClaimTopology) -> Vec<(&str, u32)> {
    let mut hcas: Vec<(&str, u32)> = Vec::new();
    let paired = topology.pairs.iter().map(|p| p.nic.as_str());
    let rest = topology.nics.iter().map(|n| n.name.as_str());
    for nic_name in paired.chain(rest) {
        let Some(nic) = topology.nics.iter().find(|n| n.name == nic_name) else {
            continue;
        };
        if let Some(rdma) = nic.rdma_device.as_deref()
            && !hcas.iter().any(|(name, _)| *name == rdma)
        {
            hcas.push((rdma, nic.rdma_port.unwrap_or(1)));
        }
    }
    hcas
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::topology_file::{TopologyGpu, TopologyNic, TopologyPair};
    use crate::topology::Affinity;

    fn gpu(name: &str) -> TopologyGpu {
        TopologyGpu {
            name: name.into(),
            pci_bus_id: String::new(),
            pcie_root: String::new(),
            numa_node: None,
            model: String::new(),
            uuid: None,
        }
    }

    fn nic(name: &str, rdma: Option<&str>) -> TopologyNic {
        TopologyNic {
            name: name.into(),
            pci_bus_id: String::new(),
            pcie_root: String::new(),
            numa_node: None,
            if_name: None,
            rdma_device: rdma.map(String::from),
            rdma_port: rdma.map(|_| 1),
            shared: false,
        }
    }

    fn topology() -> ClaimTopology {
        ClaimTopology {
            claim_uid: "u1".into(),
            namespace: "ml".into(),
            name: "train".into(),
            gpus: vec![gpu("gpu-a"), gpu("gpu-b")],
            nics: vec![nic("nic-a", Some("mlx5_0")), nic("nic-b", Some("mlx5_3"))],
            // The second GPU's NIC is listed first among the NICs but must come second.
            pairs: vec![
                TopologyPair {
                    gpu: "gpu-a".into(),
                    nic: "nic-b".into(),
                    affinity: Affinity::Pix,
                },
                TopologyPair {
                    gpu: "gpu-b".into(),
                    nic: "nic-a".into(),
                    affinity: Affinity::Node,
                },
            ],
            unpaired_gpus: vec![],
            unpaired_nics: vec![],
            reason: None,
        }
    }

    #[test]
    fn nccl_lists_hcas_in_gpu_order_with_exact_match() {
        let env = claim_env(EnvFlavour::Nccl, &topology());
        assert!(
            env.contains(&"NCCL_IB_HCA==mlx5_3,mlx5_0".to_string()),
            "{env:?}"
        );
        assert!(env.contains(&"TANDEM_PAIRS=gpu-a=nic-b:PIX,gpu-b=nic-a:NODE".to_string()));
        assert!(env.contains(&"TANDEM_GPUS=gpu-a,gpu-b".to_string()));
        assert!(env.contains(&"TANDEM_TOPOLOGY_FILE=/var/run/tandem/topology.json".to_string()));
        assert!(
            !env.iter()
                .any(|e| e.starts_with("UCX_") || e.starts_with("CUDA_VISIBLE"))
        );
    }

    #[test]
    fn ucx_lists_device_ports_and_none_lists_only_the_summary() {
        let env = claim_env(EnvFlavour::Ucx, &topology());
        assert!(
            env.contains(&"UCX_NET_DEVICES=mlx5_3:1,mlx5_0:1".to_string()),
            "{env:?}"
        );
        let env = claim_env(EnvFlavour::None, &topology());
        assert!(env.iter().all(|e| e.starts_with("TANDEM_")), "{env:?}");
    }

    #[test]
    fn tpu_env_names_the_chips_and_their_grid() {
        assert!(tpu_env(&[]).is_empty());
        assert_eq!(
            tpu_env(&[2]),
            [
                "TPU_VISIBLE_CHIPS=2",
                "TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1",
                "TPU_PROCESS_BOUNDS=1,1,1"
            ]
        );
        assert_eq!(tpu_env(&[0, 1])[1], "TPU_CHIPS_PER_PROCESS_BOUNDS=1,2,1");
        assert_eq!(tpu_env(&[0, 1, 2, 3])[0], "TPU_VISIBLE_CHIPS=0,1,2,3");
        assert_eq!(
            tpu_env(&[0, 1, 2, 3])[1],
            "TPU_CHIPS_PER_PROCESS_BOUNDS=2,2,1"
        );
        assert_eq!(tpu_env(&[0; 8])[1], "TPU_CHIPS_PER_PROCESS_BOUNDS=2,4,1");
    }

    #[test]
    fn plain_ethernet_nics_give_no_hca_list() {
        let mut t = topology();
        t.nics = vec![nic("nic-a", None), nic("nic-b", None)];
        let env = claim_env(EnvFlavour::Nccl, &t);
        assert!(!env.iter().any(|e| e.starts_with("NCCL_IB_HCA")), "{env:?}");
    }
}
