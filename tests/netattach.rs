//! Exclusive NIC attach in real network namespaces: a veth end plays the NIC, one created
//! namespace plays the host and another the pod, so no existing host interface or route is
//! ever touched. Tests print why and return when they cannot run (not root, no `ip netns`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tandem::netattach::{
    AttachOutcome, Guards, NetAttachError, Netns, attach, interface_in_netns, move_and_configure,
    release, snapshot,
};

const TIMEOUT: Duration = Duration::from_secs(5);

#[path = "support/netns.rs"]
mod netns;
use netns::{add_netns_or_skip, delete_netns, ip, unique_tag};

/// A "host" and a "pod" namespace with a veth pair in the host one; the `nic` end carries
/// an IPv4 and an IPv6 address, MTU 9000 and a gateway route. Both namespaces (and with them
/// the veths) are deleted on drop, pass or fail.
struct Lab {
    host_ns: String,
    pod_ns: String,
    nic: String,
    peer: String,
    octet: u32,
    /// Whether [`Lab::source_routed`] gave the NIC its own table and rules.
    source_routing: bool,
}

impl Lab {
    fn new() -> Option<Self> {
        let (tag, n) = unique_tag();
        let lab = Lab {
            host_ns: format!("tdmh{tag}"),
            pod_ns: format!("tdmp{tag}"),
            nic: format!("tdma{tag}"),
            peer: format!("tdmb{tag}"),
            octet: 10 + n,
            source_routing: false,
        };
        if !add_netns_or_skip(&lab.host_ns) {
            return None;
        }
        ip(&["netns", "add", &lab.pod_ns]);
        let h = lab.host_ns.as_str();
        ip(&[
            "-n", h, "link", "add", &lab.nic, "type", "veth", "peer", "name", &lab.peer,
        ]);
        ip(&["-n", h, "link", "set", &lab.nic, "mtu", "9000", "up"]);
        ip(&["-n", h, "link", "set", &lab.peer, "mtu", "9000", "up"]);
        ip(&["-n", h, "addr", "add", &lab.v4_addr(), "dev", &lab.nic]);
        ip(&[
            "-n",
            h,
            "-6",
            "addr",
            "add",
            &lab.v6_addr(),
            "dev",
            &lab.nic,
            "nodad",
        ]);
        ip(&[
            "-n",
            h,
            "route",
            "add",
            &lab.v4_route_dst(),
            "via",
            &lab.v4_gateway(),
            "dev",
            &lab.nic,
            "metric",
            "50",
        ]);
        Some(lab)
    }

    /// A lab whose NIC also does source-based routing the way multi-NIC RDMA nodes do: its
    /// own table with a default route (v4 and v6), a rule selecting the table by source
    /// address and one by output interface.
    fn source_routed() -> Option<Self> {
        let mut lab = Self::new()?;
        lab.source_routing = true;
        let (h, table) = (lab.host_ns.clone(), lab.table());
        let (gw4, gw6) = (lab.v4_gateway(), lab.v6_gateway());
        ip(&[
            "-n", &h, "route", "add", "default", "via", &gw4, "dev", &lab.nic, "table", &table,
        ]);
        ip(&[
            "-n", &h, "-6", "route", "add", "default", "via", &gw6, "dev", &lab.nic, "table",
            &table,
        ]);
        for (family, from) in [("-4", lab.v4_host()), ("-6", lab.v6_host())] {
            let pref = lab.source_rule_pref();
            ip(&[
                "-n", &h, family, "rule", "add", "from", &from, "table", &table, "pref", &pref,
            ]);
        }
        let pref = lab.oif_rule_pref();
        ip(&[
            "-n", &h, "rule", "add", "oif", &lab.nic, "table", &table, "pref", &pref,
        ]);
        Some(lab)
    }

