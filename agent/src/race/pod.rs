//! One pod's timeline, with one handler per kind of kernel event, and the
//! phase of each of its connect failures.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use super::{
    Capture, Config, Hints, Phase,
    inbound::AppSide,
    istio::CaptureRules,
    mesh::{Mitigation, Profile},
};
use crate::{
    attribute::Attribution,
    kernel::decode::{Family, KernelEvent, Kind},
};

pub(super) const ECONNREFUSED: i32 = 111;
/// Containers whose start a pod's timeline keeps (a pod has a handful).
const MAX_CONTAINERS: usize = 16;

/// Refusals of one episode (start-up or shutdown), bounded.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    pub(super) count: u64,
    pub(super) first_ns: u64,
    pub(super) last_ns: u64,
    pub(super) dests: BTreeSet<SocketAddr>,
    pub(super) containers: BTreeSet<String>,
}

impl Refusals {
    fn add(&mut self, ev: &KernelEvent, container: Option<&str>) {
        if self.count == 0 || ev.mono_ns < self.first_ns {
            self.first_ns = ev.mono_ns;
        }
        self.last_ns = self.last_ns.max(ev.mono_ns);
        self.count += 1;
        if self.dests.len() < 64
            && let Some(d) = ev.dst
        {
            self.dests.insert(d);
        }
        if let Some(c) = container
            && self.containers.len() < 16
            && !self.containers.contains(c)
        {
            self.containers.insert(c.to_string());
        }
    }
}

/// What the tracker knows of one pod.
#[derive(Debug, Default)]
pub(super) struct PodState {
    pub(super) who: Arc<Attribution>,
    /// The attribution `who` was last made from: the attributor hands out
    /// one shared attribution per container, so the next event of the same
    /// container finds `who` up to date without rebuilding it.
    who_from: Option<Arc<Attribution>>,
    pub(super) first_process_ns: Option<u64>,
    pub(super) sidecar_start_ns: Option<u64>,
    /// Each container's first exec (bounded), for `connscope explain`.
    pub(super) container_start_ns: BTreeMap<String, u64>,
    /// Each sidecar port's first LISTEN by the proxy, for `connscope explain`.
    pub(super) listen_ns: BTreeMap<u16, u64>,
    /// Open LISTEN sockets by port.
    open: HashMap<u16, u32>,
    /// First time the capture port listened; `Some(0)`: before the agent.
    pub(super) ready_ns: Option<u64>,
    /// When the capture port stopped listening (all sockets closed).
    pub(super) closed_ns: Option<u64>,
    pub(super) injected: Option<bool>,
    /// The pod's mesh, once evidence names it (the API's marks, a proxy
    /// container, a LISTEN by a proxy uid on its ports).
    pub(super) profile: Option<Arc<Profile>>,
    pub(super) mitigation: Mitigation,
    /// The pod's capture settings from the API, if it answered.
    pub(super) capture: Option<CaptureRules>,
    pub(super) startup: Refusals,
    /// The sidecar-ready event was emitted.
    pub(super) ready_emitted: bool,
    /// The start-up window is closed: its summary (if any) was emitted.
    pub(super) startup_emitted: bool,
    pub(super) shutdown: Refusals,
    /// The app's listeners and the proxy's refused dials to it.
    pub(super) inbound: AppSide,
    pub(super) started_counted: bool,
    live: HashSet<u32>,
    last_exit_ns: Option<u64>,
    pub(super) last_seen_ns: u64,
    /// Failures waiting for the pod's injection to be known, with the
    /// kernel's capture proof taken when they were applied.
    pub(super) held: Vec<(KernelEvent, Arc<Attribution>, Option<bool>)>,
}

impl PodState {
    /// Is the capture port listening at kernel time `t`?
    fn listening_at(&self, t: u64) -> bool {
        match (self.ready_ns, self.closed_ns) {
            (Some(r), None) => t >= r,
            (Some(r), Some(c)) => t >= r && t < c,
            _ => false,
        }
    }

