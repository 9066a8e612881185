//! Loading the kernel programs, attaching them one by one (a hook this kernel
//! lacks degrades the agent instead of stopping it), and reading what they
//! send: the ring buffer and the per-CPU lost-event counter.

use anyhow::{Context as _, Result, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FEntry, FExit, Program, RawTracePoint, TracePoint},
};
use connscope_ebpf::{Config, names};
use tokio::io::unix::AsyncFd;

/// Records handled per turn of the main loop.
pub(crate) const BATCH: usize = 1024;

/// The kernel object, built by agent/build.rs and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connscope-ebpf"));

/// A kernel hook: program name in the object, tracepoint category and name,
/// and what is lost without it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hook {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    pub without: &'static str,
}

/// Every hook the agent uses.
pub(crate) const HOOKS: &[Hook] = &[
    Hook {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        without: "no TCP failures from non-blocking connects, no listener (sidecar readiness) events",
    },
    Hook {
        program: "sys_enter_connect",
        category: "syscalls",
        name: "sys_enter_connect",
        without: "no dialed address for blocking or AF_UNIX failures; non-blocking TCP still reported",
    },
    Hook {
        program: "sys_exit_connect",
        category: "syscalls",
        name: "sys_exit_connect",
        without: "no failures returned by connect() itself (blocking TCP, AF_UNIX)",
    },
    Hook {
        program: "tcp_receive_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        without: "RST not flagged; errno still read from sk_err where BTF allows",
    },
    Hook {
        program: "tcp_send_reset",
        category: "tcp",
        name: "tcp_send_reset",
        without: "no kernel proof that a refused connect was captured (redirected to the capture port): the race verdict falls back to the pod's capture annotations, then to inference",
    },
    Hook {
        program: "sched_process_exec",
        category: "sched",
        name: "sched_process_exec",
        without: "no process start times (container start in race timelines)",
    },
    Hook {
        program: "sched_process_exit",
        category: "sched",
        name: "sched_process_exit",
        without: "no process exit times (shutdown race, last process exit)",
    },
    Hook {
        program: "cgroup_mkdir",
        category: "cgroup",
        name: "cgroup_mkdir",
        without: "cgroups learned by walking the cgroup tree only: containers living milliseconds may go unattributed",
    },
    Hook {
        program: "cgroup_rmdir",
        category: "cgroup",
        name: "cgroup_rmdir",
        without: "deleted cgroups noticed on the next walk only",
    },
];

/// Outcome of attaching one hook.
#[derive(Debug, Clone)]
pub(crate) struct HookStatus {
    pub hook: Hook,
    /// `None` when attached, else why not.
    pub error: Option<String>,
}

/// How the two ends of `connect()` are seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectPath {
    /// `fentry`/`fexit` on `__sys_connect`: only connects pay.
    Fentry,
    /// `syscalls:sys_{enter,exit}_connect`: every syscall of every task
    /// takes the kernel's slow syscall path while they are attached.
    Tracepoint,
}

impl ConnectPath {
    /// The `path` label and log value.
    pub fn label(self) -> &'static str {
        match self {
            ConnectPath::Fentry => "fentry",
            ConnectPath::Tracepoint => "tracepoint",
        }
    }
}

/// Which connect path to use (`--connect-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectPathChoice {
    /// fentry/fexit where the kernel allows them, else the tracepoints.
    Auto,
    /// fentry/fexit or fail.
    Fentry,
    /// The syscall tracepoints, even where fentry is allowed.
    Tracepoint,
}

/// The kernel function whose two ends the BTF-typed connect programs see.
pub(crate) const CONNECT_FN: &str = "__sys_connect";
/// Program names of the BTF-typed connect path.
pub(crate) const CONNECT_FENTRY: &str = "connect_fentry";
pub(crate) const CONNECT_FEXIT: &str = "connect_fexit";

/// Loaded and attached programs. Dropping it detaches everything.
pub(crate) struct Probes {
    /// Owns the programs and their links: dropped last, detaching all.
    ebpf: Ebpf,
    pub status: Vec<HookStatus>,
    /// The connect path in use.
    pub connect_path: ConnectPath,
    ring: AsyncFd<RingBuf<MapData>>,
    lost: PerCpuArray<MapData, u64>,
}

