//! The inbound race on a pod's timeline: its spans and verdicts, from the
//! `inbound_race` summaries (whose counts and windows are exact) and the
//! refusals' lines the answer still holds.

use super::{
    events::Line,
    timeline::{Failures, Raw, Span, Verdict},
};
use crate::race::Profile;

/// The inbound episodes (`when` of an `inbound_race` summary) and the
/// phase of their refusals.
pub(super) const INBOUND: [(&str, &str); 3] = [
    ("startup", "inbound_startup"),
    ("shutdown", "inbound_shutdown"),
    ("bind", "inbound_bind"),
];

/// The `inbound_race` summaries of one episode kind.
pub(super) fn of_when<'a>(inbound: &[&'a Line], when: &str) -> Vec<&'a Line> {
    inbound
        .iter()
        .filter(|l| l.when.as_deref() == Some(when))
        .copied()
        .collect()
}

/// An inbound phase's span: counts from its summaries when there are any
/// (the lines the answer holds may be fewer), else from the lines; from
/// the first refusal to the app's listen (start-up: the window), from the
/// listener's close to the last refusal (shutdown), else first to last.
pub(super) fn inbound_span(phase: &str, f: Failures, sums: &[&Line]) -> Option<Raw> {
    let count = if sums.is_empty() {
        f.seen_ns.len() as u64
    } else {
        sums.iter()
            .filter_map(|s| s.refused)
            .fold(0, u64::saturating_add)
    };
    if count == 0 {
        return None;
    }
    let first = sums
        .iter()
        .filter_map(|s| s.first_refusal_mono_ns)
        .chain(f.seen_ns.iter().copied())
        .min()?;
    let last = sums
        .iter()
        .filter_map(|s| s.last_refusal_mono_ns)
        .chain(f.seen_ns.iter().copied())
        .max()
        .unwrap_or(first);
    let from = sums
        .iter()
        .filter_map(|s| s.listener_close_mono_ns)
        .filter(|&c| c <= first)
        .min()
        .unwrap_or(first);
    let to = sums
        .iter()
        .filter_map(|s| s.app_listen_mono_ns)
        .filter(|&l| l >= first)
        .max()
        .unwrap_or(last);
    let mut dests = f.dests;
    if dests.is_empty() {
        dests.extend(
            sums.iter()
                .flat_map(|s| s.ports.iter().map(|p| format!(":{p}"))),
        );
    }
    let seen_ns = if f.seen_ns.is_empty() {
        vec![first, last]
    } else {
        f.seen_ns
    };
    Some(Raw {
        phase: phase.into(),
        from,
        to,
        count,
        dests: dests.into_iter().collect(),
        seen_ns,
    })
}

/// The verdict of an inbound span: the proxy refused by its own app,
/// before it listened, after it closed, or because it listens elsewhere.
pub(super) fn inbound_verdict(m: &Profile, s: &Span, inbound: &[&Line]) -> Option<Verdict> {
    let &(when, phase) = INBOUND.iter().find(|(_, p)| *p == s.phase)?;
    let sums = of_when(inbound, when);
    let proxy = m.proxy_containers.first().map_or("proxy", String::as_str);
    let app = sums
        .iter()
        .rev()
        .find_map(|l| l.container.clone())
        .unwrap_or_else(|| "the app".into());
    let mut ports: Vec<u16> = sums.iter().flat_map(|l| l.ports.iter().copied()).collect();
    ports.sort_unstable();
    ports.dedup();
    let ports = if ports.is_empty() {
        s.destinations.join(", ")
    } else {
        ports
            .iter()
            .map(|p| format!(":{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let window = sums
        .iter()
        .rev()
        .find_map(|l| l.window_seconds)
        .map(|w| format!(" over {w:.3} s"))
        .unwrap_or_default();
    let n = s.count;
    let text = match when {
        "startup" => format!(
            "inbound startup race: {n} of {proxy}'s dials of the app refused{window} before {app} listened on {ports} (each a failed request)"
        ),
        "shutdown" => format!(
            "inbound shutdown race: {n} of {proxy}'s dials of the app refused{window} after {app} closed its listener on {ports} (each a failed request)"
        ),
        _ => {
            let bound: Vec<String> = sums
                .iter()
                .flat_map(|l| l.bound_addresses.iter().cloned())
                .collect();
            let bound = if bound.is_empty() {
                "other addresses".into()
            } else {
                bound.join(", ")
            };
            format!(
                "app bound to {bound} only: {n} of {proxy}'s dials of {ports} refused (each a failed request)"
            )
        }
    };
    Some(Verdict { phase, text })
}
