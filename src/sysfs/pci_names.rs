//! Vendor and device names from the PCI ID database, looked up in the pointer-free tables the
//! build script makes from the `pci-ids` crate (see `build.rs` for why and for the layout):
//! a binary search over the vendors, then over that vendor's devices.

static NAMES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pci_names.bin"));
static VENDORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pci_vendors.bin"));
static DEVICES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pci_devices.bin"));

const VENDOR_RECORD: usize = 14;
const DEVICE_RECORD: usize = 8;

fn u16_at(table: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([table[at], table[at + 1]])
}

fn u32_at(table: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([table[at], table[at + 1], table[at + 2], table[at + 3]])
}

/// The name at `offset`, `length` bytes long, in the names table.
fn name(offset: u32, length: u16) -> Option<&'static str> {
    let start = usize::try_from(offset).ok()?;
    let bytes = NAMES.get(start..start + usize::from(length))?;
    std::str::from_utf8(bytes).ok()
}

/// Index of the first of `count` records of `size` bytes from `base` whose leading u16 ID is
/// `id`, if any (the records are sorted by ID).
fn find(table: &[u8], base: usize, count: usize, size: usize, id: u16) -> Option<usize> {
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = low + (high - low) / 2;
        if u16_at(table, (base + middle) * size) < id {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    (low < count && u16_at(table, (base + low) * size) == id).then_some(base + low)
}

/// The vendor record of `vendor_id`: its byte offset in `VENDORS`.
fn vendor_record(vendor_id: u16) -> Option<usize> {
    let count = VENDORS.len() / VENDOR_RECORD;
    find(VENDORS, 0, count, VENDOR_RECORD, vendor_id).map(|i| i * VENDOR_RECORD)
}

/// The vendor's name ("NVIDIA Corporation"), if the database knows the vendor.
pub fn vendor_name(vendor_id: u16) -> Option<&'static str> {
    let at = vendor_record(vendor_id)?;
    name(u32_at(VENDORS, at + 2), u16_at(VENDORS, at + 6))
}

/// The device's name ("GH100 [H100 SXM5 80GB]"), if the database knows it. Where the database
/// lists an ID twice for a vendor, the first entry wins, as in `pci_ids::Device::from_vid_pid`.
pub fn device_name(vendor_id: u16, device_id: u16) -> Option<&'static str> {
    let at = vendor_record(vendor_id)?;
    let first = usize::try_from(u32_at(VENDORS, at + 8)).ok()?;
    let count = usize::from(u16_at(VENDORS, at + 12));
    let record = find(DEVICES, first, count, DEVICE_RECORD, device_id)? * DEVICE_RECORD;
    name(u32_at(DEVICES, record + 2), u16_at(DEVICES, record + 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vendors_and_devices_are_named() {
        assert_eq!(vendor_name(0x10de), Some("NVIDIA Corporation"));
        assert_eq!(device_name(0x10de, 0x2330), Some("GH100 [H100 SXM5 80GB]"));
        assert_eq!(
            device_name(0x8086, 0x1572),
            Some("Ethernet Controller X710 for 10GbE SFP+")
        );
        assert_eq!(vendor_name(0x15b3), Some("Mellanox Technologies"));
    }

    #[test]
    fn unknown_ids_have_no_name() {
        assert_eq!(vendor_name(0x0000), None);
        assert_eq!(device_name(0x10de, 0xfffe), None);
        assert_eq!(device_name(0x0000, 0x0001), None);
    }

    /// Every vendor and device of the `pci-ids` crate has the same name here.
    #[test]
    fn every_entry_of_the_crate_is_found_with_its_name() {
        let mut devices = 0;
        for vendor in pci_ids::Vendors::iter() {
            assert_eq!(vendor_name(vendor.id()), Some(vendor.name()));
            for device in vendor.devices() {
                let expected = pci_ids::Device::from_vid_pid(vendor.id(), device.id());
                assert_eq!(
                    device_name(vendor.id(), device.id()),
                    expected.map(|d| d.name()),
                    "{:04x}:{:04x}",
                    vendor.id(),
                    device.id()
                );
                devices += 1;
            }
        }
        assert!(devices > 10_000, "only {devices} devices in the database");
    }
}
