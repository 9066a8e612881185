//! Istio ambient enrollment end to end: a pod shaped like kubelet's with
//! istio-cni's in-pod rules in its network namespace, and a stand-in ztunnel
//! outside the pod's cgroup and netns that listens inside the pod's netns
//! the way ztunnel does (socket made there with setns, bind and listen from
//! its own netns). The stand-in API marks the pod ambient.
//!
//! Why: ambient pods have no sidecar, so the only sign that one is in the
//! mesh is ztunnel's listeners in its netns; losing them is silent
//! (istio/istio#61182). Shares the machine: its own namespaces, pods, ports.

use std::{
    os::unix::fs::MetadataExt as _,
    process::Command,
    time::{Duration, Instant},
};

use connscope::testbed::{
    net::Netns,
    scenario::{App, Server, SimPod},
    time_scale,
};
use serde_json::{Value, json};

use crate::fixture::{Agent, BIN, Bg, Node, metric, net_tag, terminate, wait_for};

const GRACE: &str = "1";
const GAUGE: &str = "connscope_ambient_unenrolled_pods";

/// The stand-in ztunnel serving the netns at `path`; `extra` are its flags.
fn ztunnel(path: &str, extra: &[&str]) -> Bg {
    let mut c = Command::new(BIN);
    c.args(["testbed", "ztunnel", "--netns", path]).args(extra);
    let mut z = Bg::spawn(c);
    z.wait_line("\"ready\":true", Duration::from_secs(10));
    z
}

/// The kernel's evidence: a socket made in netns A and listened on from
/// netns B is reported in A (the socket's own netns), by ztunnel's pid.
#[test]
fn listener_is_in_the_socket_s_netns_not_the_caller_s() {
    let Some(node) = Node::shared() else { return };
    let agent = node.agent(&[]);
    let pod = Netns::create(&format!("cs{}-amb", net_tag())).unwrap();
    let pod_ns = pod.inode().unwrap();
    let own_ns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(pod_ns, own_ns);
    let mut z = ztunnel(&format!("/run/netns/{}", pod.name), &["--ports", "15008"]);
    let pid = z.child.id();
    let listens = |state: &str| {
        agent
            .events()
            .into_iter()
            .filter(|e| {
                e["type"] == "listener"
                    && e["state"] == state
                    && e["port"] == 15008
                    && (state == "closed" || e["pid"] == pid)
                    && (e["netns"] == pod_ns || e["netns"] == own_ns)
            })
            .collect::<Vec<_>>()
    };
    let up = wait_for("ztunnel's two LISTENs", Duration::from_secs(10), || {
        let l = listens("listen");
        (l.len() >= 2).then_some(l)
    });
    for e in &up {
        assert_eq!(e["netns"], pod_ns, "the socket's netns, not ztunnel's: {e}");
        assert_eq!(e["comm"], "ztunnel");
    }
    terminate(&mut z.child, Duration::from_secs(5));
    let closed = wait_for("their closes", Duration::from_secs(10), || {
        let l = listens("closed");
        (l.len() >= 2).then_some(l)
    });
    for e in &closed {
        assert_eq!(e["netns"], pod_ns, "closed in the socket's netns: {e}");
    }
}

/// A pod with istio-cni's in-pod rules and, in the API, the given
/// annotations and labels.
struct AmbientPod {
    pod: SimPod,
    netns_path: String,
    api: Bg,
    url: String,
}

fn ambient_pod(node: &Node, name: &str, annotations: Value, labels: Value) -> AmbientPod {
    ambient_pod_in(node, name, annotations, labels, json!({}))
}

