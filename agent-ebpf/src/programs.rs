//! The BPF-target half of the crate; see the crate docs in `main.rs`.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_buf,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use connscope_ebpf::{
    CGROUP_PATH_LEN, COMM_LEN, CgroupEvent, Config, Event, OFFSET_UNKNOWN, PATH_LEN, PathEvent,
    flags, kind,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
/// Per-CPU LRU lists: no global lock on the connect path.
const BPF_F_NO_COMMON_LRU: u32 = 2;
const EINTR: i32 = 4;
const EISCONN: i32 = 106;
const EALREADY: i32 = 114;
const EINPROGRESS: i32 = 115;
const ECONNREFUSED: i32 = 111;
/// Kernel-internal restart codes (ERESTARTSYS..): the connect goes on.
const ERESTART_MIN: i32 = 512;

/// Offsets, written by the agent before load (a `.rodata` global).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::UNKNOWN;

/// Events to userspace. The agent resizes it (`--ring-buffer-bytes`).
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Events the ring buffer had no room for, per CPU; index 0.
#[map(name = "LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A thread's last `connect()`, keyed by thread id: what was dialed, and what
/// the socket did while the syscall ran. `active` while the syscall runs.
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    start_ns: u64,
    /// The socket that entered SYN_SENT during this syscall (0: none yet).
    sk: u64,
    saddr: [u8; 16],
    sport: u16,
    /// Set when the socket failed while the syscall was still running.
    failed: u8,
    sk_flags: u8,
    failed_errno: i32,
    /// The dialed `struct sockaddr` in user memory: read at syscall exit,
    /// and only if the connect failed (most succeed).
    uaddr: u64,
    /// 1 from `sys_enter_connect` to `sys_exit_connect`.
    active: u8,
    _pad: [u8; 7],
}

/// Context of a socket in SYN_SENT, captured in the connecting task.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockCtx {
    start_ns: u64,
    cgroup_id: u64,
    tgid: u32,
    tid: u32,
    uid: u32,
    gid: u32,
    netns: u32,
    /// 1 while the connecting thread is still inside `connect()`.
    in_syscall: u8,
    /// Bits of `flags` collected so far (RST, NETNS_KNOWN, NONBLOCKING).
    flags: u8,
    _pad: [u8; 2],
    comm: [u8; COMM_LEN],
}

/// Bounded: one entry per live thread that connects. An entry stays after
/// its connect (inactive) and the thread's next connect rewrites it in place:
/// an LRU insert and delete per connect were the largest map cost on the
/// connect path. It is removed when the thread exits.
#[map(name = "PENDING")]
static PENDING: LruHashMap<u32, Pending> = LruHashMap::with_max_entries(16384, BPF_F_NO_COMMON_LRU);

/// Bounded: sockets in SYN_SENT; removed on every state change out of it.
#[map(name = "SYNSENT")]
static SYNSENT: LruHashMap<u64, SockCtx> = LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

#[inline(always)]
fn config() -> Config {
    // SAFETY: CONFIG is a plain global; the volatile read keeps the compiler
    // from folding the compile-time default into the code.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

/// One field of [`CONFIG`], without copying the whole struct (hot paths
/// that usually return early read only what they test).
macro_rules! cfg_field {
    ($f:ident) => {
        // SAFETY: as in config(): a volatile read of a plain global.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$f) }
    };
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: u32) -> Option<T> {
    if off == OFFSET_UNKNOWN {
        return None;
    }
    // SAFETY: the offset comes from this kernel's tracefs format file for
    // this tracepoint; the helper faults safely on a bad address anyway.
    unsafe { ctx.read_at::<T>(off as usize) }.ok()
}

/// The `T` at byte `off` of the kernel object at `base` (offsets from BTF).
#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    let src = (base as *const u8).wrapping_add(off as usize) as *const T;
    // SAFETY: bpf_probe_read_kernel checks the address itself: a bad one is
    // an error, not a fault.
    unsafe { bpf_probe_read_kernel(src) }.ok()
}

