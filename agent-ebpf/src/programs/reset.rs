//! Resets. `tcp:tcp_receive_reset`: a RST in SYN_SENT (ECONNREFUSED) even
//! where `sk_err` cannot be read. It only flags the socket's `SYNSENT`
//! entry; the socket state hook reports the failure. A classic and a raw
//! variant. `tcp:tcp_send_reset` with no socket, from the capture port: the
//! proof that a refused connect had been redirected to the capture port.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use connscope_ebpf::{Config, MAX_CAPTURE_PORTS, OFFSET_UNKNOWN, flags, kind};

use super::{
    common::{AF_INET, AF_INET6, TCP_SYN_SENT, cfg_field, config, now, read, read_kernel},
    emit::emit,
    maps::{EMPTY_CTX, SYNSENT, SockCtx},
};

/// Bytes of the reset's addresses in the record: a `struct sockaddr_in6`.
const SOCKADDR_BYTES: usize = 28;

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

/// A reset the stack sends. Only one kind is reported: no socket (the SYN
/// found none; `skaddr` is 0 from 6.10, where the kernel fires this
/// tracepoint without a socket at all) and sent from the capture port, i.e.
/// a connect NATed to the capture port while nothing listened there. Every
/// other reset returns after two record reads, before any map or ring work.
#[tracepoint(category = "tcp", name = "tcp_send_reset")]
fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    let ports: [u16; MAX_CAPTURE_PORTS] = cfg_field!(capture_ports);
    let saddr_off: u32 = cfg_field!(tsr_saddr);
    if ports[0] == 0 || saddr_off == OFFSET_UNKNOWN {
        return 0;
    }
    // The source sockaddr's port (network order) follows its 2-byte family.
    let Some(sport) = read::<[u8; 2]>(&ctx, saddr_off + 2) else {
        return 0;
    };
    let sport = u16::from_be_bytes(sport);
    // Unrolled: four compares, no loop for the verifier.
    if sport == 0
        || (ports[0] != sport && ports[1] != sport && ports[2] != sport && ports[3] != sport)
    {
        return 0;
    }
    if read::<u64>(&ctx, cfg_field!(tsr_skaddr)) != Some(0) {
        return 0;
    }
    let cfg = config();
    let (Some(s), Some(d)) = (
        read::<[u8; SOCKADDR_BYTES]>(&ctx, cfg.tsr_saddr),
        read::<[u8; SOCKADDR_BYTES]>(&ctx, cfg.tsr_daddr),
    ) else {
        return 0;
    };
    let skb = read::<u64>(&ctx, cfg.tsr_skbaddr).unwrap_or(0);
    let (netns, netns_flag) = match skb_netns(&cfg, skb) {
        Some(n) => (n, flags::NETNS_KNOWN),
        None => (0, 0),
    };
    let c = SockCtx {
        netns,
        flags: netns_flag,
        ..EMPTY_CTX
    };
    let family = u16::from_ne_bytes([s[0], s[1]]);
    let ts = now();
    emit(kind::CAPTURE_RESET, &c, ts, |ev| {
        ev.family = family;
        ev.sport = u16::from_be_bytes([s[2], s[3]]);
        ev.dport = u16::from_be_bytes([d[2], d[3]]);
        if family == AF_INET {
            ev.saddr[..4].copy_from_slice(&s[4..8]);
            ev.daddr[..4].copy_from_slice(&d[4..8]);
        } else if family == AF_INET6 {
            ev.saddr.copy_from_slice(&s[8..24]);
            ev.daddr.copy_from_slice(&d[8..24]);
        }
    });
    0
}

/// Network namespace inode of the device the refused SYN came in on
/// (skb->dev->nd_net.net->ns.inum, offsets from BTF): the pod's own, since
/// a captured connect is looped back inside the pod. The current task is
/// not used: in softirq it may be any task.
#[inline(always)]
fn skb_netns(cfg: &Config, skb: u64) -> Option<u32> {
    if skb == 0
        || cfg.skb_dev == OFFSET_UNKNOWN
        || cfg.dev_nd_net == OFFSET_UNKNOWN
        || cfg.net_inum == OFFSET_UNKNOWN
    {
        return None;
    }
    let dev: u64 = read_kernel(skb, cfg.skb_dev)?;
    if dev == 0 {
        return None;
    }
    let net: u64 = read_kernel(dev, cfg.dev_nd_net)?;
    if net == 0 {
        return None;
    }
    read_kernel(net, cfg.net_inum)
}
