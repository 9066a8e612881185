//! `connscope check`: what this node offers (privileges, BTF, tracefs, each
//! hook and offset) and what would degrade without it, before deploying.

use std::path::Path;

use serde::Serialize;

use connscope_ebpf::Config;

use crate::kernel::{
    offsets,
    probes::{self, HOOKS},
};

/// Linux capability numbers the agent cares about.
const CAPS: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "load programs and create maps"),
    (
        38,
        "CAP_PERFMON",
        "attach tracepoints and read kernel memory from programs",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "needed instead of CAP_BPF/CAP_PERFMON on kernels before 5.8, and to mount tracefs",
    ),
    (
        24,
        "CAP_SYS_RESOURCE",
        "raise RLIMIT_MEMLOCK on kernels before 5.11",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "read other processes' /proc/<pid>/net when reconstructing listeners",
    ),
];

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Item {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub items: Vec<Item>,
    /// False if the agent could not run at all.
    pub usable: bool,
}

/// Parses the hex `CapEff:` line of /proc/<pid>/status.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Builds the report for this machine.
pub fn run(btf: &Path) -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps(&s))
        .unwrap_or(0);
    let mut items = capability_items(caps);
    let has_bpf = caps & (1 << 39) != 0 || caps & (1 << 21) != 0;
    items.push(btf_item(btf));
    let tracefs = offsets::tracefs_root();
    items.push(Item {
        name: "tracefs".into(),
        ok: tracefs.is_ok(),
        detail: match &tracefs {
            Ok(p) => p.display().to_string(),
            Err(e) => format!("{e:#}"),
        },
    });
    let usable = match tracefs {
        Ok(root) => {
            let (any_core, cfg) = hook_items(root, btf, &mut items);
            if has_bpf {
                let usable = verifier_items(&cfg, &mut items) && any_core;
                items.push(connect_path_item(&cfg, btf));
                usable
            } else {
                items.push(Item {
                    name: "verifier".into(),
                    ok: false,
                    detail: "not tried: loading programs needs CAP_BPF (or CAP_SYS_ADMIN)".into(),
                });
                false
            }
        }
        Err(_) => false,
    };
    Report {
        kernel,
        usable,
        items,
    }
}

/// The BTF line: ok only when the file parses as BTF and describes
/// `struct sock` (a file that merely exists proves nothing).
fn btf_item(btf: &Path) -> Item {
    let why = "no errno for non-blocking failures except RST, no netns";
    let (ok, detail) = match btf_rs::Btf::from_file(btf) {
        Ok(b) if b.resolve_types_by_name("sock").is_ok() => (
            true,
            format!(
                "{} (struct offsets for errno and network namespace)",
                btf.display()
            ),
        ),
        Ok(_) => (
            false,
            format!("{} is BTF without struct sock: {why}", btf.display()),
        ),
        Err(e) if !btf.exists() => (false, format!("{} missing ({e}): {why}", btf.display())),
        Err(e) => (
            false,
            format!("{} is not valid BTF ({e:#}): {why}", btf.display()),
        ),
    };
    Item {
        name: "BTF".into(),
        ok,
        detail,
    }
}

/// One item per capability the agent cares about.
fn capability_items(caps: u64) -> Vec<Item> {
    CAPS.iter()
        .map(|(bit, name, why)| {
            let ok = caps & (1 << bit) != 0;
            Item {
                name: (*name).into(),
                ok,
                detail: if ok {
                    "present".into()
                } else {
                    format!("missing: {why}")
                },
            }
        })
        .collect()
}

/// One item per hook, raw-tracepoint variant and missing BTF offset; returns
/// whether a core hook (one a failure can be seen without) is available, and
/// the configuration the programs would be loaded with.
fn hook_items(root: &Path, btf: &Path, items: &mut Vec<Item>) -> (bool, Config) {
    let (cfg, disc) = offsets::discover(root, btf);
    // Hooks that run as raw tracepoints where BTF gives the offsets they read.
    for (hook, usable, found, missing) in [
        (
            "inet_sock_set_state",
            cfg.raw_sock_state_usable(),
            "struct sock offsets found: the socket hook runs as a raw tracepoint (cheapest)",
            "struct sock offsets missing: the classic tracepoint is used (costs more per TCP state change)",
        ),
        (
            "tcp_receive_reset",
            cfg.raw_reset_usable(),
            "sock.skc_state found: resets of sockets not in SYN_SENT cost one read",
            "sock.skc_state missing: the classic tracepoint is used (builds a record for every reset)",
        ),
    ] {
        items.push(Item {
            name: format!("raw tracepoint {hook}"),
            ok: usable,
            detail: if usable { found } else { missing }.into(),
        });
    }
    let mut any_core = false;
    for h in HOOKS {
        let full = format!("{}/{}", h.category, h.name);
        let ok = !disc.missing_tracepoints.contains(&full);
        if ok && (h.program == "inet_sock_set_state" || h.program == "sys_exit_connect") {
            any_core = true;
        }
        items.push(Item {
            name: format!("tracepoint {}:{}", h.category, h.name),
            ok,
            detail: if ok {
                "available".into()
            } else {
                format!("missing: {}", h.without)
            },
        });
    }
    items.push(Item {
        name: "capture proof".into(),
        ok: disc.no_socket_resets,
        detail: if disc.no_socket_resets {
            "tcp:tcp_send_reset fires without a socket (kernel >= 6.10): a refused connect is the race only when the kernel shows it was redirected to the capture port (capture: kernel)"
        } else {
            "tcp:tcp_send_reset has no no-socket resets on this kernel (before 6.10): capture is decided from the pod's annotations (capture: annotations) or inferred (capture: inferred)"
        }
        .into(),
    });
    items.push(listener_netns_item(&cfg));
    for m in disc.missing_btf {
        items.push(Item {
            name: "BTF offset".into(),
            ok: false,
            detail: m,
        });
    }
    (any_core, cfg)
}

