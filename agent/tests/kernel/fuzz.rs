//! Bad input, briefly fuzzed (proptest): every parser of outside data must
//! never panic and never allocate without bound. Runs without root.
//!
//! Why: these inputs come from the kernel, files and the network. Each case
//! still takes a shared turn, so that a test that runs alone has the CPU to
//! itself.

use clap::Parser as _;
use connscope::{
    attribute::cgroup::{cgroup2_mount, proc_cgroup_path},
    attribute::kubelet::{derive_workload, parse_cgroup},
    attribute::restore::parse_proc_net_tcp,
    attribute::runtime::parse_config,
    cli::Cli,
    export::json::Target,
    k8s::{owner_to_walk, pod_info, workload},
    kernel::check::effective_caps,
    kernel::decode::{Clock, decode, decode_cgroup, parse_record},
    kernel::offsets::parse_format,
    race::config_flag,
};
use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::fixture::Turn;

/// Arbitrary JSON values, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map("[a-zA-Z]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ring_buffer_records(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        // Exactly the size of each record type, so that decoding (not only
        // the size check) meets arbitrary bytes.
        prop::collection::vec(any::<u8>(), size_of::<connscope_ebpf::Event>()),
        prop::collection::vec(any::<u8>(), size_of::<connscope_ebpf::PathEvent>()),
        prop::collection::vec(any::<u8>(), size_of::<connscope_ebpf::CgroupEvent>()),
    ]) {
        let _turn = Turn::shared();
        if let Ok(r) = parse_record(&bytes) {
            match r {
                connscope::kernel::decode::Raw::Event(e, p) => { let _ = decode(&e, p.as_ref(), &Clock::with_offset_ns(0)); }
                connscope::kernel::decode::Raw::Cgroup(c) => { let _ = decode_cgroup(&c); }
            }
        }
    }

    #[test]
    fn cgroup_paths_and_proc_files(s in ".{0,400}") {
        let _turn = Turn::shared();
        let _ = parse_cgroup(&s);
        let _ = derive_workload(&s);
        let _ = proc_cgroup_path(&s);
        let _ = cgroup2_mount(&s);
        let _ = parse_proc_net_tcp(&s);
        let _ = parse_format(&s);
        let _ = effective_caps(&s);
        let _ = config_flag(&s, "holdApplicationUntilProxyStarts");
        let _ = s.parse::<Target>();
    }

    #[test]
    fn proc_net_tcp_shaped_lines(
        port in "[0-9A-F]{0,6}", st in "[0-9A-F]{0,3}", uid in "[0-9x-]{0,12}", extra in " [^\n]{0,40}"
    ) {
        let _turn = Turn::shared();
        let text = format!("header\n  0: 00000000:{port} 00000000:0000 {st} 0:0 0:0 0 {uid} 0 1{extra}\n");
        let _ = parse_proc_net_tcp(&text);
    }

    #[test]
    fn oci_config_json(v in json_value()) {
        let _turn = Turn::shared();
        let _ = parse_config(v.to_string().as_bytes());
        let wrapped = json!({"annotations": v});
        let _ = parse_config(wrapped.to_string().as_bytes());
    }

    #[test]
    fn kubernetes_pod_json(meta in json_value(), spec in json_value(), status in json_value()) {
        let _turn = Turn::shared();
        let doc = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status});
        if let Ok(p) = serde_json::from_value::<Pod>(doc) {
            let _ = owner_to_walk(&p);
            let w = workload(&p, None);
            if let Some(info) = pod_info(&p, w) {
                // What the pod runs: every value checked, none trusted.
                let _ = connscope::attribute::revision::Revision::from_api(&info, &mut Vec::new());
            }
        }
    }

    #[test]
    fn command_lines(args in prop::collection::vec("[-a-z0-9=:./,]{0,16}", 0..8)) {
        let _turn = Turn::shared();
        let mut argv = vec!["connscope".to_string(), "run".to_string()];
        argv.extend(args);
        let _ = Cli::try_parse_from(argv);
    }
}
