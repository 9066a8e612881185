//! The client of the inbound tests: a test host outside the pod sending
//! HTTP requests to `podIP:port` (captured to the sidecar's 15006), one
//! JSON line per request with the status it got. Bounded: a fixed number of
//! requests, each with a deadline.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::kernel::decode::Clock;

/// Options of `connscope testbed client`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The pod's address and the app's port.
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 20)]
    pub requests: u32,
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Per request: connect, write and each read.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// Stop after this many 200s (0: send every request).
    #[arg(long, default_value_t = 0)]
    pub stop_after_ok: u32,
}

/// One request, as printed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub seq: u32,
    /// 0: no HTTP answer (see `error`).
    pub status: u16,
    pub body: String,
    pub error: String,
    pub start_mono_ns: u64,
    pub end_mono_ns: u64,
}

/// The responses among a client's output lines.
pub fn responses(lines: &[String]) -> Vec<Response> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The status code of an HTTP status line (0 if it is none).
pub fn status_of(line: &str) -> u16 {
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Sends the requests.
pub fn run(args: Args) -> Result<()> {
    super::set_comm("client")?;
    let mut ok = 0;
    for seq in 0..args.requests {
        if seq > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let start = Clock::mono_now();
        let (status, body, error) = match request(&args) {
            Ok(text) => {
                let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                (status_of(head), body.to_string(), String::new())
            }
            Err(e) => (0, String::new(), e.to_string()),
        };
        ok += u32::from(status == 200);
        let r = Response {
            seq,
            status,
            body,
            error,
            start_mono_ns: start,
            end_mono_ns: Clock::mono_now(),
        };
        println!("{}", serde_json::to_string(&r)?);
        std::io::stdout().flush()?;
        if args.stop_after_ok > 0 && ok >= args.stop_after_ok {
            break;
        }
    }
    Ok(())
}

fn request(args: &Args) -> std::io::Result<String> {
    let timeout = super::slow(Duration::from_millis(args.timeout_ms));
    let mut s = TcpStream::connect_timeout(&args.target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        args.target
    )?;
    let mut text = String::new();
    s.take(64 * 1024).read_to_string(&mut text)?;
    Ok(text)
}
