//! The stand-in sidecar's inbound side, as Envoy does it: connections
//! redirected to 15006 are read for their request, their original
//! destination (`SO_ORIGINAL_DST`) is dialed non-blocking from 127.0.0.6
//! (Istio >= 1.10's `inbound|passthrough`, exempt from capture), and a
//! refused dial is answered with Envoy's 503 (response flag `UF`). It runs
//! on a thread named like an Envoy worker, so the agent must tell the proxy
//! by uid and container, never by comm. For the other meshes the source and
//! the thread's name change (`Forwarding`): Linkerd dials the pod IP with no
//! bind from threads named `proxy`, Consul dials 127.0.0.1.
//!
//! Every dial prints one JSON line with the running totals: the tests'
//! expected counts are what this proxy itself counted.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

use super::mesh::InboundSource;
use crate::race::istio::{INBOUND_SOURCE_V4, INBOUND_SOURCE_V6};

/// Name of the thread that dials the app (Envoy's first worker).
pub const WORKER_THREAD: &str = "wrk:worker_0";

/// The body Envoy sends with its 503 when the app refused the connect.
pub const UF_BODY: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: delayed connect error: 111";

/// One inbound dial, as the sidecar prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dial {
    /// `refused`, `proxied` or `error`.
    pub inbound: String,
    pub dst: String,
    pub errno: i32,
    /// Refused dials so far, this one included.
    pub refused_total: u64,
    pub proxied_total: u64,
}

/// The inbound dials among a sidecar's output lines.
pub fn dials(lines: &[String]) -> Vec<Dial> {
    lines
        .iter()
        .filter(|l| l.contains("\"inbound\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// How many dials the sidecar saw refused, by its own count.
pub fn refused_count(lines: &[String]) -> u64 {
    dials(lines)
        .iter()
        .map(|d| d.refused_total)
        .max()
        .unwrap_or(0)
}

/// How the proxy dials the app: from where, on which thread.
#[derive(Debug, Clone)]
pub struct Forwarding {
    pub source: InboundSource,
    /// The dialing thread's name (its comm).
    pub worker: String,
}

impl Default for Forwarding {
    /// Envoy's, as Istio runs it.
    fn default() -> Self {
        Forwarding {
            source: InboundSource::Passthrough,
            worker: WORKER_THREAD.into(),
        }
    }
}

static REFUSED: AtomicU64 = AtomicU64::new(0);
static PROXIED: AtomicU64 = AtomicU64::new(0);

/// Serves the inbound listeners on a worker thread until `stop` turns
/// true, then closes them (the caller joins the thread).
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    stop: watch::Receiver<bool>,
    how: Forwarding,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(how.worker.clone())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("inbound worker: {e}");
                    return;
                }
            };
            rt.block_on(serve(listeners, stop, how.source));
        })
        .context("spawning the inbound worker")
}

async fn serve(
    listeners: Vec<std::net::TcpListener>,
    mut stop: watch::Receiver<bool>,
    source: InboundSource,
) {
    let mut tasks = Vec::new();
    for l in listeners {
        match TcpListener::from_std(l) {
            Ok(l) => tasks.push(tokio::spawn(accept(l, source))),
            Err(e) => eprintln!("inbound listener: {e}"),
        }
    }
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
}

async fn accept(l: TcpListener, source: InboundSource) {
    while let Ok((client, _)) = l.accept().await {
        tokio::spawn(async move {
            if let Err(e) = handle(client, source).await {
                eprintln!("inbound: {e:#}");
            }
        });
    }
}

/// Reads the request head (bounded), the way an HTTP proxy does before it
/// picks and dials its upstream.
async fn read_head(client: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + super::slow(Duration::from_secs(5));
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
            .await
            .context("request head timed out")??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// Where the proxy dials the app for a connection to `orig`: the original
/// destination, except Consul's, which dials loopback at the same port.
pub fn app_target(orig: SocketAddr, source: InboundSource) -> SocketAddr {
    match (source, orig.ip()) {
        (InboundSource::Loopback, IpAddr::V4(_)) => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), orig.port())
        }
        (InboundSource::Loopback, IpAddr::V6(_)) => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), orig.port())
        }
        _ => orig,
    }
}

/// Dials `dst` non-blocking, bound first to the passthrough source when the
/// proxy binds one (Envoy's 127.0.0.6); else from the kernel's choice.
async fn dial_app(dst: SocketAddr, source: InboundSource) -> std::io::Result<TcpStream> {
    let sock = match dst.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if source == InboundSource::Passthrough {
        let src = match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(INBOUND_SOURCE_V4),
            IpAddr::V6(_) => IpAddr::V6(INBOUND_SOURCE_V6),
        };
        sock.bind(SocketAddr::new(src, 0))?;
    }
    match tokio::time::timeout(super::slow(Duration::from_secs(3)), sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT)),
    }
}

fn report(kind: &str, dst: SocketAddr, errno: i32) {
    let d = Dial {
        inbound: kind.into(),
        dst: dst.to_string(),
        errno,
        refused_total: REFUSED.load(Ordering::SeqCst),
        proxied_total: PROXIED.load(Ordering::SeqCst),
    };
    if let Ok(l) = serde_json::to_string(&d) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{l}");
        let _ = out.flush();
    }
}

async fn handle(mut client: TcpStream, source: InboundSource) -> Result<()> {
    let dst = app_target(super::sidecar::original_dst(&client)?, source);
    let head = read_head(&mut client).await?;
    match dial_app(dst, source).await {
        Ok(mut app) => {
            app.write_all(&head).await?;
            let _ = tokio::time::timeout(
                super::slow(Duration::from_secs(10)),
                tokio::io::copy_bidirectional(&mut client, &mut app),
            )
            .await;
            PROXIED.fetch_add(1, Ordering::SeqCst);
            report("proxied", dst, 0);
        }
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            if errno == libc::ECONNREFUSED {
                REFUSED.fetch_add(1, Ordering::SeqCst);
                report("refused", dst, errno);
            } else {
                report("error", dst, errno);
            }
            // Counted and printed before the client has its answer: once
            // the client holds a 503, the count includes it.
            let body = if errno == libc::ECONNREFUSED {
                UF_BODY.to_string()
            } else {
                format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: delayed connect error: {errno}"
                )
            };
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nserver: envoy\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(resp.as_bytes()).await?;
            let _ = client.shutdown().await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_the_highest_running_total() {
        let lines: Vec<String> = [
            r#"{"port":15006,"state":"listen"}"#,
            r#"{"inbound":"refused","dst":"10.0.0.2:8080","errno":111,"refused_total":1,"proxied_total":0}"#,
            r#"{"inbound":"refused","dst":"10.0.0.2:8080","errno":111,"refused_total":2,"proxied_total":0}"#,
            r#"{"inbound":"proxied","dst":"10.0.0.2:8080","errno":0,"refused_total":2,"proxied_total":1}"#,
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(refused_count(&lines), 2);
        assert_eq!(dials(&lines).len(), 3);
        assert!(UF_BODY.contains("delayed connect error: 111"));
    }

    #[test]
    fn consul_dials_loopback_at_the_original_port() {
        let orig: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert_eq!(
            app_target(orig, InboundSource::Loopback),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(app_target(orig, InboundSource::PodIp), orig);
        assert_eq!(app_target(orig, InboundSource::Passthrough), orig);
        let v6: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        assert_eq!(
            app_target(v6, InboundSource::Loopback),
            "[::1]:8080".parse().unwrap()
        );
    }
}
