//! `cargo xtask bench [--smoke]`: the connect path with no tracer, with
//! connscope, with an equivalent bpftrace script and with bcc, side by side
//! in one run; ring-buffer bursts until loss; agent footprint. Needs root.
//! Results go to stdout and (full runs) to BENCHMARKS.md.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The bpftrace equivalent of connscope's connect-failure hooks: remember
/// the connecting task at SYN_SENT, report SYN_SENT -> CLOSE and failed
/// connect() returns.
/// (`skaddr` is copied to a variable first: bpftrace 0.17 otherwise emits a
/// context access that current verifiers reject, and the program never loads.)
const BPFTRACE: &str = r#"
tracepoint:sock:inet_sock_set_state /args->protocol == 6 && args->newstate == 2/ { $sk = (uint64)args->skaddr; @ctx[$sk] = pid; }
tracepoint:sock:inet_sock_set_state /args->protocol == 6 && args->oldstate == 2/ {
  $sk = (uint64)args->skaddr; $port = args->dport;
  if (args->newstate == 7) { printf("fail %d %d\n", @ctx[$sk], $port); }
  delete(@ctx[$sk]);
}
tracepoint:syscalls:sys_exit_connect /args->ret < 0 && args->ret != -115/ { printf("connect %d %s %d\n", pid, comm, args->ret); }
"#;

pub(crate) struct Opts {
    pub(crate) rounds: usize,
    pub(crate) seconds: f64,
    pub(crate) threads: usize,
}

impl Opts {
    /// Every cell briefly: the code paths run, no figure means anything.
    pub(crate) const SMOKE: Opts = Opts {
        rounds: 1,
        seconds: 0.5,
        threads: 2,
    };
}

/// A tracer running in the background.
pub(crate) struct Tracer {
    pub(crate) name: &'static str,
    child: Option<Child>,
    pub(crate) http_port: Option<u16>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// connscope with every hook attached but each program returning at once:
/// the floor that attaching these hooks sets, whatever the programs do.
const HOOKS_ONLY: &str = "connscope hooks only (programs return at once)";
/// connscope without the `syscalls:` connect hooks (the cost of those
/// hooks, and what an operator gains by turning them off).
const NO_SYSCALL_HOOKS: &str = "connscope without syscall hooks";
/// connscope on the fentry/fexit connect path (kernels that allow it).
pub(crate) const FENTRY: &str = "connscope, fentry path";
/// connscope on the syscall-tracepoint connect path, forced.
pub(crate) const TRACEPOINTS: &str = "connscope, syscall tracepoints";
/// The fentry path's floor: hooks attached, programs returning at once.
pub(crate) const FENTRY_HOOKS_ONLY: &str = "connscope fentry hooks only (programs return at once)";
/// The fentry path with every program run in full but nothing written to
/// the ring: the most that aggregating refusals in the kernel could save.
pub(crate) const FENTRY_NO_OUTPUT: &str = "connscope fentry, no ring output";

/// The agent's arguments for each connscope variant the benches run.
fn connscope_args(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "connscope" => &[],
        HOOKS_ONLY => &["--bench-noop-programs"],
        NO_SYSCALL_HOOKS => &[
            "--disable-probe",
            "sys_enter_connect",
            "--disable-probe",
            "sys_exit_connect",
        ],
        FENTRY => &["--connect-path", "fentry"],
        TRACEPOINTS => &["--connect-path", "tracepoint"],
        FENTRY_HOOKS_ONLY => &["--connect-path", "fentry", "--bench-noop-programs"],
        FENTRY_NO_OUTPUT => &["--connect-path", "fentry", "--bench-no-ring-output"],
        _ => return None,
    })
}

