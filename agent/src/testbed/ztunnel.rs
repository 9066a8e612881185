//! The stand-in ztunnel of Istio's ambient mode. ztunnel runs in a pod of its
//! own (its own cgroup and netns) and serves each enrolled pod from inside
//! that pod's network namespace: for every listener it enters the pod's
//! netns on one thread (`setns`), creates the socket there, returns to its
//! own netns, and binds and listens from there (istio/ztunnel
//! `src/inpod/netns.rs`, `InpodNetns::run`; `src/inpod/statemanager.rs`).
//! The sockets therefore belong to the pod's netns while every syscall on
//! them comes from ztunnel's. Closing them (`--close-after-ms`, SIGUSR1) is
//! the silent loss of enrollment of istio/istio#61182.

use std::{
    fs::File,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

/// Options of `connscope testbed ztunnel`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A pod's network namespace file (`/run/netns/<name>`,
    /// `/proc/<pid>/ns/net`); repeatable.
    #[arg(long = "netns", required = true)]
    pub netns: Vec<PathBuf>,
    /// Ports to listen on in each pod netns (HBONE inbound, plaintext
    /// inbound, outbound); Istio's by default.
    #[arg(long, value_delimiter = ',')]
    pub ports: Option<Vec<u16>>,
    /// Delay before the listeners open.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Close every listener after this long and stay up (enrollment lost).
    /// 0: only on SIGUSR1. SIGTERM closes them and exits.
    #[arg(long, default_value_t = 0)]
    pub close_after_ms: u64,
    /// comm to run under.
    #[arg(long, default_value = "ztunnel")]
    pub comm: String,
}

/// One listener opened in a pod's netns, served by a task that answers
/// every connection with one line (`ztunnel <port>`): a connect redirected
/// to it succeeds. (The real ztunnel proxies; the tests need only the
/// listener.)
struct Opened {
    netns: PathBuf,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(listener: tokio::net::TcpListener, port: u16) {
    use tokio::io::AsyncWriteExt as _;
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.write_all(format!("ztunnel {port}\n").as_bytes()).await;
        });
    }
}

fn announce(netns: &Path, addr: &SocketAddr, state: &str) {
    let v = serde_json::json!({
        "netns": netns.display().to_string(),
        "port": addr.port(),
        "family": if addr.is_ipv6() { "v6" } else { "v4" },
        "state": state,
    });
    println!("{v}");
    let _ = std::io::stdout().flush();
}

/// Creates sockets for `addrs` inside the netns at `path`, on a thread of
/// its own (setns is per thread), which returns to the caller's netns before
/// it ends, as ztunnel's does.
fn sockets_in(path: &Path, addrs: &[SocketAddr]) -> Result<Vec<Socket>> {
    let path = path.to_path_buf();
    let addrs = addrs.to_vec();
    std::thread::spawn(move || -> Result<Vec<Socket>> {
        let home = File::open("/proc/thread-self/ns/net").context("own netns")?;
        let pod = File::open(&path).with_context(|| format!("netns {}", path.display()))?;
        setns(pod, CloneFlags::CLONE_NEWNET).context("setns into the pod")?;
        let made: Result<Vec<Socket>> = addrs
            .iter()
            .map(|a| {
                let s = Socket::new(Domain::for_address(*a), Type::STREAM, None)?;
                if a.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.set_reuse_address(true)?;
                Ok(s)
            })
            .collect();
        setns(home, CloneFlags::CLONE_NEWNET).context("setns back")?;
        made
    })
    .join()
    .map_err(|_| anyhow!("socket thread panicked"))?
}

/// Opens the listeners: sockets made in each pod's netns, bound and
/// listened on from this (the caller's) netns.
fn open(args: &Args, ports: &[u16]) -> Result<Vec<Opened>> {
    let mut out = Vec::new();
    for netns in &args.netns {
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .flat_map(|&p| {
                [
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, p)),
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, p)),
                ]
            })
            .collect();
        for (socket, addr) in sockets_in(netns, &addrs)?.into_iter().zip(addrs) {
            socket
                .bind(&addr.into())
                .with_context(|| format!("bind {addr} in {}", netns.display()))?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(socket.into())?;
            announce(netns, &addr, "listen");
            out.push(Opened {
                netns: netns.clone(),
                addr,
                task: tokio::spawn(serve(listener, addr.port())),
            });
        }
    }
    Ok(out)
}

/// Closes every listener: its task is aborted, which drops it (the
/// handle resolves once it has).
async fn close(open: &mut Vec<Opened>) {
    if open.is_empty() {
        return;
    }
    for o in open.drain(..) {
        o.task.abort();
        let _ = o.task.await;
        announce(&o.netns, &o.addr, "closed");
    }
    println!("{{\"all_closed\":true}}");
    let _ = std::io::stdout().flush();
}

/// Runs the stand-in until SIGTERM.
pub fn run(args: Args) -> Result<()> {
    super::set_comm(&args.comm)?;
    let ports = args
        .ports
        .clone()
        .unwrap_or_else(|| super::mesh::ZTUNNEL_PORTS.to_vec());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
        // bind() and listen() run here, on the runtime's (main) thread, in
        // ztunnel's own netns.
        let mut opened = open(&args, &ports)?;
        println!("{{\"ready\":true}}");
        let _ = std::io::stdout().flush();
        let close_at = (args.close_after_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(args.close_after_ms));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = usr1.recv() => close(&mut opened).await,
                _ = async {
                    match close_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }, if !opened.is_empty() => close(&mut opened).await,
            }
        }
        close(&mut opened).await;
        Ok(())
    })
}
