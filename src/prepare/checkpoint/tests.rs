//! Unit tests of the checkpoint: format, migration, loading and the group-commit store.

use super::*;

fn entry(state: ClaimState) -> ClaimEntry {
    ClaimEntry {
        namespace: "ml".into(),
        name: "train".into(),
        state,
        boot_id: "boot-1".into(),
        devices: vec![RecordedDevice {
            device: PreparedDevice {
                request_names: vec!["gpus".into()],
                pool_name: "node-a".into(),
                device_name: "gpu-0000-1b-00-0".into(),
                cdi_device_ids: vec!["tandem.dev/claim=u1-gpu-0000-1b-00-0".into()],
                share_id: None,
            },
            admin_access: false,
        }],
        cdi_spec_path: Some("/var/run/cdi/tandem.dev-claim_u1.json".into()),
        cdi_spec: None,
        topology: None,
        files: vec![],
    }
}

fn sample() -> Checkpoint {
    Checkpoint {
        boot_id: "boot-1".into(),
        claims: [("u1".to_string(), entry(ClaimState::PrepareCompleted))].into(),
        pending_releases: BTreeMap::new(),
    }
}

#[test]
fn save_then_load_round_trips_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &sample()).unwrap();
    let (loaded, outcome) = load(dir.path()).unwrap();
    assert_eq!(loaded, sample());
    assert_eq!(
        outcome,
        LoadOutcome::Loaded {
            migrated_from: None
        }
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(checkpoint_path(dir.path()))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint_path(dir.path())).unwrap()).unwrap();
    assert_eq!(raw["version"], 1);
    assert_eq!(raw["bootId"], "boot-1");
    assert_eq!(raw["claims"]["u1"]["state"], "PrepareCompleted");
    assert!(raw["checksum"].as_str().unwrap().starts_with("fnv1a64:"));
}

#[test]
fn missing_file_is_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (loaded, outcome) = load(dir.path()).unwrap();
    assert!(loaded.claims.is_empty());
    assert_eq!(outcome, LoadOutcome::Fresh);
}

#[test]
fn edited_content_fails_the_checksum_and_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &sample()).unwrap();
    let path = checkpoint_path(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("gpu-0000-1b-00-0", "gpu-0000-1c-00-0")).unwrap();
    let (loaded, outcome) = load(dir.path()).unwrap();
    assert!(loaded.claims.is_empty());
    let LoadOutcome::SetAside {
        set_aside_to,
        reason,
    } = outcome
    else {
        panic!("expected set aside, got {outcome:?}");
    };
    assert!(reason.contains("checksum"), "{reason}");
    assert!(
        set_aside_to
            .to_string_lossy()
            .contains("checkpoint.json.corrupt-")
    );
    assert!(set_aside_to.exists());
    assert!(!path.exists());
}

#[test]
fn garbage_and_newer_versions_are_set_aside_not_fatal() {
    for content in [
        "{\"version\":1,",
        "\u{0}\u{1}binary",
        r#"{"version":7,"claims":{}}"#,
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(checkpoint_path(dir.path()), content).unwrap();
        let (loaded, outcome) = load(dir.path()).unwrap();
        assert!(loaded.claims.is_empty());
        assert!(
            matches!(outcome, LoadOutcome::SetAside { .. }),
            "{content}: {outcome:?}"
        );
    }
}

#[test]
fn version_0_is_read_and_upgraded_never_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let v0 = r#"{"claims":[
        {"uid":"u1","namespace":"ml","name":"train","prepared":true,
         "devices":[{"requestNames":["gpus"],"poolName":"node-a","deviceName":"gpu-0000-1b-00-0",
                     "cdiDeviceIds":["tandem.dev/claim=u1-gpu-0000-1b-00-0"]}],
         "cdiSpecPath":"/var/run/cdi/tandem.dev-claim_u1.json"},
        {"uid":"u2","namespace":"ml","name":"half","prepared":false,"devices":[],"cdiSpecPath":null}
    ]}"#;
    std::fs::write(checkpoint_path(dir.path()), v0).unwrap();
    let (loaded, outcome) = load(dir.path()).unwrap();
    assert_eq!(
        outcome,
        LoadOutcome::Loaded {
            migrated_from: Some(0)
        }
    );
    let u1 = &loaded.claims["u1"];
    assert_eq!(u1.state, ClaimState::PrepareCompleted);
    assert_eq!(u1.boot_id, "");
    assert_eq!(u1.devices[0].device.device_name, "gpu-0000-1b-00-0");
    assert_eq!(loaded.claims["u2"].state, ClaimState::PrepareStarted);
    // Saving writes the current format, which loads without migration.
    save(dir.path(), &loaded).unwrap();
    let (again, outcome) = load(dir.path()).unwrap();
    assert_eq!(
        outcome,
        LoadOutcome::Loaded {
            migrated_from: None
        }
    );
    assert_eq!(again, loaded);
}

#[test]
fn boot_id_is_read_under_the_proc_root() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(read_boot_id(dir.path()), "");
    std::fs::create_dir_all(dir.path().join("sys/kernel/random")).unwrap();
    std::fs::write(dir.path().join("sys/kernel/random/boot_id"), "abc-123\n").unwrap();
    assert_eq!(read_boot_id(dir.path()), "abc-123");
}

