//! The connect-path bench in the kernel matrix's guests: no tracer,
//! connscope on the fentry path and on the syscall tracepoints, the fentry
//! path's floor (programs returning at once), the fentry path writing
//! nothing to the ring, bpftrace and bcc's `tcpconnect`, side by side in one
//! guest run; then the kernel's own run time of connscope's programs per
//! connect (`bpf_stats`) on each path.
//!
//! `cargo xtask bench --matrix` runs it in full and writes its section of
//! BENCHMARKS.md; the kernel matrix of `cargo xtask test` runs its smoke
//! form in every guest. Under TCG a guest runs many times slower than the
//! hardware and unevenly so: only ratios measured in the same guest run,
//! and the program times, mean anything. The report says so.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    bench::{
        self, FENTRY, FENTRY_HOOKS_ONLY, FENTRY_NO_OUTPUT, Opts, TRACEPOINTS, median, storm,
        storm_args,
    },
    matrix, vm,
};

/// Loopback connects only: under TCG a storm's every connect crosses the
/// emulator, and the veth cells of the host bench would double the run.
const MODES: [(&str, &[&str]); 2] = [("successful", &[]), ("refused", &["--refused"])];

/// The program-time storms: also non-blocking connects (how Go, Java NIO
/// and Envoy dial), whose outcome takes other branches of the programs.
const STATS_MODES: [(&str, &[&str]); 4] = [
    ("successful", &[]),
    ("refused", &["--refused"]),
    ("successful, non-blocking", &["--nonblocking"]),
    ("refused, non-blocking", &["--nonblocking", "--refused"]),
];

/// What one guest measured (written by the guest as JSON, read by the host).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct GuestBench {
    /// `uname -r` in the guest.
    pub(crate) kernel: String,
    pub(crate) smoke: bool,
    pub(crate) cpus: usize,
    pub(crate) rounds: usize,
    pub(crate) seconds: f64,
    pub(crate) threads: usize,
    /// connects/s by tracer and mode, one sample per round.
    pub(crate) rates: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// Each cell's connects/s over the mean of the no-tracer cells run
    /// right before and right after the tracer: tracer -> mode -> ratios.
    #[serde(default)]
    pub(crate) paired: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// Tracers that could not run, with the reason.
    pub(crate) unavailable: BTreeMap<String, String>,
    /// Program time: path -> mode -> its programs.
    pub(crate) programs: BTreeMap<String, BTreeMap<String, Vec<ProgramTime>>>,
}

/// One program's share of a storm, from `bpf_stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProgramTime {
    pub(crate) name: String,
    pub(crate) runs_per_connect: f64,
    pub(crate) ns_per_run: f64,
    /// connscope's own (not another tracer's left attached).
    pub(crate) ours: bool,
}

impl GuestBench {
    /// connscope's program time per connect on `path` in `mode`.
    fn ns_per_connect(&self, path: &str, mode: &str) -> Option<f64> {
        let progs = self.programs.get(path)?.get(mode)?;
        Some(
            progs
                .iter()
                .filter(|p| p.ours)
                .map(|p| p.runs_per_connect * p.ns_per_run)
                .sum(),
        )
    }

    /// The median of `tracer`'s paired ratios to no tracer in `mode`.
    fn ratio(&self, tracer: &str, mode: &str) -> Option<f64> {
        let mut v = self.paired.get(tracer)?.get(mode)?.clone();
        (!v.is_empty()).then(|| median(&mut v))
    }

    fn median_rate(&self, tracer: &str, mode: &str) -> Option<f64> {
        let mut v = self.rates.get(tracer)?.get(mode)?.clone();
        (!v.is_empty()).then(|| median(&mut v))
    }

    /// Whether a smoke run measured what it must: every cell of the
    /// connscope paths and program time on both paths.
    pub(crate) fn check(&self) -> Result<()> {
        for tracer in ["none", FENTRY, TRACEPOINTS] {
            if let Some(why) = self.unavailable.get(tracer) {
                bail!("{tracer} could not run: {why}");
            }
            for (mode, _) in MODES {
                if self.median_rate(tracer, mode).is_none_or(|r| r <= 0.0) {
                    bail!("no {mode} connects measured with {tracer}");
                }
            }
        }
        for path in [FENTRY, TRACEPOINTS] {
            for (mode, _) in &STATS_MODES[..2] {
                if self.ns_per_connect(path, mode).is_none_or(|ns| ns <= 0.0) {
                    bail!("no program time recorded for {path}, {mode}");
                }
            }
        }
        Ok(())
    }
}

