//! Tests of the kernel matrix's guest plumbing.

use super::*;

#[test]
fn quoting_survives_the_shell() {
    assert_eq!(quote("abc/d-e.f"), "abc/d-e.f");
    assert_eq!(quote("a b"), "'a b'");
    assert_eq!(quote("it's"), r"'it'\''s'");
    assert_eq!(quote(""), "''");
}

#[test]
fn common_headers_are_named_from_the_release() {
    assert_eq!(common_of("6.1.0-57-amd64"), "6.1.0-57-common");
    assert_eq!(common_of("6.12.117+deb12-amd64"), "6.12.117+deb12-common");
}

#[test]
fn every_series_is_selectable() {
    assert_eq!(select("all").unwrap().len(), SERIES.len());
    for s in SERIES {
        assert_eq!(select(s.name).unwrap()[0].name, s.name);
    }
    assert!(select("4.19").is_err());
}
