//! The inbound race: the pod's proxy refused by the pod's own app at
//! start-up, at shutdown, for a bind mismatch; pilot-agent's probes; the
//! app's listeners restored at agent start.

use super::*;

const POD_IP: &str = "10.0.0.5";

/// Envoy (a worker thread: its own comm) refused dialing the app from
/// 127.0.0.6, as Istio >= 1.10 does.
fn envoy(t_ms: u64, dst: &str) -> KernelEvent {
    let mut e = ev(Kind::ConnectFailure, t_ms, 1337);
    e.comm = crate::kernel::decode::Comm::from_name("wrk:worker_0");
    e.src = Some("127.0.0.6:40000".parse().unwrap());
    e.dst = Some(dst.parse().unwrap());
    e
}

fn app_dst(port: u16) -> String {
    format!("{POD_IP}:{port}")
}

/// pilot-agent running a rewritten probe.
fn probe(t_ms: u64, port: u16) -> KernelEvent {
    let mut e = envoy(t_ms, &app_dst(port));
    e.comm = crate::kernel::decode::Comm::from_name("pilot-agent");
    e.src = Some(format!("{POD_IP}:41000").parse().unwrap());
    e
}

/// The app's listener on `bound` up (or down, `up` false).
fn app_listen(t_ms: u64, bound: &str, up: bool) -> KernelEvent {
    let kind = if up { Kind::Listen } else { Kind::ListenClose };
    let mut e = ev(kind, t_ms, 1000);
    e.src = Some(bound.parse().unwrap());
    e.dst = None;
    e.errno = 0;
    e
}

fn proxy() -> Arc<Attribution> {
    who(istio::PROXY_CONTAINER)
}

fn inbound(out: &[Output]) -> Vec<&InboundSummary> {
    out.iter()
        .filter_map(|o| match o {
            Output::InboundRace(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn quick() -> Config {
    Config {
        shutdown_quiet_ns: 100 * MS,
        ..Config::default()
    }
}

#[test]
fn refused_before_the_app_listens_is_the_startup_race_with_one_summary() {
    let mut t = Tracker::new(Config::default());
    let out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), injected()),
            (envoy(200, &app_dst(8080)), proxy(), None),
            (envoy(300, &app_dst(8080)), proxy(), None),
            (app_listen(1100, "0.0.0.0:8080", true), who("app"), None),
            (envoy(1200, &app_dst(8080)), proxy(), None),
        ],
    );
    assert_eq!(
        phases(&out),
        vec![Phase::InboundStartup, Phase::InboundStartup, Phase::Proxy]
    );
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    let s = s[0];
    assert_eq!(s.when, When::Startup);
    assert_eq!(s.ports, vec![8080]);
    assert_eq!(s.refused, 2);
    assert_eq!(s.first_refusal_mono_ns, 200 * MS);
    assert_eq!(s.last_refusal_mono_ns, 300 * MS);
    assert_eq!(s.app_listen_mono_ns, Some(1100 * MS));
    assert!((s.window_seconds.unwrap() - 0.9).abs() < 1e-9);
    assert_eq!(s.who.container.as_deref(), Some("app"), "the app container");
    assert!(
        s.recommendation.contains("readinessProbe"),
        "{}",
        s.recommendation
    );
    let v = serde_json::to_value(s).unwrap();
    assert_eq!(v["when"], "startup");
    assert!(v.get("listener_close_mono_ns").is_none());
    assert!(v.get("bound_addresses").is_none());
    // The app's first listen, 1 s after the pod's first process.
    let listen: Vec<f64> = out
        .iter()
        .filter_map(|o| match o {
            Output::AppListen(a) => Some(a.seconds),
            _ => None,
        })
        .collect();
    assert_eq!(listen, vec![1.0]);
    // Outbound untouched: no outbound race for the proxy's refusals.
    assert!(startup_races(&out).is_empty());
}

#[test]
fn app_listening_first_is_no_race() {
    let mut t = Tracker::new(Config::default());
    let mut out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), injected()),
            (app_listen(150, "0.0.0.0:8080", true), who("app"), None),
            (envoy(200, &app_dst(8080)), proxy(), None),
        ],
    );
    t.flush(&mut out);
    assert_eq!(phases(&out), vec![Phase::Proxy]);
    assert!(inbound(&out).is_empty());
}

