//! Capture: the kernel's proof (a reset from the capture port to the app's
//! socket), the pod's settings, inference.

use super::*;

/// A refused failure of the app's socket `src` (its local address) to `dst`.
fn refusal(t_ms: u64, src: &str, dst: &str, netns: u32) -> KernelEvent {
    let mut e = ev(Kind::ConnectFailure, t_ms, 0);
    e.src = Some(src.parse().unwrap());
    e.dst = Some(dst.parse().unwrap());
    e.netns = Some(netns);
    e
}

/// The pod's stack refusing a SYN NATed to 15001: a reset from
/// 127.0.0.1:15001 to the app socket's address `to`, at `t_ns`.
fn capture_reset(t_ns: u64, to: &str, netns: Option<u32>) -> KernelEvent {
    let mut e = ev(Kind::CaptureReset, 0, 0);
    e.mono_ns = t_ns;
    e.src = Some("127.0.0.1:15001".parse().unwrap());
    e.dst = Some(to.parse().unwrap());
    e.netns = netns;
    e.errno = 0;
    e.context_known = false;
    e
}

fn kernel_cfg() -> Config {
    Config {
        kernel_capture: true,
        kernel_capture_ports: vec![15001],
        ..Config::default()
    }
}

fn captures(out: &[Output]) -> Vec<(Phase, Option<Capture>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event {
                phase: Some(p),
                capture,
                ..
            } => Some((*p, *capture)),
            _ => None,
        })
        .collect()
}

/// A timeline entry: the capture reset of [`capture_reset`], unattributed.
fn reset(
    t_ns: u64,
    to: &str,
    netns: Option<u32>,
) -> (KernelEvent, Arc<Attribution>, Option<Hints>) {
    (capture_reset(t_ns, to, netns), none(), None)
}

/// A timeline entry: the app container's [`refusal`].
fn app_refusal(
    t_ms: u64,
    src: &str,
    dst: &str,
    netns: u32,
) -> (KernelEvent, Arc<Attribution>, Option<Hints>) {
    (refusal(t_ms, src, dst, netns), who("app"), None)
}

/// A timeline entry: the app's first process in an injected pod (t=100 ms).
fn app_started() -> (KernelEvent, Arc<Attribution>, Option<Hints>) {
    (ev(Kind::Exec, 100, 0), who("app"), injected())
}

fn none() -> Arc<Attribution> {
    Arc::new(Attribution::default())
}

#[test]
fn kernel_reset_just_before_a_refusal_makes_it_the_race() {
    let mut t = Tracker::new(kernel_cfg());
    let app = "10.1.0.5:40000";
    let out = run(
        &mut t,
        vec![
            app_started(),
            reset(200 * MS - 50_000, app, Some(7)),
            app_refusal(200, app, "10.0.0.1:80", 7),
            // No reset: the destination itself refused.
            app_refusal(300, "10.1.0.5:40002", "10.0.0.2:80", 7),
        ],
    );
    assert_eq!(
        captures(&out),
        vec![
            (Phase::StartupRace, Some(Capture::Kernel)),
            (Phase::NotCaptured, Some(Capture::Kernel)),
        ]
    );
    let mut out = Vec::new();
    t.flush(&mut out);
    let s = startup_races(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].refused, 1, "only the captured refusal counts");
    assert_eq!(s[0].destinations, vec!["10.0.0.1:80".to_string()]);
}

/// The kernel takes the LISTEN's timestamp just before the listener can
/// accept: a refusal the capture port proves, reported just after it, is
/// still the start-up race.
#[test]
fn proven_refusal_just_after_the_listen_is_still_the_race() {
    let mut t = Tracker::new(kernel_cfg());
    let app = "10.1.0.5:40000";
    let mut late = refusal(1100, app, "10.0.0.1:80", 7);
    late.mono_ns += 20_000;
    late.start_mono_ns = Some(1100 * MS + 5_000);
    let out = run(
        &mut t,
        vec![
            app_started(),
            (
                ev(Kind::Listen, 1100, 1337),
                who(istio::PROXY_CONTAINER),
                None,
            ),
            reset(1100 * MS + 10_000, app, Some(7)),
            (late, who("app"), None),
        ],
    );
    assert_eq!(
        captures(&out),
        vec![(Phase::StartupRace, Some(Capture::Kernel))]
    );
}

