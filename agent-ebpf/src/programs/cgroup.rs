//! `cgroup:cgroup_mkdir` / `cgroup_rmdir` (cgroup v2): the kernel names a
//! cgroup's id and path at creation, so even a container that lives for
//! milliseconds is attributed. Its records are [`CgroupEvent`]s, built in a
//! per-CPU scratch slot and copied into the ring.

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use connscope_ebpf::{CGROUP_PATH_LEN, CgroupEvent, kind};

use super::{
    common::{cfg_field, config, now, read, read_data_loc_str},
    emit::{EVENTS, count_lost, wakeup_flags},
};

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