/// Options for [`Probes::load`].
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub config: Config,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Hooks not to attach (by tracepoint or program name): to run lighter,
    /// or to test the degraded paths.
    pub disabled: Vec<String>,
    pub connect_path: ConnectPathChoice,
    /// The kernel's BTF, which fentry/fexit programs are typed against.
    pub btf: std::path::PathBuf,
}

impl Probes {
    /// Loads the object with this kernel's offsets and attaches every hook it
    /// can. Fails only if nothing useful could be attached.
    pub(crate) fn load(opts: &LoadOptions) -> Result<Self> {
        if !opts.ring_bytes.is_power_of_two() || opts.ring_bytes < 4096 {
            bail!(
                "--ring-buffer-bytes must be a power of two of at least 4096, not {}",
                opts.ring_bytes
            );
        }
        raise_memlock();
        let mut config = opts.config;
        // Wake the reader when an eighth of the ring (at most 64 KiB) waits;
        // the pipeline also drains it every few milliseconds.
        config.wakeup_bytes = (opts.ring_bytes / 8).min(64 * 1024);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &config, true)
            .map_max_entries(names::EVENTS, opts.ring_bytes)
            .load(OBJECT)
            .context("loading the eBPF object (needs CAP_BPF and CAP_PERFMON, or root)")?;
        let connect_path = choose_connect_path(&mut ebpf, opts)?;
        let mut status = Vec::new();
        for hook in HOOKS {
            let full = format!("{}:{}", hook.category, hook.name);
            let error = if opts
                .disabled
                .iter()
                .any(|d| d == hook.name || d == hook.program || *d == full)
            {
                Some("disabled by --disable-probe".to_string())
            } else if connect_path == ConnectPath::Fentry && is_connect_tracepoint(hook) {
                // Seen from fentry/fexit on __sys_connect instead.
                None
            } else if let Some(raw) = raw_variant(hook, &config)
                && !opts.disabled.iter().any(|d| d == raw)
            {
                // The raw tracepoint costs far less per call; the classic
                // one is the fallback (and reachable on purpose with
                // --disable-probe <raw program>, for tests).
                match attach_raw(&mut ebpf, raw, hook.name) {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), hook = %full, "raw tracepoint unavailable; using the classic tracepoint");
                        attach(&mut ebpf, hook).err().map(|e| format!("{e:#}"))
                    }
                }
            } else {
                attach(&mut ebpf, hook).err().map(|e| format!("{e:#}"))
            };
            if let Some(e) = &error {
                tracing::warn!(hook = %full, error = %e, without = hook.without, "hook not attached");
            }
            status.push(HookStatus { hook: *hook, error });
        }
        let core = ["inet_sock_set_state", "sys_exit_connect"];
        if status
            .iter()
            .all(|s| s.error.is_some() || !core.contains(&s.hook.program))
        {
            bail!(
                "neither sock:inet_sock_set_state nor syscalls:sys_exit_connect could be attached"
            );
        }
        let ring = RingBuf::try_from(ebpf.take_map(names::EVENTS).context("EVENTS map")?)?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
        // the RingBuf, and as_raw_fd always returns that same fd.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let lost = PerCpuArray::try_from(ebpf.take_map(names::LOST).context("LOST map")?)?;
        Ok(Probes {
            ebpf,
            status,
            connect_path,
            ring,
            lost,
        })
    }

    /// Waits until the ring buffer has data, then hands every record to `f`.
    /// Returns the number of records read.
    pub(crate) async fn read_batch(&mut self, mut f: impl FnMut(&[u8])) -> Result<usize> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut n = 0;
        // At most BATCH records per turn, so signals and timers are served
        // between batches even during a flood; readiness is kept until empty.
        while n < BATCH {
            let Some(item) = ring.next() else {
                guard.clear_ready();
                return Ok(n);
            };
            f(&item);
            n += 1;
        }
        Ok(n)
    }

    /// Reads what the ring buffer holds now, without waiting (the kernel
    /// only wakes the reader for batches); at most a few batches, so a flood
    /// cannot hold the main loop here.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let ring = self.ring.get_mut();
        let mut n = 0;
        while n < 4 * BATCH {
            let Some(item) = ring.next() else { break };
            f(&item);
            n += 1;
        }
        n
    }

    /// Detaches and unloads every program, keeping the maps: at shutdown the
    /// kernel stops producing first, so what is left in the ring is finite.
    pub(crate) fn detach(&mut self) {
        // Each detach waits for an RCU grace period in the kernel: done one
        // after the other they take ~70 ms each, side by side about one.
        std::thread::scope(|s| {
            for (name, prog) in self.ebpf.programs_mut() {
                s.spawn(move || {
                    let r = match prog {
                        Program::TracePoint(p) => p.unload(),
                        Program::RawTracePoint(p) => p.unload(),
                        Program::FEntry(p) => p.unload(),
                        Program::FExit(p) => p.unload(),
                        _ => Ok(()),
                    };
                    // Programs never loaded (the variant not chosen) are fine.
                    if let Err(e) = r.or_else(|e| match e {
                        aya::programs::ProgramError::NotLoaded => Ok(()),
                        e => Err(e),
                    }) {
                        tracing::warn!(program = name, error = %e, "could not detach");
                    }
                });
            }
        });
    }

    /// Like [`Probes::drain`], but hands records to `f` only until
    /// `deadline`; the rest is consumed without processing and counted.
    /// Returns (processed, skipped).
    pub(crate) fn drain_until(
        &mut self,
        deadline: std::time::Instant,
        mut f: impl FnMut(&[u8]),
    ) -> (usize, usize) {
        let ring = self.ring.get_mut();
        let (mut done, mut skipped) = (0, 0);
        while let Some(item) = ring.next() {
            if skipped == 0 && std::time::Instant::now() < deadline {
                f(&item);
                done += 1;
            } else {
                skipped += 1;
            }
        }
        (done, skipped)
    }

    /// Events the kernel could not submit since load, summed over CPUs.
    pub(crate) fn lost_total(&self) -> Result<u64> {
        let per_cpu = self.lost.get(&0, 0)?;
        Ok(per_cpu.iter().sum())
    }
}