/// Copies the `__data_loc` string `loc` of the current tracepoint record
/// into `dst` (NUL-terminated, truncated to fit).
#[inline(always)]
fn read_data_loc_str(ctx: &TracePointContext, loc: u32, dst: &mut [u8]) {
    let src = (ctx.as_ptr() as *const u8).wrapping_add((loc & 0xffff) as usize);
    // SAFETY: the low 16 bits of a __data_loc are the string's offset inside
    // this record; the helper fails cleanly on a bad address anyway.
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, dst) };
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn cgroup_id() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Network namespace inode of the current task, via BTF-derived offsets.
#[inline(always)]
fn current_netns(cfg: &Config) -> Option<u32> {
    if cfg.task_nsproxy == OFFSET_UNKNOWN
        || cfg.nsproxy_net_ns == OFFSET_UNKNOWN
        || cfg.net_inum == OFFSET_UNKNOWN
    {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = read_kernel(task, cfg.task_nsproxy)?;
    if nsproxy == 0 {
        return None;
    }
    let net: u64 = read_kernel(nsproxy, cfg.nsproxy_net_ns)?;
    if net == 0 {
        return None;
    }
    read_kernel(net, cfg.net_inum)
}

/// Everything about the current task an event carries.
#[inline(always)]
fn current_ctx(cfg: &Config, start_ns: u64) -> SockCtx {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let (netns, netns_flag) = match current_netns(cfg) {
        Some(n) => (n, flags::NETNS_KNOWN),
        None => (0, 0),
    };
    SockCtx {
        start_ns,
        cgroup_id: cgroup_id(),
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        netns,
        in_syscall: 0,
        flags: netns_flag | flags::CONTEXT_KNOWN,
        _pad: [0; 2],
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    }
}

/// Writes an event straight into ring-buffer memory (not built on the BPF
/// stack and copied), or counts it as lost: nothing disappears uncounted.
/// `fill` sets what the context does not.
#[inline(always)]
fn emit(k: u8, c: &SockCtx, ts_ns: u64, fill: impl FnOnce(&mut Event)) {
    reserve_and_submit::<Event>(|e| fill(e.write(event(k, c, ts_ns))));
}

/// [`emit`] for the two records that carry a path (AF_UNIX connect
/// failures, execs): only they pay for its bytes.
#[inline(always)]
fn emit_with_path(
    k: u8,
    c: &SockCtx,
    ts_ns: u64,
    fill: impl FnOnce(&mut Event, &mut [u8; PATH_LEN]),
) {
    reserve_and_submit::<PathEvent>(|e| {
        let e = e.write(PathEvent {
            event: event(k, c, ts_ns),
            path: [0; PATH_LEN],
            reserved: [0; 4],
        });
        fill(&mut e.event, &mut e.path);
    });
}

/// Reserves one `R` in the ring, has `write` fill it and submits it; a full
/// ring counts the record as lost.
#[inline(always)]
fn reserve_and_submit<R: 'static>(write: impl FnOnce(&mut MaybeUninit<R>)) {
    let wake = wakeup_flags(size_of::<R>() as u64);
    let Some(mut entry) = EVENTS.reserve::<R>(0) else {
        count_lost();
        return;
    };
    write(&mut entry);
    entry.submit(wake);
}

/// Every field of an event from the task context; the rest zero, so no
/// stale ring bytes reach userspace.
#[inline(always)]
fn event(k: u8, c: &SockCtx, ts_ns: u64) -> Event {
    Event {
        ts_ns,
        start_ns: c.start_ns,
        cgroup_id: c.cgroup_id,
        tgid: c.tgid,
        tid: c.tid,
        uid: c.uid,
        gid: c.gid,
        netns: c.netns,
        errno: 0,
        kind: k,
        flags: c.flags,
        family: 0,
        sport: 0,
        dport: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        comm: c.comm,
    }
}

#[inline(always)]
fn count_lost() {
    if let Some(p) = LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU; programs do not nest on one
        // CPU for these tracepoints, so the increment is not torn.
        unsafe { *p += 1 };
    }
}

/// Wake the reader only when this record takes the waiting data across the
/// threshold (it also drains on a short timer): one wakeup per batch. Not
/// on every record above it: a forced wakeup is an interrupt (a VM exit on
/// virtual machines), and while the reader catches up every event would pay it.
#[inline(always)]
fn wakeup_flags(record_bytes: u64) -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    let threshold: u32 = cfg_field!(wakeup_bytes);
    if threshold == 0 {
        return 0;
    }
    let threshold = threshold as u64;
    let before = EVENTS.query(BPF_RB_AVAIL_DATA);
    // Each record also carries an 8-byte header.
    if before < threshold && before + record_bytes + 8 >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Where the details of a socket state change come from: the classic
