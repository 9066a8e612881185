//! The other sidecar meshes end to end (#19): Linkerd, Kuma and Consul pods
//! simulated with their own capture rules, proxy containers, uids and
//! ports (`testbed::rules`), the agent classifying their start-up,
//! shutdown and inbound races under their profiles.
//!
//! Why: a profile is only right if the agent, reading it, finds the real
//! mesh's race with the exact counts the app and the proxy saw. The bed is
//! written from each mesh's sources, not from the profiles, so a profile
//! that drifts from the mesh fails here.

use std::time::Duration;

use connscope::testbed::{
    client::{Response, responses},
    dial::Outcome,
    inbound::refused_count,
    rules::MeshBed,
    scenario::{APP_PORT, App, Server, SimPod, outcomes},
};
use serde_json::{Value, json};

use crate::fixture::{Agent, Node, failures_of, slow, start_sidecar, time_scale, wait_for};

/// The agent of these tests: failures of a pod whose mesh is not known yet
/// are held for a second.
fn agent(node: &Node, extra: &[&str]) -> Agent {
    let mut args = vec!["--hold-seconds", "1"];
    args.extend_from_slice(extra);
    node.agent(&args)
}

/// Stops the agent (which flushes pending summaries) and returns its events.
fn stop(mut agent: Agent) -> Vec<Value> {
    assert!(agent.stop().success());
    agent.events()
}

/// The events of one type of the pod with this uid.
fn of_pod<'a>(events: &'a [Value], uid: &str, ty: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["pod_uid"] == uid && e["type"] == ty)
        .collect()
}

/// Waits (10 s) for the first event of type `ty` of the pod with this uid.
fn wait_for_event(agent: &Agent, uid: &str, ty: &str) -> Value {
    wait_for(
        &format!("{ty} of pod {uid}"),
        Duration::from_secs(10),
        || {
            of_pod(&agent.events(), uid, ty)
                .first()
                .map(|e| (*e).clone())
        },
    )
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
    start_sidecar(&mut pod, 0, 1500);
    // The app keeps dialing through linkerd-proxy, which goes away under it.
    let mut app = pod
        .spawn_app(&App {
            attempts: 30,
            interval_ms: 100,
            keep_going: true,
            ..App::default()
        })
        .unwrap();
    pod.wait_sidecar(mesh.outbound_port, "closed", Duration::from_secs(10))
        .unwrap();
    let lines = app.wait_exit(Duration::from_secs(20)).unwrap();
    let attempts: Vec<Outcome> = outcomes(&lines).unwrap();
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

/// The inbound start-up race under Linkerd: a client's requests reach the
/// pod before its app listens; linkerd-proxy (uid 2102, threads `proxy`)
/// dials the app at the pod IP from the pod IP, no bind, as linkerd2-proxy
/// does. The agent files exactly the refusals the proxy counted.
#[test]
fn linkerd_inbound_startup_race() {
    let Some(node) = Node::shared() else { return };
    let mut pod = node.mesh_pod("ledger-7d9f8c6b5-i5n6b", MeshBed::linkerd());
    let dst = pod.pod_addr(APP_PORT).to_string();
    inbound_startup_race(
        &node,
        &mut pod,
        &dst,
        "proxy",
        "linkerd-proxy forwarded requests",
    );
}

/// The same under Consul: Envoy (threads `wrk:worker_0`) dials the app at
/// 127.0.0.1, Consul's local app cluster.
#[test]
fn consul_inbound_startup_race() {
    let Some(node) = Node::shared() else { return };
    let mut pod = node.mesh_pod("billing-7d9f8c6b5-i7c8s", MeshBed::consul());
    let dst = format!("127.0.0.1:{APP_PORT}");
    inbound_startup_race(
        &node,
        &mut pod,
        &dst,
        connscope::testbed::inbound::WORKER_THREAD,
        "consul-dataplane forwarded requests",
    );
}

/// A pod's app listens 1.2 s late while a client sends requests: the
/// proxy's refused dials (to `dst`, from a thread named `comm`) are the
/// agent's `inbound_startup` failures, as many as the proxy counted, in
/// one summary naming the mesh with its advice (starting `advice`).
fn inbound_startup_race(node: &Node, pod: &mut SimPod, dst: &str, comm: &str, advice: &str) {
    let agent = agent(node, &[]);
    let mesh = pod.mesh.clone().unwrap();
    start_sidecar(pod, 0, 0);
    pod.wait_sidecar(mesh.inbound_port, "listen", Duration::from_secs(10))
        .unwrap();
    let listen_after = slow(Duration::from_millis(1200)).as_millis() as u64;
    let mut app = pod
        .start_server(&Server {
            listen_after_ms: listen_after,
            ..Server::default()
        })
        .unwrap();
    let rs = client(pod, 60 * time_scale(), 100, 3);
    app.wait_line("\"state\":\"listen\"", Duration::from_secs(10))
        .unwrap();
    let refused = proxy_refused(pod, &rs);
    assert!(refused >= 3, "refused while the app started: {rs:?}");
    let uid = pod.pod.uid.clone();
    wait_for_event(&agent, &uid, "inbound_race");
    let events = stop(agent);
    let proxy = pod.sidecar.as_ref().unwrap().child.id();
    let f = failures_of(&events, proxy);
    for e in &f {
        assert_eq!(e["phase"], "inbound_startup", "{e}");
        assert_eq!(e["dst"], dst, "where {} dials the app: {e}", mesh.name);
        assert_eq!(e["container"], mesh.container.as_str(), "{e}");
        assert_eq!(e["comm"], comm, "the proxy's dialing thread: {e}");
    }
    assert_eq!(f.len() as u64, refused, "the proxy's own count");
    let s = of_pod(&events, &uid, "inbound_race");
    assert_eq!(s.len(), 1, "one summary per pod and episode: {s:?}");
    let s = s[0];
    assert_eq!(s["when"], "startup", "{s}");
    assert_eq!(s["refused"], refused, "{s}");
    assert_eq!(s["mesh"], mesh.name.as_str(), "{s}");
    assert_eq!(s["ports"], json!([APP_PORT]), "{s}");
    let rec = s["recommendation"].as_str().unwrap();
    assert!(rec.starts_with(advice), "{rec}");
    assert!(
        of_pod(&events, &uid, "startup_race").is_empty(),
        "not outbound"
    );
}

/// Runs a client on the test host to its end: its responses.
fn client(pod: &SimPod, requests: u32, interval_ms: u64, stop_after_ok: u32) -> Vec<Response> {
    let mut c = pod
        .spawn_client(requests, interval_ms, stop_after_ok)
        .unwrap();
    responses(&c.wait_exit(Duration::from_secs(60)).unwrap())
}

/// The stand-in proxy answers each refused dial with an error response and
/// counts it first: its count, equal to the client's errors.
fn proxy_refused(pod: &mut SimPod, rs: &[Response]) -> u64 {
    let errors = rs.iter().filter(|r| r.status != 200).count() as u64;
    let s = pod.sidecar.as_mut().unwrap();
    s.wait_lines(
        "the proxy's refused count reaching the client's errors",
        Duration::from_secs(5),
        |l| refused_count(l) >= errors,
    )
    .unwrap();
    let refused = pod.sidecar_refused().unwrap();
    assert_eq!(refused, errors, "one error per refused dial: {rs:?}");
    refused
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

/// The API's view of a simulated pod of `mesh`: its proxy container next to
/// the app, these annotations and labels.
fn api_pod(pod: &SimPod, mesh: &MeshBed, annotations: Value, labels: Value) -> Value {
    let cid = |n: &str| format!("containerd://{}", pod.pod.container(n).unwrap().id);
    let status = |n: &str| {
        json!({"name": n, "ready": true, "restartCount": 0, "image": "i",
        "imageID": "", "started": true, "containerID": cid(n),
        "state": {"running": {"startedAt": "2026-11-24T10:00:00Z"}}})
    };
    let proxy = mesh.container.as_str();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid,
            "annotations": annotations, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "ledger",
                "uid": "s", "controller": true}]},
        "spec": {"nodeName": "test-node", "containers": [{"name": proxy}, {"name": "app"}]},
        "status": {"containerStatuses": [status(proxy), status("app")]}})
}