    fn v4_addr(&self) -> String {
        format!("10.201.{}.2/24", self.octet)
    }
    fn v4_gateway(&self) -> String {
        format!("10.201.{}.1", self.octet)
    }
    fn v4_route_dst(&self) -> String {
        format!("10.202.{}.0/24", self.octet)
    }
    fn v6_addr(&self) -> String {
        format!("fd00:{}::2/64", self.octet)
    }
    fn v4_host(&self) -> String {
        format!("10.201.{}.2", self.octet)
    }
    fn v6_host(&self) -> String {
        format!("fd00:{}::2", self.octet)
    }
    fn v6_gateway(&self) -> String {
        format!("fd00:{}::1", self.octet)
    }
    fn table(&self) -> String {
        (100 + self.octet).to_string()
    }
    fn source_rule_pref(&self) -> String {
        (1000 + self.octet).to_string()
    }
    fn oif_rule_pref(&self) -> String {
        (2000 + self.octet).to_string()
    }
    fn ns_path(name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }
    fn host(&self) -> Netns {
        Netns::open(&Self::ns_path(&self.host_ns)).unwrap()
    }
    fn pod(&self) -> Netns {
        Netns::open(&Self::ns_path(&self.pod_ns)).unwrap()
    }

    /// Asserts `name` in namespace `ns` has the lab's MTU, addresses and route.
    fn assert_configured(&self, ns: &str, name: &str) {
        let link = ip(&["-n", ns, "-o", "link", "show", name]);
        assert!(link.contains("mtu 9000"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        let addrs = ip(&["-n", ns, "-o", "addr", "show", "dev", name]);
        assert!(addrs.contains(&self.v4_addr()), "{addrs}");
        assert!(addrs.contains(&self.v6_addr()), "{addrs}");
        let routes = ip(&["-n", ns, "route", "show", "dev", name]);
        let want = format!("{} via {}", self.v4_route_dst(), self.v4_gateway());
        assert!(routes.contains(&want), "{routes}");
        assert!(routes.contains("metric 50"), "{routes}");
        if self.source_routing {
            self.assert_source_routed(ns, name);
        }
    }

    /// Asserts the NIC's table holds its default routes through `name` and that each of its
    /// rules exists exactly once, the oif one naming `name`.
    fn assert_source_routed(&self, ns: &str, name: &str) {
        let table = self.table();
        let v4 = self.table_routes(ns, "-4");
        let want = format!("default via {} dev {name}", self.v4_gateway());
        assert!(v4.contains(&want), "table {table} in {ns}: {v4}");
        let v6 = self.table_routes(ns, "-6");
        let want = format!("default via {} dev {name}", self.v6_gateway());
        assert!(v6.contains(&want), "table {table} in {ns}: {v6}");
        for (family, rule) in [
            (
                "-4",
                format!(
                    "{}:\tfrom {} lookup {table}",
                    self.source_rule_pref(),
                    self.v4_host()
                ),
            ),
            (
                "-6",
                format!(
                    "{}:\tfrom {} lookup {table}",
                    self.source_rule_pref(),
                    self.v6_host()
                ),
            ),
            (
                "-4",
                format!(
                    "{}:\tfrom all oif {name} lookup {table}",
                    self.oif_rule_pref()
                ),
            ),
        ] {
            let rules = ip(&["-n", ns, family, "rule", "show"]);
            let copies = rules.lines().filter(|l| l.trim_end() == rule).count();
            assert_eq!(copies, 1, "{rule:?} in {ns}:\n{rules}");
        }
    }

    /// The NIC's table in `ns` as `ip route show table` prints it; empty when the table has
    /// no routes (or does not exist yet).
    fn table_routes(&self, ns: &str, family: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, family, "route", "show", "table", &self.table()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The rules in `ns` that look up the NIC's table.
    fn table_rules(&self, ns: &str) -> Vec<String> {
        let suffix = format!("lookup {}", self.table());
        ["-4", "-6"]
            .into_iter()
            .flat_map(|family| {
                ip(&["-n", ns, family, "rule", "show"])
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|l| l.trim_end().ends_with(&suffix))
            .collect()
    }

    fn has_link(&self, ns: &str, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", ns, "link", "show", name])
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        delete_netns(&[&self.pod_ns, &self.host_ns]);
    }
}

#[test]
fn attach_moves_renames_and_configures_then_release_restores() {
    let Some(lab) = Lab::new() else { return };
    let (host, pod) = (lab.host(), lab.pod());

    let outcome = attach(&host, &pod, &lab.nic, "rdma0", &Guards::default(), TIMEOUT).unwrap();
    let AttachOutcome::Attached(snap) = outcome else {
        panic!("expected a move, got {outcome:?}")
    };
    assert_eq!(snap.mtu, 9000);
    assert_eq!(snap.routes.len(), 1, "{snap:?}");
    assert!(!lab.has_link(&lab.host_ns, &lab.nic));
    lab.assert_configured(&lab.pod_ns, "rdma0");

    let again = attach(&host, &pod, &lab.nic, "rdma0", &Guards::default(), TIMEOUT).unwrap();
    assert_eq!(again, AttachOutcome::AlreadyPresent);

    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    assert!(!lab.has_link(&lab.pod_ns, "rdma0"));
    lab.assert_configured(&lab.host_ns, &lab.nic);

    // Releasing twice finds everything in place and succeeds.
    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
}

#[test]
fn release_leaves_a_same_named_interface_of_another_pod_alone() {
    let Some(lab) = Lab::new() else { return };
    let (host, pod) = (lab.host(), lab.pod());
    let outcome = attach(&host, &pod, &lab.nic, "rdma0", &Guards::default(), TIMEOUT).unwrap();
    let AttachOutcome::Attached(snap) = outcome else {
        panic!("expected a move, got {outcome:?}")
    };
    // Another pod's namespace (as when a dead pod's namespace inode is reused) holding its
    // own rdma0: a release pointed at it must not take that interface.
    let (tag, _) = unique_tag();
    let stranger = format!("tdms{tag}");
    assert!(add_netns_or_skip(&stranger));
    let _cleanup = StrangerNs(stranger.clone());
    ip(&[
        "-n", &stranger, "link", "add", "rdma0", "type", "veth", "peer", "name", "rdma0p",
    ]);
    let stranger_ns = Netns::open(&Lab::ns_path(&stranger)).unwrap();
    let err = release(&host, Some(&stranger_ns), &snap, "rdma0", TIMEOUT).unwrap_err();
    assert!(matches!(err, NetAttachError::NotFound { .. }), "{err}");
    assert!(lab.has_link(&stranger, "rdma0"));
    assert!(lab.has_link(&lab.pod_ns, "rdma0"));
    // The right namespace still gets ours back.
    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
    assert!(lab.has_link(&stranger, "rdma0"));
}

/// Deletes an extra namespace on drop.
struct StrangerNs(String);

impl Drop for StrangerNs {
    fn drop(&mut self) {
        delete_netns(&[&self.0]);
    }
}

#[test]
fn source_routing_tables_and_rules_follow_the_nic_and_come_back() {
    let Some(lab) = Lab::source_routed() else {
        return;
    };
    let (host, pod) = (lab.host(), lab.pod());

    let outcome = attach(&host, &pod, &lab.nic, "rdma0", &Guards::default(), TIMEOUT).unwrap();
    let AttachOutcome::Attached(snap) = outcome else {
        panic!("expected a move, got {outcome:?}")
    };
    let table: u32 = lab.table().parse().unwrap();
    let in_table = snap
        .routes
        .iter()
        .filter(|r| r.table == Some(table))
        .count();
    assert_eq!(in_table, 2, "{snap:?}");
    assert_eq!(snap.rules.len(), 3, "{snap:?}");
    assert!(snap.rules.iter().all(|r| r.table == table), "{snap:?}");
    lab.assert_configured(&lab.pod_ns, "rdma0");
    // The kernel flushed the table routes with the link; the rules stayed (detached).
    assert_eq!(lab.table_routes(&lab.host_ns, "-4").trim(), "");
    assert_eq!(lab.table_routes(&lab.host_ns, "-6").trim(), "");
    assert_eq!(lab.table_rules(&lab.host_ns).len(), 3);

    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
    assert_eq!(lab.table_rules(&lab.host_ns).len(), 3);
    // The pod keeps no rule pointing at a table it no longer has.
    assert!(lab.table_rules(&lab.pod_ns).is_empty());

    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
    assert_eq!(lab.table_rules(&lab.host_ns).len(), 3);

    // Rules the host lost meanwhile are put back once.
    ip(&[
        "-n",
        &lab.host_ns,
        "rule",
        "del",
        "pref",
        &lab.oif_rule_pref(),
    ]);
    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
}

#[test]
fn rules_of_other_interfaces_and_tables_stay_out_of_the_snapshot() {
    let Some(lab) = Lab::source_routed() else {
        return;
    };
    let h = lab.host_ns.as_str();
    // Another table, and a rule for the NIC's table that names the other veth end.
    ip(&[
        "-n",
        h,
        "rule",
        "add",
        "from",
        "10.99.0.0/16",
        "table",
        "300",
        "pref",
        "500",
    ]);
    ip(&[
        "-n",
        h,
        "rule",
        "add",
        "iif",
        &lab.peer,
        "table",
        &lab.table(),
        "pref",
        "501",
    ]);
    let snap = snapshot(&lab.host(), &lab.nic, &Guards::default(), TIMEOUT).unwrap();
    assert_eq!(snap.rules.len(), 3, "{snap:?}");
    assert!(
        snap.rules
            .iter()
            .all(|r| r.priority != 500 && r.priority != 501),
        "{snap:?}"
    );
}

#[test]
fn default_route_and_node_ip_guards_refuse() {
    let Some(lab) = Lab::new() else { return };
    let host = lab.host();
    let guards = Guards {
        node_ip: Some(format!("10.201.{}.2", lab.octet).parse().unwrap()),
    };
    let err = snapshot(&host, &lab.nic, &guards, TIMEOUT).unwrap_err();
    assert!(err.to_string().contains("node IP"), "{err}");

    ip(&[
        "-n",
        &lab.host_ns,
        "route",
        "add",
        "default",
        "via",
        &lab.v4_gateway(),
        "dev",
        &lab.nic,
    ]);
    let err = attach(
        &host,
        &lab.pod(),
        &lab.nic,
        "rdma0",
        &Guards::default(),
        TIMEOUT,
    )
    .unwrap_err();
    assert!(matches!(err, NetAttachError::Guarded { .. }), "{err}");
    assert!(err.to_string().contains("default route"), "{err}");
    assert!(
        lab.has_link(&lab.host_ns, &lab.nic),
        "guarded NIC must stay"
    );
}

#[test]
fn release_recovers_a_crash_before_and_after_the_move() {
    let Some(lab) = Lab::source_routed() else {
        return;
    };
    let (host, pod) = (lab.host(), lab.pod());
    let snap = snapshot(&host, &lab.nic, &Guards::default(), TIMEOUT).unwrap();

    // Crash after recording, before moving: release leaves the NIC as it was.
    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);

    // Crash after the move, before configuring: the move flushed addresses and routes.
    ip(&[
        "-n",
        &lab.host_ns,
        "link",
        "set",
        &lab.nic,
        "netns",
        &lab.pod_ns,
        "name",
        "rdma0",
    ]);
    assert!(interface_in_netns(&pod, "rdma0", TIMEOUT).unwrap());
    release(&host, Some(&pod), &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
}

#[test]
fn release_without_pod_namespace_finds_the_nic_by_hardware_address() {
    let Some(lab) = Lab::new() else { return };
    let (host, pod) = (lab.host(), lab.pod());
    let snap = snapshot(&host, &lab.nic, &Guards::default(), TIMEOUT).unwrap();
    assert!(snap.hardware_address.is_some());
    move_and_configure(&host, &pod, &snap, "rdma0", TIMEOUT).unwrap();
    // What the kernel does with a physical NIC when the pod namespace dies: back to the
    // host under the pod-side name, unconfigured.
    ip(&[
        "-n",
        &lab.pod_ns,
        "link",
        "set",
        "rdma0",
        "netns",
        &lab.host_ns,
    ]);
    release(&host, None, &snap, "rdma0", TIMEOUT).unwrap();
    lab.assert_configured(&lab.host_ns, &lab.nic);
}

#[test]
fn missing_interface_and_bad_names_fail_with_clear_errors() {
    let Some(lab) = Lab::new() else { return };
    let (host, pod) = (lab.host(), lab.pod());
    let err = attach(
        &host,
        &pod,
        "tdmnosuch",
        "rdma0",
        &Guards::default(),
        TIMEOUT,
    )
    .unwrap_err();
    assert!(matches!(err, NetAttachError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("tdmnosuch"), "{err}");
    let err = attach(&host, &pod, &lab.nic, "a/b", &Guards::default(), TIMEOUT).unwrap_err();
    assert!(matches!(err, NetAttachError::InvalidName { .. }), "{err}");
    assert!(lab.has_link(&lab.host_ns, &lab.nic));
}

mod hook {
    use super::*;
    use std::io::Write;
    use std::process::{Child, Stdio};
    use std::time::Instant;
    use tandem::netattach::record::{
        AttachPhase, AttachedInterface, NetAttachRecord, RECORD_FILE, netns_ref, release_recorded,
    };

    /// A process parked in the pod namespace, standing in for the container; killed on drop.
    struct PodProcess(Child);

    impl PodProcess {
        fn start(lab: &Lab) -> Self {
            Self::start_in(&lab.pod_ns)
        }

        fn start_in(ns: &str) -> Self {
            let child = Command::new("ip")
                .args(["netns", "exec", ns, "sleep", "60"])
                .spawn()
                .unwrap();
            let pid = child.id();
            // `ip netns exec` enters the namespace and then execs sleep under the same pid.
            let pod_ino = std::fs::metadata(Lab::ns_path(ns)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            use std::os::unix::fs::MetadataExt;
            while std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() != pod_ino.ino())
                .unwrap_or(true)
            {
                assert!(Instant::now() < deadline, "sleep never entered the pod ns");
                std::thread::sleep(Duration::from_millis(10));
            }
            PodProcess(child)
        }
    }

    impl Drop for PodProcess {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn run_hook(lab: &Lab, state_dir: &Path, pid: u32) -> (bool, String, Duration) {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["hook", "attach", "--claim-uid", "uid-1", "--state-dir"])
            .arg(state_dir)
            .args(["--host-netns"])
            .arg(Lab::ns_path(&lab.host_ns))
            .args(["--interface", &format!("host={}:pod=rdma0", lab.nic)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let state = format!(
            r#"{{"ociVersion":"1.2.0","id":"ctr-{pid}","status":"created","pid":{pid},"bundle":"/x","annotations":{{}}}}"#
        );
        child
            .stdin
            .take()
            .unwrap()
            .write_all(state.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    }

    #[test]
    fn hook_attaches_records_is_idempotent_and_unprepare_releases() {
        let Some(lab) = Lab::new() else { return };
        let state = tempfile::tempdir().unwrap();
        let claim_dir = state.path().join("claims/uid-1");
        let pod = PodProcess::start(&lab);

        let (ok, stderr, _) = run_hook(&lab, state.path(), pod.0.id());
        assert!(ok, "{stderr}");
        lab.assert_configured(&lab.pod_ns, "rdma0");
        let record = NetAttachRecord::load(&claim_dir).unwrap();
        assert_eq!(record.interfaces.len(), 1);
        assert_eq!(record.interfaces[0].phase, AttachPhase::Attached);
        assert_eq!(record.interfaces[0].snapshot.host_name, lab.nic);

        // Second container of the same pod.
        let second = PodProcess::start(&lab);
        let (ok, stderr, _) = run_hook(&lab, state.path(), second.0.id());
        assert!(ok, "{stderr}");
        assert_eq!(NetAttachRecord::load(&claim_dir).unwrap(), record);

        // The containers are gone but the namespace lives on (as with a pod sandbox): the
        // release finds it by inode through /run/netns.
        drop(pod);
        drop(second);
        let released = release_recorded(
            &claim_dir,
            &lab.host(),
            Path::new("/proc"),
            Path::new("/run/netns"),
            TIMEOUT,
        )
        .unwrap();
        assert_eq!(released, 1);
        assert!(!claim_dir.join(RECORD_FILE).exists());
        lab.assert_configured(&lab.host_ns, &lab.nic);
    }

    #[test]
    fn hook_fails_fast_when_the_container_is_gone() {
        let Some(lab) = Lab::new() else { return };
        let state = tempfile::tempdir().unwrap();
        let mut exited = Command::new("true").spawn().unwrap();
        let pid = exited.id();
        exited.wait().unwrap();
        let (ok, stderr, elapsed) = run_hook(&lab, state.path(), pid);
        assert!(!ok);
        assert!(stderr.contains(&format!("/proc/{pid}/ns/net")), "{stderr}");
        assert!(stderr.contains("uid-1"), "{stderr}");
        assert!(elapsed < TIMEOUT, "took {elapsed:?}");
        assert!(lab.has_link(&lab.host_ns, &lab.nic));
    }

    #[test]
    fn hook_refuses_a_host_network_container() {
        let Some(lab) = Lab::new() else { return };
        let state = tempfile::tempdir().unwrap();
        // A process in the lab's "host" namespace plays a hostNetwork pod.
        let host_network_pod = PodProcess::start_in(&lab.host_ns);
        let (ok, stderr, _) = run_hook(&lab, state.path(), host_network_pod.0.id());
        assert!(!ok);
        assert!(stderr.contains("hostNetwork"), "{stderr}");
        assert!(lab.has_link(&lab.host_ns, &lab.nic));
    }

    #[test]
    fn crash_between_record_and_move_is_recovered() {
        let Some(lab) = Lab::new() else { return };
        let state = tempfile::tempdir().unwrap();
        let claim_dir = state.path().join("claims/uid-1");
        let host = lab.host();
        let snap = snapshot(&host, &lab.nic, &Guards::default(), TIMEOUT).unwrap();
        // What the hook writes before moving; then it "crashed".
        let record = NetAttachRecord {
            interfaces: vec![AttachedInterface {
                pod_name: "rdma0".into(),
                netns: netns_ref(&Lab::ns_path(&lab.pod_ns), u32::MAX).unwrap(),
                phase: AttachPhase::Intent,
                snapshot: snap.clone(),
                pci_address: None,
                rdma_device: None,
                rdma_moved: false,
            }],
        };
        record.save(&claim_dir).unwrap();
        // And the variant where the move happened but nothing after it.
        ip(&[
            "-n",
            &lab.host_ns,
            "link",
            "set",
            &lab.nic,
            "netns",
            &lab.pod_ns,
            "name",
            "rdma0",
        ]);
        let released = release_recorded(
            &claim_dir,
            &host,
            Path::new("/proc"),
            Path::new("/run/netns"),
            TIMEOUT,
        )
        .unwrap();
        assert_eq!(released, 1);
        assert!(
            NetAttachRecord::load(&claim_dir)
                .unwrap()
                .interfaces
                .is_empty()
        );
        lab.assert_configured(&lab.host_ns, &lab.nic);
    }

    #[test]
    fn unreleasable_interface_stays_recorded() {
        let Some(lab) = Lab::new() else { return };
        let state = tempfile::tempdir().unwrap();
        let claim_dir = state.path().join("claims/uid-1");
        let host = lab.host();
        let mut snap = snapshot(&host, &lab.nic, &Guards::default(), TIMEOUT).unwrap();
        // An interface that exists nowhere: release must fail and keep the entry.
        snap.host_name = "tdmgone".into();
        snap.hardware_address = None;
        let record = NetAttachRecord {
            interfaces: vec![AttachedInterface {
                pod_name: "rdma0".into(),
                netns: netns_ref(&Lab::ns_path(&lab.pod_ns), u32::MAX).unwrap(),
                phase: AttachPhase::Attached,
                snapshot: snap,
                pci_address: None,
                rdma_device: None,
                rdma_moved: false,
            }],
        };
        record.save(&claim_dir).unwrap();
        let err = release_recorded(
            &claim_dir,
            &host,
            Path::new("/proc"),
            Path::new("/run/netns"),
            TIMEOUT,
        )
        .unwrap_err();
        assert!(err.to_string().contains("tdmgone"), "{err}");
        assert_eq!(NetAttachRecord::load(&claim_dir).unwrap(), record);
    }
}

/// Unprepare runs this for every claim; a claim the hook never touched must not need a
/// network namespace (nor root) at all.
#[test]
fn claims_without_a_record_release_without_touching_netlink() {
    let state = tempfile::tempdir().unwrap();
    let released = tandem::netattach::record::release_claim_dir(
        &state.path().join("claims/none"),
        Path::new("/nonexistent/ns/net"),
        Path::new("/nonexistent-proc"),
        Path::new("/nonexistent-netns"),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(released, 0);

    // A corrupt record is an error naming the file, not an empty record.
    let claim_dir = state.path().join("claims/bad");
    std::fs::create_dir_all(&claim_dir).unwrap();
    std::fs::write(claim_dir.join("netattach.json"), b"{not json").unwrap();
    let err = tandem::netattach::record::release_claim_dir(
        &claim_dir,
        Path::new("/nonexistent/ns/net"),
        Path::new("/nonexistent-proc"),
        Path::new("/nonexistent-netns"),
        TIMEOUT,
    )
    .unwrap_err();
    assert!(err.to_string().contains("netattach.json"), "{err}");
}
