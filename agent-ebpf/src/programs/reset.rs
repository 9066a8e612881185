//! `tcp:tcp_receive_reset`: a RST in SYN_SENT (ECONNREFUSED) even where
//! `sk_err` cannot be read. It only flags the socket's `SYNSENT` entry; the
//! socket state hook reports the failure. A classic and a raw variant.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use connscope_ebpf::{OFFSET_UNKNOWN, flags};

use super::{
    common::{TCP_SYN_SENT, cfg_field, read, read_kernel},
    maps::SYNSENT,
};

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
