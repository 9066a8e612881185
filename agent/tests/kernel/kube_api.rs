//! The Kubernetes API path against a local stand-in API server (no real one
//! can run here) speaking list+watch with real Kubernetes JSON: workloads by
//! owner walk, an outage at start that degrades and recovers by itself.

use std::{net::TcpListener, time::Duration};

use crate::fixture::{Agent, TempDir, dial, fake_api, privileged, wait_for};
use connscope::{
    attribute::kubelet::Qos,
    attribute::runtime::Roots,
    testbed::pod::{Flavor, Pod, cgroup2_root},
};
use serde_json::{Value, json};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn api_names_workloads_degrades_when_down_and_recovers() {
    if !privileged("api_names_workloads_degrades_when_down_and_recovers") {
        return;
    }
    let dir = TempDir::new("kubeapi");
    let roots = Roots {
        containerd: dir.0.join("ctd"),
        crio: dir.0.join("crio"),
    };
    let cg = cgroup2_root().unwrap();
    let pod = Pod::create(
        &cg,
        &roots,
        Flavor::Containerd,
        Qos::Burstable,
        "shop",
        "checkout-7d9f8c6b5-xk2lp",
        &["app"],
    )
    .unwrap();
    pod.remove_metadata("app").unwrap();
    let cid = pod.container("app").unwrap().id.clone();
    // A CronJob's pod: Job -> CronJob is the other owner walk.
    let job_pod = Pod::create(
        &cg,
        &roots,
        Flavor::Crio,
        Qos::BestEffort,
        "shop",
        "nightly-report-29012340-q8x7d",
        &["report"],
    )
    .unwrap();
    std::fs::write(dir.0.join("state.json"), json!({
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
    }).to_string()).unwrap();

    // The API server is down when the agent starts.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start(
        &dir.0,
        &[
            "--kubernetes",
            "on",
            "--kube-api-url",
            &url,
            "--node-name",
            "test-node",
            "--containerd-root",
            roots.containerd.to_str().unwrap(),
            "--crio-root",
            roots.crio.to_str().unwrap(),
        ],
    );
    let target = format!("127.0.0.1:{}", free_port());
    let e = agent.failure(dial(&target, Some(&pod.container("app").unwrap().cgroup), false).pid);
    assert_eq!(
        e["pod_uid"],
        pod.uid.as_str(),
        "the cgroup still names the pod: {e}"
    );
    assert!(
        e.get("pod").is_none() && e.get("workload").is_none(),
        "nothing guessed: {e}"
    );
    agent.wait_stderr("source=\"kubernetes\"", Duration::from_secs(15));

    // The API comes up: the agent recovers by itself and names the workload.
    let api = fake_api(&dir.0, port);
    let e = wait_for(
        "an event attributed through the API",
        Duration::from_secs(45),
        || {
            let e = agent
                .failure(dial(&target, Some(&pod.container("app").unwrap().cgroup), false).pid);
            (e["workload_source"] == "api").then_some(e)
        },
    );
    assert_eq!(e["namespace"], "shop");
    assert_eq!(e["pod"], "checkout-7d9f8c6b5-xk2lp");
    assert_eq!(
        e["container"], "app",
        "container name from the API's status"
    );
    assert_eq!(e["workload"], "checkout");
    assert_eq!(
        e["workload_kind"], "Deployment",
        "ReplicaSet walked to its Deployment"
    );
    let e = agent.failure(
        dial(
            &target,
            Some(&job_pod.container("report").unwrap().cgroup),
            false,
        )
        .pid,
    );
    assert_eq!(e["pod"], "nightly-report-29012340-q8x7d", "{e}");
    assert_eq!(e["workload"], "nightly-report", "{e}");
    assert_eq!(
        e["workload_kind"], "CronJob",
        "Job walked to its CronJob: {e}"
    );
    let log = std::fs::read_to_string(dir.0.join("api.log")).unwrap();
    let reqs: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        reqs.iter().any(|r| r["path"] == "/api/v1/pods"
            && r["query"]["fieldSelector"] == "spec.nodeName=test-node"),
        "only this node's pods: {reqs:?}"
    );

    // The API goes away mid-run: what is known stays known.
    drop(api);
    let e = agent.failure(dial(&target, Some(&pod.container("app").unwrap().cgroup), false).pid);
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
