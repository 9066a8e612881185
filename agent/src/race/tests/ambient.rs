//! Ambient enrollment on hand-made timelines: ztunnel's listeners by netns,
//! the grace period, what the API must say, and the phases of ambient pods.

use super::*;
use crate::k8s::{
    PodInfo,
    pod::{IstioAnnotations, Workload},
};
use crate::race::ambient::AmbientMarks;

const NS: u32 = 7;

fn grace_1s() -> Config {
    Config {
        ambient_grace_ns: 1_000 * MS,
        ..Config::default()
    }
}

fn pod_info(marks: AmbientMarks, sidecar: bool) -> PodInfo {
    PodInfo {
        uid: "uid-1".into(),
        namespace: "shop".into(),
        name: "checkout-7d9f8c6b5-xk2lp".into(),
        node: Some("n".into()),
        workload: Workload {
            kind: "Deployment".into(),
            name: "checkout".into(),
        },
        containers: Vec::new(),
        istio: IstioAnnotations {
            sidecar_status: sidecar.then(|| "{}".into()),
            ambient: marks,
            ..Default::default()
        },
        pod_ips: vec!["10.0.0.9".parse().unwrap()],
        spec_containers: Vec::new(),
        template_hash: None,
        finished: false,
        annotations: sidecar
            .then(|| ("sidecar.istio.io/status".to_string(), "{}".to_string()))
            .into_iter()
            .collect(),
        labels: Default::default(),
        namespace_labels: Default::default(),
    }
}

fn annotated() -> AmbientMarks {
    AmbientMarks {
        redirection: Some("enabled".into()),
        ..Default::default()
    }
}

/// ztunnel (outside any pod) opening or closing `port` in netns `NS`.
fn ztunnel(kind: Kind, t_ms: u64, port: u16) -> (KernelEvent, Arc<Attribution>, Option<Hints>) {
    let mut e = ev(kind, t_ms, 0);
    e.comm = crate::kernel::decode::Comm::from_name("ztunnel");
    e.netns = Some(NS);
    e.src = Some(format!("0.0.0.0:{port}").parse().unwrap());
    (e, Arc::default(), None)
}

/// The pod's app starting in netns `NS`.
fn app_exec(t_ms: u64) -> (KernelEvent, Arc<Attribution>, Option<Hints>) {
    let mut e = ev(Kind::Exec, t_ms, 0);
    e.netns = Some(NS);
    (e, who("app"), None)
}

/// The app refused (dst 10.0.0.1:80, from the pod's 10.0.0.9).
fn app_refused(t_ms: u64) -> (KernelEvent, Arc<Attribution>, Option<Hints>) {
    let mut e = ev(Kind::ConnectFailure, t_ms, 0);
    e.netns = Some(NS);
    e.src = Some("10.0.0.9:40000".parse().unwrap());
    (e, who("app"), None)
}

fn at(
    t: &mut Tracker,
    evs: Vec<(KernelEvent, Arc<Attribution>, Option<Hints>)>,
    now_ms: u64,
) -> Vec<Output> {
    let mut out = Vec::new();
    for (e, w, h) in evs {
        t.push(e, w, h);
    }
    t.advance(now_ms * MS, &mut out);
    out
}

fn lines(out: &[Output]) -> Vec<&AmbientEnrollment> {
    out.iter()
        .filter_map(|o| match o {
            Output::Ambient(AmbientOut::Line(l)) => Some(l),
            _ => None,
        })
        .collect()
}

fn gauge(out: &[Output]) -> Option<usize> {
    out.iter().rev().find_map(|o| match o {
        Output::Ambient(AmbientOut::Unenrolled(_, p)) => Some(p.len()),
        _ => None,
    })
}

fn meshed_phases(out: &[Output]) -> Vec<(Phase, Option<String>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event {
                phase: Some(p),
                mesh,
                ..
            } => Some((*p, mesh.as_deref().map(str::to_string))),
            _ => None,
        })
        .collect()
}

#[test]
fn the_api_s_marks_say_ambient_and_none_opts_out() {
    let p = crate::race::mesh::installed().ambient();
    assert_eq!(p.marks_ambient(&annotated()), Some(true));
    let label = |v: &str| AmbientMarks {
        dataplane_mode: Some(v.into()),
        ..Default::default()
    };
    assert_eq!(p.marks_ambient(&label("ambient")), Some(true));
    assert_eq!(p.marks_ambient(&label("none")), Some(false));
    assert_eq!(p.marks_ambient(&AmbientMarks::default()), None);
    // The namespace's intent, unless the pod opts out.
    let in_ns = |pod: Option<&str>| AmbientMarks {
        dataplane_mode: pod.map(Into::into),
        namespace_mode: Some("ambient".into()),
        ..Default::default()
    };
    assert_eq!(p.marks_ambient(&in_ns(None)), Some(true));
    assert_eq!(p.marks_ambient(&in_ns(Some("none"))), Some(false));
    assert_eq!(p.ports(), [15008, 15006, 15001]);
}