/// `encode` serialises the body once and splices the checksum in: byte for byte what
/// serialising `FileOut` (with the checksum of the body) writes, boot IDs that need JSON
/// escapes and pending releases included.
#[test]
fn encoding_splices_the_checksum_exactly_where_the_file_layout_has_it() {
    let mut with_pending = sample();
    with_pending.boot_id = "boot \"quoted\" \\ \u{e9}".into();
    with_pending.pending_releases.insert(
        "u2".into(),
        PendingRelease {
            namespace: "ml".into(),
            name: "old".into(),
            interfaces: Vec::new(),
        },
    );
    for checkpoint in [sample(), with_pending, Checkpoint::default()] {
        let expected = FileOut {
            version: CURRENT_VERSION,
            boot_id: &checkpoint.boot_id,
            checksum: checksum(
                &checkpoint.boot_id,
                (&checkpoint.claims, &checkpoint.pending_releases),
            )
            .unwrap(),
            claims: &checkpoint.claims,
            pending_releases: &checkpoint.pending_releases,
        };
        assert_eq!(
            String::from_utf8(encode(&checkpoint).unwrap()).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &checkpoint).unwrap();
        assert_eq!(load(dir.path()).unwrap().0, checkpoint);
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within `secs`: a store
/// whose I/O turn is never handed on hangs instead of failing.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("the store hung: an I/O turn was not handed on")
}

#[test]
fn concurrent_commits_all_return_durable_and_the_file_holds_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().to_path_buf();
    let store = std::sync::Arc::new(Store::new(&state_dir));
    store.refresh().unwrap();
    let calls = 8;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(calls));
    let threads: Vec<_> = (0..calls)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                let ticket = store.will_commit();
                barrier.wait();
                let version = {
                    let mut mem = store.mem();
                    let e = entry(ClaimState::PrepareCompleted);
                    mem.checkpoint.claims.insert(format!("u{i}"), e);
                    mem.changed()
                };
                ticket.commit(version)
            })
        })
        .collect();
    within(30, move || {
        for t in threads {
            t.join().unwrap().unwrap();
        }
    });
    let (on_disk, _) = load(&state_dir).unwrap();
    assert_eq!(on_disk.claims.len(), calls, "every call's entry is on disk");
    assert_eq!(on_disk, store.mem().checkpoint);
    // Nothing changed since: a commit of an older version writes nothing (every write
    // renames a new file over the old one, so the inode would change).
    use std::os::unix::fs::MetadataExt;
    let inode = || {
        std::fs::metadata(checkpoint_path(&state_dir))
            .unwrap()
            .ino()
    };
    let before = inode();
    store.commit(1).unwrap();
    assert_eq!(inode(), before);
}

#[test]
fn a_failed_flush_hands_the_turn_on_and_the_retry_makes_the_change_durable() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let store = std::sync::Arc::new(Store::new(&state_dir));
    store.refresh().unwrap();
    let version = {
        let mut mem = store.mem();
        let e = entry(ClaimState::PrepareCompleted);
        mem.checkpoint.claims.insert("u1".into(), e);
        mem.changed()
    };
    // The state directory replaced by a file: the write fails, naming the checkpoint.
    std::fs::remove_dir(&state_dir).unwrap();
    std::fs::write(&state_dir, b"not a directory").unwrap();
    let failing = store.clone();
    let err = within(30, move || failing.commit(version)).unwrap_err();
    assert_eq!(err.path, checkpoint_path(&state_dir));
    // Nothing became durable, and the turn is free: the retry writes.
    std::fs::remove_file(&state_dir).unwrap();
    std::fs::create_dir(&state_dir).unwrap();
    let retry = store.clone();
    within(30, move || retry.commit(version)).unwrap();
    let (on_disk, _) = load(&state_dir).unwrap();
    assert!(on_disk.claims.contains_key("u1"));
}

#[test]
fn an_early_commit_waits_for_the_other_announced_calls_but_not_for_its_own() {
    let gather = std::time::Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::new(dir.path()).with_gather_at_most(gather));
    store.refresh().unwrap();
    let change = |store: &Store, uid: &str| {
        let mut mem = store.mem();
        let e = entry(ClaimState::PrepareCompleted);
        mem.checkpoint.claims.insert(uid.into(), e);
        mem.changed()
    };
    // Alone: the early commit returns without waiting for the call's own announcement,
    // which would hold it the whole gather.
    let ticket = store.will_commit();
    let version = change(&store, "u1");
    let started = std::time::Instant::now();
    ticket.commit_early(version).unwrap();
    assert!(
        started.elapsed() < gather,
        "the early commit waited for its own call"
    );
    assert!(load(dir.path()).unwrap().0.claims.contains_key("u1"));
    // With another call announced, it waits for that one (its change is flushed too).
    let other = store.will_commit();
    let version = change(&store, "u2");
    let sibling = {
        let store = store.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let v = change(&store, "u3");
            other.commit(v)
        })
    };
    ticket.commit_early(version).unwrap();
    assert!(
        load(dir.path()).unwrap().0.claims.contains_key("u3"),
        "the early commit gathered the announced sibling's change"
    );
    sibling.join().unwrap().unwrap();
    ticket.commit(version).unwrap();
}
