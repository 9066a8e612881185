//! The inbound start-up race per mesh: each proxy dials the app from its
//! own source (Linkerd the pod IP, Consul 127.0.0.1), on its own thread.

use std::time::Duration;

use connscope::testbed::{
    client::{Response, responses},
    inbound::refused_count,
    mesh::MeshBed,
    scenario::{APP_PORT, Server, SimPod},
};
use serde_json::json;

use super::{agent, of_pod, stop, wait_for_event};
use crate::fixture::{Node, failures_of, slow, start_sidecar, time_scale};

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