/// Whether listeners carry their socket's own network namespace (Istio
/// ambient's ztunnel listens in each pod's netns from its own).
fn listener_netns_item(cfg: &Config) -> Item {
    use connscope_ebpf::OFFSET_UNKNOWN;
    let ok = cfg.sock_net != OFFSET_UNKNOWN && cfg.net_inum != OFFSET_UNKNOWN;
    Item {
        name: "socket netns".into(),
        ok,
        detail: if ok {
            format!(
                "sock.__sk_common.skc_net.net at {}, net.ns.inum at {}: listeners are keyed by their socket's network namespace (ambient enrollment)",
                cfg.sock_net, cfg.net_inum
            )
        } else {
            "sock.__sk_common.skc_net.net missing: listeners carry the calling task's network namespace, so ztunnel's listeners in ambient pods are not seen in them".into()
        },
    }
}

/// The connect path the agent would use here (`--connect-path auto`).
fn connect_path_item(cfg: &Config, btf: &Path) -> Item {
    let (ok, detail) = match probes::try_btf_connect(cfg, btf) {
        Ok(()) => (
            true,
            format!(
                "fentry/fexit on {}: only connects pay (in use)",
                probes::CONNECT_FN
            ),
        ),
        Err(why) => (
            false,
            format!(
                "refused ({why}): the syscall tracepoints are used, which put every syscall of every task on the slow path while attached"
            ),
        ),
    };
    Item {
        name: "fentry connect path".into(),
        ok,
        detail,
    }
}

/// One item per program, as this kernel's verifier judged it (loaded, not
/// attached); returns whether a core program passed. A hook that exists is
/// not enough: an older verifier may reject the program that would run there.
fn verifier_items(cfg: &Config, items: &mut Vec<Item>) -> bool {
    let verdicts = match probes::verify(cfg) {
        Ok(v) => v,
        Err(e) => {
            items.push(Item {
                name: "verifier".into(),
                ok: false,
                detail: format!("{e:#}"),
            });
            return false;
        }
    };
    let mut core = false;
    for (program, verdict) in verdicts {
        let ok = verdict.is_ok();
        core |= ok && (program == "inet_sock_set_state" || program == "sys_exit_connect");
        items.push(Item {
            name: format!("verifier {program}"),
            ok,
            detail: match verdict {
                Ok(()) => "accepted".into(),
                Err(why) => format!("rejected: {why}"),
            },
        });
    }
    core
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "kernel {}", self.kernel)?;
        for i in &self.items {
            writeln!(
                f,
                "[{}] {}: {}",
                if i.ok { " ok " } else { "MISS" },
                i.name,
                i.detail
            )?;
        }
        write!(
            f,
            "{}",
            if self.usable {
                "connscope can run here"
            } else {
                "connscope cannot run here: it needs CAP_BPF (or CAP_SYS_ADMIN) and sock:inet_sock_set_state or syscalls:sys_exit_connect, with a program the verifier accepts"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btf_that_does_not_parse_is_not_ok() {
        let dir = std::env::temp_dir().join(format!("connscope-btf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("vmlinux");
        std::fs::write(&garbage, b"this is not BTF, just some bytes\n".repeat(100)).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        for (file, says) in [
            (&garbage, "not valid BTF"),
            (&empty, "not valid BTF"),
            (&dir.join("absent"), "missing"),
        ] {
            let r = run(file);
            let btf = r.items.iter().find(|i| i.name == "BTF").unwrap();
            assert!(!btf.ok, "{}: {}", file.display(), btf.detail);
            assert!(btf.detail.contains(says), "{}", btf.detail);
            assert!(r.to_string().contains("[MISS] BTF"), "{r}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn verifier_reason_is_the_line_before_the_statistics() {
        let e = "verifier: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). \
                 Verifier output: arg#0 type is not a struct\n112: (85) call unknown#160\n\
                 invalid func unknown#160\nverification time 15020 usec\nstack depth 32\n\
                 processed 108 insns (limit 1000000)\n";
        assert_eq!(probes::verifier_reason(e), "invalid func unknown#160");
        assert_eq!(probes::verifier_reason("plain"), "plain");
    }

    #[test]
    fn parses_capeff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(s), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps(""), None);
    }
}
