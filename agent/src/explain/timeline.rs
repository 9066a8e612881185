//! One pod's timeline, built from its `/events` lines: the kernel times of
//! its start (from the summaries' `*_mono_ns` fields, and from process and
//! listener lines when the answer has them), its refused connects grouped
//! by phase, and the verdict. Times are the node's kernel clock, so the
//! intervals are exact; t = 0 is the pod's first process when it is known.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{
    change::Change,
    events::{Line, Revision},
    inbound::{INBOUND, inbound_span, of_when},
    verdict::{span_label, verdicts},
};
use crate::race::{Mitigation, Profile};

/// A moment of the pod's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MarkKind {
    PodStart,
    ContainerStart,
    SidecarStart,
    SidecarListen,
    AppListen,
    AppClosed,
    CaptureClosed,
}

/// One moment, `at_s` seconds after t = 0.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Mark {
    pub kind: MarkKind,
    pub at_s: f64,
    pub mono_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub label: String,
}

/// Failed connects of one phase, from the first to the last (for the
/// startup race: to the sidecar's readiness, the race's window).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Span {
    /// `startup_race`, `shutdown_race`, or the phase of failures that are
    /// not the race (`not_captured`, `sidecar_ready`, `no_sidecar`...).
    pub phase: String,
    pub from_s: f64,
    pub to_s: f64,
    pub from_mono_ns: u64,
    pub to_mono_ns: u64,
    /// Failures in all (a summary's count when there is one).
    pub count: u64,
    pub destinations: Vec<String>,
    pub label: String,
    /// Kernel times of the failures whose lines the answer holds (without
    /// any: the first and last refusal the summary gives).
    #[serde(skip)]
    pub seen_ns: Vec<u64>,
}

impl Span {
    /// Refusals a verdict is about (drawn `x`): a race either way, or an
    /// app bound where the proxy does not dial; not other failures (`o`).
    pub(crate) fn is_race(&self) -> bool {
        RACES.contains(&self.phase.as_str())
    }
}

/// The phases whose refusals a verdict is about.
const RACES: [&str; 5] = [
    "startup_race",
    "shutdown_race",
    "inbound_startup",
    "inbound_shutdown",
    "inbound_bind",
];

/// What happened to the pod, in one phrase per race (or one for none).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    /// `startup_race`, `shutdown_race`, `inbound_startup`,
    /// `inbound_shutdown`, `inbound_bind`, `no_race`, `no_sidecar`,
    /// `unknown`.
    pub phase: &'static str,
    pub text: String,
}

/// One pod's story, as `explain` draws it and `--json` gives it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PodTimeline {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What t = 0 is: `pod_start` (its first process) or `first_event`
    /// (the start was not seen).
    pub origin: &'static str,
    pub origin_mono_ns: u64,
    /// Wall-clock time of t = 0 (RFC 3339), when a kernel line gives the
    /// node's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_time: Option<String>,
    pub marks: Vec<Mark>,
    pub spans: Vec<Span>,
    pub verdicts: Vec<Verdict>,
    /// The pod's mesh profile.
    pub mesh: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mitigation: Option<Mitigation>,
    /// What the mitigation state is called in the pod's mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mitigation_label: Option<String>,
    pub recommendations: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<Change>,
    /// When the pod was first seen (to order revisions).
    #[serde(skip)]
    pub first_seen: Option<SystemTime>,
}

impl PodTimeline {
    /// Whether the pod hit a race (outbound or inbound) or a bind.
    pub(crate) fn raced(&self) -> bool {
        self.verdicts.iter().any(|v| RACES.contains(&v.phase))
    }

    /// `namespace/pod`.
    pub(crate) fn name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.pod),
            None => self.pod.clone(),
        }
    }
}

/// Every pod the lines name, each with its timeline, in the order they
/// were first seen. `boot_ns`: the wall-clock time of kernel time 0.
pub(crate) fn build(lines: &[Line], boot_ns: Option<i128>) -> Vec<PodTimeline> {
    // Grouped by (namespace, pod, uid); a line without a uid joins the one
    // pod of that name with a uid, if there is exactly one.
    type Key = (Option<String>, String);
    let mut groups: BTreeMap<Key, BTreeMap<Option<String>, Vec<&Line>>> = BTreeMap::new();
    for l in lines {
        let Some(pod) = l.pod.clone() else { continue };
        groups
            .entry((l.namespace.clone(), pod))
            .or_default()
            .entry(l.pod_uid.clone())
            .or_default()
            .push(l);
    }
    let mut pods = Vec::new();
    for (_, mut by_uid) in groups {
        if by_uid.len() == 2
            && let Some(anon) = by_uid.remove(&None)
        {
            let (_, lines) = by_uid.iter_mut().next().expect("one uid left");
            lines.extend(anon);
        }
        pods.extend(by_uid.into_values().map(|lines| pod(&lines, boot_ns)));
    }
    pods.sort_by_key(|p| (p.first_seen, p.origin_mono_ns));
    pods
}

