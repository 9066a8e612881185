//! What every hook family reads: the offsets the agent wrote into [`CONFIG`],
//! fields of a tracepoint record or a kernel object at those offsets, and the
//! context of the current task. Kept apart so the hook modules hold only
//! their own logic.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_ns},
    },
    programs::TracePointContext,
};
use connscope_ebpf::{COMM_LEN, Config, OFFSET_UNKNOWN, flags};

use super::maps::SockCtx;

pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;
pub(crate) const TCP_SYN_SENT: i32 = 2;

/// Offsets, written by the agent before load (a `.rodata` global).
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::UNKNOWN;

#[inline(always)]
pub(crate) fn config() -> Config {
    // SAFETY: CONFIG is a plain global; the volatile read keeps the compiler
    // from folding the compile-time default into the code.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

/// One field of [`CONFIG`], without copying the whole struct (hot paths
/// that usually return early read only what they test).
macro_rules! cfg_field {
    ($f:ident) => {
        // SAFETY: as in config(): a volatile read of a plain global.
        unsafe { core::ptr::read_volatile(&raw const $crate::programs::common::CONFIG.$f) }
    };
}
pub(crate) use cfg_field;

/// A field of the current tracepoint record (offset from tracefs).
#[inline(always)]
pub(crate) fn read<T>(ctx: &TracePointContext, off: u32) -> Option<T> {
    if off == OFFSET_UNKNOWN {
        return None;
    }
    // SAFETY: the offset comes from this kernel's tracefs format file for
    // this tracepoint; the helper faults safely on a bad address anyway.
    unsafe { ctx.read_at::<T>(off as usize) }.ok()
}

/// The `T` at byte `off` of the kernel object at `base` (offsets from BTF).
#[inline(always)]
pub(crate) fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    let src = (base as *const u8).wrapping_add(off as usize) as *const T;
    // SAFETY: bpf_probe_read_kernel checks the address itself: a bad one is
    // an error, not a fault.
    unsafe { bpf_probe_read_kernel(src) }.ok()
}

/// Copies the `__data_loc` string `loc` of the current tracepoint record
/// into `dst` (NUL-terminated, truncated to fit).
#[inline(always)]
pub(crate) fn read_data_loc_str(ctx: &TracePointContext, loc: u32, dst: &mut [u8]) {
    let src = (ctx.as_ptr() as *const u8).wrapping_add((loc & 0xffff) as usize);
    // SAFETY: the low 16 bits of a __data_loc are the string's offset inside
    // this record; the helper fails cleanly on a bad address anyway.
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, dst) };
}

#[inline(always)]
pub(crate) fn now() -> u64 {
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

/// Network namespace inode of the socket `sk` itself
/// (`sk->__sk_common.skc_net.net->ns.inum`, BTF offsets): not the calling
/// task's, which differs when a socket made in one netns is used from another.
#[inline(always)]
pub(crate) fn sock_netns(cfg: &Config, sk: u64) -> Option<u32> {
    if cfg.sock_net == OFFSET_UNKNOWN || cfg.net_inum == OFFSET_UNKNOWN {
        return None;
    }
    let net: u64 = read_kernel(sk, cfg.sock_net)?;
    if net == 0 {
        return None;
    }
    read_kernel(net, cfg.net_inum)
}

/// Everything about the current task an event carries.
#[inline(always)]
pub(crate) fn current_ctx(cfg: &Config, start_ns: u64) -> SockCtx {
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
