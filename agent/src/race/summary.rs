//! What the tracker reports once per pod and episode: the sidecar became
//! ready, a startup race, a shutdown race.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{
    inbound::When,
    mesh::{Mitigation, Profile},
    pod::PodState,
};
use crate::attribute::{Attribution, revision::Revision};

/// The pod's mesh profile: a summary is only made for a pod whose proxy
/// was seen, so one is known; the installed default otherwise.
fn mesh_of(p: &PodState) -> Arc<Profile> {
    p.profile
        .clone()
        .unwrap_or_else(|| super::mesh::installed().default_profile().clone())
}

/// Kernel times of a pod's start-up that no other event carries, so that
/// `connscope explain` can draw the pod's timeline from its summaries alone
/// (process events are off by default, and `/events` keeps few lines). Each
/// field is absent when unknown (e.g. the pod started before the agent).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartTimes {
    /// The pod's first process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_start_mono_ns: Option<u64>,
    /// The sidecar's first process (pilot-agent or envoy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_start_mono_ns: Option<u64>,
    /// Each container's first exec, by container name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub container_start_mono_ns: BTreeMap<String, u64>,
    /// Each sidecar port's first LISTEN by the proxy (15021, 15001...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sidecar_listen_mono_ns: BTreeMap<u16, u64>,
}

impl StartTimes {
    fn of(p: &PodState) -> Self {
        StartTimes {
            pod_start_mono_ns: p.first_process_ns,
            sidecar_start_mono_ns: p.sidecar_start_ns,
            container_start_mono_ns: p.container_start_ns.clone(),
            sidecar_listen_mono_ns: p.listen_ns.clone(),
        }
    }
}

/// One pod's `sidecar_ready` event.
#[derive(Debug, Clone, Serialize)]
pub struct SidecarReady {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    #[serde(flatten)]
    pub starts: StartTimes,
    /// The pod's mesh profile (`istio`, `linkerd`...).
    pub mesh: String,
    pub ready_mono_ns: u64,
    /// Pod's first process -> 15001 listening.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_start_to_ready_seconds: Option<f64>,
    /// Sidecar's first process -> 15001 listening (istiod push latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar_start_to_ready_seconds: Option<f64>,
    pub mitigation: Mitigation,
    /// What the pod runs (images, proxy version, revisions, node), filled
    /// in by the pipeline from the API or the runtime's files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<Arc<Revision>>,
}

/// One pod's startup-race summary.
#[derive(Debug, Clone, Serialize)]
pub struct RaceSummary {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    #[serde(flatten)]
    pub starts: StartTimes,
    /// The pod's mesh profile (`istio`, `linkerd`...).
    pub mesh: String,
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
    /// What the pod runs (images, proxy version, revisions, node), filled
    /// in by the pipeline from the API or the runtime's files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<Arc<Revision>>,
}

/// One pod's shutdown-race summary.
#[derive(Debug, Clone, Serialize)]
pub struct ShutdownSummary {
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    #[serde(flatten)]
    pub starts: StartTimes,
    /// The pod's mesh profile (`istio`, `linkerd`...).
    pub mesh: String,
    pub refused: u64,
    pub capture_closed_mono_ns: u64,
    pub first_refusal_mono_ns: u64,
    pub last_refusal_mono_ns: u64,
    pub destinations: Vec<String>,
    pub recommendation: String,
    /// What the pod runs (images, proxy version, revisions, node), filled
    /// in by the pipeline from the API or the runtime's files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<Arc<Revision>>,
}

impl SidecarReady {
    /// The pod's sidecar listened on the capture port at `ready` (kernel ns).
    pub(super) fn of(p: &PodState, ready: u64) -> Self {
        SidecarReady {
            who: p.who.clone(),
            starts: StartTimes::of(p),
            mesh: p.mesh().to_string(),
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
            revision: None,
        }
    }
}

impl RaceSummary {
    /// The pod's startup race so far.
    pub(super) fn of(p: &PodState) -> Self {
        let ready = p.ready_ns.filter(|&r| r > 0);
        RaceSummary {
            who: p.who.clone(),
            starts: StartTimes::of(p),
            mesh: p.mesh().to_string(),
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
            recommendation: mesh_of(p).startup_recommendation(&p.mitigation, ready.is_some()),
            revision: None,
        }
    }
}