/// The wall-clock time `ns` after the epoch, if it is one RFC 3339 can
/// write (the years 1970 to 9999; outside data may say anything).
fn wall(ns: i128) -> Option<SystemTime> {
    const YEAR_10000_NS: i128 = 253_402_300_800 * 1_000_000_000;
    let ns = u64::try_from(ns)
        .ok()
        .filter(|&n| i128::from(n) < YEAR_10000_NS)?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
}

/// Minimum of two optional times.
fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A span before its times are made relative to t = 0.
pub(super) struct Raw {
    pub phase: String,
    pub from: u64,
    pub to: u64,
    pub count: u64,
    pub dests: Vec<String>,
    pub seen_ns: Vec<u64>,
}

/// Failed connects of one phase, as the lines show them.
#[derive(Default)]
pub(super) struct Failures {
    pub seen_ns: Vec<u64>,
    pub dests: BTreeSet<String>,
}

/// The pod's mesh profile, by the name its lines carry (the built-in
/// profiles, or `--mesh-profiles`' when given); lines of agents before
/// profiles are Istio's.
fn mesh_of(lines: &[&Line]) -> Arc<Profile> {
    let all = crate::race::mesh::installed();
    lines
        .iter()
        .rev()
        .find_map(|l| l.mesh.as_deref())
        .and_then(|m| all.get(m))
        .unwrap_or_else(|| all.default_profile())
        .clone()
}