#[test]
fn reset_in_another_netns_or_to_another_port_does_not_match() {
    let mut t = Tracker::new(kernel_cfg());
    let out = run(
        &mut t,
        vec![
            app_started(),
            reset(199 * MS, "10.1.0.5:40000", Some(8)),
            app_refusal(200, "10.1.0.5:40000", "10.0.0.1:80", 7),
            reset(299 * MS, "10.1.0.5:40001", Some(7)),
            app_refusal(300, "10.1.0.5:40009", "10.0.0.1:80", 7),
            reset(399 * MS, "10.1.0.6:40010", Some(7)),
            app_refusal(400, "10.1.0.5:40010", "10.0.0.1:80", 7),
        ],
    );
    assert_eq!(phases(&out), vec![Phase::NotCaptured; 3]);
    let mut out = Vec::new();
    t.flush(&mut out);
    assert!(startup_races(&out).is_empty(), "no race summary");
}

#[test]
fn reset_with_unknown_netns_matches_by_address_and_is_used_once() {
    let mut t = Tracker::new(kernel_cfg());
    let app = "10.1.0.5:40000";
    let out = run(
        &mut t,
        vec![
            app_started(),
            reset(199 * MS, app, None),
            app_refusal(200, app, "10.0.0.1:80", 7),
            // The same port again, with no reset of its own.
            app_refusal(250, app, "10.0.0.1:80", 7),
        ],
    );
    assert_eq!(phases(&out), vec![Phase::StartupRace, Phase::NotCaptured]);
}

#[test]
fn old_capture_resets_expire_and_the_store_is_bounded() {
    let mut t = Tracker::new(Config {
        max_capture_resets: 3,
        ..kernel_cfg()
    });
    let mut evs = vec![(ev(Kind::Exec, 100, 0), who("app"), injected())];
    // A reset 1.5 s before its failure (the window is 1 s).
    evs.push(reset(200 * MS, "10.1.0.5:40000", Some(7)));
    evs.push(app_refusal(1700, "10.1.0.5:40000", "10.0.0.1:80", 7));
    // Five resets within the window: only the last three are kept.
    for i in 0..5u64 {
        let to = format!("10.1.0.5:{}", 41000 + i);
        evs.push(reset(1800 * MS + i, &to, Some(7)));
    }
    evs.push(app_refusal(1810, "10.1.0.5:41000", "10.0.0.1:80", 7));
    evs.push(app_refusal(1811, "10.1.0.5:41004", "10.0.0.1:80", 7));
    let out = run(&mut t, evs);
    assert_eq!(
        phases(&out),
        vec![Phase::NotCaptured, Phase::NotCaptured, Phase::StartupRace]
    );
    assert_eq!(t.capture_resets(), 2, "the matched one is used up");
}

#[test]
fn kernel_counts_are_exact_over_many_refusals() {
    let mut t = Tracker::new(kernel_cfg());
    let mut evs = vec![(ev(Kind::Exec, 100, 0), who("app"), injected())];
    for i in 0..200u64 {
        let app = format!("10.1.0.5:{}", 30000 + i);
        let t_ms = 200 + i;
        if i % 4 != 0 {
            evs.push(reset(t_ms * MS - 10_000, &app, Some(7)));
            evs.push(app_refusal(t_ms, &app, "10.0.0.1:80", 7));
        } else {
            evs.push(app_refusal(t_ms, &app, "10.96.0.1:80", 7));
        }
    }
    let out = run(&mut t, evs);
    let p = phases(&out);
    assert_eq!(p.iter().filter(|p| **p == Phase::StartupRace).count(), 150);
    assert_eq!(p.iter().filter(|p| **p == Phase::NotCaptured).count(), 50);
    let mut out = Vec::new();
    t.flush(&mut out);
    let s = startup_races(&out);
    assert_eq!(s[0].refused, 150);
    assert_eq!(s[0].destinations, vec!["10.0.0.1:80".to_string()]);
}

