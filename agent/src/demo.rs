//! `connscope demo`: a real simulated Istio pod on this machine, an
//! application that dials out at start-up while its sidecar is still waiting
//! for its capture listener, and the agent watching it all.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::testbed::net::Topology;

/// A child process terminated (SIGTERM, then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's stream, read on a thread.
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for {needle:?}");
        }
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return Ok(()),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("timed out waiting for {needle:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("process ended before {needle:?}"),
        }
    }
}

/// Runs the demo and prints what the agent saw.
pub fn run(sidecar_delay_ms: u64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("connscope-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let events = dir.join("events.json");
    println!(
        "connscope demo: a simulated Istio pod (network namespace with Istio's capture rules)"
    );

    let mut agent = Command::new(&exe)
        .args(["run", "--events"])
        .arg(&events)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    let agent_err = lines(agent.stderr.take().context("agent stderr")?);
    let agent = Proc(agent);
    wait_line(&agent_err, "probes attached", Duration::from_secs(60))?;
    println!("  agent: probes attached");

    let topo = Topology::create(200, true)?;
    let target = topo.upstream_addr(false, 8080);
    let mut up = topo.upstream.command(exe.to_str().context("exe path")?);
    up.args(["testbed", "serve", "--addr", &target.to_string()])
        .stdout(Stdio::piped());
    let mut up = up.spawn()?;
    let up_out = lines(up.stdout.take().context("upstream stdout")?);
    let _up = Proc(up);
    wait_line(&up_out, "ready", Duration::from_secs(10))?;
    println!("  upstream test host listening on {target}");

    let mut sc = topo.pod.command(exe.to_str().context("exe path")?);
    sc.args([
        "testbed",
        "sidecar",
        "--delay-ms",
        &sidecar_delay_ms.to_string(),
    ])
    .stdout(Stdio::piped());
    let mut sc = sc.spawn()?;
    let sc_out = lines(sc.stdout.take().context("sidecar stdout")?);
    let _sc = Proc(sc);
    println!(
        "  sidecar (uid 1337) started: 15021/15090 now, capture port 15001 after {sidecar_delay_ms} ms"
    );

    let app = topo
        .pod
        .command(exe.to_str().context("exe path")?)
        .args([
            "testbed",
            "dial",
            "--target",
            &target.to_string(),
            "--nonblocking",
        ])
        .args(["--attempts", "100", "--interval-ms", "100", "--comm", "app"])
        .output()?;
    let outcomes = crate::testbed::dial::parse_outcomes(&String::from_utf8_lossy(&app.stdout))?;
    let refused = outcomes.iter().filter(|o| !o.ok).count();
    println!(
        "  app dialed {target} at start-up: {refused} refused, then {}",
        if outcomes.last().is_some_and(|o| o.ok) {
            "connected"
        } else {
            "gave up"
        }
    );
    wait_line(&sc_out, "\"port\":15001", Duration::from_secs(5))?;

    // Let the agent drain, then stop it and read what it saw.
    let app_pid = outcomes.first().map(|o| o.pid).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let seen = loop {
        let evs = read(&events);
        let n = evs
            .iter()
            .filter(|e| e["type"] == "connect_failure" && e["pid"] == app_pid)
            .count();
        if n >= refused || Instant::now() > deadline {
            break evs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(agent);
    println!("\nWhat the kernel reported:");
    for e in seen.iter().filter(|e| {
        (e["type"] == "connect_failure" && e["pid"] == app_pid)
            || (e["type"] == "listen" && e["uid"] == 1337)
    }) {
        println!("  {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn read(p: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
