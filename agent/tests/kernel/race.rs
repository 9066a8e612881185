//! The startup race end to end, on the real kernel: simulated Istio pods
//! (network namespace with Istio's capture rules, kubelet cgroups, runtime
//! metadata, stand-in sidecar and app), the agent classifying what it sees.
//!
//! Why: this race is what connscope exists to explain. The tests share the
//! machine: each reads only its own pods (by uid) and processes (by pid).

use std::time::Duration;

use connscope::testbed::{
    dial::Outcome,
    scenario::{App, SimPod, outcomes},
};
use serde_json::{Value, json};

use crate::fixture::{
    Agent, Bg, Node, closed_target, failures_of, of_pod, run_shutdown_race, start_sidecar, stop,
    wait_for, wait_for_api_view, wait_for_event,
};

/// The agent of these tests: failures of a pod whose injection is not known
/// yet are held for a second.
fn agent(node: &Node) -> Agent {
    agent_with(node, &[])
}

/// [`agent`] with more arguments.
fn agent_with(node: &Node, extra: &[&str]) -> Agent {
    let mut args = vec!["--hold-seconds", "1"];
    args.extend_from_slice(extra);
    node.agent(&args)
}

/// An injected pod watched by the agent, whose app started once the sidecar
/// did. Fields drop in order: the pod goes before the agent, the node last.
struct Started {
    pod: SimPod,
    agent: Agent,
    attempts: Vec<Outcome>,
    _node: Node,
}

/// Runs the app of pod `name` once its sidecar has started, with the
/// outbound listener opening `sidecar_delay_ms` later.
fn app_after_sidecar(name: &str, sidecar_delay_ms: u64, extra: &[&str]) -> Option<Started> {
    let node = Node::shared()?;
    let agent = agent_with(&node, extra);
    let mut pod = node.sim_pod(name, true);
    start_sidecar(&mut pod, sidecar_delay_ms, 0);
    let attempts = pod.run_app(&App::default()).unwrap();
    Some(Started {
        pod,
        agent,
        attempts,
        _node: node,
    })
}

#[test]
fn startup_race_sidecar_late() {
    sidecar_late("checkout-7d9f8c6b5-xk2lp", &[]);
}

/// The same seen through `syscalls:sys_{enter,exit}_connect`: on a kernel
/// that allows fentry, the test above runs the fentry path.
#[test]
fn startup_race_on_syscall_tracepoints() {
    sidecar_late(
        "checkout-7d9f8c6b5-tp4kq",
        &["--connect-path", "tracepoint"],
    );
}

fn sidecar_late(name: &str, extra: &[&str]) {
    let Some(run) = app_after_sidecar(name, 1200, extra) else {
        return;
    };
    let (pod, attempts) = (&run.pod, &run.attempts);
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(
        attempts.last().unwrap().ok,
        "the app got through once 15001 listened"
    );
    assert!(
        refused >= 3,
        "the app was refused while the sidecar was not ready: {attempts:?}"
    );
    let uid = pod.pod.uid.clone();
    wait_for_event(&run.agent, &uid, "startup_race");
    let events = stop(run.agent);
    let f = failures_of(&events, attempts[0].pid);
    assert_eq!(f.len(), refused, "one event per refused attempt");
    for e in &f {
        assert_eq!(e["phase"], "startup_race", "{e}");
        assert_eq!(e["container"], "app");
        assert_eq!(e["dst"], pod.upstream().as_str());
    }
    let s = of_pod(&events, &uid, "startup_race");
    assert_eq!(s.len(), 1, "one summary per pod");
    let s = s[0];
    assert_eq!(s["refused"], refused);
    assert_eq!(s["workload"], "checkout");
    assert_eq!(s["destinations"], json!([pod.upstream()]));
    let window = s["window_seconds"].as_f64().unwrap();
    // The window runs from the first refusal's kernel time to the LISTEN on
    // 15001. Bounds from what the app saw, without slack: the first refusal
    // lies within the first attempt; the LISTEN came after the last refused
    // connect began (the refusal precedes it) and before the successful one
    // ended. (Not the refused attempt's end: the app may be descheduled
    // between its refusal and reading the clock, past the LISTEN.)
    let (first_start, first_end) = (attempts[0].start_mono_ns, attempts[0].end_mono_ns);
    let last_refused_start = attempts.iter().rfind(|o| !o.ok).unwrap().start_mono_ns;
    let ok_at = attempts.last().unwrap().end_mono_ns;
    assert!(
        window * 1e9 >= last_refused_start.saturating_sub(first_end) as f64,
        "window {window}s"
    );
    assert!(
        window * 1e9 <= (ok_at - first_start) as f64,
        "window {window}s"
    );
    let push = s["sidecar_start_to_ready_seconds"].as_f64().unwrap();
    let scale = f64::from(crate::fixture::time_scale());
    assert!(
        (1.1 * scale..3.0 * scale).contains(&push),
        "sidecar start -> ready ~1.2 s (x{scale}): {push}"
    );
    assert!(
        s["recommendation"]
            .as_str()
            .unwrap()
            .contains("holdApplicationUntilProxyStarts")
    );
    let ready = of_pod(&events, &uid, "sidecar_ready");
    assert_eq!(ready.len(), 1);
}

