//! Named network namespaces for the netattach tests (`ip netns add`, so they appear under
//! /run/netns as a runtime's pod namespaces do), with the skip rule every such test shares:
//! print why and return when not root or when `ip netns` does not work here.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` and returns stdout; panics with stderr on failure (test setup only).
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tag unique to this process and call (for namespace and link names, ≤ 15 bytes with a
/// 4-byte prefix) and the call's sequence number.
pub fn unique_tag() -> (String, u32) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    (format!("{}{n}", std::process::id() % 100_000), n)
}

/// Creates the named namespace, or prints why the test cannot run and returns false.
pub fn add_netns_or_skip(name: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: netattach tests need root");
        return false;
    }
    match Command::new("ip").args(["netns", "add", name]).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "skipping: `ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("skipping: cannot run `ip`: {e}");
            false
        }
    }
}

/// Deletes namespaces made by [`add_netns_or_skip`]; their links go with them.
pub fn delete_netns(names: &[&str]) {
    for name in names {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}
