//! One mesh profile: everything connscope must know of a mesh and mode to
//! tell its lifecycle races apart, as data (`profiles.toml`, or an
//! operator's file). The handlers in `race/` ask a profile; they never name
//! a mesh.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::k8s::PodInfo;

/// How the mesh puts its proxy in the data path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A proxy container in the pod, capture rules in the pod's netns. (A
    /// mesh's node-proxy mode is its profile's `ambient` table.)
    #[default]
    Sidecar,
}

/// An inclusive port range, written `"15000-15099"` or `"4191"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (a, b) = s.split_once('-').unwrap_or((&s, &s));
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| serde::de::Error::custom(format!("not a port range: {s:?}")))
        };
        let (a, b) = (port(a)?, port(b)?);
        if a > b {
            return Err(serde::de::Error::custom(format!("empty port range: {s:?}")));
        }
        Ok(PortRange(a, b))
    }
}

/// A pod annotation or label that says something: present (`value` None)
/// or equal to `value` (case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

impl Mark {
    fn holds(&self, map: &BTreeMap<String, String>) -> bool {
        match (map.get(&self.key), &self.value) {
            (Some(_), None) => true,
            (Some(v), Some(want)) => v.trim().eq_ignore_ascii_case(want),
            (None, _) => false,
        }
    }
}

/// Traffic a mesh's rules never capture: what leaves through `lo`
/// (`"lo"`: loopback destinations and the pod's own addresses, Istio's,
/// Linkerd's and Kuma's `-o lo ... RETURN`), or an address range
/// (Consul's `-d 127.0.0.1/32 -j RETURN` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncaptured {
    Lo,
    Range(crate::race::istio::Cidr),
}

impl<'de> Deserialize<'de> for Uncaptured {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "lo" {
            return Ok(Uncaptured::Lo);
        }
        crate::race::istio::Cidr::parse(&s)
            .map(Uncaptured::Range)
            .ok_or_else(|| serde::de::Error::custom(format!("not \"lo\" nor a range: {s:?}")))
    }
}

impl Uncaptured {
    /// Whether a connect to `dst` from a socket bound to `src` is left
    /// alone; `pod_ips`: the pod's own addresses when known.
    pub(crate) fn holds(&self, dst: IpAddr, src: Option<IpAddr>, pod_ips: &[IpAddr]) -> bool {
        match self {
            Uncaptured::Lo => dst.is_loopback() || src == Some(dst) || pod_ips.contains(&dst),
            Uncaptured::Range(c) => c.contains(dst),
        }
    }
}

fn lo_only() -> Vec<Uncaptured> {
    vec![Uncaptured::Lo]
}

/// The mesh's switch that keeps the app from starting before the proxy is
/// ready (Istio `holdApplicationUntilProxyStarts`, Linkerd `proxy-await`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    /// What it is called in runbooks and `connscope explain`.
    pub label: String,
    /// Annotations that carry it, first found wins.
    pub annotations: Vec<String>,
    /// The flag inside the annotation's JSON/YAML value (Istio's
    /// `proxy.istio.io/config`); None: the value itself is the switch.
    #[serde(default)]
    pub key: Option<String>,
    /// Values that mean "on" (when `key` is None).
    #[serde(default = "on_values")]
    pub on: Vec<String>,
    /// The value is a number of seconds, on when above zero (Consul's
    /// start-up grace period).
    #[serde(default)]
    pub seconds: bool,
    /// Whether it is on when no annotation says (the mesh's default).
    #[serde(default)]
    pub default: bool,
    /// The proxy container's `postStart` exec command when it is on: its
    /// program's file name, then words it includes (Istio's `pilot-agent
    /// wait`). The injector writes it from the pod's annotation and the
    /// mesh-wide setting alike, so when the API shows the proxy container
    /// this decides, not the annotation.
    #[serde(default)]
    pub post_start: Vec<String>,
}

