//! The inbound race end to end, on the real kernel (#18): a client on the
//! test host sends requests to `podIP:8080`, Istio's rules redirect them to
//! the stand-in sidecar's 15006, which dials the app from 127.0.0.6 as
//! Envoy does and answers 503 when the app refuses. The agent must say
//! which refusals were the start-up or shutdown window, a bind
//! misconfiguration, or pilot-agent's probes (the names are
//! /work/shared/inbound-contract.md's).
//!
//! Why exact counts: the refusals the agent files must be the ones the
//! proxy itself counted, no more (probes, other dials) and no fewer.

use std::time::Duration;

use connscope::testbed::{
    client::{Response, responses},
    prober::probes,
    scenario::{APP_PORT, Proc, Server, SimPod},
};
use serde_json::{Value, json};

use crate::fixture::{
    Agent, Node, failures_of, http_get, of_pod, slow, start_sidecar, stop, time_scale, wait_for,
};

/// The agent of these tests: failures of a pod whose injection is not known
/// yet are held for a second.
fn agent(node: &Node) -> Agent {
    node.agent(&["--hold-seconds", "1"])
}

/// An injected pod whose sidecar listens on 15001 and 15006 already.
fn injected_pod(node: &Node, name: &str) -> SimPod {
    let mut pod = node.sim_pod(name, true);
    start_sidecar(&mut pod, 0, 0);
    pod.wait_sidecar(15006, "listen", Duration::from_secs(10))
        .unwrap();
    pod
}

/// The pid of the pod's stand-in Envoy (whose dials of the app are the
/// ones that race).
fn proxy_pid(pod: &SimPod) -> u32 {
    pod.sidecar.as_ref().unwrap().child.id()
}

/// Starts the server app and, unless it listens late, waits until it does.
fn server(pod: &SimPod, s: Server) -> Proc {
    let mut p = pod.start_server(&s).unwrap();
    if s.listen_after_ms == 0 {
        p.wait_line("\"state\":\"listen\"", Duration::from_secs(10))
            .unwrap();
    }
    p
}

/// Runs a client to its end: its responses.
fn client(pod: &SimPod, requests: u32, interval_ms: u64, stop_after_ok: u32) -> Vec<Response> {
    let mut c = pod
        .spawn_client(requests, interval_ms, stop_after_ok)
        .unwrap();
    responses(&c.wait_exit(Duration::from_secs(60)).unwrap())
}

fn count(rs: &[Response], status: u16) -> usize {
    rs.iter().filter(|r| r.status == status).count()
}

/// Every 503 the client got is Envoy's answer to a refused dial, and the
/// proxy counted exactly as many refusals: that count.
fn proxy_refused(pod: &mut SimPod, rs: &[Response]) -> u64 {
    let n503 = count(rs, 503) as u64;
    for r in rs.iter().filter(|r| r.status == 503) {
        assert!(
            r.body.contains("delayed connect error: 111"),
            "Envoy's UF body: {r:?}"
        );
    }
    assert_eq!(
        count(rs, 200) + n503 as usize,
        rs.len(),
        "only 200s and 503s: {rs:?}"
    );
    // The proxy prints its count before it answers; the line may still be
    // in the pipe.
    let s = pod.sidecar.as_mut().unwrap();
    let counted = s.wait_lines(
        "the proxy's refused count reaching the client's 503s",
        Duration::from_secs(5),
        |l| connscope::testbed::inbound::refused_count(l) >= n503,
    );
    counted.unwrap();
    let refused = pod.sidecar_refused().unwrap();
    assert_eq!(refused, n503, "one 503 per refused dial");
    refused
}

/// The value of a metric series with these labels (0 when absent).
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = http_get(agent.http_port, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (10 s) for the first `inbound_race` summary of the pod with this uid.
fn wait_for_race(agent: &Agent, uid: &str) -> Value {
    wait_for(
        &format!("inbound_race of pod {uid}"),
        Duration::from_secs(10),
        || {
            of_pod(&agent.events(), uid, "inbound_race")
                .first()
                .map(|e| (*e).clone())
        },
    )
}

/// The proxy's failures among `events`, each with this phase and to the
/// pod's app port.
fn proxy_failures<'a>(events: &'a [Value], pod: &SimPod, phase: &str) -> Vec<&'a Value> {
    let f = failures_of(events, proxy_pid(pod));
    let dst = pod.pod_addr(APP_PORT).to_string();
    for e in &f {
        assert_eq!(e["phase"], phase, "{e}");
        assert_eq!(e["dst"], dst.as_str(), "{e}");
        assert_eq!(e["container"], "istio-proxy", "{e}");
    }
    f
}

