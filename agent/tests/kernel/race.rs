//! The startup race end to end, on the real kernel: simulated Istio pods
//! (network namespace with Istio's capture rules, kubelet cgroups, runtime
//! metadata, stand-in sidecar and app), the agent classifying what it sees.

use std::{net::TcpListener, path::PathBuf, time::Duration};

use crate::fixture::{Agent, BIN, TempDir, fake_api, privileged, wait_for};
use connscope::{
    attribute::runtime::Roots,
    testbed::{
        pod::cgroup2_root,
        scenario::{App, SimPod, outcomes},
    },
};
use serde_json::{Value, json};

struct Env {
    dir: TempDir,
    roots: Roots,
    cg: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let roots = Roots {
            containerd: dir.0.join("ctd"),
            crio: dir.0.join("crio"),
        };
        Env {
            roots,
            cg: cgroup2_root().unwrap(),
            dir,
        }
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--containerd-root",
            self.roots.containerd.to_str().unwrap(),
            "--crio-root",
            self.roots.crio.to_str().unwrap(),
            "--hold-seconds",
            "1",
            "--node-name",
            "test-node",
        ];
        if !extra.contains(&"--kubernetes") {
            args.extend(["--kubernetes", "off"]);
        }
        args.extend_from_slice(extra);
        Agent::start(&self.dir.0, &args)
    }

    fn pod(&self, tag: u8, name: &str, injected: bool) -> SimPod {
        SimPod::create(
            BIN.as_ref(),
            tag,
            &self.cg,
            &self.roots,
            "shop",
            name,
            injected,
        )
        .unwrap()
    }
}

fn of_pod<'a>(events: &'a [Value], uid: &str, ty: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["pod_uid"] == uid && e["type"] == ty)
        .collect()
}

fn app_failures(events: &[Value], pid: u32) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["type"] == "connect_failure" && e["pid"] == pid)
        .collect()
}

/// Stops the agent (which flushes pending summaries) and returns its events.
fn stop(mut agent: Agent) -> Vec<Value> {
    assert!(agent.stop().success());
    agent.events()
}