/// How many times slower than hardware this machine runs (5 in a TCG
/// guest, set by `xtask vm`): start-up deadlines are scaled by it.
pub(crate) fn time_scale() -> u32 {
    std::env::var("CONNSCOPE_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// The storms of the connect-path table: (label, `testbed storm` arguments).
/// Loopback, and a test host in a network namespace of the storm's own
/// across a veth pair (the path a pod's connect to another host takes).
const MODES: [(&str, &[&str]); 4] = [
    ("successful", &[]),
    ("refused", &["--refused"]),
    ("successful, netns host", &["--netns"]),
    ("refused, netns host", &["--netns", "--refused"]),
];

/// Non-blocking connects (how Go, Java NIO and Envoy dial) in the program
/// time table only: their outcome is known after the syscall returns,
/// which takes other branches of the kernel programs.
const NONBLOCKING_MODES: [(&str, &[&str]); 2] = [
    ("successful, non-blocking", &["--nonblocking"]),
    ("refused, non-blocking", &["--nonblocking", "--refused"]),
];

/// Starts a tracer and waits until it is attached. `Ok(None)`: the tracer
/// cannot run here (the reason is returned for the report).
pub(crate) fn start(
    name: &'static str,
    bin: &Path,
    extra: &[&str],
) -> Result<std::result::Result<Tracer, String>> {
    let scale = time_scale();
    if name == "none" {
        return Ok(Ok(Tracer {
            name,
            child: None,
            http_port: None,
        }));
    }
    if let Some(args) = connscope_args(name) {
        let port = free_port()?;
        let mut child = Command::new(bin)
            .args(["run", "--events", "none", "--kubernetes", "off"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        wait_line(
            child.stderr.take().context("stderr")?,
            "probes attached",
            Duration::from_secs(60) * scale,
        )?;
        return Ok(Ok(Tracer {
            name,
            child: Some(child),
            http_port: Some(port),
        }));
    }
    // bcc compiles its programs with clang at start: minutes under emulation.
    let mut attach_within = Duration::from_secs(60) * scale;
    let (mut cmd, ready): (Command, &str) = match name {
        "bpftrace" => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", BPFTRACE]);
            (c, "Attaching")
        }
        "bcc" => {
            let mut c = Command::new("tcpconnect-bpfcc");
            // Unbuffered: its header line is how we know it attached.
            c.arg("-t").env("PYTHONUNBUFFERED", "1");
            attach_within = Duration::from_secs(180) * scale;
            (c, "TIME")
        }
        _ => bail!("unknown tracer {name}"),
    };
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("not installed ({e})"))),
    };
    // Both tools print their banner on stdout or stderr; read both.
    let (tx, rx) = std::sync::mpsc::channel();
    for r in [
        Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().context("stderr")?),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    let deadline = Instant::now() + attach_within;
    let mut seen = Vec::new();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let why = last_line(&mut seen, &rx, |l| !l.trim().is_empty());
            return Ok(Err(format!("exited ({st}): {why}")));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains(ready) => break,
            Ok(l) => seen.push(l),
            Err(_) if Instant::now() > deadline => {
                bail!("{name} did not attach within {attach_within:?}")
            }
            Err(_) => {}
        }
    }
    // bpftrace prints its banner before loading: a program the verifier
    // rejects makes it exit just after. Only a tracer still running counts.
    std::thread::sleep(Duration::from_secs(1));
    if let Ok(Some(st)) = child.try_wait() {
        let why = last_line(&mut seen, &rx, |l| l.contains("ERROR"));
        return Ok(Err(format!("exited after attaching ({st}): {why}")));
    }
    // Keep draining output so the tracer never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ok(Ok(Tracer {
        name,
        child: Some(child),
        http_port: None,
    }))
}

/// The last line a tracer printed (of those `pick` accepts), for saying
/// why it exited.
fn last_line(
    seen: &mut Vec<String>,
    rx: &std::sync::mpsc::Receiver<String>,
    pick: impl Fn(&str) -> bool,
) -> String {
    while let Ok(l) = rx.try_recv() {
        seen.push(l);
    }
    seen.iter()
        .rev()
        .find(|l| pick(l))
        .cloned()
        .unwrap_or_default()
}

