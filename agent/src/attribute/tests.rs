//! Attribution by source rank: the API, the runtimes' files, the cgroup path.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::*;
use crate::{
    k8s::{
        PodInfo, Update,
        pod::{ContainerInfo, IstioAnnotations, Workload},
    },
    kernel::decode::{Comm, Family, Kind},
    testbed::pod::{Flavor, Pod},
};

/// A node in a temp dir: a cgroup root and both runtimes' state roots.
struct Node {
    dir: PathBuf,
    cgroup: PathBuf,
    roots: runtime::Roots,
}

impl Node {
    fn new(tag: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("connscope-attr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cgroup = dir.join("cgroup");
        std::fs::create_dir_all(&cgroup).unwrap();
        let roots = runtime::Roots {
            containerd: dir.join("containerd"),
            crio: dir.join("crio"),
        };
        Node { dir, cgroup, roots }
    }

    /// A pod with kubelet-shaped cgroups and the runtime's files.
    fn pod(&self, flavor: Flavor, qos: Qos, namespace: &str, name: &str) -> Pod {
        Pod::create(
            &self.cgroup,
            &self.roots,
            flavor,
            qos,
            namespace,
            name,
            &["app"],
        )
        .unwrap()
    }

    /// A fresh attributor (empty caches) on node `node-1`, whose
    /// `/proc` fallback finds nothing.
    fn attributor(&self) -> Attributor {
        self.attributor_with(Reader::new(self.roots.clone()))
    }

    /// [`Node::attributor`] with this runtime reader.
    fn attributor_with(&self, runtime: Reader) -> Attributor {
        Attributor::new(
            Some("node-1".into()),
            Resolver::new(Some(self.cgroup.clone())),
            runtime,
            self.dir.join("no-proc"),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A refused connect from a process in this cgroup directory.
fn event(cgroup_dir: &Path) -> KernelEvent {
    KernelEvent {
        kind: Kind::ConnectFailure,
        mono_ns: 2_000_000,
        time: std::time::UNIX_EPOCH,
        start_mono_ns: Some(1_000_000),
        pid: 4242,
        tid: 4242,
        uid: 0,
        gid: 0,
        comm: Comm::from_name("app"),
        // cgroup v2 ids are the inode numbers of the directories.
        cgroup_id: Some(std::fs::metadata(cgroup_dir).unwrap().ino()),
        netns: None,
        family: Family::Inet,
        src: None,
        dst: Some("10.0.0.1:8080".parse().unwrap()),
        path: None,
        errno: 111,
        nonblocking: false,
        from_syscall: true,
        rst: true,
        context_known: true,
    }
}

fn app(pod: &Pod) -> KernelEvent {
    event(&pod.container("app").unwrap().cgroup)
}

/// What the API would say of `pod`, with names of its own: `containers`
/// are (name, runtime id).
fn api(
    pod: &Pod,
    namespace: &str,
    name: &str,
    workload: (&str, &str),
    containers: &[(&str, &str)],
) -> PodStore {
    let mut s = PodStore::default();
    s.apply(Update::Replace(vec![PodInfo {
        uid: pod.uid.clone(),
        namespace: namespace.into(),
        name: name.into(),
        node: Some("node-1".into()),
        workload: Workload {
            kind: workload.0.into(),
            name: workload.1.into(),
        },
        containers: containers
            .iter()
            .map(|(n, id)| ContainerInfo {
                name: (*n).into(),
                container_id: Some((*id).into()),
                started_at: None,
                ready: true,
                started: Some(true),
                init: false,
                restart_always: false,
            })
            .collect(),
        istio: IstioAnnotations::default(),
        pod_ips: Vec::new(),
        spec_containers: Vec::new(),
        template_hash: None,
        finished: false,
        annotations: Default::default(),
        labels: Default::default(),
        namespace_labels: Default::default(),
    }]));
    s
}

/// The fields only the cgroup path gives, whatever else is known.
fn assert_from_path(a: &Attribution, pod: &Pod, qos: Qos) {
    assert_eq!(a.node.as_deref(), Some("node-1"));
    assert_eq!(a.pod_uid.as_deref(), Some(pod.uid.as_str()));
    assert_eq!(a.qos, Some(qos));
    assert_eq!(
        a.container_id.as_deref(),
        Some(pod.container("app").unwrap().id.as_str())
    );
    assert_eq!(a.cgroup, None, "a pod's cgroup path is not repeated");
}

#[test]
fn api_beats_runtime_files_for_namespace_pod_and_workload() {
    let node = Node::new("api");
    let pod = node.pod(
        Flavor::Containerd,
        Qos::Burstable,
        "files-ns",
        "files-7d9f8c6b5-xk2lp",
    );
    let cid = pod.container("app").unwrap().id.clone();
    // The API's pod name would derive another workload: the API's own wins.
    let store = api(
        &pod,
        "api-ns",
        "api-7d9f8c6b5-xk2lp",
        ("StatefulSet", "orders"),
        &[("api-app", &cid)],
    );
    let a = node.attributor().attribute_wait(&app(&pod), Some(&store));
    assert_eq!(a.namespace.as_deref(), Some("api-ns"));
    assert_eq!(a.pod.as_deref(), Some("api-7d9f8c6b5-xk2lp"));
    assert_eq!(a.workload.as_deref(), Some("orders"));
    assert_eq!(a.workload_kind.as_deref(), Some("StatefulSet"));
    assert_eq!(a.workload_source, Some(WorkloadSource::Api));
    // The container name is the exception: the API only fills it in
    // when the runtime's files do not say (see the next test).
    assert_eq!(a.container.as_deref(), Some("app"));
    assert!(!a.sandbox);
    assert_from_path(&a, &pod, Qos::Burstable);
}

#[test]
fn api_names_the_container_only_when_runtime_files_do_not() {
    let node = Node::new("api-container");
    let pod = node.pod(
        Flavor::Containerd,
        Qos::Guaranteed,
        "shop",
        "checkout-7d9f8c6b5-xk2lp",
    );
    let cid = pod.container("app").unwrap().id.clone();
    pod.remove_metadata("app").unwrap();
    let store = api(
        &pod,
        "api-ns",
        "api-pod",
        ("Deployment", "api-workload"),
        &[("api-app", &cid)],
    );
    let a = node.attributor().attribute_wait(&app(&pod), Some(&store));
    assert_eq!(a.container.as_deref(), Some("api-app"));
    assert_eq!(a.namespace.as_deref(), Some("api-ns"));
    assert_eq!(a.pod.as_deref(), Some("api-pod"));
    assert_eq!(a.workload.as_deref(), Some("api-workload"));
    assert_eq!(a.workload_source, Some(WorkloadSource::Api));
    assert_from_path(&a, &pod, Qos::Guaranteed);

    // An API that does not list this container id: no name is guessed.
    let other = api(
        &pod,
        "api-ns",
        "api-pod",
        ("Deployment", "api-workload"),
        &[("api-app", "ffff0000ffff0000")],
    );
    let a = node.attributor().attribute_wait(&app(&pod), Some(&other));
    assert_eq!(a.container, None);
    assert_eq!(a.pod.as_deref(), Some("api-pod"));
}

#[test]
fn runtime_files_beat_cgroup_path_and_name_the_derived_workload() {
    let node = Node::new("files");
    for flavor in [Flavor::Containerd, Flavor::Crio] {
        let pod = node.pod(flavor, Qos::BestEffort, "shop", "checkout-7d9f8c6b5-xk2lp");
        // No API at all, and an API that does not know the pod.
        let empty = PodStore::default();
        for store in [None, Some(&empty)] {
            let a = node.attributor().attribute_wait(&app(&pod), store);
            assert_eq!(a.namespace.as_deref(), Some("shop"), "{flavor:?}");
            assert_eq!(a.pod.as_deref(), Some("checkout-7d9f8c6b5-xk2lp"));
            assert_eq!(a.container.as_deref(), Some("app"));
            assert_eq!(a.workload.as_deref(), Some("checkout"));
            assert_eq!(a.workload_kind.as_deref(), Some("Deployment"));
            assert_eq!(a.workload_source, Some(WorkloadSource::Derived));
            assert_from_path(&a, &pod, Qos::BestEffort);
        }
    }
}

#[test]
fn runtime_files_give_the_pod_s_images_and_proxy_version() {
    let node = Node::new("revision");
    for flavor in [Flavor::Containerd, Flavor::Crio] {
        let pod = Pod::create(
            &node.cgroup,
            &node.roots,
            flavor,
            Qos::Burstable,
            "shop",
            "checkout-7d9f8c6b5-xk2lp",
            &["app", "istio-proxy"],
        )
        .unwrap();
        let mut who = node.attributor();
        let mut rejected = Vec::new();
        assert_eq!(
            who.runtime_revision(&pod.uid, &mut rejected),
            None,
            "pod not seen yet"
        );
        who.attribute_wait(&app(&pod), None);
        // Only what the containers' own events had read: the proxy did
        // nothing yet.
        let r = who.runtime_revision(&pod.uid, &mut rejected).unwrap();
        assert_eq!((r.app_images.len(), r.proxy_image), (1, None));
        let proxy = event(&pod.container("istio-proxy").unwrap().cgroup);
        who.attribute_wait(&proxy, None);
        let rev = who.runtime_revision(&pod.uid, &mut rejected).unwrap();
        assert_eq!(
            serde_json::to_value(&rev).unwrap(),
            serde_json::json!({
                "app_images": {"app": crate::testbed::pod::image("shop", "app")},
                "proxy_image": crate::testbed::pod::PROXY_IMAGE,
                "proxy_version": "1.22.3",
                "node": "node-1",
                "source": "runtime"
            }),
            "{flavor:?}"
        );
        assert!(rejected.is_empty(), "{rejected:?}");
    }
}

#[test]
fn cgroup_path_pod_uid_beats_runtime_files() {
    let node = Node::new("uid");
    let pod = node.pod(Flavor::Containerd, Qos::Burstable, "shop", "web-0");
    let files = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "shop",
        "io.kubernetes.cri.sandbox-uid": "99999999-9999-9999-9999-999999999999",
    }});
    pod.corrupt_metadata("app", files.to_string().as_bytes())
        .unwrap();
    let a = node.attributor().attribute_wait(&app(&pod), None);
    assert_eq!(a.pod.as_deref(), Some("web-0"), "the files were read");
    assert_from_path(&a, &pod, Qos::Burstable);
}

#[test]
fn an_incomplete_answer_stands_only_while_what_it_lacks_cannot_appear() {
    let node = Node::new("incomplete");
    let pod = node.pod(Flavor::Containerd, Qos::Burstable, "shop", "web-0");
    pod.remove_metadata("app").unwrap();
    let mut runtime = Reader::new(node.roots.clone());
    runtime.negative_ttl = std::time::Duration::from_millis(300);
    let mut who = node.attributor_with(runtime);
    let ev = app(&pod);
    let first = who.attribute_wait(&ev, None);
    assert_eq!(first.pod, None, "no bundle yet");
    // While the absence is cached, every event gets the same answer
    // without building it again.
    let again = who.attribute(&ev, None).expect("cached");
    assert!(Arc::ptr_eq(&first, &again));
    let files = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "shop",
        "io.kubernetes.cri.sandbox-uid": pod.uid,
    }});
    pod.corrupt_metadata("app", files.to_string().as_bytes())
        .unwrap();
    // Once the absence expires, the bundle is read again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let named = loop {
        let a = who.attribute_wait(&ev, None);
        if a.pod.is_some() || std::time::Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(named.pod.as_deref(), Some("web-0"));
    assert_eq!(named.container.as_deref(), Some("app"));
    // An API change drops incomplete answers at once.
    pod.remove_metadata("app").unwrap();
    let mut bare = node.attributor();
    let before = bare.attribute_wait(&ev, None);
    bare.invalidate();
    let after = bare.attribute_wait(&ev, None);
    assert!(!Arc::ptr_eq(&before, &after));
}

