//! The fake apiserver driven only through kube::Api: it must behave like the real one where
//! Tandem depends on it (server-set fields, conflicts, 404s, selectors, watches, validation).

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tandem::apiserver_fake::{FakeApiServer, InjectedFailure};

fn config_map(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn slice_json(name: &str, node: &str, driver: &str) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": 0, "resourceSliceCount": 1},
            "devices": [
                {"name": "gpu-0000-18-00-0", "attributes": {
                    "tandem.dev/model": {"string": "H100"},
                    "tandem.dev/numaNode": {"int": 0},
                    "tandem.dev/rdma": {"bool": true},
                    "driverVersion": {"version": "550.54.15"},
                }, "capacity": {"tandem.dev/memory": {"value": "80Gi"}}},
                {"name": "nic-0000-19-00-0", "taints": [
                    {"key": "tandem.dev/link-down", "effect": "NoSchedule"}
                ]},
            ],
        },
    })
}

fn slice(value: Value) -> ResourceSlice {
    serde_json::from_value(value).unwrap()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_get_update_delete_set_server_fields() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let created = api
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(!uid.is_empty());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));

    let mut fetched = api.get("a").await.unwrap();
    assert_eq!(fetched.metadata.uid.as_deref(), Some(uid.as_str()));
    fetched.data = Some(BTreeMap::from([("k".into(), "changed".into())]));
    let updated = api
        .replace("a", &PostParams::default(), &fetched)
        .await
        .unwrap();
    let rv2: u64 = updated
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1, "every write gets a newer resourceVersion");
    assert_eq!(
        updated.metadata.uid, created.metadata.uid,
        "uid survives updates"
    );

    // An update that changes nothing is not stored again (same resourceVersion), as in etcd.
    let same = api
        .replace("a", &PostParams::default(), &updated)
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        updated.metadata.resource_version
    );

    let writes = server.write_count();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(server.write_count(), writes + 1);
    let status = api_error(api.get("a").await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert!(
        status.message.contains("configmaps \"a\" not found"),
        "{}",
        status.message
    );
    server.shutdown().await;
}

#[tokio::test]
async fn duplicates_stale_versions_and_missing_objects_are_refused() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let first = api
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    let status = api_error(
        api.create(&PostParams::default(), &config_map("a", json!({})))
            .await,
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    let mut newer = first.clone();
    newer.data = Some(BTreeMap::from([("k".into(), "v2".into())]));
    api.replace("a", &PostParams::default(), &newer)
        .await
        .unwrap();
    // `first` still carries the old resourceVersion.
    let mut stale = first.clone();
    stale.data = Some(BTreeMap::from([("k".into(), "v3".into())]));
    let status = api_error(api.replace("a", &PostParams::default(), &stale).await);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(status.message.contains("the object has been modified"));
    assert_eq!(api.get("a").await.unwrap().data.unwrap()["k"], "v2");

    let missing = config_map("missing", json!({}));
    let status = api_error(
        api.replace("missing", &PostParams::default(), &missing)
            .await,
    );
    assert_eq!(status.code, 404);
    let patch = Patch::Merge(json!({"data": {"x": "y"}}));
    let status = api_error(api.patch("missing", &PatchParams::default(), &patch).await);
    assert_eq!(status.code, 404);
    let status = api_error(api.delete("missing", &DeleteParams::default()).await);
    assert_eq!(status.code, 404);

    // Delete preconditions are honoured like the kubelet plugin helper relies on.
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some("1".into()),
            uid: None,
        }),
        ..Default::default()
    };
    let status = api_error(api.delete("a", &dp).await);
    assert_eq!(status.code, 409);
    server.shutdown().await;
}

