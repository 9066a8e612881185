//! What a pod's timeline concludes: the verdict per span, and how spans
//! and phases read on the page.

use super::{
    events::Line,
    inbound::inbound_verdict,
    timeline::{Span, Verdict},
};
use crate::race::Profile;

/// What a phase's failures mean, in a few words.
pub(super) fn phase_meaning(phase: &str) -> &str {
    match phase {
        "startup_race" => "before the sidecar listened",
        "shutdown_race" => "after the sidecar stopped listening",
        "not_captured" => "not captured: the destination itself refused",
        "sidecar_ready" => "sidecar ready: not the race",
        "sidecar_not_ready" => "sidecar not ready, traffic it does not carry",
        "no_sidecar" => "no sidecar",
        "proxy" => "the proxy's own connects",
        "inbound_startup" => "the proxy refused by the app before it listened",
        "inbound_shutdown" => "the proxy refused by the app after its listener closed",
        "inbound_bind" => "the proxy refused: the app listens on other addresses only",
        "probe" => "pilot-agent's probes of the app: not a race",
        other => other,
    }
}

/// `8 refused (startup_race: before the sidecar listened) -> 10.0.0.1:80`.
pub(super) fn span_label(phase: &str, count: u64, dests: &[String]) -> String {
    let what = match phase {
        "startup_race" | "shutdown_race" | "inbound_startup" | "inbound_shutdown"
        | "inbound_bind" => "refused",
        _ => "failed",
    };
    let mut s = format!("{count} {what} ({phase}: {})", phase_meaning(phase));
    if !dests.is_empty() {
        s.push_str(" -> ");
        s.push_str(&dests.iter().take(3).cloned().collect::<Vec<_>>().join(", "));
        if dests.len() > 3 {
            s.push_str(&format!(" +{} more", dests.len() - 3));
        }
    }
    s
}

pub(super) fn verdicts(
    m: &Profile,
    spans: &[Span],
    inbound: &[&Line],
    race: Option<&Line>,
    ready_summary: Option<&Line>,
    ready: bool,
    restored: bool,
) -> Vec<Verdict> {
    let mut out = Vec::new();
    let port = m.outbound_port;
    let proxy = m.proxy_containers.first().map_or("proxy", String::as_str);
    for s in spans
        .iter()
        .filter(|s| matches!(s.phase.as_str(), "startup_race" | "shutdown_race"))
    {
        let text = if s.phase == "startup_race" {
            match (race, race.and_then(|r| r.window_seconds)) {
                (Some(_), Some(w)) => format!(
                    "startup race: {} outbound connect()s refused over {w:.3} s before {proxy} listened on {port}",
                    s.count
                ),
                (Some(_), None) => format!(
                    "startup race: {} outbound connect()s refused, and {proxy} never listened on {port} while the agent watched",
                    s.count
                ),
                (None, _) => format!(
                    "startup race: {} outbound connect()s refused before {proxy} listened on {port} (the agent's summary follows 1 s after the sidecar is ready)",
                    s.count
                ),
            }
        } else {
            format!(
                "shutdown race: {} outbound connect()s refused after {proxy} stopped listening on {port} while the app still ran",
                s.count
            )
        };
        out.push(Verdict {
            phase: if s.phase == "startup_race" {
                "startup_race"
            } else {
                "shutdown_race"
            },
            text,
        });
    }
    let inbound: Vec<Verdict> = spans
        .iter()
        .filter_map(|s| inbound_verdict(m, s, inbound))
        .collect();
    if !out.is_empty() {
        out.extend(inbound);
        return out;
    }
    let verdict = if restored {
        Verdict {
            phase: "no_race",
            text: format!(
                "no race: {proxy} was already listening on {port} when the agent started"
            ),
        }
    } else if ready {
        let after = ready_summary
            .and_then(|r| r.pod_start_to_ready_seconds)
            .map(|s| format!(" {s:.3} s after the pod started"))
            .unwrap_or_default();
        Verdict {
            phase: "no_race",
            text: format!(
                "no race: {proxy} listened on {port}{after}, and no outbound connect() was refused before"
            ),
        }
    } else if spans.iter().any(|s| s.phase == "no_sidecar") {
        Verdict {
            phase: "no_sidecar",
            text: "no sidecar: not an injected pod; its failed connects are the destinations' own"
                .into(),
        }
    } else {
        Verdict {
            phase: "unknown",
            text:
                "no verdict: the agent saw neither a race nor the sidecar's readiness for this pod"
                    .into(),
        }
    };
    if verdict.phase == "unknown" && !inbound.is_empty() {
        return inbound;
    }
    let mut out = vec![verdict];
    out.extend(inbound);
    out
}