    /// The agent started after the sidecar listened on `ports`
    /// (reconstructed from /proc/<pid>/net/tcp*).
    pub(super) fn restore_ready(
        &mut self,
        who: Arc<Attribution>,
        profile: &Arc<Profile>,
        ports: &[u16],
        now_ns: u64,
    ) {
        self.who = who;
        self.who_from = None;
        self.last_seen_ns = self.last_seen_ns.max(now_ns);
        self.injected = Some(true);
        self.profile = Some(profile.clone());
        self.started_counted = true;
        for &port in ports {
            *self.open.entry(port).or_default() += 1;
            if port == profile.outbound_port {
                self.ready_ns = Some(0);
            }
        }
        self.ready_emitted = true;
        self.startup_emitted = true;
    }

    /// Takes in what every event brings: its time, its attribution, and
    /// what other sources say of the pod. Returns whether the event comes
    /// from the proxy.
    pub(super) fn observe(
        &mut self,
        ev: &KernelEvent,
        who: &Arc<Attribution>,
        hints: Option<&Hints>,
        cfg: &Config,
    ) -> bool {
        self.last_seen_ns = self.last_seen_ns.max(ev.mono_ns);
        let fresh = self.who_from.as_ref().is_some_and(|f| Arc::ptr_eq(f, who));
        if !fresh && (who.pod.is_some() || self.who.pod_uid.is_none()) {
            self.who = pod_level(who);
            self.who_from = Some(who.clone());
        }
        if let Some(h) = hints {
            self.take_hints(h, cfg);
        }
        let proxy_container = who
            .container
            .as_deref()
            .and_then(|c| cfg.profiles.by_container(c));
        if let Some(m) = proxy_container {
            self.set_profile(m);
        }
        let by_uid = ev.context_known && self.proxy_uid(ev.uid, cfg);
        // A proxy uid names the mesh whose proxy dials (its ports, sources,
        // prober), but alone does not make the pod injected: only a
        // proxy's LISTEN, container or the API's marks do.
        if by_uid && self.profile.is_none() {
            self.profile = cfg.profiles.by_uid(ev.uid).cloned();
        }
        let is_proxy = proxy_container.is_some() || by_uid;
        // An app socket's local address is one the pod's network namespace
        // owns (the proxy's may be a client's, bound transparently).
        if !is_proxy
            && ev.kind == Kind::ConnectFailure
            && let Some(src) = ev.src
        {
            self.inbound.learn(src.ip());
        }
        is_proxy
    }

    /// The pod's mesh is `m`: it is injected. The first evidence wins (a
    /// pod runs one mesh).
    fn set_profile(&mut self, m: &Arc<Profile>) {
        self.injected = Some(true);
        if self.profile.is_none() {
            self.profile = Some(m.clone());
        }
    }

    /// Whether `uid` is the pod's proxy's: its mesh's, or while that is not
    /// known, any mesh's.
    fn proxy_uid(&self, uid: u32, cfg: &Config) -> bool {
        match &self.profile {
            Some(m) => m.proxy_uid(uid),
            None => cfg.profiles.any_proxy_uid(uid),
        }
    }

    /// The pod's mesh for its kernel events' lines and metrics (None: no
    /// mesh known).
    pub(super) fn mesh_label(&self) -> Option<Arc<str>> {
        self.profile.as_ref().map(|m| Arc::clone(&m.label))
    }

    /// The `mesh` label of the pod's events and summaries.
    pub(super) fn mesh(&self) -> &str {
        self.profile
            .as_deref()
            .map_or(super::mesh::NO_MESH, |m| m.name.as_str())
    }

    fn take_hints(&mut self, h: &Hints, cfg: &Config) {
        match (&h.profile, h.injected) {
            (Some(m), _) => self.set_profile(m),
            // Injected by a source that names no mesh: the default's.
            (None, Some(true)) => self.set_profile(cfg.profiles.default_profile()),
            _ => {}
        }
        if h.injected.is_some() {
            self.injected = self.injected.or(h.injected);
            if h.injected == Some(true) {
                self.injected = Some(true);
            }
        }
        if h.mitigation.hold.is_some() {
            self.mitigation.hold = h.mitigation.hold;
        }
        if h.mitigation.native_sidecar.is_some() {
            self.mitigation.native_sidecar = h.mitigation.native_sidecar;
        }
        if h.capture.is_some() {
            self.capture = h.capture.clone();
        }
        if let Some(m) = h
            .container_names
            .iter()
            .find_map(|n| cfg.profiles.by_container(n))
        {
            self.set_profile(m);
        }
    }

