//! A mesh's start-up mitigation read from the Kubernetes API (the stand-in
//! API server): Linkerd's `proxy-await`, on by default.

use connscope::testbed::{
    mesh::MeshBed,
    scenario::{App, SimPod},
};
use serde_json::{Value, json};

use super::{of_pod, stop, wait_for_event};
use crate::fixture::{Node, start_sidecar, wait_for_api_view};

/// The API's view of a simulated pod of `mesh`: its proxy container next to
/// the app, these annotations and labels; as Linkerd's injector writes
/// it: with proxy-await (its default), the proxy's `postStart` runs
/// linkerd-await.
fn api_pod(pod: &SimPod, mesh: &MeshBed, annotations: Value, labels: Value) -> Value {
    let disabled = |k: &str| annotations[k] == "disabled";
    let wait = !disabled("config.linkerd.io/proxy-await")
        && !disabled("config.alpha.linkerd.io/proxy-await");
    let cid = |n: &str| format!("containerd://{}", pod.pod.container(n).unwrap().id);
    let status = |n: &str| {
        json!({"name": n, "ready": true, "restartCount": 0, "image": "i",
        "imageID": "", "started": true, "containerID": cid(n),
        "state": {"running": {"startedAt": "2026-11-24T10:00:00Z"}}})
    };
    let proxy = mesh.container.as_str();
    let mut spec_proxy = json!({"name": proxy});
    if wait {
        spec_proxy["lifecycle"] = json!({"postStart": {"exec": {"command":
            ["/usr/lib/linkerd/linkerd-await", "--timeout=2m", "--port=4191"]}}});
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid,
            "annotations": annotations, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "ledger",
                "uid": "s", "controller": true}]},
        "spec": {"nodeName": "test-node", "containers": [spec_proxy, {"name": "app"}]},
        "status": {"containerStatuses": [status(proxy), status("app")]}})
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
