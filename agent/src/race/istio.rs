//! What of Istio is code, not profile data: its capture rules' semantics
//! (istio-iptables' order, which the other meshes' rules share), the proxy
//! version read off its image, and the constants of the test bed's
//! stand-ins. Everything else Istio's is the `istio` profile
//! (`mesh/profiles.toml`).

use std::net::{IpAddr, SocketAddr};

use super::{Profile, mesh::Uncaptured};
use crate::k8s::PodInfo;

/// The Istio proxy container's name (the test bed's and the revision
/// reader's; the race reads it from the `istio` profile).
#[cfg(any(test, feature = "testbed"))]
pub(crate) const PROXY_CONTAINER: &str = "istio-proxy";
/// The proxy's uid (the test bed's stand-ins run as it).
#[cfg(any(test, feature = "testbed"))]
pub(crate) const PROXY_UID: u32 = 1337;
/// Inbound capture port: what reaches the pod is redirected here, and
/// Envoy dials the app from it (the test bed's stand-in).
#[cfg(any(test, feature = "testbed"))]
pub(crate) const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The source address Envoy binds when it forwards inbound traffic to the
/// app (Istio >= 1.10, `inbound|passthrough`), and pilot-agent when it runs
/// the app's probes (the test bed's stand-ins).
#[cfg(any(test, feature = "testbed"))]
pub(crate) const INBOUND_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// [`INBOUND_SOURCE_V4`] for IPv6 (`::6`).
#[cfg(any(test, feature = "testbed"))]
pub(crate) const INBOUND_SOURCE_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// pilot-agent's process name (the test bed's prober).
#[cfg(any(test, feature = "testbed"))]
pub(crate) const PILOT_AGENT_COMM: &str = "pilot-agent";

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
    /// Ports captured whatever the ranges (istio-iptables `-q`).
    pub include_ports: Vec<u16>,
    /// The pod's own addresses (`status.podIPs`).
    pub pod_ips: Vec<IpAddr>,
    /// What the mesh's rules never capture (its profile's `uncaptured`).
    pub uncaptured: Vec<Uncaptured>,
}

/// A comma-separated port list; entries that do not parse are skipped.
fn ports(v: &str) -> Vec<u16> {
    v.split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

impl CaptureRules {
    /// The rules of a pod as the API describes it, read through its mesh
    /// profile's capture annotations.
    pub fn of(profile: &Profile, p: &PodInfo) -> CaptureRules {
        let k = &profile.capture;
        let get = |key: &Option<String>| {
            key.as_ref()
                .and_then(|k| p.annotations.get(k))
                .map(String::as_str)
        };
        let mut rules = CaptureRules::parse(
            get(&k.include_ranges),
            get(&k.exclude_ranges),
            get(&k.exclude_ports),
            &p.pod_ips,
        );
        rules.include_ports = get(&k.include_ports).map(ports).unwrap_or_default();
        rules.uncaptured = profile.uncaptured.clone();
        rules
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
            exclude_ports: exclude_ports.map(ports).unwrap_or_default(),
            include_ports: Vec::new(),
            pod_ips: pod_ips.to_vec(),
            uncaptured: vec![Uncaptured::Lo],
        }
    }

    /// Whether a TCP connect to `dst` from a socket bound to `src` is
    /// redirected to the capture port.
    pub fn captures(&self, dst: SocketAddr, src: Option<IpAddr>) -> bool {
        let ip = dst.ip();
        if self.exclude_ports.contains(&dst.port()) {
            return false;
        }
        if self
            .uncaptured
            .iter()
            .any(|u| u.holds(ip, src, &self.pod_ips))
        {
            return false;
        }
        if self.exclude.iter().any(|c| c.contains(ip)) {
            return false;
        }
        if self.include_ports.contains(&dst.port()) {
            return true;
        }
        match &self.include {
            None => true,
            Some(list) => list.iter().any(|c| c.contains(ip)),
        }
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
