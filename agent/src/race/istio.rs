//! What is Istio's own, in one place a mesh profile can later replace: the
//! proxy's container name, uid, processes and ports, the annotations that
//! say a pod is injected and which mitigations it runs, and the
//! recommendations.

use serde::Serialize;

use super::Hints;
use crate::k8s::PodInfo;

/// The Istio proxy container's name.
pub(crate) const PROXY_CONTAINER: &str = "istio-proxy";
/// The proxy's uid (istio-iptables exempts it from capture).
pub(crate) const PROXY_UID: u32 = 1337;
/// Outbound capture port: the sidecar is ready when it listens.
pub(crate) const CAPTURE_PORT: u16 = 15001;
/// Ports whose LISTEN by the proxy uid marks a pod as injected: outbound
/// and inbound capture, pilot-agent status, health, Prometheus, admin.
pub(crate) const SIDECAR_PORTS: [u16; 6] = [15001, 15006, 15020, 15021, 15090, 15000];
/// Process names of the sidecar (pilot-agent starts envoy).
pub(crate) const SIDECAR_COMMS: [&str; 2] = ["pilot-agent", "envoy"];

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

/// What to do about a startup race, given the pod's mitigations and whether
/// the sidecar became ready (`ready`) while we watched.
pub(super) fn startup_recommendation(m: &Mitigation, ready: bool) -> String {
    match (m.hold, m.native_sidecar, ready) {
        (_, _, false) => "the sidecar never listened on its outbound port while the app was refused: check istio-proxy logs and istiod connectivity".to_string(),
        (Some(true), _, _) => "holdApplicationUntilProxyStarts is on, yet the app dialed before the proxy's outbound listener (15001) existed: the proxy reported ready before istiod pushed its listeners; check istiod push latency and the proxy readiness configuration".to_string(),
        (_, Some(true), _) => "istio-proxy runs as a native sidecar, yet the app dialed before 15001 listened: check the istio-proxy startupProbe so the app starts only when the proxy is ready".to_string(),
        _ => "enable holdApplicationUntilProxyStarts for this workload (pod annotation proxy.istio.io/config: '{\"holdApplicationUntilProxyStarts\": true}'), or run istio-proxy as a native sidecar (Istio >= 1.27 on Kubernetes >= 1.33), or make the app retry its start-up connections".to_string(),
    }
}

/// What to do about a shutdown race.
pub(super) const SHUTDOWN_RECOMMENDATION: &str = "the sidecar stopped listening before the app finished: set EXIT_ON_ZERO_ACTIVE_CONNECTIONS / terminationDrainDuration, use native sidecars (they stop after the app), or have the app stop dialing on SIGTERM";
