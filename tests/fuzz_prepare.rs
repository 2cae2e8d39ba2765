//! Bounded property tests over claim preparation's inputs: opaque config JSON, checkpoint files
//! (arbitrary, truncated, bit-flipped), the CDI spec round trip and arbitrary claim lists sent
//! through the real gRPC service over a Unix socket. proptest stands in for cargo-fuzz, which
//! needs nightly; `TANDEM_FUZZ_CASES` raises the case counts for longer local runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[path = "support/claims.rs"]
mod claims;
#[path = "support/in_process_node.rs"]
mod in_process_node;

use claims::create_gpu_nic_claims;
use in_process_node::InProcessNode;
use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, OpaqueDeviceConfiguration};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use tandem::names;
use tandem::prepare::cdi::{
    CdiDevice, CdiSpec, ContainerEdits, DeviceNode, Hook, Mount, NetDevice,
};
use tandem::prepare::checkpoint::{self, LoadOutcome};
use tandem::prepare::config::resolve;
use tandem_kubelet_plugin::proto::dra_v1::{
    Claim, NodePrepareResourcesRequest, NodeUnprepareResourcesRequest,
};

const NODE: &str = "node-fuzz";
const NAMESPACE: &str = "fuzz";

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("TANDEM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".*".prop_map(Value::String),
        prop_oneof![
            Just("Standard"),
            Just("NCCL"),
            Just("None"),
            Just("Shared"),
            Just("Exclusive"),
            Just("tandem.dev/v1alpha1"),
            Just("ClaimConfig"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("apiVersion".to_string()),
                    Just("kind".to_string()),
                    Just("env".to_string()),
                    Just("nicAttach".to_string()),
                    ".{0,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn config_entry() -> impl Strategy<Value = DeviceAllocationConfiguration> {
    (
        prop_oneof![Just("FromClass"), Just("FromClaim"), Just("Elsewhere")],
        prop::option::of(prop::collection::vec("(gpus|nics|x)(/[a-z]{1,3})?", 0..3)),
        prop_oneof![Just(names::DEFAULT_DRIVER_NAME), Just("other.example.com")],
        arbitrary_json(),
        any::<bool>(),
    )
        .prop_map(|(source, requests, driver, parameters, opaque)| {
            DeviceAllocationConfiguration {
                source: source.to_string(),
                requests,
                opaque: opaque.then(|| OpaqueDeviceConfiguration {
                    driver: driver.to_string(),
                    parameters: RawExtension(parameters),
                }),
            }
        })
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn opaque_config_errors_always_name_a_field(
        entries in prop::collection::vec(config_entry(), 0..5),
        wrapped in any::<bool>(),
    ) {
        // Half the cases wrap the parameters in a valid envelope, so the field checks behind
        // apiVersion/kind are reached too.
        let entries: Vec<_> = entries
            .into_iter()
            .map(|mut e| {
                if let (true, Some(opaque)) = (wrapped, e.opaque.as_mut())
                    && let Value::Object(map) = &mut opaque.parameters.0
                {
                    map.insert("apiVersion".into(), json!("tandem.dev/v1alpha1"));
                    map.insert("kind".into(), json!("ClaimConfig"));
                }
                e
            })
            .collect();
        match resolve(names::DEFAULT_DRIVER_NAME, &entries, &["gpus", "nics/x"]) {
            Ok(configs) => prop_assert_eq!(configs.len(), 2),
            Err(e) => {
                // The field is one we know or a key the user wrote (even an empty one).
                let known = ["source", "parameters", "apiVersion", "kind", "env", "nicAttach"];
                let written = entries.iter().filter_map(|e| e.opaque.as_ref()).any(|o| {
                    o.parameters.0.as_object().is_some_and(|m| m.contains_key(&e.field))
                });
                prop_assert!(known.contains(&e.field.as_str()) || written, "error names no field: {}", e);
                prop_assert!(e.index < entries.len());
                let quoted = format!("{:?}", e.field);
                prop_assert!(e.to_string().contains(&quoted));
            }
        }
    }

    #[test]
    fn checkpoint_migration_never_panics(value in arbitrary_json()) {
        let _ = checkpoint::migrate(value.clone());
        let _ = checkpoint::migrate(json!({"version": 1, "bootId": "b", "checksum": "x", "claims": value}));
        let _ = checkpoint::migrate(json!({"claims": [value]}));
    }

    #[test]
    fn cdi_spec_written_reads_back_equal(spec in cdi_spec()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        let back: CdiSpec = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        prop_assert_eq!(back, spec);
    }
}

fn container_edits() -> impl Strategy<Value = ContainerEdits> {
    (
        prop::collection::vec(".{0,12}=.{0,12}", 0..3),
        prop::collection::vec(
            ("/dev/.{0,10}", any::<u32>(), any::<u32>())
                .prop_map(|(p, ma, mi)| DeviceNode::char_device(p, ma, mi)),
            0..3,
        ),
        prop::collection::vec(
            (
                "/.{0,12}",
                "/.{0,12}",
                prop::collection::vec("[a-z]{1,6}", 0..3),
            )
                .prop_map(|(host_path, container_path, options)| Mount {
                    host_path,
                    container_path,
                    options,
                }),
            0..2,
        ),
        prop::collection::vec(
            (
                "[a-zA-Z]{1,12}",
                "/.{0,12}",
                prop::collection::vec(".{0,8}", 0..3),
                prop::option::of(any::<i64>()),
            )
                .prop_map(|(hook_name, path, args, timeout)| Hook {
                    hook_name,
                    path,
                    args,
                    timeout,
                }),
            0..2,
        ),
        prop::collection::vec(
            ("[a-z0-9]{1,15}", "[a-z0-9]{1,15}").prop_map(|(host_interface_name, name)| {
                NetDevice {
                    host_interface_name,
                    name,
                }
            }),
            0..2,
        ),
    )
        .prop_map(
            |(env, device_nodes, mounts, hooks, net_devices)| ContainerEdits {
                env,
                device_nodes,
                mounts,
                hooks,
                net_devices,
            },
        )
}

fn cdi_spec() -> impl Strategy<Value = CdiSpec> {
    (
        prop::collection::vec(
            ("[a-z0-9][a-z0-9-]{0,40}", container_edits()).prop_map(|(name, container_edits)| {
                CdiDevice {
                    name,
                    container_edits,
                }
            }),
            0..4,
        ),
        container_edits(),
    )
        .prop_map(|(devices, container_edits)| CdiSpec {
            cdi_version: "0.5.0".into(),
            kind: "tandem.dev/claim".into(),
            devices,
            container_edits,
        })
}

/// A runtime for the async parts, driven from proptest's synchronous runner.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The in-process node with three real claims, whose preparation writes a real checkpoint, so
/// corruption starts from the bytes the plugin writes.
async fn start_with_real_claims() -> (InProcessNode, Vec<Claim>) {
    let node = InProcessNode::start(NODE).await;
    let real_claims = create_gpu_nic_claims(
        &node.apiserver.client(),
        &node.inventory,
        NAMESPACE,
        NODE,
        "real",
        3,
    )
    .await;
    (node, real_claims)
}

fn set_aside_files(state_dir: &Path) -> usize {
    std::fs::read_dir(state_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        })
        .count()
}

/// Truncated, bit-flipped and arbitrary checkpoint files: load never panics; a file it cannot
/// trust is renamed aside and an empty checkpoint returned; the preparer's recover() does the
/// same and the plugin keeps serving.
#[test]
fn corrupt_checkpoints_are_set_aside_never_panic() {
    let rt = runtime();
    let (node, real_claims) = rt.block_on(start_with_real_claims());
    rt.block_on(async {
        let mut client = node.client().await;
        let answer = client
            .node_prepare_resources(NodePrepareResourcesRequest {
                claims: real_claims.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for claim in &real_claims {
            assert_eq!(answer.claims[&claim.uid].error, "", "{}", claim.name);
        }
    });
    let path = checkpoint::checkpoint_path(&node.state_dir);
    let good = std::fs::read(&path).unwrap();
    let (loaded, outcome) = checkpoint::load(&node.state_dir).unwrap();
    assert_eq!(
        outcome,
        LoadOutcome::Loaded {
            migrated_from: None
        }
    );
    assert_eq!(loaded.claims.len(), real_claims.len());

    #[derive(Debug, Clone)]
    enum Damage {
        Truncate(usize),
        FlipBit(usize, u8),
        Replace(Vec<u8>),
    }
    let damage = prop_oneof![
        (0..good.len()).prop_map(Damage::Truncate),
        (0..good.len(), 0u8..8).prop_map(|(i, b)| Damage::FlipBit(i, b)),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Damage::Replace),
        arbitrary_json().prop_map(|v| Damage::Replace(v.to_string().into_bytes())),
    ];
    let mut runner = TestRunner::new(config(300));
    let case = std::cell::Cell::new(0u32);
    runner
        .run(&damage, |damage| {
            case.set(case.get() + 1);
            let bytes = match &damage {
                Damage::Truncate(n) => good[..*n].to_vec(),
                Damage::FlipBit(i, b) => {
                    let mut bytes = good.clone();
                    bytes[*i] ^= 1 << b;
                    bytes
                }
                Damage::Replace(bytes) => bytes.clone(),
            };
            std::fs::write(&path, &bytes).unwrap();
            let before = set_aside_files(&node.state_dir);
            let (loaded, outcome) = checkpoint::load(&node.state_dir).unwrap();
            match outcome {
                LoadOutcome::SetAside { set_aside_to, .. } => {
                    prop_assert!(loaded.claims.is_empty());
                    prop_assert!(!path.exists(), "corrupt checkpoint left in place");
                    prop_assert_eq!(&std::fs::read(&set_aside_to).unwrap(), &bytes);
                    prop_assert_eq!(set_aside_files(&node.state_dir), before + 1);
                    std::fs::remove_file(set_aside_to).unwrap();
                }
                // A flip inside insignificant whitespace, or a replacement that is valid:
                // only then may it load, and then it must be the original content.
                LoadOutcome::Loaded { .. } => {
                    if bytes != good {
                        let (reloaded, _) = checkpoint::load(&node.state_dir).unwrap();
                        prop_assert!(reloaded.claims.len() <= real_claims.len());
                    }
                }
                LoadOutcome::Fresh => prop_assert!(false, "file exists but loaded as fresh"),
            }
            // recover() on a sample of the cases: the whole start-up path, not just load.
            if case.get().is_multiple_of(25) {
                std::fs::write(&path, &bytes).unwrap();
                let report = rt.block_on(node.preparer.recover()).unwrap();
                if bytes != good
                    && let LoadOutcome::SetAside { set_aside_to, .. } = &report.checkpoint
                {
                    std::fs::remove_file(set_aside_to).unwrap();
                }
            }
            Ok(())
        })
        .unwrap();
    // The plugin still serves after all that.
    rt.block_on(async {
        let answer = node
            .client()
            .await
            .node_unprepare_resources(NodeUnprepareResourcesRequest {
                claims: real_claims.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.claims.len(), real_claims.len());
    });
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-f0-9-]{36}",
        Just(String::new()),
        Just("..".to_string()),
        Just("../../etc".to_string()),
        Just("a/b".to_string()),
        Just("x".repeat(300)),
        Just("ünïcødé-✓".to_string()),
        Just("\u{0}".to_string()),
        ".{0,20}",
    ]
}

/// Arbitrary claim lists mixing real claims, repeats and hostile names and UIDs: the RPC never
/// fails, every distinct UID gets exactly one answer, real claims prepare, and nothing a
/// hostile claim names appears outside the CDI and state directories.
#[test]
fn arbitrary_claim_lists_get_one_answer_per_uid() {
    let rt = runtime();
    let (node, real) = rt.block_on(start_with_real_claims());
    let entry = prop_oneof![
        3 => (0..real.len()).prop_map(Some),
        7 => Just(None),
    ];
    let claims = prop::collection::vec(
        (entry, hostile_string(), hostile_string(), hostile_string()),
        0..40,
    );
    let mut runner = TestRunner::new(config(40));
    let outside_before = std::fs::read_dir(node.dir.path()).unwrap().count();
    runner
        .run(&(claims, any::<bool>()), |(picks, prepare)| {
            let claims: Vec<Claim> = picks
                .into_iter()
                .map(|(pick, namespace, name, uid)| match pick {
                    Some(i) => real[i].clone(),
                    None => Claim {
                        namespace,
                        name,
                        uid,
                    },
                })
                .collect();
            let distinct: BTreeSet<String> = claims.iter().map(|c| c.uid.clone()).collect();
            let real_uids: BTreeSet<&String> = real.iter().map(|c| &c.uid).collect();
            rt.block_on(async {
                let mut client = node.client().await;
                if prepare {
                    let answer = client
                        .node_prepare_resources(NodePrepareResourcesRequest {
                            claims: claims.clone(),
                        })
                        .await
                        .map_err(|s| TestCaseError::fail(format!("RPC failed: {s}")))?
                        .into_inner();
                    let answered: BTreeSet<String> = answer.claims.keys().cloned().collect();
                    prop_assert_eq!(&answered, &distinct);
                    for (uid, a) in &answer.claims {
                        if real_uids.contains(uid) {
                            prop_assert_eq!(&a.error, "");
                            prop_assert_eq!(a.devices.len(), 2);
                        } else {
                            prop_assert!(!a.error.is_empty(), "fake claim {:?} prepared", uid);
                        }
                    }
                } else {
                    let answer = client
                        .node_unprepare_resources(NodeUnprepareResourcesRequest {
                            claims: claims.clone(),
                        })
                        .await
                        .map_err(|s| TestCaseError::fail(format!("RPC failed: {s}")))?
                        .into_inner();
                    let answered: BTreeSet<String> = answer.claims.keys().cloned().collect();
                    prop_assert_eq!(answered, distinct);
                }
                Ok(())
            })?;
            prop_assert_eq!(
                std::fs::read_dir(node.dir.path()).unwrap().count(),
                outside_before,
                "a claim wrote outside the CDI and state directories"
            );
            Ok(())
        })
        .unwrap();

    // Whatever the lists did, specs and checkpoint agree: every checkpointed claim has its
    // spec and every spec belongs to a checkpointed claim.
    let (state, _) = checkpoint::load(&node.state_dir).unwrap();
    let spec_uids: BTreeMap<String, ()> = std::fs::read_dir(&node.cdi_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| {
            n.strip_prefix("tandem.dev-claim_")?
                .strip_suffix(".json")
                .map(|u| (u.to_string(), ()))
        })
        .collect();
    let checkpointed: BTreeMap<String, ()> = state.claims.keys().map(|k| (k.clone(), ())).collect();
    assert_eq!(spec_uids, checkpointed);
    for uid in checkpointed.keys() {
        assert!(
            real.iter().any(|c| &c.uid == uid),
            "{uid} is not a real claim"
        );
    }
}
