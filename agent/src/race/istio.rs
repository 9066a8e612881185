//! What is Istio's own, in one place a mesh profile can later replace: the
//! proxy's container name, uid, processes and ports, the annotations that
//! say a pod is injected and which mitigations it runs, and the
//! recommendations.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

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
pub(crate) const SIDECAR_PORTS: [u16; 6] = [
    CAPTURE_PORT,
    INBOUND_CAPTURE_PORT,
    15020,
    15021,
    15090,
    15000,
];
/// Process names of the sidecar (pilot-agent starts envoy).
pub(crate) const SIDECAR_COMMS: [&str; 2] = ["pilot-agent", "envoy"];
/// Inbound capture port: what reaches the pod is redirected here, and
/// Envoy dials the app from it.
pub(crate) const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The source address Envoy binds when it forwards inbound traffic to the
/// app (Istio >= 1.10, `inbound|passthrough`), and pilot-agent when it runs
/// the app's probes: `-o lo -s 127.0.0.6/32 -j RETURN` exempts it from capture.
pub(crate) const INBOUND_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// [`INBOUND_SOURCE_V4`] for IPv6 (`::6`).
pub(crate) const INBOUND_SOURCE_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// pilot-agent's process name: it runs kubelet's probes of the app,
/// rewritten to its status port.
pub(crate) const PILOT_AGENT_COMM: &str = "pilot-agent";
/// Ports Istio reserves for itself (its "ports used by Istio" list lies in
/// 15000..=15099: admin, capture, status, health, DNS, HBONE, Prometheus):
/// the proxy's dials to them are the mesh's own, never the app's.
const RESERVED_PORTS: std::ops::RangeInclusive<u16> = 15000..=15099;
/// Whether `ip` is Envoy's (and pilot-agent's) inbound source address.
pub(crate) fn inbound_source(ip: std::net::IpAddr) -> bool {
    ip == INBOUND_SOURCE_V4 || ip == INBOUND_SOURCE_V6
}

/// Whether `port` is one Istio reserves for the proxy and pilot-agent.
pub(crate) fn reserved_port(port: u16) -> bool {
    RESERVED_PORTS.contains(&port)
}
/// Variants Istio publishes of its proxy image, as suffixes of the release
/// tag (`proxyv2:1.22.3-distroless`): the proxy's version is the tag
/// without them.
const PROXY_IMAGE_VARIANTS: [&str; 2] = ["-distroless", "-debug"];

/// The proxy's version from its image (`docker.io/istio/proxyv2:1.22.3`
/// -> `1.22.3`); None when the image names no tag (digest only, or
/// untagged: which release that is cannot be read off the reference).
pub(crate) fn proxy_version(image: &str) -> Option<&str> {
    let tag = crate::attribute::revision::image_tag(image)?;
    let version = PROXY_IMAGE_VARIANTS
        .iter()
        .find_map(|v| tag.strip_suffix(v))
        .unwrap_or(tag);
    (!version.is_empty()).then_some(version)
}

/// What each sidecar port says when it starts listening, for the timelines
/// of `connscope explain`; the ports drawn there, in this order of interest.
pub(crate) const PORT_ROLES: [(u16, &str); 3] = [
    (
        15021,
        "health: what holdApplicationUntilProxyStarts and probes wait for",
    ),
    (15001, "outbound capture: the sidecar is ready"),
    (15006, "inbound capture"),
];

/// The mitigation states a runbook and `connscope explain` tell apart, with
/// the label each is printed under.
pub(crate) fn mitigation_label(m: &Mitigation) -> &'static str {
    match (m.hold, m.native_sidecar) {
        (Some(true), _) => "holdApplicationUntilProxyStarts",
        (_, Some(true)) => "native sidecar",
        (Some(false), Some(false)) | (Some(false), None) | (None, Some(false)) => "none",
        (None, None) => "unknown (no Kubernetes API: the pod's annotations would tell)",
    }
}

/// Mitigations in effect for a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
        capture: injected.then(|| CaptureRules::of(p)),
    }
}

/// An address range (`10.0.0.0/8`, `fd00::/64`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address; None if it is neither.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside (an IPv4 range holds IPv4 addresses only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Which outbound destinations a pod's rules redirect to the capture port,
/// from its `traffic.sidecar.istio.io/*` annotations and its addresses,
/// applied in istio-iptables' order (its `ISTIO_OUTPUT` chain): excluded
/// ports return first, then loopback and the pod's own addresses (they
/// leave through `lo`), then excluded ranges; what is left is captured if
/// an included range holds it (`*`: every address; empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureRules {
    /// None: `*` (istio-iptables' default when the annotation is absent).
    pub include: Option<Vec<Cidr>>,
    pub exclude: Vec<Cidr>,
    pub exclude_ports: Vec<u16>,
    /// The pod's own addresses (`status.podIPs`).
    pub pod_ips: Vec<IpAddr>,
}