#[test]
fn cgroup_path_alone_names_no_pod() {
    let node = Node::new("path");
    let pod = node.pod(
        Flavor::Crio,
        Qos::Burstable,
        "shop",
        "checkout-7d9f8c6b5-xk2lp",
    );
    pod.remove_metadata("app").unwrap();
    let empty = PodStore::default();
    for store in [None, Some(&empty)] {
        let a = node.attributor().attribute_wait(&app(&pod), store);
        assert_from_path(&a, &pod, Qos::Burstable);
        assert_eq!(a.namespace, None);
        assert_eq!(a.pod, None);
        assert_eq!(a.container, None);
        assert_eq!(a.workload, None);
        assert_eq!(a.workload_kind, None);
        assert_eq!(a.workload_source, None);
        assert!(!a.sandbox);
    }
    // The pod-level cgroup: no container id either.
    let a = node.attributor().attribute_wait(&event(&pod.cgroup), None);
    assert_eq!(a.pod_uid.as_deref(), Some(pod.uid.as_str()));
    assert_eq!(
        (a.container_id.as_deref(), a.container.as_deref()),
        (None, None)
    );
    assert_eq!(a.pod, None);
}

#[test]
fn derived_workload_kind_only_when_the_name_leaves_no_doubt() {
    let node = Node::new("derived");
    for (name, workload) in [
        ("web-0", "web"),
        ("fluentd-x7k2p", "fluentd"),
        ("solo", "solo"),
    ] {
        let pod = node.pod(Flavor::Containerd, Qos::Burstable, "shop", name);
        let a = node.attributor().attribute_wait(&app(&pod), None);
        assert_eq!(a.workload.as_deref(), Some(workload), "{name}");
        assert_eq!(a.workload_kind, None, "{name}: kind not guessed");
        assert_eq!(a.workload_source, Some(WorkloadSource::Derived));
    }
}

