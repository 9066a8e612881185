//! The other sidecar meshes end to end (#19): Linkerd, Kuma and Consul pods
//! simulated with their own capture rules, proxy containers, uids and
//! ports (`testbed::mesh`), the agent classifying their start-up,
//! shutdown and inbound races under their profiles.
//!
//! Why: a profile is only right if the agent, reading it, finds the real
//! mesh's race with the exact counts the app and the proxy saw. The bed is
//! written from each mesh's sources, not from the profiles, so a profile
//! that drifts from the mesh fails here.

mod api;
mod inbound;

use std::time::Duration;

use connscope::testbed::{
    client::responses,
    mesh::MeshBed,
    scenario::{App, Server},
};
use serde_json::json;

use crate::fixture::{
    Agent, Node, failures_of, of_pod, run_shutdown_race, start_sidecar, stop, time_scale,
    wait_for_event,
};

/// The agent of these tests: failures of a pod whose mesh is not known yet
/// are held for a second.
fn agent(node: &Node, extra: &[&str]) -> Agent {
    let mut args = vec!["--hold-seconds", "1"];
    args.extend_from_slice(extra);
    node.agent(&args)
}

/// The start-up race of a pod of `mesh`: its proxy's outbound listener
/// opens 1.2 s after the proxy starts, the app dials at once. The agent's
/// refused count with phase `startup_race` is what the app saw refused,
/// the summary names the mesh, and its recommendation is the mesh's own
/// (it contains `advice`). `extra`: more agent arguments.
fn startup_race(node: &Node, mesh: MeshBed, pod_name: &str, advice: &str, extra: &[&str]) {
    let agent = agent(node, extra);
    let mut pod = node.mesh_pod(pod_name, mesh.clone());
    start_sidecar(&mut pod, 1200, 0);
    let attempts = pod.run_app(&App::default()).unwrap();
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(
        attempts.last().unwrap().ok,
        "the app got through once {} listened: {attempts:?}",
        mesh.outbound_port
    );
    assert!(
        refused >= 3,
        "refused while the proxy was not ready: {attempts:?}"
    );
    let uid = pod.pod.uid.clone();
    wait_for_event(&agent, &uid, "startup_race");
    let events = stop(agent);
    let f = failures_of(&events, attempts[0].pid);
    assert_eq!(f.len(), refused, "one event per refused attempt: {f:?}");
    for e in &f {
        assert_eq!(e["phase"], "startup_race", "{e}");
        assert_eq!(e["container"], "app", "{e}");
        assert_eq!(e["dst"], pod.upstream().as_str(), "{e}");
        assert_eq!(e["mesh"], mesh.name.as_str(), "{e}");
    }
    let s = of_pod(&events, &uid, "startup_race");
    assert_eq!(s.len(), 1, "one summary per pod: {s:?}");
    let s = s[0];
    assert_eq!(s["refused"], refused, "{s}");
    assert_eq!(s["mesh"], mesh.name.as_str(), "{s}");
    assert_eq!(s["destinations"], json!([pod.upstream()]), "{s}");
    let rec = s["recommendation"].as_str().unwrap();
    assert!(rec.contains(advice), "{}'s own advice: {rec}", mesh.name);
    assert!(
        !rec.contains("holdApplicationUntilProxyStarts"),
        "not Istio's: {rec}"
    );
    let push = s["sidecar_start_to_ready_seconds"].as_f64().unwrap();
    let scale = f64::from(time_scale());
    assert!(
        (1.1 * scale..3.0 * scale).contains(&push),
        "proxy start -> {} listening ~1.2 s (x{scale}): {push}",
        mesh.outbound_port
    );
    assert_eq!(of_pod(&events, &uid, "sidecar_ready").len(), 1);
}

#[test]
fn linkerd_startup_race() {
    let Some(node) = Node::shared() else { return };
    startup_race(
        &node,
        MeshBed::linkerd(),
        "ledger-7d9f8c6b5-l1n2k",
        "config.linkerd.io/proxy-await",
        &[],
    );
}

#[test]
fn kuma_startup_race() {
    let Some(node) = Node::shared() else { return };
    startup_race(
        &node,
        MeshBed::kuma(),
        "stock-7d9f8c6b5-k1m2a",
        "kuma.io/wait-for-dataplane-ready",
        &[],
    );
}

#[test]
fn consul_startup_race() {
    let Some(node) = Node::shared() else { return };
    startup_race(
        &node,
        MeshBed::consul(),
        "billing-7d9f8c6b5-c1n2s",
        "sidecar-proxy-lifecycle-startup-grace-period-seconds",
        &[],
    );
}

/// An operator's own profile (`--mesh-profiles`): an Envoy proxy in a
/// container renamed `my-envoy`, running as uid 4242, with its own advice.
/// The bed runs it with Kuma's rules (Envoy's ports) and that uid.
#[test]
fn operator_profile_file_is_honoured() {
    let Some(node) = Node::shared() else { return };
    let file = node.write(
        "acme-profiles.toml",
        r#"
[[profile]]
name = "acme"
proxy_containers = ["my-envoy"]
proxy_uids = [4242]
proxy_comms = ["envoy"]
outbound_port = 15001
inbound_port = 15006
proxy_ports = [15001, 15006, 9901, 9902]
inbound_sources = ["127.0.0.6", "::6"]

[profile.recommendations]
startup_never_ready = "ACME: my-envoy never became ready"
startup_hold = "ACME: held, still racing"
startup_native = "ACME: native, still racing"
startup = "ACME: start my-envoy first (acme.example/hold: true)"
shutdown = "ACME: drain my-envoy last"
inbound_startup = "ACME: readiness probe on {ports}"
inbound_shutdown = "ACME: preStop on {ports}; {native}"
native_drain = "ACME: native drain"
drain = "ACME: drain"
inbound_bind = "ACME: listen on {dialed}, not {bound}"
"#,
    );
    let mesh = MeshBed {
        name: "acme".into(),
        container: "my-envoy".into(),
        uid: 4242,
        ..MeshBed::kuma()
    };
    let path = file.to_str().unwrap().to_string();
    startup_race(
        &node,
        mesh,
        "gadgets-7d9f8c6b5-a1c2m",
        "ACME: start my-envoy first",
        &["--mesh-profiles", &path],
    );
}