/// tracepoint's record, or the socket itself (raw tracepoint, BTF offsets).
trait SockSrc {
    fn family(&self) -> u16;
    /// Local port, host order.
    fn sport(&self) -> u16;
    /// Remote port, host order.
    fn dport(&self) -> u16;
    /// (source, destination) addresses, network order; IPv4 in the first four bytes.
    fn addrs(&self, family: u16) -> ([u8; 16], [u8; 16]);
}

/// The `sock:inet_sock_set_state` record (offsets from tracefs).
struct Record<'a> {
    ctx: &'a TracePointContext,
    cfg: &'a Config,
}

impl SockSrc for Record<'_> {
    #[inline(always)]
    fn family(&self) -> u16 {
        read(self.ctx, self.cfg.sss_family).unwrap_or(0)
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        read(self.ctx, self.cfg.sss_sport).unwrap_or(0)
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        read(self.ctx, self.cfg.sss_dport).unwrap_or(0)
    }
    #[inline(always)]
    fn addrs(&self, family: u16) -> ([u8; 16], [u8; 16]) {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        if family == AF_INET6 {
            s = read(self.ctx, self.cfg.sss_saddr_v6).unwrap_or(s);
            d = read(self.ctx, self.cfg.sss_daddr_v6).unwrap_or(d);
        } else {
            let s4: [u8; 4] = read(self.ctx, self.cfg.sss_saddr).unwrap_or([0; 4]);
            let d4: [u8; 4] = read(self.ctx, self.cfg.sss_daddr).unwrap_or([0; 4]);
            s[..4].copy_from_slice(&s4);
            d[..4].copy_from_slice(&d4);
        }
        (s, d)
    }
}

/// A `struct sock` in kernel memory (offsets from BTF).
struct Sock<'a> {
    sk: u64,
    cfg: &'a Config,
}

impl Sock<'_> {
    #[inline(always)]
    fn get<T>(&self, off: u32) -> Option<T> {
        if off == OFFSET_UNKNOWN {
            return None;
        }
        read_kernel(self.sk, off)
    }
}

impl SockSrc for Sock<'_> {
    #[inline(always)]
    fn family(&self) -> u16 {
        self.get(self.cfg.skc_family).unwrap_or(0)
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        u16::from_be(self.get(self.cfg.inet_sport).unwrap_or(0))
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        u16::from_be(self.get(self.cfg.skc_dport).unwrap_or(0))
    }
    #[inline(always)]
    fn addrs(&self, family: u16) -> ([u8; 16], [u8; 16]) {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        if family == AF_INET6 {
            s = self.get(self.cfg.skc_v6_rcv_saddr).unwrap_or(s);
            d = self.get(self.cfg.skc_v6_daddr).unwrap_or(d);
        } else {
            let s4: [u8; 4] = self.get(self.cfg.skc_rcv_saddr).unwrap_or([0; 4]);
            let d4: [u8; 4] = self.get(self.cfg.skc_daddr).unwrap_or([0; 4]);
            s[..4].copy_from_slice(&s4);
            d[..4].copy_from_slice(&d4);
        }
        (s, d)
    }
}

