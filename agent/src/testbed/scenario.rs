//! A whole simulated pod for the demo and the end-to-end tests: its network
//! namespace (Istio's capture rules when injected, or another mesh's from
//! `rules.rs`), kubelet-shaped cgroups, runtime metadata, an upstream test
//! host, the stand-in sidecar in the proxy container (istio-proxy,
//! linkerd-proxy...) and the application in the app container.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{
    dial::{Outcome, parse_outcomes},
    mesh::{Kind, MeshBed},
    net::Topology,
    pod::{Flavor, Pod},
};
use crate::{attribute::kubelet::Qos, attribute::runtime::Roots};

/// Port the upstream test host serves on.
pub const UPSTREAM_PORT: u16 = 8080;
/// Port the pod's server app listens on (inbound tests).
pub const APP_PORT: u16 = 8080;

/// How the stand-in server app of the inbound tests behaves.
#[derive(Debug, Clone, Default)]
pub struct Server {
    /// Start-up time before it listens.
    pub listen_after_ms: u64,
    /// Listen on 127.0.0.1 only (the proxy dials the pod IP: IST0143).
    pub loopback_only: bool,
    /// After SIGTERM closed its listener, stay this long.
    pub linger_ms: u64,
}

/// A child process with its stdout lines, terminated on drop.
pub struct Proc {
    pub child: Child,
    lines: Option<mpsc::Receiver<String>>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Spawns with stdout captured.
    pub fn spawn(mut cmd: Command) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            lines: Some(rx),
            seen: Vec::new(),
        })
    }

    /// Wraps a child whose output is not read here.
    pub fn adopt(child: Child) -> Proc {
        Proc {
            child,
            lines: None,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a stdout line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let timeout = super::slow(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return Ok(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no line with {needle:?} within {timeout:?}; saw {:?}",
                    self.seen
                );
            }
            match self.lines.as_ref().context("no stdout")?.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("process ended before {needle:?}; saw {:?}", self.seen)
                }
            }
        }
    }

    /// Every line printed so far (without waiting).
    pub fn lines(&mut self) -> &[String] {
        if let Some(rx) = &self.lines {
            while let Ok(l) = rx.try_recv() {
                self.seen.push(l);
            }
        }
        &self.seen
    }

    /// Waits (bounded) until the lines printed so far satisfy `done`.
    pub fn wait_lines(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) -> Result<()> {
        let timeout = super::slow(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if done(self.lines()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {timeout:?}; saw {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Collects every line until the process exits (bounded).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let timeout = super::slow(timeout);
        let deadline = Instant::now() + timeout;
        let rx = self.lines.take().context("no stdout")?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("process did not exit within {timeout:?}");
            }
            match rx.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        let _ = self.child.wait();
        Ok(self.seen.clone())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + super::slow(grace);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate(Duration::from_secs(3));
        }
    }
}

/// How the stand-in application behaves.
#[derive(Debug, Clone)]
pub struct App {
    pub attempts: u32,
    pub interval_ms: u64,
    pub nonblocking: bool,
    /// Dial this instead of the upstream host.
    pub target: Option<String>,
    /// Keep dialing after a success.
    pub keep_going: bool,
    /// An AF_INET6 socket dialing IPv4 targets in IPv4-mapped form.
    pub dual_stack: bool,
}

impl Default for App {
    fn default() -> Self {
        App {
            attempts: 100,
            interval_ms: 100,
            nonblocking: true,
            target: None,
            keep_going: false,
            dual_stack: false,
        }
    }
}

/// A simulated pod. Field order is drop order: processes first.
pub struct SimPod {
    pub sidecar: Option<Proc>,
    upstream: Proc,
    pub pod: Pod,
    pub topo: Topology,
    exe: PathBuf,
    /// The mesh whose rules and proxy container the pod has (None: not injected).
    pub mesh: Option<MeshBed>,
}

