//! The maps more than one hook family uses, with the records kept in them:
//! they are how the hooks of one connect hand over what each has seen.
//! (The ring buffer and its loss counter are in `emit`; a map only one
//! family uses stays with that family.)

use aya_ebpf::{macros::map, maps::LruHashMap};
use connscope_ebpf::COMM_LEN;

/// Per-CPU LRU lists: no global lock on the connect path.
const BPF_F_NO_COMMON_LRU: u32 = 2;

/// A thread's last `connect()`, keyed by thread id: what was dialed, and what
/// the socket did while the syscall ran. `active` while the syscall runs.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Pending {
    pub(crate) start_ns: u64,
    /// The socket that entered SYN_SENT during this syscall (0: none yet).
    pub(crate) sk: u64,
    pub(crate) saddr: [u8; 16],
    pub(crate) sport: u16,
    /// Set when the socket failed while the syscall was still running.
    pub(crate) failed: u8,
    pub(crate) sk_flags: u8,
    pub(crate) failed_errno: i32,
    /// The dialed `struct sockaddr` in user memory: read at syscall exit,
    /// and only if the connect failed (most succeed).
    pub(crate) uaddr: u64,
    /// 1 from `sys_enter_connect` to `sys_exit_connect`.
    pub(crate) active: u8,
    pub(crate) _pad: [u8; 7],
}

/// Context of a socket in SYN_SENT, captured in the connecting task.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SockCtx {
    pub(crate) start_ns: u64,
    pub(crate) cgroup_id: u64,
    pub(crate) tgid: u32,
    pub(crate) tid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) netns: u32,
    /// 1 while the connecting thread is still inside `connect()`.
    pub(crate) in_syscall: u8,
    /// Bits of `flags` collected so far (RST, NETNS_KNOWN, NONBLOCKING).
    pub(crate) flags: u8,
    pub(crate) _pad: [u8; 2],
    pub(crate) comm: [u8; COMM_LEN],
}

/// A socket context with nothing known (flags without CONTEXT_KNOWN).
pub(crate) const EMPTY_CTX: SockCtx = SockCtx {
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

/// Bounded: one entry per live thread that connects. An entry stays after
/// its connect (inactive) and the thread's next connect rewrites it in place:
/// an LRU insert and delete per connect were the largest map cost on the
/// connect path. It is removed when the thread exits.
#[map(name = "PENDING")]
pub(crate) static PENDING: LruHashMap<u32, Pending> =
    LruHashMap::with_max_entries(16384, BPF_F_NO_COMMON_LRU);

/// Bounded: sockets in SYN_SENT; removed on every state change out of it.
#[map(name = "SYNSENT")]
pub(crate) static SYNSENT: LruHashMap<u64, SockCtx> =
    LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

/// This thread's connect, if it is inside `connect()` now.
#[inline(always)]
pub(crate) fn active_pending(tid: u32) -> Option<*mut Pending> {
    let p = PENDING.get_ptr_mut(tid)?;
    // SAFETY: pointer into a live map slot, read once.
    (unsafe { (*p).active } == 1).then_some(p)
}
