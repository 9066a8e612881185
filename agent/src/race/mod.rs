//! The sidecar startup race: a per-pod timeline built from kernel events, a
//! phase for every connect failure, and one summary per pod.
//!
//! In an Istio pod every outbound TCP connect is redirected to 15001. Until
//! the sidecar listens there (the listener arrives over xDS after Envoy
//! starts), the application's connects are refused. Classification compares
//! kernel timestamps, never arrival order: events are re-ordered in a short
//! window before they are applied ([`Tracker`]), and a failure whose pod's
//! injection is not yet known is held (bounded in count and time), then
//! classified. Each pod's timeline and its handlers live in `pod`, the
//! summaries in `summary`, and what is Istio's own (ports, uid, names,
//! annotations, recommendations) in `istio`.

pub mod ambient;
mod capture;
mod inbound;
pub mod istio;
pub mod mesh;
mod pod;
mod summary;
mod tracker;

use std::sync::Arc;

use serde::Serialize;

use crate::{attribute::Attribution, kernel::decode::KernelEvent};
pub use ambient::{AmbientEnrollment, AmbientOut, AmbientProfile, Enrollment};
pub use inbound::When;
pub use istio::CaptureRules;
pub use mesh::{Mitigation, Profile, Profiles, config_flag};
pub use summary::{
    AppListen, InboundSummary, RaceSummary, ShutdownSummary, SidecarReady, StartTimes,
};
pub use tracker::{Stats, Tracker};

/// Where a connect failure stands relative to the pod's sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Refused, application container of an injected pod, before the
    /// sidecar's capture port (15001) listened, and the connect was captured
    /// (redirected to the capture port; see [`Capture`]).
    StartupRace,
    /// Refused after the capture listener closed while the app still ran,
    /// and captured.
    ShutdownRace,
    /// Refused in an injected pod while the capture port was not listening,
    /// but the connect was never redirected to it (excluded by the pod's
    /// capture settings, outside its included ranges, or the pod's own
    /// address): the destination itself refused. Not the race.
    NotCaptured,
    /// The pod's sidecar was ready: the failure is not the race.
    SidecarReady,
    /// Injected pod, capture port not listening, and a failure the missing
    /// listener cannot explain: traffic that bypasses the sidecar (loopback,
    /// AF_UNIX, errors other than refusal).
    SidecarNotReady,
    /// The proxy's own connects (uid 1337 or the istio-proxy container),
    /// other than the ones below.
    Proxy,
    /// The pod's proxy dialed the pod's own app (see `inbound`) and was
    /// refused on a port the app had never listened on when the attempt
    /// began: the app's start-up window.
    InboundStartup,
    /// The pod's proxy was refused by the pod's own app after the app's
    /// listener on that port closed: the app's shutdown window.
    InboundShutdown,
    /// The pod's proxy was refused by the pod's own app while the app
    /// listened on that port, but only on addresses the dial did not go to
    /// (127.0.0.1 while the proxy dials the pod IP): misconfiguration.
    InboundBind,
    /// pilot-agent dialing the pod's own app: a rewritten kubelet probe.
    /// Never the race.
    Probe,
    /// Not an injected pod, or not a pod.
    NoSidecar,
}

impl Phase {
    /// Label value used in metrics and events.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::StartupRace => "startup_race",
            Phase::ShutdownRace => "shutdown_race",
            Phase::NotCaptured => "not_captured",
            Phase::SidecarReady => "sidecar_ready",
            Phase::SidecarNotReady => "sidecar_not_ready",
            Phase::Proxy => "proxy",
            Phase::InboundStartup => "inbound_startup",
            Phase::InboundShutdown => "inbound_shutdown",
            Phase::InboundBind => "inbound_bind",
            Phase::Probe => "probe",
            Phase::NoSidecar => "no_sidecar",
        }
    }
}

/// What a connect failure's capture verdict (was it redirected to the
/// capture port?) rests on; `capture` in its JSON line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// The kernel: a reset with no socket from the capture port to the
    /// failed socket's address (`tcp:tcp_send_reset`, kernels >= 6.10).
    Kernel,
    /// The pod's capture settings from the API (Istio's include and exclude
    /// annotations, the pod's own addresses).
    Annotations,
    /// Neither: every non-loopback destination other than the socket's own
    /// address is taken as captured (istio-iptables' defaults).
    Inferred,
}

impl Capture {
    /// The best evidence there is: the kernel's proof when it gives one
    /// (`kernel` is Some), else the pod's settings from the API when known,
    /// else inference.
    pub(crate) fn of(kernel: Option<bool>, settings_known: bool) -> Capture {
        if kernel.is_some() {
            Capture::Kernel
        } else if settings_known {
            Capture::Annotations
        } else {
            Capture::Inferred
        }
    }
}

