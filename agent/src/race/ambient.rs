//! Istio ambient enrollment: whether each ambient pod is served by ztunnel,
//! from ztunnel's listeners in the pod's network namespace.
//!
//! An ambient pod has no sidecar. istio-cni redirects its traffic inside its
//! netns, and ztunnel (a pod of its own) listens there: it makes each socket
//! inside the pod's netns and binds and listens from its own (istio/ztunnel
//! `src/inpod/netns.rs`). The kernel reports those listeners with the
//! socket's own netns (see `agent-ebpf` `sock_netns`), so listeners are
//! keyed here by netns, never by cgroup, and a pod finds its own through the
//! netns its processes run in. A pod the API marks ambient that has no
//! HBONE listener (15008) for longer than the grace period is reported:
//! enrollment `lost` (it had one; istio/istio#61182) or `never`.
//!
//! The kernel alone shows that a pod is enrolled, never that it should be:
//! only pods the API marks ambient are ever reported unenrolled.
//!
//! Everything that is Istio's own is data: [`AmbientProfile`], the
//! `ambient` table of the `istio` mesh profile.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::Phase;
use crate::{
    attribute::Attribution,
    k8s::PodInfo,
    kernel::decode::{Family, KernelEvent, Kind},
};

const ECONNREFUSED: i32 = 111;
/// Network namespaces whose listeners are kept at most.
const MAX_NETNS: usize = 16_384;
/// Pods kept at most (a node runs a few hundred).
const MAX_PODS: usize = 20_000;

/// What is a mesh's own about its node-proxy mode, as data: the `ambient`
/// table of its profile (`mesh/profiles.toml`, which cites Istio's sources).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmbientProfile {
    /// `mesh` of ambient pods' lines.
    pub mesh: Arc<str>,
    /// The node proxy's HBONE inbound port: enrolled = it listens in the
    /// pod's netns.
    pub inbound_port: u16,
    /// Its plaintext inbound port.
    pub plaintext_port: u16,
    /// Its outbound capture port: app connects are refused until it listens.
    pub outbound_port: u16,
    /// Process name of the node proxy.
    pub comm: String,
    /// Pod annotation (key, value) of the actual state.
    pub annotation: (String, String),
    /// Pod (or namespace) label (key, value) of the intent.
    pub label: (String, String),
    /// The label value that opts a pod out.
    pub opt_out: String,
    /// What to do about a pod whose enrollment was lost.
    pub recommendation_lost: String,
    /// What to do about a pod that was never enrolled.
    pub recommendation_never: String,
}

impl AmbientProfile {
    /// ztunnel's ports, inbound first.
    pub fn ports(&self) -> [u16; 3] {
        [self.inbound_port, self.plaintext_port, self.outbound_port]
    }

    /// Whether the API marks the pod ambient: the redirection annotation,
    /// or the label on the pod, else on its namespace; the pod's label
    /// `none` opts it out of a namespace's ambient mode. None: the API says
    /// nothing of ambient.
    pub fn marks_ambient(&self, m: &AmbientMarks) -> Option<bool> {
        if m.dataplane_mode.as_deref() == Some(self.opt_out.as_str()) {
            return Some(false);
        }
        let annotated = m.redirection.as_deref() == Some(self.annotation.1.as_str());
        let mode = m.dataplane_mode.as_deref().or(m.namespace_mode.as_deref());
        let labelled = mode == Some(self.label.1.as_str());
        (annotated || labelled).then_some(true)
    }
}

/// The pod's ambient annotation and label, and its namespace's label, as
/// the API gives them (raw). Read with the default profile's keys; the
/// namespace's when the pod is seen (cached a minute).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmbientMarks {
    pub redirection: Option<String>,
    pub dataplane_mode: Option<String>,
    /// The namespace's `istio.io/dataplane-mode`.
    pub namespace_mode: Option<String>,
}