#[test]
fn startup_race_sidecar_late() {
    if !privileged("startup_race_sidecar_late") {
        return;
    }
    let env = Env::new("race-late");
    let agent = env.agent(&[]);
    let mut pod = env.pod(21, "checkout-7d9f8c6b5-xk2lp", true);
    pod.start_sidecar(1200, 0).unwrap();
    pod.wait_sidecar(15021, "listen", Duration::from_secs(10))
        .unwrap();
    let attempts = pod.run_app(&App::default()).unwrap();
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
    wait_for("startup_race summary", Duration::from_secs(10), || {
        (!of_pod(&agent.events(), &uid, "startup_race").is_empty()).then_some(())
    });
    let events = stop(agent);
    let pid = attempts[0].pid;
    let f = app_failures(&events, pid);
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
    let first = attempts[0].start_mono_ns;
    let last_refused = attempts.iter().rfind(|o| !o.ok).unwrap().end_mono_ns;
    let ok_at = attempts.last().unwrap().end_mono_ns;
    // First refusal -> ready lies between the last refusal and the success.
    assert!(
        window * 1e9 >= (last_refused - first) as f64 - 5e6,
        "window {window}s"
    );
    assert!(
        window * 1e9 <= (ok_at - first) as f64 + 5e6,
        "window {window}s"
    );
    let push = s["sidecar_start_to_ready_seconds"].as_f64().unwrap();
    assert!(
        (1.1..3.0).contains(&push),
        "sidecar start -> ready ~1.2 s: {push}"
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
    if !privileged("no_race_when_sidecar_first") {
        return;
    }
    let env = Env::new("race-first");
    let agent = env.agent(&[]);
    let mut pod = env.pod(22, "api-5c8d9f7b6-q2w4e", true);
    pod.start_sidecar(0, 0).unwrap();
    pod.wait_sidecar(15001, "listen", Duration::from_secs(10))
        .unwrap();
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(attempts.len() == 1 && attempts[0].ok, "{attempts:?}");
    let uid = pod.pod.uid.clone();
    wait_for("sidecar_ready", Duration::from_secs(10), || {
        (!of_pod(&agent.events(), &uid, "sidecar_ready").is_empty()).then_some(())
    });
    let events = stop(agent);
    assert!(app_failures(&events, attempts[0].pid).is_empty());
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
    if !privileged("non_injected_pod_is_no_sidecar") {
        return;
    }
    let env = Env::new("race-plain");
    let agent = env.agent(&[]);
    let pod = env.pod(23, "batch-x7k2p", false);
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
        let f: Vec<Value> = app_failures(&ev, pid).into_iter().cloned().collect();
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
    if !privileged("shutdown_race_sidecar_exits_first") {
        return;
    }
    let env = Env::new("race-shutdown");
    let agent = env.agent(&[]);
    let mut pod = env.pod(24, "worker-6f7d8c9b5-m3n4p", true);
    pod.start_sidecar(0, 1500).unwrap();
    pod.wait_sidecar(15001, "listen", Duration::from_secs(10))
        .unwrap();
    // The app keeps dialing through the sidecar, which goes away under it.
    let mut app = pod
        .spawn_app(&App {
            attempts: 30,
            interval_ms: 100,
            keep_going: true,
            ..App::default()
        })
        .unwrap();
    pod.wait_sidecar(15001, "closed", Duration::from_secs(10))
        .unwrap();
    let lines = app.wait_exit(Duration::from_secs(20)).unwrap();
    let attempts = outcomes(&lines).unwrap();
    let uid = pod.pod.uid.clone();
    let events = stop(agent);
    let f = app_failures(&events, attempts[0].pid);
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
    if !privileged("two_pods_at_once_different_outcomes") {
        return;
    }
    let env = Env::new("race-two");
    let agent = env.agent(&[]);
    let mut late = env.pod(25, "cart-7d9f8c6b5-x2k4p", true);
    let mut early = env.pod(26, "search-7d9f8c6b5-q8w6z", true);
    early.start_sidecar(0, 0).unwrap();
    late.start_sidecar(1000, 0).unwrap();
    early
        .wait_sidecar(15001, "listen", Duration::from_secs(10))
        .unwrap();
    late.wait_sidecar(15021, "listen", Duration::from_secs(10))
        .unwrap();
    let a = late.spawn_app(&App::default()).unwrap();
    let b = early.spawn_app(&App::default()).unwrap();
    let (mut a, mut b) = (a, b);
    let la = outcomes(&a.wait_exit(Duration::from_secs(20)).unwrap()).unwrap();
    let lb = outcomes(&b.wait_exit(Duration::from_secs(20)).unwrap()).unwrap();
    assert!(la.iter().any(|o| !o.ok) && la.last().unwrap().ok);
    assert!(lb.len() == 1 && lb[0].ok);
    let (ua, ub) = (late.pod.uid.clone(), early.pod.uid.clone());
    wait_for(
        "race summary of the late pod",
        Duration::from_secs(10),
        || (!of_pod(&agent.events(), &ua, "startup_race").is_empty()).then_some(()),
    );
    let events = stop(agent);
    assert_eq!(of_pod(&events, &ua, "startup_race")[0]["workload"], "cart");
    assert!(of_pod(&events, &ub, "startup_race").is_empty());
    assert_eq!(of_pod(&events, &ub, "sidecar_ready").len(), 1);
    assert!(
        app_failures(&events, la[0].pid)
            .iter()
            .all(|e| e["phase"] == "startup_race")
    );
}

#[test]
fn agent_restarted_while_sidecar_is_up() {
    if !privileged("agent_restarted_while_sidecar_is_up") {
        return;
    }
    let env = Env::new("race-restart");
    let mut pod = env.pod(27, "ledger-7d9f8c6b5-ccccc", true);
    pod.start_sidecar(0, 0).unwrap();
    pod.wait_sidecar(15001, "listen", Duration::from_secs(10))
        .unwrap();
    // The agent starts after the sidecar is ready.
    let agent = env.agent(&[]);
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Loopback is not captured (ISTIO_OUTPUT RETURNs 127.0.0.1): a real refusal.
    let target = format!("127.0.0.1:{closed}");
    let attempts = pod
        .run_app(&App {
            attempts: 1,
            target: Some(target),
            ..App::default()
        })
        .unwrap();
    let pid = attempts[0].pid;
    let e = wait_for("the failure", Duration::from_secs(10), || {
        app_failures(&agent.events(), pid)
            .first()
            .map(|e| (*e).clone())
    });
    assert_eq!(
        e["phase"], "sidecar_ready",
        "a ready sidecar is never taken for a missing one: {e}"
    );
    let events = stop(agent);
    assert!(of_pod(&events, &pod.pod.uid, "startup_race").is_empty());
}

/// The API's view of a simulated pod, with Istio annotations.
fn api_pod(pod: &SimPod, annotations: Value, init_proxy: bool) -> Value {
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
            json!([{"name": "app"}, {"name": "istio-proxy"}]),
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

/// Dials loopback (never the race) until an event is attributed through
/// the API: the agent has the pod's API view before the scenario starts.
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

fn with_api(env: &Env, pods: Vec<Value>) -> (crate::fixture::Bg, String) {
    std::fs::write(
        env.dir.0.join("state.json"),
        json!({"pods": pods}).to_string(),
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (
        fake_api(&env.dir.0, port),
        format!("http://127.0.0.1:{port}"),
    )
}

#[test]
fn hold_mode_still_racing_is_reported_as_such() {
    if !privileged("hold_mode_still_racing_is_reported_as_such") {
        return;
    }
    let env = Env::new("race-hold");
    let mut pod = env.pod(28, "db-0", true);
    let ann = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "proxy.istio.io/config": "{ \"holdApplicationUntilProxyStarts\": true }"});
    let (_api, url) = with_api(&env, vec![api_pod(&pod, ann, false)]);
    let mut agent = env.agent(&["--kubernetes", "on", "--kube-api-url", &url]);
    agent.wait_stderr("watching this node's pods", Duration::from_secs(10));
    // Hold releases the app when the proxy's health port answers (15021),
    // which here comes before the outbound listener: the race still happens.
    pod.start_sidecar(800, 0).unwrap();
    pod.wait_sidecar(15021, "listen", Duration::from_secs(10))
        .unwrap();
    let uid = pod.pod.uid.clone();
    // Make sure the API's view has arrived before the app runs.
    wait_for_api_view(&pod, &agent);
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(
        attempts.iter().any(|o| !o.ok),
        "refused before 15001: {attempts:?}"
    );
    wait_for("startup_race summary", Duration::from_secs(10), || {
        (!of_pod(&agent.events(), &uid, "startup_race").is_empty()).then_some(())
    });
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
    if !privileged("native_sidecar_ready_before_app") {
        return;
    }
    let env = Env::new("race-native");
    let mut pod = env.pod(29, "db-1", true);
    let ann = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    let (_api, url) = with_api(&env, vec![api_pod(&pod, ann, true)]);
    let mut agent = env.agent(&["--kubernetes", "on", "--kube-api-url", &url]);
    agent.wait_stderr("watching this node's pods", Duration::from_secs(10));
    let uid = pod.pod.uid.clone();
    wait_for_api_view(&pod, &agent);
    // Native sidecar: kubelet starts the app once the proxy is started.
    pod.start_sidecar(0, 0).unwrap();
    pod.wait_sidecar(15001, "listen", Duration::from_secs(10))
        .unwrap();
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(attempts.len() == 1 && attempts[0].ok);
    let r = wait_for("sidecar_ready", Duration::from_secs(10), || {
        of_pod(&agent.events(), &uid, "sidecar_ready")
            .first()
            .map(|e| (*e).clone())
    });
    assert_eq!(r["mitigation"]["native_sidecar"], true, "{r}");
    let events = stop(agent);
    assert!(of_pod(&events, &uid, "startup_race").is_empty());
}
