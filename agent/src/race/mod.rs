//! The sidecar startup race: a per-pod timeline built from kernel events, a
//! phase for every connect failure, and one summary per pod.
//!
//! In an Istio pod every outbound TCP connect is redirected to 15001. Until
//! the sidecar listens there (the listener arrives over xDS after Envoy
//! starts), the application's connects are refused. Classification compares
//! kernel timestamps, never arrival order: events are re-ordered in a short
//! window before they are applied, and a failure whose pod's injection is not
//! yet known is held (bounded in count and time), then classified.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
};

use serde::Serialize;

use crate::{
    attribute::Attribution,
    k8s::PodInfo,
    kernel::decode::{Family, KernelEvent, Kind},
};

const ECONNREFUSED: i32 = 111;
/// The Istio proxy container's name.
pub const PROXY_CONTAINER: &str = "istio-proxy";

/// Where a connect failure stands relative to the pod's sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Refused, application container of an injected pod, before the
    /// sidecar's capture port (15001) listened.
    StartupRace,
    /// Refused after the capture listener closed while the app still ran.
    ShutdownRace,
    /// The pod's sidecar was ready: the failure is not the race.
    SidecarReady,
    /// Injected pod, capture port not listening, and a failure the missing
    /// listener cannot explain: traffic that bypasses the sidecar (loopback,
    /// AF_UNIX, errors other than refusal).
    SidecarNotReady,
    /// The proxy's own connects (uid 1337 or the istio-proxy container).
    Proxy,
    /// Not an injected pod, or not a pod.
    NoSidecar,
}

impl Phase {
    /// Label value used in metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::StartupRace => "startup_race",
            Phase::ShutdownRace => "shutdown_race",
            Phase::SidecarReady => "sidecar_ready",
            Phase::SidecarNotReady => "sidecar_not_ready",
            Phase::Proxy => "proxy",
            Phase::NoSidecar => "no_sidecar",
        }
    }
}

/// Tunables (ports are flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Outbound capture port: sidecar-ready = it listens.
    pub capture_port: u16,
    /// Ports whose LISTEN by the proxy uid marks a pod as injected.
    pub sidecar_ports: Vec<u16>,
    pub proxy_uid: u32,
    /// Process names of the sidecar (pilot-agent starts envoy).
    pub sidecar_comms: Vec<String>,
    /// How long events are kept to be applied in kernel-timestamp order.
    pub reorder_ns: u64,
    /// How long a failure may wait for its pod's injection to be known.
    pub hold_ns: u64,
    /// Held failures at most (oldest classified early beyond it).
    pub max_held: usize,
    /// Quiet time after the last shutdown refusal before its summary.
    pub shutdown_quiet_ns: u64,
    /// A pod with no event for this long is finalised and forgotten.
    pub idle_ns: u64,
    /// Pods tracked at most (least recently seen finalised beyond it).
    pub max_pods: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            capture_port: 15001,
            sidecar_ports: vec![15001, 15006, 15020, 15021, 15090, 15000],
            proxy_uid: 1337,
            sidecar_comms: vec!["pilot-agent".into(), "envoy".into()],
            reorder_ns: 20_000_000,
            hold_ns: 5_000_000_000,
            max_held: 10_000,
            shutdown_quiet_ns: 2_000_000_000,
            idle_ns: 120_000_000_000,
            max_pods: 20_000,
        }
    }
}

/// Mitigations in effect for a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Mitigation {
    /// `holdApplicationUntilProxyStarts` (from the API; None if unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<bool>,
    /// istio-proxy as a native sidecar (init container, restartPolicy Always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_sidecar: Option<bool>,
}

/// What other sources say of a pod, gathered by the pipeline.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    /// Injected according to the API (annotation or istio-proxy container).
    pub injected: Option<bool>,
    pub mitigation: Mitigation,
    /// Names of the pod's containers found on the node (runtime metadata).
    pub container_names: Vec<String>,
}

