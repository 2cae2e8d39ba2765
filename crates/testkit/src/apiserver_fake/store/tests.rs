//! Unit tests of the store's JSON helpers.

use super::json::{decode_continue, hex_encode, merge_patch, now_rfc3339};
use serde_json::json;

#[test]
fn merge_patch_follows_rfc7386() {
    let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
    merge_patch(&mut target, &json!({"a": "z", "c": {"f": null}}));
    assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
    merge_patch(&mut target, &json!({"a": [1]}));
    assert_eq!(target["a"], json!([1]));
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let now = now_rfc3339();
    assert_eq!(now.len(), 20, "{now}");
    assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T');
    assert!(now.as_str() > "2024-01-01T00:00:00Z");
}

#[test]
fn continue_tokens_round_trip() {
    let token = hex_encode("42\0ns\0name");
    assert_eq!(
        decode_continue(&token).unwrap(),
        (42, "ns".into(), "name".into())
    );
    assert!(decode_continue("zz").is_err());
}
