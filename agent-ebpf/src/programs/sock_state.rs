//! `sock:inet_sock_set_state`: a socket entering SYN_SENT (in the connecting
//! task), leaving it (a failed connect, also a non-blocking one), and LISTEN
//! up/down. Two variants of one hook, the classic tracepoint and the raw
//! one, share everything after reading the change; [`SockSrc`] is where
//! each gets the socket's ports and addresses.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use connscope_ebpf::{Config, OFFSET_UNKNOWN, flags, kind};

use super::{
    common::{
        AF_INET6, TCP_SYN_SENT, cfg_field, config, current_ctx, now, read, read_kernel, sock_netns,
    },
    emit::emit,
    maps::{EMPTY_CTX, SYNSENT, SockCtx, active_pending},
};

const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: i32 = 1;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const ECONNREFUSED: i32 = 111;

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
        let mut c = current_ctx(cfg, ts);
        // A listener belongs to its socket's netns, whoever calls listen()
        // or close(): ztunnel listens in each ambient pod's netns from its
        // own, and a close at exit runs after the task's nsproxy is gone.
        if let Some(n) = sock_netns(cfg, sk) {
            c.netns = n;
            c.flags |= flags::NETNS_KNOWN;
        }
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