impl AmbientMarks {
    /// From a pod's annotations and labels.
    pub fn read(
        annotation: impl Fn(&str) -> Option<String>,
        label: impl Fn(&str) -> Option<String>,
    ) -> AmbientMarks {
        let p = crate::race::mesh::installed().ambient();
        AmbientMarks {
            redirection: annotation(&p.annotation.0),
            dataplane_mode: label(&p.label.0),
            namespace_mode: None,
        }
    }
}

/// The enrollment of an ambient pod, `state` of its summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Enrollment {
    /// ztunnel's HBONE listener is in the pod's netns.
    Enrolled,
    /// It was, and has been gone for longer than the grace period.
    Lost,
    /// It never was, for longer than the grace period.
    Never,
}

impl Enrollment {
    /// Label value (metrics) and `state` of the line.
    pub fn as_str(self) -> &'static str {
        match self {
            Enrollment::Enrolled => "enrolled",
            Enrollment::Lost => "lost",
            Enrollment::Never => "never",
        }
    }
}

/// An ambient pod's enrollment changed (`ambient_enrollment` line).
#[derive(Debug, Clone, Serialize)]
pub struct AmbientEnrollment {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    pub mesh: Arc<str>,
    pub state: Enrollment,
    /// The pod's network namespace.
    pub netns: u32,
    /// When ztunnel's HBONE listener closed (state `lost`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_mono_ns: Option<u64>,
    /// Since when the pod has been known ambient without that listener
    /// (state `never`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_mono_ns: Option<u64>,
    /// Seconds without the listener when reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unenrolled_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<String>,
}

/// ztunnel's listeners in one network namespace.
#[derive(Debug, Default)]
struct Listeners {
    /// Open sockets by port.
    open: HashMap<u16, u32>,
    /// First LISTEN by port.
    first: HashMap<u16, u64>,
    /// When the port's last socket closed (absent while open).
    closed: HashMap<u16, u64>,
}

impl Listeners {
    fn listening(&self, port: u16) -> bool {
        self.open.get(&port).is_some_and(|&n| n > 0)
    }

    /// Listening over all of `[from, to]` (kernel times).
    fn listening_over(&self, port: u16, from: u64, to: u64) -> bool {
        self.first.get(&port).is_some_and(|&f| f <= from)
            && self.closed.get(&port).is_none_or(|&c| c > to)
            && (self.listening(port) || self.closed.contains_key(&port))
    }
}

/// What is known of one pod.
#[derive(Debug, Default)]
struct Pod {
    who: Option<Arc<Attribution>>,
    /// The API marks it ambient (Some(true)), or not.
    api: Option<bool>,
    /// The API says it has a sidecar (a sidecar wins over ambient).
    sidecar: bool,
    ips: Vec<IpAddr>,
    netns: Option<u32>,
    /// When it was first known ambient with a known netns.
    since_ns: Option<u64>,
    /// The last state reported.
    state: Option<Enrollment>,
    /// Since when its netns has had no HBONE listener (None: it has one).
    unlistened_ns: Option<u64>,
}

impl Pod {
    fn ambient(&self) -> bool {
        self.api == Some(true) && !self.sidecar
    }
}

/// Ambient enrollment of the node's pods.
#[derive(Debug, Default)]
pub(super) struct Ambient {
    netns: rustc_hash::FxHashMap<u32, Listeners>,
    pods: rustc_hash::FxHashMap<String, Pod>,
    /// Latest tracker time seen (kernel monotonic ns).
    now_ns: u64,
    /// The unenrolled set changed since the gauge was last sent.
    gauge_dirty: bool,
}

