//! `connscope explain` against a live agent: the timeline it draws for a
//! startup race, a pod without a race and a shutdown race, each checked
//! against what the test bed did (kernel order, counts, destinations), and
//! its errors: an unreachable agent, an unknown pod, no events, and the
//! token an agent with `--http-auth=kubernetes` asks for.
//!
//! Why: explain is what on-call runs when paged; its picture must be the
//! agent's truth, and its failures must say what to do. Shares the machine:
//! every pod here has a workload no other test uses, and explain selects by
//! pod name.

use std::{process::Command, time::Duration};

use connscope::testbed::scenario::App;
use serde_json::{Value, json};

use crate::fixture::{Agent, BIN, Node, free_port, run_shutdown_race, start_sidecar, wait_for};

/// The agent of these tests: failures of a pod whose injection is not known
/// yet are held for a second.
fn agent(node: &Node) -> Agent {
    node.agent(&["--hold-seconds", "1"])
}

/// `connscope explain --addr <agent> args...`: (exit status, stdout, stderr).
fn explain(port: u16, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("explain")
        .args(["--addr", &format!("http://127.0.0.1:{port}")])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Explains one pod of `shop`, as text and as JSON (whose one pod is
/// returned); both must succeed.
pub(crate) fn explain_pod(port: u16, pod: &str) -> (String, Value) {
    let (code, text, err) = explain(port, &["--namespace", "shop", "--pod", pod]);
    assert_eq!(code, 0, "explain failed: {err}\n{text}");
    eprintln!("{text}");
    let (code, json, err) = explain(port, &["-n", "shop", "-p", pod, "--json"]);
    assert_eq!(code, 0, "explain --json failed: {err}");
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let pods = v["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{v}");
    assert_eq!(v["node"], "test-node");
    (text, pods[0].clone())
}

/// Waits (10 s) for a summary of type `ty` of the pod with this uid.
fn wait_summary(agent: &Agent, uid: &str, ty: &str) -> Value {
    wait_for(&format!("{ty} of {uid}"), Duration::from_secs(10), || {
        agent
            .events()
            .into_iter()
            .find(|e| e["pod_uid"] == uid && e["type"] == ty)
    })
}

/// Seconds after t = 0 of the pod's mark of `kind` (on `port`).
fn mark(p: &Value, kind: &str, port: Option<u16>) -> f64 {
    p["marks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == kind && port.is_none_or(|port| m["port"] == port))
        .unwrap_or_else(|| panic!("no mark {kind} {port:?} in {p}"))["at_s"]
        .as_f64()
        .unwrap()
}

fn assert_has(text: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(text.contains(w), "missing {w:?} in:\n{text}");
    }
}

#[test]
fn explain_draws_a_startup_race() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = node.sim_pod("invoice-7d9f8c6b5-w4z2m", true);
    start_sidecar(&mut pod, 1200, 0);
    let attempts = pod.run_app(&App::default()).unwrap();
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(refused >= 3, "{attempts:?}");
    let s = wait_summary(&agent, &pod.pod.uid, "startup_race");
    let (text, p) = explain_pod(agent.http_port, &pod.pod.name);
    assert_has(
        &text,
        &[
            "POD        shop/invoice-7d9f8c6b5-w4z2m (Deployment invoice, node test-node)\n",
            "T=0        the pod's first process, 20",
            "pod start (first process)\n",
            "container istio-proxy starts\n",
            "container app starts\n",
            "sidecar starts (pilot-agent/envoy)\n",
            "istio-proxy listens on 15021 (health",
            "istio-proxy listens on 15001 (outbound capture: the sidecar is ready)\n",
            &format!(
                "{refused} refused (startup_race: before the sidecar listened) -> {}\n",
                pod.upstream()
            ),
            &format!("VERDICT    startup race: {refused} outbound connect()s refused over "),
            "MITIGATION unknown",
            "FIX        enable holdApplicationUntilProxyStarts",
            "x refused connect (race)",
        ],
    );
    // Without the revision fields, explain says it cannot tell; with them,
    // this is the workload's first revision here.
    assert!(
        text.contains("CHANGED    unknown: the events carry no revision")
            || text.contains("CHANGED    no earlier revision of invoice in this agent's events"),
        "{text}"
    );
    // As data: the kernel's order, and the agent's own counts.
    assert_eq!(p["verdicts"][0]["phase"], "startup_race");
    assert_eq!(p["origin"], "pod_start");
    let start = mark(&p, "pod_start", None);
    let sidecar = mark(&p, "sidecar_start", None);
    let health = mark(&p, "sidecar_listen", Some(15021));
    let ready = mark(&p, "sidecar_listen", Some(15001));
    let race = &p["spans"][0];
    assert_eq!(race["phase"], "startup_race");
    assert_eq!(race["count"], refused);
    assert_eq!(race["destinations"], json!([pod.upstream()]));
    let first = race["from_s"].as_f64().unwrap();
    assert!(
        start == 0.0 && start <= sidecar && sidecar <= health && health < first && first < ready,
        "{p}"
    );
    assert_eq!(
        race["to_s"].as_f64().unwrap(),
        ready,
        "window ends at 15001"
    );
    let window = s["window_seconds"].as_f64().unwrap();
    assert!((ready - first - window).abs() < 1e-6, "{window} vs {p}");
    // The refusals are where the app saw them (the app's clock is the kernel's).
    let origin = p["origin_mono_ns"].as_u64().unwrap();
    let app_first = (attempts[0].end_mono_ns - origin) as f64 / 1e9;
    assert!((first - app_first).abs() < 0.05, "{first} vs {app_first}");
}

#[test]
fn explain_says_no_race_when_the_sidecar_was_first() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = node.sim_pod("quote-7d9f8c6b5-t6v8n", true);
    start_sidecar(&mut pod, 0, 0);
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(attempts.len() == 1 && attempts[0].ok, "{attempts:?}");
    wait_summary(&agent, &pod.pod.uid, "sidecar_ready");
    let (text, p) = explain_pod(agent.http_port, &pod.pod.name);
    assert_has(
        &text,
        &[
            "POD        shop/quote-7d9f8c6b5-t6v8n (Deployment quote, node test-node)\n",
            "istio-proxy listens on 15001 (outbound capture: the sidecar is ready)\n",
            "VERDICT    no race: istio-proxy listened on 15001 ",
            " s after the pod started, and no outbound connect() was refused before\n",
        ],
    );
    assert!(!text.contains("refused (startup_race"), "{text}");
    assert!(!text.contains("FIX"), "{text}");
    assert_eq!(p["verdicts"][0]["phase"], "no_race");
    assert!(p["spans"].as_array().unwrap().is_empty(), "{p}");
    // Without a pod named, only pods that raced are drawn: this one is
    // listed among the others.
    let (code, out, err) = explain(agent.http_port, &["-n", "shop", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["others"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["pod"] == pod.pod.name.as_str() && o["verdict"] == "no_race"),
        "{v}"
    );
}

#[test]
fn explain_draws_a_shutdown_race() {
    let Some(node) = Node::shared() else { return };
    let agent = agent(&node);
    let mut pod = node.sim_pod("mailer-7d9f8c6b5-r5s7k", true);
    let attempts = run_shutdown_race(&mut pod);
    let refused = attempts.iter().filter(|o| !o.ok).count();
    assert!(attempts[0].ok && refused >= 3, "{attempts:?}");
    let s = wait_summary(&agent, &pod.pod.uid, "shutdown_race");
    assert_eq!(s["refused"], refused);
    let (text, p) = explain_pod(agent.http_port, &pod.pod.name);
    assert_has(
        &text,
        &[
            "istio-proxy listens on 15001 (outbound capture: the sidecar is ready)\n",
            "istio-proxy stops listening on 15001 (outbound capture ends)\n",
            &format!(
                "{refused} refused (shutdown_race: after the sidecar stopped listening) -> {}\n",
                pod.upstream()
            ),
            &format!(
                "VERDICT    shutdown race: {refused} outbound connect()s refused after istio-proxy stopped listening on 15001 while the app still ran\n"
            ),
            "FIX        the sidecar stopped listening before the app finished",
        ],
    );
    assert_eq!(p["verdicts"][0]["phase"], "shutdown_race");
    let ready = mark(&p, "sidecar_listen", Some(15001));
    let closed = mark(&p, "capture_closed", None);
    let down = &p["spans"][0];
    assert_eq!(down["phase"], "shutdown_race");
    assert_eq!(down["count"], refused);
    let (from, to) = (
        down["from_s"].as_f64().unwrap(),
        down["to_s"].as_f64().unwrap(),
    );
    assert!(ready < closed && closed <= from && from < to, "{p}");
}

#[test]
fn explain_errors_say_what_to_do() {
    let Some(node) = Node::shared() else { return };
    // Nobody listens: the agent cannot be reached.
    let (code, _, err) = explain(free_port(), &["--pod", "x"]);
    assert_eq!(code, 3, "{err}");
    assert_has(&err, &["cannot reach the agent", "port-forward"]);

    let agent = agent(&node);
    let port = agent.http_port;
    // A pod without a sidecar, whose app is refused: the agent has events.
    let pod = node.sim_pod("ledgerbatch-x7k2p", false);
    let attempts = pod
        .run_app(&App {
            attempts: 2,
            target: Some(pod.topo.upstream_addr(false, 9).to_string()),
            ..App::default()
        })
        .unwrap();
    let pid = attempts[0].pid;
    wait_for("the pod's failures", Duration::from_secs(10), || {
        agent
            .events()
            .iter()
            .any(|e| e["pid"] == pid && e["phase"] == "no_sidecar")
            .then_some(())
    });
    let (code, text, err) = explain(port, &["-n", "shop", "--pod", "ledgerbatch-x7k2p"]);
    assert_eq!(code, 0, "{err}");
    assert_has(
        &text,
        &[
            "2 failed (no_sidecar: no sidecar)",
            "VERDICT    no sidecar: not an injected pod",
            "o failed connect (not the race)",
        ],
    );
    // An unknown pod.
    let (code, _, err) = explain(port, &["-n", "shop", "--pod", "nobody-7d9f8c6b5-zzzzz"]);
    assert_eq!(code, 5, "{err}");
    assert_has(
        &err,
        &[
            "no event of the agent on node test-node names pod nobody-7d9f8c6b5-zzzzz in namespace shop",
            "another node",
        ],
    );
    let (code, _, err) = explain(port, &["-n", "shop", "--workload", "nobody"]);
    assert_eq!(code, 5, "{err}");
    // No events (a namespace nobody uses), and a bad name.
    let (code, _, err) = explain(port, &["-n", "no-such-namespace"]);
    assert_eq!(code, 6, "{err}");
    assert_has(&err, &["has no events in namespace no-such-namespace"]);
    let (code, _, err) = explain(port, &["-n", "Shop!"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["--namespace \"Shop!\" is not a Kubernetes name"]);
}

#[test]
fn explain_passes_the_token_an_agent_asks_for() {
    let Some(node) = Node::shared() else { return };
    let (_api, url) = node.api(&json!({
        "pods": [],
        "tokens": {
            "oncall-token": {"username": "oncall@example.com", "groups": ["system:authenticated"]},
            "nobody-token": {"username": "nobody@example.com", "groups": ["system:authenticated"]}
        },
        "grants": {"oncall@example.com": ["/metrics", "/events"]}
    }));
    let agent = node.kube_agent(&url, &["--http-auth", "kubernetes"]);
    let port = agent.http_port;
    let ns = ["-n", "no-such-namespace"];
    let (code, _, err) = explain(port, &ns);
    assert_eq!(code, 4, "{err}");
    assert_has(&err, &["wants a bearer token", "--token-file", "401"]);
    let nobody = node.write("nobody", "nobody-token\n");
    let (code, _, err) = explain(
        port,
        &[&ns[..], &["--token-file", nobody.to_str().unwrap()]].concat(),
    );
    assert_eq!(code, 4, "{err}");
    assert_has(
        &err,
        &["may not get /events", "connscope-events-reader", "403"],
    );
    let oncall = node.write("oncall", "oncall-token\n");
    let (code, _, err) = explain(
        port,
        &[&ns[..], &["--token-file", oncall.to_str().unwrap()]].concat(),
    );
    assert_eq!(
        code, 6,
        "the token was taken; the namespace has no events: {err}"
    );
}

/// The API's view of a simulated pod of Deployment `billing`, from
/// ReplicaSet `billing-<hash>`, whose app runs `app_image`.
fn billing_pod(pod: &connscope::testbed::scenario::SimPod, hash: &str, app_image: &str) -> Value {
    let proxy = "docker.io/istio/proxyv2:1.22.3";
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid,
            "resourceVersion": "7",
            "labels": {"pod-template-hash": hash, "istio.io/rev": "1-22-3"},
            "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("billing-{hash}"), "uid": format!("rs-{hash}"), "controller": true}]},
        "spec": {"nodeName": "test-node",
            "containers": [{"name": "app", "image": app_image},
                           {"name": "istio-proxy", "image": proxy}]},
        "status": {"phase": "Running"}
    })
}

