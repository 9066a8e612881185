//! Helpers for tests that run the real agent against the real kernel.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The agent binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_connscope");

/// Whether this test can run: root with BPF. Under `CI=true` a missing
/// privilege fails the test instead of skipping it silently.
pub(crate) fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let why =
        format!("{test}: needs root (CAP_BPF, CAP_NET_ADMIN) to load probes and create namespaces");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}; CI must run these tests as root");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// Polls `f` until it returns Some, or panics with `what` at the deadline.
pub(crate) fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_or(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` until it returns Some, or gives None at the deadline (for
/// callers whose failure message needs the last state they saw).
#[allow(dead_code)]
pub(crate) fn wait_for_or<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `connscope run`, stopped with SIGTERM on drop.
pub(crate) struct Agent {
    pub(crate) child: Child,
    /// Port of /metrics, /healthz, /readyz, /events.
    pub(crate) http_port: u16,
    pub(crate) events: PathBuf,
    pub(crate) stderr: mpsc::Receiver<String>,
    pub(crate) stderr_log: Vec<String>,
}

impl Agent {
    /// Starts the agent writing events to a fresh file in `dir`, and waits
    /// until its probes are attached.
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Agent {
        let events = dir.join("events.json");
        let _ = std::fs::remove_file(&events);
        let http_port = free_port();
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--events")
            .arg(&events)
            .args(["--metrics-addr", &format!("127.0.0.1:{http_port}")])
            .args(extra)
            .env(
                "CONNSCOPE_LOG",
                std::env::var("CONNSCOPE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child,
            http_port,
            events,
            stderr: rx,
            stderr_log: Vec::new(),
        };
        agent.wait_stderr("probes attached", Duration::from_secs(60));
        agent
    }

    /// Waits for a stderr line containing `needle`.
    pub(crate) fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stderr_log.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => self.stderr_log.push(l),
                Err(_) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        panic!("agent exited ({st}) before printing {needle:?}");
                    }
                    if Instant::now() > deadline {
                        panic!("agent did not print {needle:?} within {timeout:?}");
                    }
                }
            }
        }
    }

    /// Waits (10 s) for the connect failure of `pid` and returns it.
    pub(crate) fn failure(&self, pid: u32) -> Value {
        wait_for(
            &format!("connect_failure of pid {pid}"),
            Duration::from_secs(10),
            || {
                self.events()
                    .into_iter()
                    .find(|e| e["type"] == "connect_failure" && e["pid"] == pid)
            },
        )
    }

    /// Collects every stderr line printed so far.
    pub(crate) fn drain_stderr(&mut self) -> &[String] {
        while let Ok(l) = self.stderr.try_recv() {
            self.stderr_log.push(l);
        }
        &self.stderr_log
    }

    /// Every event line written so far.
    pub(crate) fn events(&self) -> Vec<Value> {
        read_json_lines(&self.events)
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child, Duration::from_secs(10))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&mut self.child, Duration::from_secs(5));
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> std::process::ExitStatus {
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses a JSON-lines file; a missing file is empty. The agent may be
/// writing it meanwhile (its buffer can fill in the middle of a line): only
/// lines already ended by a newline are read.
pub(crate) fn read_json_lines(p: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// A scratch directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("connscope-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A background process (sidecar, upstream) killed on drop, with its stdout
/// lines collected.
pub(crate) struct Bg {
    pub(crate) child: Child,
    pub(crate) lines: mpsc::Receiver<String>,
    pub(crate) seen: Vec<String>,
}

impl Bg {
    pub(crate) fn spawn(mut cmd: Command) -> Bg {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn background process");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Bg {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line containing `needle`.
    pub(crate) fn wait_line(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => self.seen.push(l),
                Err(_) if Instant::now() > deadline => {
                    panic!(
                        "no line containing {needle:?} within {timeout:?}; saw {:?}",
                        self.seen
                    )
                }
                Err(_) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        panic!(
                            "process exited ({st}) before printing {needle:?}; saw {:?}",
                            self.seen
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&mut self.child, Duration::from_secs(3));
        }
    }
}

/// Starts the stand-in Kubernetes API server on `port`, serving
/// `dir/state.json` and logging requests to `dir/api.log`.
pub(crate) fn fake_api(dir: &Path, port: u16) -> Bg {
    let mut c = Command::new("python3");
    c.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fake_apiserver.py"
    ))
    .args(["--port", &port.to_string()])
    .arg("--state")
    .arg(dir.join("state.json"))
    .arg("--log")
    .arg(dir.join("api.log"));
    let mut bg = Bg::spawn(c);
    bg.wait_line("ready", Duration::from_secs(10));
    bg
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET on the agent's HTTP port: (status, body). Bounded by a timeout.
pub(crate) fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect agent HTTP");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Percent-encodes a query value.
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server (Debian package) on loopback, scraping the given
/// targets every second, optionally with rule files and an Alertmanager.
pub(crate) struct Prometheus {
    pub(crate) port: u16,
    _proc: Bg,
}

impl Prometheus {
    pub(crate) fn start(
        dir: &Path,
        targets: &[u16],
        rules: &[PathBuf],
        alertmanager: Option<u16>,
    ) -> Prometheus {
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let rule_files: Vec<String> = rules.iter().map(|r| format!("'{}'", r.display())).collect();
        let alerting = alertmanager
            .map(|p| format!("alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{p}']\n"))
            .unwrap_or_default();
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\n{alerting}scrape_configs:\n  - job_name: connscope\n    static_configs:\n      - targets: [{}]\n",
            rule_files.join(", "),
            targets.join(", ")
        );
        let cfg_path = dir.join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let mut c = Command::new("prometheus");
        c.arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stderr(Stdio::null());
        let proc = Bg::spawn(c);
        wait_for("Prometheus ready", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            (http_get(port, "/-/ready").0 == 200).then_some(())
        });
        Prometheus { port, _proc: proc }
    }

    /// Instant query through the HTTP API; the result vector.
    pub(crate) fn query(&self, q: &str) -> Vec<Value> {
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={}", urlencode(q)));
        assert_eq!(status, 200, "query {q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query, if it has exactly one series.
    pub(crate) fn value(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        (r.len() == 1).then(|| r[0]["value"][1].as_str()?.parse().ok())?
    }
}

/// Runs the stand-in application once (optionally inside a cgroup, as a
/// runtime starts a container's process) and returns its attempt.
pub(crate) fn dial(
    target: &str,
    cgroup: Option<&Path>,
    nonblocking: bool,
) -> connscope::testbed::dial::Outcome {
    let mut c = Command::new(BIN);
    c.args(["testbed", "enter"]);
    if let Some(cg) = cgroup {
        c.arg("--cgroup").arg(cg);
    }
    c.args(["--", BIN, "testbed", "dial", "--target", target]);
    if nonblocking {
        c.arg("--nonblocking");
    }
    let out = c.output().expect("run dialer");
    assert!(
        out.status.success(),
        "dialer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    connscope::testbed::dial::parse_outcomes(&String::from_utf8_lossy(&out.stdout))
        .expect("dialer output")
        .remove(0)
}

/// Sum of the agent's `/metrics` samples whose line starts with `name`
/// (a metric name, or a name with its label set).
pub(crate) fn metric(port: u16, name: &str) -> f64 {
    http_get(port, "/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
