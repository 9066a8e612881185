//! The inbound race: the pod's proxy forwards a request to the pod's own app
//! and the app refuses it, because it does not listen yet (start-up), no
//! longer (shutdown), or only on an address the proxy does not dial (bind).
//!
//! Per pod this keeps the app's listener timeline (each port's first LISTEN
//! with its bound addresses, its closes; kernel times) and the proxy's
//! refused dials to the app, in three episodes. Events reach it in kernel
//! time order (the tracker's re-order window), so the timeline at a
//! failure's apply time is the timeline at its kernel time.
//!
//! "The pod's own app" rests on kernel evidence, see
//! [`AppSide::own_destination`], the socket's addresses as the kernel holds
//! them: a loopback destination (loopback is per network namespace, and the
//! proxy runs in the pod's); Envoy's inbound source 127.0.0.6 (the kernel
//! does not route a loopback source to a non-local address: connect() fails
//! with EINVAL, so a refusal of a socket bound there came from the pod's own
//! stack; its IPv6 twin `::6` is not loopback, and is taken on Istio's word
//! that only inbound dials bind it); a local address equal to the destination (the kernel picks the
//! destination itself as the source of a local route: pilot-agent's probes
//! to the pod IP); or a destination the pod owns: its `status.podIPs` from
//! the API, a non-wildcard address an app listener of the pod bound, or the
//! local address of one of the app's own sockets (TPROXY mode, where Envoy
//! dials from the client's address, needs one of these).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{IpAddr, SocketAddr},
};

use super::{Phase, mesh::Profile, pod::ECONNREFUSED};
use crate::kernel::decode::{KernelEvent, Kind};

/// App ports a pod's timeline keeps (an app has a handful).
const MAX_PORTS: usize = 64;
/// Addresses learned as the pod's own (a pod has one or two).
const MAX_OWN_IPS: usize = 8;
/// Closes kept per port (the most recent).
const MAX_CLOSES: usize = 8;
/// Bound addresses kept per port and per episode.
const MAX_ADDRS: usize = 16;

/// Which inbound episode a summary reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    Startup,
    Shutdown,
    Bind,
}

impl When {
    /// The `when` label and field.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            When::Startup => "startup",
            When::Shutdown => "shutdown",
            When::Bind => "bind",
        }
    }

    /// The Kubernetes Event reason of an inbound summary.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            When::Startup => "InboundStartupRace",
            When::Shutdown => "InboundShutdownRace",
            When::Bind => "AppBoundToLocalhost",
        }
    }

    /// The phase of the failures the episode counts.
    pub(crate) fn phase(self) -> Phase {
        match self {
            When::Startup => Phase::InboundStartup,
            When::Shutdown => Phase::InboundShutdown,
            When::Bind => Phase::InboundBind,
        }
    }
}

/// One app port's listener timeline.
#[derive(Debug, Default)]
pub(super) struct AppPort {
    /// The first LISTEN on the port; `Some(0)`: it listened before the
    /// agent started (restored from /proc).
    pub(super) first_listen_ns: Option<u64>,
    /// Open listeners by bound address: how many, and since when the
    /// address has had one without a gap.
    open: BTreeMap<IpAddr, (u32, u64)>,
    /// When the port's last listener closed (None while one is open).
    pub(super) closed_ns: Option<u64>,
    /// The most recent closes (kernel times).
    pub(super) closes: VecDeque<u64>,
    /// The container whose process listened (the app container).
    pub(super) container: Option<String>,
}

impl AppPort {
    /// Whether a listener bound to `bound` accepts a SYN to `dst` (a
    /// wildcard of either family takes both: a `::` socket is dual-stack
    /// unless IPV6_V6ONLY, which the kernel event does not say).
    fn covers(bound: IpAddr, dst: IpAddr) -> bool {
        bound.is_unspecified() || bound == dst
    }

    /// A listener covering `dst` was open without a gap from `start` on.
    fn listened_through(&self, dst: IpAddr, start: u64) -> bool {
        self.open
            .iter()
            .any(|(&a, &(_, since))| Self::covers(a, dst) && since <= start)
    }

    fn covering_open(&self, dst: IpAddr) -> bool {
        self.open.keys().any(|&a| Self::covers(a, dst))
    }

    /// Bound addresses of the open listeners.
    fn bound(&self, port: u16) -> impl Iterator<Item = SocketAddr> + '_ {
        self.open.keys().map(move |&a| SocketAddr::new(a, port))
    }
}

/// The proxy's refused dials of one episode, bounded.
#[derive(Debug, Default, Clone)]
pub(super) struct Episode {
    pub(super) count: u64,
    pub(super) first_ns: u64,
    pub(super) last_ns: u64,
    pub(super) ports: BTreeSet<u16>,
    /// Bind only: where the app listened instead.
    pub(super) bound: BTreeSet<SocketAddr>,
    /// Bind only: where the proxy dialed.
    pub(super) dialed: BTreeSet<SocketAddr>,
}

