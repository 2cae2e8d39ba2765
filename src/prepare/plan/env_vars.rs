//! The claim-wide environment: one env flavour for the whole claim, the TPU chip list and
//! the legacy `NVIDIA_VISIBLE_DEVICES`.

use super::{Accelerators, PerRequest, PlanContext, PrepareError};
use crate::prepare::config::EnvFlavour;
use crate::prepare::env::{claim_env, tpu_env};
use crate::prepare::topology_file::ClaimTopology;
use crate::topology::{Accelerator, AcceleratorKind, Inventory};
use tandem_kubelet_plugin::claim::{AllocatedDevice, ClaimRef};

/// The claim's environment variables, for every container of the claim.
pub(super) fn claim_env_vars(
    ctx: &PlanContext<'_>,
    flavour: EnvFlavour,
    topology: &ClaimTopology,
    accelerators: &Accelerators<'_>,
) -> Vec<String> {
    let mut env = claim_env(flavour, topology);
    env.extend(tpu_env(&tpu_chips(ctx.inventory, accelerators)));
    if ctx.nvidia_legacy_env {
        let uuids: Vec<&str> = accelerators
            .iter()
            .filter(|(_, a)| a.kind == AcceleratorKind::NvidiaGpu && !a.vfio)
            .filter_map(|(_, a)| a.uuid.as_deref())
            .collect();
        if !uuids.is_empty() {
            env.push(format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")));
        }
    }
    env
}

/// One env flavour per claim: the environment is claim-wide, so requests that ask for
/// different flavours contradict each other.
pub(super) fn claim_flavour(
    claim: &ClaimRef,
    per_request: &PerRequest,
) -> Result<EnvFlavour, PrepareError> {
    let mut chosen: Option<(&str, EnvFlavour)> = None;
    for (request, config) in per_request {
        match chosen {
            None => chosen = Some((request, config.env)),
            Some((first, env)) if env != config.env => {
                return Err(PrepareError::ConflictingConfig {
                    claim: claim.to_string(),
                    reason: format!(
                        "request {first:?} asks for env {env:?} but request {request:?} for {:?}; \
                         the environment is claim-wide",
                        config.env
                    ),
                });
            }
            Some(_) => {}
        }
    }
    Ok(chosen.map(|(_, env)| env).unwrap_or_default())
}

/// Google's PCI vendor ID: its class 0x12 functions are TPU chips.
pub(super) const VENDOR_GOOGLE: u16 = 0x1ae0;

fn is_tpu(a: &Accelerator) -> bool {
    a.kind == AcceleratorKind::ProcessingAccelerator && a.pci.vendor_id == VENDOR_GOOGLE
}

/// Host chip indices of the claim's TPUs, as libtpu numbers them: the `accel<N>` number of a
/// chip with an accel node, else the chip's place among the node's TPUs in PCI bus order
/// (the order `/dev/vfio` groups and accel nodes are created in).
fn tpu_chips(inventory: &Inventory, accelerators: &[(&AllocatedDevice, &Accelerator)]) -> Vec<u32> {
    let mut host: Vec<&Accelerator> = inventory
        .accelerators
        .iter()
        .filter(|a| is_tpu(a))
        .collect();
    host.sort_by_key(|a| a.pci.address);
    let mut chips: Vec<u32> = accelerators
        .iter()
        .filter(|(_, a)| is_tpu(a))
        .filter_map(|(_, a)| {
            let accel = a.char_devices.iter().find_map(|c| {
                c.path
                    .strip_prefix("accel/accel")
                    .and_then(|n| n.parse::<u32>().ok())
            });
            accel.or_else(|| {
                host.iter()
                    .position(|h| h.pci.address == a.pci.address)
                    .and_then(|i| u32::try_from(i).ok())
            })
        })
        .collect();
    chips.sort_unstable();
    chips
}
