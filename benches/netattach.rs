//! What exclusive NIC attach adds to a container start and to unprepare
//! (`cargo bench --bench netattach`): the release `tandem hook attach` runs as a runtime runs a
//! createRuntime hook, against a veth "NIC" in namespaces of its own, and the in-process
//! release brings it back each round. Prints Markdown tables; skips (exit 0) when not root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem::netattach::record::{InterfaceRequest, attach_recorded, release_claim_dir};
use tandem::netattach::{DEFAULT_NETLINK_TIMEOUT, Guards, Netns, interface_in_netns};

#[path = "../tests/support/netns.rs"]
mod netns;
use netns::{add_netns_or_skip, delete_netns, ip, unique_tag};

const DEFAULT_ITERATIONS: usize = 200;
const NIC_IFNAME: &str = "ibp24s0";
const POD_IFNAME: &str = "rdma0";
/// The argument preparation writes into the CDI hook for dgx-h100's first NIC.
const INTERFACE_ARG: &str = "host=ibp24s0,pod=rdma0,pci=0000:18:00.0";
const CLAIM_UID: &str = "0b6f3c2e-bench-claim";
const SOURCE_TABLE: &str = "120";
const TIME: &str = "/usr/bin/time";

/// A "host" namespace whose veth `ibp24s0` carries what a multi-NIC RDMA node gives each NIC
/// (IPv4 + IPv6 address, MTU 9000, a gateway route, its own table with default routes and
/// `from` rules) and a "pod" namespace holding a process, as a pod sandbox does. Both go on
/// drop, with the links in them.
struct Lab {
    host_ns: String,
    pod_ns: String,
    pod_process: Child,
    state: tempfile::TempDir,
}