fn wait_line(
    r: impl std::io::Read + Send + 'static,
    needle: &str,
    timeout: Duration,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains(needle) => {
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Ok(());
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("exited before {needle:?}")
            }
            Err(_) if Instant::now() > deadline => bail!("no {needle:?} within {timeout:?}"),
            Err(_) => {}
        }
    }
}

pub(crate) fn storm(bin: &Path, args: &[String]) -> Result<Value> {
    let out = Command::new(bin)
        .args(["testbed", "storm"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("storm failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `testbed storm` arguments of one connect-path cell: the round's threads
/// and duration, then the mode's own.
pub(crate) fn storm_args(o: &Opts, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--threads".to_string(),
        o.threads.to_string(),
        "--seconds".into(),
        o.seconds.to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Kernel time of connscope's programs per connect, from BPF run-time
/// statistics, set against what one connect costs with no tracer (cores /
/// connects per second in the "none" rows): the programs' own share of the
/// connect path, free of the run-to-run noise of throughput ratios.
fn program_cost_table(bin: &Path, o: &Opts, base: &[f64]) -> Result<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let _agent = start("connscope", bin, &[])?.map_err(anyhow::Error::msg)?;
    let mut table = String::from(
        "| connects | program | runs per connect | ns per run | ns per connect |\n|---|---|---|---|---|\n",
    );
    let mut totals = String::new();
    for (i, (mode, extra)) in MODES.iter().chain(&NONBLOCKING_MODES).enumerate() {
        let mut a = storm_args(o, extra);
        a.push("--bpf-stats".into());
        let r = storm(bin, &a)?;
        let connects = r["connects"].as_f64().unwrap_or(0.0).max(1.0);
        let mut total = 0.0;
        for p in r["programs"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or("?");
            let runs = p["runs"].as_f64().unwrap_or(0.0);
            let ns = p["run_ns"].as_f64().unwrap_or(0.0);
            if runs <= 0.0 {
                continue;
            }
            let ours = p["connscope"].as_bool().unwrap_or(false);
            let label = if ours {
                name.to_string()
            } else {
                format!("{name} (not connscope's)")
            };
            if ours {
                total += ns / connects;
            }
            if runs / connects < 0.01 {
                // exec/exit of the storm itself: nothing per connect.
                continue;
            }
            table.push_str(&format!(
                "| {mode} | {label} | {:.2} | {:.0} | {:.0} |\n",
                runs / connects,
                ns / runs,
                ns / connects
            ));
        }
        if total <= 0.0 {
            bail!(
                "no connscope program time recorded during the {mode} storm with --bpf-stats: {r}"
            );
        }
        let per_connect_ns = base.get(i).filter(|b| **b > 0.0).map(|b| cores * 1e9 / b);
        totals.push_str(&format!(
            "- {mode}: {total:.0} ns of connscope program time per connect{}\n",
            per_connect_ns
                .map(|c| format!(
                    ", {:.1} % of the {:.1} us of CPU one connect takes with no tracer ({cores} cores / {:.0} connects/s)",
                    100.0 * total / c,
                    c / 1000.0,
                    base[i]
                ))
                .unwrap_or_default()
        ));
    }
    Ok(format!(
        "{table}\n{totals}\nThe statistics add two clock reads to every run (some tens of ns), so these are upper bounds.\n"
    ))
}

pub(crate) fn metric(port: u16, name: &str) -> Result<f64> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn proc_stat(pid: u32) -> Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((rss_kb, ticks / hz))
}

/// Runs the benchmarks.
pub(crate) fn run(workspace: &Path, smoke: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("benchmarks need root (BPF); CI runs as root");
        }
        eprintln!("SKIPPED bench: needs root (BPF)");
        return Ok(());
    }
    let o = if smoke {
        Opts::SMOKE
    } else {
        Opts {
            rounds: 5,
            seconds: 3.0,
            threads: 4,
        }
    };
    let profile = if smoke { "debug" } else { "release" };
    let bin = workspace.join("target").join(profile).join("connscope");
    let mut report = String::new();
    let cmd = if smoke {
        "cargo xtask bench --smoke"
    } else {
        "cargo xtask bench"
    };
    report.push_str(&format!("Command: `{cmd}` ({} connscope binary), {} rounds of {} s per cell, {} client threads, tracers alternated within each round.\n\n", profile, o.rounds, o.seconds, o.threads));

    // 1. Connect path, side by side.
    let tracers = [
        "none",
        "connscope",
        NO_SYSCALL_HOOKS,
        HOOKS_ONLY,
        "bpftrace",
        "bcc",
    ];
    let mut rates: std::collections::HashMap<(&str, &str), Vec<f64>> = Default::default();
    let mut unavailable: std::collections::HashMap<&str, String> = Default::default();
    for round in 0..o.rounds {
        let mut order = tracers.to_vec();
        order.rotate_left(round % tracers.len());
        for t in order {
            if unavailable.contains_key(t) {
                continue;
            }
            let tracer = match start(t, &bin, &[])? {
                Ok(tr) => tr,
                Err(why) => {
                    unavailable.insert(t, why);
                    continue;
                }
            };
            for (mode, extra) in MODES {
                let r = storm(&bin, &storm_args(&o, extra))?;
                rates
                    .entry((tracer.name, mode))
                    .or_default()
                    .push(r["per_second"].as_f64().unwrap_or(0.0));
            }
        }
    }
    report.push_str(
        "## Connect path (connects/s, median of rounds; ratio to no tracer)\n\n| tracer |",
    );
    for (m, _) in MODES {
        report.push_str(&format!(" {m} | ratio |"));
    }
    report.push_str(&format!("\n|---|{}\n", "---|---|".repeat(MODES.len())));
    let base: Vec<f64> = MODES
        .iter()
        .map(|(m, _)| {
            median(
                rates
                    .get_mut(&("none", *m))
                    .map(|v| v.as_mut_slice())
                    .unwrap_or(&mut []),
            )
        })
        .collect();
    let mut ratios = std::collections::HashMap::new();
    for t in tracers {
        if let Some(why) = unavailable.get(t) {
            report.push_str(&format!(
                "| {t} | unavailable: {why} |{}\n",
                " |".repeat(2 * MODES.len() - 1)
            ));
            continue;
        }
        let mut row = format!("| {t} |");
        for (i, (m, _)) in MODES.iter().enumerate() {
            let v = median(
                rates
                    .get_mut(&(t, *m))
                    .map(|v| v.as_mut_slice())
                    .unwrap_or(&mut []),
            );
            ratios.insert((t, *m), v / base[i]);
            row.push_str(&format!(" {v:.0} | {:.3} |", v / base[i]));
        }
        report.push_str(&row);
        report.push('\n');
    }

    // 1b. Where connscope's share goes, per program, from the kernel's own
    // statistics (a round of its own: the statistics add to every run).
    report.push_str("\n## Kernel program time per connect (connscope, one more run with `testbed storm --bpf-stats`)\n\n");
    report.push_str(&program_cost_table(&bin, &o, &base)?);

    // 2. Bursts: the highest refused rate with zero loss (default ring), and
    // a tiny ring to prove every loss is counted.
    report.push_str("\n## Ring buffer bursts (refused connects, default 4 MiB ring)\n\n| offered rate/s | achieved/s | failures reported | lost (counted) |\n|---|---|---|---|\n");
    let burst_secs: f64 = if smoke { 0.5 } else { 10.0 };
    let rates_to_try: &[u64] = if smoke {
        &[5_000]
    } else {
        &[50_000, 100_000, 150_000, 200_000, 250_000, 0]
    };
    let mut sustainable = 0.0;
    {
        let agent = start("connscope", &bin, &[])?.map_err(anyhow::Error::msg)?;
        let port = agent.http_port.context("port")?;
        for &rate in rates_to_try {
            let f0 = metric(port, "connscope_connect_failures_total")?;
            let l0 = metric(port, "connscope_events_lost_total")?;
            let r = storm(
                &bin,
                &[
                    "--refused".into(),
                    "--threads".into(),
                    o.threads.to_string(),
                    "--seconds".into(),
                    burst_secs.to_string(),
                    "--rate".into(),
                    rate.to_string(),
                ],
            )?;
            std::thread::sleep(Duration::from_millis(1500));
            let f = metric(port, "connscope_connect_failures_total")? - f0;
            let l = metric(port, "connscope_events_lost_total")? - l0;
            let refused = r["refused"].as_f64().unwrap_or(0.0);
            let achieved = r["per_second"].as_f64().unwrap_or(0.0);
            if l == 0.0 && f >= refused {
                sustainable = f64::max(sustainable, achieved);
            }
            let offered = if rate == 0 {
                "max".to_string()
            } else {
                rate.to_string()
            };
            report.push_str(&format!(
                "| {offered} | {achieved:.0} | {f:.0} of {refused:.0} | {l:.0} |\n"
            ));
        }
    }
    report.push_str(&format!(
        "\nSustained with zero loss: {sustainable:.0} refused connects/s for {burst_secs} s.\n"
    ));
    let (tiny_f, tiny_l, tiny_refused) = {
        let agent = start("connscope", &bin, &["--ring-buffer-bytes", "4096"])?
            .map_err(anyhow::Error::msg)?;
        let port = agent.http_port.context("port")?;
        let r = storm(
            &bin,
            &[
                "--refused".into(),
                "--threads".into(),
                o.threads.to_string(),
                "--seconds".into(),
                burst_secs.min(2.0).to_string(),
            ],
        )?;
        std::thread::sleep(Duration::from_millis(1500));
        (
            metric(port, "connscope_connect_failures_total")?,
            metric(port, "connscope_events_lost_total")?,
            r["refused"].as_f64().unwrap_or(0.0),
        )
    };
    let accounted = tiny_f + tiny_l >= tiny_refused;
    report.push_str(&format!(
        "With a 4 KiB ring: {tiny_refused:.0} refused connects, {tiny_f:.0} reported, {tiny_l:.0} counted lost: {}.\n",
        if accounted { "every refused connect is either reported or counted" } else { "UNACCOUNTED LOSS" }
    ));

    // 3. Footprint: idle, then 10k failures/s spread over many pods.
    let pods = if smoke { 20 } else { 1000 };
    let (idle_rss, idle_cpu, load_rss, load_cpu, tracked) =
        footprint(&bin, workspace, pods, if smoke { 0.5 } else { 10.0 })?;
    report.push_str(&format!(
        "\n## Footprint\n\n| state | RSS | CPU |\n|---|---|---|\n| idle | {:.1} MiB | {:.1} % |\n| 10k failures/s over {pods} pods ({tracked:.0} tracked) | {:.1} MiB | {:.1} % |\n",
        idle_rss, idle_cpu, load_rss, load_cpu
    ));
    println!("{report}");
    if !smoke {
        let mut md = std::fs::read_to_string(workspace.join("BENCHMARKS.md")).unwrap_or_default();
        let marker = "<!-- bench results -->";
        if let Some(i) = md.find(marker) {
            md.truncate(i + marker.len());
        } else {
            md.push_str(marker);
        }
        md.push('\n');
        md.push_str(&report);
        std::fs::write(workspace.join("BENCHMARKS.md"), md)?;
    }
    if !accounted {
        bail!("events were lost without being counted");
    }
    if !smoke && !unavailable.contains_key("connscope") && ratios.is_empty() {
        bail!("no measurements");
    }
    Ok(())
}

/// Agent RSS (MiB) and CPU (% of one core), idle and under load from `pods`
/// simulated pod cgroups.
/// Appends the criterion pipeline results (events/s on one core, from
/// `target/criterion/pipeline/*/new/estimates.json`) to BENCHMARKS.md.
pub(crate) fn record_pipeline(workspace: &Path) -> Result<()> {
    /// Events per criterion iteration (`BATCH` in agent/benches/pipeline.rs).
    const EVENTS_PER_ITER: f64 = 10_000.0;
    let mut section = String::from(
        "\n## Userspace pipeline (`cargo bench --bench pipeline`, one core)\n\n| case | events/s (mean) |\n|---|---|\n",
    );
    for case in [
        "decode+attribute+classify+count",
        "same+kept_for_events_endpoint",
        "same+json_stream",
    ] {
        let f = workspace
            .join("target/criterion/pipeline")
            .join(case)
            .join("new/estimates.json");
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
        )?;
        let ns = v["mean"]["point_estimate"]
            .as_f64()
            .context("mean in estimates.json")?;
        section.push_str(&format!(
            "| {case} | {:.2}M |\n",
            EVENTS_PER_ITER / ns * 1e9 / 1e6
        ));
    }
    println!("{section}");
    let path = workspace.join("BENCHMARKS.md");
    let mut md = std::fs::read_to_string(&path)?;
    md.push_str(&section);
    std::fs::write(path, md)?;
    Ok(())
}