/// The LISTEN arrives after the refusal that followed it: kernel time, not
/// arrival, decides. And a SYN sent before the LISTEN but refused after it
/// belongs to the start-up window.
#[test]
fn arrival_order_and_late_resets_do_not_misfile() {
    let mut t = Tracker::new(Config::default());
    let mut late = envoy(1105, &app_dst(8080));
    late.start_mono_ns = Some(1095 * MS);
    let mut after = envoy(1205, &app_dst(8080));
    after.start_mono_ns = Some(1200 * MS);
    let mut out = Vec::new();
    t.push(ev(Kind::Exec, 100, 0), who("app"), injected());
    t.push(envoy(200, &app_dst(8080)), proxy(), None);
    t.push(late, proxy(), None);
    t.push(after, proxy(), None);
    t.push(app_listen(1100, "[::]:8080", true), who("app"), None);
    // Applied, but the start-up window stays open for late resets.
    t.advance(1300 * MS, &mut out);
    assert_eq!(
        phases(&out),
        vec![Phase::InboundStartup, Phase::InboundStartup, Phase::Proxy]
    );
    assert!(inbound(&out).is_empty(), "waits startup_settle_ns");
    t.advance(2200 * MS, &mut out);
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].refused, 2);
}

#[test]
fn refused_after_the_listener_closed_is_the_shutdown_race() {
    let mut t = Tracker::new(quick());
    let mut spanning = envoy(305, &app_dst(8080));
    spanning.start_mono_ns = Some(295 * MS);
    let mut out = run(
        &mut t,
        vec![
            (
                app_listen(100, "0.0.0.0:8080", true),
                who("app"),
                injected(),
            ),
            (envoy(200, &app_dst(8080)), proxy(), None),
            (app_listen(300, "0.0.0.0:8080", false), who("app"), None),
            (spanning, proxy(), None),
            (envoy(400, &app_dst(8080)), proxy(), None),
            (probe(450, 8080), proxy(), None),
        ],
    );
    t.advance(20_000 * MS, &mut out);
    assert_eq!(
        phases(&out),
        vec![
            Phase::Proxy,
            Phase::InboundShutdown,
            Phase::InboundShutdown,
            Phase::Probe
        ]
    );
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    let s = s[0];
    assert_eq!(s.when, When::Shutdown);
    assert_eq!(s.refused, 2, "probes excluded");
    assert_eq!(s.listener_close_mono_ns, Some(300 * MS));
    assert!((s.window_seconds.unwrap() - 0.1).abs() < 1e-9);
    assert_eq!(s.app_listen_mono_ns, None);
    for text in [
        "preStop",
        "terminationDrainDuration",
        "EXIT_ON_ZERO_ACTIVE_CONNECTIONS",
    ] {
        assert!(s.recommendation.contains(text), "{}", s.recommendation);
    }
}

#[test]
fn app_bound_to_localhost_is_bind_not_a_race() {
    let mut t = Tracker::new(quick());
    let mut out = run(
        &mut t,
        vec![
            (
                app_listen(100, "127.0.0.1:8080", true),
                who("app"),
                injected(),
            ),
            (envoy(200, &app_dst(8080)), proxy(), None),
            (envoy(300, &app_dst(8080)), proxy(), None),
            // The proxy's legacy localhost dial reaches it.
            (envoy(310, "127.0.0.1:8080"), proxy(), None),
        ],
    );
    t.advance(20_000 * MS, &mut out);
    assert_eq!(
        phases(&out),
        vec![Phase::InboundBind, Phase::InboundBind, Phase::Proxy]
    );
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].when, When::Bind);
    assert_eq!(s[0].refused, 2);
    assert_eq!(s[0].bound_addresses, vec!["127.0.0.1:8080".to_string()]);
    assert!(s[0].recommendation.contains("0.0.0.0"));
    assert!(s[0].recommendation.contains("10.0.0.5:8080"));
}

