//! The node agent's apiserver client against an apiserver stand-in that is not ours: Python's
//! ssl (OpenSSL) for TLS and ALPN, python-h2 for HTTP/2 (`tests/apiserver_wire/apiserver.py`).
//! Offered h2 and http/1.1 as a real apiserver does, the client negotiates h2 and sends a
//! burst of concurrent requests over its one connection; offered http/1.1 alone, it still
//! works, over HTTP/1.1.
//!
//! Needs python3 with h2 (`.ci/run` installs tests/kubelet_wire/requirements.txt). Without it
//! each test prints why it skipped, unless TANDEM_REQUIRE_KUBELET_WIRE=1 (CI) makes it fail.

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use tandem::apiserver_fake::{TEST_CA_PEM, test_ca_der};

fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/testkit/src/apiserver_fake/tls")
        .join(name)
}

/// None when the Python side can run; else why not (or a panic, where CI requires it).
fn python_missing() -> Option<String> {
    let probe = Command::new("python3").args(["-c", "import h2"]).output();
    let reason = match probe {
        Ok(out) if out.status.success() => return None,
        Ok(out) => format!(
            "python3 lacks h2: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("no python3: {e}"),
    };
    if std::env::var("TANDEM_REQUIRE_KUBELET_WIRE").as_deref() == Ok("1") {
        panic!("TANDEM_REQUIRE_KUBELET_WIRE=1 but {reason}");
    }
    eprintln!("SKIPPED: {reason} (pip install h2)");
    Some(reason)
}

/// The stand-in, offering `alpn`; killed when dropped.
struct StandIn {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
}

impl StandIn {
    fn start(alpn: &str) -> StandIn {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apiserver_wire/apiserver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(tls_file("server.pem"))
            .arg(tls_file("server.key"))
            .arg(alpn)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 apiserver.py");
        let stdin = child.stdin.take().expect("stdin");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("the stand-in's port");
        let port = first.trim().parse().expect("a port number");
        StandIn {
            child,
            _stdin: stdin,
            port,
        }
    }

    /// The client under test, from a kubeconfig as `tandem plugin --kubeconfig` reads it.
    async fn client(&self, dir: &Path) -> kube::Client {
        std::fs::write(dir.join("ca.pem"), TEST_CA_PEM).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "standin", "cluster": {
                "server": format!("https://127.0.0.1:{}", self.port),
                "certificate-authority": dir.join("ca.pem"),
            } }],
            "users": [{ "name": "standin", "user": {} }],
            "contexts": [{ "name": "standin", "context": { "cluster": "standin", "user": "standin" } }],
            "current-context": "standin",
        });
        std::fs::write(&kubeconfig, config.to_string()).unwrap();
        tandem::cli::plugin::kube_client(Some(&kubeconfig))
            .await
            .unwrap()
    }

    /// Each connection's negotiated protocol and request count, asked over a connection of
    /// kube's own client (not counted).
    async fn stats(&self) -> Vec<(String, u64)> {
        let uri = format!("https://127.0.0.1:{}", self.port).parse().unwrap();
        let mut config = kube::Config::new(uri);
        config.root_cert = Some(vec![test_ca_der()]);
        let client = kube::Client::try_from(config).unwrap();
        let request = hyper::Request::get("/stats").body(Vec::new()).unwrap();
        let stats: serde_json::Value = client.request(request).await.unwrap();
        stats["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["requests"].as_u64() != Some(0))
            .map(|c| {
                (
                    c["alpn"].as_str().unwrap().to_string(),
                    c["requests"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET, then 16 at once.
async fn burst(nodes: &Api<Node>) {
    assert_eq!(
        nodes.get("node-a").await.unwrap().metadata.name.as_deref(),
        Some("node-a")
    );
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let nodes = nodes.clone();
            tokio::spawn(async move { nodes.get(&format!("node-{i}")).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn offered_h2_the_client_sends_a_burst_over_one_http2_connection() {
    if python_missing().is_some() {
        return;
    }
    let standin = StandIn::start("h2,http/1.1");
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(standin.client(dir.path()).await);
    burst(&nodes).await;
    assert_eq!(standin.stats().await, vec![("h2".to_string(), 17)]);
}

#[tokio::test]
async fn offered_only_http1_the_client_still_works_over_http1() {
    if python_missing().is_some() {
        return;
    }
    let standin = StandIn::start("http/1.1");
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(standin.client(dir.path()).await);
    burst(&nodes).await;
    let stats = standin.stats().await;
    assert!(
        stats.iter().all(|(alpn, _)| alpn == "http/1.1"),
        "{stats:?}"
    );
    assert_eq!(stats.iter().map(|(_, n)| n).sum::<u64>(), 17);
}