fn footprint(
    bin: &Path,
    workspace: &Path,
    pods: usize,
    secs: f64,
) -> Result<(f64, f64, f64, f64, f64)> {
    let root = cgroup2_root()?;
    let base = root.join(format!("connscope-bench-{}", std::process::id()));
    let _cleanup = Cleanup(base.clone());
    std::fs::create_dir_all(base.join("kubepods.slice/kubepods-burstable.slice"))?;
    let mut dirs = Vec::new();
    for i in 0..pods {
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
        let d = base
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!(
                "kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{:064x}.scope", i + 1));
        std::fs::create_dir_all(&d)?;
        dirs.push(d.display().to_string());
    }
    let list = workspace.join("target").join("bench-cgroups.txt");
    std::fs::write(&list, dirs.join("\n"))?;
    let agent = start(
        "connscope",
        bin,
        &["--cgroup-root", base.to_str().context("path")?],
    )?
    .map_err(anyhow::Error::msg)?;
    let pid = agent.child.as_ref().context("agent")?.id();
    let port = agent.http_port.context("port")?;
    let (_, c0) = proc_stat(pid)?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (idle_rss, c1) = proc_stat(pid)?;
    let idle_cpu = (c1 - c0) / secs * 100.0;
    let r = storm(
        bin,
        &[
            "--refused".into(),
            "--rate".into(),
            "10000".into(),
            "--seconds".into(),
            secs.to_string(),
            "--cgroups".into(),
            list.display().to_string(),
            "--per-cgroup".into(),
            "5".into(),
        ],
    )?;
    let (load_rss, c2) = proc_stat(pid)?;
    let load_cpu = (c2 - c1) / r["seconds"].as_f64().unwrap_or(secs) * 100.0;
    let tracked = metric(port, "connscope_pods_tracked")?;
    drop(agent);
    Ok((
        idle_rss as f64 / 1024.0,
        idle_cpu,
        load_rss as f64 / 1024.0,
        load_cpu,
        tracked,
    ))
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Deepest first; every directory is empty once its processes left.
        let mut dirs = Vec::new();
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn cgroup2_root() -> Result<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")?;
    mi.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(pre.split_whitespace().nth(4)?))
        })
        .context("no cgroup2 mount")
}