#[test]
fn explain_says_what_changed_since_the_previous_revision() {
    let Some(node) = Node::shared() else { return };
    let mut old = node.sim_pod("billing-6b8d9f7c4-b2c4d", true);
    let mut new = node.sim_pod("billing-7d9f8c6b5-f5g6h", true);
    let owner = |hash: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "billing",
            "uid": format!("d-{hash}"), "controller": true})
    };
    let (_api, url) = node.api(&json!({
        "pods": [
            billing_pod(&old, "6b8d9f7c4", "registry.example/shop/billing:1.4.1"),
            billing_pod(&new, "7d9f8c6b5", "registry.example/shop/billing:1.4.2"),
        ],
        "owners": {
            "ReplicaSet/shop/billing-6b8d9f7c4": owner("6b8d9f7c4"),
            "ReplicaSet/shop/billing-7d9f8c6b5": owner("7d9f8c6b5"),
        }
    }));
    let agent = node.kube_agent(&url, &["--hold-seconds", "1"]);
    // The old revision started without a race; the new one races.
    start_sidecar(&mut old, 0, 0);
    assert!(old.run_app(&App::default()).unwrap()[0].ok);
    wait_summary(&agent, &old.pod.uid, "sidecar_ready");
    start_sidecar(&mut new, 800, 0);
    let attempts = new.run_app(&App::default()).unwrap();
    assert!(attempts.iter().any(|o| !o.ok), "{attempts:?}");
    wait_summary(&agent, &new.pod.uid, "startup_race");
    let (text, p) = explain_pod(agent.http_port, &new.pod.name);
    assert_has(
        &text,
        &[
            "POD        shop/billing-7d9f8c6b5-f5g6h (Deployment billing, node test-node)\n",
            "MITIGATION none\n",
            "CHANGED    changed since revision 6b8d9f7c4: app image billing:1.4.1 -> 1.4.2; proxy unchanged (1.22.3)\n",
        ],
    );
    assert_eq!(p["changed"]["kind"], "app");
    assert_eq!(p["changed"]["previous_pod"], old.pod.name.as_str());
    // The whole workload: both pods, the old one without a race.
    let (code, out, err) = explain(agent.http_port, &["-n", "shop", "-w", "billing"]);
    assert_eq!(code, 0, "{err}");
    assert_has(
        &out,
        &[
            "POD        shop/billing-6b8d9f7c4-b2c4d",
            "VERDICT    no race",
            "CHANGED    no earlier revision of billing in this agent's events\n",
            "POD        shop/billing-7d9f8c6b5-f5g6h",
            "VERDICT    startup race",
        ],
    );
}
