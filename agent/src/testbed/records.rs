//! Ring-buffer records as the kernel programs write them, for unit tests
//! and benchmarks of the userspace pipeline (no BPF needed).

use connscope_ebpf::{Event, Record, flags, kind};

/// A refused IPv4 connect (10.0.0.2:40000 -> 10.0.0.1:8080, RST, from the
/// syscall) by `pid` in cgroup `cgroup_id`, seen at kernel time `ts_ns`.
pub fn refused(cgroup_id: u64, ts_ns: u64, pid: u32) -> Event {
    Event {
        ts_ns,
        start_ns: ts_ns.saturating_sub(1000),
        cgroup_id,
        tgid: pid,
        tid: pid,
        uid: 0,
        gid: 0,
        netns: 4026532000,
        errno: 111,
        kind: kind::CONNECT_FAILURE,
        flags: flags::RST | flags::NETNS_KNOWN | flags::CONTEXT_KNOWN | flags::FROM_SYSCALL,
        family: libc::AF_INET as u16,
        sport: 40000,
        dport: 8080,
        saddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        comm: *b"app\0\0\0\0\0\0\0\0\0\0\0\0\0",
    }
}

/// The bytes of a record as the ring buffer hands them over.
pub fn bytes<T: Record>(r: &T) -> Vec<u8> {
    // SAFETY: a Record has no implicit padding, so every byte is initialised.
    unsafe { std::slice::from_raw_parts((r as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
}