/// `cargo xtask soak --minutes N`: mixed load against one agent for N
/// minutes (refused and successful storms, real race demos, pod churn),
/// then every refused connect must be reported or counted lost, with the
/// agent's memory and CPU recorded. Results go to RELIABILITY.md.
pub(crate) fn soak(workspace: &Path, minutes: f64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak test needs root (BPF)");
    }
    let bin = workspace.join("target/release/connscope");
    let agent = start("connscope", &bin, &[])?.map_err(anyhow::Error::msg)?;
    let port = agent.http_port.context("port")?;
    let pid = agent.child.as_ref().context("agent")?.id();
    let (rss0, cpu0) = proc_stat(pid)?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(minutes * 60.0);
    let (mut refused, mut ok, mut demos, mut demo_fail, mut rounds) = (0.0, 0.0, 0, 0, 0);
    let mut rss_max = rss0;
    while Instant::now() < deadline {
        rounds += 1;
        let r = storm(
            &bin,
            &[
                "--refused".into(),
                "--rate".into(),
                "20000".into(),
                "--seconds".into(),
                "5".into(),
            ],
        )?;
        refused += r["refused"].as_f64().unwrap_or(0.0);
        let r = storm(
            &bin,
            &[
                "--threads".into(),
                "2".into(),
                "--seconds".into(),
                "5".into(),
            ],
        )?;
        ok += r["ok"].as_f64().unwrap_or(0.0);
        // A real race, with its own pod, namespace and cgroups (and its own
        // refusals, seen by this agent too).
        let d = Command::new(&bin)
            .args(["demo", "--sidecar-delay-ms", "500"])
            .output()?;
        demos += 1;
        if !d.status.success()
            || !String::from_utf8_lossy(&d.stdout).contains("VERDICT  sidecar startup race")
        {
            demo_fail += 1;
        }
        rss_max = rss_max.max(proc_stat(pid)?.0);
    }
    std::thread::sleep(Duration::from_secs(2));
    let elapsed = t0.elapsed().as_secs_f64();
    let (rss1, cpu1) = proc_stat(pid)?;
    let lost = metric(port, "connscope_events_lost_total")?;
    let failures = metric(port, "connscope_connect_failures_total")?;
    let decode_errors = metric(port, "connscope_events_total{type=\"unknown\"}")?;
    let accounted = failures + lost >= refused && lost == 0.0 && decode_errors == 0.0;
    let report = format!(
        "Command: `cargo xtask soak --minutes {minutes}` (release binary)\n\n\
         | figure | value |\n|---|---|\n\
         | duration | {elapsed:.0} s, {rounds} rounds |\n\
         | refused connects offered (20k/s storms) | {refused:.0} |\n\
         | successful connects | {ok:.0} |\n\
         | race demos (own agent, netns, cgroups) | {demos}, {demo_fail} without a correct verdict |\n\
         | failures reported by the soaked agent | {failures:.0} (includes the demos' refusals) |\n\
         | events lost (counted) | {lost:.0} |\n\
         | undecodable records | {decode_errors:.0} |\n\
         | agent RSS start / max / end | {:.1} / {:.1} / {:.1} MiB |\n\
         | agent CPU, average | {:.1} % of one core |\n\n\
         Verdict: {}.\n",
        rss0 as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        (cpu1 - cpu0) / elapsed * 100.0,
        if accounted && demo_fail == 0 {
            "nothing lost, nothing unexplained"
        } else {
            "FAILED: see figures"
        }
    );
    println!("{report}");
    let path = workspace.join("RELIABILITY.md");
    let mut md = std::fs::read_to_string(&path).unwrap_or_default();
    let marker = "<!-- soak results -->";
    if let Some(i) = md.find(marker) {
        md.truncate(i + marker.len());
    } else {
        md.push_str(marker);
    }
    md.push('\n');
    md.push_str(&report);
    std::fs::write(&path, md)?;
    drop(agent);
    if !accounted || demo_fail > 0 {
        bail!("soak failed");
    }
    Ok(())
}