fn ns(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {v}"))
}

#[test]
fn startup_race_app_listens_late() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = injected_pod(&node, "orders-7d9f8c6b5-nb2dk");
    let listen_after = slow(Duration::from_millis(1200)).as_millis() as u64;
    let mut app = server(
        &pod,
        Server {
            listen_after_ms: listen_after,
            ..Server::default()
        },
    );
    // Traffic arrives before the app listens (no readiness probe).
    let rs = client(&pod, 60 * time_scale(), 100, 3);
    app.wait_line("\"state\":\"listen\"", Duration::from_secs(10))
        .unwrap();
    let refused = proxy_refused(&mut pod, &rs);
    assert!(refused >= 3, "refused while the app started: {rs:?}");
    assert!(
        rs.iter().rev().take(3).all(|r| r.status == 200),
        "then served: {rs:?}"
    );
    let uid = pod.pod.uid.clone();
    wait_for_race(&agent, &uid);
    let labels = [
        ("namespace", "shop"),
        ("workload", "orders"),
        ("when", "startup"),
    ];
    let pods = wait_for("the startup race metric", Duration::from_secs(5), || {
        let v = metric(&agent, "connscope_inbound_race_pods_total", &labels);
        (v > 0.0).then_some(v)
    });
    assert_eq!(pods, 1.0, "one pod, one episode");
    // `connscope explain` draws it: the window, the verdict, the fix.
    let (text, p) = crate::explain::explain_pod(agent.http_port, &pod.pod.name);
    let verdict = p["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["phase"] == "inbound_startup")
        .unwrap_or_else(|| panic!("no inbound verdict: {p}"));
    let said =
        format!("inbound startup race: {refused} of istio-proxy's dials of the app refused over");
    assert!(
        verdict["text"].as_str().unwrap().contains(&said),
        "{verdict}"
    );
    assert!(
        text.contains(&said) && text.contains("readinessProbe"),
        "{text}"
    );
    let events = stop(agent);
    let f = proxy_failures(&events, &pod, "inbound_startup");
    assert_eq!(f.len() as u64, refused, "the proxy's own count");
    let s = of_pod(&events, &uid, "inbound_race");
    assert_eq!(s.len(), 1, "one summary per pod and episode: {s:?}");
    let s = s[0];
    assert_eq!(s["when"], "startup", "{s}");
    assert_eq!(s["ports"], json!([APP_PORT]), "{s}");
    assert_eq!(s["refused"], refused, "{s}");
    assert_eq!(s["workload"], "orders", "{s}");
    assert_eq!(s["container"], "app", "the app container: {s}");
    let (first, last, listen) = (
        ns(s, "first_refusal_mono_ns"),
        ns(s, "last_refusal_mono_ns"),
        ns(s, "app_listen_mono_ns"),
    );
    assert!(first <= last && last <= listen, "{s}");
    // Bounds from what the client saw: the first refusal lies within the
    // first 503's request; the LISTEN came after the last 503's request
    // began and before the first 200 ended.
    let first503 = rs.iter().find(|r| r.status == 503).unwrap();
    let last503 = rs.iter().rfind(|r| r.status == 503).unwrap();
    let first200 = rs.iter().find(|r| r.status == 200).unwrap();
    assert!(
        (first503.start_mono_ns..=first503.end_mono_ns).contains(&first),
        "{s}"
    );
    assert!(
        (last503.start_mono_ns..=first200.end_mono_ns).contains(&listen),
        "{s}"
    );
    let window = s["window_seconds"].as_f64().unwrap();
    assert!(
        (window - (listen - first) as f64 / 1e9).abs() < 1e-3,
        "window = first refusal -> app listen: {s}"
    );
    assert!(
        s["recommendation"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("readiness"),
        "{s}"
    );
    assert!(
        of_pod(&events, &uid, "startup_race").is_empty(),
        "not outbound"
    );
}

#[test]
fn no_inbound_race_when_app_listens_first() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = injected_pod(&node, "catalog-7d9f8c6b5-nb4fk");
    let _app = server(&pod, Server::default());
    let rs = client(&pod, 5, 50, 0);
    assert_eq!(count(&rs, 200), 5, "{rs:?}");
    assert_eq!(proxy_refused(&mut pod, &rs), 0);
    // The agent saw the app's listen: its latency is observed once.
    let labels = [("namespace", "shop"), ("workload", "catalog")];
    wait_for(
        "the app-listen observation",
        Duration::from_secs(10),
        || (metric(&agent, "connscope_app_listen_seconds_count", &labels) == 1.0).then_some(()),
    );
    let uid = pod.pod.uid.clone();
    let events = stop(agent);
    assert!(failures_of(&events, proxy_pid(&pod)).is_empty());
    assert!(of_pod(&events, &uid, "inbound_race").is_empty(), "no race");
}

