//! The node plugin follows the controller's rail ConfigMap with a watch on that one object:
//! each create, update and delete reaches it, and at steady state it sends the apiserver
//! nothing (the poll it replaced cost one GET per node every 30 s).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use tandem::apiserver_fake::FakeApiServer;
use tandem::names;
use tandem::slices::network::watch_rail_configmap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "tandem-system";
type Rails = Option<BTreeMap<String, String>>;

async fn next_rails(rx: &mut watch::Receiver<Rails>) -> Rails {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("no rails change within 10 s")
        .expect("rails watch ended");
    rx.borrow_and_update().clone()
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn patch_data(api: &Api<ConfigMap>, key: &str, value: &str) {
    let patch = serde_json::json!({ "data": { key: value } });
    api.patch(
        names::RAILS_CONFIGMAP,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
}

fn rail_gets(apiserver: &FakeApiServer) -> usize {
    apiserver
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/configmaps") && !r.contains("watch=true"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rail_changes_arrive_by_watch_and_steady_state_costs_no_requests() {
    let apiserver = FakeApiServer::start().await.unwrap();
    let (tx, mut rx) = watch::channel(Some(data(&[("stale", "x")])));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(watch_rail_configmap(
        apiserver.client(),
        NAMESPACE.to_string(),
        tx,
        shutdown.clone(),
    ));
    // The first complete list says there is no ConfigMap yet.
    assert_eq!(next_rails(&mut rx).await, None);

    let api: Api<ConfigMap> = Api::namespaced(apiserver.client(), NAMESPACE);
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::RAILS_CONFIGMAP.to_string()),
            namespace: Some(NAMESPACE.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(data(&[("10.1.0.0_24", "0")])),
        ..ConfigMap::default()
    };
    let created = Instant::now();
    api.create(&PostParams::default(), &configmap)
        .await
        .unwrap();
    assert_eq!(
        next_rails(&mut rx).await,
        Some(data(&[("10.1.0.0_24", "0")]))
    );
    eprintln!(
        "rail ConfigMap create reached the plugin in {:?}",
        created.elapsed()
    );

    // Another ConfigMap in the namespace is none of its business.
    let other = ConfigMap {
        metadata: ObjectMeta {
            name: Some("unrelated".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    api.create(&PostParams::default(), &other).await.unwrap();

    let updated = Instant::now();
    patch_data(&api, "10.2.0.0_24", "1").await;
    assert_eq!(
        next_rails(&mut rx).await,
        Some(data(&[("10.1.0.0_24", "0"), ("10.2.0.0_24", "1")]))
    );
    eprintln!(
        "rail ConfigMap update reached the plugin in {:?}",
        updated.elapsed()
    );

    // Steady state: nothing changes, nothing is asked.
    let gets_before = rail_gets(&apiserver);
    let requests_before = apiserver.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rail_gets(&apiserver), gets_before);
    assert_eq!(
        apiserver.requests().len(),
        requests_before,
        "requests at steady state"
    );
    assert!(
        !rx.has_changed().unwrap(),
        "the unrelated ConfigMap caused a change"
    );

    api.delete(names::RAILS_CONFIGMAP, &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(next_rails(&mut rx).await, None);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("watch did not stop on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_configmap_is_listed_first_then_followed() {
    let apiserver = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(apiserver.client(), NAMESPACE);
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::RAILS_CONFIGMAP.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(data(&[("10.1.0.0_24", "0")])),
        ..ConfigMap::default()
    };
    api.create(&PostParams::default(), &configmap)
        .await
        .unwrap();
    let (tx, mut rx) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let _task = tokio::spawn(watch_rail_configmap(
        apiserver.client(),
        NAMESPACE.to_string(),
        tx,
        shutdown.clone(),
    ));
    assert_eq!(
        next_rails(&mut rx).await,
        Some(data(&[("10.1.0.0_24", "0")]))
    );
    patch_data(&api, "10.1.0.0_24", "5").await;
    let mut seen = next_rails(&mut rx).await;
    while seen != Some(data(&[("10.1.0.0_24", "5")])) {
        seen = next_rails(&mut rx).await;
    }
    shutdown.cancel();
}