/// [`ambient_pod`] in a namespace with these labels (the API's view).
fn ambient_pod_in(
    node: &Node,
    name: &str,
    annotations: Value,
    labels: Value,
    namespace_labels: Value,
) -> AmbientPod {
    let pod = node.sim_pod(name, false);
    pod.topo.install_ambient_rules().unwrap();
    let state = json!({
        "pods": [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid,
                "resourceVersion": "7", "annotations": annotations, "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": format!("{name}-rs"), "uid": "rs-uid", "controller": true}]},
            "spec": {"nodeName": "test-node", "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "podIP": pod.topo.pod_v4.to_string(),
                "podIPs": [{"ip": pod.topo.pod_v4.to_string()}]}
        }],
        "owners": {format!("ReplicaSet/shop/{name}-rs"): {"apiVersion": "apps/v1",
            "kind": "Deployment", "name": name, "uid": "d-uid", "controller": true}},
        "namespaces": {"shop": {"labels": namespace_labels}}
    });
    let (api, url) = node.api(&state);
    AmbientPod {
        netns_path: format!("/run/netns/{}", pod.topo.pod.name),
        pod,
        api,
        url,
    }
}

fn redirected() -> Value {
    json!({"ambient.istio.io/redirection": "enabled"})
}

fn agent_for(node: &Node, p: &AmbientPod) -> Agent {
    node.kube_agent(&p.url, &["--ambient-grace-seconds", GRACE, "--k8s-events"])
}

/// The Kubernetes Events with this reason the agent posted.
fn k8s_events(node: &Node, reason: &str) -> Vec<Value> {
    node.api_requests()
        .into_iter()
        .filter(|r| r["method"] == "POST" && r["body"]["reason"] == reason)
        .map(|r| r["body"].clone())
        .collect()
}

fn wait_k8s_event(node: &Node, reason: &str, pod: &str) -> Value {
    let ev = wait_for(
        &format!("Kubernetes Event {reason}"),
        Duration::from_secs(15),
        || k8s_events(node, reason).into_iter().next(),
    );
    assert_eq!(ev["regarding"]["name"], pod, "{ev}");
    assert_eq!(ev["type"], "Warning");
    ev
}

/// The pod's `ambient_enrollment` lines.
fn enrollment(agent: &Agent, pod: &str) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| e["type"] == "ambient_enrollment" && e["pod"] == pod)
        .collect()
}

fn wait_state(agent: &Agent, pod: &str, state: &str) -> Value {
    wait_for(
        &format!("ambient_enrollment {state} of {pod}"),
        Duration::from_secs(15),
        || {
            enrollment(agent, pod)
                .into_iter()
                .find(|e| e["state"] == state)
        },
    )
}

fn gauge(agent: &Agent, workload: &str) -> f64 {
    metric(
        agent.http_port,
        &format!("{GAUGE}{{mesh=\"istio-ambient\",namespace=\"shop\",workload=\"{workload}\"}}"),
    )
}

/// One connect of the app to the upstream host (captured by the in-pod rules).
fn app_dial(p: &AmbientPod) -> connscope::testbed::dial::Outcome {
    let app = App {
        attempts: 1,
        interval_ms: 10,
        nonblocking: false,
        ..App::default()
    };
    let mut o = p.pod.run_app(&app).unwrap();
    assert_eq!(o.len(), 1);
    o.remove(0)
}