#[test]
fn probes_are_never_the_race() {
    let mut t = Tracker::new(Config::default());
    let mut out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), injected()),
            (probe(200, 8080), proxy(), None),
            (probe(300, 8080), proxy(), None),
            (app_listen(1100, "0.0.0.0:8080", true), who("app"), None),
        ],
    );
    t.flush(&mut out);
    assert_eq!(phases(&out), vec![Phase::Probe, Phase::Probe]);
    assert!(inbound(&out).is_empty());
}

/// The agent restarted while the app listened: no start-up window, and a
/// later close is the shutdown race, not a start-up one.
#[test]
fn restored_listeners_are_no_false_race() {
    let mut t = Tracker::new(quick());
    t.restore_ready(
        proxy(),
        &crate::race::Profiles::builtin().default_profile().clone(),
        &[15001, 15006],
        50 * MS,
    );
    t.restore_app(proxy(), &["0.0.0.0:8080".parse().unwrap()], 50 * MS);
    let mut out = run(
        &mut t,
        vec![
            (envoy(100, &app_dst(8080)), proxy(), None),
            (app_listen(200, "0.0.0.0:8080", false), who("app"), None),
            (envoy(300, &app_dst(8080)), proxy(), None),
        ],
    );
    t.advance(20_000 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::Proxy, Phase::InboundShutdown]);
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].when, When::Shutdown);
    assert!(
        !out.iter().any(|o| matches!(o, Output::AppListen(_))),
        "the app's start was not seen"
    );
}

#[test]
fn only_the_pods_own_app_on_its_own_ports() {
    let mut t = Tracker::new(Config::default());
    // Outbound: the proxy's own connect to another pod.
    let mut outbound = envoy(100, "10.9.9.9:8080");
    outbound.src = Some(format!("{POD_IP}:40001").parse().unwrap());
    // Istio's own ports (pilot-agent to Envoy's admin port).
    let mut admin = probe(110, 15000);
    admin.dst = Some("127.0.0.1:15000".parse().unwrap());
    // Another error than a refusal.
    let mut timeout = envoy(120, &app_dst(8080));
    timeout.errno = 110;
    // TPROXY: from the client's address, to the pod IP, which nothing has
    // shown to be the pod's yet.
    let mut tproxy = envoy(130, &app_dst(8080));
    tproxy.src = Some("10.1.1.1:50000".parse().unwrap());
    let out = run(
        &mut t,
        vec![
            (outbound, proxy(), injected()),
            (admin, proxy(), None),
            (timeout, proxy(), None),
            (tproxy, proxy(), None),
        ],
    );
    assert_eq!(phases(&out), vec![Phase::Proxy; 4]);
}