#[tokio::test]
async fn merge_patch_and_server_side_apply() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<Lease> = Api::namespaced(server.client(), "kube-system");
    let applied = api
        .patch(
            "tandem",
            &PatchParams::apply("tandem-controller"),
            &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "tandem"}, "spec": {"holderIdentity": "a"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        applied.spec.unwrap().holder_identity.as_deref(),
        Some("a"),
        "apply creates"
    );
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, vec!["tandem-controller".to_string()]);

    let patched = api
        .patch(
            "tandem",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"leaseDurationSeconds": 15}})),
        )
        .await
        .unwrap();
    let spec = patched.spec.unwrap();
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_duration_seconds),
        (Some("a"), Some(15))
    );

    // A merge patch carrying an old resourceVersion is a precondition, as on the real server.
    let status = api_error(
        api.patch(
            "tandem",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": "1"}, "spec": {"holderIdentity": "b"}}),
            ),
        )
        .await,
    );
    assert_eq!(status.code, 409);

    // Apply without a field manager is a 400, checked by the server, not the client.
    let request = hyper::Request::builder()
        .method("PATCH")
        .uri("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/tandem")
        .header("content-type", "application/apply-patch+yaml")
        .body(br#"{"metadata":{"name":"tandem"}}"#.to_vec())
        .unwrap();
    let status = api_error(server.client().request::<Lease>(request).await);
    assert_eq!(status.code, 400);
    server.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_conflicts_name_the_owning_manager_unless_forced() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<Lease> = Api::namespaced(server.client(), "kube-system");
    let lease = |holder: &str| {
        Patch::Apply(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tandem"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
        }))
    };
    api.patch("tandem", &PatchParams::apply("replica-a"), &lease("a"))
        .await
        .unwrap();
    // Applying the same values shares ownership; a different value is another's field.
    api.patch(
        "tandem",
        &PatchParams::apply("replica-b"),
        &Patch::Apply(json!({"spec": {"leaseDurationSeconds": 15}})),
    )
    .await
    .unwrap();
    let status = api_error(
        api.patch("tandem", &PatchParams::apply("replica-b"), &lease("b"))
            .await,
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Apply failed with 1 conflict: conflict with \"replica-a\": .spec.holderIdentity"
    );
    let holder = |l: Lease| l.spec.unwrap().holder_identity;
    assert_eq!(holder(api.get("tandem").await.unwrap()), Some("a".into()));

    // Forced, the field moves: now replica-a is the one refused.
    let forced = api
        .patch(
            "tandem",
            &PatchParams::apply("replica-b").force(),
            &lease("b"),
        )
        .await
        .unwrap();
    assert_eq!(holder(forced), Some("b".into()));
    let status = api_error(
        api.patch("tandem", &PatchParams::apply("replica-a"), &lease("a"))
            .await,
    );
    assert!(
        status
            .message
            .contains("conflict with \"replica-b\": .spec.holderIdentity"),
        "{}",
        status.message
    );

    // A field an update (PUT or merge patch) wrote belongs to that updater; removing it
    // frees it for the next applier.
    api.patch(
        "tandem",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"holderIdentity": "hand-edit"}})),
    )
    .await
    .unwrap();
    let status = api_error(
        api.patch("tandem", &PatchParams::apply("replica-b"), &lease("b"))
            .await,
    );
    assert_eq!(status.code, 409);
    assert!(
        status.message.contains(" using coordination.k8s.io/v1 at "),
        "{}",
        status.message
    );
    api.patch(
        "tandem",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"holderIdentity": null}})),
    )
    .await
    .unwrap();
    let taken = api
        .patch("tandem", &PatchParams::apply("replica-a"), &lease("a"))
        .await
        .unwrap();
    assert_eq!(holder(taken), Some("a".into()));
    server.shutdown().await;
}

