//! Other meshes through their profiles: a pod's mesh from the kernel's
//! evidence alone, and each mesh's own capture semantics and advice.

use super::*;

/// The pod's container-less attribution (a proxy known by uid only).
fn pod_level() -> Arc<Attribution> {
    Arc::new(Attribution {
        container: None,
        ..(*who("app")).clone()
    })
}

fn summaries(out: &[Output]) -> Vec<&RaceSummary> {
    startup_races(out)
}

#[test]
fn a_linkerd_pod_is_known_by_its_proxys_listen_and_races_on_4140() {
    let mut t = Tracker::new(Config::default());
    let out = run(
        &mut t,
        vec![
            (ev(Kind::Exec, 100, 0), who("app"), None),
            (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
            (ev(Kind::ConnectFailure, 300, 0), who("app"), None),
            // Its admin port first: the pod is Linkerd's, not ready yet.
            (
                ev(Kind::Listen, 400, 2102).with_port(4191),
                pod_level(),
                None,
            ),
            (ev(Kind::ConnectFailure, 500, 0), who("app"), None),
            (
                ev(Kind::Listen, 1100, 2102).with_port(4140),
                pod_level(),
                None,
            ),
            (ev(Kind::ConnectFailure, 1200, 0), who("app"), None),
            // Istio's uid and port mean nothing in a Linkerd pod.
            (
                ev(Kind::Listen, 1300, 1337).with_port(15001),
                pod_level(),
                None,
            ),
        ],
    );
    assert_eq!(
        phases(&out),
        vec![
            Phase::StartupRace,
            Phase::StartupRace,
            Phase::StartupRace,
            Phase::SidecarReady
        ]
    );
    let s = summaries(&out);
    assert_eq!(
        (s.len(), s[0].refused, s[0].mesh.as_str()),
        (1, 3, "linkerd")
    );
    assert!(
        s[0].recommendation
            .contains("config.linkerd.io/proxy-await")
    );
    assert!(out.iter().any(|o| matches!(o,
        Output::Event { mesh: Some(m), phase: Some(_), .. } if &**m == "linkerd")));
}

#[test]
fn consul_captures_the_pods_own_address_and_istio_does_not() {
    let own = |uid: u32| {
        let mut e = ev(Kind::ConnectFailure, 200, uid);
        e.src = Some("10.0.0.9:40000".parse().unwrap());
        e.dst = Some("10.0.0.9:8080".parse().unwrap());
        e
    };
    for (proxy_uid, port, want) in [
        (5995, 20000, Phase::StartupRace),
        (1337, 15021, Phase::NotCaptured),
    ] {
        let mut t = Tracker::new(Config::default());
        let out = run(
            &mut t,
            vec![
                (
                    ev(Kind::Listen, 100, proxy_uid).with_port(port),
                    pod_level(),
                    None,
                ),
                (own(0), who("app"), None),
            ],
        );
        assert_eq!(phases(&out), vec![want], "proxy uid {proxy_uid}");
    }
}

#[test]
fn the_kernels_proof_holds_only_for_its_ports() {
    // The kernel watches 15001 only: a Linkerd pod's refusal (captured to
    // 4140) gets no proof from it and is inferred, never "not captured".
    let mut t = Tracker::new(Config {
        kernel_capture: true,
        kernel_capture_ports: vec![15001],
        ..Config::default()
    });
    let out = run(
        &mut t,
        vec![
            (
                ev(Kind::Listen, 100, 2102).with_port(4191),
                pod_level(),
                None,
            ),
            (ev(Kind::ConnectFailure, 200, 0), who("app"), None),
        ],
    );
    let got: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Event {
                phase: Some(p),
                capture,
                ..
            } => Some((*p, *capture)),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![(Phase::StartupRace, Some(Capture::Inferred))]);
}
