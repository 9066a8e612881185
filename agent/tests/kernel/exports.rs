//! Exports end to end: a real Prometheus scrapes the agent during a real race
//! scenario and the values are read back through Prometheus' HTTP API;
//! `/events` filters and follow mode; Kubernetes Events written to the
//! stand-in API server.
//!
//! Why: these are how users read connscope. Shares the machine: every query
//! is scoped to its own workload, and other tests' pods have no metadata in
//! its runtime roots or its API server, so its agent cannot name them.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use connscope::testbed::scenario::App;
use serde_json::{Value, json};

use crate::fixture::{Node, Prometheus, http_get, start_sidecar, wait_for};

/// Reads a streaming HTTP response until `needle` appears (bounded).
fn follow_until(
    port: u16,
    path: &str,
    needle: &str,
    timeout: Duration,
    started: impl FnOnce(),
) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut started = Some(started);
    while Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        if let Some(f) = started.take() {
            f();
        }
        if String::from_utf8_lossy(&buf).contains(needle) {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn prometheus_events_endpoint_and_kubernetes_events() {
    let Some(node) = Node::shared() else { return };
    let mut pod = node.sim_pod("orders-7d9f8c6b5-k2m4p", true);
    let (_api, url) = node.api(&json!({"pods": [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.pod.name, "namespace": "shop", "uid": pod.pod.uid,
            "annotations": {"sidecar.istio.io/status": "{}"},
            "labels": {"pod-template-hash": "7d9f8c6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-7d9f8c6b5",
                "uid": "r", "controller": true}]},
        "spec": {"nodeName": "test-node", "containers": [{"name": "app", "image": "registry.example/shop/orders:3"},
            {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.3"}]}}],
        "owners": {"ReplicaSet/shop/orders-7d9f8c6b5": {"apiVersion": "apps/v1", "kind": "Deployment",
            "name": "orders", "uid": "d", "controller": true}}}));
    let mut agent = node.kube_agent(&url, &["--k8s-events", "--hold-seconds", "1"]);
    let prom = Prometheus::start(&node.dir, &[agent.http_port], &[], None);
    let port = agent.http_port;
    assert_eq!(http_get(port, "/healthz").0, 200);
    let r = http_get(port, "/readyz");
    assert_eq!(r.0, 200, "{}", r.1);

    // The race, watched live through /events?follow=1.
    start_sidecar(&mut pod, 1000, 0);
    let mut attempts = Vec::new();
    let streamed = follow_until(
        port,
        &format!("/events?follow=1&type=startup_race&pod={}", pod.pod.name),
        "\"type\":\"startup_race\"",
        Duration::from_secs(30),
        || attempts = pod.run_app(&App::default()).unwrap(),
    );
    assert!(
        streamed.contains("\"workload\":\"orders\""),
        "followed summary: {streamed}"
    );
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(refused >= 3, "{attempts:?}");

    // /events filters.
    let (_, body) = http_get(
        port,
        &format!(
            "/events?type=connect_failure&phase=startup_race&pod={}",
            pod.pod.name
        ),
    );
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), refused, "{body}");
    assert!(
        lines
            .iter()
            .all(|e| e["phase"] == "startup_race" && e["pod"] == pod.pod.name.as_str())
    );
    let (_, none) = http_get(port, "/events?namespace=nonexistent");
    assert!(none.trim().is_empty());
    let (_, ready) = http_get(port, "/events?type=sidecar_ready&namespace=shop");
    assert_eq!(ready.lines().count(), 1, "{ready}");

    // Prometheus has the values.
    let w = "namespace=\"shop\",workload=\"orders\"";
    wait_for("race pods in Prometheus", Duration::from_secs(30), || {
        (prom.value(&format!("connscope_startup_race_pods_total{{{w}}}")) == Some(1.0))
            .then_some(())
    });
    let failures = prom.value(&format!("sum(connscope_connect_failures_total{{{w},phase=\"startup_race\",errno=\"ECONNREFUSED\",container=\"app\"}})"));
    assert_eq!(failures, Some(refused as f64));
    assert_eq!(
        prom.value(&format!(
            "connscope_pods_started_total{{{w},injected=\"true\"}}"
        )),
        Some(1.0)
    );
    assert_eq!(
        prom.value(&format!("connscope_sidecar_ready_seconds_count{{{w}}}")),
        Some(1.0)
    );
    let window_sum = prom
        .value(&format!("connscope_startup_race_window_seconds_sum{{{w}}}"))
        .unwrap();
    assert!((0.5..5.0).contains(&window_sum), "race window {window_sum}");
    assert_eq!(prom.value("min(connscope_probe_attached)"), Some(1.0));
    assert_eq!(prom.value("connscope_events_lost_total"), Some(0.0));
    assert!(prom.value("sum(connscope_events_total)").unwrap() > 0.0);
    assert_eq!(prom.value("count(connscope_build_info)"), Some(1.0));
    let metrics = http_get(port, "/metrics").1;
    assert!(
        !metrics.contains(&pod.pod.name),
        "no pod names in labels by default"
    );
    assert!(
        !metrics.contains(&pod.upstream()),
        "no destinations in labels"
    );

    // One Kubernetes Event on the Pod, not one per refused connect.
    let posted = wait_for("Kubernetes Event posted", Duration::from_secs(15), || {
        let posts: Vec<Value> = node
            .api_requests()
            .into_iter()
            .filter(|r| {
                r["method"] == "POST" && r["path"].as_str().unwrap_or("").contains("/events")
            })
            .collect();
        (!posts.is_empty()).then_some(posts)
    });
    assert_eq!(posted.len(), 1, "{posted:?}");
    let ev = &posted[0]["body"];
    assert_eq!(
        posted[0]["path"],
        "/apis/events.k8s.io/v1/namespaces/shop/events"
    );
    assert_eq!(ev["reason"], "SidecarStartupRace");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["kind"], "Pod");
    assert_eq!(ev["regarding"]["name"], pod.pod.name.as_str());
    let note = ev["note"].as_str().unwrap();
    assert!(
        note.contains(&format!("{refused} outbound connect()s refused")),
        "{note}"
    );
    // What changed starts with what runs.
    assert!(
        note.contains("Pod revision 7d9f8c6b5, proxy 1.22.3."),
        "{note}"
    );
    assert!(agent.stop().success());
}
