//! The kernel/user ABI of connscope: every `#[repr(C)]` type that crosses the
//! ring buffer or is written into the kernel programs' globals lives here, so
//! that the kernel side and the agent cannot disagree about a layout.
#![no_std]

/// Length of a task's `comm`, as the kernel stores it (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;
/// Bytes kept of an AF_UNIX path or an exec'd filename (sun_path is 108 bytes).
pub const PATH_LEN: usize = 108;
/// Bytes of the dialed `struct sockaddr` copied at `connect()` entry
/// (sa_family + sun_path, the largest family we decode).
pub const SOCKADDR_LEN: usize = 112;
/// Outbound capture ports the kernel watches resets from at most (one per
/// mesh profile's port: Istio, Kuma and Consul share 15001, Linkerd 4140).
pub const MAX_CAPTURE_PORTS: usize = 4;
/// Value of an offset the agent could not determine on this kernel.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// What an [`Event`] reports; one byte so the event stays small.
pub mod kind {
    /// A `connect()` that did not establish a connection.
    pub const CONNECT_FAILURE: u8 = 1;
    /// A TCP socket entered LISTEN.
    pub const LISTEN: u8 = 2;
    /// A TCP socket left LISTEN (closed).
    pub const LISTEN_CLOSE: u8 = 3;
    /// A process called exec (container start times come from these).
    pub const EXEC: u8 = 4;
    /// A whole thread group exited.
    pub const EXIT: u8 = 5;
    /// A cgroup v2 directory was created ([`super::CgroupEvent`]).
    pub const CGROUP_MKDIR: u8 = 6;
    /// A cgroup v2 directory was removed ([`super::CgroupEvent`]).
    pub const CGROUP_RMDIR: u8 = 7;
    /// The pod's own stack refused a SYN that found no socket, from the
    /// capture port (`tcp:tcp_send_reset`, no socket): a connect that the
    /// mesh's rules redirected to the capture port was refused there. The
    /// record's source is the reset's source (the capture address and
    /// port), its destination the reset's destination (the connecting
    /// socket's local address and port). No task context: it runs in
    /// softirq; `netns` is the receiving device's namespace.
    pub const CAPTURE_RESET: u8 = 8;
}

/// Bytes kept of a cgroup path (kubelet paths run to ~200 bytes).
pub const CGROUP_PATH_LEN: usize = 256;

/// A cgroup v2 directory created or removed: the kernel names id and path at
/// creation, so even a container that lives for milliseconds is attributed.
/// Sent on the same ring buffer as [`Event`]; told apart by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupEvent {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub level: u32,
    /// [`kind::CGROUP_MKDIR`] or [`kind::CGROUP_RMDIR`].
    pub kind: u8,
    pub reserved: [u8; 3],
    /// Path relative to the cgroup2 root, NUL-terminated.
    pub path: [u8; CGROUP_PATH_LEN],
}

/// Bits of [`Event::flags`].
pub mod flags {
    /// The connect was non-blocking: the application learned of the failure
    /// later (poll/SO_ERROR), not from the `connect()` return value.
    pub const NONBLOCKING: u8 = 1;
    /// `errno` is what `connect()` itself returned.
    pub const FROM_SYSCALL: u8 = 2;
    /// A RST was received while the socket was in SYN_SENT.
    pub const RST: u8 = 4;
    /// `netns` holds the network namespace inode.
    pub const NETNS_KNOWN: u8 = 8;
    /// The task context (pid, comm, uid, cgroup) is that of the connecting
    /// task; without it the connect was not seen starting (e.g. the agent
    /// started mid-connect) and the context fields are zero.
    pub const CONTEXT_KNOWN: u8 = 16;
}

/// One kernel observation, written to the ring buffer.
///
/// Addresses are in network byte order as the kernel keeps them; ports are in
/// host byte order. For IPv4 only the first four bytes of an address are used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds at which the kernel saw it.
    pub ts_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds at which the connect started (0 if unknown).
    pub start_ns: u64,
    /// cgroup v2 id of the task (0 if unknown).
    pub cgroup_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Network namespace inode; valid when [`flags::NETNS_KNOWN`] is set.
    pub netns: u32,
    /// Positive errno of a failure, 0 if the kernel did not say.
    pub errno: i32,
    /// One of [`kind`].
    pub kind: u8,
    /// Bits of [`flags`].
    pub flags: u8,
    /// AF_INET, AF_INET6, AF_UNIX, ...
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}

/// An [`Event`] followed by a path: only AF_UNIX connect failures (the
/// socket path) and execs (the filename) carry one. Every other record is an
/// [`Event`] alone, half this size: half the ring memory, and half the
/// bytes written per refused connect. Told apart by size, like
/// [`CgroupEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathEvent {
    pub event: Event,
    /// AF_UNIX path for a connect failure, filename for an exec; NUL-padded.
    pub path: [u8; PATH_LEN],
    /// Explicit tail padding, so no byte of a record is left uninitialised.
    pub reserved: [u8; 4],
}