impl Ambient {
    /// Takes in a kernel event before the pod handlers: ztunnel's listeners
    /// by their socket's netns, and the netns of each pod's own processes.
    pub(super) fn observe(&mut self, ev: &KernelEvent, who: &Attribution, p: &AmbientProfile) {
        self.now_ns = self.now_ns.max(ev.mono_ns);
        let Some(ns) = ev.netns else { return };
        let port = ev.src.map_or(0, |a| a.port());
        match ev.kind {
            Kind::Listen | Kind::ListenClose
                if ev.context_known && ev.comm.is(&p.comm) && p.ports().contains(&port) =>
            {
                self.listener(ns, port, ev.kind == Kind::Listen, ev.mono_ns);
            }
            // The pod's own processes run in its netns (ztunnel's dials do
            // not: they are attributed to their destination pod).
            Kind::Exec | Kind::ConnectFailure if ev.context_known && !ev.comm.is(&p.comm) => {
                if let Some(uid) = who.pod_uid.as_deref() {
                    self.pod_netns(uid, ns, ev.mono_ns);
                }
            }
            _ => {}
        }
        if let Some(uid) = who.pod_uid.as_deref()
            && let Some(pod) = self.pods.get_mut(uid)
            && who.pod.is_some()
            && pod.who.as_ref().is_none_or(|w| w.pod.is_none())
        {
            pod.who = Some(pod_level(who));
        }
    }

