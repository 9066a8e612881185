//! The stand-in server app of the inbound tests: it listens on its port
//! (late, at once, or on 127.0.0.1 only) and answers HTTP 200; on SIGTERM it
//! closes its listeners at once and exits after `--linger-ms`, like an app
//! without a preStop delay while endpoints still send it traffic.

use std::{io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Options of `connscope testbed app`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on (`0.0.0.0:8080`, `127.0.0.1:8080`); repeatable.
    #[arg(long = "addr", required = true)]
    pub addrs: Vec<SocketAddr>,
    /// Start-up time before the first listen.
    #[arg(long, default_value_t = 0)]
    pub listen_after_ms: u64,
    /// After SIGTERM closed the listeners, stay this long before exiting.
    #[arg(long, default_value_t = 0)]
    pub linger_ms: u64,
    #[arg(long, default_value = "app")]
    pub comm: String,
}

fn announce(addr: SocketAddr, state: &str) {
    println!(
        "{{\"port\":{},\"addr\":\"{addr}\",\"state\":\"{state}\"}}",
        addr.port()
    );
    let _ = std::io::stdout().flush();
}

/// Runs the app until SIGTERM.
pub fn run(args: Args) -> Result<()> {
    super::set_comm(&args.comm)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::time::sleep(Duration::from_millis(args.listen_after_ms)).await;
    let mut tasks = Vec::new();
    for &a in &args.addrs {
        let l = TcpListener::bind(a)
            .await
            .with_context(|| format!("bind {a}"))?;
        tasks.push(tokio::spawn(accept(l)));
        announce(a, "listen");
    }
    term.recv().await;
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    for &a in &args.addrs {
        announce(a, "closed");
    }
    tokio::time::sleep(Duration::from_millis(args.linger_ms)).await;
    Ok(())
}

async fn accept(l: TcpListener) {
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(answer(s));
    }
}

/// Reads the request head (bounded) and answers 200.
async fn answer(mut s: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\napp ok\n")
        .await;
    let _ = s.shutdown().await;
}