/// The ring-buffer record types: `repr(C)` integers and byte arrays with no
/// implicit padding, so every bit pattern is a valid value and every byte is
/// initialised. The reader copies them out of raw bytes, and tests turn them
/// into bytes, on that guarantee alone.
///
/// # Safety
/// Only for `repr(C)` plain-data types without implicit padding (the sizes
/// are checked below).
pub unsafe trait Record: Copy {}
// SAFETY: repr(C), integers and byte arrays, no implicit padding (asserted below).
unsafe impl Record for Event {}
// SAFETY: as above; the tail padding is an explicit field.
unsafe impl Record for PathEvent {}
// SAFETY: as above; the padding is an explicit field.
unsafe impl Record for CgroupEvent {}

// The reader tells records apart by their size alone, and every byte of
// each is written by the kernel side (no implicit padding).
const _: () = {
    assert!(size_of::<Event>() == 104);
    assert!(size_of::<PathEvent>() == size_of::<Event>() + PATH_LEN + 4);
    assert!(size_of::<CgroupEvent>() == 24 + CGROUP_PATH_LEN);
    assert!(size_of::<Event>() != size_of::<PathEvent>());
    assert!(size_of::<PathEvent>() != size_of::<CgroupEvent>());
};

/// Offsets the kernel programs need, found by the agent at start-up from
/// tracefs format files and `/sys/kernel/btf/vmlinux` instead of being
/// compiled in for one kernel (Rust eBPF has no CO-RE).
///
/// Every field is a byte offset, or [`OFFSET_UNKNOWN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `sock:inet_sock_set_state` fields.
    pub sss_skaddr: u32,
    pub sss_oldstate: u32,
    pub sss_newstate: u32,
    pub sss_sport: u32,
    pub sss_dport: u32,
    pub sss_family: u32,
    pub sss_protocol: u32,
    pub sss_saddr: u32,
    pub sss_daddr: u32,
    pub sss_saddr_v6: u32,
    pub sss_daddr_v6: u32,
    /// `tcp:tcp_receive_reset` skaddr.
    pub rst_skaddr: u32,
    /// `syscalls:sys_enter_connect` fields.
    pub enter_fd: u32,
    pub enter_uservaddr: u32,
    pub enter_addrlen: u32,
    /// `syscalls:sys_exit_connect` ret.
    pub exit_ret: u32,
    /// `sched:sched_process_exec` __data_loc filename.
    pub exec_filename: u32,
    /// `sched:sched_process_exit` group_dead (absent before 6.x kernels).
    pub exit_group_dead: u32,
    /// `cgroup:cgroup_mkdir` / `cgroup_rmdir` fields.
    pub mkdir_root: u32,
    pub mkdir_level: u32,
    pub mkdir_id: u32,
    pub mkdir_path: u32,
    pub rmdir_root: u32,
    pub rmdir_level: u32,
    pub rmdir_id: u32,
    pub rmdir_path: u32,
    /// `struct sock`.sk_err (BTF).
    pub sock_sk_err: u32,
    /// Bytes waiting in the ring buffer before the reader is woken (0: wake
    /// on every event). Not an offset.
    pub wakeup_bytes: u32,
    /// `struct task_struct`.nsproxy, `struct nsproxy`.net_ns and
    /// `struct net`.ns.inum (BTF), to read the network namespace.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    pub net_inum: u32,
    /// `struct sock`.__sk_common.skc_net.net (BTF): the socket's own network
    /// namespace, which LISTEN and LISTEN_CLOSE records carry. A socket may
    /// be created in one netns and bound and listened on from another (Istio
    /// ambient's ztunnel does exactly that for each pod): the calling task's
    /// netns would then name ztunnel's, not the pod's.
    pub sock_net: u32,
    /// `struct sock` members (BTF) read by the raw-tracepoint variant of the
    /// socket state hook, which gets the socket pointer instead of a record:
    /// sk_protocol and, in `__sk_common`, skc_family, skc_dport, skc_rcv_saddr,
    /// skc_daddr, skc_v6_rcv_saddr, skc_v6_daddr; and `struct inet_sock`'s
    /// inet_sport (skc_num is already 0 when a failed socket reaches CLOSE).
    /// Ports are in network order.
    pub sk_protocol: u32,
    pub skc_family: u32,
    pub inet_sport: u32,
    pub skc_dport: u32,
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    /// `struct sock`.__sk_common.skc_state (BTF): lets the raw-tracepoint
    /// variant of `tcp:tcp_receive_reset` return at once for resets of
    /// sockets not in SYN_SENT (nearly all of them).
    pub skc_state: u32,
    /// `tcp:tcp_send_reset` fields: skbaddr, skaddr, and the reset's source
    /// and destination as a `struct sockaddr_in`/`sockaddr_in6` (28 bytes).
    pub tsr_skbaddr: u32,
    pub tsr_skaddr: u32,
    pub tsr_saddr: u32,
    pub tsr_daddr: u32,
    /// `struct sk_buff`.dev and `struct net_device`.nd_net.net (BTF): the
    /// network namespace of the device a reset's SYN arrived on (the reset
    /// runs in softirq, where the current task is anybody).
    pub skb_dev: u32,
    pub dev_nd_net: u32,
    /// The meshes' outbound capture ports (host order; 0: unused): a reset
    /// sent with no socket from one of them is a captured connect refused.
    /// Not offsets.
    pub capture_ports: [u16; MAX_CAPTURE_PORTS],
    /// Non-zero: every program returns at once. Only for `cargo xtask bench`,
    /// to measure what attaching the hooks costs by itself. Not an offset;
    /// the verifier folds this read-only value, so it costs nothing otherwise.
    pub noop: u32,
    /// Non-zero: the programs do all their work but write nothing to the
    /// ring (nothing is counted lost either). Only for `cargo xtask bench`:
    /// what the ring output costs per refused connect, the most that
    /// aggregating refusals in the kernel could save. Not an offset.
    pub no_output: u32,
}

