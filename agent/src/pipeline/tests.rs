//! Tests of the pipeline: metadata waits, order, restore.

use super::*;
use crate::{
    attribute::{
        cgroup::Resolver,
        runtime::{Reader, Roots},
    },
    export::{
        ExportOptions,
        http::{Limits, Shared},
        json::{Sink, Target},
        metrics::Metrics,
    },
    testbed::records,
};
use connscope_ebpf::flags;
use std::time::Duration;

fn refused(ts: u64) -> Vec<u8> {
    // Host process, loopback: nothing to attribute, no pod to hold for.
    let mut ev = records::refused(0, ts, 4_000_000);
    ev.flags = flags::FROM_SYSCALL | flags::CONTEXT_KNOWN;
    ev.netns = 0;
    ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    ev.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    records::bytes(&ev)
}

fn pipeline(out: &std::path::Path) -> Pipeline {
    pipeline_api(out, false)
}

fn pipeline_api(out: &std::path::Path, use_api: bool) -> Pipeline {
    let none = out.with_extension("none");
    let who = Attributor::new(
        None,
        Resolver::new(Some(none.clone())),
        Reader::new(Roots {
            containerd: none.clone(),
            crio: none,
        }),
        "/nonexistent-proc".into(),
    );
    Pipeline::new(
        who,
        Tracker::new(race::Config::default()),
        Exporter::new(
            Sink::open(&Target::File(out.into())).unwrap(),
            Shared::new(Metrics::new(false).unwrap(), Limits::default()),
            ExportOptions::default(),
        ),
        use_api,
    )
}

/// Sum of every rendered sample whose series starts with `prefix`.
fn metric_sum(p: &Pipeline, prefix: &str) -> f64 {
    p.exporter
        .shared()
        .metrics
        .lock()
        .unwrap()
        .render()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn exit_flush_past_its_deadline_counts_what_it_does_not_write() {
    let dir = std::env::temp_dir().join(format!("connscope-flush-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clock = Clock::with_offset_ns(0);
    for (deadline_passed, file) in [(false, "in-time.json"), (true, "late.json")] {
        let out = dir.join(file);
        let mut p = pipeline(&out);
        for i in 0..50 {
            p.record(&refused(1_000_000_000 + i * 1000), &clock);
        }
        let deadline = if deadline_passed {
            std::time::Instant::now()
        } else {
            std::time::Instant::now() + Duration::from_secs(60)
        };
        let (skipped, _) = p.flush_until(deadline);
        let written = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"connect_failure\""))
            .count() as u64;
        assert_eq!(
            metric_sum(&p, "connscope_connect_failures_total"),
            50.0,
            "{file}: every failure counted"
        );
        assert_eq!(written + skipped, 50, "{file}: written or reported skipped");
        assert_eq!(skipped > 0, deadline_passed, "{file}: skipped {skipped}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn api_pods_give_revisions_and_what_they_leave_out_is_counted_once_per_change() {
    use crate::k8s::{
        PodInfo, Update,
        pod::{IstioAnnotations, SpecContainer, Workload},
    };
    let out = std::env::temp_dir().join(format!("connscope-rev-{}.json", std::process::id()));
    let mut p = pipeline_api(&out, true);
    let container = |name: &str, image: &str| SpecContainer {
        name: name.into(),
        image: Some(image.into()),
        init: false,
        post_start: Vec::new(),
    };
    let pod = PodInfo {
        uid: "u1".into(),
        namespace: "shop".into(),
        name: "checkout-7d9f8c6b5-xk2lp".into(),
        node: Some("node-a".into()),
        workload: Workload {
            kind: "Deployment".into(),
            name: "checkout".into(),
        },
        containers: Vec::new(),
        istio: IstioAnnotations::default(),
        pod_ips: Vec::new(),
        spec_containers: vec![
            container("app", "registry.example/shop/checkout:1.4.2"),
            container("sidecar", "bad image"),
            container("istio-proxy", "docker.io/istio/proxyv2:1.22.3"),
        ],
        template_hash: Some("7d9f8c6b5".into()),
        finished: false,
        annotations: Default::default(),
        labels: Default::default(),
        namespace_labels: Default::default(),
    };
    // Status updates of the same pod: one change, counted once.
    for _ in 0..3 {
        p.pods_changed(Update::Apply(Box::new(pod.clone())));
    }
    assert_eq!(p.who.rejected.get(&("kubernetes", "image")), Some(&1));
    let r = p.revisions.get("u1").unwrap();
    assert_eq!(r.proxy_version.as_deref(), Some("1.22.3"));
    assert_eq!(r.app_images.len(), 1, "{r:?}");
    let series: Vec<_> = p.revisions.series().unwrap().into_iter().collect();
    assert_eq!(
        series,
        [["shop", "checkout", "7d9f8c6b5", "1.22.3"].map(str::to_string)]
    );
    // A relist without the pod: it left.
    p.pods_changed(Update::Replace(Vec::new()));
    assert_eq!(p.revisions.series().unwrap().len(), 0);
    assert!(p.revisions.get("u1").is_some(), "kept for late summaries");
    let _ = std::fs::remove_file(&out);
}

fn events_total(p: &Pipeline, kind: &str) -> f64 {
    metric_sum(p, &format!("connscope_events_total{{type=\"{kind}\"}} "))
}

#[test]
fn record_types_are_counted_per_batch_and_reach_the_metrics_at_export() {
    let out = std::env::temp_dir().join(format!("connscope-kinds-{}.json", std::process::id()));
    let mut p = pipeline(&out);
    let clock = Clock::with_offset_ns(0);
    for i in 0..7 {
        p.record(&refused(1_000_000_000 + i * 1000), &clock);
    }
    p.record(&[1, 2, 3], &clock);
    assert_eq!(
        events_total(&p, "connect_failure"),
        0.0,
        "added at export, not per record"
    );
    p.advance(1_000_000_000);
    assert_eq!(events_total(&p, "connect_failure"), 7.0);
    assert_eq!(events_total(&p, "unknown"), 1.0, "an undecodable record");
    assert_eq!(events_total(&p, "listener"), 0.0);
    p.record(&refused(2_000_000_000), &clock);
    p.advance(2_000_000_000);
    assert_eq!(
        events_total(&p, "connect_failure"),
        8.0,
        "the next batch adds, once"
    );
    let _ = std::fs::remove_file(&out);
}