/// Hints from the API's view of a pod.
pub fn api_hints(p: &PodInfo) -> Hints {
    let proxy = p.containers.iter().find(|c| c.name == PROXY_CONTAINER);
    let injected = p.istio.sidecar_status.is_some() || proxy.is_some();
    let hold = p
        .istio
        .proxy_config
        .as_deref()
        .map(|c| config_flag(c, "holdApplicationUntilProxyStarts"));
    let native = proxy.map(|c| c.init && c.restart_always).or_else(|| {
        p.istio
            .native_sidecar
            .as_deref()
            .map(|v| v.eq_ignore_ascii_case("true"))
    });
    Hints {
        injected: Some(injected),
        mitigation: Mitigation {
            hold: if injected {
                Some(hold.unwrap_or(false))
            } else {
                None
            },
            native_sidecar: if injected {
                native.or(Some(false))
            } else {
                None
            },
        },
        container_names: p.containers.iter().map(|c| c.name.clone()).collect(),
    }
}

/// Whether `key` is set to true in a proxy config given as JSON or YAML.
pub fn config_flag(text: &str, key: &str) -> bool {
    let Some(i) = text.find(key) else {
        return false;
    };
    let rest = text[i + key.len()..].trim_start_matches(['"', '\'', ' ']);
    let Some(rest) = rest.strip_prefix(':') else {
        return false;
    };
    rest.trim_start_matches([' ', '"', '\'', '\t'])
        .starts_with("true")
}

/// One pod's `sidecar_ready` event.
#[derive(Debug, Clone, Serialize)]
pub struct SidecarReady {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    pub ready_mono_ns: u64,
    /// Pod's first process -> 15001 listening.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_start_to_ready_seconds: Option<f64>,
    /// Sidecar's first process -> 15001 listening (istiod push latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_start_to_ready_seconds: Option<f64>,
    pub mitigation: Mitigation,
}

/// One pod's startup-race summary.
#[derive(Debug, Clone, Serialize)]
pub struct RaceSummary {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    pub refused: u64,
    pub first_refusal_mono_ns: u64,
    /// None: the sidecar never became ready while we watched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_mono_ns: Option<u64>,
    /// First refusal -> 15001 listening.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_start_to_ready_seconds: Option<f64>,
    pub destinations: Vec<String>,
    pub containers: Vec<String>,
    pub mitigation: Mitigation,
    pub recommendation: String,
}

/// One pod's shutdown-race summary.
#[derive(Debug, Clone, Serialize)]
pub struct ShutdownSummary {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    pub refused: u64,
    pub capture_closed_mono_ns: u64,
    pub first_refusal_mono_ns: u64,
    pub last_refusal_mono_ns: u64,
    pub destinations: Vec<String>,
    pub recommendation: String,
}

/// What the tracker produces, in kernel-time order.
#[derive(Debug, Clone)]
pub enum Output {
    /// A kernel event, with its phase if it is a connect failure.
    Event {
        ev: KernelEvent,
        who: Arc<Attribution>,
        phase: Option<Phase>,
    },
    /// A pod first seen starting, once its injection is known.
    PodStarted {
        who: Arc<Attribution>,
        injected: bool,
    },
    SidecarReady(SidecarReady),
    StartupRace(RaceSummary),
    ShutdownRace(ShutdownSummary),
}

#[derive(Debug, Default)]
struct Refusals {
    count: u64,
    first_ns: u64,
    last_ns: u64,
    dests: BTreeSet<SocketAddr>,
    containers: BTreeSet<String>,
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

#[derive(Debug, Default)]
struct PodState {
    who: Arc<Attribution>,
    /// The attribution `who` was last made from: the attributor hands out
    /// one shared attribution per container, so the next event of the same
    /// container finds `who` up to date without rebuilding it.
    who_from: Option<Arc<Attribution>>,
    first_process_ns: Option<u64>,
    sidecar_start_ns: Option<u64>,
    /// Open LISTEN sockets by port.
    open: HashMap<u16, u32>,
    /// First time the capture port listened; `Some(0)`: before the agent.
    ready_ns: Option<u64>,
    /// When the capture port stopped listening (all sockets closed).
    closed_ns: Option<u64>,
    injected: Option<bool>,
    mitigation: Mitigation,
    startup: Refusals,
    startup_emitted: bool,
    shutdown: Refusals,
    started_counted: bool,
    live: std::collections::HashSet<u32>,
    last_exit_ns: Option<u64>,
    last_seen_ns: u64,
    held: Vec<(KernelEvent, Arc<Attribution>)>,
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
}

/// An event waiting in the re-order window.
struct Pending {
    ev: KernelEvent,
    who: Arc<Attribution>,
    hints: Option<Hints>,
}

/// Counters of what the tracker had to do, for self-metrics.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Failures held because the pod's injection was not yet known.
    pub held: u64,
    /// Held failures classified at the time or count limit.
    pub held_expired: u64,
}