impl SimPod {
    /// Builds the pod; `injected` adds Istio's rules and an istio-proxy container.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        exe: &Path,
        tag: u8,
        cgroup_root: &Path,
        roots: &Roots,
        namespace: &str,
        name: &str,
        injected: bool,
    ) -> Result<SimPod> {
        let mesh = injected.then(MeshBed::istio);
        SimPod::create_in_mesh(exe, tag, cgroup_root, roots, namespace, name, mesh)
    }

    /// Builds the pod injected by `mesh` (its capture rules and its proxy
    /// container, `rules.rs`), or not injected (None).
    #[allow(clippy::too_many_arguments)]
    pub fn create_in_mesh(
        exe: &Path,
        tag: u8,
        cgroup_root: &Path,
        roots: &Roots,
        namespace: &str,
        name: &str,
        mesh: Option<MeshBed>,
    ) -> Result<SimPod> {
        let istio = mesh.as_ref().is_some_and(|m| m.kind == Kind::Istio);
        let topo = Topology::create(tag, istio)?;
        let mut containers = vec!["app"];
        if let Some(m) = &mesh {
            if !istio {
                topo.install_mesh_rules(m)?;
            }
            containers.push(&m.container);
        }
        let pod = Pod::create(
            cgroup_root,
            roots,
            Flavor::Containerd,
            Qos::Burstable,
            namespace,
            name,
            &containers,
        )?;
        let mut up = topo.upstream.command(exe.to_str().context("exe path")?);
        up.args(["testbed", "serve"]);
        for v6 in [false, true] {
            up.args(["--addr", &topo.upstream_addr(v6, UPSTREAM_PORT).to_string()]);
        }
        let mut upstream = Proc::spawn(up)?;
        upstream.wait_line("ready", Duration::from_secs(10))?;
        Ok(SimPod {
            sidecar: None,
            upstream,
            pod,
            topo,
            exe: exe.to_path_buf(),
            mesh,
        })
    }

    /// The upstream address the app dials by default.
    pub fn upstream(&self) -> String {
        self.topo.upstream_addr(false, UPSTREAM_PORT).to_string()
    }

    /// A command run inside a container: its cgroup and the pod's netns.
    pub fn in_container(&self, container: &str, args: &[&str]) -> Result<Command> {
        let cg = &self.pod.container(container)?.cgroup;
        let mut c = Command::new(&self.exe);
        c.args([
            "testbed",
            "enter",
            "--netns",
            &self.topo.pod.name,
            "--cgroup",
        ])
        .arg(cg)
        .arg("--")
        .arg(&self.exe)
        .args(args);
        Ok(c)
    }

    /// Starts the stand-in sidecar in the proxy container: for Istio
    /// 15021/15090 at once, 15001/15006 after `delay_ms`; for another mesh
    /// its early ports at once, its outbound and inbound ports after
    /// `delay_ms`, as its uid and comm. Gone after `exit_after_ms` (0: never).
    pub fn start_sidecar(&mut self, delay_ms: u64, exit_after_ms: u64) -> Result<()> {
        let m = self
            .mesh
            .clone()
            .context("the pod has no proxy container")?;
        let d = delay_ms.to_string();
        let e = exit_after_ms.to_string();
        let mut args = vec![
            "testbed".to_string(),
            "sidecar".into(),
            "--delay-ms".into(),
            d,
            "--exit-after-ms".into(),
            e,
        ];
        // Istio's sidecar runs on the defaults, as it always has.
        if m != MeshBed::istio() {
            let ports = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            let source = clap::ValueEnum::to_possible_value(&m.inbound_source)
                .context("inbound source")?
                .get_name()
                .to_string();
            args.extend([
                "--uid".into(),
                m.uid.to_string(),
                "--early-ports".into(),
                ports(&m.early_ports),
                "--capture-ports".into(),
                ports(&[m.outbound_port, m.inbound_port]),
                "--inbound-port".into(),
                m.inbound_port.to_string(),
                "--inbound-source".into(),
                source,
                "--comm".into(),
                m.comm.clone(),
                "--worker-comm".into(),
                m.worker_comm.clone(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.in_container(&m.container, &args)?;
        self.sidecar = Some(Proc::spawn(cmd)?);
        Ok(())
    }

    /// Waits until the sidecar reports a port's state (`listen`/`closed`).
    pub fn wait_sidecar(&mut self, port: u16, state: &str, timeout: Duration) -> Result<()> {
        let s = self.sidecar.as_mut().context("no sidecar")?;
        s.wait_line(&format!("\"port\":{port},\"state\":\"{state}\""), timeout)?;
        Ok(())
    }

    fn app_command(&self, app: &App) -> Result<Command> {
        let target = app.target.clone().unwrap_or_else(|| self.upstream());
        let attempts = app.attempts.to_string();
        let interval = app.interval_ms.to_string();
        let mut args = vec![
            "testbed",
            "dial",
            "--comm",
            "app",
            "--target",
            &target,
            "--attempts",
            &attempts,
            "--interval-ms",
            &interval,
        ];
        if app.nonblocking {
            args.push("--nonblocking");
        }
        if app.keep_going {
            args.push("--keep-going");
        }
        if app.dual_stack {
            args.push("--dual-stack");
        }
        self.in_container("app", &args)
    }

    /// Runs the app to completion (bounded) and returns its attempts.
    pub fn run_app(&self, app: &App) -> Result<Vec<Outcome>> {
        let out = self.app_command(app)?.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("app failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        parse_outcomes(&String::from_utf8_lossy(&out.stdout))
    }

    /// Starts the app in the background (its attempts come with `wait_exit`).
    pub fn spawn_app(&self, app: &App) -> Result<Proc> {
        Proc::spawn(self.app_command(app)?)
    }

    /// The pod's IPv4 address and `port`: what a client outside dials.
    pub fn pod_addr(&self, port: u16) -> std::net::SocketAddr {
        (self.topo.pod_v4, port).into()
    }

    /// Starts the server app in the app container, on [`APP_PORT`].
    pub fn start_server(&self, s: &Server) -> Result<Proc> {
        let addr = if s.loopback_only {
            format!("127.0.0.1:{APP_PORT}")
        } else {
            format!("0.0.0.0:{APP_PORT}")
        };
        let after = s.listen_after_ms.to_string();
        let linger = s.linger_ms.to_string();
        let cmd = self.in_container(
            "app",
            &[
                "testbed",
                "app",
                "--addr",
                &addr,
                "--listen-after-ms",
                &after,
                "--linger-ms",
                &linger,
            ],
        )?;
        Proc::spawn(cmd)
    }

    /// Starts a client on the test host sending `requests` HTTP requests to
    /// the pod's app port, one every `interval_ms` (stopping after
    /// `stop_after_ok` 200s; 0: never).
    pub fn spawn_client(
        &self,
        requests: u32,
        interval_ms: u64,
        stop_after_ok: u32,
    ) -> Result<Proc> {
        let mut c = self
            .topo
            .upstream
            .command(self.exe.to_str().context("exe path")?);
        c.args([
            "testbed",
            "client",
            "--target",
            &self.pod_addr(APP_PORT).to_string(),
            "--requests",
            &requests.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
            "--stop-after-ok",
            &stop_after_ok.to_string(),
        ]);
        Proc::spawn(c)
    }

    /// Starts pilot-agent's probes of the app port in the istio-proxy
    /// container, one every `interval_ms`, until one succeeds.
    pub fn spawn_prober(&self, attempts: u32, interval_ms: u64) -> Result<Proc> {
        let cmd = self.in_container(
            "istio-proxy",
            &[
                "testbed",
                "prober",
                "--target",
                &self.pod_addr(APP_PORT).to_string(),
                "--attempts",
                &attempts.to_string(),
                "--interval-ms",
                &interval_ms.to_string(),
            ],
        )?;
        Proc::spawn(cmd)
    }

    /// The refused inbound dials the sidecar counted so far.
    pub fn sidecar_refused(&mut self) -> Result<u64> {
        let s = self.sidecar.as_mut().context("no sidecar")?;
        Ok(super::inbound::refused_count(s.lines()))
    }

    /// Stops the upstream test host (test hosts never outlive the pod).
    pub fn stop_upstream(&mut self) {
        self.upstream.terminate(Duration::from_secs(3));
    }
}

/// Parses the app's output lines.
pub fn outcomes(lines: &[String]) -> Result<Vec<Outcome>> {
    parse_outcomes(&lines.join("\n"))
}