#[test]
fn sandbox_container_has_no_container_name() {
    let node = Node::new("sandbox");
    let pod = node.pod(Flavor::Containerd, Qos::Burstable, "shop", "web-0");
    let cid = pod.container("app").unwrap().id.clone();
    let files = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.container-name": "POD",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "shop",
    }});
    pod.corrupt_metadata("app", files.to_string().as_bytes())
        .unwrap();
    let a = node.attributor().attribute_wait(&app(&pod), None);
    assert!(a.sandbox);
    assert_eq!(a.container, None);
    assert_eq!(a.pod.as_deref(), Some("web-0"));
    assert_eq!(a.container_id.as_deref(), Some(cid.as_str()));
}

/// A kubelet-shaped container cgroup under a kind node's prefix (the
/// node's own container cgroup, kubelet's `kubelet.slice` root): over
/// 255 bytes. Its directory, pod uid and container id.
pub(crate) fn kind_cgroup(root: &Path) -> (PathBuf, String, String) {
    let uid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
    let cid = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
    let node = "9".repeat(64);
    let dir = root.join(format!(
        "system.slice/docker-{node}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
        uid.replace('-', "_")
    ));
    (dir, uid.into(), cid.into())
}

#[test]
fn a_cgroup_path_the_kernel_record_cut_is_resolved_from_the_file_system() {
    let node = Node::new("cut");
    let (dir, uid, cid) = kind_cgroup(&node.cgroup);
    std::fs::create_dir_all(&dir).unwrap();
    let rel = format!("/{}", dir.strip_prefix(&node.cgroup).unwrap().display());
    assert!(rel.len() > 255, "{}", rel.len());
    let cfg = node.roots.containerd.join("k8s.io").join(&cid);
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.json"),
        serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.sandbox-namespace": "shop",
        }})
        .to_string(),
    )
    .unwrap();
    let ev = event(&dir);
    let id = ev.cgroup_id.unwrap();
    let mut who = node.attributor();
    // What the kernel record holds: the first 255 bytes.
    let cut = crate::kernel::decode::CgroupChange {
        created: true,
        id,
        path: rel[..255].to_string(),
        truncated: true,
    };
    assert_eq!(who.cgroup_changed(cut.clone()), None);
    let walks = who.cgroups().walks;
    let a = who.attribute_wait(&ev, None);
    assert_eq!(who.cgroups().walks, walks, "found at the record, no walk");
    assert_eq!(a.pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(a.container_id.as_deref(), Some(cid.as_str()));
    assert_eq!(a.container.as_deref(), Some("app"));
    assert_eq!(a.pod.as_deref(), Some("web-0"));
    assert_eq!(who.rejected.get(&("kernel", "cgroup_path")), Some(&1));
    // Removed with a cut path: the pod's container is forgotten by its
    // full path, no pod is taken for gone.
    let gone = crate::kernel::decode::CgroupChange {
        created: false,
        ..cut
    };
    assert_eq!(who.cgroup_changed(gone), None);
    // A cut record of a cgroup already gone never names a path.
    let mut fresh = node.attributor();
    std::fs::remove_dir(&dir).unwrap();
    let stale = crate::kernel::decode::CgroupChange {
        created: true,
        id,
        path: rel[..255].to_string(),
        truncated: true,
    };
    fresh.cgroup_changed(stale);
    assert_eq!(fresh.cgroups().known(id), None);
}

