//! The tracker: events re-ordered by kernel time in a short window, failures
//! held while their pod's injection is unknown (bounded in count and time),
//! timers for shutdown summaries and idle pods, and the per-pod states.

use std::{collections::VecDeque, sync::Arc};

use super::{
    Capture, Config, Hints, Output, Phase,
    ambient::Ambient,
    capture::Resets,
    inbound::{Due, When},
    pod::{ECONNREFUSED, PodState},
    summary::{AppListen, InboundSummary, RaceSummary, ShutdownSummary, SidecarReady},
};
use crate::{
    attribute::Attribution,
    kernel::decode::{KernelEvent, Kind},
};

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
    /// Recent capture resets, waiting for the failures they prove captured.
    resets: Resets,
    /// Ambient pods' enrollment, by network namespace.
    ambient: Ambient,
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
            resets: Resets::default(),
            ambient: Ambient::default(),
            stats: Stats::default(),
        }
    }

    /// Pods with state.
    /// The mesh profiles in effect.
    pub(crate) fn profiles(&self) -> &Arc<super::Profiles> {
        &self.cfg.profiles
    }

    pub(crate) fn pods_tracked(&self) -> usize {
        self.pods.len()
    }

    /// The pods known to be injected, by their pod-level attribution.
    pub(crate) fn injected_pods(&self) -> impl Iterator<Item = (&str, &Arc<Attribution>)> {
        self.pods
            .iter()
            .filter(|(_, p)| p.injected == Some(true))
            .map(|(uid, p)| (uid.as_str(), &p.who))
    }

    /// Failures held for their pod's injection to be known.
    pub(crate) fn held(&self) -> usize {
        self.held_total
    }

    /// Capture resets waiting for their failures.
    #[cfg(test)]
    pub(crate) fn capture_resets(&self) -> usize {
        self.resets.len()
    }

    /// Whether the pipeline should gather [`Hints`] for this pod: its
    /// injection is not known yet, or (when the API is watched and the
    /// kernel gives no capture proof) its capture settings are not.
    pub(crate) fn wants_hints(&self, pod_uid: &str, api: bool) -> bool {
        self.pods.get(pod_uid).is_none_or(|p| {
            p.injected.is_none()
                || (api
                    && !self.cfg.kernel_capture
                    && p.injected == Some(true)
                    && p.capture.is_none())
        })
    }

    /// Queues an event; it is applied once older than the re-order window.
    pub(crate) fn push(&mut self, ev: KernelEvent, who: Arc<Attribution>, hints: Option<Hints>) {
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
                self.ambient.forget(&uid);
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
    pub(crate) fn flush(&mut self, out: &mut Vec<Output>) {
        self.advance(u64::MAX, out);
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.finalise(&uid, out);
        }
    }

    /// The pod's cgroup was removed at kernel time `mono_ns`: its state is
    /// finalised (pending summaries emitted) and freed.
    pub(crate) fn pod_gone(&mut self, uid: String, mono_ns: u64) {
        self.gone.push((uid, mono_ns));
    }

    /// Marks a pod's sidecar as already listening when the agent started
    /// (reconstructed from /proc/<pid>/net/tcp*).
    pub(crate) fn restore_ready(
        &mut self,
        who: Arc<Attribution>,
        mesh: &Arc<super::Profile>,
        ports: &[u16],
        now_ns: u64,
    ) {
        let Some(uid) = who.pod_uid.clone() else {
            return;
        };
        let p = self.pods.entry(uid).or_default();
        p.restore_ready(who, mesh, ports, now_ns);
    }

    /// Marks a pod's app as already listening on `listeners` when the agent
    /// started (reconstructed from /proc/<pid>/net/tcp*).
    pub(crate) fn restore_app(
        &mut self,
        who: Arc<Attribution>,
        listeners: &[std::net::SocketAddr],
        now_ns: u64,
    ) {
        let Some(uid) = who.pod_uid.clone() else {
            return;
        };
        let p = self.pods.entry(uid).or_default();
        p.last_seen_ns = p.last_seen_ns.max(now_ns);
        p.inbound.restore(listeners);
    }

    /// What the API says of a pod, for ambient enrollment.
    pub(crate) fn ambient_api(&mut self, p: &crate::k8s::PodInfo) {
        self.ambient.api(p, self.cfg.profiles.ambient());
    }

    /// The API deleted a pod.
    pub(crate) fn ambient_forget(&mut self, uid: &str) {
        self.ambient.forget(uid);
    }

    /// Pods already running in netns `ns` at agent start, with the ports
    /// listening there.
    pub(crate) fn restore_ambient(
        &mut self,
        ns: u32,
        pods: &[Arc<Attribution>],
        ports: &[u16],
        now_ns: u64,
    ) {
        self.ambient
            .restore(ns, pods, ports, now_ns, self.cfg.profiles.ambient());
    }

    /// Applies one event, in kernel-time order: the pod's handler for its
    /// kind, then whatever became due.
    fn apply(
        &mut self,
        ev: KernelEvent,
        who: Arc<Attribution>,
        hints: Option<Hints>,
        out: &mut Vec<Output>,
    ) {
        if ev.kind == Kind::CaptureReset {
            self.resets
                .add(&ev, self.cfg.capture_match_ns, self.cfg.max_capture_resets);
            return;
        }
        // The kernel's proof, taken in kernel-time order (the reset comes
        // just before its failure), also for failures then held.
        let kernel = (ev.kind == Kind::ConnectFailure && self.cfg.kernel_capture).then(|| {
            ev.errno == ECONNREFUSED && self.resets.take_match(&ev, self.cfg.capture_match_ns)
        });
        // ztunnel refused on a pod's HBONE port: that pod's missing listener.
        let hbone = self
            .ambient
            .hbone_destination(&ev, self.cfg.profiles.ambient());
        let who = hbone.clone().unwrap_or(who);
        self.ambient.observe(&ev, &who, self.cfg.profiles.ambient());
        // A second handle keeps the pod's uid borrowable while `who` moves on
        // with the event: the uid is copied only for a new pod, not per event.
        let attr = Arc::clone(&who);
        let Some(uid) = attr.pod_uid.as_deref() else {
            let failure = ev.kind == Kind::ConnectFailure;
            let phase = failure.then_some(Phase::NoSidecar);
            let capture = failure.then_some(Capture::of(kernel, false));
            out.push(Output::Event {
                ev,
                who,
                phase,
                capture,
                mesh: None,
            });
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
        let is_proxy = p.observe(&ev, &who, hints.as_ref(), cfg);
        let capture = (ev.kind == Kind::ConnectFailure).then(|| p.evidence(kernel, cfg));
        let ambient = match ev.kind {
            Kind::ConnectFailure if hbone.is_some() => Some(Phase::Proxy),
            Kind::ConnectFailure if !is_proxy && p.injected != Some(true) => {
                self.ambient.classify(uid, &ev, cfg.profiles.ambient())
            }
            _ => None,
        };
        let phase = match ev.kind {
            Kind::Exec => {
                p.on_exec(&ev, &who, cfg);
                None
            }
            Kind::Exit => {
                p.on_exit(&ev);
                None
            }
            Kind::Listen | Kind::ListenClose => {
                p.on_listen(&ev, &who, is_proxy, cfg);
                None
            }
            Kind::CaptureReset => None,
            // The proxy's failures need no injection verdict (the dialer
            // is the proxy): classified at once, in kernel-time order with
            // the app's listeners.
            Kind::ConnectFailure if ambient.is_some() => ambient,
            Kind::ConnectFailure if is_proxy => Some(p.classify_proxy(&ev)),
            Kind::ConnectFailure if p.injected.is_none() => {
                p.held.push((ev, who, kernel));
                self.held_total += 1;
                self.stats.held += 1;
                self.after_change(uid, out);
                self.enforce_hold_limit(out);
                return;
            }
            Kind::ConnectFailure => Some(p.classify(&ev, &who, kernel, cfg)),
        };
        let mesh = match ambient {
            Some(_) => Some(self.cfg.profiles.ambient().mesh.clone()),
            None => p.mesh_label(),
        };
        out.push(Output::Event {
            ev,
            who,
            phase,
            capture,
            mesh,
        });
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
                    mesh: p.mesh().to_string(),
                });
            }
            let held = std::mem::take(&mut p.held);
            self.held_total -= held.len();
            for (ev, who, kernel) in held {
                let ambient = (!inj)
                    .then(|| self.ambient.classify(uid, &ev, self.cfg.profiles.ambient()))
                    .flatten();
                let phase = if inj {
                    p.classify(&ev, &who, kernel, &self.cfg)
                } else {
                    ambient.unwrap_or(Phase::NoSidecar)
                };
                out.push(Output::Event {
                    ev,
                    who,
                    phase: Some(phase),
                    capture: Some(p.evidence(kernel, &self.cfg)),
                    mesh: match ambient {
                        Some(_) => Some(self.cfg.profiles.ambient().mesh.clone()),
                        None => p.mesh_label(),
                    },
                });
            }
        }
        if let Some(ready) = p.ready_ns
            && !p.ready_emitted
            && p.injected == Some(true)
        {
            p.ready_emitted = true;
            out.push(Output::SidecarReady(SidecarReady::of(p, ready)));
        }
        if let Some(listen) = p.inbound.first_listen_ns
            && !p.inbound.listen_reported
        {
            p.inbound.listen_reported = true;
            if let Some(a) = AppListen::of(p, listen) {
                out.push(Output::AppListen(a));
            }
        }
    }

    fn enforce_hold_limit(&mut self, out: &mut Vec<Output>) {
        while self.held_total > self.cfg.max_held {
            // Classify the pod holding the oldest failure with what is known.
            let Some(uid) = self
                .pods
                .iter()
                .filter_map(|(u, p)| p.held.first().map(|(e, ..)| (e.mono_ns, u.clone())))
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
        let horizon = now_ns.saturating_sub(cfg.reorder_ns);
        // One walk. Held events are released before shutdown summaries (a
        // released refusal may belong to the episode), and idle pods go last.
        let due = Due {
            settle_ns: cfg.startup_settle_ns,
            quiet_ns: cfg.shutdown_quiet_ns,
            max_ns: cfg.inbound_max_ns,
        };
        let mut inbound = Vec::new();
        for (uid, p) in &mut self.pods {
            for when in p.inbound.due(now_ns, horizon, &due) {
                inbound.push((uid.clone(), when));
            }
            // The start-up window closes once every refusal sent before the
            // LISTEN has surely been applied.
            if p.ready_emitted
                && !p.startup_emitted
                && p.ready_ns
                    .is_some_and(|r| horizon >= r.saturating_add(cfg.startup_settle_ns))
            {
                p.startup_emitted = true;
                if p.startup.count > 0 {
                    out.push(Output::StartupRace(RaceSummary::of(p)));
                }
            }
            if p.shutdown.count > 0
                && now_ns.saturating_sub(p.shutdown.last_ns) > cfg.shutdown_quiet_ns
            {
                shutdown.push(uid.clone());
            }
            if p.held
                .first()
                .is_some_and(|(e, ..)| now_ns.saturating_sub(e.mono_ns) > cfg.hold_ns)
            {
                expire.push(uid.clone());
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
                out.push(Output::ShutdownRace(ShutdownSummary::of(p)));
                p.shutdown = Default::default();
            }
        }
        for (uid, when) in inbound {
            if let Some(p) = self.pods.get_mut(&uid) {
                out.push(Output::InboundRace(InboundSummary::of(p, when)));
                p.inbound.reset(when);
            }
        }
        for uid in idle {
            self.finalise(&uid, out);
        }
        let mut ambient = Vec::new();
        self.ambient.timers(
            now_ns,
            cfg.ambient_grace_ns,
            cfg.profiles.ambient(),
            &mut ambient,
        );
        out.extend(ambient.into_iter().map(Output::Ambient));
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
            out.push(Output::StartupRace(RaceSummary::of(&p)));
        }
        if p.shutdown.count > 0 {
            out.push(Output::ShutdownRace(ShutdownSummary::of(&p)));
        }
        for when in [When::Startup, When::Shutdown, When::Bind] {
            if p.inbound.episode(when).count > 0 {
                out.push(Output::InboundRace(InboundSummary::of(&p, when)));
            }
        }
    }
}