/// Per-pod timelines and classification.
pub struct Tracker {
    cfg: Config,
    pods: rustc_hash::FxHashMap<String, PodState>,
    /// Sorted by (kernel time, arrival): events nearly always arrive in
    /// order, so insertion is a push at the back.
    queue: VecDeque<Pending>,
    last_timers_ns: u64,
    /// Pods whose cgroup was removed, with the kernel time: finalised once
    /// every earlier event of theirs was applied.
    gone: Vec<(String, u64)>,
    held_total: usize,
    pub stats: Stats,
}

impl Tracker {
    pub fn new(cfg: Config) -> Self {
        Tracker {
            cfg,
            pods: Default::default(),
            queue: VecDeque::new(),
            last_timers_ns: 0,
            gone: Vec::new(),
            held_total: 0,
            stats: Stats::default(),
        }
    }

    /// Pods with state.
    pub fn pods_tracked(&self) -> usize {
        self.pods.len()
    }

    /// Failures held for their pod's injection to be known.
    pub fn held(&self) -> usize {
        self.held_total
    }

    /// Whether the pipeline should gather [`Hints`] for this pod (its
    /// injection is not known yet).
    pub fn wants_hints(&self, pod_uid: &str) -> bool {
        self.pods.get(pod_uid).is_none_or(|p| p.injected.is_none())
    }

    /// Queues an event; it is applied once older than the re-order window.
    pub fn push(&mut self, ev: KernelEvent, who: Arc<Attribution>, hints: Option<Hints>) {
        let p = Pending { ev, who, hints };
        let at = self
            .queue
            .iter()
            .rposition(|q| q.ev.mono_ns <= p.ev.mono_ns)
            .map_or(0, |i| i + 1);
        self.queue.insert(at, p);
    }

