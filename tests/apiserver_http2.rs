//! How the node agent uses its connection to the apiserver: against the fake serving HTTPS with
//! `h2` and `http/1.1` offered by ALPN, as a real apiserver does, concurrent requests (a burst
//! of prepares fetching their claims) share one HTTP/2 connection instead of opening one TLS
//! connection each, as kube's own HTTP/1.1 client does.

#[path = "support/claims.rs"]
mod claims;
#[path = "support/plugin_process.rs"]
mod plugin_process;

use claims::create_gpu_nic_claims;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use plugin_process::plugin_command;
use std::time::{Duration, Instant};
use tandem::apiserver_fake::FakeApiServer;
use tandem::fixture;
use tandem::sysfs::discover;
use tandem_kubelet_plugin::client::unix_channel;
use tandem_kubelet_plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, dra_plugin_client::DraPluginClient,
};

const NODE: &str = "dgx-h100";
const NAMESPACE: &str = "ml";

async fn create_node(apiserver: &FakeApiServer) {
    let nodes: Api<Node> = Api::all(apiserver.client());
    let node: Node = serde_json::from_value(serde_json::json!({ "metadata": { "name": NODE } }))
        .expect("node object");
    nodes.create(&Default::default(), &node).await.unwrap();
}

/// `count` GETs of the node at once.
async fn concurrent_gets(nodes: &Api<Node>, count: usize) {
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let nodes = nodes.clone();
            tokio::spawn(async move { nodes.get(NODE).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn the_node_agents_client_sends_concurrent_requests_over_one_http2_connection() {
    let apiserver = FakeApiServer::start_tls().await.unwrap();
    create_node(&apiserver).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig).unwrap();
    // The client `tandem plugin` and `tandem controller` build from --kubeconfig.
    let client = tandem::cli::plugin::kube_client(Some(&kubeconfig))
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client);
    let before = apiserver.connection_count();
    nodes.get(NODE).await.unwrap();
    assert_eq!(apiserver.connection_count(), before + 1);
    concurrent_gets(&nodes, 16).await;
    assert_eq!(
        apiserver.connection_count(),
        before + 1,
        "16 concurrent GETs opened connections of their own"
    );
    assert_eq!(apiserver.http2_request_count(), 17, "not all over HTTP/2");
}

#[tokio::test]
async fn kubes_own_client_opens_a_connection_per_concurrent_request() {
    // What the test above guards against: the fake's own client is kube's stack, HTTP/1.1.
    let apiserver = FakeApiServer::start_tls().await.unwrap();
    create_node(&apiserver).await;
    let nodes: Api<Node> = Api::all(apiserver.client());
    concurrent_gets(&nodes, 8).await;
    assert!(
        apiserver.connection_count() > 2,
        "kube's client shared connections: {}",
        apiserver.connection_count()
    );
    assert_eq!(apiserver.http2_request_count(), 0);
}

/// The real `tandem plugin` against the HTTPS fake: 8 pods' claims prepared at once fetch
/// their claims over the connection the plugin already holds, all over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_prepares_fetches_its_claims_over_the_plugins_one_http2_connection() {
    let apiserver = FakeApiServer::start_tls().await.unwrap();
    create_node(&apiserver).await;
    let scratch = fixture::scratch_dir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let roots = fixture::write_machine(
        &fixture::builtin("dgx-h100").unwrap(),
        &scratch.path().join("machine"),
    )
    .unwrap();
    let inventory = discover(&roots).unwrap();
    let claims =
        create_gpu_nic_claims(&apiserver.client(), &inventory, NAMESPACE, NODE, "claim", 8).await;
    assert_eq!(claims.len(), 8);
    let kubeconfig = scratch.path().join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig).unwrap();
    let mut plugin = plugin_command(NODE, scratch.path(), state.path(), &roots, &kubeconfig)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = scratch.path().join("plugins/tandem.dev/dra.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        if let Ok(channel) = unix_channel(&socket).await {
            break DraPluginClient::new(channel);
        }
        assert!(Instant::now() < deadline, "plugin did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let prepare = |claim: Claim| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let answer = client
                .node_prepare_resources(NodePrepareResourcesRequest {
                    claims: vec![claim.clone()],
                })
                .await
                .unwrap()
                .into_inner();
            let result = &answer.claims[&claim.uid];
            assert!(result.error.is_empty(), "{}", result.error);
            assert_eq!(result.devices.len(), 2);
        })
    };
    // One prepare first: the plugin's connection is open and in use.
    prepare(claims[0].clone()).await.unwrap();
    let (connections, requests, http2) = (
        apiserver.connection_count(),
        apiserver.requests().len(),
        apiserver.http2_request_count(),
    );
    assert!(
        http2 > 0,
        "the plugin does not speak HTTP/2 to the apiserver"
    );
    let burst: Vec<_> = claims[1..].iter().cloned().map(prepare).collect();
    for call in burst {
        call.await.unwrap();
    }
    let sent = apiserver.requests().len() - requests;
    assert!(sent >= 7, "the burst fetched {sent} claims");
    assert_eq!(
        apiserver.http2_request_count() - http2,
        sent as u64,
        "some requests of the burst were not HTTP/2"
    );
    assert_eq!(
        apiserver.connection_count(),
        connections,
        "the burst opened connections of its own"
    );
    plugin.start_kill().unwrap();
    plugin.wait().await.unwrap();
}
