//! Attribution against the real kernel: processes moved into kubelet-shaped
//! cgroup v2 directories, runtime-shaped metadata files, real connect()
//! failures; the agent must name namespace, pod, container and workload.
//!
//! Why: an event is only as useful as the names on it. Shares the machine:
//! it reads only the failures of its own dialers (by pid).

use connscope::{
    attribute::kubelet::Qos,
    testbed::pod::{Flavor, kill_cgroup},
};

use crate::fixture::{Node, assert_absent, assert_fields, closed_target, dial, dial_in};

#[test]
fn pods_containers_and_workloads_from_cgroups_and_runtime_files() {
    let Some(node) = Node::shared() else { return };
    let agent = node.agent(&[]);
    let target = closed_target();

    // containerd, burstable, a Deployment's pod.
    let mut shop = node.containerd_pod("shop/checkout-7d9f8c6b5-xk2lp", &["app", "istio-proxy"]);
    let o = dial_in(&shop, "app", &target, true);
    assert_eq!(o.error, "ECONNREFUSED");
    let e = agent.failure(o.pid);
    assert_fields(
        &e,
        &[
            ("node", "test-node"),
            ("namespace", "shop"),
            ("pod", "checkout-7d9f8c6b5-xk2lp"),
            ("pod_uid", &shop.uid),
            ("container", "app"),
            ("container_id", &shop.container("app").unwrap().id),
            ("workload", "checkout"),
            ("workload_kind", "Deployment"),
            ("workload_source", "derived"),
            ("qos", "burstable"),
        ],
    );
    assert_eq!(
        e["phase"], "sidecar_not_ready",
        "injected pod, loopback refusal: not the race"
    );

    // CRI-O, guaranteed, a StatefulSet-shaped name: the kind is not guessed.
    let web = node.pod(Flavor::Crio, Qos::Guaranteed, "prod/web-0", &["web"]);
    let e = agent.failure(dial_in(&web, "web", &target, true).pid);
    assert_fields(
        &e,
        &[
            ("namespace", "prod"),
            ("pod", "web-0"),
            ("container", "web"),
            ("workload", "web"),
            ("qos", "guaranteed"),
            ("phase", "no_sidecar"),
        ],
    );
    assert_absent(&e, &["workload_kind"]);

    // A container that lives for milliseconds: created, dials, and its
    // cgroup is removed before the agent could have walked the cgroup tree
    // (the runtime keeps its bundle until the container is deleted later).
    shop.add_container("init-job").unwrap();
    let c = shop.container("init-job").unwrap().cgroup.clone();
    let o = dial(&target, Some(&c), true);
    kill_cgroup(&c);
    assert!(!c.exists());
    let e = agent.failure(o.pid);
    assert_eq!(
        e["container"], "init-job",
        "short-lived container attributed: {e}"
    );
    shop.remove_container("init-job").unwrap();

    // Broken metadata: the pod uid and container id from the cgroup path
    // are still right; names it cannot know are absent, not guessed.
    let mut broken = node.pod(Flavor::Containerd, Qos::BestEffort, "x/y", &[]);
    broken.add_container("z").unwrap();
    broken
        .corrupt_metadata("z", b"{\"annotations\": [")
        .unwrap();
    let e = agent.failure(dial_in(&broken, "z", &target, true).pid);
    assert_fields(&e, &[("pod_uid", &broken.uid), ("qos", "besteffort")]);
    assert_absent(&e, &["pod", "namespace", "container", "workload"]);

    // Not a pod at all: the cgroup path is kept, no pod fields.
    let scope = format!("connscope-host-{}.scope", std::process::id());
    let host = node.cgroup_root.join(&scope);
    std::fs::create_dir(&host).unwrap();
    let o = dial(&target, Some(&host), true);
    kill_cgroup(&host);
    let e = agent.failure(o.pid);
    assert_absent(&e, &["pod", "pod_uid"]);
    assert_eq!(e["cgroup"].as_str().unwrap(), format!("/{scope}"));
    drop((shop, web, broken));
}
