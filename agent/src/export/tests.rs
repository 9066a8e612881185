//! Tests of the exporter: outputs to metrics, lines and events.

use super::*;
use crate::export::{
    http::Limits,
    json::{Sink, Target},
};

#[test]
fn events_buffer_lines_are_bounded_in_bytes() {
    let shared = Shared::new(
        Metrics::new(false).unwrap(),
        Limits {
            recent: 100,
            ..Limits::default()
        },
    );
    let max = ExportOptions::line_bytes_for(64 * 1024, 100);
    let mut ex = Exporter::new(
        Sink::open(&Target::None).unwrap(),
        shared,
        ExportOptions {
            recent_line_bytes: max,
            ..Default::default()
        },
    );
    let huge = Arc::new(Attribution {
        namespace: Some("shop".into()),
        pod: Some("p".repeat(3_000_000)),
        ..Default::default()
    });
    let small = Arc::new(Attribution {
        namespace: Some("shop".into()),
        pod: Some("web-0".into()),
        ..Default::default()
    });
    let body = serde_json::json!({"x": 1});
    for _ in 0..200 {
        ex.emit("startup_race", &huge, None, &body).unwrap();
        ex.emit("startup_race", &small, None, &body).unwrap();
    }
    assert_eq!(ex.too_large, 200);
    let kept: usize = ex.lines.iter().map(line_bytes).sum();
    assert!(kept <= 400 * max, "{kept} bytes for 400 lines");
    assert!(
        ex.lines.iter().all(|l| line_bytes(l) <= max),
        "every line within its allowance"
    );
    let stub = ex.lines[0].json();
    assert!(
        stub.contains("\"event_too_large\"") && stub.contains("3000"),
        "{stub}"
    );
    assert_eq!(
        ex.lines[1].json(),
        body.to_string(),
        "small lines kept whole"
    );
}

#[test]
fn inbound_events_name_the_app_the_ports_and_what_to_do() {
    let who = Arc::new(Attribution {
        namespace: Some("shop".into()),
        pod: Some("orders-1".into()),
        container: Some("app".into()),
        ..Default::default()
    });
    let summary = |when| InboundSummary {
        who: who.clone(),
        starts: Default::default(),
        mesh: "istio".into(),
        when,
        ports: vec![8080],
        refused: 7,
        first_refusal_mono_ns: 1,
        last_refusal_mono_ns: 2,
        app_listen_mono_ns: None,
        listener_close_mono_ns: None,
        window_seconds: Some(1.25),
        bound_addresses: vec!["127.0.0.1:8080".into()],
        recommendation: "do this".into(),
        revision: None,
    };
    for (when, reason, text) in [
        (
            When::Startup,
            "InboundStartupRace",
            "refused 7 times by app on port 8080 over 1.250s before app listened there. do this",
        ),
        (
            When::Shutdown,
            "InboundShutdownRace",
            "for 1.250s after app closed its listener. do this",
        ),
        (
            When::Bind,
            "AppBoundToLocalhost",
            "it listens on 127.0.0.1:8080 only. do this",
        ),
    ] {
        assert_eq!(when.reason(), reason);
        let note = inbound_note(&summary(when));
        assert!(note.contains(text), "{note}");
    }
}
