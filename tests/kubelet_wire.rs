//! The real `tandem plugin` binary against kubelet stand-ins that are not built on our gRPC
//! stack: `tests/kubelet_wire/raw_kubelet.py` writes the kubelet's registration frames byte
//! for byte (percent-encoded `:authority`, the header order and HPACK of grpc-go), and
//! `tests/kubelet_wire/kubelet.py` runs grpcio (gRPC C-core) through registration, the health
//! stream, concurrent and batched prepares, prepares cancelled at their deadline, and SIGTERM.
//! Also checked here: no ResourceSlice before the kubelet registered us, and none again after
//! the registration is lost until it is back.
//!
//! Needs python3 with grpcio, grpcio-tools and hpack (`.ci/run` installs them). Without them
//! each test prints why it skipped, unless TANDEM_REQUIRE_KUBELET_WIRE=1 (CI) makes it fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "support/claims.rs"]
mod claims;
#[allow(
    dead_code,
    reason = "the Python stand-ins make the calls; only the layout is used"
)]
#[path = "support/plugin_harness.rs"]
mod plugin_harness;
#[path = "support/python.rs"]
mod python;

use claims::create_gpu_nic_claims;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DeleteParams, ListParams};
use plugin_harness::PluginLayout;
use tandem::apiserver_fake::FakeApiServer;
use tandem::sysfs::discover;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kubelet_wire")
        .join(name)
}

/// None when the Python side can run; else why not (or a panic, where CI requires it).
fn python_missing() -> Option<String> {
    python::python_missing(
        &["grpc", "grpc_tools", "hpack"],
        "grpcio grpcio-tools hpack",
    )
}

async fn run_python(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr)
}

async fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn node_slices(apiserver: &FakeApiServer, node: &str) -> Vec<ResourceSlice> {
    let api: Api<ResourceSlice> = Api::all(apiserver.client());
    let selector = format!("spec.nodeName={node}");
    api.list(&ListParams::default().fields(&selector))
        .await
        .unwrap()
        .items
}

async fn wait_for_slices(apiserver: &FakeApiServer, node: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count = node_slices(apiserver, node).await.len();
        if count > 0 {
            return count;
        }
        assert!(
            Instant::now() < deadline,
            "no ResourceSlice for {node} after registration"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Long enough for a publisher that did not wait for registration to have published.
async fn assert_no_slices_for_a_while(apiserver: &FakeApiServer, node: &str, why: &str) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(node_slices(apiserver, node).await.is_empty(), "{why}");
}

/// Writes `bytes` to the socket at `path`, then reads until the server closes the connection.
async fn broken_connection(path: &Path, bytes: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "server kept a broken connection open");
}