#[test]
fn shutdown_race_app_closes_listener_under_traffic() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = injected_pod(&node, "payments-7d9f8c6b5-nb5gk");
    let mut app = server(&pod, Server::default());
    let mut c = pod.spawn_client(30, 100, 0).unwrap();
    c.wait_lines("3 requests served", Duration::from_secs(10), |l| {
        count(&responses(l), 200) >= 3
    })
    .unwrap();
    // The pod is terminating: kubelet's SIGTERM; the app (no preStop delay)
    // closes its listener and is gone while endpoints still send traffic.
    app.terminate(Duration::from_secs(5));
    let rs = responses(&c.wait_exit(Duration::from_secs(60)).unwrap());
    let refused = proxy_refused(&mut pod, &rs);
    assert!(refused >= 3, "refused once the app was gone: {rs:?}");
    let first503 = rs.iter().position(|r| r.status == 503).unwrap();
    assert!(
        rs[first503..].iter().all(|r| r.status == 503),
        "never served again: {rs:?}"
    );
    let uid = pod.pod.uid.clone();
    wait_for_race(&agent, &uid);
    let labels = [
        ("namespace", "shop"),
        ("workload", "payments"),
        ("when", "shutdown"),
    ];
    wait_for("the shutdown race metric", Duration::from_secs(5), || {
        (metric(&agent, "connscope_inbound_race_pods_total", &labels) == 1.0).then_some(())
    });
    let events = stop(agent);
    let f = proxy_failures(&events, &pod, "inbound_shutdown");
    assert_eq!(f.len() as u64, refused, "the proxy's own count");
    let s = of_pod(&events, &uid, "inbound_race");
    assert_eq!(s.len(), 1, "one summary: {s:?}");
    let s = s[0];
    assert_eq!(s["when"], "shutdown", "{s}");
    assert_eq!(s["ports"], json!([APP_PORT]), "{s}");
    assert_eq!(s["refused"], refused, "{s}");
    assert_eq!(s["container"], "app", "{s}");
    let (close, first, last) = (
        ns(s, "listener_close_mono_ns"),
        ns(s, "first_refusal_mono_ns"),
        ns(s, "last_refusal_mono_ns"),
    );
    assert!(close <= first && first <= last, "{s}");
    let last_ok = rs.iter().rfind(|r| r.status == 200).unwrap();
    let last503 = rs.iter().rfind(|r| r.status == 503).unwrap();
    assert!(close >= last_ok.start_mono_ns, "{s}");
    assert!(last <= last503.end_mono_ns, "{s}");
    let window = s["window_seconds"].as_f64().unwrap();
    assert!(
        (window - (last - close) as f64 / 1e9).abs() < 1e-3,
        "window = listener close -> last refusal: {s}"
    );
    let rec = s["recommendation"].as_str().unwrap();
    assert!(rec.contains("preStop"), "{s}");
    assert!(
        of_pod(&events, &uid, "inbound_race")
            .iter()
            .all(|s| s["when"] != "startup")
    );
}

