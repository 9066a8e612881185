//! The HTTP server of the endpoints, on a thread of its own so that no
//! request, however many or slow, runs on the pipeline's thread.
//!
//! Limits, so that outside clients cannot exhaust the agent:
//! - at most `max_connections` open connections (well under the fd limit).
//!   When full, a new connection takes the place of the oldest one that has
//!   not yet sent a whole request (so the kubelet's probes still get in
//!   during a flood of half-sent requests); if every connection is busy, the
//!   new one is closed at once;
//! - a header-read timeout: a request's head must arrive within
//!   `header_timeout` of the connection starting to wait for it, which is
//!   also how long a keep-alive connection may sit idle;
//! - `TCP_USER_TIMEOUT`: a peer that stops reading (or vanished) while an
//!   answer or a follow stream is being written is dropped by the kernel
//!   after `stall_timeout`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::IntCounterVec;
use tokio::task::AbortHandle;

/// The server's limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub stall_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// One open connection.
struct Conn {
    /// No request seen yet on it (a half-sent request, or nothing at all).
    fresh: Arc<AtomicBool>,
    task: AbortHandle,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Conns {
    next: u64,
    open: BTreeMap<u64, Conn>,
}

impl Conns {
    /// Makes room for one more connection: `Some(evicted)` when it may be
    /// served (`evicted`: whether a fresh connection was closed for it),
    /// `None` when every connection is busy.
    fn admit(&mut self, max: usize) -> Option<bool> {
        if self.open.len() < max {
            return Some(false);
        }
        self.open.retain(|_, c| !c.task.is_finished());
        if self.open.len() < max {
            return Some(false);
        }
        let oldest_fresh = self
            .open
            .iter()
            .find(|(_, c)| c.fresh.load(Ordering::Relaxed))
            .map(|(id, _)| *id)?;
        if let Some(c) = self.open.remove(&oldest_fresh) {
            c.task.abort();
        }
        Some(true)
    }
}

/// Removes a connection from the table when its task ends.
struct Registered {
    conns: Arc<Mutex<Conns>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.open.remove(&self.id);
    }
}

/// Binds the endpoints' address (before privileges are dropped, so that a
/// bad address stops the agent at once).
pub(crate) fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("binding --metrics-addr {addr}: {e}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `app` on `listener` until the process exits, on a new thread with
/// its own runtime. `setup` runs first on that runtime (building what the
/// router needs, e.g. the API client of the auth layer); its error is
/// returned here.
pub(crate) fn spawn<F, Fut>(
    listener: std::net::TcpListener,
    limits: ServerLimits,
    dropped: IntCounterVec,
    setup: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<Router>>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let started = async {
                    let app = setup().await?;
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    anyhow::Ok((app, listener))
                };
                match started.await {
                    Ok((app, listener)) => {
                        let _ = tx.send(Ok(()));
                        accept(listener, app, limits, dropped).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
    rx.recv()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the HTTP thread ended while starting")))
}

/// Accepts connections and serves each on its own task, within the limits.
async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServerLimits,
    dropped: IntCounterVec,
) {
    let conns = Arc::new(Mutex::new(Conns::default()));
    let mut accept_errors = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: wait rather than spin.
                accept_errors += 1;
                if accept_errors.is_power_of_two() {
                    tracing::warn!(error = %e, errors = accept_errors, "accepting an HTTP connection");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut table = conns.lock().unwrap_or_else(PoisonError::into_inner);
        match table.admit(limits.max_connections) {
            Some(evicted) => {
                if evicted {
                    dropped.with_label_values(&["evicted"]).inc();
                }
            }
            None => {
                dropped.with_label_values(&["over_limit"]).inc();
                continue;
            }
        }
        let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(limits.stall_timeout));
        let id = table.next;
        table.next += 1;
        let fresh = Arc::new(AtomicBool::new(true));
        let registered = Registered {
            conns: conns.clone(),
            id,
        };
        let service = {
            let fresh = fresh.clone();
            let inner = TowerToHyperService::new(app.clone());
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                fresh.store(false, Ordering::Relaxed);
                hyper::service::Service::call(&inner, req)
            })
        };
        let task = tokio::spawn(async move {
            let _registered = registered;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            // Errors here are the client's (reset, timeout, garbage).
            let _ = conn.await;
        });
        table.open.insert(
            id,
            Conn {
                fresh,
                task: task.abort_handle(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use axum::routing::get;
    use prometheus::Opts;

    use super::*;

    fn get_path(port: u16, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// A server with a tiny connection cap and header timeout.
    fn server(max: usize, header_ms: u64) -> (u16, IntCounterVec) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let dropped = IntCounterVec::new(Opts::new("d", "d"), &["reason"]).unwrap();
        spawn(
            listener,
            ServerLimits {
                max_connections: max,
                header_timeout: Duration::from_millis(header_ms),
                stall_timeout: Duration::from_secs(5),
            },
            dropped.clone(),
            || async { Ok(Router::new().route("/healthz", get(|| async { "ok\n" }))) },
        )
        .unwrap();
        (port, dropped)
    }

    /// Connections that sent half a request and wait.
    fn half_sent(port: u16, n: usize) -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
                s
            })
            .collect()
    }

    #[test]
    fn a_full_server_still_answers_by_closing_the_oldest_half_sent_connection() {
        let (port, dropped) = server(8, 60_000);
        let mut flood = half_sent(port, 8);
        std::thread::sleep(Duration::from_millis(200));
        let answer = get_path(port, "/healthz");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(dropped.with_label_values(&["evicted"]).get(), 1);
        // The oldest was the one closed.
        flood[0]
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(flood[0].read(&mut buf), Ok(0) | Err(_)));
    }

    #[test]
    fn half_sent_requests_are_closed_after_the_header_timeout() {
        let (port, _) = server(64, 300);
        let mut flood = half_sent(port, 4);
        let t0 = std::time::Instant::now();
        for s in &mut flood {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            // hyper answers 408 or just closes; either way the socket ends.
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(get_path(port, "/healthz").starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn busy_connections_are_never_evicted() {
        let mut c = Conns::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        for id in 0..2 {
            let task = rt.spawn(std::future::pending::<()>());
            c.open.insert(
                id,
                Conn {
                    fresh: Arc::new(AtomicBool::new(false)),
                    task: task.abort_handle(),
                },
            );
        }
        assert_eq!(c.admit(3), Some(false), "room left");
        assert_eq!(c.admit(2), None, "full of busy connections: refused");
        c.open[&1].fresh.store(true, Ordering::Relaxed);
        assert_eq!(c.admit(2), Some(true));
        assert_eq!(c.open.len(), 1);
        assert!(c.open.contains_key(&0), "the busy one stays");
    }
}
