//! Stand-ins for the demo and the tests: an application that dials out, an
//! upstream server, and a sidecar that behaves like Envoy where it matters
//! (uid 1337, listeners opened late, forwarding by SO_ORIGINAL_DST, inbound
//! passthrough from 127.0.0.6 with Envoy's 503); for the inbound direction a
//! server app, a client outside the pod and a pilot-agent that probes; for
//! Istio ambient a ztunnel that listens inside pods' namespaces.

pub mod app;
pub mod client;
pub mod dial;
pub mod inbound;
pub mod mesh;
pub mod net;
pub mod pod;
pub mod prober;
pub mod records;
pub mod rules;
pub mod scenario;
pub mod sidecar;
pub mod storm;
pub mod ztunnel;

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Subcommand;

/// How many times slower than real hardware the test bed runs: 1, except
/// in the kernel matrix's emulated guests, where `cargo xtask vm` sets
/// `CONNSCOPE_TEST_TIME_SCALE`. The test bed's own deadlines, and the tests'
/// deadlines and scenario delays, are multiplied by it; nothing else.
pub fn time_scale() -> u32 {
    std::env::var("CONNSCOPE_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `d` on this machine's clock (see [`time_scale`]).
pub fn slow(d: Duration) -> Duration {
    d * time_scale()
}

/// `connscope testbed ...` (hidden).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stand-in Envoy: listens as uid 1337 and forwards to SO_ORIGINAL_DST.
    Sidecar(sidecar::Args),
    /// Stand-in application: one connect(), result as a JSON line.
    Dial(dial::Args),
    /// Connect storm for benchmarks; prints a JSON report.
    Storm(storm::Args),
    /// Stand-in server app: listens (late, or on loopback only), answers
    /// HTTP 200, closes its listeners on SIGTERM.
    App(app::Args),
    /// HTTP client outside the pod: requests to podIP:port, one JSON line each.
    Client(client::Args),
    /// Stand-in pilot-agent: probes the app as uid 1337 from 127.0.0.6.
    Prober(prober::Args),
    /// Stand-in ztunnel (Istio ambient): listens inside pods' network
    /// namespaces from its own, closes on SIGUSR1 or after a delay.
    Ztunnel(ztunnel::Args),
    /// Upstream test host: answers every connection with a banner line.
    Serve {
        /// Address to listen on; repeatable.
        #[arg(long = "addr", required = true)]
        addrs: Vec<SocketAddr>,
    },
    /// Join a network namespace and/or a cgroup, then exec a command (how a
    /// runtime starts a container's process).
    Enter {
        #[arg(long)]
        netns: Option<String>,
        #[arg(long)]
        cgroup: Option<std::path::PathBuf>,
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
}

/// Runs a testbed role.
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Sidecar(a) => sidecar::run(a),
        Command::Dial(a) => dial::run(a),
        Command::Storm(a) => storm::run(a),
        Command::App(a) => app::run(a),
        Command::Client(a) => client::run(a),
        Command::Prober(a) => prober::run(a),
        Command::Ztunnel(a) => ztunnel::run(a),
        Command::Serve { addrs } => serve(&addrs),
        Command::Enter {
            netns,
            cgroup,
            argv,
        } => pod::enter(netns.as_deref(), cgroup.as_deref(), &argv),
    }
}

/// Sets the calling thread's comm (what the kernel reports as `comm`).
pub fn set_comm(name: &str) -> Result<()> {
    let c = std::ffi::CString::new(name.as_bytes().iter().take(15).copied().collect::<Vec<_>>())?;
    nix::sys::prctl::set_name(&c)
        .map_err(std::io::Error::from)
        .context("prctl(PR_SET_NAME)")
}

fn serve(addrs: &[SocketAddr]) -> Result<()> {
    set_comm("upstream")?;
    let mut threads = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        let addr = *addr;
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = writeln!(s, "upstream {addr}");
            }
        }));
    }
    println!("{{\"ready\":true}}");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
