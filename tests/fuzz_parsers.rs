//! Bounded property tests over every sysfs/procfs parser: arbitrary strings and bytes never
//! panic a parser, and parsers with a printer round-trip. cargo-fuzz needs a nightly toolchain
//! and this project builds on stable, so proptest stands in for libFuzzer over the same entry
//! points. `TANDEM_FUZZ_CASES` raises the case count for longer local runs.

#[path = "support/tree_walk.rs"]
mod tree_walk;
use std::collections::BTreeSet;
use std::path::Path;

use proptest::prelude::*;
use tandem::fixture;
use tandem::sysfs::accelerators::{parse_nvidia_information, parse_nvidia_version};
use tandem::sysfs::chardev::{ProcDevices, parse_dev_numbers};
use tandem::sysfs::cpulist::CpuList;
use tandem::sysfs::nics::{parse_port_state, parse_rate_gbps};
use tandem::sysfs::numa::parse_distances;
use tandem::sysfs::pci::{NumaNodeFile, aer_counter, parse_class, parse_hex_u16, parse_numa_node};
use tandem::sysfs::{MachineRoots, discover};
use tandem::topology::PciAddress;

/// Cases per property: small by default so the whole file stays within a few seconds on two
/// shared cores in CI.
fn cases(default: u32) -> u32 {
    std::env::var("TANDEM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text shaped like sysfs attributes: digits, separators and the words the kernel prints,
/// mixed with arbitrary unicode, so the interesting branches are reached, not only "bad".
fn sysfs_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[0-9]{1,12}",
        Just(",".to_string()),
        Just("-".to_string()),
        Just(":".to_string()),
        Just(" ".to_string()),
        Just("\n".to_string()),
        Just(".".to_string()),
        Just("0x".to_string()),
        Just("Gb/sec".to_string()),
        Just("ACTIVE".to_string()),
        Just("Character devices:".to_string()),
        Just("Block devices:".to_string()),
        Just("Kernel Module".to_string()),
        Just("Model:".to_string()),
        Just("GPU UUID:".to_string()),
        Just("Device Minor:".to_string()),
        Just("\t".to_string()),
        Just("-1".to_string()),
        Just("4294967296".to_string()),
        Just("99999999999999999999999".to_string()),
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn every_parser(text: &str) {
    let _ = CpuList::parse(text);
    let _ = parse_dev_numbers(text);
    let _ = ProcDevices::parse(text).major("nvidia");
    let _ = parse_port_state(text);
    let _ = parse_rate_gbps(text);
    let _ = parse_nvidia_information(text);
    let _ = parse_nvidia_version(text);
    let _ = parse_distances(text);
    let _ = parse_numa_node(text);
    let _ = parse_hex_u16(text);
    let _ = parse_class(text);
    let _ = aer_counter(text, "TOTAL_ERR_FATAL");
    let _ = text.parse::<PciAddress>();
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn no_parser_panics_on_sysfs_like_text(text in sysfs_like()) {
        every_parser(&text);
    }

    #[test]
    fn no_parser_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        // The reader hands parsers lossily decoded text; bad UTF-8 must not reach a panic.
        every_parser(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn cpu_list_prints_what_it_parsed(text in sysfs_like()) {
        if let Ok(list) = CpuList::parse(&text) {
            let printed = list.to_string();
            prop_assert_eq!(CpuList::parse(&printed), Ok(list), "printed as {:?}", printed);
        }
    }

    #[test]
    fn cpu_list_of_any_set_round_trips(cpus in prop::collection::btree_set(0u32..5000, 0..200)) {
        let list = CpuList::from_cpus(cpus.iter().copied());
        let printed = list.to_string();
        let parsed = CpuList::parse(&printed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let members: BTreeSet<u32> = (0..5000).filter(|&c| parsed.contains(c)).collect();
        prop_assert_eq!(members, cpus);
        prop_assert_eq!(parsed, list);
    }

    #[test]
    fn dev_numbers_round_trip(major in any::<u32>(), minor in any::<u32>()) {
        prop_assert_eq!(parse_dev_numbers(&format!("{major}:{minor}\n")), Some((major, minor)));
    }

    #[test]
    fn numa_node_and_ids_round_trip(node in any::<u32>(), id in any::<u16>(), class in 0u32..0x100_0000) {
        prop_assert_eq!(parse_numa_node(&node.to_string()), Some(NumaNodeFile::Node(node)));
        prop_assert_eq!(parse_hex_u16(&format!("0x{id:04x}")), Some(id));
        prop_assert_eq!(parse_class(&format!("0x{class:06x}")), Some(class));
    }

    #[test]
    fn pci_address_round_trips(domain in 0u32..=0xffff, bus in any::<u8>(), device in 0u8..32, function in 0u8..8) {
        let address = PciAddress::new(domain, bus, device, function);
        prop_assert_eq!(address.to_string().parse::<PciAddress>(), Ok(address));
    }

    #[test]
    fn port_state_and_rate_read_what_the_kernel_prints(number in 0u32..10, name in "[A-Za-z_]{1,12}", rate in any::<u32>()) {
        prop_assert_eq!(parse_port_state(&format!("{number}: {name}\n")), Some(name));
        prop_assert_eq!(parse_rate_gbps(&format!("{rate} Gb/sec (4X NDR)\n")), Some(u64::from(rate)));
    }

    #[test]
    fn distances_round_trip(distances in prop::collection::vec(any::<u32>(), 0..64)) {
        let printed: Vec<String> = distances.iter().map(u32::to_string).collect();
        prop_assert_eq!(parse_distances(&format!("{}\n", printed.join(" "))), Some(distances));
    }
}

/// Files of the fixture that discovery parses, relative to the sysfs root, found by name so
/// the test follows the fixture's layout rather than hard-coding it.
fn parsed_files(sys: &Path) -> Vec<std::path::PathBuf> {
    const NAMES: &[&str] = &[
        "state",
        "rate",
        "numa_node",
        "local_cpulist",
        "cpulist",
        "distance",
        "dev",
        "vendor",
        "device",
        "class",
        "speed",
        "operstate",
        "link_layer",
        "aer_dev_fatal",
    ];
    tree_walk::entries_under(sys)
        .into_iter()
        .filter(|(path, kind)| {
            kind.is_file()
                && path
                    .file_name()
                    .is_some_and(|n| NAMES.contains(&n.to_string_lossy().as_ref()))
        })
        .map(|(path, _)| path)
        .collect()
}

/// Whole-tree fuzzing: any parsed sysfs file replaced by arbitrary bytes leaves discovery
/// with an Inventory or a typed error, never a panic.
#[test]
fn discovery_survives_arbitrary_bytes_in_any_parsed_file() {
    let dir = tempfile::tempdir().unwrap();
    let roots: MachineRoots = fixture::write_machine(
        &fixture::builtin("dgx-h100").unwrap(),
        &dir.path().join("machine"),
    )
    .unwrap();
    let files = parsed_files(&roots.sys);
    assert!(
        files.len() > 20,
        "fixture has only {} parsed files",
        files.len()
    );
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut runner = proptest::test_runner::TestRunner::new(config(150));
    let strategy = (
        0..files.len(),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            sysfs_like().prop_map(String::into_bytes),
        ],
    );
    runner
        .run(&strategy, |(index, bytes)| {
            std::fs::write(&files[index], &bytes).unwrap();
            let outcome = std::panic::catch_unwind(|| discover(&roots).map(|_| ()));
            std::fs::write(&files[index], &originals[index]).unwrap();
            prop_assert!(
                outcome.is_ok(),
                "discovery panicked with {:?} in {}",
                bytes,
                files[index].display()
            );
            Ok(())
        })
        .unwrap();
    discover(&roots).expect("the restored fixture must discover again");
}

/// Regression inputs kept from earlier runs and hand-picked edge cases.
#[test]
fn edge_cases_stay_handled() {
    for text in [
        "",
        "\n",
        "-",
        ",",
        "0-",
        "-0",
        "4294967295",
        "1048577",
        "0-1048576",
        "5-3",
        "1,,2",
        "0:",
        ":0",
        "\u{0}",
        "\u{feff}4: ACTIVE",
        "٣",
        "４",
        "1.5.5 Gb/sec",
        ". Gb/sec",
    ] {
        every_parser(text);
    }
    assert_eq!(
        CpuList::parse("0-1048576").unwrap().to_string(),
        "0-1048576"
    );
    assert!(CpuList::parse("1048577").is_err());
    assert_eq!(parse_rate_gbps(". Gb/sec"), None);
    assert_eq!(parse_port_state("٣: ACTIVE"), None);
}
