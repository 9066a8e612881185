//! The timeline on hand-written `/events` lines.

use super::*;
use crate::explain::events;

const MS: u64 = 1_000_000;

/// Kernel lines only (an agent run with --process-events whose
/// summaries are gone from `/events`): the timeline still stands.
#[test]
fn kernel_lines_alone_give_starts_listeners_and_failures() {
    let who = r#""namespace":"shop","pod":"web-0","workload":"web""#;
    let uid = r#","pod_uid":"u1""#;
    let text = [
        format!(r#"{{"type":"process","state":"exec","mono_ns":{},"container":"istio-proxy",{who}{uid}}}"#, 100 * MS),
        format!(r#"{{"type":"process","state":"exec","mono_ns":{},"container":"app",{who}{uid}}}"#, 300 * MS),
        format!(r#"{{"type":"listener","state":"listen","mono_ns":{},"uid":1337,"port":15021,{who}{uid}}}"#, 150 * MS),
        format!(r#"{{"type":"listener","state":"listen","mono_ns":{},"uid":0,"container":"app","port":8080,{who}{uid}}}"#, 400 * MS),
        format!(r#"{{"type":"listener","state":"listen","mono_ns":{},"uid":1337,"port":15001,{who}{uid}}}"#, 900 * MS),
        // A line without the pod's uid joins the one pod of that name.
        format!(r#"{{"type":"connect_failure","phase":"not_captured","mono_ns":{},"dst":"10.0.0.9:5432",{who}}}"#, 500 * MS),
        format!(r#"{{"type":"listener","state":"closed","mono_ns":{},"uid":1337,"port":15001,{who}{uid}}}"#, 5000 * MS),
    ]
    .join("\n");
    let (lines, bad) = events::parse(&text);
    assert_eq!(bad, 0);
    let pods = build(&lines, None);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let p = &pods[0];
    let marks: Vec<(f64, &str)> = p.marks.iter().map(|m| (m.at_s, m.label.as_str())).collect();
    assert_eq!(
        marks,
        [
            (0.0, "pod start (first process)"),
            (0.0, "container istio-proxy starts"),
            (
                0.05,
                "istio-proxy listens on 15021 (health: what holdApplicationUntilProxyStarts and probes wait for)"
            ),
            (0.2, "container app starts"),
            (0.3, "app listens on :8080"),
            (
                0.8,
                "istio-proxy listens on 15001 (outbound capture: the sidecar is ready)"
            ),
            (
                4.9,
                "istio-proxy stops listening on 15001 (outbound capture ends)"
            ),
        ]
    );
    assert_eq!(p.spans.len(), 1);
    assert_eq!(p.spans[0].phase, "not_captured");
    assert_eq!(p.spans[0].destinations, ["10.0.0.9:5432"]);
    assert_eq!(p.verdicts[0].phase, "no_race");
    assert_eq!(p.pod_uid.as_deref(), Some("u1"));
}

/// A Linkerd pod's lines: its proxy, its ports, its mitigation's name.
#[test]
fn a_linkerd_pod_is_drawn_with_linkerds_ports() {
    let who =
        r#""namespace":"shop","pod":"web-0","workload":"web","pod_uid":"u1","mesh":"linkerd""#;
    let text = [
        format!(r#"{{"type":"listener","state":"listen","mono_ns":{},"uid":2102,"port":4191,{who}}}"#, 100 * MS),
        format!(r#"{{"type":"connect_failure","phase":"startup_race","mono_ns":{},"dst":"10.0.0.9:5432",{who}}}"#, 200 * MS),
        format!(r#"{{"type":"listener","state":"listen","mono_ns":{},"uid":2102,"port":4140,{who}}}"#, 900 * MS),
        format!(r#"{{"type":"startup_race","refused":1,"first_refusal_mono_ns":{},"ready_mono_ns":{},"window_seconds":0.7,"mitigation":{{"hold":true,"native_sidecar":false}},{who}}}"#, 200 * MS, 900 * MS),
    ]
    .join("\n");
    let (lines, bad) = events::parse(&text);
    assert_eq!(bad, 0);
    let p = &build(&lines, None)[0];
    let labels: Vec<&str> = p.marks.iter().map(|m| m.label.as_str()).collect();
    assert!(
        labels.contains(&"linkerd-proxy listens on 4140 (outbound capture: the proxy is ready)"),
        "{labels:?}"
    );
    assert_eq!(p.mesh, "linkerd");
    assert_eq!(p.mitigation_label.as_deref(), Some("proxy-await"));
    assert!(
        p.verdicts[0]
            .text
            .contains("before linkerd-proxy listened on 4140"),
        "{:?}",
        p.verdicts
    );
}

proptest::proptest! {
    /// Whatever an agent (or anything on its port) answers, explain
    /// draws it or skips it, never panics: times anywhere in u64,
    /// starts after ends, odd strings.
    #[test]
    fn any_lines_are_drawn_without_panicking(
        times in proptest::collection::vec(proptest::num::u64::ANY, 1..8),
        kinds in proptest::collection::vec(0usize..6, 1..8),
        junk in ".{0,40}",
        boot in proptest::option::of(-(1i128 << 70)..(1i128 << 70)),
    ) {
        let kinds_of = ["connect_failure", "listener", "process", "sidecar_ready", "startup_race", "shutdown_race"];
        let mut text = String::new();
        for (i, k) in kinds.iter().enumerate() {
            let t = |j: usize| times[(i + j) % times.len()];
            let phase = ["startup_race", "shutdown_race", "not_captured"][i % 3];
            let line = serde_json::json!({
                "type": kinds_of[*k], "namespace": "shop", "pod": "p",
                "time": "2026-11-29T20:00:00Z", "mono_ns": t(0), "state": "listen",
                "phase": phase,
                "port": 15001, "uid": 1337, "dst": junk,
                "pod_start_mono_ns": t(1), "ready_mono_ns": t(2), "refused": t(3),
                "first_refusal_mono_ns": t(4), "last_refusal_mono_ns": t(5),
                "capture_closed_mono_ns": t(6), "window_seconds": 1e300,
                "revision": {"app_images": {"app": format!("{junk}@sha256:{junk}")}},
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        text.push_str(&junk);
        let (lines, _) = events::parse(&text);
        let pods = build(&lines, boot);
        for p in &pods {
            let mut p = p.clone();
            p.changed = Some(crate::explain::change::what_changed(&p, &pods));
            let _ = crate::explain::render::pod(&p);
            let _ = serde_json::to_string(&p).unwrap();
        }
    }
}

/// An inbound start-up race and an app bound to loopback, from their
/// summaries and a few of the refusals' lines: spans drawn as races, the
/// app's listen and close marks, a verdict and a fix each.
#[test]
fn inbound_races_get_spans_marks_and_verdicts() {
    let who =
        r#""namespace":"shop","pod":"orders-0","pod_uid":"u9","workload":"orders","mesh":"istio""#;
    let text = [
        format!(r#"{{"type":"process","state":"exec","mono_ns":{},"container":"istio-proxy",{who}}}"#, 100 * MS),
        format!(r#"{{"type":"listener","state":"listen","mono_ns":{},"uid":1337,"port":15001,{who}}}"#, 200 * MS),
        // Two of the five refusals are still in the answer.
        format!(r#"{{"type":"connect_failure","phase":"inbound_startup","mono_ns":{},"uid":1337,"container":"istio-proxy","dst":"10.1.2.3:8080",{who}}}"#, 1000 * MS),
        format!(r#"{{"type":"connect_failure","phase":"inbound_startup","mono_ns":{},"uid":1337,"container":"istio-proxy","dst":"10.1.2.3:8080",{who}}}"#, 1400 * MS),
        format!(r#"{{"type":"inbound_race","when":"startup","ports":[8080],"refused":5,"first_refusal_mono_ns":{},"last_refusal_mono_ns":{},"app_listen_mono_ns":{},"window_seconds":0.7,"container":"app","recommendation":"add a readinessProbe on port 8080",{who}}}"#, 900 * MS, 1500 * MS, 1600 * MS),
        format!(r#"{{"type":"inbound_race","when":"shutdown","ports":[8080],"refused":3,"first_refusal_mono_ns":{},"last_refusal_mono_ns":{},"listener_close_mono_ns":{},"window_seconds":0.4,"container":"app","recommendation":"add a preStop delay",{who}}}"#, 9100 * MS, 9400 * MS, 9000 * MS),
        format!(r#"{{"type":"inbound_race","when":"bind","ports":[9090],"refused":2,"first_refusal_mono_ns":{},"last_refusal_mono_ns":{},"bound_addresses":["127.0.0.1:9090"],"container":"app","recommendation":"listen on 0.0.0.0",{who}}}"#, 2000 * MS, 2100 * MS),
    ]
    .join("\n");
    let (lines, bad) = events::parse(&text);
    assert_eq!(bad, 0);
    let pods = build(&lines, None);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let p = &pods[0];
    let spans: Vec<(&str, u64, f64, f64, bool)> = p
        .spans
        .iter()
        .map(|s| (s.phase.as_str(), s.count, s.from_s, s.to_s, s.is_race()))
        .collect();
    assert_eq!(
        spans,
        [
            // First refusal to the app's listen: the window.
            ("inbound_startup", 5, 0.8, 1.5, true),
            // The listener's close to the last refusal.
            ("inbound_shutdown", 3, 8.9, 9.3, true),
            ("inbound_bind", 2, 1.9, 2.0, true),
        ]
    );
    assert_eq!(p.spans[0].destinations, ["10.1.2.3:8080"]);
    assert_eq!(p.spans[1].destinations, [":8080"], "from the summary");
    let marks: Vec<(f64, &str)> = p
        .marks
        .iter()
        .filter(|m| matches!(m.kind, MarkKind::AppListen | MarkKind::AppClosed))
        .map(|m| (m.at_s, m.label.as_str()))
        .collect();
    assert_eq!(
        marks,
        [
            (1.5, "app listens on :8080"),
            (8.9, "app stops listening on :8080")
        ]
    );
    let verdicts: Vec<&str> = p.verdicts.iter().map(|v| v.phase).collect();
    assert_eq!(
        verdicts,
        [
            "no_race",
            "inbound_startup",
            "inbound_shutdown",
            "inbound_bind"
        ]
    );
    assert!(
        p.verdicts[1].text.contains(
            "5 of istio-proxy's dials of the app refused over 0.700 s before app listened on :8080"
        ),
        "{}",
        p.verdicts[1].text
    );
    assert!(
        p.verdicts[2]
            .text
            .contains("after app closed its listener on :8080")
    );
    assert!(
        p.verdicts[3]
            .text
            .contains("app bound to 127.0.0.1:9090 only")
    );
    assert!(p.raced());
    assert_eq!(
        p.recommendations,
        [
            "add a readinessProbe on port 8080",
            "add a preStop delay",
            "listen on 0.0.0.0"
        ]
    );
}
