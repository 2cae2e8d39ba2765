//! Unit tests of the URL handling in request.rs.

use super::kinds::KINDS;
use super::request::{Query, parse_target, percent_decode};

#[test]
fn urls_map_to_kinds_scopes_and_subresources() {
    let t =
        parse_target("/apis/resource.k8s.io/v1/namespaces/ns1/resourceclaims/c1/status").unwrap();
    assert_eq!(KINDS[t.kind].kind, "ResourceClaim");
    assert_eq!(
        (t.namespace.as_deref(), t.name.as_deref(), t.status),
        (Some("ns1"), Some("c1"), true)
    );
    let t = parse_target("/apis/resource.k8s.io/v1/resourceslices").unwrap();
    assert_eq!((KINDS[t.kind].kind, t.name), ("ResourceSlice", None));
    assert!(parse_target("/apis/resource.k8s.io/v1/namespaces/x/resourceslices").is_err());
    assert!(parse_target("/apis/resource.k8s.io/v1/resourceslices/a/status").is_err());
    assert!(
        parse_target("/api/v1/configmaps/x").is_err(),
        "namespaced item needs a namespace"
    );
    let t = parse_target("/api/v1/namespaces/default/configmaps").unwrap();
    assert_eq!(KINDS[t.kind].kind, "ConfigMap");
}

#[test]
fn query_strings_decode_like_form_urlencoding() {
    let q = Query::parse(
        "&watch=true&fieldSelector=spec.driver%3Dtandem.dev%2Cspec.nodeName%3Dn1&labelSelector=a+in+(x)",
    );
    assert!(q.flag("watch"));
    assert_eq!(
        q.get("fieldSelector"),
        Some("spec.driver=tandem.dev,spec.nodeName=n1")
    );
    assert_eq!(q.get("labelSelector"), Some("a in (x)"));
    assert_eq!(percent_decode("100%"), "100%");
}