impl Hold {
    /// Whether a `postStart` command is this hold's.
    fn is_post_start(&self, command: &[String]) -> bool {
        let (Some(want), Some(prog)) = (self.post_start.first(), command.first()) else {
            return false;
        };
        let file = prog.rsplit('/').next().unwrap_or(prog);
        file == want
            && self.post_start[1..]
                .iter()
                .all(|w| command[1..].iter().any(|a| a == w))
    }
}

fn on_values() -> Vec<String> {
    vec!["true".into(), "enabled".into()]
}

/// The annotations that change which outbound connects a pod's rules
/// capture (comma-separated values, as the mesh's injector reads them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureKeys {
    /// Only these ranges are captured (`*`: all).
    #[serde(default)]
    pub include_ranges: Option<String>,
    /// These ranges are not captured.
    #[serde(default)]
    pub exclude_ranges: Option<String>,
    /// These destination ports are not captured.
    #[serde(default)]
    pub exclude_ports: Option<String>,
    /// These destination ports are captured whatever the ranges say (but
    /// for excluded ports, loopback and excluded ranges).
    #[serde(default)]
    pub include_ports: Option<String>,
}

/// What a timeline says of a proxy port when it starts listening
/// (`connscope explain`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRole {
    pub port: u16,
    pub role: String,
}

/// The mesh's own advice. Placeholders: `{ports}` (the app ports refused),
/// `{bound}` (where the app listened), `{dialed}` (where the proxy
/// dialed), `{native}` (`native_drain` or `drain`), `{hold}` (the hold
/// switch's label).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recommendations {
    /// Start-up race, the proxy never became ready while we watched.
    pub startup_never_ready: String,
    /// Start-up race with the hold switch on.
    pub startup_hold: String,
    /// Start-up race with the proxy as a native sidecar.
    pub startup_native: String,
    /// Start-up race, no mitigation in effect (or unknown).
    pub startup: String,
    pub shutdown: String,
    pub inbound_startup: String,
    pub inbound_shutdown: String,
    /// `{native}` of `inbound_shutdown` when the proxy is a native sidecar.
    pub native_drain: String,
    /// `{native}` otherwise.
    pub drain: String,
    pub inbound_bind: String,
}

/// One mesh and mode.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The `mesh` label (`istio`, `linkerd`): short, stable, lower case.
    pub name: String,
    /// `name`, shared by every event of the mesh's pods (set on load).
    #[serde(skip)]
    pub label: std::sync::Arc<str>,
    #[serde(default)]
    pub mode: Mode,
    /// The proxy's container names.
    #[serde(default)]
    pub proxy_containers: Vec<String>,
    /// The proxy's uids (the capture rules exempt them).
    pub proxy_uids: Vec<u32>,
    /// The proxy's process names (its start on the timeline).
    #[serde(default)]
    pub proxy_comms: Vec<String>,
    /// Processes of the proxy's uid that dial the app to run kubelet's
    /// probes: their refusals are `probe`, never a race.
    #[serde(default)]
    pub prober_comms: Vec<String>,
    /// Outbound capture port: what the rules redirect the app's connects
    /// to; the proxy is ready when it listens here.
    pub outbound_port: u16,
    /// Inbound capture port.
    #[serde(default)]
    pub inbound_port: Option<u16>,
    /// DNS capture port, when the mesh captures DNS.
    #[serde(default)]
    pub dns_port: Option<u16>,
    /// Ports whose LISTEN by a proxy uid marks a pod as having this mesh
    /// (the capture ports, admin, health, metrics).
    pub proxy_ports: Vec<u16>,
    /// Ports the mesh keeps for itself: never an app's.
    #[serde(default)]
    pub reserved_ports: Vec<PortRange>,
    /// Source addresses the proxy dials the app from (Istio: 127.0.0.6):
    /// a dial from one is the pod's own inbound traffic.
    #[serde(default)]
    pub inbound_sources: Vec<IpAddr>,
    /// Annotations that mark a pod as having this mesh (any one).
    #[serde(default)]
    pub annotations: Vec<Mark>,
    /// Labels that mark a pod as having this mesh (any one).
    #[serde(default)]
    pub labels: Vec<Mark>,
    /// Annotations that say the proxy runs as a native sidecar.
    #[serde(default)]
    pub native_sidecar_annotations: Vec<String>,
    #[serde(default)]
    pub hold: Option<Hold>,
    /// The annotations of the pod's capture settings.
    #[serde(default)]
    pub capture: CaptureKeys,
    /// What the rules never capture (default `["lo"]`).
    #[serde(default = "lo_only")]
    pub uncaptured: Vec<Uncaptured>,
    /// Ports drawn on `connscope explain`'s timeline, in order.
    #[serde(default)]
    pub port_roles: Vec<PortRole>,
    pub recommendations: Recommendations,
    /// The mesh's node-proxy mode (Istio ambient), if it has one.
    #[serde(default)]
    pub ambient: Option<crate::race::ambient::AmbientProfile>,
}