/// An operator's file that only changes what differs (`extends`): Kuma
/// with its proxy container renamed `my-envoy`, uid 4343 and its own
/// start-up advice, everything else Kuma's.
#[test]
fn operator_profile_extending_a_builtin_is_honoured() {
    let Some(node) = Node::shared() else { return };
    let file = node.write(
        "kuma-custom.toml",
        r#"
[[profile]]
name = "kuma-custom"
extends = "kuma"
proxy_containers = ["my-envoy"]
proxy_uids = [4343]

[profile.recommendations]
startup = "platform team: add kuma.io/wait-for-dataplane-ready to the chart of this workload"
"#,
    );
    let mesh = MeshBed {
        name: "kuma-custom".into(),
        container: "my-envoy".into(),
        uid: 4343,
        ..MeshBed::kuma()
    };
    let path = file.to_str().unwrap().to_string();
    startup_race(
        &node,
        mesh,
        "gizmos-7d9f8c6b5-k2c3x",
        "platform team: add kuma.io/wait-for-dataplane-ready",
        &["--mesh-profiles", &path],
    );
}

#[test]
fn linkerd_shutdown_race() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node, &[]);
    let mesh = MeshBed::linkerd();
    let mut pod = node.mesh_pod("ledger-7d9f8c6b5-s3d4f", mesh.clone());
    // The app keeps dialing through linkerd-proxy, which goes away under it.
    let attempts = run_shutdown_race(&mut pod);
    let uid = pod.pod.uid.clone();
    let events = stop(agent);
    let f = failures_of(&events, attempts[0].pid);
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(attempts[0].ok, "through the proxy first: {attempts:?}");
    assert!(refused >= 3, "refused after the proxy left: {attempts:?}");
    assert_eq!(f.len(), refused, "{f:?}");
    assert!(f.iter().all(|e| e["phase"] == "shutdown_race"), "{f:?}");
    let s = of_pod(&events, &uid, "shutdown_race");
    assert_eq!(s.len(), 1, "one shutdown summary: {s:?}");
    assert_eq!(s[0]["refused"], refused);
    assert_eq!(s[0]["mesh"], "linkerd");
    let rec = s[0]["recommendation"].as_str().unwrap();
    assert!(
        rec.contains("config.alpha.linkerd.io/proxy-wait-before-exit-seconds"),
        "{rec}"
    );
    assert!(of_pod(&events, &uid, "startup_race").is_empty());
}

/// The bed itself on the real kernel, per mesh and without the agent: the
/// app's dials reach the upstream through the stand-in proxy (so the rules
/// redirect to the mesh's outbound port and exempt the proxy's uid), and a
/// client's requests to the pod reach the app through the proxy's inbound
/// port, dialed from the mesh's source (so its rules let that dial out).
#[test]
fn each_mesh_bed_captures_through_its_proxy() {
    let Some(node) = Node::shared() else { return };
    for mesh in [MeshBed::linkerd(), MeshBed::kuma(), MeshBed::consul()] {
        let name = format!("bed-{}-7d9f8c6b5-q2w3e", mesh.name);
        let mut pod = node.mesh_pod(&name, mesh.clone());
        // Before the proxy listens, the app's dials are refused: capture.
        let early = pod
            .run_app(&App {
                attempts: 1,
                ..App::default()
            })
            .unwrap();
        assert!(
            !early[0].ok,
            "{}: captured, nothing listens: {early:?}",
            mesh.name
        );
        start_sidecar(&mut pod, 0, 0);
        pod.wait_sidecar(mesh.inbound_port, "listen", Duration::from_secs(10))
            .unwrap();
        let out = pod
            .run_app(&App {
                attempts: 1,
                ..App::default()
            })
            .unwrap();
        assert!(out[0].ok, "{}: through the proxy: {out:?}", mesh.name);
        let mut app = pod.start_server(&Server::default()).unwrap();
        app.wait_line("\"state\":\"listen\"", Duration::from_secs(10))
            .unwrap();
        let mut c = pod.spawn_client(3, 50, 0).unwrap();
        let rs = responses(&c.wait_exit(Duration::from_secs(30)).unwrap());
        assert_eq!(rs.len(), 3, "{}: {rs:?}", mesh.name);
        assert!(
            rs.iter().all(|r| r.status == 200),
            "{}: the app served through the proxy: {rs:?}",
            mesh.name
        );
        let s = pod.sidecar.as_mut().unwrap();
        s.wait_lines("three proxied dials", Duration::from_secs(5), |l| {
            connscope::testbed::inbound::dials(l)
                .iter()
                .any(|d| d.proxied_total == 3)
        })
        .unwrap();
    }
}
