//! The tracker on hand-made timelines: phases, holds, summaries; the
//! capture proof and the fallbacks in `capture`.

use super::*;
use crate::kernel::decode::{Family, Kind};
use std::time::UNIX_EPOCH;

const MS: u64 = 1_000_000;

fn who(container: &str) -> Arc<Attribution> {
    Arc::new(Attribution {
        namespace: Some("shop".into()),
        pod: Some("checkout-7d9f8c6b5-xk2lp".into()),
        pod_uid: Some("uid-1".into()),
        container: Some(container.into()),
        workload: Some("checkout".into()),
        ..Default::default()
    })
}

fn ev(kind: Kind, t_ms: u64, uid: u32) -> KernelEvent {
    KernelEvent {
        kind,
        mono_ns: t_ms * MS,
        time: UNIX_EPOCH,
        start_mono_ns: None,
        pid: 10,
        tid: 10,
        uid,
        gid: uid,
        comm: crate::kernel::decode::Comm::from_name("app"),
        cgroup_id: Some(1),
        netns: Some(1),
        family: Family::Inet,
        src: Some("127.0.0.1:15001".parse().unwrap()),
        dst: Some("10.0.0.1:80".parse().unwrap()),
        path: None,
        errno: if kind == Kind::ConnectFailure {
            pod::ECONNREFUSED
        } else {
            0
        },
        nonblocking: true,
        from_syscall: false,
        rst: true,
        context_known: true,
    }
}

fn run(t: &mut Tracker, evs: Vec<(KernelEvent, Arc<Attribution>, Option<Hints>)>) -> Vec<Output> {
    let mut out = Vec::new();
    for (e, w, h) in evs {
        t.push(e, w, h);
    }
    t.advance(10_000 * MS, &mut out);
    out
}

fn phases(out: &[Output]) -> Vec<Phase> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event { phase: Some(p), .. } => Some(*p),
            _ => None,
        })
        .collect()
}

fn startup_races(out: &[Output]) -> Vec<&RaceSummary> {
    out.iter()
        .filter_map(|o| match o {
            Output::StartupRace(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn injected() -> Option<Hints> {
    Some(Hints {
        container_names: vec!["app".into(), istio::PROXY_CONTAINER.into()],
        ..Default::default()
    })
}

#[test]
fn refusals_before_ready_are_the_race_with_one_summary() {
    let mut t = Tracker::new(Config::default());
    let out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), injected()),
            (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
            (ev(Kind::ConnectFailure, 300, 0), who("app"), None),
            (
                ev(Kind::Listen, 1100, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
            (ev(Kind::ConnectFailure, 1200, 0), who("app"), None),
        ],
    );
    assert_eq!(
        phases(&out),
        vec![Phase::StartupRace, Phase::StartupRace, Phase::SidecarReady]
    );
    let s = startup_races(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].refused, 2);
    assert!((s[0].window_seconds.unwrap() - 0.9).abs() < 1e-9);
    assert_eq!(s[0].destinations, vec!["10.0.0.1:80".to_string()]);
    assert!(
        s[0].recommendation
            .contains("holdApplicationUntilProxyStarts")
    );
}

#[test]
fn pod_summary_follows_a_changed_attribution_not_a_repeated_one() {
    let mut t = Tracker::new(Config::default());
    let first = who("app");
    // The same container, now known under another pod name (a new
    // attribution, as after the API answered).
    let renamed = Arc::new(Attribution {
        pod: Some("checkout-renamed".into()),
        ..(*first).clone()
    });
    let out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), first.clone(), injected()),
            (ev(Kind::ConnectFailure, 200, 0), first.clone(), None),
            (ev(Kind::ConnectFailure, 300, 0), renamed.clone(), None),
            // Handles alternating: each change rebuilds the pod-level
            // attribution.
            (ev(Kind::ConnectFailure, 400, 0), first.clone(), None),
            (ev(Kind::ConnectFailure, 500, 0), renamed.clone(), None),
            (
                ev(Kind::Listen, 1100, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
        ],
    );
    let s = startup_races(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].refused, 4);
    // who(istio::PROXY_CONTAINER) (a new handle, original pod name) came last.
    assert_eq!(s[0].who.pod.as_deref(), Some("checkout-7d9f8c6b5-xk2lp"));
    assert_eq!(s[0].who.container, None, "pod-level: no container");

    let mut t = Tracker::new(Config::default());
    let mut out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), first.clone(), injected()),
            (ev(Kind::ConnectFailure, 200, 0), first.clone(), None),
            (ev(Kind::ConnectFailure, 300, 0), renamed.clone(), None),
            (ev(Kind::ConnectFailure, 400, 0), renamed.clone(), None),
        ],
    );
    t.flush(&mut out);
    let s = startup_races(&out);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].who.pod.as_deref(), Some("checkout-renamed"));
}