#[test]
fn app_bound_to_loopback_is_bind() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = injected_pod(&node, "ledger-7d9f8c6b5-nb6hk");
    let _app = server(
        &pod,
        Server {
            loopback_only: true,
            ..Server::default()
        },
    );
    // Envoy dials the pod IP: an app on 127.0.0.1 refuses it for ever.
    let rs = client(&pod, 5, 50, 0);
    let refused = proxy_refused(&mut pod, &rs);
    assert_eq!(refused, 5, "{rs:?}");
    let uid = pod.pod.uid.clone();
    let events = stop(agent);
    let f = proxy_failures(&events, &pod, "inbound_bind");
    assert_eq!(f.len() as u64, refused, "the proxy's own count");
    let s = of_pod(&events, &uid, "inbound_race");
    assert_eq!(s.len(), 1, "{s:?}");
    let s = s[0];
    assert_eq!(s["when"], "bind", "{s}");
    assert_eq!(s["ports"], json!([APP_PORT]), "{s}");
    assert_eq!(s["refused"], refused, "{s}");
    assert_eq!(
        s["bound_addresses"],
        json!([format!("127.0.0.1:{APP_PORT}")]),
        "{s}"
    );
    assert!(
        s["recommendation"].as_str().unwrap().contains("0.0.0.0"),
        "{s}"
    );
}

#[test]
fn probes_refused_during_startup_are_no_race() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = injected_pod(&node, "search-7d9f8c6b5-nb7jk");
    let listen_after = slow(Duration::from_millis(1200)).as_millis() as u64;
    let _app = server(
        &pod,
        Server {
            listen_after_ms: listen_after,
            ..Server::default()
        },
    );
    // pilot-agent runs the rewritten readiness probe until the app answers.
    let mut prober = pod.spawn_prober(60 * time_scale(), 150).unwrap();
    let ps = probes(&prober.wait_exit(Duration::from_secs(30)).unwrap());
    let refused = ps.last().map_or(0, |p| p.refused_total);
    assert!(refused >= 3, "refused while the app started: {ps:?}");
    assert_eq!(ps.last().unwrap().probe, "ok", "{ps:?}");
    assert_eq!(
        pod.sidecar_refused().unwrap(),
        0,
        "no traffic through Envoy"
    );
    let pid = ps[0].pid;
    wait_for("the probes' failures", Duration::from_secs(10), || {
        (failures_of(&agent.events(), pid).len() as u64 >= refused).then_some(())
    });
    let uid = pod.pod.uid.clone();
    let events = stop(agent);
    let f = failures_of(&events, pid);
    assert_eq!(f.len() as u64, refused, "one per refused probe");
    for e in &f {
        assert_eq!(e["phase"], "probe", "{e}");
        assert_eq!(e["comm"], "pilot-agent", "{e}");
    }
    assert!(of_pod(&events, &uid, "inbound_race").is_empty(), "no race");
    assert!(failures_of(&events, proxy_pid(&pod)).is_empty());
}

#[test]
fn agent_restarted_while_app_listens_is_no_false_race() {
    let Some(node) = Node::shared() else { return };
    let mut pod = injected_pod(&node, "billing-7d9f8c6b5-nb8lk");
    let mut app = server(&pod, Server::default());
    // The agent (re)starts after the app listens: it must restore the
    // app's listener, not take the app for one that never listened.
    let agent = agent(&node);
    let rs = client(&pod, 3, 50, 0);
    assert_eq!(count(&rs, 200), 3, "{rs:?}");
    app.terminate(Duration::from_secs(5));
    let rs = client(&pod, 4, 50, 0);
    let refused = proxy_refused(&mut pod, &rs);
    assert_eq!(refused, 4, "{rs:?}");
    let uid = pod.pod.uid.clone();
    wait_for_race(&agent, &uid);
    let events = stop(agent);
    let f = proxy_failures(&events, &pod, "inbound_shutdown");
    assert_eq!(f.len() as u64, refused);
    let s = of_pod(&events, &uid, "inbound_race");
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["when"], "shutdown", "no false start-up race: {}", s[0]);
    assert_eq!(s[0]["refused"], refused);
}