    fn listener(&mut self, ns: u32, port: u16, up: bool, t: u64) {
        if !self.netns.contains_key(&ns) && self.netns.len() >= MAX_NETNS {
            self.prune();
            if self.netns.len() >= MAX_NETNS {
                return;
            }
        }
        let l = self.netns.entry(ns).or_default();
        let n = l.open.entry(port).or_default();
        if up {
            *n += 1;
            l.first.entry(port).or_insert(t);
            l.closed.remove(&port);
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                l.closed.insert(port, t);
            }
        }
    }

    /// Forgets namespaces no pod is in and nothing listens in.
    fn prune(&mut self) {
        let used: std::collections::HashSet<u32> =
            self.pods.values().filter_map(|p| p.netns).collect();
        self.netns
            .retain(|ns, l| used.contains(ns) || l.open.values().any(|&n| n > 0));
    }

    fn pod_netns(&mut self, uid: &str, ns: u32, t: u64) {
        if !self.pods.contains_key(uid) && self.pods.len() >= MAX_PODS {
            return;
        }
        let pod = self.pods.entry(uid.to_string()).or_default();
        if pod.netns != Some(ns) {
            // A new netns (a new sandbox): its listeners are its own, none
            // known yet.
            pod.netns = Some(ns);
            pod.unlistened_ns = Some(t);
            if pod.ambient() {
                pod.since_ns.get_or_insert(t);
            }
        }
    }

    /// What the API says of a pod (every update of it).
    pub(super) fn api(&mut self, p: &PodInfo, profile: &AmbientProfile) {
        if p.finished {
            self.forget(&p.uid);
            return;
        }
        let api = profile.marks_ambient(&p.istio.ambient);
        let sidecar = p.istio.sidecar_status.is_some();
        if api != Some(true) && !self.pods.contains_key(&p.uid) {
            return;
        }
        let now = self.now_ns;
        let pod = self.pods.entry(p.uid.clone()).or_default();
        pod.api = api;
        pod.sidecar = sidecar;
        pod.ips = p.pod_ips.clone();
        if pod.who.is_none() {
            pod.who = Some(Arc::new(Attribution {
                node: p.node.clone(),
                namespace: Some(p.namespace.clone()),
                pod: Some(p.name.clone()),
                pod_uid: Some(p.uid.clone()),
                workload: Some(p.workload.name.clone()),
                workload_kind: Some(p.workload.kind.clone()),
                ..Attribution::default()
            }));
        }
        if pod.ambient() && pod.netns.is_some() {
            pod.since_ns.get_or_insert(now);
        }
        if !pod.ambient() && pod.state.take().is_some() {
            self.gauge_dirty = true;
        }
    }

    /// A pod restored at agent start: its netns, and the ports listening
    /// there (from `/proc/<pid>/net/tcp*`).
    pub(super) fn restore(
        &mut self,
        ns: u32,
        uids: &[Arc<Attribution>],
        ports: &[u16],
        now_ns: u64,
        p: &AmbientProfile,
    ) {
        self.now_ns = self.now_ns.max(now_ns);
        for &port in ports.iter().filter(|port| p.ports().contains(port)) {
            // Listening since before the agent: as of time 0.
            self.listener(ns, port, true, 0);
        }
        for who in uids {
            if let Some(uid) = who.pod_uid.as_deref() {
                self.pod_netns(uid, ns, now_ns);
                if let Some(pod) = self.pods.get_mut(uid) {
                    pod.who = Some(pod_level(who));
                }
            }
        }
    }

    /// The pod is gone (its cgroup removed, or deleted from the API).
    pub(super) fn forget(&mut self, uid: &str) {
        if let Some(pod) = self.pods.remove(uid)
            && matches!(pod.state, Some(Enrollment::Lost | Enrollment::Never))
        {
            self.gauge_dirty = true;
        }
    }

    /// Phase of an ambient pod's own connect failure (None: not ambient):
    /// like the sidecar's, against ztunnel's outbound listener in the pod's
    /// netns. Only connects the in-pod rules redirect (not loopback, not
    /// the pod's own address) can be refused by a missing listener.
    pub(super) fn classify(
        &self,
        uid: &str,
        ev: &KernelEvent,
        p: &AmbientProfile,
    ) -> Option<Phase> {
        let pod = self.pods.get(uid)?;
        let ns = ev.netns.or(pod.netns)?;
        if !self.in_mesh(pod, ns, p) {
            return None;
        }
        let empty = Listeners::default();
        let l = self.netns.get(&ns).unwrap_or(&empty);
        let port = p.outbound_port;
        let t = ev.mono_ns;
        let refused = ev.errno == ECONNREFUSED
            && matches!(ev.family, Family::Inet | Family::Inet6)
            && ev
                .dst
                .is_some_and(|d| !d.ip().is_loopback() && Some(d.ip()) != ev.src.map(|s| s.ip()));
        let start = if refused {
            ev.start_mono_ns.filter(|&s| s <= t).unwrap_or(t)
        } else {
            t
        };
        Some(if l.listening_over(port, start, t) {
            Phase::SidecarReady
        } else if !refused {
            Phase::SidecarNotReady
        } else if l.closed.get(&port).is_some_and(|&c| t >= c)
            && l.first.get(&port).is_some_and(|&f| start >= f)
        {
            Phase::ShutdownRace
        } else {
            Phase::StartupRace
        })
    }

    /// A refusal by ztunnel dialing HBONE (15008) of a pod of this node:
    /// that pod's attribution (the refusal is its missing listener).
    pub(super) fn hbone_destination(
        &self,
        ev: &KernelEvent,
        p: &AmbientProfile,
    ) -> Option<Arc<Attribution>> {
        if ev.kind != Kind::ConnectFailure || !ev.context_known || !ev.comm.is(&p.comm) {
            return None;
        }
        let dst = ev.dst.filter(|d| d.port() == p.inbound_port)?;
        self.pods
            .values()
            .find(|pod| pod.ips.contains(&dst.ip()))
            .and_then(|pod| pod.who.clone())
    }

    /// Whether a pod is in ambient mode: the API says so, or (the API
    /// silent) ztunnel has listened in its netns. A sidecar wins.
    fn in_mesh(&self, pod: &Pod, ns: u32, p: &AmbientProfile) -> bool {
        pod.ambient()
            || (pod.api.is_none()
                && !pod.sidecar
                && self
                    .netns
                    .get(&ns)
                    .is_some_and(|l| l.first.contains_key(&p.inbound_port)))
    }

    /// Reports enrollment changes: `enrolled` at once, `lost` and `never`
    /// after `grace_ns` without the HBONE listener; and the unenrolled pods
    /// when that set changed (the gauge).
    pub(super) fn timers(
        &mut self,
        now_ns: u64,
        grace_ns: u64,
        p: &AmbientProfile,
        out: &mut Vec<AmbientOut>,
    ) {
        self.now_ns = self.now_ns.max(now_ns);
        let mesh: Arc<str> = p.mesh.clone();
        for pod in self.pods.values_mut() {
            let (Some(ns), Some(who)) = (pod.netns, pod.who.clone()) else {
                continue;
            };
            // Without the API's word the kernel can show a pod enrolled,
            // never that it should be.
            if pod.sidecar || pod.api == Some(false) {
                continue;
            }
            let l = self.netns.get(&ns);
            let listening = l.is_some_and(|l| l.listening(p.inbound_port));
            if !listening && !pod.ambient() {
                continue;
            }
            let line =
                |state, lost, since, secs: Option<f64>, rec: Option<&String>| AmbientEnrollment {
                    who: who.clone(),
                    mesh: mesh.clone(),
                    state,
                    netns: ns,
                    lost_mono_ns: lost,
                    since_mono_ns: since,
                    unenrolled_seconds: secs,
                    recommendation: rec.cloned(),
                };
            if listening {
                pod.unlistened_ns = None;
                if pod.state != Some(Enrollment::Enrolled) {
                    if pod.state.is_some() {
                        self.gauge_dirty = true;
                    }
                    pod.state = Some(Enrollment::Enrolled);
                    out.push(AmbientOut::Line(line(
                        Enrollment::Enrolled,
                        None,
                        None,
                        None,
                        None,
                    )));
                }
                continue;
            }
            let unlistened = *pod.unlistened_ns.get_or_insert(now_ns);
            if matches!(pod.state, Some(Enrollment::Lost | Enrollment::Never)) {
                continue;
            }
            // Lost: the listener was there and closed (or the pod moved to
            // a netns without one); never: it was not.
            let closed = l.and_then(|l| l.closed.get(&p.inbound_port).copied());
            let (state, from, rec) = match (pod.state, closed) {
                (_, Some(c)) => (Enrollment::Lost, c, &p.recommendation_lost),
                (Some(Enrollment::Enrolled), None) => {
                    (Enrollment::Lost, unlistened, &p.recommendation_lost)
                }
                _ => (
                    Enrollment::Never,
                    pod.since_ns.unwrap_or(self.now_ns),
                    &p.recommendation_never,
                ),
            };
            let waited = now_ns.saturating_sub(from);
            if waited < grace_ns {
                continue;
            }
            pod.state = Some(state);
            self.gauge_dirty = true;
            let secs = Some(waited as f64 / 1e9);
            out.push(AmbientOut::Line(match state {
                Enrollment::Lost => line(state, Some(from), None, secs, Some(rec)),
                _ => line(state, None, Some(from), secs, Some(rec)),
            }));
        }
        if std::mem::take(&mut self.gauge_dirty) {
            out.push(AmbientOut::Unenrolled(p.mesh.clone(), self.unenrolled()));
        }
    }

    /// The pods reported unenrolled now.
    fn unenrolled(&self) -> Vec<Arc<Attribution>> {
        self.pods
            .values()
            .filter(|p| {
                p.ambient() && matches!(p.state, Some(Enrollment::Lost | Enrollment::Never))
            })
            .filter_map(|p| p.who.clone())
            .collect()
    }
}

/// What the enrollment timers produce.
#[derive(Debug, Clone)]
pub enum AmbientOut {
    /// An enrollment change of one pod.
    Line(AmbientEnrollment),
    /// Every pod reported unenrolled now (the gauge's new value), with
    /// their mesh.
    Unenrolled(Arc<str>, Vec<Arc<Attribution>>),
}

/// The pod-level part of an attribution (no container).
fn pod_level(a: &Attribution) -> Arc<Attribution> {
    Arc::new(Attribution {
        container: None,
        container_id: None,
        sandbox: false,
        cgroup: None,
        ..a.clone()
    })
}
