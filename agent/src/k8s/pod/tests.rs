//! Tests of the API's pods: marks, workloads, bounds.

use super::*;

#[test]
fn names_longer_than_kubernetes_allows_refuse_the_pod() {
    let w = Workload {
        kind: "Deployment".into(),
        name: "checkout".into(),
    };
    let mut p = pod_info(&sample(), w).unwrap();
    assert_eq!(oversized(&p), None);
    p.containers[0].name = "c".repeat(300);
    assert!(oversized(&p).unwrap().contains("container of 300 bytes"));
    p.containers.clear();
    p.name = "n".repeat(3_000_000);
    let why = oversized(&p).unwrap();
    assert!(
        why.contains("name of 3000000 bytes") && why.len() < 300,
        "{why}"
    );
}

fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).unwrap()
}

fn sample() -> Pod {
    pod(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "checkout-7d9f8c6b5-xk2lp", "namespace": "shop",
            "uid": "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
            "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
                            "proxy.istio.io/config": "{\"holdApplicationUntilProxyStarts\":true}",
                            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12",
                            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"},
            "labels": {"istio.io/rev": "1-27", "pod-template-hash": "7d9f8c6b5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-7d9f8c6b5",
                                 "uid": "x", "controller": true}]
        },
        "spec": {"nodeName": "node-1",
                 "containers": [{"name": "app", "image": "registry.example/shop/checkout:1.4.2"}],
                 "initContainers": [{"name": "istio-proxy", "restartPolicy": "Always",
                                     "image": "docker.io/istio/proxyv2:1.22.3"}]},
        "status": {
            "podIP": "10.1.2.3",
            "podIPs": [{"ip": "10.1.2.3"}, {"ip": "fd00::3"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "i", "imageID": "",
                "containerID": "containerd://abc123", "started": true,
                "state": {"running": {"startedAt": "2026-01-02T03:04:05Z"}}}],
            "initContainerStatuses": [{"name": "istio-proxy", "ready": true, "restartCount": 0, "image": "i",
                "imageID": "", "containerID": "containerd://def456", "started": true,
                "state": {"running": {"startedAt": "2026-01-02T03:04:01Z"}}}]
        }
    }))
}

#[test]
fn replicaset_resolves_to_deployment() {
    let p = sample();
    assert_eq!(
        owner_to_walk(&p),
        Some((
            "ReplicaSet".into(),
            "shop".into(),
            "checkout-7d9f8c6b5".into()
        ))
    );
    let w = workload(&p, Some(("Deployment".into(), "checkout".into())));
    assert_eq!(
        w,
        Workload {
            kind: "Deployment".into(),
            name: "checkout".into()
        }
    );
}

#[test]
fn unresolvable_owner_is_itself_and_bare_pod_is_pod() {
    assert_eq!(workload(&sample(), None).kind, "ReplicaSet");
    let mut bare = sample();
    bare.metadata.owner_references = None;
    assert_eq!(owner_to_walk(&bare), None);
    assert_eq!(
        workload(&bare, None),
        Workload {
            kind: "Pod".into(),
            name: "checkout-7d9f8c6b5-xk2lp".into()
        }
    );
}

#[test]
fn pod_info_keeps_istio_and_native_sidecar() {
    let p = pod_info(
        &sample(),
        Workload {
            kind: "Deployment".into(),
            name: "checkout".into(),
        },
    )
    .unwrap();
    assert_eq!(p.container_name("abc123"), Some("app"));
    let proxy = p
        .containers
        .iter()
        .find(|c| c.name == "istio-proxy")
        .unwrap();
    assert!(proxy.init && proxy.restart_always && proxy.ready);
    assert_eq!(p.istio.rev.as_deref(), Some("1-27"));
    assert!(
        p.istio
            .proxy_config
            .unwrap()
            .contains("holdApplicationUntilProxyStarts")
    );
    assert_eq!(p.node.as_deref(), Some("node-1"));
    assert_eq!(
        p.pod_ips,
        vec![
            "10.1.2.3".parse::<IpAddr>().unwrap(),
            "fd00::3".parse().unwrap()
        ]
    );
    assert_eq!(
        p.istio.exclude_outbound_ip_ranges.as_deref(),
        Some("10.96.0.0/12")
    );
    assert_eq!(p.istio.exclude_outbound_ports.as_deref(), Some("5432"));
    assert_eq!(p.istio.include_outbound_ip_ranges, None);
    assert_eq!(p.template_hash.as_deref(), Some("7d9f8c6b5"));
    assert_eq!(
        p.spec_containers,
        [
            SpecContainer {
                name: "istio-proxy".into(),
                image: Some("docker.io/istio/proxyv2:1.22.3".into()),
                init: true,
                post_start: Vec::new(),
            },
            SpecContainer {
                name: "app".into(),
                image: Some("registry.example/shop/checkout:1.4.2".into()),
                init: false,
                post_start: Vec::new(),
            },
        ]
    );
}

#[test]
fn a_statefulset_s_revision_is_its_controller_revision_hash() {
    let mut p = sample();
    p.metadata.labels = Some(
        [(
            "controller-revision-hash".to_string(),
            "web-6c5d9f".to_string(),
        )]
        .into(),
    );
    let w = Workload {
        kind: "StatefulSet".into(),
        name: "web".into(),
    };
    assert_eq!(
        pod_info(&p, w.clone()).unwrap().template_hash.as_deref(),
        Some("web-6c5d9f")
    );
    p.metadata.labels = None;
    assert_eq!(pod_info(&p, w).unwrap().template_hash, None);
}

#[test]
fn store_apply_delete_replace() {
    let p = pod_info(
        &sample(),
        Workload {
            kind: "Pod".into(),
            name: "x".into(),
        },
    )
    .unwrap();
    let mut s = PodStore::default();
    s.apply(Update::Apply(Box::new(p.clone())));
    assert!(s.get(&p.uid).is_some());
    s.apply(Update::Delete(p.uid.clone()));
    assert!(s.is_empty());
    s.apply(Update::Replace(vec![p.clone()]));
    assert_eq!(s.len(), 1);
}