/// kube-lease-manager (the controller's leader election) takes a free lease by a
/// non-forced apply: of replicas racing, the field-manager conflict leaves exactly one leader.
#[tokio::test]
async fn racing_lease_managers_elect_exactly_one_leader() {
    let server = FakeApiServer::start().await.unwrap();
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..5 {
        let client = server.client();
        racers.spawn(async move {
            let manager = kube_lease_manager::LeaseManagerBuilder::new(client, "race")
                .with_namespace("kube-system")
                .with_parameters(kube_lease_manager::LeaseParams::new(
                    format!("r{i}"),
                    30,
                    10,
                ))
                .build()
                .await
                .unwrap();
            let won = manager.changed().await.unwrap();
            // Hold on to the manager so losers keep campaigning instead of returning.
            (won, manager)
        });
    }
    let first = tokio::time::timeout(Duration::from_secs(5), racers.join_next())
        .await
        .expect("someone leads")
        .unwrap()
        .unwrap();
    assert!(first.0);
    // Nobody else becomes leader while the lease is held (losers wait for it to expire).
    let others = tokio::time::timeout(Duration::from_secs(2), racers.join_next()).await;
    assert!(
        others.is_err(),
        "a second leader: {:?}",
        others.map(|o| o.map(|r| r.map(|r| r.0)))
    );
    let api: Api<Lease> = Api::namespaced(server.client(), "kube-system");
    let spec = api.get("race").await.unwrap().spec.unwrap();
    assert!(spec.holder_identity.unwrap().starts_with('r'));
    racers.abort_all();
    server.shutdown().await;
}

#[tokio::test]
async fn status_subresource_separates_spec_and_status() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ResourceClaim> = Api::namespaced(server.client(), "ns1");
    let claim: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "c1"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.tandem.dev"}}]}},
        "status": {"reservedFor": [{"resource": "pods", "name": "p", "uid": "u"}]},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &claim).await.unwrap();
    assert!(
        created.status.is_none(),
        "create drops status on kinds with a status subresource"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let allocation = json!({"status": {"allocation": {"devices": {"results": [
        {"request": "gpu", "driver": "tandem.dev", "pool": "node-a", "device": "gpu-0000-18-00-0"}
    ]}}}});
    let with_status = api
        .patch_status("c1", &PatchParams::default(), &Patch::Merge(allocation))
        .await
        .unwrap();
    let results = &with_status
        .status
        .as_ref()
        .unwrap()
        .allocation
        .as_ref()
        .unwrap()
        .devices
        .as_ref()
        .unwrap()
        .results
        .clone()
        .unwrap();
    assert_eq!(results[0].device, "gpu-0000-18-00-0");
    assert_eq!(
        with_status.metadata.generation,
        Some(1),
        "status writes leave generation alone"
    );

    // A main-resource write cannot touch status.
    let mut cleared = with_status.clone();
    cleared.status = None;
    cleared.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
    let after = api
        .replace("c1", &PostParams::default(), &cleared)
        .await
        .unwrap();
    assert!(after.status.unwrap().allocation.is_some());

    // A changed spec is refused: claims are immutable.
    let mut respecced = api.get("c1").await.unwrap();
    respecced
        .spec
        .devices
        .as_mut()
        .unwrap()
        .requests
        .as_mut()
        .unwrap()[0]
        .name = "other".into();
    let status = api_error(api.replace("c1", &PostParams::default(), &respecced).await);
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("spec: Invalid value"),
        "{}",
        status.message
    );

    // A malformed allocation result is refused with its field path.
    let bad = json!({"status": {"allocation": null}});
    api.patch_status("c1", &PatchParams::default(), &Patch::Merge(bad))
        .await
        .unwrap();
    let bad = json!({"status": {"allocation": {"devices": {"results": [{"request": "gpu", "driver": "tandem.dev", "pool": "node-a", "device": "GPU_0"}]}}}});
    let status = api_error(
        api.patch_status("c1", &PatchParams::default(), &Patch::Merge(bad))
            .await,
    );
    assert!(
        status
            .message
            .contains("status.allocation.devices.results[0].device"),
        "{}",
        status.message
    );
    server.shutdown().await;
}

