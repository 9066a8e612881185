//! What the tracker reports once per pod and episode: the sidecar became
//! ready, a startup race, a shutdown race.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{
    istio::{self, Mitigation},
    pod::PodState,
};
use crate::attribute::{Attribution, revision::Revision};

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
            recommendation: istio::startup_recommendation(&p.mitigation, ready.is_some()),
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
            refused: p.shutdown.count,
            capture_closed_mono_ns: p.closed_ns.unwrap_or(0),
            first_refusal_mono_ns: p.shutdown.first_ns,
            last_refusal_mono_ns: p.shutdown.last_ns,
            destinations: p.shutdown.dests.iter().map(|d| d.to_string()).collect(),
            recommendation: istio::SHUTDOWN_RECOMMENDATION.to_string(),
            revision: None,
        }
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}
