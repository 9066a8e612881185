//! connscope's kernel programs, in the `programs` module. It is compiled for
//! the BPF target only: on the host this binary is empty, and what the agent
//! uses of the crate is its library, the ABI types.
//!
//! Hooks (tracepoints, which are stable, and BTF-typed programs where the
//! kernel allows them; kprobes may be compiled out), one module of
//! `programs` per family:
//! - `connect`: `syscalls:sys_enter_connect` / `sys_exit_connect`, the
//!   address the application dialed, and the error a blocking `connect()`
//!   returned; `connect_btf`: the same from `fentry`/`fexit` on
//!   `__sys_connect`, far cheaper, used where the kernel allows it.
//! - `sock_state`: `sock:inet_sock_set_state`, SYN_SENT start (task
//!   context), SYN_SENT -> CLOSE (a failed connect, also non-blocking ones),
//!   LISTEN up/down.
//! - `reset`: `tcp:tcp_receive_reset`, a RST in SYN_SENT (ECONNREFUSED) even
//!   where `sk_err` cannot be read.
//! - `sched`: `sched:sched_process_exec` / `sched_process_exit`, process
//!   lifetimes.
//! - `cgroup`: `cgroup:cgroup_mkdir` / `cgroup_rmdir`, cgroup v2 ids and
//!   paths.
//!
//! The socket state and reset hooks also come as raw tracepoints, used when
//! BTF gives the `struct sock` offsets they need. Shared by all: `common`
//! (field readers and the task context), `maps` (the maps that tie the
//! hooks of one connect together) and `emit` (the ring buffer). Every field
//! offset comes from the `CONFIG` global in `common`, filled in by the agent
//! at load.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;