#[test]
fn arrival_order_does_not_matter_within_the_window() {
    let mut t = Tracker::new(Config::default());
    // The listen (t=100) arrives after the failure (t=101).
    let out = run(
        &mut t,
        vec![
            (ev(Kind::ConnectFailure, 101, 0), who("app"), injected()),
            (
                ev(Kind::Listen, 100, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
        ],
    );
    assert_eq!(phases(&out), vec![Phase::SidecarReady]);
}

#[test]
fn unknown_injection_is_held_then_classified() {
    let mut t = Tracker::new(Config::default());
    let mut out = Vec::new();
    t.push(ev(Kind::ConnectFailure, 100, 0), who("app"), None);
    t.advance(200 * MS, &mut out);
    assert!(phases(&out).is_empty(), "held, not dropped, not guessed");
    assert_eq!(t.stats.held, 1);
    // The proxy's early listener shows the pod is injected.
    t.push(
        ev(Kind::Listen, 150, 1337).with_port(15021),
        who(istio::PROXY_CONTAINER),
        None,
    );
    t.advance(400 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::StartupRace]);
}

#[test]
fn held_failures_expire_as_no_sidecar() {
    let mut t = Tracker::new(Config {
        hold_ns: 1000 * MS,
        ..Config::default()
    });
    let mut out = Vec::new();
    t.push(ev(Kind::ConnectFailure, 100, 0), who("app"), None);
    t.advance(500 * MS, &mut out);
    assert!(phases(&out).is_empty());
    t.advance(2000 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::NoSidecar]);
    assert_eq!(t.stats.held_expired, 1);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::PodStarted {
            injected: false,
            ..
        }
    )));
}

#[test]
fn hold_limit_classifies_early_instead_of_dropping() {
    let mut t = Tracker::new(Config {
        max_held: 2,
        ..Config::default()
    });
    let out = run(
        &mut t,
        (0..5)
            .map(|i| (ev(Kind::ConnectFailure, 100 + i, 0), who("app"), None))
            .collect(),
    );
    // Nothing lost: the first pod's holds were classified when the limit hit.
    assert_eq!(phases(&out).len() + t.held(), 5);
}

#[test]
fn shutdown_race_after_capture_closes() {
    let mut t = Tracker::new(Config {
        shutdown_quiet_ns: 100 * MS,
        ..Config::default()
    });
    let mut out = run(
        &mut t,
        vec![
            (
                ev(Kind::Listen, 100, 1337),
                who(istio::PROXY_CONTAINER),
                injected(),
            ),
            (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
            (
                ev(Kind::ListenClose, 300, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
            (ev(Kind::ConnectFailure, 400, 0), who("app"), None),
        ],
    );
    t.advance(20_000 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::SidecarReady, Phase::ShutdownRace]);
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::ShutdownRace(_)))
            .count(),
        1
    );
    assert!(!out.iter().any(|o| matches!(o, Output::StartupRace(_))));
}

/// A SYN sent before the LISTEN but refused after it (the RST is reported
/// later under load) was refused by a capture port that was not listening:
/// the race, placed by the attempt's start.
#[test]
fn refusal_that_began_before_the_listen_is_the_race() {
    let mut t = Tracker::new(Config::default());
    let mut late = ev(Kind::ConnectFailure, 1105, 0);
    late.start_mono_ns = Some(1095 * MS);
    let mut after = ev(Kind::ConnectFailure, 1205, 0);
    after.start_mono_ns = Some(1200 * MS);
    let out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), injected()),
            (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
            (
                ev(Kind::Listen, 1100, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
            (late, who("app"), None),
            (after, who("app"), None),
        ],
    );
    assert_eq!(
        phases(&out),
        vec![Phase::StartupRace, Phase::StartupRace, Phase::SidecarReady]
    );
    assert_eq!(startup_races(&out)[0].refused, 2);
}

