//! ResourceSlice publishing cost (`cargo bench --bench slices`): building and publishing a
//! node's slices from scratch, then the steady state, against the in-process fake apiserver
//! (loopback HTTP, real validation). Prints a Markdown table for BENCHMARKS.md.

use std::time::{Duration, Instant};
use tandem::apiserver_fake::FakeApiServer;
use tandem::fixture::{builtin, synthetic, write_machine};
use tandem::slices::{NodeIdentity, SliceOptions, build_slices};
use tandem::sysfs::discover;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::Publisher;

/// A 30 s rescan period gives 120 publishes an hour.
const PUBLISHES_PER_HOUR: usize = 120;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    label: &str,
    inventory: &Inventory,
    options: &SliceOptions,
) {
    let devices = inventory.accelerators.len() + inventory.nics.len();
    let node = NodeIdentity {
        name: "bench-node".into(),
        uid: "bench-uid".into(),
    };
    let mut build_times = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        std::hint::black_box(build_slices(inventory, &node, "tandem.dev", options));
        build_times.push(t0.elapsed());
    }
    let slices = build_slices(inventory, &node, "tandem.dev", options);
    runtime.block_on(async {
        let mut cold_times = Vec::new();
        let mut cold_writes = 0;
        for _ in 0..5 {
            let server = FakeApiServer::start().await.expect("fake apiserver");
            let publisher = Publisher::new(server.client(), "tandem.dev", &node.name);
            let t0 = Instant::now();
            publisher.publish(&slices).await.expect("cold publish");
            cold_times.push(t0.elapsed());
            cold_writes = server.write_count();
            server.shutdown().await;
        }
        let server = FakeApiServer::start().await.expect("fake apiserver");
        let publisher = Publisher::new(server.client(), "tandem.dev", &node.name);
        publisher.publish(&slices).await.expect("initial publish");
        let before = server.write_count();
        let mut steady_times = Vec::new();
        for _ in 0..PUBLISHES_PER_HOUR {
            // Rebuilt every time, as each rescan does.
            let rebuilt = build_slices(inventory, &node, "tandem.dev", options);
            let t0 = Instant::now();
            publisher.publish(&rebuilt).await.expect("steady publish");
            steady_times.push(t0.elapsed());
        }
        let steady_writes = server.write_count() - before;
        server.shutdown().await;
        println!(
            "| {label} | {devices} | {} | {:.2} | {:.1} | {cold_writes} | {:.2} | {steady_writes} |",
            slices.len(),
            median(build_times.clone()).as_secs_f64() * 1e3,
            median(cold_times).as_secs_f64() * 1e3,
            median(steady_times).as_secs_f64() * 1e3,
        );
    });
}

fn main() {
    // `cargo test --benches` runs this with `--test`; keep that fast.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    println!(
        "| node | devices | slices | build ms (median) | cold publish ms (median) | cold writes | steady publish ms (median) | writes/hour at steady state |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let machines = [
        ("dgx-h100", builtin("dgx-h100").expect("builtin")),
        ("synthetic 1024", synthetic(512, 512)),
    ];
    for (label, description) in machines {
        let dir = tandem::fixture::scratch_dir().expect("scratch dir");
        let roots = write_machine(&description, dir.path()).expect("write fixture");
        let inventory = discover(&roots).expect("discover");
        measure(&runtime, label, &inventory, &SliceOptions::default());
        let tainted = SliceOptions {
            device_taints: true,
            ..Default::default()
        };
        measure(
            &runtime,
            &format!("{label}, --device-taints"),
            &inventory,
            &tainted,
        );
    }
}