/// In TPROXY mode the dial comes from the client's address: the pod IP is
/// known from the API, or from the kernel (an app socket's own address).
#[test]
fn tproxy_dials_are_known_by_the_pod_ip() {
    let tproxy = |t_ms| {
        let mut e = envoy(t_ms, &app_dst(8080));
        e.src = Some("10.1.1.1:50000".parse().unwrap());
        e
    };
    let api = Some(Hints {
        injected: Some(true),
        capture: Some(CaptureRules {
            pod_ips: vec![POD_IP.parse().unwrap()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut t = Tracker::new(Config::default());
    let out = run(&mut t, vec![(tproxy(100), proxy(), api)]);
    assert_eq!(phases(&out), vec![Phase::InboundStartup]);

    // No API: the app's own outbound socket showed the address.
    let mut t = Tracker::new(Config::default());
    let mut app_out = ev(Kind::ConnectFailure, 50, 0);
    app_out.src = Some(format!("{POD_IP}:33000").parse().unwrap());
    let out = run(
        &mut t,
        vec![
            (app_out, who("app"), injected()),
            (tproxy(100), proxy(), None),
        ],
    );
    assert_eq!(
        phases(&out),
        vec![Phase::StartupRace, Phase::InboundStartup]
    );
}

/// The legacy localhost dial (to 127.0.0.1) is the pod's own by
/// definition; the app listening on the pod IP only is then the bind case.
#[test]
fn localhost_dials_to_an_app_on_the_pod_ip() {
    let mut t = Tracker::new(quick());
    let mut local = envoy(200, "127.0.0.1:8080");
    local.src = Some("127.0.0.1:40000".parse().unwrap());
    let mut out = run(
        &mut t,
        vec![
            (
                app_listen(100, &app_dst(8080), true),
                who("app"),
                injected(),
            ),
            (local, proxy(), None),
        ],
    );
    t.advance(20_000 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::InboundBind]);
    assert_eq!(inbound(&out)[0].bound_addresses, vec![app_dst(8080)]);
}

/// A failure of the app held for its pod's injection does not hold back
/// the proxy's, and both are filed by kernel time once the pod is known.
#[test]
fn held_failures_and_the_proxys_refusals() {
    let mut t = Tracker::new(Config::default());
    // The proxy known by its uid only (its container not resolved yet), so
    // the pod's injection stays unknown.
    let proxy = || {
        Arc::new(Attribution {
            container: None,
            ..(*who("app")).clone()
        })
    };
    let mut out = Vec::new();
    t.push(ev(Kind::ConnectFailure, 100, 0), who("app"), None);
    t.push(envoy(150, &app_dst(8080)), proxy(), None);
    t.advance(300 * MS, &mut out);
    assert_eq!(phases(&out), vec![Phase::InboundStartup]);
    assert_eq!(t.held(), 1);
    t.push(ev(Kind::Listen, 200, 1337).with_port(15006), proxy(), None);
    t.push(app_listen(250, "0.0.0.0:8080", true), who("app"), None);
    t.advance(2_000 * MS, &mut out);
    assert_eq!(
        phases(&out),
        vec![Phase::InboundStartup, Phase::StartupRace]
    );
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].refused, 1);
    assert_eq!(s[0].app_listen_mono_ns, Some(250 * MS));
}

/// A port the app never listens on: the episode is reported when the pod
/// is gone, without an app listen.
#[test]
fn a_pod_gone_reports_its_open_episode() {
    let mut t = Tracker::new(Config::default());
    let mut out = run(
        &mut t,
        vec![(envoy(200, &app_dst(9090)), proxy(), injected())],
    );
    assert!(inbound(&out).is_empty());
    t.pod_gone("uid-1".into(), 300 * MS);
    t.advance(20_000 * MS, &mut out);
    let s = inbound(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].ports, vec![9090]);
    assert_eq!(s[0].app_listen_mono_ns, None);
    assert_eq!(s[0].window_seconds, None);
}

/// An episode still open after `inbound_max_ns` is reported, and the next
/// refusals begin a new one.
#[test]
fn long_episodes_are_reported_and_begin_anew() {
    let mut t = Tracker::new(Config {
        inbound_max_ns: 1_000 * MS,
        ..Config::default()
    });
    let mut out = Vec::new();
    t.push(envoy(100, &app_dst(9090)), proxy(), injected());
    t.advance(2_000 * MS, &mut out);
    assert_eq!(inbound(&out).len(), 1);
    t.push(envoy(2_100, &app_dst(9090)), proxy(), None);
    t.advance(4_000 * MS, &mut out);
    let s = inbound(&out);
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].refused, s[1].refused), (1, 1));
}

/// IPv6: Envoy dials from `::6` (Istio's twin of 127.0.0.6) to the pod's
/// IPv6 address; the app listening on `[::]` takes it.
#[test]
fn ipv6_inbound_dials() {
    let mut t = Tracker::new(Config::default());
    let v6 = |t_ms| {
        let mut e = envoy(t_ms, "[fd00::5]:8080");
        e.family = Family::Inet6;
        e.src = Some("[::6]:40000".parse().unwrap());
        e
    };
    let mut out = run(
        &mut t,
        vec![
            (v6(100), proxy(), injected()),
            (app_listen(200, "[::]:8080", true), who("app"), None),
            (v6(300), proxy(), None),
        ],
    );
    t.flush(&mut out);
    assert_eq!(phases(&out), vec![Phase::InboundStartup, Phase::Proxy]);
    assert_eq!(inbound(&out)[0].app_listen_mono_ns, Some(200 * MS));
}