/// Program name of the raw-tracepoint variant of `sock:inet_sock_set_state`.
pub(crate) const RAW_SOCK_STATE: &str = "sock_state_raw";
/// Program name of the raw-tracepoint variant of `tcp:tcp_receive_reset`.
pub(crate) const RAW_RESET: &str = "reset_raw";

/// Every program the agent may load: each hook's classic program and the
/// raw-tracepoint variants (to find ours among the kernel's programs).
pub fn program_names() -> impl Iterator<Item = &'static str> {
    HOOKS.iter().map(|h| h.program).chain([
        RAW_SOCK_STATE,
        RAW_RESET,
        CONNECT_FENTRY,
        CONNECT_FEXIT,
    ])
}

/// `syscalls:sys_{enter,exit}_connect`, which the fentry path replaces.
fn is_connect_tracepoint(hook: &Hook) -> bool {
    hook.category == "syscalls" && hook.name.ends_with("_connect")
}

/// Attaches fentry/fexit on `__sys_connect` where the choice and the kernel
/// allow; both or neither (a connect must be seen from both ends by the
/// same path). Errors only when fentry was required.
fn choose_connect_path(ebpf: &mut Ebpf, opts: &LoadOptions) -> Result<ConnectPath> {
    let disabled = opts
        .disabled
        .iter()
        .any(|d| d.ends_with("_connect") || d == CONNECT_FENTRY || d == CONNECT_FEXIT);
    if opts.connect_path == ConnectPathChoice::Tracepoint || disabled {
        tracing::info!(
            connect_path = "tracepoint",
            "connect path: syscalls:sys_{{enter,exit}}_connect (chosen)"
        );
        return Ok(ConnectPath::Tracepoint);
    }
    match attach_btf_connect(ebpf, &opts.btf) {
        Ok(()) => {
            tracing::info!(
                connect_path = "fentry",
                "connect path: fentry/fexit on {CONNECT_FN} (only connects pay)"
            );
            Ok(ConnectPath::Fentry)
        }
        Err(e) if opts.connect_path == ConnectPathChoice::Fentry => {
            Err(e.context("--connect-path fentry"))
        }
        Err(e) => {
            // Unload what may have loaded, so the tracepoints see alone.
            for name in [CONNECT_FENTRY, CONNECT_FEXIT] {
                if let Some(Program::FEntry(p)) = ebpf.program_mut(name) {
                    let _ = p.unload();
                } else if let Some(Program::FExit(p)) = ebpf.program_mut(name) {
                    let _ = p.unload();
                }
            }
            tracing::warn!(
                connect_path = "tracepoint",
                reason = %verifier_reason(&format!("{e:#}")),
                "connect path: fentry/fexit refused by this kernel; using syscalls:sys_{{enter,exit}}_connect (every syscall on the slow path)"
            );
            Ok(ConnectPath::Tracepoint)
        }
    }
}