/// The transitions connscope acts on; every other change (most of them:
/// ESTABLISHED -> FIN_WAIT1 and so on) returns before anything is read.
#[inline(always)]
fn interesting(old: i32, new: i32) -> bool {
    new == TCP_SYN_SENT
        || old == TCP_SYN_SENT
        || new == TCP_LISTEN
        || (old == TCP_LISTEN && new == TCP_CLOSE)
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let Some(uaddr) = read::<u64>(&ctx, cfg_field!(enter_uservaddr)) else {
        return 0;
    };
    let p = Pending {
        start_ns: now(),
        sk: 0,
        saddr: [0; 16],
        sport: 0,
        failed: 0,
        sk_flags: 0,
        failed_errno: 0,
        uaddr,
        active: 1,
        _pad: [0; 7],
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    match PENDING.get_ptr_mut(tid) {
        // SAFETY: this thread's own slot: only the thread itself starts and
        // ends its connects, so its last record is rewritten in place.
        Some(slot) => unsafe { *slot = p },
        None => {
            let _ = PENDING.insert(tid, p, 0);
        }
    }
    0
}

/// This thread's connect, if it is inside `connect()` now.
#[inline(always)]
fn active_pending(tid: u32) -> Option<*mut Pending> {
    let p = PENDING.get_ptr_mut(tid)?;
    // SAFETY: pointer into a live map slot, read once.
    (unsafe { (*p).active } == 1).then_some(p)
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let (Some(old), Some(new)) = (
        read::<i32>(&ctx, cfg_field!(sss_oldstate)),
        read::<i32>(&ctx, cfg_field!(sss_newstate)),
    ) else {
        return 0;
    };
    if !interesting(old, new) {
        return 0;
    }
    let cfg = config();
    if read::<u16>(&ctx, cfg.sss_protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    let Some(sk) = read::<u64>(&ctx, cfg.sss_skaddr) else {
        return 0;
    };
    sock_state(
        &cfg,
        sk,
        old,
        new,
        &Record {
            ctx: &ctx,
            cfg: &cfg,
        },
    );
    0
}

/// The same hook as a raw tracepoint: the kernel passes (sk, oldstate,
/// newstate) without building a record, which makes the many uninteresting
/// state changes of every connection nearly free. Used when BTF gives the
/// `struct sock` offsets; the agent falls back to the classic one otherwise.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
fn sock_state_raw(ctx: RawTracePointContext) -> i32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let old = ctx.arg::<u64>(1) as i32;
    let new = ctx.arg::<u64>(2) as i32;
    if !interesting(old, new) {
        return 0;
    }
    let sk = ctx.arg::<u64>(0);
    let cfg = config();
    let sock = Sock { sk, cfg: &cfg };
    if sock.get::<u16>(cfg.sk_protocol) != Some(IPPROTO_TCP) {
        return 0;
    }
    sock_state(&cfg, sk, old, new, &sock);
    0
}

/// What both variants of the socket state hook do with an interesting change.
#[inline(always)]
fn sock_state(cfg: &Config, sk: u64, old: i32, new: i32, src: &impl SockSrc) {
    if new == TCP_SYN_SENT {
        syn_sent(cfg, sk);
    } else if old == TCP_SYN_SENT {
        left_syn_sent(cfg, sk, new, src);
    } else {
        let k = if new == TCP_LISTEN {
            kind::LISTEN
        } else {
            kind::LISTEN_CLOSE
        };
        let ts = now();
        let c = current_ctx(cfg, ts);
        let family = src.family();
        let sport = src.sport();
        let saddr = src.addrs(family).0;
        emit(k, &c, ts, |ev| {
            ev.family = family;
            ev.sport = sport;
            ev.saddr = saddr;
        });
    }
}

/// CLOSE -> SYN_SENT runs in the connecting task: remember who it is.
#[inline(always)]
fn syn_sent(cfg: &Config, sk: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let c = match active_pending(tid) {
        // Inside connect(): the task context is taken at syscall exit, and
        // only if it is needed (a failure, or a connect going on without
        // the syscall), not for every connect here.
        Some(p) => {
            // SAFETY: pointer into this thread's own map slot.
            unsafe { (*p).sk = sk };
            // SAFETY: as above.
            let start_ns = unsafe { (*p).start_ns };
            SockCtx {
                start_ns,
                tgid: (pid_tgid >> 32) as u32,
                tid,
                in_syscall: 1,
                ..EMPTY_CTX
            }
        }
        None => current_ctx(cfg, now()),
    };
    let _ = SYNSENT.insert(sk, c, 0);
}

/// A socket context with nothing known (flags without CONTEXT_KNOWN).
const EMPTY_CTX: SockCtx = SockCtx {
    start_ns: 0,
    cgroup_id: 0,
    tgid: 0,
    tid: 0,
    uid: 0,
    gid: 0,
    netns: 0,
    in_syscall: 0,
    flags: 0,
    _pad: [0; 2],
    comm: [0; COMM_LEN],
};

/// SYN_SENT -> anything: ESTABLISHED is success; CLOSE is a failed connect.
#[inline(always)]
fn left_syn_sent(cfg: &Config, sk: u64, new: i32, src: &impl SockSrc) {
    let saved = SYNSENT.get_ptr(sk).map(|p| {
        // SAFETY: copied out before the entry is removed.
        unsafe { *p }
    });
    let _ = SYNSENT.remove(sk);
    if new == TCP_ESTABLISHED || new != TCP_CLOSE {
        return;
    }
    let ts = now();
    let mut errno = 0i32;
    if cfg.sock_sk_err != OFFSET_UNKNOWN {
        // sk_err of struct sock, offset from this kernel's BTF.
        errno = read_kernel(sk, cfg.sock_sk_err).unwrap_or(0);
    }
    let rst = saved.map(|c| c.flags & flags::RST != 0).unwrap_or(false);
    if errno == 0 && rst {
        errno = ECONNREFUSED;
    }
    if let Some(c) = saved
        && c.in_syscall == 1
        && let Some(p) = active_pending(c.tid)
    {
        // The connecting thread reports the failure when its syscall
        // returns: hand it over in the thread's slot.
        // SAFETY: pointer into the connecting thread's live map slot.
        if unsafe { (*p).sk } == sk {
            // The source port is assigned after SYN_SENT is entered: take
            // it (and the address) from here.
            // SAFETY: as above.
            unsafe { (*p).sport = src.sport() };
            // SAFETY: as above.
            unsafe { (*p).saddr = src.addrs(src.family()).0 };
            // SAFETY: as above.
            unsafe { (*p).failed = 1 };
            // SAFETY: as above.
            unsafe { (*p).failed_errno = errno };
            // SAFETY: as above.
            unsafe { (*p).sk_flags = c.flags };
            return;
        }
    }
    // Not inside connect() any more (non-blocking, interrupted, or a connect
    // we did not see start): report from here.
    let family = src.family();
    let (saddr, daddr) = src.addrs(family);
    let c = saved.unwrap_or(EMPTY_CTX);
    let (sport, dport) = (src.sport(), src.dport());
    emit(kind::CONNECT_FAILURE, &c, ts, |ev| {
        ev.errno = errno;
        ev.family = family;
        ev.sport = sport;
        ev.dport = dport;
        ev.saddr = saddr;
        ev.daddr = daddr;
    });
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let Some(sk) = read::<u64>(&ctx, cfg_field!(rst_skaddr)) else {
        return 0;
    };
    reset(sk);
    0
}

/// The same hook as a raw tracepoint (argument: the socket): the kernel
/// builds no record (two addresses and ports) for every reset, and resets of
/// sockets not in SYN_SENT, nearly all of them, return after one read.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
fn reset_raw(ctx: RawTracePointContext) -> i32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let sk = ctx.arg::<u64>(0);
    let off: u32 = cfg_field!(skc_state);
    if off == OFFSET_UNKNOWN {
        return 0;
    }
    // skc_state of struct sock, offset from this kernel's BTF.
    if read_kernel::<u8>(sk, off) != Some(TCP_SYN_SENT as u8) {
        return 0;
    }
    reset(sk);
    0
}

