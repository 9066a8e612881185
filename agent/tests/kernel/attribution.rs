//! Attribution against the real kernel: processes moved into kubelet-shaped
//! cgroup v2 directories, runtime-shaped metadata files, real connect()
//! failures; the agent must name namespace, pod, container and workload.

use std::net::TcpListener;

use crate::fixture::{Agent, TempDir, dial, privileged};
use connscope::{
    attribute::kubelet::Qos,
    attribute::runtime::Roots,
    testbed::pod::{Flavor, Pod, cgroup2_root},
};

/// A loopback port with nobody listening (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn pods_containers_and_workloads_from_cgroups_and_runtime_files() {
    if !privileged("pods_containers_and_workloads_from_cgroups_and_runtime_files") {
        return;
    }
    let dir = TempDir::new("attribution");
    let roots = Roots {
        containerd: dir.0.join("containerd"),
        crio: dir.0.join("crio"),
    };
    let cg = cgroup2_root().unwrap();
    let agent = Agent::start(
        &dir.0,
        &[
            "--kubernetes",
            "off",
            "--node-name",
            "test-node",
            "--containerd-root",
            roots.containerd.to_str().unwrap(),
            "--crio-root",
            roots.crio.to_str().unwrap(),
        ],
    );
    let target = format!("127.0.0.1:{}", closed_port());

    // containerd, burstable, a Deployment's pod.
    let mut shop = Pod::create(
        &cg,
        &roots,
        Flavor::Containerd,
        Qos::Burstable,
        "shop",
        "checkout-7d9f8c6b5-xk2lp",
        &["app", "istio-proxy"],
    )
    .unwrap();
    let o = dial(&target, Some(&shop.container("app").unwrap().cgroup), true);
    assert_eq!(o.error, "ECONNREFUSED");
    let e = agent.failure(o.pid);
    assert_eq!(e["node"], "test-node");
    assert_eq!(e["namespace"], "shop");
    assert_eq!(e["pod"], "checkout-7d9f8c6b5-xk2lp");
    assert_eq!(e["pod_uid"], shop.uid.as_str());
    assert_eq!(e["container"], "app");
    assert_eq!(
        e["container_id"],
        shop.container("app").unwrap().id.as_str()
    );
    assert_eq!(e["workload"], "checkout");
    assert_eq!(e["workload_kind"], "Deployment");
    assert_eq!(e["workload_source"], "derived");
    assert_eq!(e["qos"], "burstable");
    assert_eq!(
        e["phase"], "sidecar_not_ready",
        "injected pod, loopback refusal: not the race"
    );

    // CRI-O, guaranteed, a StatefulSet-shaped name: the kind is not guessed.
    let web = Pod::create(
        &cg,
        &roots,
        Flavor::Crio,
        Qos::Guaranteed,
        "prod",
        "web-0",
        &["web"],
    )
    .unwrap();
    let o = dial(&target, Some(&web.container("web").unwrap().cgroup), true);
    let e = agent.failure(o.pid);
    assert_eq!(
        (
            e["namespace"].as_str(),
            e["pod"].as_str(),
            e["container"].as_str()
        ),
        (Some("prod"), Some("web-0"), Some("web"))
    );
    assert_eq!(e["workload"], "web");
    assert!(e.get("workload_kind").is_none(), "no guessed kind: {e}");
    assert_eq!(e["qos"], "guaranteed");
    assert_eq!(e["phase"], "no_sidecar");

    // A container that lives for milliseconds: created, dials, and its
    // cgroup is removed before the agent could have walked the cgroup tree
    // (the runtime keeps its bundle until the container is deleted later).
    shop.add_container("init-job").unwrap();
    let c = shop.container("init-job").unwrap().cgroup.clone();
    let o = dial(&target, Some(&c), true);
    connscope::testbed::pod::kill_cgroup(&c);
    assert!(!c.exists());
    let e = agent.failure(o.pid);
    assert_eq!(
        e["container"], "init-job",
        "short-lived container attributed: {e}"
    );
    shop.remove_container("init-job").unwrap();

    // Broken metadata: the pod uid and container id from the cgroup path
    // are still right; names it cannot know are absent, not guessed.
    let mut broken = Pod::create(
        &cg,
        &roots,
        Flavor::Containerd,
        Qos::BestEffort,
        "x",
        "y",
        &[],
    )
    .unwrap();
    broken.add_container("z").unwrap();
    broken
        .corrupt_metadata("z", b"{\"annotations\": [")
        .unwrap();
    let o = dial(&target, Some(&broken.container("z").unwrap().cgroup), true);
    let e = agent.failure(o.pid);
    assert_eq!(e["pod_uid"], broken.uid.as_str());
    assert_eq!(e["qos"], "besteffort");
    for absent in ["pod", "namespace", "container", "workload"] {
        assert!(e.get(absent).is_none(), "{absent} must be absent: {e}");
    }

    // Not a pod at all: the cgroup path is kept, no pod fields.
    let host = cg.join(format!("connscope-host-{}.scope", std::process::id()));
    std::fs::create_dir(&host).unwrap();
    let o = dial(&target, Some(&host), true);
    connscope::testbed::pod::kill_cgroup(&host);
    let e = agent.failure(o.pid);
    assert!(e.get("pod").is_none() && e.get("pod_uid").is_none(), "{e}");
    assert_eq!(
        e["cgroup"].as_str().unwrap(),
        format!("/connscope-host-{}.scope", std::process::id())
    );
    drop((shop, web, broken));
}