    /// A process started: the pod's first process, the sidecar's start.
    pub(super) fn on_exec(&mut self, ev: &KernelEvent, who: &Attribution, cfg: &Config) {
        self.first_process_ns = Some(
            self.first_process_ns
                .map_or(ev.mono_ns, |f| f.min(ev.mono_ns)),
        );
        self.live.insert(ev.pid);
        if let Some(c) = who.container.as_deref()
            && (self.container_start_ns.len() < MAX_CONTAINERS
                || self.container_start_ns.contains_key(c))
        {
            let t = self
                .container_start_ns
                .entry(c.to_string())
                .or_insert(ev.mono_ns);
            *t = (*t).min(ev.mono_ns);
        }
        let proxy_comm = |m: &Profile| m.proxy_comms.iter().any(|c| ev.comm.is(c));
        let sidecar_comm = match &self.profile {
            Some(m) => proxy_comm(m),
            None => cfg.profiles.iter().any(|m| proxy_comm(m)),
        };
        let proxy_container = who
            .container
            .as_deref()
            .is_some_and(|c| cfg.profiles.by_container(c).is_some());
        if sidecar_comm || proxy_container {
            self.sidecar_start_ns = Some(
                self.sidecar_start_ns
                    .map_or(ev.mono_ns, |s| s.min(ev.mono_ns)),
            );
        }
    }

    /// A process ended: the pod's last exit.
    pub(super) fn on_exit(&mut self, ev: &KernelEvent) {
        if self.live.remove(&ev.pid) && self.live.is_empty() {
            self.last_exit_ns = Some(ev.mono_ns);
        }
    }

    /// A socket started or stopped listening: the proxy's listeners mark the
    /// pod injected, and the capture port's make it ready or closed; the
    /// app's (any other process, on a port not Istio's) make its listener
    /// timeline.
    pub(super) fn on_listen(
        &mut self,
        ev: &KernelEvent,
        who: &Attribution,
        is_proxy: bool,
        cfg: &Config,
    ) {
        let port = ev.src.map(|a| a.port()).unwrap_or(0);
        let by_proxy = ev.context_known && self.proxy_uid(ev.uid, cfg) || is_proxy;
        if !by_proxy && AppSide::app_port(port, self.profile.as_deref()) {
            self.inbound.on_listen(ev, who.container.as_deref());
        }
        if !by_proxy {
            return;
        }
        // The pod's mesh, or the one this LISTEN names (a proxy uid on
        // its ports; the proxy's container with any uid).
        let named = || {
            cfg.profiles.by_listen(ev.uid, port).or_else(|| {
                who.container
                    .as_deref()
                    .and_then(|c| cfg.profiles.by_container(c))
            })
        };
        let Some(m) = self.profile.clone().or_else(|| named().cloned()) else {
            return;
        };
        if !m.proxy_ports.contains(&port) {
            return;
        }
        self.set_profile(&m);
        let n = self.open.entry(port).or_default();
        if ev.kind == Kind::Listen {
            *n += 1;
            let first = self.listen_ns.entry(port).or_insert(ev.mono_ns);
            *first = (*first).min(ev.mono_ns);
            if port == m.outbound_port {
                if self.ready_ns.is_none() {
                    self.ready_ns = Some(ev.mono_ns);
                }
                self.closed_ns = None;
            }
        } else {
            *n = n.saturating_sub(1);
            if port == m.outbound_port && *n == 0 && self.ready_ns.is_some() {
                self.closed_ns = Some(ev.mono_ns);
            }
        }
    }

    /// Phase of a failed connect by the pod's proxy: the inbound phases
    /// (see `inbound`) when it dialed the pod's own app on an app port, else
    /// `proxy`. pilot-agent (the prober) is told apart by its process name,
    /// Envoy by what is left: uid 1337 or the istio-proxy container.
    pub(super) fn classify_proxy(&mut self, ev: &KernelEvent) -> Phase {
        let port = ev.dst.map_or(0, |d| d.port());
        let inet = matches!(ev.family, Family::Inet | Family::Inet6);
        let pod_ips = self.capture.as_ref().map_or(&[][..], |c| &c.pod_ips[..]);
        let Some(m) = self.profile.clone() else {
            return Phase::Proxy;
        };
        if !inet
            || !AppSide::app_port(port, Some(&m))
            || !self.inbound.own_destination(ev, pod_ips, &m)
        {
            return Phase::Proxy;
        }
        let prober = ev.context_known && m.prober_comms.iter().any(|c| ev.comm.is(c));
        self.inbound.classify(ev, prober)
    }

