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
    // TANDEM_PLUGIN_BIN: another build of the binary (hack/footprint.sh measures the one
    // built without test doubles).
    let binary = std::env::var_os("TANDEM_PLUGIN_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tandem").into());
    let mut command = tokio::process::Command::new(binary);
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
        .arg("--topology-dir")
        .arg(dir.join("run"))
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

/// What the kubelet does once it finds the registration socket at `path`: GetInfo, then
/// NotifyRegistrationStatus(registered). The plugin publishes slices only after this. Waits
/// up to 30 s for the socket to answer.
#[allow(
    dead_code,
    reason = "only the tests that watch published slices register"
)]
pub async fn register_as_kubelet(path: &Path) {
    use tandem_kubelet_plugin::client::unix_channel;
    use tandem_kubelet_plugin::proto::pluginregistration::{
        InfoRequest, RegistrationStatus, registration_client::RegistrationClient,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let channel = loop {
        match unix_channel(path).await {
            Ok(channel) => break channel,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let mut registration = RegistrationClient::new(channel);
    registration.get_info(InfoRequest {}).await.unwrap();
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
}