#[tokio::test]
async fn claim_device_status_is_validated_against_the_allocation_and_dropped_with_it() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ResourceClaim> = Api::namespaced(server.client(), "ns1");
    let claim: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "c1"},
        "spec": {"devices": {"requests": [{"name": "nic", "exactly": {"deviceClassName": "nic.tandem.dev"}}]}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &claim).await.unwrap();
    let allocation = json!({"status": {"allocation": {"devices": {"results": [
        {"request": "nic", "driver": "tandem.dev", "pool": "node-a", "device": "nic-0000-18-00-0"}
    ]}}}});
    api.patch_status("c1", &PatchParams::default(), &Patch::Merge(allocation))
        .await
        .unwrap();
    let device_status = |device: &str, ips: Value, reason: &str| {
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "c1"},
        "status": {"devices": [{
            "driver": "tandem.dev", "pool": "node-a", "device": device,
            "networkData": {"interfaceName": "rdma0", "ips": ips},
            "conditions": [{"type": "Ready", "status": "True", "reason": reason,
                "message": "", "lastTransitionTime": "2026-11-22T10:00:00Z"}],
        }]}})
    };
    let apply = PatchParams::apply("tandem.dev").force();
    // A device the claim was not allocated, an address without its prefix and a reason the
    // apiserver's pattern refuses: each named by its field.
    for (patch, field) in [
        (
            device_status("nic-0000-40-00-0", json!(["10.1.0.2/24"]), "Attached"),
            "status.devices[0]",
        ),
        (
            device_status("nic-0000-18-00-0", json!(["10.1.0.2"]), "Attached"),
            "status.devices[0].networkData.ips[0]",
        ),
        (
            device_status(
                "nic-0000-18-00-0",
                json!(["10.1.0.2/24", "10.1.0.2/24"]),
                "Attached",
            ),
            "status.devices[0].networkData.ips[1]",
        ),
        (
            device_status("nic-0000-18-00-0", json!(["10.1.0.2/24"]), "not ok"),
            "status.devices[0].conditions[0].reason",
        ),
    ] {
        let status = api_error(api.patch_status("c1", &apply, &Patch::Apply(patch)).await);
        assert_eq!(status.code, 422);
        assert!(
            status.message.contains(field),
            "{field}: {}",
            status.message
        );
    }
    let applied = api
        .patch_status(
            "c1",
            &apply,
            &Patch::Apply(device_status(
                "nic-0000-18-00-0",
                json!(["10.1.0.2/24", "fd00::2/64"]),
                "InterfaceAttached",
            )),
        )
        .await
        .unwrap();
    assert_eq!(applied.status.unwrap().devices.unwrap().len(), 1);

    // Deallocation drops the device's status with it, as the registry does.
    api.patch_status(
        "c1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"allocation": null}})),
    )
    .await
    .unwrap();
    let after = api.get("c1").await.unwrap().status.unwrap();
    assert!(after.allocation.is_none());
    assert!(after.devices.unwrap_or_default().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn resource_slice_generation_follows_spec_changes() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ResourceSlice> = Api::all(server.client());
    let created = api
        .create(
            &PostParams::default(),
            &slice(slice_json("s1", "node-a", "tandem.dev")),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let mut relabelled = created.clone();
    relabelled.metadata.labels = Some(BTreeMap::from([("a".into(), "b".into())]));
    let relabelled = api
        .replace("s1", &PostParams::default(), &relabelled)
        .await
        .unwrap();
    assert_eq!(relabelled.metadata.generation, Some(1));
    let mut changed = relabelled.clone();
    changed.spec.pool.generation = 1;
    let changed = api
        .replace("s1", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));

    let mut moved = changed.clone();
    moved.spec.node_name = Some("node-b".into());
    let status = api_error(api.replace("s1", &PostParams::default(), &moved).await);
    assert!(
        status
            .message
            .contains("spec.nodeName: Invalid value: \"node-b\": field is immutable"),
        "{}",
        status.message
    );
    server.shutdown().await;
}

