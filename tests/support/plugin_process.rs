//! Starting the real `tandem plugin` binary for tests and benchmarks: one command line with
//! the kubelet, CDI and state directories under one scratch directory, the machine read from a
//! fixture tree, and the apiserver fake reached through a kubeconfig. Callers add what their
//! run varies (rescan period, log level, where stderr goes) and spawn it.

use std::path::Path;
use std::process::Stdio;
use tandem::sysfs::MachineRoots;

/// `tandem plugin` for `node`: kubelet sockets under `dir/plugins_registry` and `dir/plugins`,
/// CDI specs in `dir/cdi`, the checkpoint in `state_dir`. No metrics endpoint, so runs side
/// by side never fight over its port; killed when the handle drops.
pub fn plugin_command(
    node: &str,
    dir: &Path,
    state_dir: &Path,
    roots: &MachineRoots,
    kubeconfig: &Path,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
    command
        .arg("plugin")
        .args(["--node-name", node])
        .arg("--kubelet-registry-dir")
        .arg(dir.join("plugins_registry"))
        .arg("--kubelet-plugins-dir")
        .arg(dir.join("plugins"))
        .arg("--cdi-dir")
        .arg(dir.join("cdi"))
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--sysfs-root")
        .arg(&roots.sys)
        .arg("--proc-root")
        .arg(&roots.proc)
        .arg("--dev-root")
        .arg(&roots.dev)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--metrics-addr", ""])
        .env_remove("POD_UID")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}
