//! `syscalls:sys_enter_connect` / `sys_exit_connect`: the address the
//! application dialed, and the error a blocking `connect()` returned. The
//! two ends of the syscall meet in `PENDING`, which the socket state hook
//! also writes into while the syscall runs. [`on_enter`] and [`on_exit`]
//! are shared with the BTF-typed entry points in `connect_btf`.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use connscope_ebpf::{Event, flags, kind};

use super::{
    common::{AF_INET, AF_INET6, cfg_field, config, current_ctx, now, read},
    emit::{emit, emit_with_path},
    maps::{PENDING, Pending, SYNSENT, active_pending},
};

const AF_UNIX: u16 = 1;
const EINTR: i32 = 4;
const EISCONN: i32 = 106;
const EALREADY: i32 = 114;
const EINPROGRESS: i32 = 115;
/// Kernel-internal restart codes (ERESTARTSYS..): the connect goes on.
const ERESTART_MIN: i32 = 512;

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    if let Some(uaddr) = read::<u64>(&ctx, cfg_field!(enter_uservaddr)) {
        on_enter(uaddr);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    on_exit(read::<i64>(&ctx, cfg_field!(exit_ret)).unwrap_or(0));
    0
}

/// A thread enters `connect()` to dial the `struct sockaddr` at `uaddr`
/// (user memory, read only if the connect fails).
#[inline(always)]
pub(super) fn on_enter(uaddr: u64) {
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
}

/// The thread's `connect()` returns `ret` (0 or a negative errno).
#[inline(always)]
pub(super) fn on_exit(ret: i64) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(pp) = active_pending(tid) else {
        return;
    };
    // SAFETY: this thread's own slot: copied, then marked ended (kept for
    // the thread's next connect).
    let p = unsafe { *pp };
    // SAFETY: as above.
    unsafe { (*pp).active = 0 };
    if ret == 0 {
        return;
    }
    let cfg = config();
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
        return;
    }
    if err == EALREADY || err == EISCONN {
        return;
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
}
