//! The README's first command: `connscope demo` shows a real race, verdict
//! included, and leaves nothing behind.
//!
//! Why: it is what a new user runs first. Shares the machine: the demo's
//! network namespaces use tag 200, which the fixture never hands out.

use std::process::Command;

use crate::fixture::{BIN, Node};

/// `connscope demo ARGS`' output; it must succeed.
fn demo(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("demo").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_catches_the_race_and_cleans_up() {
    let Some(_node) = Node::shared() else { return };
    let stdout = demo(&["--sidecar-delay-ms", "800"]);
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

/// `connscope demo --inbound`: the mirror image, the same kind of verdict,
/// with the agent's count equal to the stand-in proxy's own. Its namespaces
/// use tag 201, which the fixture never hands out either.
#[test]
fn demo_inbound_catches_the_inbound_race_and_cleans_up() {
    let Some(_node) = Node::shared() else { return };
    let stdout = demo(&["--inbound", "--app-delay-ms", "800"]);
    assert!(
        stdout.contains(
            "VERDICT  inbound startup race in shop/orders-7d9f8c6b5-k4m2p (Deployment orders)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("\"type\": \"inbound_race\""), "{stdout}");
    // The agent's count is the proxy's: "counted N refused" and "refused N times".
    let number_after = |prefix: &str| -> u64 {
        let at = stdout
            .find(prefix)
            .unwrap_or_else(|| panic!("no {prefix:?}: {stdout}"));
        stdout[at + prefix.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {prefix:?}: {stdout}"))
    };
    let proxy = number_after("istio-proxy  counted ");
    assert!(proxy >= 3, "{stdout}");
    assert_eq!(number_after("container app refused "), proxy, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "classified: {proxy} of {proxy} as inbound_startup"
        )),
        "{stdout}"
    );
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains("cs201-"),
        "demo namespaces removed"
    );
}
