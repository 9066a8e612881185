//! The ring buffer to userspace and the one way records reach it: written
//! in place in ring memory, or counted in [`LOST`], so nothing disappears
//! uncounted. Every hook family reports through here.

use core::mem::MaybeUninit;

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use connscope_ebpf::{Event, PATH_LEN, PathEvent};

use super::{common::cfg_field, maps::SockCtx};

/// Events to userspace. The agent resizes it (`--ring-buffer-bytes`).
#[map(name = "EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Events the ring buffer had no room for, per CPU; index 0.
#[map(name = "LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Writes an event straight into ring-buffer memory (not built on the BPF
/// stack and copied), or counts it as lost. `fill` sets what the context
/// does not.
#[inline(always)]
pub(crate) fn emit(k: u8, c: &SockCtx, ts_ns: u64, fill: impl FnOnce(&mut Event)) {
    reserve_and_submit::<Event>(|e| fill(e.write(event(k, c, ts_ns))));
}

/// [`emit`] for the two records that carry a path (AF_UNIX connect
/// failures, execs): only they pay for its bytes.
#[inline(always)]
pub(crate) fn emit_with_path(
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
    if cfg_field!(no_output) != 0 {
        return;
    }
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
pub(crate) fn count_lost() {
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
pub(crate) fn wakeup_flags(record_bytes: u64) -> u64 {
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