fn plugin_log(layout: &PluginLayout) -> String {
    std::fs::read_to_string(layout.log_path()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelets_registration_dial_registers_us_and_only_then_slices_appear() {
    if python_missing().is_some() {
        return;
    }
    let node = "node-wire-reg";
    let apiserver = FakeApiServer::start().await.unwrap();
    let layout = PluginLayout::create(node, "dgx-h100", &apiserver);
    let mut plugin = layout.spawn_plugin("1h", "info");
    let registration = layout.registration_socket();
    wait_for_socket(&registration).await;
    assert_no_slices_for_a_while(&apiserver, node, "slices published before any registration")
        .await;

    // The kubelet's exact dial, twice with its percent-encoded authority, then the authorities
    // other clients send.
    let socket = registration.to_str().unwrap();
    let (ok, stdout, stderr) = run_python(&[
        script("raw_kubelet.py").to_str().unwrap(),
        socket,
        "--authority",
        "encoded",
        "--authority",
        "encoded",
        "--authority",
        "localhost",
        "--authority",
        "empty",
        "--authority",
        "absent",
    ])
    .await;
    assert!(
        ok,
        "raw kubelet registration failed:\n{stdout}\n{stderr}\n{}",
        plugin_log(&layout)
    );
    for line in stdout.lines() {
        let result: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(result["ok"], true, "{line}");
        assert_eq!(result["name"], "tandem.dev", "{line}");
        assert_eq!(
            result["endpoint"],
            layout.dra_socket().to_str().unwrap(),
            "{line}"
        );
        assert_eq!(result["versions"][0], "v1.DRAPlugin", "{line}");
    }
    assert_eq!(stdout.lines().count(), 5);
    let published = wait_for_slices(&apiserver, node).await;
    let log = plugin_log(&layout);
    assert_eq!(
        log.matches("registration: served GetInfo").count(),
        5,
        "every attempt logged:\n{log}"
    );

    // Connections that fail before any handler are logged at warn with the reason: a client
    // that is not HTTP/2, and one whose header block does not decode.
    broken_connection(&registration, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut bad_hpack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad_hpack.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    bad_hpack.extend([0, 0, 1, 1, 4, 0, 0, 0, 1, 0x80 | 70]); // HEADERS: index 70, table empty
    broken_connection(&registration, &bad_hpack).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = plugin_log(&layout);
        if log.contains("did not start with the HTTP/2 preface")
            && log.contains("closing a kubelet connection that broke HTTP/2")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broken connections not logged:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The kubelet wiped its registry: we are no longer registered, and slices the kubelet then
    // deletes stay deleted until it registers us again.
    std::fs::remove_file(&registration).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !plugin_log(&layout).contains("registration socket disappeared") {
        assert!(Instant::now() < deadline, "loss of the socket not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_socket(&registration).await;
    let api: Api<ResourceSlice> = Api::all(apiserver.client());
    for slice in node_slices(&apiserver, node).await {
        api.delete(&slice.metadata.name.unwrap(), &DeleteParams::default())
            .await
            .unwrap();
    }
    assert_no_slices_for_a_while(&apiserver, node, "slices republished while unregistered").await;
    let (ok, stdout, stderr) =
        run_python(&[script("raw_kubelet.py").to_str().unwrap(), socket]).await;
    assert!(ok, "re-registration failed:\n{stdout}\n{stderr}");
    assert_eq!(wait_for_slices(&apiserver, node).await, published);
    plugin.kill().await.unwrap();
}

/// The kubelet session of `kubelet.py` against a plugin with four GPU+NIC claims allocated.
async fn kubelet_session(node: &str, kubelet_knows: Option<&str>) -> serde_json::Value {
    let apiserver = FakeApiServer::start().await.unwrap();
    let layout = PluginLayout::create(node, "dgx-h100", &apiserver);
    let inventory = discover(layout.roots()).unwrap();
    let claims = create_gpu_nic_claims(&apiserver.client(), &inventory, "wire", node, "c", 4).await;
    let claims: Vec<_> = claims
        .iter()
        .map(|c| serde_json::json!({"namespace": c.namespace, "name": c.name, "uid": c.uid}))
        .collect();
    let mut plugin = layout.spawn_plugin("1h", "info");
    let registry = layout.registration_socket().parent().unwrap().to_path_buf();
    let claims = serde_json::to_string(&claims).unwrap();
    let mut args = vec![
        script("kubelet.py").to_string_lossy().into_owned(),
        "session".into(),
        "--registry-dir".into(),
        registry.to_string_lossy().into_owned(),
        "--cdi-dir".into(),
        layout.cdi_dir().to_string_lossy().into_owned(),
        "--claims".into(),
        claims,
    ];
    if let Some(version) = kubelet_knows {
        args.extend(["--kubelet-knows".into(), version.into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = run_python(&args).await;
    assert!(
        ok,
        "kubelet session failed:\n{stdout}\n{stderr}\nplugin log:\n{}",
        plugin_log(&layout)
    );
    plugin.kill().await.unwrap();
    serde_json::from_str(stdout.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_kubelet_session_on_v1() {
    if python_missing().is_some() {
        return;
    }
    let summary = kubelet_session("node-wire-v1", None).await;
    assert_eq!(summary["version"], "v1.DRAPlugin", "{summary}");
    assert_eq!(summary["prepared_concurrently"], 4, "{summary}");
    assert!(
        summary["cancelled_prepares"].as_u64() > Some(0),
        "{summary}"
    );
    assert!(summary["health_devices"].as_u64() >= Some(16), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_kubelet_session_on_v1beta1() {
    if python_missing().is_some() {
        return;
    }
    // A kubelet that knows only v1beta1 (1.32, 1.33) picks it from our list.
    let summary = kubelet_session("node-wire-v1beta1", Some("v1beta1.DRAPlugin")).await;
    assert_eq!(summary["version"], "v1beta1.DRAPlugin", "{summary}");
    assert_eq!(summary["prepared_concurrently"], 4, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_ends_the_health_stream_and_exits_cleanly() {
    if python_missing().is_some() {
        return;
    }
    let apiserver = FakeApiServer::start().await.unwrap();
    let layout = PluginLayout::create("node-wire-term", "dgx-h100", &apiserver);
    let mut plugin = layout.spawn_plugin("1h", "info");
    let pid = plugin.id().unwrap().to_string();
    let registry = layout.registration_socket().parent().unwrap().to_path_buf();
    let (ok, stdout, stderr) = run_python(&[
        script("kubelet.py").to_str().unwrap(),
        "deregister",
        "--registry-dir",
        registry.to_str().unwrap(),
        "--plugin-pid",
        &pid,
    ])
    .await;
    assert!(
        ok,
        "deregistration failed:\n{stdout}\n{stderr}\n{}",
        plugin_log(&layout)
    );
    let status = tokio::time::timeout(Duration::from_secs(20), plugin.wait())
        .await
        .expect("plugin still running 20 s after SIGTERM")
        .unwrap();
    assert!(status.success(), "plugin exit after SIGTERM: {status}");
}
