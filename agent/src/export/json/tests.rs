//! The JSON lines' shapes and the stream's writer.

use super::*;
use crate::kernel::decode::Family;
use std::time::{Duration, UNIX_EPOCH};

fn failure() -> KernelEvent {
    KernelEvent {
        kind: Kind::ConnectFailure,
        mono_ns: 3_000_000,
        time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
        start_mono_ns: Some(1_000_000),
        pid: 7,
        tid: 8,
        uid: 0,
        gid: 0,
        comm: crate::kernel::decode::Comm::from_name("app"),
        cgroup_id: Some(9),
        netns: None,
        family: Family::Inet,
        src: Some("127.0.0.1:5000".parse().unwrap()),
        dst: Some("10.1.2.3:80".parse().unwrap()),
        path: None,
        errno: 111,
        nonblocking: true,
        from_syscall: false,
        rst: true,
        context_known: true,
    }
}

#[test]
fn connect_failure_json() {
    let e = failure();
    let v = serde_json::to_value(KernelJson::from_kernel(
        &e,
        &Attribution::default(),
        None,
        None,
        None,
    ))
    .unwrap();
    assert_eq!(v["type"], "connect_failure");
    assert_eq!(v["time"], "2023-11-14T22:13:20.123456789Z");
    assert_eq!(v["dst"], "10.1.2.3:80");
    assert_eq!(v["error"], "ECONNREFUSED");
    assert_eq!(v["duration_ms"], 2.0);
    assert_eq!(v["nonblocking"], true);
    assert!(v.get("netns").is_none(), "unknown fields are absent");
    assert!(v.get("port").is_none());
}

#[test]
fn unknown_context_hides_pid_and_comm() {
    let mut e = failure();
    e.context_known = false;
    let v = serde_json::to_value(KernelJson::from_kernel(
        &e,
        &Attribution::default(),
        None,
        None,
        None,
    ))
    .unwrap();
    assert!(v.get("pid").is_none() && v.get("comm").is_none());
}

#[test]
fn listen_json_has_port() {
    let mut e = failure();
    e.kind = Kind::Listen;
    e.dst = None;
    let v = serde_json::to_value(KernelJson::from_kernel(
        &e,
        &Attribution::default(),
        None,
        None,
        None,
    ))
    .unwrap();
    assert_eq!(
        (v["type"].as_str(), v["state"].as_str()),
        (Some("listener"), Some("listen"))
    );
    assert_eq!(v["port"], 5000);
    assert_eq!(v["src"], "127.0.0.1");
    assert!(v.get("error").is_none());
}

#[test]
fn target_parsing() {
    assert_eq!("stdout".parse::<Target>(), Ok(Target::Stdout));
    assert_eq!("none".parse::<Target>(), Ok(Target::None));
    assert_eq!(
        "/tmp/x.json".parse::<Target>(),
        Ok(Target::File("/tmp/x.json".into()))
    );
    assert!("".parse::<Target>().is_err());
}
