//! What changed: the summaries' `revision` (app images, proxy image and
//! version, Istio revision, template hash, node) and
//! `connscope_workload_revision_info`, from the runtime's files without the
//! API and from the (stand-in) API server with it.
//!
//! Why: a page for a startup-race regression must say whether the app's
//! rollout or the mesh changed. Shares the machine: each test reads only its
//! own pod's events (by uid) and its own workload's series.

use std::time::Duration;

use connscope::testbed::{
    pod::{PROXY_IMAGE, image},
    scenario::{App, outcomes},
};
use serde_json::json;

use crate::fixture::{Agent, Node, http_get, of_pod, start_sidecar, wait_for};

/// The agent's `/metrics` line of `connscope_workload_revision_info` for
/// this workload, if any.
fn info_line(agent: &Agent, workload: &str) -> Option<String> {
    let (status, body) = http_get(agent.http_port, "/metrics");
    assert_eq!(status, 200);
    let needle = format!("workload=\"{workload}\"");
    body.lines()
        .find(|l| l.starts_with("connscope_workload_revision_info{") && l.contains(&needle))
        .map(str::to_string)
}

#[test]
fn revision_from_runtime_files_without_the_api() {
    let Some(node) = Node::shared() else { return };
    let mut agent = node.agent(&["--hold-seconds", "1"]);
    let mut pod = node.sim_pod("revfiles-7d9f8c6b5-k4m2p", true);
    // Listening after 0.8 s, gone 2 s later: the app, dialing for 5 s, is
    // refused at start-up and again at shutdown.
    start_sidecar(&mut pod, 800, 2000);
    let mut app = pod
        .spawn_app(&App {
            attempts: 50,
            interval_ms: 100,
            keep_going: true,
            ..App::default()
        })
        .unwrap();
    let scale = u64::from(crate::fixture::time_scale());
    let lines = app.wait_exit(Duration::from_secs(20 * scale)).unwrap();
    let attempts = outcomes(&lines).unwrap();
    assert!(attempts.iter().any(|o| o.ok), "{attempts:?}");
    assert!(
        !attempts[0].ok && !attempts.last().unwrap().ok,
        "{attempts:?}"
    );
    let uid = pod.pod.uid.clone();
    wait_for("the startup_race summary", Duration::from_secs(10), || {
        (!of_pod(&agent.events(), &uid, "startup_race").is_empty()).then_some(())
    });

    // One series for the workload's running revision; no template hash
    // without the API.
    let line = wait_for("the revision info series", Duration::from_secs(10), || {
        info_line(&agent, "revfiles")
    });
    assert_eq!(
        line,
        r#"connscope_workload_revision_info{namespace="shop",proxy_version="1.22.3",revision="",workload="revfiles"} 1"#
    );
    // The pod leaves: its revision no longer runs here.
    drop(pod);
    wait_for("the series removed", Duration::from_secs(10), || {
        info_line(&agent, "revfiles").is_none().then_some(())
    });

    assert!(agent.stop().success());
    let events = agent.events();
    let want = json!({
        "app_images": {"app": image("shop", "app")},
        "proxy_image": PROXY_IMAGE,
        "proxy_version": "1.22.3",
        "node": "test-node",
        "source": "runtime"
    });
    for ty in ["sidecar_ready", "startup_race", "shutdown_race"] {
        let s = of_pod(&events, &uid, ty);
        assert_eq!(s.len(), 1, "{ty}: {s:?}");
        assert_eq!(s[0]["revision"], want, "{ty}: {}", s[0]);
    }
}

#[test]
fn revision_from_the_api() {
    let Some(node) = Node::shared() else { return };
    let mut pod = node.sim_pod("revapi-5f6d7c8b9-q2w3e", true);
    // The API's images differ from the runtime files': the API's are taken.
    let app_image = "registry.example/shop/revapi:2.0.0";
    let proxy_image = "docker.io/istio/proxyv2:1.23.0-distroless";
    let (_api, url) = node.api(&json!({
        "pods": [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid,
                "resourceVersion": "7",
                "labels": {"pod-template-hash": "5f6d7c8b9", "istio.io/rev": "1-23-0"},
                "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "revapi-5f6d7c8b9", "uid": "rs-uid", "controller": true}]},
            "spec": {"nodeName": "test-node",
                "initContainers": [{"name": "istio-init", "image": proxy_image}],
                "containers": [{"name": "app", "image": app_image},
                               {"name": "istio-proxy", "image": proxy_image}]},
            "status": {"phase": "Running"}
        }],
        "owners": {"ReplicaSet/shop/revapi-5f6d7c8b9": {"apiVersion": "apps/v1",
            "kind": "Deployment", "name": "revapi", "uid": "d-uid", "controller": true}}
    }));
    let mut agent = node.kube_agent(&url, &["--hold-seconds", "1"]);
    start_sidecar(&mut pod, 800, 0);
    let attempts = pod.run_app(&App::default()).unwrap();
    assert!(attempts.iter().any(|o| !o.ok), "{attempts:?}");
    let uid = pod.pod.uid.clone();
    wait_for("the startup_race summary", Duration::from_secs(10), || {
        (!of_pod(&agent.events(), &uid, "startup_race").is_empty()).then_some(())
    });
    let line = wait_for("the revision info series", Duration::from_secs(10), || {
        info_line(&agent, "revapi")
    });
    assert_eq!(
        line,
        r#"connscope_workload_revision_info{namespace="shop",proxy_version="1.23.0",revision="5f6d7c8b9",workload="revapi"} 1"#
    );
    assert!(agent.stop().success());
    let events = agent.events();
    let want = json!({
        "app_images": {"app": app_image},
        "proxy_image": proxy_image,
        "proxy_version": "1.23.0",
        "istio_revision": "1-23-0",
        "pod_template_hash": "5f6d7c8b9",
        "node": "test-node",
        "source": "api"
    });
    for ty in ["sidecar_ready", "startup_race"] {
        let s = of_pod(&events, &uid, ty);
        assert_eq!(s.len(), 1, "{ty}: {s:?}");
        assert_eq!(s[0]["revision"], want, "{ty}: {}", s[0]);
        assert_eq!(s[0]["workload"], "revapi");
    }
}
