//! The Python stand-ins' precondition (tests/kubelet_wire, tests/apiserver_wire): python3 with
//! the packages they import. Where it is missing the tests print why they skipped, unless
//! TANDEM_REQUIRE_KUBELET_WIRE=1 (CI, which installs them) makes that a failure.

/// None when python3 can import `modules`; else why not (or a panic, where CI requires them).
/// `packages` names what to `pip install`.
pub fn python_missing(modules: &[&str], packages: &str) -> Option<String> {
    let probe = std::process::Command::new("python3")
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output();
    let reason = match probe {
        Ok(out) if out.status.success() => return None,
        Ok(out) => format!(
            "python3 lacks {packages}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("no python3: {e}"),
    };
    if std::env::var("TANDEM_REQUIRE_KUBELET_WIRE").as_deref() == Ok("1") {
        panic!("TANDEM_REQUIRE_KUBELET_WIRE=1 but {reason}");
    }
    eprintln!("SKIPPED: {reason} (pip install {packages})");
    Some(reason)
}
