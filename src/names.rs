//! Names other people depend on (design.md): the driver, attribute keys, device names.
//! Spelled here once; everything else refers to these.

use crate::topology::address::PciAddress;

pub const DEFAULT_DRIVER_NAME: &str = "tandem.dev";
pub const STANDARD_ATTRIBUTE_DOMAIN: &str = "resource.kubernetes.io";
pub const ATTR_PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
pub const ATTR_PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";

/// `gpu-dddd-bb-dd-f`: the device name of an accelerator, stable across reboots.
pub fn accelerator_device_name(address: &PciAddress) -> String {
    format!("gpu-{}", address.dashed())
}

/// `nic-dddd-bb-dd-f`: the device name of a NIC, stable while its netdev is inside a pod.
pub fn nic_device_name(address: &PciAddress) -> String {
    format!("nic-{}", address.dashed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_follow_design() {
        let a: PciAddress = "0000:18:00.0".parse().unwrap();
        assert_eq!(accelerator_device_name(&a), "gpu-0000-18-00-0");
        assert_eq!(nic_device_name(&a), "nic-0000-18-00-0");
    }
}
