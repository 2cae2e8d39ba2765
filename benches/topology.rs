//! Discovery + pairing cost on fixture machines (`cargo bench --bench topology`).
//! Each machine is written once to a temporary sysfs tree; the timed step is what the plugin
//! does on every rescan: `discover` the tree, then pair the node and compute pair groups.
//! Prints a Markdown table for BENCHMARKS.md.

use std::time::{Duration, Instant};
use tandem::fixture::{MachineDescription, builtin, synthetic, write_machine};
use tandem::sysfs::discover;
use tandem::topology::{pair_groups, pair_node};

fn measure(label: &str, description: &MachineDescription) {
    let dir = tandem::fixture::scratch_dir().expect("scratch dir");
    let roots = write_machine(description, dir.path()).expect("write fixture");
    // Warm the page cache and the allocator as a long-running plugin would be.
    let warm = discover(&roots).expect("discover");
    let devices = warm.accelerators.len() + warm.nics.len();
    let mut discovery = Vec::new();
    let mut pairing = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while discovery.len() < 5 || (Instant::now() < deadline && discovery.len() < 2000) {
        let t0 = Instant::now();
        let inventory = discover(&roots).expect("discover");
        let t1 = Instant::now();
        let pairs = pair_node(&inventory);
        let groups = pair_groups(&inventory);
        let t2 = Instant::now();
        std::hint::black_box((pairs, groups));
        discovery.push(t1 - t0);
        pairing.push(t2 - t1);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let runs = discovery.len();
    let d = median(&mut discovery);
    let p = median(&mut pairing);
    println!(
        "| {label} | {devices} | {:.3} | {:.3} | {:.3} | {runs} |",
        d.as_secs_f64() * 1e3,
        p.as_secs_f64() * 1e3,
        (d + p).as_secs_f64() * 1e3,
    );
}

fn main() {
    // `cargo test --benches` runs this with `--bench`-less args; keep that fast.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    println!(
        "| machine | devices | discovery ms (median) | pairing + groups ms | total ms | runs |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for name in ["dgx-h100", "large"] {
        let description = builtin(name).expect("builtin fixture");
        measure(name, &description);
    }
    for devices in [16usize, 64, 256, 1024] {
        measure(
            &format!("synthetic-{devices}"),
            &synthetic(devices / 2, devices / 2),
        );
    }
}