/// In the guest (`xtask bench-guest`): runs the bench with the connscope
/// binary `bin` and writes what it measured to `out`.
pub(crate) fn in_guest(bin: &Path, smoke: bool, out: &Path) -> Result<()> {
    let o = if smoke {
        Opts::SMOKE
    } else {
        Opts {
            rounds: 3,
            seconds: 3.0,
            threads: 2,
        }
    };
    let mut r = GuestBench {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_string(),
        smoke,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rounds: o.rounds,
        seconds: o.seconds,
        threads: o.threads,
        ..Default::default()
    };
    // The tracers compared round by round, order rotated. bpftrace and bcc
    // only in full runs: they are absent from a fresh machine, and bcc
    // compiles for minutes under emulation.
    let tracers: &[&'static str] = if smoke {
        &[FENTRY, TRACEPOINTS]
    } else {
        &[
            FENTRY,
            TRACEPOINTS,
            FENTRY_HOOKS_ONLY,
            FENTRY_NO_OUTPUT,
            "bpftrace",
        ]
    };
    for round in 0..o.rounds {
        let mut order = tracers.to_vec();
        order.rotate_left(round % tracers.len());
        for t in order {
            // The smoke run reads program time under the rounds' own start
            // of each path (one agent start fewer each, under TCG).
            let stats: &[(&str, &[&str])] = if smoke { &STATS_MODES[..2] } else { &[] };
            measure(&mut r, t, bin, &o, stats)?;
        }
    }
    if !smoke {
        // bcc once, its rounds back to back: its start is a clang build of
        // minutes under TCG.
        measure_rounds(&mut r, "bcc", bin, &o, &[])?;
    }
    if !smoke {
        // Each path's program time under a start of its own (the smoke run
        // took it from the rounds' own start, to keep the matrix short).
        for path in [FENTRY, TRACEPOINTS, FENTRY_NO_OUTPUT] {
            let _agent = bench::start(path, bin, &[])?.map_err(anyhow::Error::msg)?;
            program_times(&mut r, path, bin, &o, &STATS_MODES)?;
        }
    }
    std::fs::write(out, serde_json::to_vec_pretty(&r)?)?;
    if smoke {
        r.check()?;
    }
    Ok(())
}

/// connscope's program time per connect on `path` (the agent running),
/// from `bpf_stats` during one storm of each of `modes`.
fn program_times(
    r: &mut GuestBench,
    path: &str,
    bin: &Path,
    o: &Opts,
    modes: &[(&str, &[&str])],
) -> Result<()> {
    for (mode, extra) in modes {
        let mut a = storm_args(o, extra);
        a.push("--bpf-stats".into());
        let s = storm(bin, &a)?;
        let connects = s["connects"].as_f64().unwrap_or(0.0).max(1.0);
        let progs = s["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let runs = p["runs"].as_f64()?;
                (runs > 0.0).then(|| ProgramTime {
                    name: p["name"].as_str().unwrap_or("?").to_string(),
                    runs_per_connect: runs / connects,
                    ns_per_run: p["run_ns"].as_f64().unwrap_or(0.0) / runs,
                    ours: p["connscope"].as_bool().unwrap_or(false),
                })
            })
            .collect();
        r.programs
            .entry(path.to_string())
            .or_default()
            .insert(mode.to_string(), progs);
    }
    Ok(())
}

/// One round of `tracer`: each mode once (then `stats`, see
/// [`measure_rounds`]).
fn measure(
    r: &mut GuestBench,
    tracer: &'static str,
    bin: &Path,
    o: &Opts,
    stats: &[(&str, &[&str])],
) -> Result<()> {
    let one = Opts {
        rounds: 1,
        seconds: o.seconds,
        threads: o.threads,
    };
    measure_rounds(r, tracer, bin, &one, stats)
}

