//! Connect storms for benchmarks: many threads doing connect + close against
//! a loopback address or a test host in a network namespace of its own,
//! successful or refused, optionally rate-limited and spread over many
//! cgroups.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Options of `connscope testbed storm`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where to connect. Omitted: a listener of our own on 127.0.0.1 (for
    /// successful connects) or a just-released port (for refused ones).
    #[arg(long)]
    pub target: Option<SocketAddr>,
    /// Connects are expected to be refused (no listener).
    #[arg(long)]
    pub refused: bool,
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Total connects per second across threads (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// File listing cgroup directories; the storm moves itself through them
    /// (one process per cgroup at a time) to spread events over many pods.
    #[arg(long)]
    pub cgroups: Option<PathBuf>,
    /// Connects between two cgroup moves.
    #[arg(long, default_value_t = 10)]
    pub per_cgroup: u64,
    /// Turn on the kernel's BPF run-time statistics for the storm and report
    /// each loaded program's runs and time: what a tracer's programs cost per
    /// connect, read from the kernel rather than inferred from noisy
    /// throughput. (The statistics themselves add two clock reads per run.)
    #[arg(long)]
    pub bpf_stats: bool,
    /// Non-blocking connects (connect, wait for writable, read SO_ERROR), the
    /// way Go, Java NIO, Node and Envoy dial: the connect's outcome is known
    /// only after the syscall returns, which is another path in the kernel
    /// programs than a blocking connect.
    #[arg(long)]
    pub nonblocking: bool,
    /// Dial across a veth pair: the connecting threads move into a pod
    /// namespace, the listener (successful connects) lives in a test-host
    /// namespace, and refused connects go to a port nothing listens on
    /// there. The storm creates both namespaces (`cs250-pod`, `cs250-up`)
    /// and deletes them when it ends. Ignored with `--target`.
    #[arg(long)]
    pub netns: bool,
}

/// `Topology` tag of the storm's namespaces; the tests use low tags.
const NETNS_TAG: u8 = 250;

/// What a storm did.
#[derive(Debug, Serialize)]
pub struct Report {
    pub connects: u64,
    pub ok: u64,
    pub refused: u64,
    pub other_errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// With `--bpf-stats`: programs that ran during the storm.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramCost>,
}

/// Runs and kernel time of one BPF program during a storm.
#[derive(Debug, Serialize)]
pub struct ProgramCost {
    /// As the kernel keeps it (at most 15 characters).
    pub name: String,
    /// One of connscope's programs (by name), not another tracer's.
    pub connscope: bool,
    pub runs: u64,
    pub run_ns: u64,
}

/// Every loaded program's (name, runs, ns) by id.
fn program_stats() -> std::collections::HashMap<u32, (String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| {
            let name = p.name_as_str().unwrap_or("?").to_string();
            (
                p.id(),
                (name, p.run_count(), p.run_time().as_nanos() as u64),
            )
        })
        .collect()
}

/// What ran between two [`program_stats`] snapshots, busiest first.
fn program_costs(
    before: &std::collections::HashMap<u32, (String, u64, u64)>,
    after: std::collections::HashMap<u32, (String, u64, u64)>,
) -> Vec<ProgramCost> {
    let mut v: Vec<ProgramCost> = after
        .into_iter()
        .filter_map(|(id, (name, runs, ns))| {
            let (r0, n0) = before.get(&id).map_or((0, 0), |(_, r, n)| (*r, *n));
            let runs = runs.saturating_sub(r0);
            (runs > 0).then(|| ProgramCost {
                connscope: !name.is_empty()
                    && crate::kernel::probes::program_names().any(|n| n.starts_with(name.as_str())),
                name,
                runs,
                run_ns: ns.saturating_sub(n0),
            })
        })
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.run_ns));
    v
}

/// A listener with a deep backlog: a full accept queue drops SYNs and turns
/// the benchmark into a measure of SYN retransmission timers.
fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// One non-blocking connect: `connect()` (EINPROGRESS), wait until the
/// socket is writable (bounded: 5 s), then its outcome from `SO_ERROR`.
fn connect_nonblocking(target: SocketAddr) -> std::io::Result<socket2::Socket> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    match s.connect(&target.into()) {
        Ok(()) => return Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
    if poll(&mut fds, PollTimeout::from(5000u16))? == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
    }
    match s.take_error()? {
        Some(e) => Err(e),
        None => Ok(s),
    }
}