impl Config {
    /// A configuration in which nothing is known; the programs then do
    /// nothing that needs an offset.
    pub const UNKNOWN: Config = Config {
        sss_skaddr: OFFSET_UNKNOWN,
        sss_oldstate: OFFSET_UNKNOWN,
        sss_newstate: OFFSET_UNKNOWN,
        sss_sport: OFFSET_UNKNOWN,
        sss_dport: OFFSET_UNKNOWN,
        sss_family: OFFSET_UNKNOWN,
        sss_protocol: OFFSET_UNKNOWN,
        sss_saddr: OFFSET_UNKNOWN,
        sss_daddr: OFFSET_UNKNOWN,
        sss_saddr_v6: OFFSET_UNKNOWN,
        sss_daddr_v6: OFFSET_UNKNOWN,
        rst_skaddr: OFFSET_UNKNOWN,
        enter_fd: OFFSET_UNKNOWN,
        enter_uservaddr: OFFSET_UNKNOWN,
        enter_addrlen: OFFSET_UNKNOWN,
        exit_ret: OFFSET_UNKNOWN,
        exec_filename: OFFSET_UNKNOWN,
        exit_group_dead: OFFSET_UNKNOWN,
        mkdir_root: OFFSET_UNKNOWN,
        mkdir_level: OFFSET_UNKNOWN,
        mkdir_id: OFFSET_UNKNOWN,
        mkdir_path: OFFSET_UNKNOWN,
        rmdir_root: OFFSET_UNKNOWN,
        rmdir_level: OFFSET_UNKNOWN,
        rmdir_id: OFFSET_UNKNOWN,
        rmdir_path: OFFSET_UNKNOWN,
        sock_sk_err: OFFSET_UNKNOWN,
        wakeup_bytes: 0,
        task_nsproxy: OFFSET_UNKNOWN,
        nsproxy_net_ns: OFFSET_UNKNOWN,
        net_inum: OFFSET_UNKNOWN,
        sock_net: OFFSET_UNKNOWN,
        sk_protocol: OFFSET_UNKNOWN,
        skc_family: OFFSET_UNKNOWN,
        inet_sport: OFFSET_UNKNOWN,
        skc_dport: OFFSET_UNKNOWN,
        skc_rcv_saddr: OFFSET_UNKNOWN,
        skc_daddr: OFFSET_UNKNOWN,
        skc_v6_rcv_saddr: OFFSET_UNKNOWN,
        skc_v6_daddr: OFFSET_UNKNOWN,
        skc_state: OFFSET_UNKNOWN,
        tsr_skbaddr: OFFSET_UNKNOWN,
        tsr_skaddr: OFFSET_UNKNOWN,
        tsr_saddr: OFFSET_UNKNOWN,
        tsr_daddr: OFFSET_UNKNOWN,
        skb_dev: OFFSET_UNKNOWN,
        dev_nd_net: OFFSET_UNKNOWN,
        capture_ports: [0; MAX_CAPTURE_PORTS],
        noop: 0,
        no_output: 0,
    };

    /// Whether the raw-tracepoint socket hook has every offset it needs
    /// (the IPv6 ones may be missing on kernels built without IPv6).
    pub fn raw_sock_state_usable(&self) -> bool {
        [
            self.sk_protocol,
            self.skc_family,
            self.inet_sport,
            self.skc_dport,
            self.skc_rcv_saddr,
            self.skc_daddr,
        ]
        .iter()
        .all(|o| *o != OFFSET_UNKNOWN)
    }

    /// Whether the raw-tracepoint reset hook can tell a socket's state.
    pub fn raw_reset_usable(&self) -> bool {
        self.skc_state != OFFSET_UNKNOWN
    }
}

/// Names of the maps and globals, shared so a rename breaks the build, not a load.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const CONFIG: &str = "CONFIG";
}

// SAFETY: both types are #[repr(C)], Copy, made only of integers and byte
// arrays, and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Event {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CgroupEvent {}
