//! Unit tests of the name, semver and quantity grammars.

use super::grammar::{
    is_c_identifier, is_dns_label, is_dns_subdomain, is_label_key, is_quantity, is_semver,
};

#[test]
fn name_grammars() {
    assert!(is_dns_label("gpu-0000-18-00-0"));
    assert!(!is_dns_label("gpu_0"));
    assert!(!is_dns_label("-a"));
    assert!(!is_dns_label(&"a".repeat(64)));
    assert!(is_dns_subdomain("tandem.dev"));
    assert!(!is_dns_subdomain("tandem..dev"));
    assert!(
        is_c_identifier("pciBusID")
            && is_c_identifier("_x1")
            && !is_c_identifier("1x")
            && !is_c_identifier("a-b")
    );
    assert!(is_label_key("tandem.dev/link-down") && !is_label_key("tandem.dev/-x"));
}

#[test]
fn semver_and_quantity_grammars() {
    for good in ["1.2.3", "0.0.0-alpha.1", "1.0.0+build.5", "10.20.30-rc.1+x"] {
        assert!(is_semver(good), "{good}");
    }
    for bad in ["1.2", "01.2.3", "1.2.3-", "1.2.3-01", "v1.2.3"] {
        assert!(!is_semver(bad), "{bad}");
    }
    for good in ["80Gi", "1", "0.5", "100m", "1e3", "-2Ki"] {
        assert!(is_quantity(good), "{good}");
    }
    for bad in ["", "Gi", "1.2.3", "5XB", "1e"] {
        assert!(!is_quantity(bad), "{bad}");
    }
}