    /// Applies queued events older than `now_ns - reorder`, then timers.
    pub fn advance(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        let horizon = now_ns.saturating_sub(self.cfg.reorder_ns);
        while self.queue.front().is_some_and(|p| p.ev.mono_ns <= horizon) {
            let p = self.queue.pop_front().expect("checked");
            self.apply(p.ev, p.who, p.hints, out);
        }
        if !self.gone.is_empty() {
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gone)
                .into_iter()
                .partition(|(_, t)| *t <= horizon);
            self.gone = keep;
            for (uid, _) in due {
                self.finalise(&uid, out);
            }
        }
        // Timers walk every pod: at most every 50 ms.
        if now_ns.saturating_sub(self.last_timers_ns) >= 50_000_000 {
            self.last_timers_ns = now_ns;
            self.timers(now_ns, out);
        }
    }

    /// Applies everything queued and finalises every pod (shutdown).
    pub fn flush(&mut self, out: &mut Vec<Output>) {
        self.advance(u64::MAX, out);
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.finalise(&uid, out);
        }
    }

    /// The pod's cgroup was removed at kernel time `mono_ns`: its state is
    /// finalised (pending summaries emitted) and freed.
    pub fn pod_gone(&mut self, uid: String, mono_ns: u64) {
        self.gone.push((uid, mono_ns));
    }

    /// Marks a pod's sidecar as already listening when the agent started
    /// (reconstructed from /proc/<pid>/net/tcp*).
    pub fn restore_ready(&mut self, who: Arc<Attribution>, ports: &[u16], now_ns: u64) {
        let Some(uid) = who.pod_uid.clone() else {
            return;
        };
        let p = self.pods.entry(uid).or_default();
        p.who = who;
        p.who_from = None;
        p.last_seen_ns = p.last_seen_ns.max(now_ns);
        p.injected = Some(true);
        p.started_counted = true;
        for &port in ports {
            *p.open.entry(port).or_default() += 1;
            if port == self.cfg.capture_port {
                p.ready_ns = Some(0);
            }
        }
        p.startup_emitted = true;
    }

    fn apply(
        &mut self,
        ev: KernelEvent,
        who: Arc<Attribution>,
        hints: Option<Hints>,
        out: &mut Vec<Output>,
    ) {
        // A second handle keeps the pod's uid borrowable while `who` moves on
        // with the event: the uid is copied only for a new pod, not per event.
        let attr = Arc::clone(&who);
        let Some(uid) = attr.pod_uid.as_deref() else {
            let phase = (ev.kind == Kind::ConnectFailure).then_some(Phase::NoSidecar);
            out.push(Output::Event { ev, who, phase });
            return;
        };
        if !self.pods.contains_key(uid) {
            if self.pods.len() >= self.cfg.max_pods {
                self.evict_oldest(out);
            }
            self.pods.insert(uid.to_string(), PodState::default());
        }
        let cfg = &self.cfg;
        let Some(p) = self.pods.get_mut(uid) else {
            return;
        };
        p.last_seen_ns = p.last_seen_ns.max(ev.mono_ns);
        let fresh = p.who_from.as_ref().is_some_and(|f| Arc::ptr_eq(f, &who));
        if !fresh && (who.pod.is_some() || p.who.pod_uid.is_none()) {
            p.who = pod_level(&who);
            p.who_from = Some(who.clone());
        }
        if let Some(h) = &hints {
            if h.injected.is_some() {
                p.injected = p.injected.or(h.injected);
                if h.injected == Some(true) {
                    p.injected = Some(true);
                }
            }
            if h.mitigation.hold.is_some() {
                p.mitigation.hold = h.mitigation.hold;
            }
            if h.mitigation.native_sidecar.is_some() {
                p.mitigation.native_sidecar = h.mitigation.native_sidecar;
            }
            if h.container_names.iter().any(|n| n == PROXY_CONTAINER) {
                p.injected = Some(true);
            }
        }
        let is_proxy = who.container.as_deref() == Some(PROXY_CONTAINER)
            || (ev.context_known && ev.uid == cfg.proxy_uid);
        if is_proxy && p.injected != Some(true) && who.container.as_deref() == Some(PROXY_CONTAINER)
        {
            p.injected = Some(true);
        }
        let mut phase = None;
        match ev.kind {
            Kind::Exec => {
                p.first_process_ns =
                    Some(p.first_process_ns.map_or(ev.mono_ns, |f| f.min(ev.mono_ns)));
                p.live.insert(ev.pid);
                let sidecar_comm = cfg.sidecar_comms.iter().any(|c| ev.comm.is(c));
                if sidecar_comm || who.container.as_deref() == Some(PROXY_CONTAINER) {
                    p.sidecar_start_ns =
                        Some(p.sidecar_start_ns.map_or(ev.mono_ns, |s| s.min(ev.mono_ns)));
                }
            }
            Kind::Exit => {
                if p.live.remove(&ev.pid) && p.live.is_empty() {
                    p.last_exit_ns = Some(ev.mono_ns);
                }
            }
            Kind::Listen | Kind::ListenClose => {
                let port = ev.src.map(|a| a.port()).unwrap_or(0);
                let by_proxy = ev.context_known && ev.uid == cfg.proxy_uid || is_proxy;
                if by_proxy && cfg.sidecar_ports.contains(&port) {
                    p.injected = Some(true);
                    let n = p.open.entry(port).or_default();
                    if ev.kind == Kind::Listen {
                        *n += 1;
                        if port == cfg.capture_port {
                            if p.ready_ns.is_none() {
                                p.ready_ns = Some(ev.mono_ns);
                            }
                            p.closed_ns = None;
                        }
                    } else {
                        *n = n.saturating_sub(1);
                        if port == cfg.capture_port && *n == 0 && p.ready_ns.is_some() {
                            p.closed_ns = Some(ev.mono_ns);
                        }
                    }
                }
            }
            Kind::ConnectFailure => {
                if is_proxy {
                    phase = Some(Phase::Proxy);
                } else if p.injected.is_none() {
                    p.held.push((ev, who));
                    self.held_total += 1;
                    self.stats.held += 1;
                    self.after_change(uid, out);
                    self.enforce_hold_limit(out);
                    return;
                } else {
                    phase = Some(classify(p, &ev, &who));
                }
            }
        }
        out.push(Output::Event { ev, who, phase });
        self.after_change(uid, out);
    }

    /// Releases held failures, counts pod starts and emits summaries that
    /// became due after a change to pod `uid`.
    fn after_change(&mut self, uid: &str, out: &mut Vec<Output>) {
        let Some(p) = self.pods.get_mut(uid) else {
            return;
        };
        if let Some(inj) = p.injected {
            if !p.started_counted {
                p.started_counted = true;
                out.push(Output::PodStarted {
                    who: p.who.clone(),
                    injected: inj,
                });
            }
            let held = std::mem::take(&mut p.held);
            self.held_total -= held.len();
            for (ev, who) in held {
                let phase = if inj {
                    classify(p, &ev, &who)
                } else {
                    Phase::NoSidecar
                };
                out.push(Output::Event {
                    ev,
                    who,
                    phase: Some(phase),
                });
            }
        }
        if let Some(ready) = p.ready_ns
            && !p.startup_emitted
            && p.injected == Some(true)
        {
            p.startup_emitted = true;
            out.push(Output::SidecarReady(SidecarReady {
                who: p.who.clone(),
                ready_mono_ns: ready,
                pod_start_to_ready_seconds: p
                    .first_process_ns
                    .filter(|&f| f <= ready)
                    .map(|f| secs(ready - f)),
                sidecar_start_to_ready_seconds: p
                    .sidecar_start_ns
                    .filter(|&s| s <= ready)
                    .map(|s| secs(ready - s)),
                mitigation: p.mitigation.clone(),
            }));
            if p.startup.count > 0 {
                out.push(Output::StartupRace(race_summary(p)));
            }
        }
    }

    fn enforce_hold_limit(&mut self, out: &mut Vec<Output>) {
        while self.held_total > self.cfg.max_held {
            // Classify the pod holding the oldest failure with what is known.
            let Some(uid) = self
                .pods
                .iter()
                .filter_map(|(u, p)| p.held.first().map(|(e, _)| (e.mono_ns, u.clone())))
                .min()
                .map(|(_, u)| u)
            else {
                break;
            };
            self.expire_hold(&uid, out);
        }
    }

    /// The pod's injection could not be learned in time: not injected.
    fn expire_hold(&mut self, uid: &str, out: &mut Vec<Output>) {
        if let Some(p) = self.pods.get_mut(uid) {
            self.stats.held_expired += p.held.len() as u64;
            if p.injected.is_none() {
                p.injected = Some(false);
            }
        }
        self.after_change(uid, out);
    }

    fn timers(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        let cfg = self.cfg.clone();
        let mut expire = Vec::new();
        let mut shutdown = Vec::new();
        let mut idle = Vec::new();
        for (uid, p) in &self.pods {
            if p.held
                .first()
                .is_some_and(|(e, _)| now_ns.saturating_sub(e.mono_ns) > cfg.hold_ns)
            {
                expire.push(uid.clone());
            }
            if p.shutdown.count > 0
                && now_ns.saturating_sub(p.shutdown.last_ns) > cfg.shutdown_quiet_ns
            {
                shutdown.push(uid.clone());
            }
            if now_ns.saturating_sub(p.last_seen_ns) > cfg.idle_ns {
                idle.push(uid.clone());
            }
        }
        for uid in expire {
            self.expire_hold(&uid, out);
        }
        for uid in shutdown {
            if let Some(p) = self.pods.get_mut(&uid) {
                out.push(Output::ShutdownRace(shutdown_summary(p)));
                p.shutdown = Refusals::default();
            }
        }
        for uid in idle {
            self.finalise(&uid, out);
        }
    }

    fn evict_oldest(&mut self, out: &mut Vec<Output>) {
        if let Some(uid) = self
            .pods
            .iter()
            .min_by_key(|(_, p)| p.last_seen_ns)
            .map(|(u, _)| u.clone())
        {
            self.finalise(&uid, out);
        }
    }

    /// Emits what is still pending for a pod and forgets it.
    fn finalise(&mut self, uid: &str, out: &mut Vec<Output>) {
        if self.pods.get(uid).is_some_and(|p| !p.held.is_empty()) {
            self.expire_hold(uid, out);
        }
        let Some(p) = self.pods.remove(uid) else {
            return;
        };
        if p.startup.count > 0 && !p.startup_emitted {
            out.push(Output::StartupRace(race_summary(&p)));
        }
        if p.shutdown.count > 0 {
            out.push(Output::ShutdownRace(shutdown_summary(&p)));
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

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Phase of a failure in an injected pod, by kernel time.
fn classify(p: &mut PodState, ev: &KernelEvent, who: &Attribution) -> Phase {
    // Only captured traffic can be refused by a missing capture listener:
    // Istio never redirects loopback destinations, nor non-TCP families.
    let refused = ev.errno == ECONNREFUSED
        && matches!(ev.family, Family::Inet | Family::Inet6)
        && ev.dst.is_some_and(|d| !d.ip().is_loopback());
    let t = ev.mono_ns;
    if p.listening_at(t) {
        return Phase::SidecarReady;
    }
    let before_ready = p.ready_ns.is_none_or(|r| t < r);
    if !refused {
        return Phase::SidecarNotReady;
    }
    if before_ready {
        p.startup.add(ev, who.container.as_deref());
        Phase::StartupRace
    } else {
        p.shutdown.add(ev, who.container.as_deref());
        Phase::ShutdownRace
    }
}

fn race_summary(p: &PodState) -> RaceSummary {
    let ready = p.ready_ns.filter(|&r| r > 0);
    let m = &p.mitigation;
    let recommendation = match (m.hold, m.native_sidecar, ready) {
        (_, _, None) => "the sidecar never listened on its outbound port while the app was refused: check istio-proxy logs and istiod connectivity".to_string(),
        (Some(true), _, _) => "holdApplicationUntilProxyStarts is on, yet the app dialed before the proxy's outbound listener (15001) existed: the proxy reported ready before istiod pushed its listeners; check istiod push latency and the proxy readiness configuration".to_string(),
        (_, Some(true), _) => "istio-proxy runs as a native sidecar, yet the app dialed before 15001 listened: check the istio-proxy startupProbe so the app starts only when the proxy is ready".to_string(),
        _ => "enable holdApplicationUntilProxyStarts for this workload (pod annotation proxy.istio.io/config: '{\"holdApplicationUntilProxyStarts\": true}'), or run istio-proxy as a native sidecar (Istio >= 1.27 on Kubernetes >= 1.33), or make the app retry its start-up connections".to_string(),
    };
    RaceSummary {
        who: p.who.clone(),
        refused: p.startup.count,
        first_refusal_mono_ns: p.startup.first_ns,
        ready_mono_ns: ready,
        window_seconds: ready
            .filter(|&r| r >= p.startup.first_ns)
            .map(|r| secs(r - p.startup.first_ns)),
        sidecar_start_to_ready_seconds: match (p.sidecar_start_ns, ready) {
            (Some(s), Some(r)) if s <= r => Some(secs(r - s)),
            _ => None,
        },
        destinations: p.startup.dests.iter().map(|d| d.to_string()).collect(),
        containers: p.startup.containers.iter().cloned().collect(),
        mitigation: p.mitigation.clone(),
        recommendation,
    }
}

fn shutdown_summary(p: &PodState) -> ShutdownSummary {
    ShutdownSummary {
        who: p.who.clone(),
        refused: p.shutdown.count,
        capture_closed_mono_ns: p.closed_ns.unwrap_or(0),
        first_refusal_mono_ns: p.shutdown.first_ns,
        last_refusal_mono_ns: p.shutdown.last_ns,
        destinations: p.shutdown.dests.iter().map(|d| d.to_string()).collect(),
        recommendation: "the sidecar stopped listening before the app finished: set EXIT_ON_ZERO_ACTIVE_CONNECTIONS / terminationDrainDuration, use native sidecars (they stop after the app), or have the app stop dialing on SIGTERM".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const MS: u64 = 1_000_000;

    fn who(container: &str) -> Arc<Attribution> {
        Arc::new(Attribution {
            namespace: Some("shop".into()),
            pod: Some("checkout-7d9f8c6b5-xk2lp".into()),
            pod_uid: Some("uid-1".into()),
            container: Some(container.into()),
            workload: Some("checkout".into()),
            ..Default::default()
        })
    }

    fn ev(kind: Kind, t_ms: u64, uid: u32) -> KernelEvent {
        KernelEvent {
            kind,
            mono_ns: t_ms * MS,
            time: UNIX_EPOCH,
            start_mono_ns: None,
            pid: 10,
            tid: 10,
            uid,
            gid: uid,
            comm: crate::kernel::decode::Comm::from_name("app"),
            cgroup_id: Some(1),
            netns: Some(1),
            family: Family::Inet,
            src: Some("127.0.0.1:15001".parse().unwrap()),
            dst: Some("10.0.0.1:80".parse().unwrap()),
            path: None,
            errno: if kind == Kind::ConnectFailure {
                ECONNREFUSED
            } else {
                0
            },
            nonblocking: true,
            from_syscall: false,
            rst: true,
            context_known: true,
        }
    }

    fn run(
        t: &mut Tracker,
        evs: Vec<(KernelEvent, Arc<Attribution>, Option<Hints>)>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        for (e, w, h) in evs {
            t.push(e, w, h);
        }
        t.advance(10_000 * MS, &mut out);
        out
    }

    fn phases(out: &[Output]) -> Vec<Phase> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event { phase: Some(p), .. } => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn startup_races(out: &[Output]) -> Vec<&RaceSummary> {
        out.iter()
            .filter_map(|o| match o {
                Output::StartupRace(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn injected() -> Option<Hints> {
        Some(Hints {
            container_names: vec!["app".into(), PROXY_CONTAINER.into()],
            ..Default::default()
        })
    }

    #[test]
    fn refusals_before_ready_are_the_race_with_one_summary() {
        let mut t = Tracker::new(Config::default());
        let out = run(
            &mut t,
            vec![
                (ev(Kind::Exec, 100, 0), who("app"), injected()),
                (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
                (ev(Kind::ConnectFailure, 300, 0), who("app"), None),
                (ev(Kind::Listen, 1100, 1337), who(PROXY_CONTAINER), None),
                (ev(Kind::ConnectFailure, 1200, 0), who("app"), None),
            ],
        );
        assert_eq!(
            phases(&out),
            vec![Phase::StartupRace, Phase::StartupRace, Phase::SidecarReady]
        );
        let s = startup_races(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].refused, 2);
        assert!((s[0].window_seconds.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(s[0].destinations, vec!["10.0.0.1:80".to_string()]);
        assert!(
            s[0].recommendation
                .contains("holdApplicationUntilProxyStarts")
        );
    }

    #[test]
    fn pod_summary_follows_a_changed_attribution_not_a_repeated_one() {
        let mut t = Tracker::new(Config::default());
        let first = who("app");
        // The same container, now known under another pod name (a new
        // attribution, as after the API answered).
        let renamed = Arc::new(Attribution {
            pod: Some("checkout-renamed".into()),
            ..(*first).clone()
        });
        let out = run(
            &mut t,
            vec![
                (ev(Kind::Exec, 100, 0), first.clone(), injected()),
                (ev(Kind::ConnectFailure, 200, 0), first.clone(), None),
                (ev(Kind::ConnectFailure, 300, 0), renamed.clone(), None),
                // Handles alternating: each change rebuilds the pod-level
                // attribution.
                (ev(Kind::ConnectFailure, 400, 0), first.clone(), None),
                (ev(Kind::ConnectFailure, 500, 0), renamed.clone(), None),
                (ev(Kind::Listen, 1100, 1337), who(PROXY_CONTAINER), None),
            ],
        );
        let s = startup_races(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].refused, 4);
        // who(PROXY_CONTAINER) (a new handle, original pod name) came last.
        assert_eq!(s[0].who.pod.as_deref(), Some("checkout-7d9f8c6b5-xk2lp"));
        assert_eq!(s[0].who.container, None, "pod-level: no container");

        let mut t = Tracker::new(Config::default());
        let mut out = run(
            &mut t,
            vec![
                (ev(Kind::Exec, 100, 0), first.clone(), injected()),
                (ev(Kind::ConnectFailure, 200, 0), first.clone(), None),
                (ev(Kind::ConnectFailure, 300, 0), renamed.clone(), None),
                (ev(Kind::ConnectFailure, 400, 0), renamed.clone(), None),
            ],
        );
        t.flush(&mut out);
        let s = startup_races(&out);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].who.pod.as_deref(), Some("checkout-renamed"));
    }

    #[test]
    fn arrival_order_does_not_matter_within_the_window() {
        let mut t = Tracker::new(Config::default());
        // The listen (t=100) arrives after the failure (t=101).
        let out = run(
            &mut t,
            vec![
                (ev(Kind::ConnectFailure, 101, 0), who("app"), injected()),
                (ev(Kind::Listen, 100, 1337), who(PROXY_CONTAINER), None),
            ],
        );
        assert_eq!(phases(&out), vec![Phase::SidecarReady]);
    }

    #[test]
    fn unknown_injection_is_held_then_classified() {
        let mut t = Tracker::new(Config::default());
        let mut out = Vec::new();
        t.push(ev(Kind::ConnectFailure, 100, 0), who("app"), None);
        t.advance(200 * MS, &mut out);
        assert!(phases(&out).is_empty(), "held, not dropped, not guessed");
        assert_eq!(t.stats.held, 1);
        // The proxy's early listener shows the pod is injected.
        t.push(
            ev(Kind::Listen, 150, 1337).with_port(15021),
            who(PROXY_CONTAINER),
            None,
        );
        t.advance(400 * MS, &mut out);
        assert_eq!(phases(&out), vec![Phase::StartupRace]);
    }

    #[test]
    fn held_failures_expire_as_no_sidecar() {
        let mut t = Tracker::new(Config {
            hold_ns: 1000 * MS,
            ..Config::default()
        });
        let mut out = Vec::new();
        t.push(ev(Kind::ConnectFailure, 100, 0), who("app"), None);
        t.advance(500 * MS, &mut out);
        assert!(phases(&out).is_empty());
        t.advance(2000 * MS, &mut out);
        assert_eq!(phases(&out), vec![Phase::NoSidecar]);
        assert_eq!(t.stats.held_expired, 1);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::PodStarted {
                injected: false,
                ..
            }
        )));
    }

    #[test]
    fn hold_limit_classifies_early_instead_of_dropping() {
        let mut t = Tracker::new(Config {
            max_held: 2,
            ..Config::default()
        });
        let out = run(
            &mut t,
            (0..5)
                .map(|i| (ev(Kind::ConnectFailure, 100 + i, 0), who("app"), None))
                .collect(),
        );
        // Nothing lost: the first pod's holds were classified when the limit hit.
        assert_eq!(phases(&out).len() + t.held_total, 5);
    }

    #[test]
    fn shutdown_race_after_capture_closes() {
        let mut t = Tracker::new(Config {
            shutdown_quiet_ns: 100 * MS,
            ..Config::default()
        });
        let mut out = run(
            &mut t,
            vec![
                (
                    ev(Kind::Listen, 100, 1337),
                    who(PROXY_CONTAINER),
                    injected(),
                ),
                (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
                (ev(Kind::ListenClose, 300, 1337), who(PROXY_CONTAINER), None),
                (ev(Kind::ConnectFailure, 400, 0), who("app"), None),
            ],
        );
        t.advance(20_000 * MS, &mut out);
        assert_eq!(phases(&out), vec![Phase::SidecarReady, Phase::ShutdownRace]);
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::ShutdownRace(_)))
                .count(),
            1
        );
        assert!(!out.iter().any(|o| matches!(o, Output::StartupRace(_))));
    }

    #[test]
    fn loopback_refusals_are_not_the_race() {
        let mut t = Tracker::new(Config::default());
        let mut local = ev(Kind::ConnectFailure, 200, 0);
        local.dst = Some("127.0.0.1:9".parse().unwrap());
        let out = run(&mut t, vec![(local, who("app"), injected())]);
        assert_eq!(phases(&out), vec![Phase::SidecarNotReady]);
    }

    #[test]
    fn not_a_pod_and_proxy_own_failures() {
        let mut t = Tracker::new(Config::default());
        let out = run(
            &mut t,
            vec![
                (
                    ev(Kind::ConnectFailure, 100, 0),
                    Arc::new(Attribution::default()),
                    None,
                ),
                (
                    ev(Kind::ConnectFailure, 200, 1337),
                    who(PROXY_CONTAINER),
                    injected(),
                ),
            ],
        );
        assert_eq!(phases(&out), vec![Phase::NoSidecar, Phase::Proxy]);
    }

    #[test]
    fn restored_ready_pod_is_never_a_race() {
        let mut t = Tracker::new(Config::default());
        t.restore_ready(who(PROXY_CONTAINER), &[15001, 15021], 50 * MS);
        let out = run(
            &mut t,
            vec![(ev(Kind::ConnectFailure, 100, 0), who("app"), None)],
        );
        assert_eq!(phases(&out), vec![Phase::SidecarReady]);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::SidecarReady(_) | Output::StartupRace(_)))
        );
    }

    #[test]
    fn api_hints_and_proxy_config() {
        assert!(config_flag(
            "{\"holdApplicationUntilProxyStarts\": true}",
            "holdApplicationUntilProxyStarts"
        ));
        assert!(config_flag(
            "holdApplicationUntilProxyStarts: true\n",
            "holdApplicationUntilProxyStarts"
        ));
        assert!(!config_flag(
            "holdApplicationUntilProxyStarts: false",
            "holdApplicationUntilProxyStarts"
        ));
        assert!(!config_flag("", "holdApplicationUntilProxyStarts"));
    }

    impl KernelEvent {
        fn with_port(mut self, port: u16) -> Self {
            self.src = Some(std::net::SocketAddr::new("0.0.0.0".parse().unwrap(), port));
            self
        }
    }
}