fn pod(lines: &[&Line], boot_ns: Option<i128>) -> PodTimeline {
    let mesh = mesh_of(lines);
    let m = &*mesh;
    let proxy_name = m.proxy_containers.first().map_or("proxy", String::as_str);
    let last = |kind: &str| lines.iter().rev().find(|l| l.kind == kind).copied();
    let ready_summary = last("sidecar_ready");
    let race = last("startup_race");
    let downs: Vec<&Line> = lines
        .iter()
        .filter(|l| l.kind == "shutdown_race")
        .copied()
        .collect();
    let inbound: Vec<&Line> = lines
        .iter()
        .filter(|l| l.kind == "inbound_race")
        .copied()
        .collect();

    // The start: summaries first, then what kernel lines add.
    let mut pod_start = None;
    let mut sidecar_start = None;
    let mut containers: BTreeMap<String, u64> = BTreeMap::new();
    let mut listens: BTreeMap<u16, u64> = BTreeMap::new();
    let mut app_listens: BTreeMap<(String, u16), u64> = BTreeMap::new();
    let mut closed: Option<u64> = None;
    let mut restored = false;
    let mut failures: BTreeMap<String, Failures> = BTreeMap::new();
    let keep_min = |m: &mut Option<u64>, t: u64| *m = min(*m, Some(t));
    for l in lines {
        pod_start = min(pod_start, l.pod_start_mono_ns);
        sidecar_start = min(sidecar_start, l.sidecar_start_mono_ns);
        for (c, &t) in &l.container_start_mono_ns {
            let e = containers.entry(c.clone()).or_insert(t);
            *e = (*e).min(t);
        }
        for (&p, &t) in &l.sidecar_listen_mono_ns {
            let e = listens.entry(p).or_insert(t);
            *e = (*e).min(t);
        }
        if l.is_summary() {
            match l.ready_mono_ns {
                Some(0) => restored = true,
                Some(r) => {
                    listens.entry(m.outbound_port).or_insert(r);
                }
                None => {}
            }
            if let Some(c) = l.capture_closed_mono_ns.filter(|&c| c > 0) {
                closed = Some(closed.map_or(c, |x: u64| x.max(c)));
            }
        }
        let Some(t) = l.mono_ns else { continue };
        let proxy = l.uid.is_some_and(|u| m.proxy_uid(u))
            || l.container.as_deref().is_some_and(|c| m.proxy_container(c));
        match (l.kind.as_str(), l.state.as_deref()) {
            ("process", Some("exec")) => {
                keep_min(&mut pod_start, t);
                if let Some(c) = &l.container {
                    let e = containers.entry(c.clone()).or_insert(t);
                    *e = (*e).min(t);
                }
            }
            ("listener", Some("listen")) => {
                let Some(port) = l.port else { continue };
                if proxy {
                    let e = listens.entry(port).or_insert(t);
                    *e = (*e).min(t);
                } else {
                    let c = l.container.clone().unwrap_or_else(|| "?".into());
                    let e = app_listens.entry((c, port)).or_insert(t);
                    *e = (*e).min(t);
                }
            }
            ("listener", Some("closed")) if proxy && l.port == Some(m.outbound_port) => {
                closed = Some(closed.map_or(t, |x| x.max(t)));
            }
            ("connect_failure", _) => {
                let phase = l.phase.clone().unwrap_or_else(|| "unclassified".into());
                let f = failures.entry(phase).or_default();
                f.seen_ns.push(t);
                if let Some(d) = &l.dst {
                    f.dests.insert(d.clone());
                }
            }
            _ => {}
        }
    }
    // The app's listen and close the inbound summaries give (the lines of
    // listeners are off by default).
    let mut app_closes: BTreeMap<(String, u16), u64> = BTreeMap::new();
    for s in &inbound {
        let c = s.container.clone().unwrap_or_else(|| "app".into());
        let Some(&port) = s.ports.first() else {
            continue;
        };
        if let Some(t) = s.app_listen_mono_ns {
            let e = app_listens.entry((c.clone(), port)).or_insert(t);
            *e = (*e).min(t);
        }
        if let Some(t) = s.listener_close_mono_ns {
            let e = app_closes.entry((c, port)).or_insert(t);
            *e = (*e).max(t);
        }
    }
    let ready = listens.get(&m.outbound_port).copied();
    // A close before the readiness is an earlier sidecar's (or the order
    // is unknown): only a close after it ends the capture.
    let closed = closed.filter(|&c| ready.is_none_or(|r| c >= r));

    let mut marks = Vec::new();
    let mut mark = |kind, t: u64, container: Option<String>, port: Option<u16>, label: String| {
        marks.push((kind, t, container, port, label));
    };
    if let Some(t) = pod_start {
        mark(
            MarkKind::PodStart,
            t,
            None,
            None,
            "pod start (first process)".into(),
        );
    }
    for (c, &t) in &containers {
        mark(
            MarkKind::ContainerStart,
            t,
            Some(c.clone()),
            None,
            format!("container {c} starts"),
        );
    }
    if let Some(t) = sidecar_start {
        mark(
            MarkKind::SidecarStart,
            t,
            None,
            None,
            format!("sidecar starts ({})", m.proxy_comms.join("/")),
        );
    }
    for r in &m.port_roles {
        let (port, role) = (r.port, &r.role);
        if let Some(&t) = listens.get(&port) {
            mark(
                MarkKind::SidecarListen,
                t,
                Some(proxy_name.into()),
                Some(port),
                format!("{proxy_name} listens on {port} ({role})"),
            );
        }
    }
    for ((c, port), &t) in &app_listens {
        mark(
            MarkKind::AppListen,
            t,
            Some(c.clone()),
            Some(*port),
            format!("{c} listens on :{port}"),
        );
    }
    for ((c, port), &t) in &app_closes {
        mark(
            MarkKind::AppClosed,
            t,
            Some(c.clone()),
            Some(*port),
            format!("{c} stops listening on :{port}"),
        );
    }
    if let Some(t) = closed {
        mark(
            MarkKind::CaptureClosed,
            t,
            Some(proxy_name.into()),
            Some(m.outbound_port),
            format!(
                "{proxy_name} stops listening on {} (outbound capture ends)",
                m.outbound_port
            ),
        );
    }

    // Spans: the startup race (first refusal -> ready), the shutdown race
    // (first -> last refusal), then failures that are not the race.
    let mut spans: Vec<Raw> = Vec::new();
    let mut take = |phase: &str| failures.remove(phase).unwrap_or_default();
    let startup = take("startup_race");
    let startup_count = race
        .and_then(|r| r.refused)
        .unwrap_or(startup.seen_ns.len() as u64);
    if startup_count > 0 {
        let first = race
            .and_then(|r| r.first_refusal_mono_ns)
            .or_else(|| startup.seen_ns.iter().min().copied())
            .unwrap_or(0);
        let end = ready
            .filter(|&r| r >= first)
            .or_else(|| startup.seen_ns.iter().max().copied())
            .unwrap_or(first);
        let dests = match race {
            Some(r) if !r.destinations.is_empty() => r.destinations.clone(),
            _ => startup.dests.into_iter().collect(),
        };
        let seen_ns = if startup.seen_ns.is_empty() {
            vec![first]
        } else {
            startup.seen_ns
        };
        spans.push(Raw {
            phase: "startup_race".into(),
            from: first,
            to: end,
            count: startup_count,
            dests,
            seen_ns,
        });
    }
    let shutdown = take("shutdown_race");
    let down_count = if downs.is_empty() {
        shutdown.seen_ns.len() as u64
    } else {
        downs
            .iter()
            .filter_map(|d| d.refused)
            .fold(0, u64::saturating_add)
    };
    if down_count > 0 {
        let first = downs
            .iter()
            .filter_map(|d| d.first_refusal_mono_ns)
            .chain(shutdown.seen_ns.iter().copied())
            .min()
            .unwrap_or(0);
        let end = downs
            .iter()
            .filter_map(|d| d.last_refusal_mono_ns)
            .chain(shutdown.seen_ns.iter().copied())
            .max()
            .unwrap_or(first);
        let mut dests: BTreeSet<String> = downs
            .iter()
            .flat_map(|d| d.destinations.iter().cloned())
            .collect();
        dests.extend(shutdown.dests);
        let seen_ns = if shutdown.seen_ns.is_empty() {
            vec![first, end]
        } else {
            shutdown.seen_ns
        };
        spans.push(Raw {
            phase: "shutdown_race".into(),
            from: first,
            to: end,
            count: down_count,
            dests: dests.into_iter().collect(),
            seen_ns,
        });
    }
    for (when, phase) in INBOUND {
        if let Some(r) = inbound_span(phase, take(phase), &of_when(&inbound, when)) {
            spans.push(r);
        }
    }
    for (phase, f) in failures {
        let (Some(&first), Some(&end)) = (f.seen_ns.iter().min(), f.seen_ns.iter().max()) else {
            continue;
        };
        spans.push(Raw {
            phase,
            from: first,
            to: end,
            count: f.seen_ns.len() as u64,
            dests: f.dests.into_iter().collect(),
            seen_ns: f.seen_ns,
        });
    }

    // t = 0: the pod's first process, else the earliest moment known.
    let (origin, origin_ns) = match pod_start {
        Some(t) => ("pod_start", t),
        None => (
            "first_event",
            marks
                .iter()
                .map(|m| m.1)
                .chain(spans.iter().map(|s| s.from))
                .min()
                .unwrap_or(0),
        ),
    };
    let at = |t: u64| (t as i128 - origin_ns as i128) as f64 / 1e9;
    let mut marks: Vec<Mark> = marks
        .into_iter()
        .map(|(kind, t, container, port, label)| Mark {
            kind,
            at_s: at(t),
            mono_ns: t,
            container,
            port,
            label,
        })
        .collect();
    marks.sort_by_key(|m| (m.mono_ns, m.kind));
    let spans: Vec<Span> = spans
        .into_iter()
        .map(|r| Span {
            label: span_label(&r.phase, r.count, &r.dests),
            from_s: at(r.from),
            to_s: at(r.to),
            from_mono_ns: r.from,
            to_mono_ns: r.to,
            phase: r.phase,
            count: r.count,
            destinations: r.dests,
            seen_ns: r.seen_ns,
        })
        .collect();

    let verdicts = verdicts(
        m,
        &spans,
        &inbound,
        race,
        ready_summary.or(race),
        ready.is_some() || restored,
        restored,
    );
    let mut recommendations: Vec<String> = Vec::new();
    for r in race
        .iter()
        .chain(downs.last())
        .chain(&inbound)
        .filter_map(|l| l.recommendation.clone())
    {
        if !recommendations.contains(&r) {
            recommendations.push(r);
        }
    }
    let first = lines[0];
    let who = |f: fn(&Line) -> &Option<String>| lines.iter().rev().find_map(|l| f(l).clone());
    let start = boot_ns.and_then(|b| wall(b + i128::from(origin_ns)));
    let origin_time = start.map(|t| humantime::format_rfc3339_millis(t).to_string());
    let first_seen = start.or_else(|| lines.iter().filter_map(|l| l.wall()).min());
    PodTimeline {
        namespace: first.namespace.clone(),
        pod: first.pod.clone().unwrap_or_default(),
        pod_uid: who(|l| &l.pod_uid),
        workload: who(|l| &l.workload),
        workload_kind: who(|l| &l.workload_kind),
        node: who(|l| &l.node),
        origin,
        origin_mono_ns: origin_ns,
        origin_time,
        marks,
        spans,
        verdicts,
        mitigation_label: lines
            .iter()
            .rev()
            .find_map(|l| l.mitigation.as_ref())
            .map(|x| m.mitigation_label(x)),
        mitigation: lines.iter().rev().find_map(|l| l.mitigation.clone()),
        mesh: m.name.clone(),
        recommendations,
        revision: lines.iter().rev().find_map(|l| l.revision.clone()),
        changed: None,
        first_seen,
    }
}

#[cfg(test)]
mod tests;
