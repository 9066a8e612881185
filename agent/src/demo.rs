//! `connscope demo`: a real simulated Istio pod on this machine (network
//! namespace with Istio's capture rules, kubelet-shaped cgroups, runtime
//! metadata files), an application that dials out at start-up while its
//! sidecar waits for its outbound listener, and the agent telling what
//! happened, ending with `connscope explain`'s view of the pod (read from
//! the demo agent's `/events`, in process). Everything is removed afterwards.
//! `--inbound` shows the mirror image (`inbound.rs`).

mod inbound;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    attribute::runtime::Roots,
    testbed::{
        pod::cgroup2_root,
        scenario::{App, Proc, SimPod},
    },
};

fn read(p: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Which race the demo shows.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// The app dials before the sidecar listens on 15001; the sidecar's
    /// outbound listener opens after this many ms.
    Outbound { sidecar_delay_ms: u64 },
    /// Requests reach the pod before the app listens; the app listens
    /// after this many ms.
    Inbound { app_delay_ms: u64 },
}

/// Runs the demo and prints the verdict.
pub fn run(direction: Direction) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo creates network namespaces and cgroups and loads eBPF programs: run it as root"
        );
    }
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("connscope-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = match direction {
        Direction::Outbound { sidecar_delay_ms } => demo(&exe, &dir, sidecar_delay_ms),
        Direction::Inbound { app_delay_ms } => inbound::demo(&exe, &dir, app_delay_ms),
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo(exe: &std::path::Path, dir: &std::path::Path, delay_ms: u64) -> Result<()> {
    let roots = Roots {
        containerd: dir.join("containerd"),
        crio: dir.join("crio"),
    };
    let events = dir.join("events.json");
    println!("connscope demo: a simulated Istio pod on this machine\n");
    // A port of its own: another agent may hold the default one.
    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut agent = start_agent(exe, &roots, &events, http)?;
    println!("  agent        probes attached (connect failures, listeners, processes, cgroups)");

    let mut pod = SimPod::create(
        exe,
        200,
        &cgroup2_root()?,
        &roots,
        "shop",
        "checkout-7d9f8c6b5-x2k4p",
        true,
    )?;
    println!("  pod          shop/checkout-7d9f8c6b5-x2k4p: containers app + istio-proxy,");
    println!("               Istio's iptables capture rules (outbound -> 15001, uid 1337 exempt)");
    println!("  upstream     test host at {}", pod.upstream());
    pod.start_sidecar(delay_ms, 0)?;
    pod.wait_sidecar(15021, "listen", Duration::from_secs(10))?;
    println!(
        "  istio-proxy  started as uid 1337: 15021/15090 now, outbound 15001 after {delay_ms} ms (xDS)"
    );
    let attempts = pod.run_app(&App::default())?;
    let refused = attempts.iter().filter(|o| !o.ok).count();
    println!(
        "  app          dialed {} at start-up: {refused} refused, then {}",
        pod.upstream(),
        if attempts.last().is_some_and(|o| o.ok) {
            "connected through the sidecar"
        } else {
            "gave up"
        }
    );
    let uid = pod.pod.uid.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !read(&events)
            .iter()
            .any(|e| e["pod_uid"] == uid.as_str() && e["type"] == "startup_race")
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // What on-call would run against this node's agent.
    let (namespace, name) = (pod.pod.namespace.clone(), pod.pod.name.clone());
    let mut view = Vec::new();
    let explained = crate::explain::run(
        &crate::explain::Args::for_pod(&format!("http://{http}"), &namespace, &name),
        &mut view,
    );
    agent.stop();
    drop(pod);
    verdict(&read(&events), &uid, refused)?;
    println!("\n$ connscope explain --namespace {namespace} --pod {name}\n");
    match explained {
        Ok(()) => {
            print!("{}", String::from_utf8_lossy(&view));
            Ok(())
        }
        Err(f) => bail!("connscope explain failed: {f}"),
    }
}

/// Starts the agent writing events to `events`, and waits for its probes.
fn start_agent(
    exe: &std::path::Path,
    roots: &Roots,
    events: &std::path::Path,
    http: std::net::SocketAddr,
) -> Result<AgentProc> {
    let mut agent = Command::new(exe);
    agent
        .args([
            "run",
            "--kubernetes",
            "off",
            "--hold-seconds",
            "1",
            "--http-auth",
            "none",
            "--metrics-addr",
            &http.to_string(),
            "--events",
        ])
        .arg(events)
        .arg("--containerd-root")
        .arg(&roots.containerd)
        .arg("--crio-root")
        .arg(&roots.crio)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = agent.spawn().context("starting the agent")?;
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().context("agent stderr")?;
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let agent = AgentProc(Some(child));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("probes attached") => return Ok(agent),
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the agent exited during start-up"),
        }
        if Instant::now() > deadline {
            bail!("the agent did not attach its probes within 60 s");
        }
    }
}

/// Prints what the agent said of the pod `uid`, whose app was refused
/// `refused` times.
fn verdict(evs: &[Value], uid: &str, refused: usize) -> Result<()> {
    let of_pod = |t: &str| {
        evs.iter()
            .find(|e| e["pod_uid"] == uid && e["type"] == t)
            .cloned()
    };
    let phases: Vec<String> = evs
        .iter()
        .filter(|e| e["pod_uid"] == uid && e["type"] == "connect_failure")
        .map(|e| e["phase"].as_str().unwrap_or("?").to_string())
        .collect();
    println!();
    let Some(s) = of_pod("startup_race") else {
        if refused == 0 {
            println!("VERDICT  no race: the app was never refused");
            return Ok(());
        }
        bail!("the app was refused {refused} times but the agent reported no startup_race summary");
    };
    println!(
        "VERDICT  sidecar startup race in {}/{} ({} {})",
        s["namespace"].as_str().unwrap_or("?"),
        s["pod"].as_str().unwrap_or("?"),
        s["workload_kind"].as_str().unwrap_or("workload"),
        s["workload"].as_str().unwrap_or("?")
    );
    println!(
        "  {} connect()s refused over {:.3} s before istio-proxy listened on 15001 (kernel timestamps)",
        s["refused"],
        s["window_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    println!("  destinations: {}", s["destinations"]);
    if let Some(p) = s["sidecar_start_to_ready_seconds"].as_f64() {
        println!("  sidecar start -> outbound listener: {p:.3} s");
    }
    println!(
        "  every refusal classified: {} of {} as startup_race",
        phases.iter().filter(|p| *p == "startup_race").count(),
        phases.len()
    );
    let m = &s["mitigation"];
    let m: crate::race::Mitigation = serde_json::from_value(m.clone()).unwrap_or_default();
    println!(
        "  mitigation in effect: {}",
        crate::race::Profiles::builtin()
            .default_profile()
            .mitigation_label(&m)
    );
    println!(
        "  recommendation: {}",
        s["recommendation"].as_str().unwrap_or("")
    );
    println!("\nsummary event:\n{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// The agent child: SIGTERM and wait on stop or drop.
struct AgentProc(Option<std::process::Child>);

impl AgentProc {
    fn stop(&mut self) {
        if let Some(c) = self.0.take() {
            let mut p = Proc::adopt(c);
            p.terminate(Duration::from_secs(10));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
    }
}
