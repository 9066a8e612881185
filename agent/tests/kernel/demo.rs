//! The README's first command: `connscope demo` shows a real race, verdict
//! included, and leaves nothing behind.
//!
//! Why: it is what a new user runs first. Shares the machine: the demo's
//! network namespaces use tag 200, which the fixture never hands out.

use std::process::Command;

use crate::fixture::{BIN, Node};

#[test]
fn demo_catches_the_race_and_cleans_up() {
    let Some(_node) = Node::shared() else { return };
    let out = Command::new(BIN)
        .args(["demo", "--sidecar-delay-ms", "800"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "VERDICT  sidecar startup race in shop/checkout-7d9f8c6b5-x2k4p (Deployment checkout)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"type\": \"startup_race\""),
        "summary event printed: {stdout}"
    );
    // It ends with what on-call would run: explain's view of the pod.
    let view = stdout
        .split("$ connscope explain --namespace shop --pod checkout-7d9f8c6b5-x2k4p\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no explain view: {stdout}"));
    for want in [
        "POD        shop/checkout-7d9f8c6b5-x2k4p (Deployment checkout",
        "istio-proxy listens on 15001 (outbound capture: the sidecar is ready)",
        "refused (startup_race: before the sidecar listened)",
        "VERDICT    startup race:",
    ] {
        assert!(
            view.contains(want),
            "missing {want:?} in the explain view:\n{view}"
        );
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains("cs200-"),
        "demo namespaces removed"
    );
}