/// Tunables (the meshes' ports, uids and names are their profiles).
#[derive(Debug, Clone)]
pub struct Config {
    /// The mesh profiles in effect.
    pub profiles: Arc<Profiles>,
    /// How long events are kept to be applied in kernel-timestamp order.
    pub reorder_ns: u64,
    /// How long a failure may wait for its pod's injection to be known.
    pub hold_ns: u64,
    /// Held failures at most (oldest classified early beyond it).
    pub max_held: usize,
    /// Quiet time after the last shutdown refusal before its summary.
    pub shutdown_quiet_ns: u64,
    /// An inbound episode open this long is reported (a port the app never
    /// listens on, a bind mismatch under steady traffic), and the next
    /// refusal begins a new one. The inbound start-up episode otherwise
    /// ends `startup_settle_ns` after the app listened on every refused
    /// port, the shutdown and bind ones after `shutdown_quiet_ns` without
    /// a refusal; all of them when the pod is gone.
    pub inbound_max_ns: u64,
    /// How long after the capture listener's LISTEN the start-up summary
    /// waits: a refusal whose SYN went out before the LISTEN may be
    /// reported after it (on one host, microseconds to milliseconds later;
    /// under emulation, more), and still belongs to the window.
    pub startup_settle_ns: u64,
    /// A pod with no event for this long is finalised and forgotten.
    pub idle_ns: u64,
    /// Pods tracked at most (least recently seen finalised beyond it).
    pub max_pods: usize,
    /// The kernel reports capture resets (the `tcp:tcp_send_reset` hook is
    /// attached and the kernel fires it without a socket): a refusal is
    /// captured exactly when such a reset matches it.
    pub kernel_capture: bool,
    /// The ports the kernel reports capture resets from: its proof holds
    /// for a pod whose mesh captures to one of them.
    pub kernel_capture_ports: Vec<u16>,
    /// How long before a failure its capture reset may be (kernel time).
    pub capture_match_ns: u64,
    /// Capture resets kept at most, waiting for their failure.
    pub max_capture_resets: usize,
    /// An ambient pod without ztunnel's HBONE listener this long is reported.
    pub ambient_grace_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            profiles: Arc::new(Profiles::builtin()),
            reorder_ns: 20_000_000,
            hold_ns: 5_000_000_000,
            max_held: 10_000,
            shutdown_quiet_ns: 2_000_000_000,
            startup_settle_ns: 1_000_000_000,
            inbound_max_ns: 120_000_000_000,
            idle_ns: 120_000_000_000,
            max_pods: 20_000,
            kernel_capture: false,
            kernel_capture_ports: Vec::new(),
            capture_match_ns: 1_000_000_000,
            max_capture_resets: 4096,
            ambient_grace_ns: 30_000_000_000,
        }
    }
}

/// What other sources say of a pod, gathered by the pipeline.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    /// Injected according to the API (a mesh's marks or proxy container).
    pub injected: Option<bool>,
    /// The pod's mesh according to the API.
    pub profile: Option<Arc<Profile>>,
    pub mitigation: Mitigation,
    /// Names of the pod's containers found on the node (runtime metadata).
    pub container_names: Vec<String>,
    /// Which destinations the pod's capture rules redirect (from the API).
    pub capture: Option<CaptureRules>,
}

/// Hints from the API's view of a pod: its mesh by the profiles' marks,
/// the mitigations in effect, its capture settings.
pub fn api_hints(profiles: &Profiles, p: &crate::k8s::PodInfo) -> Hints {
    let profile = profiles.of_pod(p).cloned();
    Hints {
        injected: Some(profile.is_some()),
        mitigation: profile
            .as_ref()
            .map(|m| m.mitigation(p))
            .unwrap_or_default(),
        container_names: p.containers.iter().map(|c| c.name.clone()).collect(),
        capture: profile.as_ref().map(|m| CaptureRules::of(m, p)),
        profile,
    }
}

/// What the tracker produces, in kernel-time order.
#[derive(Debug, Clone)]
pub enum Output {
    /// A kernel event, with its phase if it is a connect failure and what
    /// the failure's capture verdict rests on.
    Event {
        ev: KernelEvent,
        who: Arc<Attribution>,
        phase: Option<Phase>,
        capture: Option<Capture>,
        /// The pod's mesh (its profile's name, or `istio-ambient`), when
        /// it has one.
        mesh: Option<Arc<str>>,
    },
    /// A pod first seen starting, once its injection is known.
    PodStarted {
        who: Arc<Attribution>,
        injected: bool,
        /// The pod's mesh (`none`).
        mesh: String,
    },
    SidecarReady(SidecarReady),
    StartupRace(RaceSummary),
    ShutdownRace(ShutdownSummary),
    /// The pod's app listened for the first time (once per pod, when the
    /// pod's start was seen).
    AppListen(AppListen),
    /// An inbound race (start-up, shutdown) or bind mismatch of one pod.
    InboundRace(InboundSummary),
    /// An ambient pod's enrollment changed, or the unenrolled set did.
    Ambient(AmbientOut),
}

#[cfg(test)]
mod tests;
