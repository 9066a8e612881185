//! What the agent keeps of a pod from the API, and the store of this node's
//! pods that the watcher keeps up to date.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::ObjectMeta;

/// The workload a pod belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// One container's status, for timelines and native sidecars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// Runtime id without the `containerd://` prefix.
    pub container_id: Option<String>,
    pub started_at: Option<SystemTime>,
    pub ready: bool,
    pub started: Option<bool>,
    /// Declared in `initContainers`.
    pub init: bool,
    /// An init container with `restartPolicy: Always`: a native sidecar.
    pub restart_always: bool,
}

/// A container as the pod's spec declares it (statuses come later, or not
/// at all for a pending pod): what it runs, for the summaries' `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecContainer {
    pub name: String,
    /// The image as written in the spec (kept raw; bounded when used).
    pub image: Option<String>,
    /// Declared in `initContainers` (native sidecars included).
    pub init: bool,
    /// Its `lifecycle.postStart.exec.command` (bounded): how a mesh's
    /// injector holds the app until the proxy is ready.
    pub post_start: Vec<String>,
}

/// Istio's annotations on a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioAnnotations {
    pub sidecar_status: Option<String>,
    pub proxy_config: Option<String>,
    pub native_sidecar: Option<String>,
    pub rev: Option<String>,
    /// `traffic.sidecar.istio.io/includeOutboundIPRanges`,
    /// `excludeOutboundIPRanges`, `excludeOutboundPorts`: which outbound
    /// connects the pod's rules capture (kept raw; `race::istio` parses them).
    pub include_outbound_ip_ranges: Option<String>,
    pub exclude_outbound_ip_ranges: Option<String>,
    pub exclude_outbound_ports: Option<String>,
    /// Istio ambient's pod annotation and label (`race::ambient` reads them).
    pub ambient: crate::race::ambient::AmbientMarks,
}

/// What the API says about one pod of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub workload: Workload,
    pub containers: Vec<ContainerInfo>,
    pub istio: IstioAnnotations,
    /// `status.podIPs` (and `status.podIP`): never captured.
    pub pod_ips: Vec<IpAddr>,
    /// `spec.initContainers` then `spec.containers`.
    pub spec_containers: Vec<SpecContainer>,
    /// The controller's revision of the pod's template: label
    /// `pod-template-hash` (ReplicaSet), else `controller-revision-hash`
    /// (StatefulSet, DaemonSet). Kept raw; checked when used.
    pub template_hash: Option<String>,
    /// Phase `Succeeded` or `Failed`: its containers will not run again.
    pub finished: bool,
    /// The pod's annotations and labels a mesh profile may read (bounded:
    /// [`MAX_MARKS`] of each, values up to [`MAX_MARK_VALUE`] bytes; the
    /// rest, such as kubectl's last-applied configuration, is not kept).
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// The labels of the pod's namespace (bounded like the pod's own; empty
    /// when the API did not say).
    pub namespace_labels: BTreeMap<String, String>,
}

/// Annotations (and labels) kept per pod at most.
pub const MAX_MARKS: usize = 64;
/// Bytes of an annotation's (or label's) value kept at most.
pub const MAX_MARK_VALUE: usize = 4096;

