//! The plugin's HTTP endpoint as Prometheus and the kubelet's probes see it: a plugin on real
//! Unix sockets answers prepare/unprepare calls, and `/metrics`, `/healthz` and `/readyz` are
//! scraped over real TCP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[allow(
    dead_code,
    reason = "only the kubelet's registration calls are used here"
)]
#[path = "support/plugin_process.rs"]
mod plugin_process;

use plugin_process::register_as_kubelet;
use tandem::fixture;
use tandem::metrics_http;
use tandem::plugin::metrics::{Endpoint, Liveness, PluginMetrics};
use tandem::prepare::{ClaimRef, PreparedDevice};
use tandem::sysfs::discover;
use tandem::topology::Inventory;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_v1;
use tandem_kubelet_plugin::{Driver, Method, PluginConfig, RunningPlugin};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Prepares every claim except those named `broken-*`, which fail the way a claim whose
/// devices vanished does: with an error naming the claim.
struct StandInPreparer;

/// The stand-in's error: its text.
#[derive(Debug)]
struct DeviceGone(String);

impl std::fmt::Display for DeviceGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeviceGone {}

impl Driver for StandInPreparer {
    type Error = DeviceGone;

    async fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, DeviceGone>> {
        claims
            .iter()
            .map(|c| {
                let result = if c.name.starts_with("broken-") {
                    Err(DeviceGone(format!(
                        "claim {}/{} {}: device gone",
                        c.namespace, c.name, c.uid
                    )))
                } else {
                    Ok(Vec::new())
                };
                (c.uid.clone(), result)
            })
            .collect()
    }

    async fn unprepare(&self, claims: &[ClaimRef]) -> BTreeMap<String, Result<(), DeviceGone>> {
        claims.iter().map(|c| (c.uid.clone(), Ok(()))).collect()
    }
}

struct Node {
    _dir: TempDir,
    plugin: RunningPlugin,
    metrics: Arc<PluginMetrics>,
    http: std::net::SocketAddr,
    endpoint_stop: CancellationToken,
}

async fn start_node() -> Node {
    let dir = fixture::scratch_dir().unwrap();
    let description = fixture::builtin("dgx-h100").unwrap();
    let roots = fixture::write_machine(&description, &dir.path().join("machine")).unwrap();
    let inventory: Arc<Inventory> = Arc::new(discover(&roots).unwrap());
    let (_inventory_tx, inventory_rx) = watch::channel(inventory.clone());
    let mut config = PluginConfig::new(tandem::names::DEFAULT_DRIVER_NAME, "node-a");
    config.registry_dir = dir.path().join("plugins_registry");
    config.plugins_dir = dir.path().join("plugins");
    config.registration_check_interval = Duration::from_millis(50);

    let metrics = Arc::new(PluginMetrics::new());
    metrics.observe_inventory(&inventory);
    let listener = metrics_http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = listener.local_addr().unwrap();
    let plugin = tandem::plugin::start_with_metrics(
        &config,
        Arc::new(StandInPreparer),
        inventory_rx,
        metrics.clone(),
    )
    .await
    .unwrap();
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        liveness: Liveness::of(&plugin),
    };
    let endpoint_stop = CancellationToken::new();
    tokio::spawn(metrics_http::serve(
        listener,
        Arc::new(endpoint),
        endpoint_stop.clone(),
    ));
    Node {
        _dir: dir,
        plugin,
        metrics,
        http,
        endpoint_stop,
    }
}

/// One HTTP/1.1 GET over a fresh TCP connection: (status code, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap();
    (status, body.to_string())
}