#[test]
fn non_kubelet_cgroup_keeps_its_path_and_guesses_nothing() {
    let node = Node::new("host");
    let svc = node.cgroup.join("system.slice/sshd.service");
    std::fs::create_dir_all(&svc).unwrap();
    let ev = event(&svc);
    let a = node.attributor().attribute_wait(&ev, None);
    assert_eq!(
        *a,
        Attribution {
            node: Some("node-1".into()),
            cgroup: Some("/system.slice/sshd.service".into()),
            ..Default::default()
        }
    );
    // Without a node name, nothing at all but the path.
    let mut who = Attributor::new(
        None,
        Resolver::new(Some(node.cgroup.clone())),
        Reader::new(node.roots.clone()),
        node.dir.join("no-proc"),
    );
    let a = who.attribute_wait(&ev, None);
    assert_eq!(a.node, None);
    assert_eq!(a.cgroup.as_deref(), Some("/system.slice/sshd.service"));
}

/// A bundle read that takes a second.
fn slow_read(p: &Path) -> Result<Option<Vec<u8>>, runtime::MetaError> {
    std::thread::sleep(std::time::Duration::from_secs(1));
    runtime::read_bounded(p)
}

/// A read given up for its slowness, then finished: the next event has
/// the pod's names at once, not after the failure's 30 s.
#[test]
fn a_read_given_up_that_finishes_completes_the_answer_at_once() {
    let node = Node::new("late");
    let pod = node.pod(Flavor::Containerd, Qos::Burstable, "shop", "web-0");
    let mut runtime = Reader::with_read(node.roots.clone(), slow_read);
    runtime.timeout = std::time::Duration::from_millis(100);
    let mut who = node.attributor_with(runtime);
    let ev = app(&pod);
    assert!(who.attribute(&ev, None).is_none(), "being read");
    std::thread::sleep(std::time::Duration::from_millis(150));
    who.expire_metadata(false);
    let given_up = who.attribute(&ev, None).expect("given up");
    assert_eq!(given_up.pod, None);
    let again = who.attribute(&ev, None).expect("given up");
    assert!(Arc::ptr_eq(&given_up, &again), "cached meanwhile");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let named = loop {
        let a = who.attribute(&ev, None).unwrap();
        if a.pod.is_some() || std::time::Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(named.pod.as_deref(), Some("web-0"));
}