/// Runs the storm and prints a JSON [`Report`].
pub fn run(args: Args) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    // Deleted when the storm ends (drop), whatever happens.
    let topo = match (args.netns, args.target) {
        (true, None) => Some(super::net::Topology::create(NETNS_TAG, false)?),
        _ => None,
    };
    let target = target(&args, topo.as_ref(), &stop)?;
    let pod_ns = topo.as_ref().map(|t| t.pod.name.clone());
    let cgroups: Vec<PathBuf> = match &args.cgroups {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(PathBuf::from)
            .collect(),
        None => Vec::new(),
    };
    // Held for the storm: the kernel keeps counting while the fd is open.
    let stats_fd = if args.bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling BPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+)")?,
        )
    } else {
        None
    };
    let stats_before = stats_fd.as_ref().map(|_| program_stats());
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let threads = if cgroups.is_empty() {
        args.threads.max(1)
    } else {
        1
    };
    let per_thread_gap =
        (args.rate > 0).then(|| Duration::from_secs_f64(threads as f64 / args.rate as f64));
    let dialer = Dialer {
        target,
        deadline,
        gap: per_thread_gap,
        per_cgroup: args.per_cgroup.max(1),
        nonblocking: args.nonblocking,
        pod_ns,
        cgroups,
        counts: counts.clone(),
    };
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let d = dialer.clone();
            std::thread::spawn(move || d.dial())
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("storm thread panicked"))??;
    }
    stop.store(true, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let programs = match &stats_before {
        Some(before) => program_costs(before, program_stats()),
        None => Vec::new(),
    };
    drop(stats_fd);
    let r = Report {
        connects: counts[0].load(Ordering::Relaxed),
        ok: counts[1].load(Ordering::Relaxed),
        refused: counts[2].load(Ordering::Relaxed),
        other_errors: counts[3].load(Ordering::Relaxed),
        seconds: secs,
        per_second: counts[0].load(Ordering::Relaxed) as f64 / secs,
        programs,
    };
    println!("{}", serde_json::to_string(&r)?);
    std::io::stdout().flush()?;
    Ok(())
}

/// Where the storm dials: the given target, a closed port (refused), or a
/// listener of its own (loopback or the test host's namespace) whose
/// acceptor threads run until `stop`.
fn target(
    args: &Args,
    topo: Option<&super::net::Topology>,
    stop: &Arc<AtomicBool>,
) -> Result<SocketAddr> {
    let l = match (args.target, args.refused, topo) {
        (Some(t), _, _) => return Ok(t),
        // Nothing listens in the test host's namespace: its kernel answers RST.
        (None, true, Some(t)) => return Ok(t.upstream_addr(false, 9)),
        (None, true, None) => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            return Ok(l.local_addr()?);
        }
        (None, false, Some(t)) => {
            let addr = t.upstream_addr(false, 0);
            let up = &t.upstream.name;
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    super::net::enter_netns(up)?;
                    listener(addr)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("listener thread panicked"))?
            })?
        }
        (None, false, None) => listener(SocketAddr::from(([127, 0, 0, 1], 0)))?,
    };
    let addr = l.local_addr()?;
    for _ in 0..args.threads.max(2) {
        let l = l.try_clone()?;
        let stop = stop.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
    }
    Ok(addr)
}

/// One storm thread's work: connect until the deadline, at its rate,
/// counting outcomes (all, ok, refused, other).
#[derive(Clone)]
struct Dialer {
    target: SocketAddr,
    deadline: Instant,
    gap: Option<Duration>,
    per_cgroup: u64,
    nonblocking: bool,
    pod_ns: Option<String>,
    cgroups: Vec<PathBuf>,
    counts: Arc<[AtomicU64; 4]>,
}

impl Dialer {
    fn dial(self) -> Result<()> {
        if let Some(ns) = &self.pod_ns {
            super::net::enter_netns(ns)?;
        }
        let mut next = Instant::now();
        let mut n = 0u64;
        while Instant::now() < self.deadline {
            if !self.cgroups.is_empty() && n.is_multiple_of(self.per_cgroup) {
                let cg = &self.cgroups[((n / self.per_cgroup) as usize) % self.cgroups.len()];
                let _ = std::fs::write(cg.join("cgroup.procs"), "0");
            }
            n += 1;
            let outcome = if self.nonblocking {
                connect_nonblocking(self.target)
            } else {
                TcpStream::connect(self.target).map(socket2::Socket::from)
            };
            let i = match outcome {
                Ok(s) => {
                    // Close with RST: no TIME_WAIT, so ports never run out.
                    let _ = s.set_linger(Some(Duration::ZERO));
                    1
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => 2,
                Err(_) => 3,
            };
            self.counts[0].fetch_add(1, Ordering::Relaxed);
            self.counts[i].fetch_add(1, Ordering::Relaxed);
            if let Some(gap) = self.gap {
                next += gap;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        }
        Ok(())
    }
}