#[test]
fn no_race_when_sidecar_first() {
    let Some(run) = app_after_sidecar("api-5c8d9f7b6-q2w4e", 0, &[]) else {
        return;
    };
    let attempts = &run.attempts;
    assert!(attempts.len() == 1 && attempts[0].ok, "{attempts:?}");
    let uid = run.pod.pod.uid.clone();
    wait_for_event(&run.agent, &uid, "sidecar_ready");
    let events = stop(run.agent);
    assert!(failures_of(&events, attempts[0].pid).is_empty());
    assert!(
        of_pod(&events, &uid, "startup_race").is_empty(),
        "no race summary"
    );
    let r = of_pod(&events, &uid, "sidecar_ready")[0];
    let p = r["pod_start_to_ready_seconds"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&p), "{r}");
}

#[test]
fn non_injected_pod_is_no_sidecar() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let pod = node.sim_pod("batch-x7k2p", false);
    // Nobody listens on 9 at the upstream host: a real refusal, no sidecar.
    let target = pod.topo.upstream_addr(false, 9).to_string();
    let attempts = pod
        .run_app(&App {
            attempts: 2,
            target: Some(target.clone()),
            ..App::default()
        })
        .unwrap();
    assert!(attempts.iter().all(|o| !o.ok));
    let pid = attempts[0].pid;
    let f = wait_for("classified failures", Duration::from_secs(10), || {
        let ev = agent.events();
        let f: Vec<Value> = failures_of(&ev, pid).into_iter().cloned().collect();
        (f.len() == 2).then_some(f)
    });
    for e in &f {
        assert_eq!(e["phase"], "no_sidecar", "{e}");
        assert_eq!(e["dst"], target.as_str());
    }
    let events = stop(agent);
    assert!(of_pod(&events, &pod.pod.uid, "startup_race").is_empty());
}

#[test]
fn shutdown_race_sidecar_exits_first() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = node.sim_pod("worker-6f7d8c9b5-m3n4p", true);
    // The app keeps dialing through the sidecar, which goes away under it.
    let attempts = run_shutdown_race(&mut pod);
    let uid = pod.pod.uid.clone();
    let events = stop(agent);
    let f = failures_of(&events, attempts[0].pid);
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(attempts[0].ok, "through the sidecar first: {attempts:?}");
    assert!(refused >= 3, "refused after the sidecar left: {attempts:?}");
    assert_eq!(f.len(), refused);
    assert!(f.iter().all(|e| e["phase"] == "shutdown_race"), "{f:?}");
    let s = of_pod(&events, &uid, "shutdown_race");
    assert_eq!(s.len(), 1, "one shutdown summary");
    assert_eq!(s[0]["refused"], refused);
    assert!(of_pod(&events, &uid, "startup_race").is_empty());
}

#[test]
fn two_pods_at_once_different_outcomes() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut late = node.sim_pod("cart-7d9f8c6b5-x2k4p", true);
    let mut early = node.sim_pod("search-7d9f8c6b5-q8w6z", true);
    start_sidecar(&mut early, 0, 0);
    start_sidecar(&mut late, 1000, 0);
    let mut a = late.spawn_app(&App::default()).unwrap();
    let mut b = early.spawn_app(&App::default()).unwrap();
    let la = outcomes(&a.wait_exit(Duration::from_secs(20)).unwrap()).unwrap();
    let lb = outcomes(&b.wait_exit(Duration::from_secs(20)).unwrap()).unwrap();
    assert!(la.iter().any(|o| !o.ok) && la.last().unwrap().ok);
    assert!(lb.len() == 1 && lb[0].ok);
    let (ua, ub) = (late.pod.uid.clone(), early.pod.uid.clone());
    wait_for_event(&agent, &ua, "startup_race");
    let events = stop(agent);
    assert_eq!(of_pod(&events, &ua, "startup_race")[0]["workload"], "cart");
    assert!(of_pod(&events, &ub, "startup_race").is_empty());
    assert_eq!(of_pod(&events, &ub, "sidecar_ready").len(), 1);
    assert!(
        failures_of(&events, la[0].pid)
            .iter()
            .all(|e| e["phase"] == "startup_race")
    );
}