    /// What a failure's capture verdict rests on: the kernel when it gives
    /// proof (`kernel` is Some), else the pod's settings from the API, else
    /// inference.
    pub(super) fn evidence(&self, kernel: Option<bool>, cfg: &Config) -> Capture {
        Capture::of(self.kernel_proof(kernel, cfg), self.capture.is_some())
    }

    /// The kernel's capture proof, where it holds for this pod: the kernel
    /// reports resets from some ports only, and a mesh capturing to another
    /// (or a pod whose mesh is not known) gets no proof from it.
    fn kernel_proof(&self, kernel: Option<bool>, cfg: &Config) -> Option<bool> {
        let port = self.profile.as_ref()?.outbound_port;
        kernel.filter(|_| cfg.kernel_capture_ports.contains(&port))
    }

    /// Whether loopback destination `ip` is one the mesh never captures
    /// (every loopback address for Istio, Linkerd and Kuma; only
    /// 127.0.0.1 for Consul).
    fn loopback_uncaptured(&self, ip: std::net::IpAddr) -> bool {
        ip.is_loopback()
            && self
                .profile
                .as_ref()
                .is_none_or(|m| m.never_captured(ip, None, &[]))
    }

    /// Whether the failure's connect was redirected to the capture port,
    /// by the best evidence there is.
    fn captured(&self, ev: &KernelEvent, kernel: Option<bool>) -> bool {
        let Some(dst) = ev.dst else {
            return false;
        };
        let src = ev.src.map(|s| s.ip());
        match (kernel, &self.capture) {
            (Some(k), _) => k,
            (None, Some(rules)) => rules.captures(dst, src),
            // The mesh's rules with no settings: every destination but what
            // they never capture (Istio: loopback and the pod's own
            // address, the socket's source) is captured.
            (None, None) => !self
                .profile
                .as_ref()
                .map_or(dst.ip().is_loopback() || src == Some(dst.ip()), |m| {
                    m.never_captured(dst.ip(), src, &[])
                }),
        }
    }

    /// Phase of a failure in an injected pod, by kernel time. `kernel`:
    /// the kernel's proof that it was captured (None: no proof on this
    /// kernel).
    pub(super) fn classify(
        &mut self,
        ev: &KernelEvent,
        who: &Attribution,
        kernel: Option<bool>,
        cfg: &Config,
    ) -> Phase {
        let kernel = self.kernel_proof(kernel, cfg);
        // Only captured traffic can be refused by a missing capture listener:
        // Istio never redirects loopback destinations, nor non-TCP families.
        let refused = ev.errno == ECONNREFUSED
            && matches!(ev.family, Family::Inet | Family::Inet6)
            && ev.dst.is_some_and(|d| !self.loopback_uncaptured(d.ip()));
        let t = ev.mono_ns;
        // A refusal says the capture listener did not accept the SYN at
        // some moment of the attempt, from its start to the RST: it was
        // ready only if it listened over all of it. (Under load, or
        // emulation, a SYN sent before the LISTEN comes back refused after
        // it.) Other failures are placed at their end.
        let start = if refused {
            ev.start_mono_ns.filter(|&s| s <= t).unwrap_or(t)
        } else {
            t
        };
        // The kernel's proof that the capture port itself refused outranks
        // the LISTEN's timestamp, which the kernel takes just before the
        // listener is hashed and can accept.
        let proven = refused && kernel == Some(true);
        if !proven && self.listening_at(start) && self.listening_at(t) {
            return Phase::SidecarReady;
        }
        if !refused {
            return Phase::SidecarNotReady;
        }
        if !self.captured(ev, kernel) {
            return Phase::NotCaptured;
        }
        // Shutdown: the attempt began while the listener was up and was
        // refused once it had closed. Everything else is the start-up window.
        let after_close =
            self.closed_ns.is_some_and(|c| t >= c) && self.ready_ns.is_some_and(|r| start >= r);
        if !after_close {
            self.startup.add(ev, who.container.as_deref());
            Phase::StartupRace
        } else {
            self.shutdown.add(ev, who.container.as_deref());
            Phase::ShutdownRace
        }
    }
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
