//! The stand-in pilot-agent: it runs kubelet's probes of the app, rewritten
//! by Istio to its status port, by dialing the app itself as uid 1337 from
//! the passthrough source. Refused probes while the app starts are expected
//! and are not the race; the agent must keep them apart (phase `probe`).
//! Each probe prints one JSON line with the running refused count.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    time::Duration,
};

use anyhow::Result;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::race::istio::{INBOUND_SOURCE_V4, INBOUND_SOURCE_V6, PILOT_AGENT_COMM, PROXY_UID};

/// Options of `connscope testbed prober`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The app's address (pod IP and port).
    #[arg(long)]
    pub target: SocketAddr,
    /// Probes to run at most.
    #[arg(long, default_value_t = 50)]
    pub attempts: u32,
    /// The probe period.
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
    /// Stop after this many successful probes (0: run every attempt).
    #[arg(long, default_value_t = 1)]
    pub stop_after_ok: u32,
    #[arg(long, default_value_t = PROXY_UID)]
    pub uid: u32,
}

/// One probe, as printed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    pub probe: String,
    pub errno: i32,
    /// HTTP status of a probe that connected (0: none read).
    pub status: u16,
    pub refused_total: u64,
    pub pid: u32,
}

/// The probes among a prober's output lines.
pub fn probes(lines: &[String]) -> Vec<Probe> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs the probes.
pub fn run(args: Args) -> Result<()> {
    super::set_comm(PILOT_AGENT_COMM)?;
    super::sidecar::drop_to(args.uid)?;
    let (mut refused, mut ok) = (0u64, 0u32);
    for i in 0..args.attempts {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let (errno, status) = match probe(args.target) {
            Ok(status) => (0, status),
            Err(e) => (e.raw_os_error().unwrap_or(libc::EIO), 0),
        };
        let kind = match errno {
            0 => "ok",
            libc::ECONNREFUSED => "refused",
            _ => "error",
        };
        refused += u64::from(errno == libc::ECONNREFUSED);
        ok += u32::from(errno == 0);
        let p = Probe {
            probe: kind.into(),
            errno,
            status,
            refused_total: refused,
            pid: std::process::id(),
        };
        println!("{}", serde_json::to_string(&p)?);
        std::io::stdout().flush()?;
        if args.stop_after_ok > 0 && ok >= args.stop_after_ok {
            break;
        }
    }
    Ok(())
}

/// One HTTP GET probe: a non-blocking connect from the passthrough source,
/// then the status line (bounded by a second each).
fn probe(target: SocketAddr) -> std::io::Result<u16> {
    let src: IpAddr = match target {
        SocketAddr::V4(_) => INBOUND_SOURCE_V4.into(),
        SocketAddr::V6(_) => INBOUND_SOURCE_V6.into(),
    };
    let timeout = super::slow(Duration::from_secs(1));
    let sock = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.set_nonblocking(true)?;
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
            let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, t)? == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            if let Some(e) = sock.take_error()? {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut s: std::net::TcpStream = sock.into();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: app\r\nUser-Agent: kube-probe/1.30\r\nConnection: close\r\n\r\n")?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(s, 4096)).read_line(&mut line)?;
    Ok(super::client::status_of(&line))
}