#[test]
fn agent_restarted_while_sidecar_is_up() {
    let Some(node) = Node::shared() else { return };
    let mut pod = node.sim_pod("ledger-7d9f8c6b5-ccccc", true);
    start_sidecar(&mut pod, 0, 0);
    // The agent starts after the sidecar is ready.
    let agent = agent(&node);
    // Loopback is not captured (ISTIO_OUTPUT RETURNs 127.0.0.1): a real refusal.
    let attempts = pod
        .run_app(&App {
            attempts: 1,
            target: Some(closed_target()),
            ..App::default()
        })
        .unwrap();
    let e = agent.failure(attempts[0].pid);
    assert_eq!(
        e["phase"], "sidecar_ready",
        "a ready sidecar is never taken for a missing one: {e}"
    );
    let events = stop(agent);
    assert!(of_pod(&events, &pod.pod.uid, "startup_race").is_empty());
}

/// The API's view of a simulated pod, with Istio annotations; as Istio's
/// injector writes it: a hold in the pod's ProxyConfig gives a classic
/// istio-proxy its `postStart: pilot-agent wait`.
fn api_pod(pod: &SimPod, annotations: Value, init_proxy: bool) -> Value {
    let hold = annotations["proxy.istio.io/config"]
        .as_str()
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .is_some_and(|c| c["holdApplicationUntilProxyStarts"] == true);
    let mut proxy = json!({"name": "istio-proxy"});
    if hold && !init_proxy {
        proxy["lifecycle"] = json!({"postStart": {"exec": {"command": ["pilot-agent", "wait"]}}});
    }
    let cid = |n: &str| format!("containerd://{}", pod.pod.container(n).unwrap().id);
    let status = |n: &str| {
        json!({"name": n, "ready": true, "restartCount": 0, "image": "i",
        "imageID": "", "started": true, "containerID": cid(n),
        "state": {"running": {"startedAt": "2026-11-24T10:00:00Z"}}})
    };
    let (containers, init, statuses, init_statuses) = if init_proxy {
        (
            json!([{"name": "app"}]),
            json!([{"name": "istio-proxy", "restartPolicy": "Always"}]),
            json!([status("app")]),
            json!([status("istio-proxy")]),
        )
    } else {
        (
            json!([proxy, {"name": "app"}]),
            json!([]),
            json!([status("app"), status("istio-proxy")]),
            json!([]),
        )
    };
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid,
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                "uid": "s", "controller": true}]},
        "spec": {"nodeName": "test-node", "containers": containers, "initContainers": init},
        "status": {"containerStatuses": statuses, "initContainerStatuses": init_statuses}})
}

/// A pod whose API view has these annotations, the stand-in API server
/// serving it, and an agent watching that server.
fn pod_in_api(
    node: &Node,
    name: &str,
    annotations: Value,
    init_proxy: bool,
) -> (SimPod, Bg, Agent) {
    let pod = node.sim_pod(name, true);
    let (api, url) = node.api(&json!({"pods": [api_pod(&pod, annotations, init_proxy)]}));
    let agent = node.kube_agent(&url, &["--hold-seconds", "1"]);
    (pod, api, agent)
}

#[test]
fn hold_mode_still_racing_is_reported_as_such() {
    let Some(node) = Node::shared() else { return };
    let ann = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "proxy.istio.io/config": "{ \"holdApplicationUntilProxyStarts\": true }"});
    let (mut pod, _api, agent) = pod_in_api(&node, "db-0", ann, false);
    // Hold releases the app when the proxy's health port answers (15021),
    // which here comes before the outbound listener: the race still happens.
    start_sidecar(&mut pod, 800, 0);
    let uid = pod.pod.uid.clone();
    // Make sure the API's view has arrived before the app runs.
    wait_for_api_view(&pod, &agent);
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(
        attempts.iter().any(|o| !o.ok),
        "refused before 15001: {attempts:?}"
    );
    wait_for_event(&agent, &uid, "startup_race");
    let events = stop(agent);
    let s = of_pod(&events, &uid, "startup_race")[0];
    assert_eq!(s["mitigation"]["hold"], true, "{s}");
    assert_eq!(s["workload"], "db");
    assert_eq!(s["workload_kind"], "StatefulSet");
    assert!(
        s["recommendation"]
            .as_str()
            .unwrap()
            .contains("holdApplicationUntilProxyStarts is on")
    );
}

#[test]
fn native_sidecar_ready_before_app() {
    let Some(node) = Node::shared() else { return };
    let ann = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    let (mut pod, _api, agent) = pod_in_api(&node, "db-1", ann, true);
    let uid = pod.pod.uid.clone();
    wait_for_api_view(&pod, &agent);
    // Native sidecar: kubelet starts the app once the proxy is started.
    start_sidecar(&mut pod, 0, 0);
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(attempts.len() == 1 && attempts[0].ok);
    let r = wait_for_event(&agent, &uid, "sidecar_ready");
    assert_eq!(r["mitigation"]["native_sidecar"], true, "{r}");
    let events = stop(agent);
    assert!(of_pod(&events, &uid, "startup_race").is_empty());
}
