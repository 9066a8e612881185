//! Userspace pipeline throughput on one core: ring-buffer records decoded,
//! attributed (1000 simulated pods with runtime metadata), classified by the
//! race tracker and counted in the metrics. `cargo bench --bench pipeline`.

use std::os::unix::fs::MetadataExt as _;

use connscope::{
    attribute::Attributor,
    attribute::cgroup::Resolver,
    attribute::kubelet::Qos,
    attribute::runtime::{Reader, Roots},
    export::http::{Limits, Shared},
    export::json::{Sink, Target},
    export::metrics::Metrics,
    export::{ExportOptions, Exporter},
    kernel::decode::Clock,
    pipeline::Pipeline,
    race::{Config, Tracker},
    testbed::{
        pod::{Flavor, Pod},
        records,
    },
};
use connscope_ebpf::flags;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const PODS: usize = 1000;
const BATCH: usize = 10_000;

fn record(cgroup_id: u64, ts: u64, pid: u32) -> Vec<u8> {
    let mut ev = records::refused(cgroup_id, ts, pid);
    ev.flags = flags::RST | flags::NETNS_KNOWN | flags::CONTEXT_KNOWN | flags::NONBLOCKING;
    records::bytes(&ev)
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("connscope-bench-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cg = dir.join("cgroup");
    std::fs::create_dir_all(&cg).unwrap();
    let roots = Roots {
        containerd: dir.join("ctd"),
        crio: dir.join("crio"),
    };
    let pods: Vec<Pod> = (0..PODS)
        .map(|i| {
            Pod::create(
                &cg,
                &roots,
                Flavor::Containerd,
                Qos::Burstable,
                "shop",
                &format!("svc{i}-7d9f8c6b5-x2k4p"),
                &["app", "istio-proxy"],
            )
            .unwrap()
        })
        .collect();
    let ids: Vec<u64> = pods
        .iter()
        .map(|p| {
            std::fs::metadata(&p.container("app").unwrap().cgroup)
                .unwrap()
                .ino()
        })
        .collect();
    let clock = Clock::with_offset_ns(0);
    let mut ts = 1_000_000_000u64;
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    // Counting only (`--events none`, no /events buffer); then kept for
    // /events as well (serialised only when read); then every event also
    // serialised to a JSON stream (`--events <file>`).
    for (name, recent, target) in [
        ("decode+attribute+classify+count", 0, Target::None),
        ("same+kept_for_events_endpoint", 2048, Target::None),
        ("same+json_stream", 2048, Target::File("/dev/null".into())),
    ] {
        let who = Attributor::new(
            Some("node".into()),
            Resolver::new(Some(cg.clone())),
            Reader::new(roots.clone()),
            "/proc".into(),
        );
        let shared = Shared::new(
            Metrics::new(false).unwrap(),
            Limits {
                recent,
                ..Limits::default()
            },
        );
        let mut p = Pipeline::new(
            who,
            Tracker::new(Config::default()),
            Exporter::new(
                Sink::open(&target).unwrap(),
                shared,
                ExportOptions::default(),
            ),
            false,
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    ts += 1000;
                    let r = record(ids[i % PODS], ts, 1000 + (i % PODS) as u32);
                    p.record(&r, &clock);
                }
                p.advance(ts + 100_000_000);
            })
        });
    }
    group.finish();
    drop(pods);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