impl ShutdownSummary {
    /// The pod's shutdown race so far.
    pub(super) fn of(p: &PodState) -> Self {
        ShutdownSummary {
            who: p.who.clone(),
            starts: StartTimes::of(p),
            mesh: p.mesh().to_string(),
            refused: p.shutdown.count,
            capture_closed_mono_ns: p.closed_ns.unwrap_or(0),
            first_refusal_mono_ns: p.shutdown.first_ns,
            last_refusal_mono_ns: p.shutdown.last_ns,
            destinations: p.shutdown.dests.iter().map(|d| d.to_string()).collect(),
            recommendation: mesh_of(p).shutdown_recommendation(),
            revision: None,
        }
    }
}

/// One pod's inbound episode: the proxy refused by the pod's own app at
/// start-up, at shutdown, or for a bind mismatch (`inbound_race`).
#[derive(Debug, Clone, Serialize)]
pub struct InboundSummary {
    /// The pod, with `container` the app container when known.
    #[serde(flatten)]
    pub who: Arc<Attribution>,
    #[serde(flatten)]
    pub starts: StartTimes,
    /// The pod's mesh profile (`istio`, `linkerd`...).
    pub mesh: String,
    pub when: When,
    /// The app ports refused.
    pub ports: Vec<u16>,
    /// The proxy's refused dials in this episode (probes excluded).
    pub refused: u64,
    pub first_refusal_mono_ns: u64,
    pub last_refusal_mono_ns: u64,
    /// Start-up: the app's first LISTEN on the refused ports (the latest of
    /// them), if it came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_listen_mono_ns: Option<u64>,
    /// Shutdown: when the app's listener closed (the earliest of the
    /// refused ports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener_close_mono_ns: Option<u64>,
    /// Start-up: first refusal -> app listen; shutdown: listener close ->
    /// last refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<f64>,
    /// Bind: the addresses the app listened on instead.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bound_addresses: Vec<String>,
    pub recommendation: String,
    /// What the pod runs, filled in by the pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<Arc<Revision>>,
}

impl InboundSummary {
    /// The pod's `when` episode so far.
    pub(super) fn of(p: &PodState, when: When) -> Self {
        let a = &p.inbound;
        let ep = a.episode(when);
        let (listen, close) = match when {
            When::Startup => (a.startup_listened_ns(), None),
            When::Shutdown => (None, a.shutdown_closed_ns()),
            When::Bind => (None, None),
        };
        let window = match when {
            When::Startup => listen
                .filter(|&l| l >= ep.first_ns)
                .map(|l| secs(l - ep.first_ns)),
            When::Shutdown => close
                .filter(|&c| ep.last_ns >= c)
                .map(|c| secs(ep.last_ns - c)),
            When::Bind => None,
        };
        let ports: Vec<u16> = ep.ports.iter().copied().collect();
        let bound: Vec<String> = ep.bound.iter().map(|b| b.to_string()).collect();
        let dialed: Vec<String> = ep.dialed.iter().map(|d| d.to_string()).collect();
        let who = Arc::new(Attribution {
            container: a.container(when),
            ..(*p.who).clone()
        });
        InboundSummary {
            who,
            starts: StartTimes::of(p),
            mesh: p.mesh().to_string(),
            when,
            recommendation: mesh_of(p).inbound_recommendation(
                when,
                &ports,
                &bound,
                &dialed,
                p.mitigation.native_sidecar,
            ),
            ports,
            refused: ep.count,
            first_refusal_mono_ns: ep.first_ns,
            last_refusal_mono_ns: ep.last_ns,
            app_listen_mono_ns: listen,
            listener_close_mono_ns: close,
            window_seconds: window,
            bound_addresses: bound,
            revision: None,
        }
    }
}

/// The pod's app listened for the first time: `connscope_app_listen_seconds`.
#[derive(Debug, Clone)]
pub struct AppListen {
    /// The pod (pod level).
    pub who: Arc<Attribution>,
    /// The pod's mesh profile.
    pub mesh: String,
    /// Pod's first process -> the app's first LISTEN.
    pub seconds: f64,
}

impl AppListen {
    /// None when the pod's start was not seen (it ran before the agent).
    pub(super) fn of(p: &PodState, listen: u64) -> Option<Self> {
        let first = p.first_process_ns.filter(|&f| f <= listen && listen > 0)?;
        Some(AppListen {
            who: p.who.clone(),
            mesh: p.mesh().to_string(),
            seconds: secs(listen - first),
        })
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}
