//! The Kubernetes API path against a local stand-in API server (no real one
//! can run here) speaking list+watch with real Kubernetes JSON: workloads by
//! owner walk, an outage at start that degrades and recovers by itself.
//!
//! Why: on a real cluster workload names and owners come from the API, and
//! the API is not always up. Shares the machine (its own API server port).

use std::time::Duration;

use connscope::{attribute::kubelet::Qos, testbed::pod::Flavor};
use serde_json::json;

use crate::fixture::{
    Node, assert_absent, assert_fields, closed_target, dial_in, fake_api, free_port, wait_for,
};

#[test]
fn api_names_workloads_degrades_when_down_and_recovers() {
    let Some(node) = Node::shared() else { return };
    let pod = node.containerd_pod("shop/checkout-7d9f8c6b5-xk2lp", &["app"]);
    pod.remove_metadata("app").unwrap();
    let cid = pod.container("app").unwrap().id.clone();
    // A CronJob's pod: Job -> CronJob is the other owner walk.
    let job_pod = node.pod(
        Flavor::Crio,
        Qos::BestEffort,
        "shop/nightly-report-29012340-q8x7d",
        &["report"],
    );
    node.write("state.json", &json!({
        "pods": [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                "resourceVersion": "99",
                "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "checkout-7d9f8c6b5", "uid": "rs-uid", "controller": true}]},
            "spec": {"nodeName": "test-node", "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "app", "ready": true,
                "restartCount": 0, "image": "app:1", "imageID": "", "started": true,
                "containerID": format!("containerd://{cid}"),
                "state": {"running": {"startedAt": "2026-11-24T10:00:00Z"}}}]}
        }, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": job_pod.name, "namespace": job_pod.namespace, "uid": job_pod.uid,
                "resourceVersion": "98",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                    "name": "nightly-report-29012340", "uid": "job-uid", "controller": true}]},
            "spec": {"nodeName": "test-node", "containers": [{"name": "report", "image": "r:1"}]},
            "status": {"phase": "Running"}
        }, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "elsewhere", "namespace": "shop", "uid": "other-node-pod"},
            "spec": {"nodeName": "another-node", "containers": [{"name": "c"}]}
        }],
        "owners": {"ReplicaSet/shop/checkout-7d9f8c6b5": {"apiVersion": "apps/v1",
            "kind": "Deployment", "name": "checkout", "uid": "d-uid", "controller": true},
            "Job/shop/nightly-report-29012340": {"apiVersion": "batch/v1",
            "kind": "CronJob", "name": "nightly-report", "uid": "cj-uid", "controller": true}}
    }).to_string());

    // The API server is down when the agent starts.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = node.agent(&["--kubernetes", "on", "--kube-api-url", &url]);
    let target = closed_target();
    let e = agent.failure(dial_in(&pod, "app", &target, false).pid);
    assert_eq!(
        e["pod_uid"],
        pod.uid.as_str(),
        "the cgroup still names the pod: {e}"
    );
    assert_absent(&e, &["pod", "workload"]);
    agent.wait_stderr("source=\"kubernetes\"", Duration::from_secs(15));

    // The API comes up: the agent recovers by itself and names the workload.
    let api = fake_api(&node.dir, port);
    let e = wait_for(
        "an event attributed through the API",
        Duration::from_secs(45),
        || {
            let e = agent.failure(dial_in(&pod, "app", &target, false).pid);
            (e["workload_source"] == "api").then_some(e)
        },
    );
    assert_fields(
        &e,
        &[
            ("namespace", "shop"),
            ("pod", "checkout-7d9f8c6b5-xk2lp"),
            // From the API's container status.
            ("container", "app"),
            ("workload", "checkout"),
            // The ReplicaSet walked to its Deployment.
            ("workload_kind", "Deployment"),
        ],
    );
    let e = agent.failure(dial_in(&job_pod, "report", &target, false).pid);
    assert_fields(
        &e,
        &[
            ("pod", "nightly-report-29012340-q8x7d"),
            ("workload", "nightly-report"),
            // The Job walked to its CronJob.
            ("workload_kind", "CronJob"),
        ],
    );
    let reqs = node.api_requests();
    assert!(
        reqs.iter().any(|r| r["path"] == "/api/v1/pods"
            && r["query"]["fieldSelector"] == "spec.nodeName=test-node"),
        "only this node's pods: {reqs:?}"
    );

    // The API goes away mid-run: what is known stays known.
    drop(api);
    let e = agent.failure(dial_in(&pod, "app", &target, false).pid);
    assert_eq!(e["workload"], "checkout");
    let logged = agent
        .drain_stderr()
        .iter()
        .filter(|l| l.contains("source=\"kubernetes\""))
        .count();
    assert_eq!(logged, 1, "an outage is logged once, then counted");
    drop(pod);
    drop(job_pod);
}
