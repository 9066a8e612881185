//! `sched:sched_process_exec` / `sched_process_exit`: process lifetimes
//! (container start times come from execs). The exit hook also drops the
//! exiting thread's `PENDING` entry.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use connscope_ebpf::kind;

use super::{
    common::{cfg_field, config, current_ctx, now, read, read_data_loc_str},
    emit::{emit, emit_with_path},
    maps::PENDING,
};

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