impl Lab {
    fn new() -> Option<Self> {
        let (tag, _) = unique_tag();
        let host_ns = format!("tdbh{tag}");
        if !add_netns_or_skip(&host_ns) {
            return None;
        }
        let pod_ns = format!("tdbp{tag}");
        ip(&["netns", "add", &pod_ns]);
        let pod_process = Command::new("ip")
            .args(["netns", "exec", &pod_ns, "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the pod's process");
        // The record is fsynced, so its disk matters: the default temp dir is the VM's disk,
        // as /var/lib/tandem is on a node; TANDEM_BENCH_STATE_PARENT=/dev/shm shows the
        // share of the fsyncs.
        let state = match std::env::var_os("TANDEM_BENCH_STATE_PARENT") {
            Some(parent) => tempfile::tempdir_in(parent),
            None => tempfile::tempdir(),
        }
        .expect("state dir");
        let lab = Lab {
            host_ns,
            pod_ns,
            pod_process,
            state,
        };
        let h = lab.host_ns.as_str();
        ip(&[
            "-n", h, "link", "add", NIC_IFNAME, "type", "veth", "peer", "name", "tdbpeer",
        ]);
        ip(&["-n", h, "link", "set", NIC_IFNAME, "mtu", "9000", "up"]);
        ip(&["-n", h, "link", "set", "tdbpeer", "mtu", "9000", "up"]);
        ip(&["-n", h, "addr", "add", "10.220.0.2/24", "dev", NIC_IFNAME]);
        ip(&[
            "-n",
            h,
            "-6",
            "addr",
            "add",
            "fd00:220::2/64",
            "dev",
            NIC_IFNAME,
            "nodad",
        ]);
        ip(&[
            "-n",
            h,
            "route",
            "add",
            "10.221.0.0/24",
            "via",
            "10.220.0.1",
            "dev",
            NIC_IFNAME,
        ]);
        ip(&[
            "-n",
            h,
            "route",
            "add",
            "default",
            "via",
            "10.220.0.1",
            "dev",
            NIC_IFNAME,
            "table",
            SOURCE_TABLE,
        ]);
        ip(&[
            "-n",
            h,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:220::1",
            "dev",
            NIC_IFNAME,
            "table",
            SOURCE_TABLE,
        ]);
        for (family, from) in [("-4", "10.220.0.2"), ("-6", "fd00:220::2")] {
            ip(&[
                "-n",
                h,
                family,
                "rule",
                "add",
                "from",
                from,
                "table",
                SOURCE_TABLE,
                "pref",
                "1020",
            ]);
        }
        lab.wait_for_pod_process();
        Some(lab)
    }

    /// `ip netns exec` execs the command, so the child's pid is the sleeping process once it
    /// has entered the pod namespace.
    fn wait_for_pod_process(&self) {
        let inode = |path: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).ok().map(|m| m.ino())
        };
        let pod = inode(&self.ns_path(&self.pod_ns));
        let own = PathBuf::from(format!("/proc/{}/ns/net", self.pod_process.id()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while pod.is_none() || inode(&own) != pod {
            assert!(
                Instant::now() < deadline,
                "pod process never entered {own:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ns_path(&self, name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }

    fn claim_dir(&self) -> PathBuf {
        tandem::prepare::claim_state_dir(self.state.path(), CLAIM_UID)
    }

    fn in_ns(&self, ns: &str, ifname: &str) -> bool {
        let ns = Netns::open(&self.ns_path(ns)).expect("open namespace");
        interface_in_netns(&ns, ifname, DEFAULT_NETLINK_TIMEOUT).expect("link lookup")
    }

    fn attached(&self) -> bool {
        self.in_ns(&self.pod_ns, POD_IFNAME) && !self.in_ns(&self.host_ns, NIC_IFNAME)
    }

    fn released(&self) -> bool {
        self.in_ns(&self.host_ns, NIC_IFNAME) && !self.in_ns(&self.pod_ns, POD_IFNAME)
    }

    /// Runs the hook for `container` as a runtime does at createRuntime: a new process in
    /// the host namespace, the OCI state on stdin; timed from spawn to exit. With
    /// `rss_file`, GNU time writes the hook's peak RSS (KiB) there.
    fn run_hook(&self, binary: &Path, container: &str, rss_file: Option<&Path>) -> Duration {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host_ns]);
        if let Some(file) = rss_file {
            command.args([TIME, "-f", "%M", "-o"]).arg(file);
        }
        command
            .arg(binary)
            .args(["hook", "attach", "--claim-uid", CLAIM_UID, "--state-dir"])
            .arg(self.state.path())
            .args(["--interface", INTERFACE_ARG])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let state = serde_json::json!({
            "ociVersion": "1.2.0", "id": container, "status": "creating",
            "pid": self.pod_process.id(), "bundle": "/run/containerd/bundle",
        })
        .to_string();
        let start = Instant::now();
        let mut child = command.spawn().expect("spawn the hook");
        child
            .stdin
            .take()
            .expect("hook stdin")
            .write_all(state.as_bytes())
            .expect("write the OCI state");
        let out = child.wait_with_output().expect("wait for the hook");
        let elapsed = start.elapsed();
        assert!(
            out.status.success(),
            "hook for {container} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        elapsed
    }

    /// What unprepare does for the claim; the interface must come back.
    fn release(&self) -> Duration {
        let start = Instant::now();
        let released = release_claim_dir(
            &self.claim_dir(),
            &self.ns_path(&self.host_ns),
            Path::new("/proc"),
            Path::new("/run/netns"),
            DEFAULT_NETLINK_TIMEOUT,
        )
        .expect("release");
        let elapsed = start.elapsed();
        assert_eq!(released, 1, "release found nothing recorded");
        elapsed
    }

    /// The hook's work without its process: the same call `tandem hook attach` makes.
    fn attach_in_process(&self, request: &InterfaceRequest) -> Duration {
        let start = Instant::now();
        let host = Netns::open(&self.ns_path(&self.host_ns)).expect("host namespace");
        attach_recorded(
            &self.claim_dir(),
            &host,
            Path::new("/proc"),
            self.pod_process.id(),
            std::slice::from_ref(request),
            &Guards::default(),
            DEFAULT_NETLINK_TIMEOUT,
        )
        .expect("in-process attach");
        start.elapsed()
    }

    /// Asserts the NIC came home with everything the hook took into the pod.
    fn assert_host_config_intact(&self) {
        let h = self.host_ns.as_str();
        let link = ip(&["-n", h, "-o", "link", "show", "dev", NIC_IFNAME]);
        assert!(link.contains("mtu 9000") && link.contains("UP"), "{link}");
        let addrs = ip(&["-n", h, "-o", "addr", "show", "dev", NIC_IFNAME]);
        assert!(
            addrs.contains("10.220.0.2/24") && addrs.contains("fd00:220::2/64"),
            "{addrs}"
        );
        let routes = ip(&["-n", h, "route", "show", "dev", NIC_IFNAME]);
        assert!(routes.contains("10.221.0.0/24 via 10.220.0.1"), "{routes}");
        for family in ["-4", "-6"] {
            let table = ip(&["-n", h, family, "route", "show", "table", SOURCE_TABLE]);
            assert!(
                table.contains("default via"),
                "table {SOURCE_TABLE}: {table}"
            );
            let rules = ip(&["-n", h, family, "rule", "show"]);
            let ours = rules
                .lines()
                .filter(|l| l.contains(&format!("lookup {SOURCE_TABLE}")))
                .count();
            assert_eq!(ours, 1, "{rules}");
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.pod_process.kill();
        let _ = self.pod_process.wait();
        delete_netns(&[&self.pod_ns, &self.host_ns]);
    }
}

/// Times a process start to exit: `program args`, output discarded.
fn run_timed(program: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("spawn");
    let elapsed = start.elapsed();
    assert!(status.success(), "{program} {args:?}: {status}");
    elapsed
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn print_row(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
        percentile_ms(&samples, 0.50),
        percentile_ms(&samples, 0.90),
        percentile_ms(&samples, 0.99),
        percentile_ms(&samples, 1.0),
        samples.len()
    );
}

fn read_kib(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).expect("GNU time output");
    // GNU time prefixes "Command exited with non-zero status" lines; the figure is last.
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no RSS figure in {}: {text:?}", path.display()))
}

fn iterations() -> Option<usize> {
    match std::env::var("TANDEM_BENCH_ITERATIONS") {
        Err(_) => Some(DEFAULT_ITERATIONS),
        Ok(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                eprintln!("TANDEM_BENCH_ITERATIONS={text:?} is not a positive count");
                None
            }
        },
    }
}

fn main() {
    // `cargo test --benches` runs this with `--test`; keep that fast.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let Some(iterations) = iterations() else {
        std::process::exit(2);
    };
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tandem"));
    let Some(lab) = Lab::new() else { return };
    let request: InterfaceRequest = INTERFACE_ARG.parse().expect("interface argument");
    let binary_str = binary.to_string_lossy().into_owned();

    let mut hook_first = Vec::with_capacity(iterations);
    let mut hook_again = Vec::with_capacity(iterations);
    let mut release = Vec::with_capacity(iterations);
    let mut in_process = Vec::with_capacity(iterations);
    let mut exec_only = Vec::with_capacity(iterations);
    let mut binary_start = Vec::with_capacity(iterations);
    // One untimed round first: page cache, the binary's pages, the kernel's netns caches.
    for round in 0..=iterations {
        let first = lab.run_hook(&binary, "ctr-1", None);
        assert!(
            lab.attached(),
            "round {round}: not in the pod after the hook"
        );
        let again = lab.run_hook(&binary, "ctr-2", None);
        assert!(lab.attached(), "round {round}: second hook moved it");
        let back = lab.release();
        assert!(lab.released(), "round {round}: not back after release");
        let direct = lab.attach_in_process(&request);
        assert!(
            lab.attached(),
            "round {round}: not in the pod after in-process"
        );
        lab.release();
        let exec = run_timed("ip", &["netns", "exec", &lab.host_ns, "true"]);
        let start = run_timed(&binary_str, &["version"]);
        if round > 0 {
            hook_first.push(first);
            hook_again.push(again);
            release.push(back);
            in_process.push(direct);
            exec_only.push(exec);
            binary_start.push(start);
        }
    }
    lab.assert_host_config_intact();

    println!("| step | p50 ms | p90 ms | p99 ms | max ms | runs |");
    println!("|---|---:|---:|---:|---:|---:|");
    print_row("hook, first container (process, moves the NIC)", hook_first);
    print_row(
        "hook, next container of the pod (process, no-op)",
        hook_again,
    );
    print_row(
        "attach in-process (`attach_recorded`, no process)",
        in_process,
    );
    print_row(
        "release on unprepare (`release_claim_dir`, in-process)",
        release,
    );
    print_row(
        "`ip netns exec <host> true` (bench harness only)",
        exec_only,
    );
    print_row("`tandem version` (binary start and exit)", binary_start);

    if !Path::new(TIME).exists() {
        println!("\n{TIME} not found: hook peak RSS not measured");
        return;
    }
    let rss_dir = tempfile::tempdir().expect("rss dir");
    let (mut first_kib, mut again_kib) = (0, 0);
    for round in 0..5 {
        let file = rss_dir.path().join(format!("first-{round}"));
        lab.run_hook(&binary, "ctr-1", Some(&file));
        first_kib = first_kib.max(read_kib(&file));
        let file = rss_dir.path().join(format!("again-{round}"));
        lab.run_hook(&binary, "ctr-2", Some(&file));
        again_kib = again_kib.max(read_kib(&file));
        lab.release();
    }
    let version_file = rss_dir.path().join("version");
    run_timed(
        TIME,
        &[
            "-f",
            "%M",
            "-o",
            &version_file.to_string_lossy(),
            &binary_str,
            "version",
        ],
    );
    println!();
    println!("| process | peak RSS KiB (max of 5) |");
    println!("|---|---:|");
    println!("| hook, first container | {first_kib} |");
    println!("| hook, next container (no-op) | {again_kib} |");
    println!("| `tandem version` | {} |", read_kib(&version_file));
}