impl Episode {
    fn add(&mut self, t: u64, port: u16) {
        if self.count == 0 || t < self.first_ns {
            self.first_ns = t;
        }
        self.last_ns = self.last_ns.max(t);
        self.count += 1;
        if self.ports.len() < MAX_PORTS {
            self.ports.insert(port);
        }
    }
}

/// The app's side of one pod: its listeners and the proxy's refusals.
#[derive(Debug, Default)]
pub(super) struct AppSide {
    pub(super) ports: BTreeMap<u16, AppPort>,
    /// Addresses the pod's network namespace owns, learned from the kernel.
    own_ips: BTreeSet<IpAddr>,
    /// The app's first LISTEN on any port (`connscope_app_listen_seconds`).
    pub(super) first_listen_ns: Option<u64>,
    /// `first_listen_ns` was reported (once per pod).
    pub(super) listen_reported: bool,
    pub(super) startup: Episode,
    pub(super) shutdown: Episode,
    pub(super) bind: Episode,
}

/// What the tracker's timers decide about an episode.
pub(super) struct Due {
    pub(super) settle_ns: u64,
    pub(super) quiet_ns: u64,
    pub(super) max_ns: u64,
}

impl AppSide {
    /// The mesh's own ports are never the app's (while the pod's mesh is
    /// not known, every port may be: the proxy's dials, which need it, come
    /// once it is).
    pub(super) fn app_port(port: u16, mesh: Option<&Profile>) -> bool {
        port != 0 && !mesh.is_some_and(|m| m.reserved(port))
    }

    /// A LISTEN up or down by a process of the app (not the proxy).
    pub(super) fn on_listen(&mut self, ev: &KernelEvent, container: Option<&str>) {
        let Some(addr) = ev.src else {
            return;
        };
        let (ip, port) = (addr.ip(), addr.port());
        if !self.ports.contains_key(&port) && self.ports.len() >= MAX_PORTS {
            return;
        }
        let p = self.ports.entry(port).or_default();
        let t = ev.mono_ns;
        if ev.kind == Kind::Listen {
            if p.open.len() < MAX_ADDRS || p.open.contains_key(&ip) {
                let e = p.open.entry(ip).or_insert((0, t));
                e.0 += 1;
            }
            p.closed_ns = None;
            let first = p.first_listen_ns.get_or_insert(t);
            *first = (*first).min(t);
            if let Some(c) = container {
                p.container = Some(c.to_string());
            }
            self.first_listen_ns = Some(self.first_listen_ns.map_or(t, |f| f.min(t)));
            self.learn(ip);
        } else {
            if let Some(e) = p.open.get_mut(&ip) {
                e.0 = e.0.saturating_sub(1);
                if e.0 == 0 {
                    p.open.remove(&ip);
                }
            }
            if p.open.is_empty() && p.first_listen_ns.is_some() {
                p.closed_ns = Some(t);
                if p.closes.len() >= MAX_CLOSES {
                    p.closes.pop_front();
                }
                p.closes.push_back(t);
            }
        }
    }

    /// The app listened on these sockets when the agent started (from
    /// /proc/<pid>/net/tcp*): listening since before anything the agent
    /// sees, so no refusal before it is taken for the start-up window.
    pub(super) fn restore(&mut self, listeners: &[SocketAddr]) {
        for l in listeners {
            if !self.ports.contains_key(&l.port()) && self.ports.len() >= MAX_PORTS {
                continue;
            }
            let p = self.ports.entry(l.port()).or_default();
            p.first_listen_ns = Some(0);
            p.closed_ns = None;
            if p.open.len() < MAX_ADDRS || p.open.contains_key(&l.ip()) {
                p.open.entry(l.ip()).or_insert((0, 0)).0 += 1;
            }
            self.learn(l.ip());
        }
        // The pod started before the agent: its app's start is unknown.
        self.listen_reported = true;
    }

    /// A local address of a socket of the pod (a bound listener, an app
    /// socket's source): an address the pod's network namespace owns.
    pub(super) fn learn(&mut self, ip: IpAddr) {
        if !ip.is_unspecified() && !ip.is_loopback() && self.own_ips.len() < MAX_OWN_IPS {
            self.own_ips.insert(ip);
        }
    }

    /// Whether the proxy's dial went to the pod's own app, by kernel
    /// evidence (see the module's comment); `pod_ips`: `status.podIPs`.
    pub(super) fn own_destination(
        &self,
        ev: &KernelEvent,
        pod_ips: &[IpAddr],
        mesh: &Profile,
    ) -> bool {
        let Some(dst) = ev.dst else {
            return false;
        };
        let ip = dst.ip();
        let src = ev.src.map(|s| s.ip());
        ip.is_loopback()
            || src.is_some_and(|s| mesh.inbound_source(s))
            || src == Some(ip)
            || pod_ips.contains(&ip)
            || self.own_ips.contains(&ip)
    }