#[test]
fn lost_after_the_grace_period_with_the_close_time() {
    let mut t = Tracker::new(grace_1s());
    t.ambient_api(&pod_info(annotated(), false));
    let out = at(
        &mut t,
        vec![
            app_exec(100),
            ztunnel(Kind::Listen, 200, 15008),
            ztunnel(Kind::Listen, 200, 15001),
        ],
        300,
    );
    let l = lines(&out);
    assert_eq!(l.len(), 1, "{out:?}");
    assert_eq!(l[0].state, Enrollment::Enrolled);
    assert_eq!(l[0].netns, NS);
    assert_eq!(&*l[0].mesh, "istio-ambient");
    // ztunnel restarts without the pod: its listeners close at 1000 ms.
    let out = at(
        &mut t,
        vec![
            ztunnel(Kind::ListenClose, 1000, 15008),
            ztunnel(Kind::ListenClose, 1000, 15001),
        ],
        1900,
    );
    assert!(lines(&out).is_empty(), "within the grace: {out:?}");
    let out = at(&mut t, vec![app_refused(1950)], 2100);
    let l = lines(&out);
    assert_eq!(l.len(), 1, "{out:?}");
    assert_eq!(l[0].state, Enrollment::Lost);
    assert_eq!(l[0].lost_mono_ns, Some(1000 * MS));
    assert!(l[0].recommendation.is_some());
    assert_eq!(gauge(&out), Some(1));
    assert_eq!(
        meshed_phases(&out),
        [(Phase::ShutdownRace, Some("istio-ambient".into()))]
    );
    // ztunnel comes back: enrolled, the gauge empties.
    let out = at(&mut t, vec![ztunnel(Kind::Listen, 2200, 15008)], 2300);
    assert_eq!(lines(&out)[0].state, Enrollment::Enrolled);
    assert_eq!(gauge(&out), Some(0));
}

#[test]
fn never_enrolled_after_the_grace_period_and_refusals_are_the_startup_race() {
    let mut t = Tracker::new(grace_1s());
    t.ambient_api(&pod_info(annotated(), false));
    let out = at(&mut t, vec![app_exec(100), app_refused(150)], 1000);
    assert!(lines(&out).is_empty());
    assert_eq!(
        meshed_phases(&out),
        [(Phase::StartupRace, Some("istio-ambient".into()))],
        "never no_sidecar"
    );
    let out = at(&mut t, vec![], 1200);
    let l = lines(&out);
    assert_eq!(l.len(), 1, "{out:?}");
    assert_eq!(l[0].state, Enrollment::Never);
    assert_eq!(l[0].since_mono_ns, Some(100 * MS));
    assert_eq!(l[0].lost_mono_ns, None);
    assert_eq!(gauge(&out), Some(1));
    // Reported once.
    assert!(lines(&at(&mut t, vec![], 5000)).is_empty());
    // The pod goes: the gauge empties.
    t.ambient_forget("uid-1");
    assert_eq!(gauge(&at(&mut t, vec![], 5100)), Some(0));
}

#[test]
fn without_the_api_the_kernel_shows_enrolled_but_never_reports_unenrolled() {
    let mut t = Tracker::new(grace_1s());
    let out = at(
        &mut t,
        vec![app_exec(100), ztunnel(Kind::Listen, 200, 15008)],
        300,
    );
    assert_eq!(lines(&out)[0].state, Enrollment::Enrolled);
    let out = at(&mut t, vec![ztunnel(Kind::ListenClose, 400, 15008)], 5000);
    assert!(lines(&out).is_empty(), "not known to be ambient: {out:?}");
    assert_eq!(gauge(&out), None);
    // A pod with no ztunnel listener ever and no API: not ambient at all.
    let mut t = Tracker::new(grace_1s());
    let out = at(&mut t, vec![app_exec(100), app_refused(150)], 9000);
    assert!(lines(&out).is_empty());
    assert_eq!(meshed_phases(&out), [(Phase::NoSidecar, None)]);
}

#[test]
fn a_sidecar_wins_over_ambient_marks() {
    let mut t = Tracker::new(grace_1s());
    t.ambient_api(&pod_info(annotated(), true));
    let out = at(&mut t, vec![app_exec(100)], 5000);
    assert!(lines(&out).is_empty(), "{out:?}");
    assert_eq!(gauge(&out), None);
}

#[test]
fn ztunnel_refused_on_hbone_is_the_destination_pod_s() {
    let mut t = Tracker::new(grace_1s());
    t.ambient_api(&pod_info(annotated(), false));
    let mut e = ev(Kind::ConnectFailure, 100, 0);
    e.comm = crate::kernel::decode::Comm::from_name("ztunnel");
    e.netns = Some(99);
    e.dst = Some("10.0.0.9:15008".parse().unwrap());
    let mut elsewhere = e.clone();
    elsewhere.dst = Some("10.0.0.10:15008".parse().unwrap());
    let out = at(
        &mut t,
        vec![(e, Arc::default(), None), (elsewhere, Arc::default(), None)],
        300,
    );
    let evs: Vec<(Option<String>, Option<Phase>, bool)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Event {
                who, phase, mesh, ..
            } => Some((who.pod.clone(), *phase, mesh.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(
        evs,
        [
            (
                Some("checkout-7d9f8c6b5-xk2lp".into()),
                Some(Phase::Proxy),
                true
            ),
            // Not a pod of this node: the source's (no pod here).
            (None, Some(Phase::NoSidecar), false),
        ]
    );
}

#[test]
fn a_new_sandbox_without_ztunnel_is_lost_after_the_grace_period() {
    let mut t = Tracker::new(grace_1s());
    t.ambient_api(&pod_info(annotated(), false));
    let out = at(
        &mut t,
        vec![app_exec(100), ztunnel(Kind::Listen, 200, 15008)],
        300,
    );
    assert_eq!(lines(&out)[0].state, Enrollment::Enrolled);
    // The pod's sandbox is recreated (a new netns) and ztunnel never comes.
    let mut e = ev(Kind::Exec, 400, 0);
    e.netns = Some(NS + 1);
    let out = at(&mut t, vec![(e, who("app"), None)], 1300);
    assert!(lines(&out).is_empty(), "within the grace: {out:?}");
    let out = at(&mut t, vec![], 2000);
    let l = lines(&out);
    assert_eq!(l.len(), 1, "{out:?}");
    assert_eq!(l[0].state, Enrollment::Lost);
    assert_eq!(l[0].netns, NS + 1);
}