/// Mitigations in effect for a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mitigation {
    /// The mesh's hold switch (Istio `holdApplicationUntilProxyStarts`,
    /// Linkerd `proxy-await`; from the API; None if unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<bool>,
    /// The proxy as a native sidecar (init container, restartPolicy Always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_sidecar: Option<bool>,
}

impl Profile {
    /// Checks what serde cannot: a profile must be usable.
    pub(super) fn validate(&self) -> Result<(), String> {
        let bad = |why: &str| Err(format!("profile {:?}: {why}", self.name));
        if self.name.is_empty()
            || self.name.len() > 32
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("name must be 1-32 of [a-z0-9-] (it is a label value)");
        }
        if self.name == "none" {
            return bad("\"none\" is the label of pods without a mesh");
        }
        if self.proxy_uids.is_empty() && self.proxy_containers.is_empty() {
            return bad("needs proxy_uids or proxy_containers");
        }
        if self.outbound_port == 0 {
            return bad("outbound_port must not be 0");
        }
        if !self.proxy_ports.contains(&self.outbound_port) {
            return bad("proxy_ports must hold outbound_port");
        }
        Ok(())
    }

    /// Whether `uid` is the proxy's.
    pub(crate) fn proxy_uid(&self, uid: u32) -> bool {
        self.proxy_uids.contains(&uid)
    }

    /// Whether `name` is the proxy's container.
    pub(crate) fn proxy_container(&self, name: &str) -> bool {
        self.proxy_containers.iter().any(|c| c == name)
    }

    /// Whether `port` is the mesh's own (never an app's).
    pub(crate) fn reserved(&self, port: u16) -> bool {
        self.proxy_ports.contains(&port)
            || Some(port) == self.inbound_port
            || Some(port) == self.dns_port
            || self
                .reserved_ports
                .iter()
                .any(|r| (r.0..=r.1).contains(&port))
    }

    /// Whether the mesh's rules leave a connect to `dst` from a socket
    /// bound to `src` uncaptured, whatever the pod's settings; `pod_ips`:
    /// the pod's own addresses when known.
    pub(crate) fn never_captured(
        &self,
        dst: IpAddr,
        src: Option<IpAddr>,
        pod_ips: &[IpAddr],
    ) -> bool {
        self.uncaptured.iter().any(|u| u.holds(dst, src, pod_ips))
    }

    /// Whether `ip` is a source the proxy dials the app from.
    pub(crate) fn inbound_source(&self, ip: IpAddr) -> bool {
        self.inbound_sources.contains(&ip)
    }

    /// Whether the API's pod carries this mesh's marks (annotations,
    /// labels, or a proxy container).
    pub(crate) fn marks(&self, p: &PodInfo) -> bool {
        self.annotations.iter().any(|m| m.holds(&p.annotations))
            || self.labels.iter().any(|m| m.holds(&p.labels))
            || p.containers.iter().any(|c| self.proxy_container(&c.name))
            || p.spec_containers
                .iter()
                .any(|c| self.proxy_container(&c.name))
    }

    /// The mitigations in effect for an API pod of this mesh.
    pub(crate) fn mitigation(&self, p: &PodInfo) -> Mitigation {
        let spec_proxy = p
            .spec_containers
            .iter()
            .find(|c| self.proxy_container(&c.name));
        let hold = self.hold.as_ref().map(|h| {
            // What the injector wrote, when the spec shows the proxy (a
            // native sidecar is never held this way).
            if let Some(c) = spec_proxy.filter(|_| !h.post_start.is_empty()) {
                return !c.init && h.is_post_start(&c.post_start);
            }
            h.annotations
                .iter()
                .find_map(|a| p.annotations.get(a))
                .map_or(h.default, |v| match &h.key {
                    Some(k) => super::config_flag(v, k),
                    None if h.seconds => v.trim().parse::<f64>().is_ok_and(|n| n > 0.0),
                    None => h.on.iter().any(|on| v.trim().eq_ignore_ascii_case(on)),
                })
        });
        let proxy = p.containers.iter().find(|c| self.proxy_container(&c.name));
        let native = proxy.map(|c| c.init && c.restart_always).or_else(|| {
            self.native_sidecar_annotations
                .iter()
                .find_map(|a| p.annotations.get(a))
                .map(|v| v.trim().eq_ignore_ascii_case("true"))
        });
        Mitigation {
            hold: Some(hold.unwrap_or(false)),
            native_sidecar: native.or(Some(false)),
        }
    }

    /// The label a mitigation state is printed under (runbooks, explain).
    pub(crate) fn mitigation_label(&self, m: &Mitigation) -> String {
        let hold = self.hold.as_ref().map_or("hold", |h| h.label.as_str());
        match (m.hold, m.native_sidecar) {
            (Some(true), _) => hold.to_string(),
            (_, Some(true)) => "native sidecar".into(),
            (Some(false), Some(false)) | (Some(false), None) | (None, Some(false)) => "none".into(),
            (None, None) => "unknown (no Kubernetes API: the pod's annotations would tell)".into(),
        }
    }

    /// What to do about a start-up race, given the pod's mitigations and
    /// whether the proxy became ready while we watched.
    pub(crate) fn startup_recommendation(&self, m: &Mitigation, ready: bool) -> String {
        let r = &self.recommendations;
        let text = match (m.hold, m.native_sidecar, ready) {
            (_, _, false) => &r.startup_never_ready,
            (Some(true), _, _) => &r.startup_hold,
            (_, Some(true), _) => &r.startup_native,
            _ => &r.startup,
        };
        self.fill(text, &[], &[], &[], m.native_sidecar)
    }

    /// What to do about a shutdown race.
    pub(crate) fn shutdown_recommendation(&self) -> String {
        self.fill(&self.recommendations.shutdown, &[], &[], &[], None)
    }

    /// What to do about an inbound race or a bind mismatch.
    pub(crate) fn inbound_recommendation(
        &self,
        when: crate::race::When,
        ports: &[u16],
        bound: &[String],
        dialed: &[String],
        native: Option<bool>,
    ) -> String {
        use crate::race::When;
        let r = &self.recommendations;
        let text = match when {
            When::Startup => &r.inbound_startup,
            When::Shutdown => &r.inbound_shutdown,
            When::Bind => &r.inbound_bind,
        };
        self.fill(text, ports, bound, dialed, native)
    }

    /// A recommendation with its placeholders filled in.
    fn fill(
        &self,
        text: &str,
        ports: &[u16],
        bound: &[String],
        dialed: &[String],
        native: Option<bool>,
    ) -> String {
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let r = &self.recommendations;
        let native = if native == Some(true) {
            &r.native_drain
        } else {
            &r.drain
        };
        let hold = self.hold.as_ref().map_or("", |h| h.label.as_str());
        text.replace("{ports}", &ports)
            .replace("{bound}", &bound.join(", "))
            .replace("{dialed}", &dialed.join(", "))
            .replace("{native}", native)
            .replace("{hold}", hold)
    }
}