    /// Phase of a failed dial by the pod's proxy (uid or container) that
    /// went to the pod's own app port (the caller checked both). `prober`:
    /// the dialer is pilot-agent running the pod's probes.
    pub(super) fn classify(&mut self, ev: &KernelEvent, prober: bool) -> Phase {
        if prober {
            return Phase::Probe;
        }
        let Some(dst) = ev.dst else {
            return Phase::Proxy;
        };
        if ev.errno != ECONNREFUSED {
            return Phase::Proxy;
        }
        let t = ev.mono_ns;
        // A refusal says no listener took the SYN at some moment of the
        // attempt, from its start to the RST (a SYN sent before the app's
        // LISTEN can be reported refused after it).
        let start = ev.start_mono_ns.filter(|&s| s <= t).unwrap_or(t);
        let (ip, port) = (dst.ip(), dst.port());
        let p = self.ports.get(&port);
        if p.is_some_and(|p| p.listened_through(ip, start)) {
            // A listener for that address was up all along: not a window
            // of the app's listener.
            return Phase::Proxy;
        }
        let listened_at_start = p
            .and_then(|p| p.first_listen_ns)
            .is_some_and(|f| f <= start);
        let when = match p {
            _ if !listened_at_start => When::Startup,
            Some(p) if !p.open.is_empty() && !p.covering_open(ip) => When::Bind,
            // The port's listener closed before the refusal (and none took
            // the SYN since the attempt began, even if one is back now).
            Some(p) if p.closes.back().is_some_and(|&c| c <= t) => When::Shutdown,
            _ => return Phase::Proxy,
        };
        // Where the app listened instead (bind), taken before the episode
        // is borrowed.
        let bound: Vec<SocketAddr> = match (when, p) {
            (When::Bind, Some(p)) => p.bound(port).collect(),
            _ => Vec::new(),
        };
        let ep = self.episode_mut(when);
        ep.add(t, port);
        if when == When::Bind {
            if ep.dialed.len() < MAX_ADDRS {
                ep.dialed.insert(dst);
            }
            for b in bound {
                if ep.bound.len() < MAX_ADDRS {
                    ep.bound.insert(b);
                }
            }
        }
        when.phase()
    }

    pub(super) fn episode(&self, when: When) -> &Episode {
        match when {
            When::Startup => &self.startup,
            When::Shutdown => &self.shutdown,
            When::Bind => &self.bind,
        }
    }

    fn episode_mut(&mut self, when: When) -> &mut Episode {
        match when {
            When::Startup => &mut self.startup,
            When::Shutdown => &mut self.shutdown,
            When::Bind => &mut self.bind,
        }
    }

    /// The start-up episode's end: the latest first LISTEN among its
    /// ports, once every one of them has listened.
    pub(super) fn startup_listened_ns(&self) -> Option<u64> {
        self.startup
            .ports
            .iter()
            .map(|port| {
                self.ports
                    .get(port)
                    .and_then(|p| p.first_listen_ns)
                    .filter(|&f| f > 0)
            })
            .try_fold(0u64, |acc, f| f.map(|f| acc.max(f)))
            .filter(|&f| f > 0)
    }

    /// The shutdown episode's start: the earliest last close among its
    /// ports.
    pub(super) fn shutdown_closed_ns(&self) -> Option<u64> {
        self.shutdown
            .ports
            .iter()
            .filter_map(|port| {
                let p = self.ports.get(port)?;
                p.closed_ns.or(p.closes.back().copied())
            })
            .min()
    }

    /// The app container: the one that listened on the episode's ports.
    pub(super) fn container(&self, when: When) -> Option<String> {
        self.episode(when)
            .ports
            .iter()
            .find_map(|port| self.ports.get(port)?.container.clone())
            .or_else(|| self.ports.values().find_map(|p| p.container.clone()))
    }

    /// Episodes whose summary is due at `now_ns` (`horizon`: the kernel
    /// time up to which every event was applied). Start-up: once every
    /// refused port listened, and `settle` later (refusals whose SYN went
    /// out before the LISTEN may be applied after it). Shutdown and bind:
    /// after `quiet` without a refusal. Any episode open for `max`:
    /// reported, and a new one begins with the next refusal.
    pub(super) fn due(&self, now_ns: u64, horizon: u64, d: &Due) -> Vec<When> {
        let mut due = Vec::new();
        for when in [When::Startup, When::Shutdown, When::Bind] {
            let ep = self.episode(when);
            if ep.count == 0 {
                continue;
            }
            let old = now_ns.saturating_sub(ep.first_ns) > d.max_ns;
            let closed = match when {
                When::Startup => self
                    .startup_listened_ns()
                    .is_some_and(|l| horizon >= l.saturating_add(d.settle_ns)),
                _ => now_ns.saturating_sub(ep.last_ns) > d.quiet_ns,
            };
            if old || closed {
                due.push(when);
            }
        }
        due
    }

    /// Ends an episode (its summary was taken).
    pub(super) fn reset(&mut self, when: When) {
        *self.episode_mut(when) = Episode::default();
    }
}
