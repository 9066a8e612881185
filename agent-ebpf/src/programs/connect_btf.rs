//! `fentry`/`fexit` on `__sys_connect`: the two ends of `connect()` that
//! `connect` takes from the `syscalls:` tracepoints, where the kernel allows
//! BTF-typed programs. They cost only the calls of the traced function,
//! whereas attaching any `syscalls:` tracepoint puts every syscall of every
//! task on the kernel's slow syscall path. The bodies are `connect`'s.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};

use super::{
    common::cfg_field,
    connect::{on_enter, on_exit},
};

/// `__sys_connect(int fd, struct sockaddr __user *uservaddr, int addrlen)`.
#[fentry(function = "__sys_connect")]
fn connect_fentry(ctx: FEntryContext) -> i32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    on_enter(ctx.arg::<u64>(1));
    0
}

/// The return value follows the three arguments in an fexit program's
/// context (`bpf_get_func_ret` would need 5.17).
#[fexit(function = "__sys_connect")]
fn connect_fexit(ctx: FExitContext) -> i32 {
    if cfg_field!(noop) != 0 {
        return 0;
    }
    on_exit(i64::from(ctx.arg::<i32>(3)));
    0
}
