//! connscope's kernel programs.
//!
//! Hooks (tracepoints only: they are stable, and kprobes may be compiled out):
//! - `syscalls:sys_enter_connect` / `sys_exit_connect`: the address the
//!   application dialed, and the error a blocking `connect()` returned.
//! - `sock:inet_sock_set_state`: SYN_SENT start (task context), SYN_SENT ->
//!   CLOSE (a failed connect, also non-blocking ones), LISTEN up/down.
//! - `tcp:tcp_receive_reset`: a RST in SYN_SENT (ECONNREFUSED) even where
//!   `sk_err` cannot be read.
//! - `sched:sched_process_exec` / `sched_process_exit`: process lifetimes.
//!
//! Every field offset comes from [`CONFIG`], filled in by the agent at load.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;
