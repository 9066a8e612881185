//! Tests of the Prometheus metrics: labels, bounds, families.

use super::*;

fn who() -> Attribution {
    Attribution {
        namespace: Some("shop".into()),
        workload: Some("checkout".into()),
        pod: Some("checkout-abc".into()),
        container: Some("app".into()),
        ..Default::default()
    }
}

#[test]
fn failures_of_rebuilt_attributions_share_one_cache_entry() {
    // Attributions not final yet are rebuilt per event: equal content,
    // a new Arc each time. One cached counter, not one per event.
    let mut m = Metrics::new(false).unwrap();
    for _ in 0..1000 {
        m.failure(
            &Arc::new(who()),
            111,
            Phase::NoSidecar,
            "istio",
            Instant::now(),
        );
    }
    let mut other = who();
    other.container = Some("worker".into());
    m.failure(
        &Arc::new(other),
        111,
        Phase::NoSidecar,
        "istio",
        Instant::now(),
    );
    assert_eq!(m.failure_cache.len(), 2);
    let t = m.render();
    assert!(t.contains(r#"container="app",errno="ECONNREFUSED",mesh="istio",namespace="shop",phase="no_sidecar",workload="checkout"} 1000"#), "{t}");
    assert!(t.contains(r#"container="worker",errno="ECONNREFUSED",mesh="istio",namespace="shop",phase="no_sidecar",workload="checkout"} 1"#), "{t}");
}

#[test]
fn renders_the_contract() {
    let mut m = Metrics::new(false).unwrap();
    m.failure(
        &Arc::new(who()),
        111,
        Phase::StartupRace,
        "istio",
        Instant::now(),
    );
    m.startup_race(&who(), "istio", Some(1.5));
    m.pod_started(&who(), "istio", true);
    m.sidecar_ready(&who(), "istio", 2.0);
    let t = m.render();
    assert!(t.contains(r#"connscope_connect_failures_total{container="app",errno="ECONNREFUSED",mesh="istio",namespace="shop",phase="startup_race",workload="checkout"} 1"#), "{t}");
    assert!(t.contains(
        r#"connscope_startup_race_pods_total{mesh="istio",namespace="shop",workload="checkout"} 1"#
    ));
    assert!(t.contains(r#"connscope_pods_started_total{injected="true",mesh="istio",namespace="shop",workload="checkout"} 1"#));
    assert!(t.contains(r#"connscope_startup_race_window_seconds_bucket{mesh="istio",namespace="shop",workload="checkout",le="2.5"} 1"#));
    assert!(t.contains("connscope_build_info{version="));
    assert!(
        !t.contains("checkout-abc"),
        "no pod names without --pod-labels"
    );
}

#[test]
fn renders_the_inbound_contract() {
    let mut m = Metrics::new(false).unwrap();
    m.pod_started(&who(), "istio", true);
    for p in [
        Phase::InboundStartup,
        Phase::InboundShutdown,
        Phase::InboundBind,
        Phase::Probe,
    ] {
        m.failure(&Arc::new(who()), 111, p, "istio", Instant::now());
    }
    m.inbound_race(&who(), "istio", When::Startup);
    m.inbound_race(&who(), "istio", When::Bind);
    m.app_listen(&who(), "istio", 0.3);
    let t = m.render();
    for line in [
        r#"connscope_inbound_race_pods_total{mesh="istio",namespace="shop",when="startup",workload="checkout"} 1"#,
        r#"connscope_inbound_race_pods_total{mesh="istio",namespace="shop",when="shutdown",workload="checkout"} 0"#,
        r#"connscope_app_listen_seconds_bucket{mesh="istio",namespace="shop",workload="checkout",le="0.5"} 1"#,
        r#"phase="inbound_startup""#,
        r#"phase="inbound_shutdown""#,
        r#"phase="inbound_bind""#,
        r#"phase="probe""#,
    ] {
        assert!(t.contains(line), "{line} in {t}");
    }
    assert!(!t.contains(r#"when="bind""#), "bind is not a race: {t}");
}

#[test]
fn revision_info_follows_the_running_revisions() {
    let mut m = Metrics::new(false).unwrap();
    let series = |v: &[[&str; 4]]| -> std::collections::BTreeSet<Series> {
        v.iter().map(|s| s.map(str::to_string)).collect()
    };
    let old = ["shop", "checkout", "7d9f8c6b5", "1.22.3"];
    let new = ["shop", "checkout", "5f6d7c8b9", "1.23.0"];
    m.set_revisions(&series(&[old]));
    m.set_revisions(&series(&[old, new]));
    let t = m.render();
    for line in [
        r#"connscope_workload_revision_info{namespace="shop",proxy_version="1.22.3",revision="7d9f8c6b5",workload="checkout"} 1"#,
        r#"connscope_workload_revision_info{namespace="shop",proxy_version="1.23.0",revision="5f6d7c8b9",workload="checkout"} 1"#,
    ] {
        assert!(t.contains(line), "{line} in {t}");
    }
    // The old revision's last pod left.
    m.set_revisions(&series(&[new]));
    let t = m.render();
    assert!(!t.contains("7d9f8c6b5"), "{t}");
    assert!(t.contains(r#"revision="5f6d7c8b9""#));
}

#[test]
fn pod_labels_are_opt_in() {
    let mut m = Metrics::new(true).unwrap();
    m.startup_race(&who(), "istio", None);
    assert!(m.render().contains(r#"pod="checkout-abc""#));
}

#[test]
fn event_types_index_their_own_counters() {
    for (i, t) in RecordType::ALL.into_iter().enumerate() {
        assert_eq!(t as usize, i, "{t:?}");
    }
    let m = Metrics::new(false).unwrap();
    m.add_events(&[1, 2, 3, 4, 5, 6]);
    let text = m.render();
    for (t, n) in RecordType::ALL.into_iter().zip(1..) {
        let line = format!("connscope_events_total{{type=\"{}\"}} {n}", t.label());
        assert!(text.contains(&line), "{line} in {text}");
    }
}

#[test]
fn stale_series_expire() {
    let mut m = Metrics::new(false).unwrap();
    m.failure(
        &Arc::new(who()),
        111,
        Phase::NoSidecar,
        "istio",
        Instant::now(),
    );
    m.pod_started(&who(), "istio", false);
    assert_eq!(m.series(), 2);
    m.series_ttl = Duration::ZERO;
    m.expire();
    assert_eq!(m.series(), 0);
    assert!(!m.render().contains("workload=\"checkout\""));
}