impl CaptureRules {
    /// The rules of a pod as the API describes it.
    pub fn of(p: &PodInfo) -> CaptureRules {
        let a = &p.istio;
        CaptureRules::parse(
            a.include_outbound_ip_ranges.as_deref(),
            a.exclude_outbound_ip_ranges.as_deref(),
            a.exclude_outbound_ports.as_deref(),
            &p.pod_ips,
        )
    }

    /// From the annotations' values (comma-separated; entries that do not
    /// parse are skipped).
    pub fn parse(
        include: Option<&str>,
        exclude: Option<&str>,
        exclude_ports: Option<&str>,
        pod_ips: &[IpAddr],
    ) -> CaptureRules {
        let items = |v: &str| -> Vec<String> {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let include = include.and_then(|v| {
            let list = items(v);
            if list.iter().any(|s| s == "*") {
                None
            } else {
                Some(list.iter().filter_map(|s| Cidr::parse(s)).collect())
            }
        });
        CaptureRules {
            include,
            exclude: exclude
                .map(|v| items(v).iter().filter_map(|s| Cidr::parse(s)).collect())
                .unwrap_or_default(),
            exclude_ports: exclude_ports
                .map(|v| items(v).iter().filter_map(|s| s.parse().ok()).collect())
                .unwrap_or_default(),
            pod_ips: pod_ips.to_vec(),
        }
    }

    /// Whether a TCP connect to `dst` from a socket bound to `src` is
    /// redirected to the capture port.
    pub fn captures(&self, dst: SocketAddr, src: Option<IpAddr>) -> bool {
        let ip = dst.ip();
        if self.exclude_ports.contains(&dst.port()) {
            return false;
        }
        if ip.is_loopback() || self.pod_ips.contains(&ip) || src == Some(ip) {
            return false;
        }
        if self.exclude.iter().any(|c| c.contains(ip)) {
            return false;
        }
        match &self.include {
            None => true,
            Some(list) => list.iter().any(|c| c.contains(ip)),
        }
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

/// What to do about an inbound race or a bind mismatch; `ports`: the app
/// ports refused, `bound`: where the app listened instead (bind), `dialed`:
/// where the proxy dialed (bind), `native`: istio-proxy runs as a native
/// sidecar.
pub(super) fn inbound_recommendation(
    when: super::inbound::When,
    ports: &[u16],
    bound: &[String],
    dialed: &[String],
    native: Option<bool>,
) -> String {
    use super::inbound::When;
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match when {
        When::Startup => format!(
            "the proxy forwarded requests to the app on port {ports} before the app listened there: add a readinessProbe (or a startupProbe) on port {ports}, so the pod is not Ready and gets no traffic before the app listens (holdApplicationUntilProxyStarts does not help in this direction)"
        ),
        When::Shutdown => {
            let native = if native == Some(true) {
                "istio-proxy runs as a native sidecar and stops after the app, so the app's own drain is what matters"
            } else {
                "with native sidecars the proxy stops after the app, so the app's own drain is what matters"
            };
            format!(
                "the app closed its listener on port {ports} while requests still came: add a preStop delay to the app (e.g. sleep 5-15 s, longer than endpoint propagation) so it keeps serving until the pod is removed from endpoints, and match the proxy's drain (terminationDrainDuration, EXIT_ON_ZERO_ACTIVE_CONNECTIONS); {native}"
            )
        }
        When::Bind => format!(
            "the app listens on {} only, while the proxy dials {}: make the app listen on 0.0.0.0 (or ::) or the pod IP (Istio analyzer IST0143)",
            bound.join(", "),
            dialed.join(", ")
        ),
    }
}

/// The Kubernetes Event reason of an inbound summary.
pub(crate) fn inbound_reason(when: super::inbound::When) -> &'static str {
    use super::inbound::When;
    match when {
        When::Startup => "InboundStartupRace",
        When::Shutdown => "InboundShutdownRace",
        When::Bind => "AppBoundToLocalhost",
    }
}

#[cfg(test)]
mod tests {
    use super::proxy_version;

    #[test]
    fn the_proxy_version_is_its_image_tag_without_the_variant() {
        for (image, version) in [
            ("docker.io/istio/proxyv2:1.22.3", Some("1.22.3")),
            (
                "gcr.io/istio-release/proxyv2:1.24.1-distroless",
                Some("1.24.1"),
            ),
            ("istio/proxyv2:1.23.0-debug", Some("1.23.0")),
            (
                "registry:5000/istio/proxyv2:1.22.3@sha256:0123",
                Some("1.22.3"),
            ),
            ("docker.io/istio/proxyv2@sha256:0123abcd", None),
            ("registry:5000/istio/proxyv2", None),
            ("istio/proxyv2:-distroless", None),
        ] {
            assert_eq!(proxy_version(image), version, "{image}");
        }
    }
}
