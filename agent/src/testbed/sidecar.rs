//! The stand-in sidecar. Like Envoy under pilot-agent it runs as uid/gid
//! 1337 (so its own connects are exempt from capture), opens the admin/stats
//! listeners at once and the capture listeners (15001 outbound, 15006
//! inbound) only later, as if they arrived over xDS; connections to 15001 are
//! forwarded to their SO_ORIGINAL_DST, those to 15006 to the app as Envoy's
//! inbound passthrough does (`inbound.rs`). Its uid, ports, comm and inbound
//! source are arguments, so it also stands in for the other meshes' proxies
//! (`rules.rs`).

use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use super::mesh::InboundSource;

/// Options of `connscope testbed sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Run as this uid and gid (Istio's proxy user).
    #[arg(long, default_value_t = 1337)]
    pub uid: u32,
    /// Listeners opened at start (health 15021, stats 15090).
    #[arg(long, value_delimiter = ',', default_value = "15021,15090")]
    pub early_ports: Vec<u16>,
    /// Capture listeners opened after --delay-ms (outbound first).
    #[arg(long, value_delimiter = ',', default_value = "15001,15006")]
    pub capture_ports: Vec<u16>,
    /// Delay before the capture listeners open (the xDS push).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Close the capture listeners after this long (a sidecar that exits
    /// first, for shutdown-race tests). 0: never.
    #[arg(long, default_value_t = 0)]
    pub exit_after_ms: u64,
    /// comm to run under.
    #[arg(long, default_value = "envoy")]
    pub comm: String,
    /// Which capture listener is the inbound one (Istio's 15006; Linkerd
    /// 4143, Consul 20000): its connections are forwarded to the app.
    #[arg(long, default_value_t = crate::race::istio::INBOUND_CAPTURE_PORT)]
    pub inbound_port: u16,
    /// Where the proxy dials the app from (Istio's and Kuma's 127.0.0.6,
    /// Linkerd's pod IP, Consul's 127.0.0.1).
    #[arg(long, value_enum, default_value_t = InboundSource::Passthrough)]
    pub inbound_source: InboundSource,
    /// Name of the thread that dials the app (Envoy's first worker;
    /// linkerd2-proxy's tokio workers are `proxy`).
    #[arg(long, default_value = super::inbound::WORKER_THREAD)]
    pub worker_comm: String,
}

/// Runs the sidecar until SIGTERM (or --exit-after-ms).
pub fn run(args: Args) -> Result<()> {
    super::set_comm(&args.comm)?;
    drop_to(args.uid)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

/// Becomes uid and gid `id` (Istio's proxy user), dropping root.
pub(super) fn drop_to(id: u32) -> Result<()> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let (g, u) = (Gid::from_raw(id), Uid::from_raw(id));
    setgroups(&[g]).context("setgroups")?;
    setresgid(g, g, g).context("setresgid")?;
    setresuid(u, u, u).context("setresuid")?;
    Ok(())
}

fn announce(port: u16, state: &str) {
    println!("{{\"port\":{port},\"state\":\"{state}\"}}");
    let _ = std::io::stdout().flush();
}

/// Listens on 0.0.0.0 and, v6-only, on [::] (as Envoy's listeners do).
fn listen(port: u16) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ] {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())
            .with_context(|| format!("bind {addr}"))?;
        s.listen(1024)?;
        out.push(TcpListener::from_std(s.into())?);
    }
    Ok(out)
}

async fn serve(args: Args) -> Result<()> {
    let mut early = Vec::new();
    for &p in &args.early_ports {
        for l in listen(p)? {
            early.push(tokio::spawn(answer(l)));
        }
        announce(p, "listen");
    }
    tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
    let mut capture = Vec::new();
    let (stop_inbound, stopped) = tokio::sync::watch::channel(false);
    let mut inbound = None;
    for &p in &args.capture_ports {
        let ls = listen(p)?;
        if p == args.inbound_port {
            let std_ls = ls
                .into_iter()
                .map(|l| l.into_std())
                .collect::<std::io::Result<Vec<_>>>()?;
            let how = super::inbound::Forwarding {
                source: args.inbound_source,
                worker: args.worker_comm.clone(),
            };
            inbound = Some(super::inbound::spawn(std_ls, stopped.clone(), how)?);
        } else {
            for l in ls {
                capture.push(tokio::spawn(forward(l)));
            }
        }
        announce(p, "listen");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if args.exit_after_ms > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.exit_after_ms)) => {}
            _ = term.recv() => {}
        }
    } else {
        term.recv().await;
    }
    for t in capture {
        t.abort();
        let _ = t.await;
    }
    let _ = stop_inbound.send(true);
    if let Some(t) = inbound {
        let _ = t.join();
    }
    for &p in &args.capture_ports {
        announce(p, "closed");
    }
    // Like Envoy draining: the admin listeners go last, with the process.
    Ok(())
}

/// Health/stats listeners: accept and answer.
async fn answer(l: TcpListener) {
    use tokio::io::AsyncWriteExt as _;
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.write_all(b"sidecar ok\n").await;
    }
}

/// Capture listener: forward each connection to where it was going.
async fn forward(l: TcpListener) {
    while let Ok((client, _)) = l.accept().await {
        tokio::spawn(async move {
            let Ok(dst) = original_dst(&client) else {
                return;
            };
            let Ok(Ok(mut upstream)) =
                tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(dst)).await
            else {
                return;
            };
            let mut client = client;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}

/// Where the application was dialing before REDIRECT.
pub fn original_dst(s: &TcpStream) -> Result<SocketAddr> {
    if s.local_addr()?.is_ipv4() {
        let a = getsockopt(&s.as_fd(), sockopt::OriginalDst)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        )))
    } else {
        let a = getsockopt(&s.as_fd(), sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
            0,
            0,
        )))
    }
}
