//! Unit tests of the preparer's pure steps: which claims of a call are worked on, what a
//! checkpoint entry is worth to a prepare, the configuration check and the per-claim locks.

use super::locks::ClaimLocks;
use super::prepare::{Reuse, reuse};
use super::{PrepareConfig, distinct_valid_claims, is_current, validate_config};
use crate::prepare::cdi::{CdiSpec, ContainerEdits};
use crate::prepare::checkpoint::{ClaimEntry, ClaimState};
use crate::prepare::error::PrepareError;
use crate::prepare::{PreparedDevice, RecordedDevice};
use std::path::PathBuf;
use tandem_kubelet_plugin::ClaimRef;

fn claim(namespace: &str, name: &str, uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

fn device(name: &str) -> RecordedDevice {
    RecordedDevice {
        device: PreparedDevice {
            request_names: vec!["gpus".into()],
            pool_name: "node-a".into(),
            device_name: name.into(),
            cdi_device_ids: vec![format!("tandem.dev/claim=u-{name}")],
            share_id: None,
        },
        admin_access: false,
    }
}

/// A completed entry of claim `ml/train` in boot `boot-1`, with one device and its spec.
fn completed() -> ClaimEntry {
    ClaimEntry {
        namespace: "ml".into(),
        name: "train".into(),
        state: ClaimState::PrepareCompleted,
        boot_id: "boot-1".into(),
        devices: vec![device("gpu-0000-1b-00-0")],
        cdi_spec_path: Some(PathBuf::from("/var/run/cdi/tandem.dev-claim_u.json")),
        cdi_spec: Some(CdiSpec {
            cdi_version: "0.6.0".into(),
            kind: "tandem.dev/claim".into(),
            devices: Vec::new(),
            container_edits: ContainerEdits::default(),
        }),
        topology: None,
        files: Vec::new(),
    }
}

#[test]
fn a_call_works_on_each_valid_uid_once_and_answers_each_invalid_one() {
    let claims = [
        claim("ml", "a", "uid-a"),
        claim("ml", "bad", "../etc"),
        claim("ml", "a-again", "uid-a"),
        claim("ml", "b", "uid-b"),
        claim("ml", "bad-again", "../etc"),
        claim("ml", "empty", ""),
    ];
    let (rejected, unique) = distinct_valid_claims::<()>(&claims);
    // The first occurrence of a UID is the one worked on, in the call's order.
    assert_eq!(
        unique,
        vec![claim("ml", "a", "uid-a"), claim("ml", "b", "uid-b")]
    );
    assert_eq!(
        rejected.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["", "../etc"]
    );
    for (uid, answer) in &rejected {
        assert!(
            matches!(answer, Err(PrepareError::Claim(_))),
            "{uid:?}: {answer:?}"
        );
    }
}

#[test]
fn a_call_of_only_invalid_uids_has_nothing_to_work_on() {
    let (rejected, unique) = distinct_valid_claims::<()>(&[claim("ml", "x", "-leading-dash")]);
    assert!(unique.is_empty());
    assert_eq!(rejected.len(), 1);
}

#[test]
fn no_entry_is_planned_and_a_completed_entry_of_this_boot_answers_as_it_is() {
    let train = claim("ml", "train", "u");
    assert_eq!(reuse(None, &train, "boot-1"), Reuse::Plan);
    assert_eq!(reuse(Some(&completed()), &train, "boot-1"), Reuse::Current);
    assert!(is_current(&completed(), "boot-1"));
}

#[test]
fn a_completed_entry_of_an_earlier_boot_is_planned_again() {
    let train = claim("ml", "train", "u");
    assert_eq!(reuse(Some(&completed()), &train, "boot-2"), Reuse::Plan);
    assert!(!is_current(&completed(), "boot-2"));
}

#[test]
fn a_completed_entry_without_its_spec_is_planned_again_unless_it_has_no_devices() {
    let train = claim("ml", "train", "u");
    let no_spec = ClaimEntry {
        cdi_spec: None,
        ..completed()
    };
    assert_eq!(reuse(Some(&no_spec), &train, "boot-1"), Reuse::Plan);
    let nothing_of_ours = ClaimEntry {
        devices: Vec::new(),
        ..no_spec
    };
    assert_eq!(
        reuse(Some(&nothing_of_ours), &train, "boot-1"),
        Reuse::Current
    );
}

#[test]
fn a_started_entry_is_rolled_back_in_any_boot() {
    let train = claim("ml", "train", "u");
    let started = ClaimEntry {
        state: ClaimState::PrepareStarted,
        ..completed()
    };
    assert_eq!(reuse(Some(&started), &train, "boot-1"), Reuse::RollBack);
    assert_eq!(reuse(Some(&started), &train, "boot-2"), Reuse::RollBack);
}

#[test]
fn an_entry_of_another_claim_under_the_same_uid_is_refused_whatever_its_state() {
    let recorded = "ml/train".to_string();
    for entry in [
        completed(),
        ClaimEntry {
            state: ClaimState::PrepareStarted,
            ..completed()
        },
    ] {
        for other in [claim("ml", "other", "u"), claim("prod", "train", "u")] {
            assert_eq!(
                reuse(Some(&entry), &other, "boot-1"),
                Reuse::IdentityMismatch {
                    recorded: recorded.clone()
                }
            );
        }
    }
}

#[test]
fn config_check_names_the_field_at_fault() {
    let good = PrepareConfig::new("tandem.dev", "node-a");
    assert!(validate_config(&good).is_ok());
    let field_of = |config: &PrepareConfig| match validate_config(config) {
        Err(PrepareError::InvalidConfig { field, .. }) => Some(field),
        _ => None,
    };
    let relative_state = PrepareConfig {
        state_dir: PathBuf::from("var/lib/tandem"),
        ..good.clone()
    };
    assert_eq!(field_of(&relative_state), Some("state_dir"));
    let relative_cdi = PrepareConfig {
        cdi_dir: PathBuf::from("cdi"),
        ..good.clone()
    };
    assert_eq!(field_of(&relative_cdi), Some("cdi_dir"));
    let relative_topology = PrepareConfig {
        topology_dir: PathBuf::from("run/tandem"),
        ..good.clone()
    };
    assert_eq!(field_of(&relative_topology), Some("topology_dir"));
    let relative_dev = PrepareConfig {
        dev_root_in_container: PathBuf::from("dev"),
        ..good.clone()
    };
    assert_eq!(field_of(&relative_dev), Some("dev_root_in_container"));
    assert_eq!(
        field_of(&PrepareConfig::new("Tandem_Dev", "node-a")),
        Some("driver_name")
    );
    assert_eq!(
        field_of(&PrepareConfig::new("tandem.dev", "a/b")),
        Some("node_name")
    );
    assert_eq!(
        field_of(&PrepareConfig::new("tandem.dev", "")),
        Some("node_name")
    );
}

#[tokio::test]
async fn claim_locks_are_forgotten_with_their_last_holder() {
    let locks = ClaimLocks::default();
    let a = claim("ml", "a", "uid-a");
    let b = claim("ml", "b", "uid-b");
    // A UID repeated in a call is locked once (locking it twice would deadlock).
    let first = locks.lock_all(&[a.clone(), b.clone(), a.clone()]).await;
    assert_eq!(locks.held(), vec!["uid-a", "uid-b"]);
    // Another call on one of the claims waits for the first.
    let waiting = locks.lock_all(std::slice::from_ref(&b));
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(20), &mut waiting)
            .await
            .is_err()
    );
    drop(first);
    let second = waiting.await;
    assert_eq!(locks.held(), vec!["uid-b"]);
    drop(second);
    assert!(locks.held().is_empty());
}