/// For `GRACE` and twice more, no `lost` or `never` line and no gauge.
fn assert_stays_enrolled(agent: &Agent, pod: &str, workload: &str) {
    let until = Instant::now() + Duration::from_secs(3) * time_scale();
    while Instant::now() < until {
        let bad: Vec<Value> = enrollment(agent, pod)
            .into_iter()
            .filter(|e| e["state"] != "enrolled")
            .collect();
        assert!(bad.is_empty(), "no false report: {bad:?}");
        assert_eq!(gauge(agent, workload), 0.0);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn enrolled_pod_is_reported_enrolled_and_never_unenrolled() {
    let Some(node) = Node::shared() else { return };
    let p = ambient_pod(&node, "amb-enrolled", redirected(), json!({}));
    let agent = agent_for(&node, &p);
    let _z = ztunnel(&p.netns_path, &[]);
    let o = app_dial(&p);
    assert!(o.ok, "ztunnel's 15001 takes the redirected connect: {o:?}");
    assert_eq!(o.banner.as_deref(), Some("ztunnel 15001"), "{o:?}");
    let e = wait_state(&agent, "amb-enrolled", "enrolled");
    assert_eq!(e["mesh"], "istio-ambient");
    assert_eq!(e["workload"], "amb-enrolled");
    assert_eq!(e["netns"], p.pod.topo.pod.inode().unwrap());
    assert_stays_enrolled(&agent, "amb-enrolled", "amb-enrolled");
    assert!(k8s_events(&node, "AmbientNeverEnrolled").is_empty());
    drop(p.api);
}

#[test]
fn enrollment_lost_is_reported_with_the_close_time() {
    let Some(node) = Node::shared() else { return };
    let p = ambient_pod(
        &node,
        "amb-lost",
        json!({}),
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let agent = agent_for(&node, &p);
    let mut z = ztunnel(&p.netns_path, &[]);
    assert!(app_dial(&p).ok);
    wait_state(&agent, "amb-lost", "enrolled");
    // ztunnel restarts and forgets the pod: its listeners close, the
    // pod keeps its marks.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(z.child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    z.wait_line("\"all_closed\":true", Duration::from_secs(10));
    let zpid = z.child.id();
    let closes: Vec<u64> = wait_for("the HBONE closes", Duration::from_secs(10), || {
        let c: Vec<u64> = agent
            .events()
            .iter()
            .filter(|e| {
                e["type"] == "listener"
                    && e["state"] == "closed"
                    && e["port"] == 15008
                    && e["pid"] == zpid
            })
            .filter_map(|e| e["mono_ns"].as_u64())
            .collect();
        (c.len() == 2).then_some(c)
    });
    let lost = wait_state(&agent, "amb-lost", "lost");
    assert_eq!(
        lost["lost_mono_ns"].as_u64(),
        closes.iter().max().copied(),
        "lost when the last HBONE listener closed: {lost}"
    );
    assert_eq!(lost["mesh"], "istio-ambient");
    assert!(lost["unenrolled_seconds"].as_f64().unwrap() >= 1.0);
    assert!(lost["recommendation"].as_str().unwrap().contains("ztunnel"));
    wait_for("the gauge at 1", Duration::from_secs(10), || {
        (gauge(&agent, "amb-lost") == 1.0).then_some(())
    });
    let counted = metric(
        agent.http_port,
        "connscope_ambient_enrollments_total{mesh=\"istio-ambient\",namespace=\"shop\",state=\"lost\",workload=\"amb-lost\"}",
    );
    assert_eq!(counted, 1.0);
    let ev = wait_k8s_event(&node, "AmbientEnrollmentLost", "amb-lost");
    assert!(ev["note"].as_str().unwrap().contains("closed"), "{ev}");
    // The app is now refused by the missing 15001: the shutdown race.
    let o = app_dial(&p);
    assert_eq!(o.error, "ECONNREFUSED", "{o:?}");
    let f = agent.failure(o.pid);
    assert_eq!(f["phase"], "shutdown_race", "{f}");
    assert_eq!(f["mesh"], "istio-ambient");
    // A peer's ztunnel dialing the pod's HBONE port is refused: the
    // refusal is the destination pod's.
    let target = format!("{}:15008", p.pod.topo.pod_v4);
    let peer = crate::fixture::run_dialer(
        p.pod.topo.upstream.command(BIN),
        &[
            "--target",
            &target,
            "--comm",
            "ztunnel",
            "--timeout-ms",
            "3000",
        ],
    );
    assert_eq!(peer.error, "ECONNREFUSED", "{peer:?}");
    let f = agent.failure(peer.pid);
    assert_eq!(f["pod"], "amb-lost", "attributed to the destination: {f}");
    assert_eq!(f["phase"], "proxy");
    assert_eq!(f["mesh"], "istio-ambient");
    drop(p.api);
}

#[test]
fn pod_never_enrolled_is_reported() {
    let Some(node) = Node::shared() else { return };
    let p = ambient_pod(&node, "amb-never", redirected(), json!({}));
    let agent = agent_for(&node, &p);
    let o = app_dial(&p);
    assert_eq!(o.error, "ECONNREFUSED", "{o:?}");
    let f = agent.failure(o.pid);
    assert_eq!(f["phase"], "startup_race", "never no_sidecar: {f}");
    assert_eq!(f["mesh"], "istio-ambient");
    let never = wait_state(&agent, "amb-never", "never");
    assert!(never.get("lost_mono_ns").is_none(), "{never}");
    assert!(never["since_mono_ns"].as_u64().is_some(), "{never}");
    wait_for("the gauge at 1", Duration::from_secs(10), || {
        (gauge(&agent, "amb-never") == 1.0).then_some(())
    });
    wait_k8s_event(&node, "AmbientNeverEnrolled", "amb-never");
    // ztunnel comes: enrolled, and the gauge goes.
    let _z = ztunnel(&p.netns_path, &[]);
    wait_state(&agent, "amb-never", "enrolled");
    wait_for("the gauge gone", Duration::from_secs(10), || {
        (gauge(&agent, "amb-never") == 0.0).then_some(())
    });
    drop(p.api);
}

/// The intent on the namespace only (`istio.io/dataplane-mode=ambient`),
/// before istio-cni annotates the pod: never enrolled is reported; a pod
/// that opts out with its own label `none` is not.
#[test]
fn namespace_intent_alone_makes_a_pod_ambient() {
    let Some(node) = Node::shared() else { return };
    let ns = json!({"istio.io/dataplane-mode": "ambient"});
    let p = ambient_pod_in(&node, "amb-ns", json!({}), json!({}), ns.clone());
    let agent = agent_for(&node, &p);
    let o = app_dial(&p);
    let f = agent.failure(o.pid);
    assert_eq!(f["phase"], "startup_race", "never no_sidecar: {f}");
    assert_eq!(f["mesh"], "istio-ambient");
    wait_state(&agent, "amb-ns", "never");
    wait_k8s_event(&node, "AmbientNeverEnrolled", "amb-ns");
    drop(agent);
    drop(p.api);
    let out = ambient_pod_in(
        &node,
        "amb-ns-out",
        json!({}),
        json!({"istio.io/dataplane-mode": "none"}),
        ns,
    );
    let agent = agent_for(&node, &out);
    let o = app_dial(&out);
    assert_eq!(agent.failure(o.pid)["phase"], "no_sidecar");
    drop(out.api);
}

#[test]
fn agent_restart_restores_enrollment_without_a_false_report() {
    let Some(node) = Node::shared() else { return };
    let p = ambient_pod(&node, "amb-restart", redirected(), json!({}));
    let _z = ztunnel(&p.netns_path, &[]);
    // A process of the pod runs when the agent starts; nothing of the pod
    // happens afterwards.
    let mut server = p
        .pod
        .start_server(&Server {
            listen_after_ms: 0,
            loopback_only: false,
            linger_ms: 0,
        })
        .unwrap();
    server.wait_line("listen", Duration::from_secs(10)).unwrap();
    let agent = agent_for(&node, &p);
    let e = wait_state(&agent, "amb-restart", "enrolled");
    assert_eq!(e["netns"], p.pod.topo.pod.inode().unwrap());
    assert_stays_enrolled(&agent, "amb-restart", "amb-restart");
    for reason in ["AmbientEnrollmentLost", "AmbientNeverEnrolled"] {
        assert!(k8s_events(&node, reason).is_empty(), "no {reason}");
    }
    server.terminate(Duration::from_secs(3));
    drop(p.api);
}