#[test]
fn held_failures_keep_the_proof_taken_in_kernel_order() {
    let mut t = Tracker::new(kernel_cfg());
    let app = "10.1.0.5:40000";
    // Injection learned only later: the failure is held, the reset is not
    // looked up again when it is released.
    let out = run(
        &mut t,
        vec![
            reset(199 * MS, app, Some(7)),
            app_refusal(200, app, "10.0.0.1:80", 7),
            (ev(Kind::Exec, 300, 0), who("app"), injected()),
        ],
    );
    assert_eq!(
        captures(&out),
        vec![(Phase::StartupRace, Some(Capture::Kernel))]
    );
}

fn with_rules(rules: CaptureRules) -> Option<Hints> {
    let mut h = injected().unwrap();
    h.capture = Some(rules);
    Some(h)
}

#[test]
fn without_kernel_proof_the_annotations_decide() {
    let mut t = Tracker::new(Config::default());
    let rules = CaptureRules::parse(
        Some("10.0.0.0/16"),
        Some("10.0.5.0/24"),
        Some("5432"),
        &["10.1.0.5".parse().unwrap()],
    );
    let app = "10.1.0.5:40000";
    let out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), with_rules(rules)),
            app_refusal(200, app, "10.0.0.1:80", 7),
            app_refusal(210, app, "10.0.5.1:80", 7),
            app_refusal(220, app, "10.0.0.1:5432", 7),
            app_refusal(230, app, "10.9.0.1:80", 7),
            app_refusal(240, app, "10.1.0.5:80", 7),
        ],
    );
    assert_eq!(
        captures(&out),
        vec![
            (Phase::StartupRace, Some(Capture::Annotations)),
            (Phase::NotCaptured, Some(Capture::Annotations)),
            (Phase::NotCaptured, Some(Capture::Annotations)),
            (Phase::NotCaptured, Some(Capture::Annotations)),
            (Phase::NotCaptured, Some(Capture::Annotations)),
        ]
    );
}

#[test]
fn inferred_capture_never_takes_the_sockets_own_address() {
    let mut t = Tracker::new(Config::default());
    let out = run(
        &mut t,
        vec![
            app_started(),
            app_refusal(200, "10.1.0.5:40000", "10.0.0.1:80", 7),
            app_refusal(210, "10.1.0.5:40001", "10.1.0.5:80", 7),
        ],
    );
    assert_eq!(
        captures(&out),
        vec![
            (Phase::StartupRace, Some(Capture::Inferred)),
            (Phase::NotCaptured, Some(Capture::Inferred)),
        ]
    );
}