/// An attempt that began while the listener was up and was refused after
/// it closed is the shutdown race, not the start-up one.
#[test]
fn refusal_spanning_the_close_is_the_shutdown_race() {
    let mut t = Tracker::new(Config {
        shutdown_quiet_ns: 100 * MS,
        ..Config::default()
    });
    let mut spanning = ev(Kind::ConnectFailure, 305, 0);
    spanning.start_mono_ns = Some(295 * MS);
    let mut out = run(
        &mut t,
        vec![
            (
                ev(Kind::Listen, 100, 1337),
                who(istio::PROXY_CONTAINER),
                injected(),
            ),
            (
                ev(Kind::ListenClose, 300, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
            (spanning, who("app"), None),
        ],
    );
    t.advance(20_000 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::ShutdownRace]);
}

#[test]
fn loopback_refusals_are_not_the_race() {
    let mut t = Tracker::new(Config::default());
    let mut local = ev(Kind::ConnectFailure, 200, 0);
    local.dst = Some("127.0.0.1:9".parse().unwrap());
    let out = run(&mut t, vec![(local, who("app"), injected())]);
    assert_eq!(phases(&out), vec![Phase::SidecarNotReady]);
}

#[test]
fn not_a_pod_and_proxy_own_failures() {
    let mut t = Tracker::new(Config::default());
    let out = run(
        &mut t,
        vec![
            (
                ev(Kind::ConnectFailure, 100, 0),
                Arc::new(Attribution::default()),
                None,
            ),
            (
                ev(Kind::ConnectFailure, 200, 1337),
                who(istio::PROXY_CONTAINER),
                injected(),
            ),
        ],
    );
    assert_eq!(phases(&out), vec![Phase::NoSidecar, Phase::Proxy]);
}

#[test]
fn restored_ready_pod_is_never_a_race() {
    let mut t = Tracker::new(Config::default());
    t.restore_ready(who(istio::PROXY_CONTAINER), &[15001, 15021], 50 * MS);
    let out = run(
        &mut t,
        vec![(ev(Kind::ConnectFailure, 100, 0), who("app"), None)],
    );
    assert_eq!(phases(&out), vec![Phase::SidecarReady]);
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::SidecarReady(_) | Output::StartupRace(_)))
    );
}

#[test]
fn api_hints_and_proxy_config() {
    assert!(config_flag(
        "{\"holdApplicationUntilProxyStarts\": true}",
        "holdApplicationUntilProxyStarts"
    ));
    assert!(config_flag(
        "holdApplicationUntilProxyStarts: true\n",
        "holdApplicationUntilProxyStarts"
    ));
    assert!(!config_flag(
        "holdApplicationUntilProxyStarts: false",
        "holdApplicationUntilProxyStarts"
    ));
    assert!(!config_flag("", "holdApplicationUntilProxyStarts"));
}

#[test]
fn summaries_carry_the_start_times_explain_draws() {
    let mut t = Tracker::new(Config::default());
    let out = run(
        &mut t,
        vec![
            (
                ev(Kind::Exec, 100, 1337),
                who(istio::PROXY_CONTAINER),
                injected(),
            ),
            (ev(Kind::Exec, 150, 0), who("app"), None),
            (ev(Kind::Exec, 160, 0), who("app"), None),
            (
                ev(Kind::Listen, 300, 1337).with_port(15021),
                who(istio::PROXY_CONTAINER),
                None,
            ),
            (ev(Kind::ConnectFailure, 400, 0), who("app"), None),
            (
                ev(Kind::Listen, 1100, 1337).with_port(15001),
                who(istio::PROXY_CONTAINER),
                None,
            ),
        ],
    );
    let s = startup_races(&out)[0];
    let v = serde_json::to_value(s).unwrap();
    assert_eq!(v["pod_start_mono_ns"], 100 * MS);
    assert_eq!(v["sidecar_start_mono_ns"], 100 * MS);
    assert_eq!(
        v["container_start_mono_ns"],
        serde_json::json!({"app": 150 * MS, "istio-proxy": 100 * MS})
    );
    assert_eq!(
        v["sidecar_listen_mono_ns"],
        serde_json::json!({"15001": 1100 * MS, "15021": 300 * MS})
    );
    let ready = out.iter().find_map(|o| match o {
        Output::SidecarReady(r) => Some(r),
        _ => None,
    });
    assert_eq!(ready.unwrap().starts.sidecar_listen_mono_ns.len(), 2);
    let none = serde_json::to_value(StartTimes::default()).unwrap();
    assert_eq!(none, serde_json::json!({}), "unknown times are absent");
}

impl KernelEvent {
    fn with_port(mut self, port: u16) -> Self {
        self.src = Some(std::net::SocketAddr::new("0.0.0.0".parse().unwrap(), port));
        self
    }
}

mod ambient;
mod capture;
mod inbound;