/// The value of the sample line `name` (with its labels, exactly as exposed).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn claim(name: &str, uid: &str) -> dra_v1::Claim {
    dra_v1::Claim {
        namespace: "team-a".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[tokio::test]
async fn prepare_and_unprepare_move_the_counters_that_prometheus_scrapes() {
    let node = start_node().await;
    let channel = unix_channel(&node.plugin.paths().dra).await.unwrap();
    let mut dra = dra_v1::dra_plugin_client::DraPluginClient::new(channel);

    let (_, before) = get(node.http, "/metrics").await;
    assert_eq!(
        sample(
            &before,
            r#"tandem_plugin_requests_total{method="prepare",status="ok"}"#
        ),
        None,
        "no call yet:\n{before}"
    );

    let prepared = dra
        .node_prepare_resources(dra_v1::NodePrepareResourcesRequest {
            claims: vec![claim("train", "uid-1"), claim("broken-one", "uid-2")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(prepared.claims["uid-1"].error.is_empty());
    assert!(!prepared.claims["uid-2"].error.is_empty());

    let (status, text) = get(node.http, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} in\n{text}"));
    assert_eq!(
        value(r#"tandem_plugin_requests_total{method="prepare",status="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tandem_plugin_requests_total{method="prepare",status="error"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tandem_plugin_request_duration_seconds_count{method="prepare"}"#),
        1.0
    );
    assert_eq!(value("tandem_plugin_prepared_claims"), 1.0);
    // dgx-h100: 8 GPUs and its NICs, all healthy in the fixture.
    assert_eq!(
        value(r#"tandem_plugin_devices{kind="gpu",health="healthy"}"#),
        8.0
    );
    assert!(value(r#"tandem_plugin_devices{kind="nic",health="healthy"}"#) >= 8.0);
    assert_eq!(value("tandem_plugin_discovery_problems"), 0.0);
    assert_eq!(value("tandem_plugin_discovery_lost_accelerators"), 0.0);

    let unprepared = dra
        .node_unprepare_resources(dra_v1::NodeUnprepareResourcesRequest {
            claims: vec![claim("train", "uid-1")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unprepared.claims["uid-1"].error.is_empty());
    let (_, text) = get(node.http, "/metrics").await;
    assert_eq!(
        sample(
            &text,
            r#"tandem_plugin_requests_total{method="unprepare",status="ok"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "tandem_plugin_prepared_claims"), Some(0.0));
    assert_eq!(node.metrics.requests(Method::Unprepare, true), 1);

    node.endpoint_stop.cancel();
    node.plugin.shutdown().await.unwrap();
}

#[tokio::test]
async fn probes_follow_registration_the_first_publish_and_the_sockets() {
    let node = start_node().await;
    let (status, body) = get(node.http, "/readyz").await;
    assert_eq!((status, body.contains("registered")), (503, true), "{body}");
    let (_, text) = get(node.http, "/metrics").await;
    assert_eq!(
        sample(&text, "tandem_kubelet_registered"),
        Some(0.0),
        "{text}"
    );
    // A publish alone does not make an unregistered plugin ready.
    node.metrics.record_publish(true);
    assert_eq!(get(node.http, "/readyz").await.0, 503);
    register_as_kubelet(&node.plugin.paths().registration).await;
    let mut registration = node.plugin.registration();
    registration.wait_for(|s| s.is_registered()).await.unwrap();
    // The gauge follows the watch on another task.
    for _ in 0..100 {
        if get(node.http, "/readyz").await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, text) = get(node.http, "/metrics").await;
    assert_eq!(
        sample(&text, "tandem_kubelet_registered"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(get(node.http, "/readyz").await.0, 200);
    assert_eq!(get(node.http, "/healthz").await.0, 200);
    let (_, text) = get(node.http, "/metrics").await;
    assert!(
        sample(&text, "tandem_plugin_last_publish_timestamp_seconds").unwrap() > 1.7e9,
        "{text}"
    );
    assert_eq!(get(node.http, "/nothing-here").await.0, 404);

    let dra_socket = node.plugin.paths().dra.clone();
    std::fs::remove_file(&dra_socket).unwrap();
    let (status, body) = get(node.http, "/healthz").await;
    assert_eq!(status, 503);
    assert!(body.contains(&dra_socket.display().to_string()), "{body}");
    assert_eq!(get(node.http, "/readyz").await.0, 503);

    // A stopped server is not alive either, whatever files remain.
    let stopped = node.plugin.shutdown_token();
    node.plugin.shutdown().await.unwrap();
    assert!(stopped.is_cancelled());
    let (status, body) = get(node.http, "/healthz").await;
    assert_eq!((status, body.contains("stopped")), (503, true), "{body}");
    node.endpoint_stop.cancel();
}