#[tokio::test]
async fn list_selectors_and_pagination() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    maps.create(
        &PostParams::default(),
        &config_map("a", json!({"tier": "gpu", "rack": "1"})),
    )
    .await
    .unwrap();
    maps.create(
        &PostParams::default(),
        &config_map("b", json!({"tier": "nic"})),
    )
    .await
    .unwrap();
    maps.create(&PostParams::default(), &config_map("c", json!({})))
        .await
        .unwrap();
    let other_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "other");
    other_ns
        .create(
            &PostParams::default(),
            &config_map("a", json!({"tier": "gpu"})),
        )
        .await
        .unwrap();

    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect()
    };
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("tier=gpu"))
                .await
                .unwrap()
        ),
        ["a"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("tier"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("!tier"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("tier!=gpu"))
                .await
                .unwrap()
        ),
        ["b", "c"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let everywhere: Api<ConfigMap> = Api::all(client.clone());
    let all = everywhere
        .list(&ListParams::default().labels("tier=gpu"))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 2);
    assert_eq!(
        all.metadata.resource_version.as_deref(),
        Some(server.resource_version().to_string().as_str())
    );

    let page = maps.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = maps
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(rest.clone()), ["c"]);
    assert!(rest.metadata.continue_.as_deref().is_none_or(str::is_empty));

    let slices: Api<ResourceSlice> = Api::all(client.clone());
    slices
        .create(
            &PostParams::default(),
            &slice(slice_json("s-a", "node-a", "tandem.dev")),
        )
        .await
        .unwrap();
    slices
        .create(
            &PostParams::default(),
            &slice(slice_json("s-b", "node-b", "tandem.dev")),
        )
        .await
        .unwrap();
    slices
        .create(
            &PostParams::default(),
            &slice(slice_json("s-c", "node-a", "other.dev")),
        )
        .await
        .unwrap();
    let ours = slices
        .list(&ListParams::default().fields("spec.driver=tandem.dev,spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(ours.items.len(), 1);
    assert_eq!(ours.items[0].metadata.name.as_deref(), Some("s-a"));
    let status = api_error(
        slices
            .list(&ListParams::default().fields("spec.pool.name=node-a"))
            .await,
    );
    assert_eq!(status.code, 400);
    assert!(
        status
            .message
            .contains("field label not supported: spec.pool.name"),
        "{}",
        status.message
    );
    server.shutdown().await;
}

#[tokio::test]
async fn watch_streams_events_in_order_from_a_resource_version() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    api.create(&PostParams::default(), &config_map("before", json!({})))
        .await
        .unwrap();
    let from = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &from)
        .await
        .unwrap()
        .boxed();

    let mut created = api
        .create(&PostParams::default(), &config_map("w", json!({})))
        .await
        .unwrap();
    created.data = Some(BTreeMap::from([("k".into(), "v2".into())]));
    api.replace("w", &PostParams::default(), &created)
        .await
        .unwrap();
    api.delete("w", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    let mut versions = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let (kind, object) = match event {
            WatchEvent::Added(o) => ("ADDED", o),
            WatchEvent::Modified(o) => ("MODIFIED", o),
            WatchEvent::Deleted(o) => ("DELETED", o),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            object.metadata.name.as_deref(),
            Some("w"),
            "the earlier object is not replayed"
        );
        seen.push(kind);
        versions.push(
            object
                .metadata
                .resource_version
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(seen, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn filtered_watch_sees_objects_entering_and_leaving_the_selection() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<Node> = Api::all(server.client());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
    api.create(&PostParams::default(), &node).await.unwrap();
    let from = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().labels("gpu=true").timeout(5), &from)
        .await
        .unwrap()
        .boxed();
    api.patch(
        "n1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"gpu": "true"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "n1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"gpu": null}}})),
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, WatchEvent::Added(_)), "{first:?}");
    let second = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(second, WatchEvent::Deleted(_)), "{second:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn watch_ends_after_timeout_seconds() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(end.is_none(), "the stream closes when timeoutSeconds pass");
    server.shutdown().await;
}