/// The bounded copy of a pod's annotations or labels ([`PodInfo`]).
pub(crate) fn marks(m: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    m.into_iter()
        .flatten()
        .filter(|(k, v)| k.len() <= 253 && v.len() <= MAX_MARK_VALUE)
        .take(MAX_MARKS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl PodInfo {
    /// Takes its namespace's labels: the intents a namespace sets for its
    /// pods (Istio ambient's `istio.io/dataplane-mode`).
    pub(crate) fn set_namespace_labels(&mut self, labels: BTreeMap<String, String>) {
        self.istio.ambient.namespace_mode = labels
            .get(&crate::race::mesh::installed().ambient().label.0)
            .cloned();
        self.namespace_labels = labels;
    }

    /// The name of the container with this runtime id.
    pub(crate) fn container_name(&self, id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|c| c.container_id.as_deref() == Some(id))
            .map(|c| c.name.as_str())
    }
}

/// This node's pods by UID.
#[derive(Debug, Default)]
pub struct PodStore {
    by_uid: HashMap<String, PodInfo>,
}

impl PodStore {
    pub(crate) fn get(&self, uid: &str) -> Option<&PodInfo> {
        self.by_uid.get(uid)
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    /// Applies an update from the watcher.
    pub(crate) fn apply(&mut self, u: Update) {
        match u {
            Update::Apply(p) => {
                self.by_uid.insert(p.uid.clone(), *p);
            }
            Update::Delete(uid) => {
                self.by_uid.remove(&uid);
            }
            Update::Replace(all) => {
                self.by_uid = all.into_iter().map(|p| (p.uid.clone(), p)).collect();
            }
            Update::Error(_) | Update::Recovered => {}
        }
    }
}

/// What the watcher task sends to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Apply(Box<PodInfo>),
    Delete(String),
    /// A full relist (after start or a broken watch).
    Replace(Vec<PodInfo>),
    /// The API failed; counted as a metadata error.
    Error(String),
    /// The API answers again after an error.
    Recovered,
}

/// The controller owner reference of an object, as (kind, name).
pub(crate) fn controller_owner(meta: &ObjectMeta) -> Option<(String, String)> {
    let refs = meta.owner_references.as_ref()?;
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())
        .map(|r| (r.kind.clone(), r.name.clone()))
}

/// The owner that must be looked up to name a pod's workload: a ReplicaSet
/// (-> Deployment) or a Job (-> CronJob), as (kind, namespace, name).
pub fn owner_to_walk(pod: &Pod) -> Option<(String, String, String)> {
    let (kind, name) = controller_owner(&pod.metadata)?;
    (kind == "ReplicaSet" || kind == "Job").then(|| {
        (
            kind,
            pod.metadata.namespace.clone().unwrap_or_default(),
            name,
        )
    })
}

/// A pod's workload, given what [`owner_to_walk`]'s object is owned by:
/// ReplicaSet -> Deployment, Job -> CronJob; StatefulSet, DaemonSet and
/// others are workloads themselves; a bare pod is its own.
pub fn workload(pod: &Pod, walked: Option<(String, String)>) -> Workload {
    match (controller_owner(&pod.metadata), walked) {
        (None, _) => Workload {
            kind: "Pod".into(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        },
        (Some(_), Some((kind, name))) => Workload { kind, name },
        (Some((kind, name)), None) => Workload { kind, name },
    }
}

fn strip_runtime_prefix(id: &str) -> String {
    id.split_once("://")
        .map_or(id, |(_, rest)| rest)
        .to_string()
}

fn container_infos(pod: &Pod) -> Vec<ContainerInfo> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut out = Vec::new();
    let mut add = |statuses: Option<&Vec<ContainerStatus>>, init: bool| {
        for s in statuses.into_iter().flatten() {
            let restart_always = init
                && spec
                    .and_then(|sp| sp.init_containers.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|c| c.name == s.name && c.restart_policy.as_deref() == Some("Always"));
            out.push(ContainerInfo {
                name: s.name.clone(),
                container_id: s.container_id.as_deref().map(strip_runtime_prefix),
                started_at: s
                    .state
                    .as_ref()
                    .and_then(|st| st.running.as_ref())
                    .and_then(|r| r.started_at.as_ref())
                    .map(|t| SystemTime::from(t.0)),
                ready: s.ready,
                started: s.started,
                init,
                restart_always,
            });
        }
    };
    add(
        status.and_then(|s| s.init_container_statuses.as_ref()),
        true,
    );
    add(status.and_then(|s| s.container_statuses.as_ref()), false);
    out
}

/// The labels a controller stamps on its pods with the revision of their
/// template, in order of preference (Kubernetes' own, not a mesh's).
const TEMPLATE_HASH_LABELS: [&str; 2] = ["pod-template-hash", "controller-revision-hash"];