fn attach_btf_connect(ebpf: &mut Ebpf, btf_path: &std::path::Path) -> Result<()> {
    let btf = Btf::parse_file(btf_path, Endianness::default())
        .with_context(|| format!("kernel BTF {}", btf_path.display()))?;
    let entry: &mut FEntry = ebpf
        .program_mut(CONNECT_FENTRY)
        .context("connect_fentry missing from the object")?
        .try_into()?;
    entry.load(CONNECT_FN, &btf).context("loading fentry")?;
    entry.attach().context("attaching fentry")?;
    let exit: &mut FExit = ebpf
        .program_mut(CONNECT_FEXIT)
        .context("connect_fexit missing from the object")?
        .try_into()?;
    exit.load(CONNECT_FN, &btf).context("loading fexit")?;
    exit.attach().context("attaching fexit")?;
    Ok(())
}

/// Whether this kernel loads and attaches the fentry connect path (for
/// `connscope check`): attached for a moment, then detached.
pub(crate) fn try_btf_connect(config: &Config, btf: &std::path::Path) -> Result<(), String> {
    let mut ebpf = EbpfLoader::new()
        .override_global(names::CONFIG, config, true)
        .map_max_entries(names::EVENTS, 4096)
        .load(OBJECT)
        .map_err(|e| format!("loading the eBPF object: {e}"))?;
    attach_btf_connect(&mut ebpf, btf).map_err(|e| verifier_reason(&format!("{e:#}")))
}

/// The raw-tracepoint program that replaces a classic hook, when this
/// kernel's BTF gave every offset it reads.
pub(crate) fn raw_variant(hook: &Hook, config: &Config) -> Option<&'static str> {
    match hook.program {
        "inet_sock_set_state" if config.raw_sock_state_usable() => Some(RAW_SOCK_STATE),
        "tcp_receive_reset" if config.raw_reset_usable() => Some(RAW_RESET),
        _ => None,
    }
}

fn attach_raw(ebpf: &mut Ebpf, program: &str, tracepoint: &str) -> Result<()> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing from the object"))?
        .try_into()?;
    prog.load().context("verifier")?;
    prog.attach(tracepoint)?;
    Ok(())
}

fn attach(ebpf: &mut Ebpf, hook: &Hook) -> Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("program {} missing from the object", hook.program))?
        .try_into()?;
    prog.load().context("verifier")?;
    prog.attach(hook.category, hook.name)?;
    Ok(())
}

/// What this kernel's verifier says of each program the agent would load
/// with `config`: the classic programs and the raw-tracepoint variants the
/// offsets allow. Nothing is attached. `connscope check` reports it, so a
/// program an old kernel rejects (a helper it lacks, a bound its verifier
/// cannot prove) shows before a deploy, not as a crash-looping pod.
pub(crate) fn verify(config: &Config) -> Result<Vec<(&'static str, Result<(), String>)>> {
    raise_memlock();
    let mut ebpf = EbpfLoader::new()
        .override_global(names::CONFIG, config, true)
        .map_max_entries(names::EVENTS, 4096)
        .load(OBJECT)
        .context("loading the eBPF object (needs CAP_BPF and CAP_PERFMON, or root)")?;
    let raw = HOOKS.iter().filter_map(|h| raw_variant(h, config));
    let programs: Vec<&'static str> = HOOKS.iter().map(|h| h.program).chain(raw).collect();
    Ok(programs
        .into_iter()
        .map(|name| {
            let r = match ebpf.program_mut(name) {
                Some(Program::TracePoint(p)) => p.load(),
                Some(Program::RawTracePoint(p)) => p.load(),
                Some(_) => Ok(()),
                None => return (name, Err("missing from the object".to_string())),
            };
            (name, r.map_err(|e| verifier_reason(&format!("{e:#}"))))
        })
        .collect())
}

/// The line of a verifier log that says why: the last one before the
/// statistics the verifier prints at the end.
pub(crate) fn verifier_reason(error: &str) -> String {
    let stats = ["verification time", "stack depth", "processed "];
    error
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)))
        .map(|l| l.trim_start_matches(": ").to_string())
        .unwrap_or_else(|| error.to_string())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}