/// `o.rounds` storms of each mode under one start of `tracer`, then the
/// program time of the `stats` modes under the same start.
fn measure_rounds(
    r: &mut GuestBench,
    tracer: &'static str,
    bin: &Path,
    o: &Opts,
    stats: &[(&str, &[&str])],
) -> Result<()> {
    if r.unavailable.contains_key(tracer) {
        return Ok(());
    }
    eprintln!("bench-guest: {tracer}");
    // No tracer right before and right after: under TCG a guest's speed
    // drifts with the host's load by far more than any tracer costs, so
    // each cell is set against the no-tracer cells around it.
    let before = baseline(r, bin, o)?;
    let t = match bench::start(tracer, bin, &[])? {
        Ok(t) => t,
        Err(why) => {
            r.unavailable.insert(tracer.to_string(), why);
            return Ok(());
        }
    };
    if tracer == FENTRY || tracer == FENTRY_HOOKS_ONLY || tracer == FENTRY_NO_OUTPUT {
        // The agent falls back to tracepoints where fentry is refused
        // unless told otherwise; `--connect-path fentry` fails instead.
        // Check it is in use all the same: the column is about that path.
        let port = t.http_port.context("connscope's port")?;
        let fentry = bench::metric(port, "connscope_connect_path{path=\"fentry\"}")?;
        if fentry != 1.0 {
            bail!("{tracer}: the agent is not on the fentry path");
        }
    }
    let mut cells = vec![Vec::new(); MODES.len()];
    for _ in 0..o.rounds {
        for (i, (mode, extra)) in MODES.iter().enumerate() {
            let s = storm(bin, &storm_args(o, extra))?;
            let v = s["per_second"].as_f64().unwrap_or(0.0);
            cells[i].push(v);
            r.rates
                .entry(tracer.to_string())
                .or_default()
                .entry(mode.to_string())
                .or_default()
                .push(v);
        }
    }
    program_times(r, tracer, bin, o, stats)?;
    drop(t);
    let after = baseline(r, bin, o)?;
    for (i, (mode, _)) in MODES.iter().enumerate() {
        let reference = (before[i] + after[i]) / 2.0;
        if reference > 0.0 {
            r.paired
                .entry(tracer.to_string())
                .or_default()
                .entry(mode.to_string())
                .or_default()
                .extend(cells[i].iter().map(|v| v / reference));
        }
    }
    Ok(())
}

/// One storm of each mode with no tracer, recorded as `none`.
fn baseline(r: &mut GuestBench, bin: &Path, o: &Opts) -> Result<Vec<f64>> {
    MODES
        .iter()
        .map(|(mode, extra)| {
            let s = storm(bin, &storm_args(o, extra))?;
            let v = s["per_second"].as_f64().unwrap_or(0.0);
            r.rates
                .entry("none".into())
                .or_default()
                .entry(mode.to_string())
                .or_default()
                .push(v);
            Ok(v)
        })
        .collect()
}

/// The shell command a guest runs: the stripped copies `staged` loaded in
/// its RAM first (see `matrix::stage`), then the bench; its status in
/// `$VM_RESULTS/bench.status`, what it measured in `$VM_RESULTS/bench.json`.
pub(crate) fn guest_command(xtask: &Path, bin: &Path, smoke: bool) -> String {
    let mut words = vec![
        xtask.display().to_string(),
        "bench-guest".into(),
        "--bin".into(),
        bin.display().to_string(),
    ];
    if smoke {
        words.push("--smoke".into());
    }
    format!(
        "{} --out \"$VM_RESULTS/bench.json\"; echo $? > \"$VM_RESULTS/bench.status\"",
        vm::shell_words(&words)
    )
}

/// What a guest's bench left in `results`: its measurements, or why not.
pub(crate) fn read_result(results: &Path) -> Result<GuestBench> {
    let Ok(status) = std::fs::read_to_string(results.join("bench.status")) else {
        bail!("the bench did not finish in the guest");
    };
    if status.trim() != "0" {
        bail!("the bench failed in the guest (status {:?})", status.trim());
    }
    let json = std::fs::read(results.join("bench.json")).context("the guest's bench.json")?;
    Ok(serde_json::from_slice(&json)?)
}