/// A RST reached a socket: flag it if it is a connect in SYN_SENT.
#[inline(always)]
fn reset(sk: u64) {
    if let Some(c) = SYNSENT.get_ptr_mut(sk) {
        // SAFETY: pointer into the map slot of a socket in SYN_SENT.
        unsafe { (*c).flags |= flags::RST };
    }
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let cfg = config();
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(pp) = active_pending(tid) else {
        return 0;
    };
    // SAFETY: this thread's own slot: copied, then marked ended (kept for
    // the thread's next connect).
    let p = unsafe { *pp };
    // SAFETY: as above.
    unsafe { (*pp).active = 0 };
    let ret = read::<i64>(&ctx, cfg.exit_ret).unwrap_or(0);
    if ret == 0 {
        return 0;
    }
    let err = (-ret) as i32;
    let goes_on = err == EINPROGRESS || err == EINTR || err >= ERESTART_MIN;
    if goes_on && p.failed == 0 {
        // The connect continues without the syscall: a later failure is
        // reported from inet_sock_set_state as non-blocking.
        if p.sk != 0
            && let Some(c) = SYNSENT.get_ptr_mut(p.sk)
        {
            // A later failure is reported from the socket, away from this
            // task: take its context now.
            let mut full = current_ctx(&cfg, p.start_ns);
            // SAFETY: pointer into the socket's map slot.
            let rst = unsafe { (*c).flags } & flags::RST;
            full.flags |= flags::NONBLOCKING | rst;
            // SAFETY: as above.
            unsafe { *c = full };
        }
        return 0;
    }
    if err == EALREADY || err == EISCONN {
        return 0;
    }
    let ts = now();
    let c = current_ctx(&cfg, p.start_ns);
    let (errno, extra) = if goes_on {
        // Failed while the syscall ran, yet the application was told
        // EINPROGRESS: it learns of it later, as with any non-blocking connect.
        (
            p.failed_errno,
            flags::NONBLOCKING | (p.sk_flags & flags::RST),
        )
    } else {
        (err, flags::FROM_SYSCALL | (p.sk_flags & flags::RST))
    };
    let mut addr = [0u8; 28];
    let src = p.uaddr as *const u8;
    // SAFETY: reads the caller's sockaddr through the helper, which fails
    // cleanly; 28 bytes is what an inet address needs (sockaddr_in6).
    let _ = unsafe { bpf_probe_read_user_buf(src, &mut addr) };
    let family = u16::from_ne_bytes([addr[0], addr[1]]);
    let common = |ev: &mut Event| {
        ev.errno = errno;
        ev.flags |= extra;
        ev.family = family;
        ev.sport = p.sport;
        ev.saddr = p.saddr;
    };
    if family == AF_UNIX {
        emit_with_path(kind::CONNECT_FAILURE, &c, ts, |ev, path| {
            common(ev);
            let sun_path = src.wrapping_add(2);
            // SAFETY: sun_path follows the 2-byte family in user memory;
            // read straight into the record through the helper.
            let _ = unsafe { bpf_probe_read_user_buf(sun_path, path) };
        });
    } else {
        emit(kind::CONNECT_FAILURE, &c, ts, |ev| {
            common(ev);
            if family == AF_INET {
                ev.dport = u16::from_be_bytes([addr[2], addr[3]]);
                ev.daddr[..4].copy_from_slice(&addr[4..8]);
            } else if family == AF_INET6 {
                ev.dport = u16::from_be_bytes([addr[2], addr[3]]);
                ev.daddr.copy_from_slice(&addr[8..24]);
            }
        });
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let cfg = config();
    let ts = now();
    let c = current_ctx(&cfg, ts);
    let loc = read::<u32>(&ctx, cfg.exec_filename);
    emit_with_path(kind::EXEC, &c, ts, |_, path| {
        if let Some(loc) = loc {
            read_data_loc_str(&ctx, loc, path);
        }
    });
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
fn sched_process_exit(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    // The exiting thread's connect record goes with it (the LRU bound also
    // holds where this hook is missing).
    let _ = PENDING.remove(pid_tgid as u32);
    let whole_group = match read::<u8>(&ctx, cfg.exit_group_dead) {
        Some(g) => g != 0,
        None => (pid_tgid >> 32) as u32 == pid_tgid as u32,
    };
    if !whole_group {
        return 0;
    }
    let ts = now();
    let c = current_ctx(&cfg, ts);
    emit(kind::EXIT, &c, ts, |_| {});
    0
}

/// Per-CPU scratch for cgroup events (too large for the BPF stack).
#[map(name = "CGSCRATCH")]
static CGSCRATCH: PerCpuArray<CgroupEvent> = PerCpuArray::with_max_entries(1, 0);

/// cgroup v2 (hierarchy 0) mkdir/rmdir: id and path, straight from the kernel.
#[inline(always)]
fn cgroup_event(ctx: &TracePointContext, k: u8, root: u32, level: u32, id: u32, path: u32) {
    if read::<i32>(ctx, root) != Some(0) {
        return;
    }
    let (Some(cg), Some(loc)) = (read::<u64>(ctx, id), read::<u32>(ctx, path)) else {
        return;
    };
    let Some(p) = CGSCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, a live map value; nothing else
    // refers to it while this program runs on this CPU.
    let ev = unsafe { &mut *p };
    ev.ts_ns = now();
    ev.cgroup_id = cg;
    ev.level = read::<u32>(ctx, level).unwrap_or(0);
    ev.kind = k;
    ev.reserved = [0; 3];
    ev.path[0] = 0;
    read_data_loc_str(ctx, loc, &mut ev.path[..CGROUP_PATH_LEN]);
    if EVENTS
        .output::<CgroupEvent>(&*ev, wakeup_flags(size_of::<CgroupEvent>() as u64))
        .is_err()
    {
        count_lost();
    }
}

#[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let c = config();
    cgroup_event(
        &ctx,
        kind::CGROUP_MKDIR,
        c.mkdir_root,
        c.mkdir_level,
        c.mkdir_id,
        c.mkdir_path,
    );
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_rmdir")]
fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let c = config();
    cgroup_event(
        &ctx,
        kind::CGROUP_RMDIR,
        c.rmdir_root,
        c.rmdir_level,
        c.rmdir_id,
        c.rmdir_path,
    );
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program in which a panic is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