#[tokio::test]
async fn kube_runtime_watcher_works_against_the_fake() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ResourceSlice> = Api::all(server.client());
    api.create(
        &PostParams::default(),
        &slice(slice_json("s-1", "node-a", "tandem.dev")),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &slice(slice_json("s-other", "node-b", "tandem.dev")),
    )
    .await
    .unwrap();
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut events = watcher(api.clone(), config).boxed();

    let mut init_done = false;
    let mut initial = Vec::new();
    while !init_done {
        match tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(s) => initial.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => init_done = true,
            _ => {}
        }
    }
    assert_eq!(initial, ["s-1"]);
    api.create(
        &PostParams::default(),
        &slice(slice_json("s-2", "node-a", "tandem.dev")),
    )
    .await
    .unwrap();
    api.delete("s-1", &DeleteParams::default()).await.unwrap();
    let mut later = Vec::new();
    while later.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(s) => later.push(format!("apply {}", s.metadata.name.unwrap())),
            watcher::Event::Delete(s) => later.push(format!("delete {}", s.metadata.name.unwrap())),
            _ => {}
        }
    }
    assert_eq!(later, ["apply s-2", "delete s-1"]);
    server.shutdown().await;
}

#[tokio::test]
async fn injected_failures_hit_only_matching_requests() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    server.inject_failures(
        Some("POST"),
        "/configmaps",
        1,
        InjectedFailure::InternalError,
    );
    let status = api_error(
        api.create(&PostParams::default(), &config_map("a", json!({})))
            .await,
    );
    assert_eq!(status.code, 500);
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    server.inject_failures(None, "/configmaps/a", 1, InjectedFailure::Conflict);
    let status = api_error(api.get("a").await);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    api.get("a").await.unwrap();
    assert_eq!(server.write_count(), 1, "failed requests are not writes");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&dry, &config_map("b", json!({}))).await.unwrap();
    assert_eq!(server.write_count(), 1, "dry runs are not writes");
    assert_eq!(api_error(api.get("b").await).code, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn finalizers_delay_deletion_until_removed() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut cm = config_map("f", json!({}));
    cm.metadata.finalizers = Some(vec!["tandem.dev/cleanup".into()]);
    api.create(&PostParams::default(), &cm).await.unwrap();
    api.delete("f", &DeleteParams::default()).await.unwrap();
    let marked = api.get("f").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_error(api.get("f").await).code, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn device_class_validation() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<DeviceClass> = Api::all(server.client());
    let good: DeviceClass = serde_json::from_value(json!({
        "metadata": {"name": "gpu.tandem.dev"},
        "spec": {"selectors": [{"cel": {"expression": "device.driver == \"tandem.dev\""}}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &good).await.unwrap();
    let bad: DeviceClass = serde_json::from_value(json!({
        "metadata": {"name": "bad.tandem.dev"},
        "spec": {"selectors": [{"cel": {"expression": ""}}], "config": [{"opaque": {"driver": "Bad_Driver!", "parameters": {}}}]},
    }))
    .unwrap();
    let status = api_error(api.create(&PostParams::default(), &bad).await);
    assert_eq!(status.code, 422);
    assert!(
        status
            .message
            .contains("spec.selectors[0].cel.expression: Required value"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("spec.config[0].opaque.driver"),
        "{}",
        status.message
    );
    server.shutdown().await;
}

/// Each case breaks one rule of a valid slice; the 422 must name the field at fault.
#[tokio::test]
async fn resource_slice_validation_names_the_field() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ResourceSlice> = Api::all(server.client());
    let base = slice_json("base", "node-a", "tandem.dev");
    api.create(&PostParams::default(), &slice(base.clone()))
        .await
        .unwrap();

    let device = |i: usize| json!({"name": format!("dev-{i}")});
    let tainted = |i: usize| json!({"name": format!("dev-{i}"), "taints": [{"key": "tandem.dev/gone", "effect": "NoExecute"}]});
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "driver not a subdomain",
            Box::new(|s| s["spec"]["driver"] = json!("tandem_dev")),
            "spec.driver: Invalid value",
        ),
        (
            "driver too long",
            Box::new(|s| s["spec"]["driver"] = json!(format!("{}.dev", "a".repeat(61)))),
            "spec.driver: Too long",
        ),
        (
            "pool name",
            Box::new(|s| s["spec"]["pool"]["name"] = json!("Node_A")),
            "spec.pool.name: Invalid value",
        ),
        (
            "slice count zero",
            Box::new(|s| s["spec"]["pool"]["resourceSliceCount"] = json!(0)),
            "spec.pool.resourceSliceCount",
        ),
        (
            "negative generation",
            Box::new(|s| s["spec"]["pool"]["generation"] = json!(-1)),
            "spec.pool.generation",
        ),
        (
            "no node selection",
            Box::new(|s| {
                s["spec"].as_object_mut().unwrap().remove("nodeName");
            }),
            "spec: Required value: exactly one of",
        ),
        (
            "two node selections",
            Box::new(|s| s["spec"]["allNodes"] = json!(true)),
            "but multiple fields are set",
        ),
        (
            "129 devices",
            Box::new(move |s| s["spec"]["devices"] = (0..129).map(device).collect()),
            "spec.devices: Too many: 129: must have at most 128",
        ),
        (
            "65 devices with taints",
            Box::new(move |s| s["spec"]["devices"] = (0..65).map(tainted).collect()),
            "spec.devices: Too many: 65: must have at most 64",
        ),
        (
            "device name not a DNS label",
            Box::new(|s| s["spec"]["devices"][0]["name"] = json!("GPU_0")),
            "spec.devices[0].name: Invalid value",
        ),
        (
            "duplicate device names",
            Box::new(|s| s["spec"]["devices"][1]["name"] = json!("gpu-0000-18-00-0")),
            "spec.devices[1].name: Duplicate value",
        ),
        (
            "33 attributes",
            Box::new(|s| {
                let attrs: serde_json::Map<String, Value> = (0..33)
                    .map(|i| (format!("a{i}"), json!({"int": i})))
                    .collect();
                s["spec"]["devices"][0]["attributes"] = Value::Object(attrs);
                s["spec"]["devices"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("capacity");
            }),
            "spec.devices[0]: Too many: 33: must have at most 32",
        ),
        (
            "32 attributes plus a capacity",
            Box::new(|s| {
                let attrs: serde_json::Map<String, Value> = (0..32)
                    .map(|i| (format!("a{i}"), json!({"int": i})))
                    .collect();
                s["spec"]["devices"][0]["attributes"] = Value::Object(attrs);
            }),
            "spec.devices[0]: Too many: 33",
        ),
        (
            "attribute name not a C identifier",
            Box::new(|s| {
                s["spec"]["devices"][0]["attributes"]["tandem.dev/pcie-switch"] =
                    json!({"string": "x"})
            }),
            "spec.devices[0].attributes[tandem.dev/pcie-switch]: Invalid value",
        ),
        (
            "attribute id too long",
            Box::new(|s| {
                s["spec"]["devices"][0]["attributes"][format!("tandem.dev/{}", "a".repeat(33))] =
                    json!({"int": 1})
            }),
            "Too long: may not be more than 32",
        ),
        (
            "attribute domain invalid",
            Box::new(|s| {
                s["spec"]["devices"][0]["attributes"]["Tandem_Dev/model2"] = json!({"int": 1})
            }),
            "spec.devices[0].attributes[Tandem_Dev/model2]: Invalid value",
        ),
        (
            "attribute without value",
            Box::new(|s| s["spec"]["devices"][0]["attributes"]["tandem.dev/model"] = json!({})),
            "spec.devices[0].attributes[tandem.dev/model]: Required value: exactly one value",
        ),
        (
            "attribute with two values",
            Box::new(|s| {
                s["spec"]["devices"][0]["attributes"]["tandem.dev/model"] =
                    json!({"string": "x", "int": 1})
            }),
            "spec.devices[0].attributes[tandem.dev/model]: Invalid value",
        ),
        (
            "string too long",
            Box::new(|s| {
                s["spec"]["devices"][0]["attributes"]["tandem.dev/model"] =
                    json!({"string": "x".repeat(65)})
            }),
            "spec.devices[0].attributes[tandem.dev/model].string: Too long",
        ),
        (
            "version not semver",
            Box::new(|s| {
                s["spec"]["devices"][0]["attributes"]["driverVersion"] =
                    json!({"version": "550.54"})
            }),
            "spec.devices[0].attributes[driverVersion].version: Invalid value",
        ),
        (
            "capacity not a quantity",
            Box::new(|s| {
                s["spec"]["devices"][0]["capacity"]["tandem.dev/memory"] = json!({"value": "80 GB"})
            }),
            "spec.devices[0].capacity[tandem.dev/memory].value",
        ),
        (
            "taint key invalid",
            Box::new(|s| {
                s["spec"]["devices"][1]["taints"][0]["key"] = json!("tandem.dev/link down")
            }),
            "spec.devices[1].taints[0].key: Invalid value",
        ),
        (
            "taint effect unknown",
            Box::new(|s| {
                s["spec"]["devices"][1]["taints"][0]["effect"] = json!("PreferNoSchedule")
            }),
            "spec.devices[1].taints[0].effect: Unsupported value",
        ),
        (
            "17 taints",
            Box::new(|s| {
                s["spec"]["devices"][1]["taints"] = (0..17)
                    .map(|i| json!({"key": format!("tandem.dev/t{i}"), "effect": "NoSchedule"}))
                    .collect()
            }),
            "spec.devices[1].taints: Too many: 17",
        ),
        (
            "device node name without perDeviceNodeSelection",
            Box::new(|s| s["spec"]["devices"][0]["nodeName"] = json!("node-a")),
            "spec.devices[0].nodeName: Forbidden",
        ),
        (
            "object name",
            Box::new(|s| s["metadata"]["name"] = json!("Bad_Name")),
            "metadata.name: Invalid value",
        ),
    ];
    for (i, (what, mutate, expected)) in cases.iter().enumerate() {
        let mut value = base.clone();
        value["metadata"]["name"] = json!(format!("case-{i}"));
        mutate(&mut value);
        let status = api_error(api.create(&PostParams::default(), &slice(value)).await);
        assert_eq!(
            (status.code, status.reason.as_str()),
            (422, "Invalid"),
            "{what}"
        );
        assert!(
            status.message.contains(expected),
            "{what}: {}",
            status.message
        );
        let causes = status.details.as_ref().map(|d| d.causes.len()).unwrap_or(0);
        assert!(causes >= 1, "{what}: causes listed");
    }
    // 64 tainted devices and 128 untainted ones are both within the limits.
    let mut at_limit = base.clone();
    at_limit["metadata"]["name"] = json!("tainted-64");
    at_limit["spec"]["devices"] = (0..64).map(tainted).collect();
    api.create(&PostParams::default(), &slice(at_limit))
        .await
        .unwrap();
    let mut at_limit = base.clone();
    at_limit["metadata"]["name"] = json!("plain-128");
    at_limit["spec"]["devices"] = (0..128).map(device).collect();
    api.create(&PostParams::default(), &slice(at_limit))
        .await
        .unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        3
    );
    server.shutdown().await;
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_410_expired() {
    let server = FakeApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    api.create(&PostParams::default(), &config_map("first", json!({})))
        .await
        .unwrap();
    let old = server.resource_version().to_string();
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    server.compact();
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &old)
        .await
        .unwrap()
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match event {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // Watching from the current version still works after compaction.
    let now = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &now)
        .await
        .unwrap()
        .boxed();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(event, WatchEvent::Deleted(_)), "{event:?}");
    server.shutdown().await;
}