/// `cargo xtask bench --matrix`: the full bench in each guest of `kernels`
/// and its section of BENCHMARKS.md.
/// With `report_only`, nothing is booted: the blocks of `kernels` are
/// written anew from what their guests left in `target/vm/<release>` on
/// the last run.
pub(crate) fn run(
    workspace: &Path,
    kernels: &[vm::Series],
    bin: &Path,
    report_only: bool,
) -> Result<()> {
    let xtask = std::env::current_exe()?;
    let staged = matrix::stage(workspace, &[bin, &xtask])?;
    // Fetched one after the other (one apt state), then two guests at a
    // time: ratios are measured within a guest, against no tracer in the
    // same rounds, so the other guest's load falls on both sides.
    let prepared = kernels
        .iter()
        .map(|s| {
            let k = vm::prepare(s)?;
            // bcc compiles against the guest kernel's own headers.
            vm::prepare_headers(&k)?;
            Ok(k)
        })
        .collect::<Result<Vec<_>>>()?;
    let command = format!(
        "{}{}",
        matrix::stage_command(&staged),
        guest_command(&xtask, bin, false)
    );
    let done = vm::in_parallel(&prepared, 2, |k| -> Result<_> {
        if report_only {
            let results = workspace.join("target/vm").join(&k.release);
            // `xtask vm` scales the guest's deadlines under TCG only.
            let script = std::fs::read_to_string(results.join("guest.sh")).unwrap_or_default();
            let accel = if script.contains("CONNSCOPE_TEST_TIME_SCALE=1\n") {
                vm::Accel::Kvm
            } else {
                vm::Accel::Tcg
            };
            return Ok((accel, read_result(&results)?));
        }
        let run = vm::run_in_guest(workspace, k, &command, Duration::from_secs(90 * 60))?;
        let r = read_result(&run.results)?;
        eprintln!(
            "xtask bench: {} done in {:.0} s",
            k.release,
            run.elapsed.as_secs_f64()
        );
        Ok((run.accel, r))
    });
    // One block per kernel, kept across runs (`--kernel` reruns one), each
    // saying when it ran; the section is every kernel's latest block.
    let blocks = workspace.join("target/vm/bench");
    std::fs::create_dir_all(&blocks)?;
    let today = String::from_utf8(Command::new("date").args(["-u", "+%F"]).output()?.stdout)?;
    let mut failed = Vec::new();
    for (k, outcome) in prepared.iter().zip(done) {
        let mut md = match outcome {
            Ok((accel, r)) => report(k, accel.label(), &r),
            Err(e) => {
                let console = workspace
                    .join("target/vm")
                    .join(&k.release)
                    .join("console.log");
                let oops = std::fs::read_to_string(console)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.contains("Oops:") || l.contains("Kernel panic"))
                    .map(|l| format!(" The guest's console: `{}`.", l.trim()))
                    .unwrap_or_default();
                failed.push(format!("{} ({}): {e:#}", k.series.name, k.release));
                format!(
                    "\n### Kernel {} (`{}`, Debian {})\n\nThe run did not finish: {e:#}.{oops}\n",
                    k.series.name, k.release, k.version
                )
            }
        };
        md.push_str(&format!("\n(Run on {}.)\n", today.trim()));
        std::fs::write(blocks.join(format!("{}.md", k.series.name)), md)?;
    }
    let mut section = String::new();
    writeln!(
        section,
        "Command: `cargo xtask bench --matrix [--kernel K]` (release connscope binary; in each Debian kernel's QEMU guest of the kernel matrix, two guests at a time, 2 vCPUs each)."
    )?;
    for series in vm::select("all")? {
        if let Ok(md) = std::fs::read_to_string(blocks.join(format!("{}.md", series.name))) {
            section.push_str(&md);
        }
    }
    write_section(workspace, &section)?;
    println!("{section}");
    if !failed.is_empty() {
        bail!("the bench failed in:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// BENCHMARKS.md's matrix section, between its markers (before the host
/// bench's results, which run to the end of the file).
fn write_section(workspace: &Path, section: &str) -> Result<()> {
    const BEGIN: &str = "<!-- bench matrix:begin (written by `cargo xtask bench --matrix`) -->";
    const END: &str = "<!-- bench matrix:end -->";
    let path = workspace.join("BENCHMARKS.md");
    let md = std::fs::read_to_string(&path)?;
    let body = format!("{BEGIN}\n{section}{END}");
    let md = match (md.find(BEGIN), md.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{body}{}", &md[..b], &md[e + END.len()..]),
        _ => {
            let at = md.find("<!-- bench results -->").unwrap_or(md.len());
            format!("{}{body}\n\n{}", &md[..at], &md[at..])
        }
    };
    std::fs::write(path, md)?;
    Ok(())
}

/// One kernel's tables: throughput and ratios, then program time.
pub(crate) fn report(k: &vm::Prepared, accel: &str, r: &GuestBench) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### Kernel {} (`{}`, Debian {}), {accel}\n",
        k.series.name, r.kernel, k.version
    );
    let _ = writeln!(
        s,
        "{} rounds of {} s per cell, {} client threads, tracers rotated within each round (bcc: its rounds back to back after the others). Each ratio is the median over the tracer's cells of the cell's rate over the mean of the no-tracer cells run just before the tracer started and just after it stopped: under TCG a guest's speed drifts with the host's load, and only such pairs mean anything. The connects/s are medians, shown for scale only.\n",
        r.rounds, r.seconds, r.threads
    );
    s.push_str("| tracer | successful/s | ratio | refused/s | ratio |\n|---|---|---|---|---|\n");
    let mut tracers: Vec<&String> = r.rates.keys().collect();
    tracers.sort_by_key(|t| {
        (
            t.as_str() != "none",
            !t.starts_with("connscope"),
            t.as_str(),
        )
    });
    for t in tracers {
        let _ = write!(s, "| {t} |");
        for (m, _) in MODES {
            let ratio = if t == "none" {
                Some(1.0)
            } else {
                r.ratio(t, m)
            };
            match (r.median_rate(t, m), ratio) {
                (Some(v), Some(q)) => {
                    let _ = write!(s, " {v:.0} | {q:.3} |");
                }
                _ => s.push_str(" - | - |"),
            }
        }
        s.push('\n');
    }
    for (t, why) in &r.unavailable {
        let _ = writeln!(s, "| {t} | unavailable: {why} | | | |");
    }
    // connscope (fentry) against the other tracers, per mode.
    for other in ["bpftrace", "bcc", TRACEPOINTS] {
        let cells: Vec<String> = MODES
            .iter()
            .filter_map(|(m, _)| {
                let ours = r.ratio(FENTRY, m)?;
                let theirs = r.ratio(other, m)?;
                Some(format!("{m} {:.2}x", ours / theirs))
            })
            .collect();
        if !cells.is_empty() {
            let _ = writeln!(
                s,
                "\nconnscope (fentry) against {other} (ratio over ratio): {}.",
                cells.join(", ")
            );
        }
    }
    s.push_str("\nKernel program time per connect (`testbed storm --bpf-stats`, connscope's programs only):\n\n| path | connects | ns per connect | share of a connect's guest CPU with no tracer | programs (runs per connect x ns per run) |\n|---|---|---|---|---|\n");
    for (path, modes) in &r.programs {
        for (mode, progs) in modes {
            let total = r.ns_per_connect(path, mode).unwrap_or(0.0);
            let detail: Vec<String> = progs
                .iter()
                .filter(|p| p.ours && p.runs_per_connect >= 0.01)
                .map(|p| format!("{} {:.2} x {:.0}", p.name, p.runs_per_connect, p.ns_per_run))
                .collect();
            // A connect's CPU with no tracer: the guest's CPUs over its rate
            // (blocking modes only; the non-blocking storms were not run
            // without a tracer).
            let share = r
                .median_rate("none", mode)
                .filter(|b| *b > 0.0)
                .map(|b| format!("{:.1} %", 100.0 * total * b / (r.cpus as f64 * 1e9)))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "| {path} | {mode} | {total:.0} | {share} | {} |",
                detail.join(", ")
            );
        }
    }
    s
}