#[test]
fn capture_rules_follow_istio_iptables_order() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    // Absent include: "*".
    let all = CaptureRules::parse(None, None, None, &[]);
    assert!(all.captures(sa("10.0.0.1:80"), None));
    assert!(all.captures(sa("[fd00::1]:80"), None));
    assert!(!all.captures(sa("127.0.0.1:80"), None));
    assert!(!all.captures(sa("[::1]:80"), None));
    // Empty include: nothing captured.
    let nothing = CaptureRules::parse(Some(""), None, None, &[]);
    assert!(!nothing.captures(sa("10.0.0.1:80"), None));
    // "*" among others is still everything.
    assert_eq!(
        CaptureRules::parse(Some("10.0.0.0/8,*"), None, None, &[]).include,
        None
    );
    // Exclude beats include; excluded ports beat everything.
    let r = CaptureRules::parse(
        Some("10.0.0.0/8, fd00::/16"),
        Some("10.96.0.0/12,10.1.2.3,bogus,10.0.0.0/33"),
        Some("5432, 9000,x"),
        &[ip("10.244.0.9"), ip("fd00:244::9")],
    );
    assert_eq!(r.exclude.len(), 2, "bad entries are skipped");
    assert_eq!(r.exclude_ports, vec![5432, 9000]);
    assert!(r.captures(sa("10.0.0.1:80"), None));
    assert!(r.captures(sa("[fd00:1::1]:80"), None));
    assert!(!r.captures(sa("10.96.0.1:80"), None));
    assert!(!r.captures(sa("10.111.255.255:80"), None));
    assert!(r.captures(sa("10.112.0.0:80"), None));
    assert!(!r.captures(sa("10.1.2.3:80"), None));
    assert!(r.captures(sa("10.1.2.4:80"), None));
    assert!(!r.captures(sa("10.0.0.1:5432"), None));
    assert!(!r.captures(sa("11.0.0.1:80"), None), "outside the include");
    // The pod's own addresses, and the socket's own source.
    assert!(!r.captures(sa("10.244.0.9:80"), None));
    assert!(!r.captures(sa("[fd00:244::9]:80"), None));
    assert!(!r.captures(sa("10.0.0.7:80"), Some(ip("10.0.0.7"))));
    // Prefix edges.
    let c = istio::Cidr::parse("0.0.0.0/0").unwrap();
    assert!(c.contains(ip("1.2.3.4")) && !c.contains(ip("::1")));
    let c = istio::Cidr::parse("::/0").unwrap();
    assert!(c.contains(ip("fd00::1")) && !c.contains(ip("1.2.3.4")));
    assert!(istio::Cidr::parse("fd00::/129").is_none());
}

/// `traffic.sidecar.istio.io/includeOutboundPorts` (istio-iptables `-q`):
/// those ports are captured whatever the ranges, but excluded ports,
/// loopback and excluded ranges come first.
#[test]
fn included_ports_are_captured_whatever_the_ranges() {
    let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    let mut p = crate::k8s::pod::tests_support::pod();
    for (k, v) in [
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
        (
            "traffic.sidecar.istio.io/includeOutboundPorts",
            "5432, 6379,x",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.9.0.0/16",
        ),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "6379"),
    ] {
        p.annotations.insert(k.into(), v.into());
    }
    let profiles = crate::race::mesh::Profiles::builtin();
    let r = CaptureRules::of(profiles.default_profile(), &p);
    assert_eq!(r.include_ports, [5432, 6379]);
    assert!(r.captures(sa("10.0.0.1:5432"), None), "an included port");
    assert!(!r.captures(sa("10.0.0.1:80"), None), "nothing else");
    assert!(
        !r.captures(sa("10.9.0.1:5432"), None),
        "excluded range first"
    );
    assert!(
        !r.captures(sa("10.0.0.1:6379"), None),
        "excluded port first"
    );
    assert!(!r.captures(sa("127.0.0.1:5432"), None), "loopback first");
}

/// The API's view of a pod is read through its mesh's rules: Consul's
/// capture everything but 127.0.0.1 (`::1`), the pod's own address too.
#[test]
fn the_api_s_capture_rules_follow_the_pod_s_mesh() {
    let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    let mut p = crate::k8s::pod::tests_support::pod();
    p.pod_ips = vec!["10.244.0.9".parse().unwrap()];
    let profiles = crate::race::mesh::Profiles::builtin();
    let consul = CaptureRules::of(profiles.get("consul").unwrap(), &p);
    assert!(consul.captures(sa("10.244.0.9:8080"), None), "own address");
    assert!(consul.captures(sa("127.0.0.2:8080"), None));
    assert!(!consul.captures(sa("127.0.0.1:8080"), None));
    let istio = CaptureRules::of(profiles.get("istio").unwrap(), &p);
    assert!(!istio.captures(sa("10.244.0.9:8080"), None), "own address");
    assert!(!istio.captures(sa("127.0.0.2:8080"), None));
}
