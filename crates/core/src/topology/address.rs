//! PCI addresses (`dddd:bb:dd.f`) and PCIe root names (`pciDDDD:BB`): parsed once, printed
//! the way the kernel and the `resource.kubernetes.io` attributes spell them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A PCI function address. Ordering is numeric (domain, bus, device, function), which is the
/// "lowest BDF" order used for every deterministic tie-break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: expected dddd:bb:dd.f in hex")]
pub struct InvalidPciAddress {
    pub input: String,
}

impl PciAddress {
    pub const fn new(domain: u32, bus: u8, device: u8, function: u8) -> Self {
        Self {
            domain,
            bus,
            device,
            function,
        }
    }

    /// The PCIe root (host bridge) name this address would sit under when it hangs directly
    /// off the root bus: `pci<domain>:<bus>`.
    pub fn root_name(&self) -> String {
        format!("pci{:04x}:{:02x}", self.domain, self.bus)
    }

    /// `dddd-bb-dd-f`, the DNS-label-safe spelling used in device names.
    pub fn dashed(&self) -> String {
        format!(
            "{:04x}-{:02x}-{:02x}-{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = InvalidPciAddress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidPciAddress {
            input: s.to_string(),
        };
        let (domain, rest) = s.split_once(':').ok_or_else(err)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(err)?;
        let (device, function) = rest.split_once('.').ok_or_else(err)?;
        let hex_field = |v: &str, max_len: usize| -> Result<u32, InvalidPciAddress> {
            if v.is_empty() || v.len() > max_len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(v, 16).map_err(|_| err())
        };
        let domain = hex_field(domain, 8)?;
        let bus = hex_field(bus, 2)?;
        let device = hex_field(device, 2)?;
        let function = hex_field(function, 1)?;
        if device > 0x1f || function > 7 {
            return Err(err());
        }
        Ok(Self::new(domain, bus as u8, device as u8, function as u8))
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a PCIe root directory name as sysfs spells it (`pci0000:00`).
pub fn is_root_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("pci") else {
        return false;
    };
    let Some((domain, bus)) = rest.split_once(':') else {
        return false;
    };
    (4..=8).contains(&domain.len())
        && bus.len() == 2
        && domain
            .bytes()
            .chain(bus.bytes())
            .all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_lowercase() {
        let a: PciAddress = "0000:9A:00.1".parse().unwrap();
        assert_eq!(a.to_string(), "0000:9a:00.1");
        assert_eq!(a.dashed(), "0000-9a-00-1");
        assert_eq!(a.root_name(), "pci0000:9a");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "0000:18:00",
            "0000:18:00.8",
            "0000:18:20.0",
            "zz:18:00.0",
            "0000:180:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn orders_numerically() {
        let a: PciAddress = "0000:09:00.0".parse().unwrap();
        let b: PciAddress = "0000:10:00.0".parse().unwrap();
        let c: PciAddress = "0001:00:00.0".parse().unwrap();
        assert!(a < b && b < c);
    }

    #[test]
    fn wide_domains_round_trip_as_the_kernel_prints_them() {
        // VMD and some hypervisors use domains above 0xffff; the kernel prints them unpadded
        // beyond four digits, and pciBusID must be that same text.
        for text in ["10000:e1:00.0", "1a2b3:00:00.0", "0001:00:00.0"] {
            let a: PciAddress = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        let a: PciAddress = "10000:e1:00.0".parse().unwrap();
        assert_eq!(a.root_name(), "pci10000:e1");
        assert_eq!(a.dashed(), "10000-e1-00-0");
        assert!(is_root_name("pci10000:e1"));
    }

    #[test]
    fn root_names() {
        assert!(is_root_name("pci0000:00"));
        assert!(is_root_name("pci0018:00"));
        assert!(!is_root_name("pci0000:0"));
        assert!(!is_root_name("virtual"));
    }
}
