//! The node agent's apiserver client against an apiserver stand-in that is not ours: Python's
//! ssl (OpenSSL) for TLS and ALPN, python-h2 for HTTP/2 (`tests/apiserver_wire/apiserver.py`).
//! Offered h2 and http/1.1 as a real apiserver does, the client negotiates h2 and sends a
//! burst of concurrent requests over its one connection; offered http/1.1 alone, it still
//! works, over HTTP/1.1.
//!
//! Needs python3 with h2 (`.ci/run` installs tests/kubelet_wire/requirements.txt). Without it
//! each test prints why it skipped, unless TANDEM_REQUIRE_KUBELET_WIRE=1 (CI) makes it fail.

#[path = "support/python.rs"]
mod python;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use tandem::apiserver_fake::{test_ca_der, write_kubeconfig_for};

fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/testkit/src/apiserver_fake/tls")
        .join(name)
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
        let kubeconfig = dir.join("kubeconfig");
        let server = format!("https://127.0.0.1:{}", self.port);
        write_kubeconfig_for(&kubeconfig, &server, true).unwrap();
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

/// Our client, offered `alpn` by the stand-in: a GET, then 16 at once. Returns each
/// connection's protocol and request count; `None` when Python cannot run here.
async fn burst_offered(alpn: &str) -> Option<Vec<(String, u64)>> {
    if python::python_missing(&["h2"], "h2").is_some() {
        return None;
    }
    let standin = StandIn::start(alpn);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Api<Node> = Api::all(standin.client(dir.path()).await);
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
    Some(standin.stats().await)
}

#[tokio::test]
async fn offered_h2_the_client_sends_a_burst_over_one_http2_connection() {
    let Some(stats) = burst_offered("h2,http/1.1").await else {
        return;
    };
    assert_eq!(stats, vec![("h2".to_string(), 17)]);
}

#[tokio::test]
async fn offered_only_http1_the_client_still_works_over_http1() {
    let Some(stats) = burst_offered("http/1.1").await else {
        return;
    };
    assert!(
        stats.iter().all(|(alpn, _)| alpn == "http/1.1"),
        "{stats:?}"
    );
    assert_eq!(stats.iter().map(|(_, n)| n).sum::<u64>(), 17);
}