/// Dials loopback (never the race) until an event of the pod is attributed
/// through the API: the agent has the pod's API view before the race.
fn wait_for_api_view(pod: &SimPod, agent: &Agent) {
    wait_for("API attribution", Duration::from_secs(20), || {
        let local = App {
            attempts: 1,
            target: Some("127.0.0.1:9".into()),
            ..App::default()
        };
        pod.run_app(&local).ok()?;
        let ev = agent.events();
        of_pod(&ev, &pod.pod.uid, "connect_failure")
            .iter()
            .any(|e| e["workload_source"] == "api")
            .then_some(())
    });
}

/// Linkerd's start-up mitigation read from the API: `proxy-await` is on
/// by default (no annotation), off when the pod says `disabled` (here
/// under the older `config.alpha.linkerd.io/` key); the advice follows.
#[test]
fn linkerd_proxy_await_read_from_the_api() {
    let Some(node) = Node::shared() else { return };
    let mesh = MeshBed::linkerd();
    let marks = json!({"linkerd.io/control-plane-ns": "linkerd"});
    let version = json!({"linkerd.io/proxy-version": "edge-25.8.3"});
    let mut off = node.mesh_pod("ledger-0", mesh.clone());
    let mut on = node.mesh_pod("ledger-1", mesh.clone());
    let mut off_ann = version.clone();
    off_ann["config.alpha.linkerd.io/proxy-await"] = json!("disabled");
    let (_api, url) = node.api(&json!({"pods": [
        api_pod(&off, &mesh, off_ann, marks.clone()),
        api_pod(&on, &mesh, version, marks),
    ]}));
    let agent = node.kube_agent(&url, &["--hold-seconds", "1"]);
    wait_for_api_view(&off, &agent);
    wait_for_api_view(&on, &agent);
    for pod in [&mut off, &mut on] {
        start_sidecar(pod, 800, 0);
        let attempts = pod.run_app(&App::default()).unwrap();
        assert!(attempts.iter().any(|o| !o.ok), "{attempts:?}");
        wait_for_event(&agent, &pod.pod.uid, "startup_race");
    }
    let events = stop(agent);
    let s = of_pod(&events, &off.pod.uid, "startup_race")[0];
    assert_eq!(s["mesh"], "linkerd", "{s}");
    assert_eq!(s["mitigation"]["hold"], false, "{s}");
    let rec = s["recommendation"].as_str().unwrap();
    assert!(
        rec.starts_with("enable config.linkerd.io/proxy-await"),
        "{rec}"
    );
    let s = of_pod(&events, &on.pod.uid, "startup_race")[0];
    assert_eq!(
        s["mitigation"]["hold"], true,
        "await is Linkerd's default: {s}"
    );
    let rec = s["recommendation"].as_str().unwrap();
    assert!(
        rec.starts_with("config.linkerd.io/proxy-await is enabled, yet"),
        "{rec}"
    );
}
