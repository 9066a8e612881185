//! Ring records to kernel events, on hand-made records.

use super::*;
use crate::testbed::records;

fn raw(kind: u8) -> Event {
    Event {
        start_ns: 1_500_000_000,
        tgid: 100,
        tid: 101,
        uid: 1000,
        gid: 1000,
        netns: 4026531840,
        kind,
        comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        ..records::refused(42, 2_000_000_000, 100)
    }
}

#[test]
fn decodes_ipv4_refusal() {
    let clock = Clock::with_offset_ns(1_000_000_000_000_000_000);
    let Raw::Event(ev, None) = parse_record(&records::bytes(&raw(kind::CONNECT_FAILURE))).unwrap()
    else {
        panic!("not a plain event")
    };
    let k = decode(&ev, None, &clock).unwrap();
    assert_eq!(k.kind, Kind::ConnectFailure);
    assert_eq!(k.dst, Some("10.0.0.1:8080".parse().unwrap()));
    assert_eq!(k.src, Some("10.0.0.2:40000".parse().unwrap()));
    assert_eq!(k.comm, "curl");
    assert_eq!(k.pid, 100);
    assert_eq!(k.netns, Some(4026531840));
    assert_eq!(k.start_mono_ns, Some(1_500_000_000));
    assert!(k.rst && k.from_syscall && !k.nonblocking && k.context_known);
    assert_eq!(
        k.time,
        UNIX_EPOCH + Duration::from_nanos(1_000_000_002_000_000_000)
    );
    assert_eq!(errno_name(k.errno), "ECONNREFUSED");
}

#[test]
fn decodes_ipv6_and_unknown_netns() {
    let mut r = raw(kind::CONNECT_FAILURE);
    r.family = libc::AF_INET6 as u16;
    r.daddr = Ipv6Addr::LOCALHOST.octets();
    r.flags = flags::NONBLOCKING;
    let k = decode(&r, None, &Clock::with_offset_ns(0)).unwrap();
    assert_eq!(k.dst, Some("[::1]:8080".parse().unwrap()));
    assert_eq!(k.netns, None);
    assert!(k.nonblocking && !k.context_known);
}

#[test]
fn ipv4_mapped_addresses_are_reported_as_ipv4() {
    let mut r = raw(kind::CONNECT_FAILURE);
    r.family = libc::AF_INET6 as u16;
    r.saddr = Ipv4Addr::new(10, 1, 2, 9).to_ipv6_mapped().octets();
    r.daddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
    let k = decode(&r, None, &Clock::with_offset_ns(0)).unwrap();
    assert_eq!(k.dst, Some("127.0.0.1:8080".parse().unwrap()));
    assert!(
        k.dst.unwrap().ip().is_loopback(),
        "mapped loopback is loopback"
    );
    assert_eq!(k.src.unwrap().ip(), IpAddr::from([10, 1, 2, 9]));
    assert_eq!(k.family, Family::Inet);
    // A real IPv6 peer keeps its form and family.
    r.daddr = "fd00::7".parse::<Ipv6Addr>().unwrap().octets();
    r.saddr = "fd00::9".parse::<Ipv6Addr>().unwrap().octets();
    let k = decode(&r, None, &Clock::with_offset_ns(0)).unwrap();
    assert_eq!(k.dst, Some("[fd00::7]:8080".parse().unwrap()));
    assert_eq!(k.family, Family::Inet6);
}

/// A record with a path, as the ring hands it over, read back.
fn with_path(ev: Event, path: &[u8]) -> KernelEvent {
    let mut p = PathEvent {
        event: ev,
        path: [0; PATH_LEN],
        reserved: [0; 4],
    };
    p.path[..path.len()].copy_from_slice(path);
    let Raw::Event(ev, path) = parse_record(&records::bytes(&p)).unwrap() else {
        panic!("not an event")
    };
    assert!(path.is_some(), "the path was lost");
    decode(&ev, path.as_ref(), &Clock::with_offset_ns(0)).unwrap()
}

#[test]
fn decodes_unix_paths_including_abstract() {
    let mut r = raw(kind::CONNECT_FAILURE);
    r.family = libc::AF_UNIX as u16;
    let k = with_path(r, b"/run/x.sk");
    assert_eq!(k.path.as_deref(), Some("/run/x.sk"));
    assert_eq!(k.dst, None);
    assert_eq!(with_path(r, b"\0abc").path.as_deref(), Some("@abc"));
}

#[test]
fn exec_carries_filename_and_no_addresses() {
    let k = with_path(raw(kind::EXEC), b"/bin/app");
    assert_eq!(k.path.as_deref(), Some("/bin/app"));
    assert_eq!((k.src, k.dst, k.start_mono_ns), (None, None, None));
}

#[test]
fn inet_failures_carry_no_path() {
    let r = raw(kind::CONNECT_FAILURE);
    let k = decode(&r, None, &Clock::with_offset_ns(0)).unwrap();
    assert_eq!(k.path, None);
}

#[test]
fn rejects_wrong_size_and_unknown_kind() {
    assert_eq!(parse_record(&[0u8; 3]), Err(DecodeError::Size(3)));
    let one_short = size_of::<Event>() - 1;
    assert_eq!(
        parse_record(&vec![0u8; one_short]),
        Err(DecodeError::Size(one_short))
    );
    assert_eq!(
        decode(&raw(99), None, &Clock::with_offset_ns(0)),
        Err(DecodeError::Kind(99))
    );
}

#[test]
fn comm_without_nul_and_non_utf8_is_kept() {
    let mut r = raw(kind::EXIT);
    r.comm = [0xff; COMM_LEN];
    let k = decode(&r, None, &Clock::with_offset_ns(0)).unwrap();
    assert_eq!(k.comm.as_str().chars().count(), COMM_LEN);
}

#[test]
fn cgroup_records_are_told_apart_by_size() {
    let mut c = CgroupEvent {
        ts_ns: 1,
        cgroup_id: 77,
        level: 3,
        kind: kind::CGROUP_MKDIR,
        reserved: [0; 3],
        path: [0; connscope_ebpf::CGROUP_PATH_LEN],
    };
    c.path[..9].copy_from_slice(b"/kubepods");
    let Raw::Cgroup(r) = parse_record(&records::bytes(&c)).unwrap() else {
        panic!("not a cgroup record")
    };
    assert_eq!(
        decode_cgroup(&r).unwrap(),
        CgroupChange {
            created: true,
            id: 77,
            path: "/kubepods".into(),
            truncated: false,
        }
    );
    // A path that fills the record may have been cut.
    c.path[..connscope_ebpf::CGROUP_PATH_LEN - 1].fill(b'a');
    c.path[connscope_ebpf::CGROUP_PATH_LEN - 1] = 0;
    assert!(decode_cgroup(&c).unwrap().truncated);
    c.path[connscope_ebpf::CGROUP_PATH_LEN - 2] = 0;
    assert!(!decode_cgroup(&c).unwrap().truncated, "254 bytes: whole");
    assert!(matches!(
        parse_record(&records::bytes(&raw(kind::EXIT))),
        Ok(Raw::Event(_, None))
    ));
    c.kind = 42;
    assert_eq!(decode_cgroup(&c), Err(DecodeError::Kind(42)));
}

#[test]
fn errno_names() {
    assert_eq!(errno_name(0), "none");
    assert_eq!(errno_name(110), "ETIMEDOUT");
    assert_eq!(errno_name(2), "ENOENT");
    assert_eq!(errno_name(99999), "99999");
}
