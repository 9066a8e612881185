//! The stand-in application: one `connect()`, blocking or non-blocking, to an
//! inet address or an AF_UNIX path, reported as one JSON line so the caller
//! knows exactly which pid saw which result.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::fd::AsFd as _,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::kernel::decode::{Clock, errno_name};

/// Options of `connscope testbed dial`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `IP:PORT`, `[IPv6]:PORT`, or `unix:/path`.
    #[arg(long)]
    pub target: String,
    /// Put the socket in non-blocking mode (as Go, Java NIO, tokio, Node do).
    #[arg(long)]
    pub nonblocking: bool,
    /// comm to run under.
    #[arg(long, default_value = "cs-app")]
    pub comm: String,
    /// Give up after this long.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// Retry until a connect succeeds or this many attempts were made
    /// (an application that dials at start-up and retries).
    #[arg(long, default_value_t = 1)]
    pub attempts: u32,
    /// Keep making all attempts after a success (an app that keeps dialing).
    #[arg(long)]
    pub keep_going: bool,
    /// Pause between attempts.
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// Dial an IPv4 target from an AF_INET6 socket, as its IPv4-mapped
    /// address (`::ffff:a.b.c.d`): a dual-stack client (Java by default).
    #[arg(long)]
    pub dual_stack: bool,
}

/// One attempt, as printed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub pid: u32,
    pub comm: String,
    pub target: String,
    pub nonblocking: bool,
    pub ok: bool,
    pub errno: i32,
    pub error: String,
    /// First line the peer sent, on success.
    pub banner: Option<String>,
    pub start_mono_ns: u64,
    pub end_mono_ns: u64,
}

/// Runs `attempts` connects, printing one [`Outcome`] line per attempt.
pub fn run(args: Args) -> Result<()> {
    super::set_comm(&args.comm)?;
    let comm = std::fs::read_to_string("/proc/self/comm")?
        .trim()
        .to_string();
    for i in 0..args.attempts.max(1) {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let start = Clock::mono_now();
        let (errno, banner) = match attempt(&args) {
            Ok(b) => (0, Some(b)),
            Err(e) => (e, None),
        };
        let out = Outcome {
            pid: std::process::id(),
            comm: comm.clone(),
            target: args.target.clone(),
            nonblocking: args.nonblocking,
            ok: errno == 0,
            errno,
            error: errno_name(errno),
            banner,
            start_mono_ns: start,
            end_mono_ns: Clock::mono_now(),
        };
        println!("{}", serde_json::to_string(&out)?);
        std::io::stdout().flush()?;
        if out.ok && !args.keep_going {
            break;
        }
    }
    Ok(())
}

/// Target parsing: `unix:/path` or a socket address.
pub fn parse_target(t: &str) -> Result<(Domain, SockAddr)> {
    if let Some(path) = t.strip_prefix("unix:") {
        return Ok((Domain::UNIX, SockAddr::unix(path)?));
    }
    let a: SocketAddr = t.parse().with_context(|| format!("bad target {t:?}"))?;
    Ok((Domain::for_address(a), a.into()))
}

fn attempt(args: &Args) -> std::result::Result<String, i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let (mut domain, mut addr) = parse_target(&args.target).map_err(|_| libc::EINVAL)?;
    if args.dual_stack
        && let Some(SocketAddr::V4(v4)) = addr.as_socket()
    {
        domain = Domain::IPV6;
        addr = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()).into();
    }
    let sock = Socket::new(domain, Type::STREAM, None).map_err(errno)?;
    if args.dual_stack {
        sock.set_only_v6(false).map_err(errno)?;
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    if args.nonblocking {
        sock.set_nonblocking(true).map_err(errno)?;
        match sock.connect(&addr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                wait_writable(&sock, timeout).map_err(errno)?;
                if let Some(e) = sock.take_error().map_err(errno)? {
                    return Err(errno(e));
                }
            }
            Err(e) => return Err(errno(e)),
        }
        sock.set_nonblocking(false).map_err(errno)?;
    } else {
        // A real blocking connect(); SO_SNDTIMEO bounds it.
        sock.set_write_timeout(Some(timeout)).map_err(errno)?;
        sock.connect(&addr).map_err(errno)?;
    }
    sock.set_read_timeout(Some(timeout)).map_err(errno)?;
    // The peer writes one line and closes; read it whole (bounded).
    let s: std::net::TcpStream = sock.into();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s.take(4096)), &mut line)
        .map_err(errno)?;
    Ok(line.trim().to_string())
}

fn wait_writable(sock: &Socket, timeout: Duration) -> std::io::Result<()> {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
    // Timeouts beyond i32::MAX ms (24 days) wait i32::MAX ms.
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, timeout)? {
        0 => Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        _ => Ok(()),
    }
}

/// Parses the lines a dialer printed.
pub fn parse_outcomes(stdout: &str) -> Result<Vec<Outcome>> {
    let v: Result<Vec<Outcome>, _> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect();
    let v = v.context("dialer output")?;
    if v.is_empty() {
        bail!("dialer printed nothing");
    }
    Ok(v)
}
