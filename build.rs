//! Build script: the PCI ID database of the `pci-ids` crate, re-encoded for the binary without
//! a single pointer.
//!
//! `pci-ids` keeps its ~20,000 devices and their subsystems as statics full of `&'static str`
//! and slices. In a position-independent executable every such pointer is a relocation that
//! the loader writes at each start, so 1.6 MB of the node agent's idle RSS was that table,
//! copied and relocated whether or not a name was ever looked up. Here the same data (read
//! through the crate, so the database and its parsing stay the crate's) becomes three byte
//! tables that `src/sysfs/pci_names.rs` searches in place: read-only file pages, of which a
//! lookup touches a few.
//!
//! Layout (little-endian), written to `$OUT_DIR`:
//! - `pci_names.bin`: every vendor and device name, UTF-8, back to back;
//! - `pci_vendors.bin`: per vendor, sorted by ID, 14 bytes: ID u16, name offset u32, name
//!   length u16, first device u32, device count u16;
//! - `pci_devices.bin`: per device, grouped by vendor as above and sorted by ID within it
//!   (the database's order kept among equal IDs), 8 bytes: ID u16, name offset u32, name
//!   length u16.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // Inputs of the node binary's link (hack/link-hot-first.sh, the linker .cargo/config.toml
    // names): a new list must relink it, which cargo does not know on its own.
    println!("cargo::rerun-if-changed=hack/link-hot-first.sh");
    println!("cargo::rerun-if-changed=hack/hot-functions.txt");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut names: Vec<u8> = Vec::new();
    let mut name = |text: &str| -> (u32, u16) {
        let offset = u32::try_from(names.len()).expect("names under 4 GiB");
        let length = u16::try_from(text.len()).expect("a PCI name under 64 KiB");
        names.extend_from_slice(text.as_bytes());
        (offset, length)
    };
    let mut vendors: Vec<&pci_ids::Vendor> = pci_ids::Vendors::iter().collect();
    vendors.sort_by_key(|v| v.id());
    let (mut vendor_table, mut device_table) = (Vec::new(), Vec::new());
    let mut device_count: u32 = 0;
    for vendor in vendors {
        let (offset, length) = name(vendor.name());
        let mut devices: Vec<&pci_ids::Device> = vendor.devices().collect();
        devices.sort_by_key(|d| d.id());
        let count = u16::try_from(devices.len()).expect("under 65536 devices per vendor");
        vendor_table.extend_from_slice(&vendor.id().to_le_bytes());
        vendor_table.extend_from_slice(&offset.to_le_bytes());
        vendor_table.extend_from_slice(&length.to_le_bytes());
        vendor_table.extend_from_slice(&device_count.to_le_bytes());
        vendor_table.extend_from_slice(&count.to_le_bytes());
        for device in devices {
            let (offset, length) = name(device.name());
            device_table.extend_from_slice(&device.id().to_le_bytes());
            device_table.extend_from_slice(&offset.to_le_bytes());
            device_table.extend_from_slice(&length.to_le_bytes());
        }
        device_count += u32::from(count);
    }
    for (file, bytes) in [
        ("pci_names.bin", &names),
        ("pci_vendors.bin", &vendor_table),
        ("pci_devices.bin", &device_table),
    ] {
        std::fs::write(out.join(file), bytes).expect("writing to OUT_DIR");
    }
}