fn spec_containers(pod: &Pod) -> Vec<SpecContainer> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let init = spec.init_containers.iter().flatten().map(|c| (c, true));
    let main = spec.containers.iter().map(|c| (c, false));
    init.chain(main)
        .map(|(c, init)| SpecContainer {
            name: c.name.clone(),
            image: c.image.clone(),
            init,
            post_start: c
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|e| e.command.as_ref())
                .map(|cmd| {
                    cmd.iter()
                        .take(MAX_POST_START_ARGS)
                        .filter(|a| a.len() <= MAX_MARK_VALUE)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// Words of a postStart command kept (the injectors' are two or three).
const MAX_POST_START_ARGS: usize = 8;

/// Builds a [`PodInfo`] from an API object and its resolved workload.
pub fn pod_info(pod: &Pod, workload: Workload) -> Option<PodInfo> {
    let m = &pod.metadata;
    let ann = |k: &str| m.annotations.as_ref().and_then(|a| a.get(k)).cloned();
    Some(PodInfo {
        uid: m.uid.clone()?,
        namespace: m.namespace.clone()?,
        name: m.name.clone()?,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        workload,
        containers: container_infos(pod),
        istio: IstioAnnotations {
            sidecar_status: ann("sidecar.istio.io/status"),
            proxy_config: ann("proxy.istio.io/config"),
            native_sidecar: ann("sidecar.istio.io/nativeSidecar"),
            rev: ann("istio.io/rev").or_else(|| {
                m.labels
                    .as_ref()
                    .and_then(|l| l.get("istio.io/rev"))
                    .cloned()
            }),
            include_outbound_ip_ranges: ann("traffic.sidecar.istio.io/includeOutboundIPRanges"),
            exclude_outbound_ip_ranges: ann("traffic.sidecar.istio.io/excludeOutboundIPRanges"),
            exclude_outbound_ports: ann("traffic.sidecar.istio.io/excludeOutboundPorts"),
            ambient: crate::race::ambient::AmbientMarks::read(ann, |k| {
                m.labels.as_ref().and_then(|l| l.get(k)).cloned()
            }),
        },
        pod_ips: pod_ips(pod),
        spec_containers: spec_containers(pod),
        template_hash: TEMPLATE_HASH_LABELS
            .iter()
            .find_map(|k| m.labels.as_ref()?.get(*k).cloned()),
        finished: pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed"),
        annotations: marks(m.annotations.as_ref()),
        labels: marks(m.labels.as_ref()),
        namespace_labels: BTreeMap::new(),
    })
}

/// Why a pod from the API is not taken: a name longer than Kubernetes
/// allows (253 bytes, [`crate::attribute::runtime::MAX_NAME_BYTES`]). A real
/// API server never serves one; a stand-in or a proxy might, and such names
/// would be copied into every event and metric label of the pod.
pub(crate) fn oversized(p: &PodInfo) -> Option<String> {
    let max = crate::attribute::runtime::MAX_NAME_BYTES;
    let names = [
        ("uid", &p.uid),
        ("namespace", &p.namespace),
        ("name", &p.name),
        ("workload kind", &p.workload.kind),
        ("workload", &p.workload.name),
    ];
    let containers = p.containers.iter().flat_map(|c| {
        [("container", &c.name)]
            .into_iter()
            .chain(c.container_id.as_ref().map(|id| ("container id", id)))
    });
    names
        .into_iter()
        .chain(containers)
        .find(|(_, v)| v.len() > max)
        .map(|(field, v)| {
            format!(
                "pod {:.64}: {field} of {} bytes is longer than Kubernetes allows ({max}); the pod is not taken from the API",
                p.uid,
                v.len()
            )
        })
}

/// The pod's addresses from its status (`podIPs`, else `podIP`).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = st.pod_ip.as_deref().and_then(|i| i.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

/// A plain pod for unit tests elsewhere (one fixture, not one per module).
#[cfg(test)]
pub(crate) mod tests_support {
    use super::{PodInfo, Workload};

    /// Pod `shop/checkout-1` of Deployment `checkout`, nothing else set.
    pub(crate) fn pod() -> PodInfo {
        PodInfo {
            uid: "uid-1".into(),
            namespace: "shop".into(),
            name: "checkout-1".into(),
            node: None,
            workload: Workload {
                kind: "Deployment".into(),
                name: "checkout".into(),
            },
            containers: Vec::new(),
            istio: Default::default(),
            pod_ips: Vec::new(),
            spec_containers: Vec::new(),
            template_hash: None,
            finished: false,
            annotations: Default::default(),
            labels: Default::default(),
            namespace_labels: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests;
