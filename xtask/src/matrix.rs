//! The kernel matrix (`cargo xtask vm`): `connscope check` and the kernel-facing integration
//! tests in a guest of each Debian kernel (and `check` on this machine's
//! own), then KERNELS.md and the README's kernel table from what they said.
//! Nothing in the table is typed by hand.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    guest_bench,
    vm::{self, Prepared, Series},
};

/// The kernel-facing tests every guest runs, by full name (`--exact`, so a
/// renamed test fails the count instead of silently running nothing):
/// - probes: blocking and non-blocking, IPv4 and IPv6, AF_UNIX, LISTEN up
///   and down, exec and exit;
/// - one full race with Istio's iptables rules, from the guest kernel's
///   own netfilter modules;
/// - both again on the syscall-tracepoint connect path (the guests allow
///   fentry, which the default runs: `CONNSCOPE_EXPECT_CONNECT_PATH`);
/// - restore (the agent started while the sidecar is up) and shutdown;
/// - capture: the kernel's proof where the kernel gives it (6.10+), the
///   documented degradation (inferred) before.
///
/// Every guest kernel (x86-64, 5.5+, with BTF) allows fentry: the tests
/// there must see the agent use it (`CONNSCOPE_EXPECT_CONNECT_PATH`).
///
/// The rest of the suite (the classic-tracepoint fallbacks, exports,
/// deploy, faults...) is kernel-independent logic or forced fallbacks and
/// runs on the host: TCG is too slow for all of it in the CI budget.
pub(crate) const GUEST_TESTS: &[&str] = &[
    "probes::refusals_before_sidecar_listens_and_none_after",
    "probes::syscall_tracepoints_see_the_same",
    "race::startup_race_sidecar_late",
    "race::startup_race_on_syscall_tracepoints",
    "race::agent_restarted_while_sidecar_is_up",
    "shutdown::sigterm_mid_flood_exits_fast_and_detaches_everything",
    "capture::captured_destination_every_refusal_is_the_race",
    "ambient::listener_is_in_the_socket_s_netns_not_the_caller_s",
];

/// Guests booted at once: under TCG each runs on one host thread.
const GUESTS_AT_ONCE: usize = 2;

/// One guest's limit: boot, `check`, the tests, under TCG on two cores.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What one kernel of the matrix said.
struct Row {
    kernel: String,
    release: String,
    package: String,
    fleet: String,
    accel: String,
    check: String,
    check_ok: bool,
    passed: Option<usize>,
    elapsed: Option<Duration>,
    error: Option<String>,
}

impl Row {
    /// A guest kernel that could not be had or booted.
    fn failed(series: &Series, error: String) -> Self {
        Row {
            kernel: series.name.to_string(),
            release: "-".into(),
            package: "-".into(),
            fleet: series.fleet.to_string(),
            accel: "-".into(),
            check: String::new(),
            check_ok: false,
            passed: None,
            elapsed: None,
            error: Some(error),
        }
    }
}

/// The agent and kernel-test binaries, built for this run: the same cargo
/// invocation as the host's test run (so nothing is built twice), whose
/// kernel tests start the agent binary by its path.
fn build(workspace: &Path) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the kernel tests failed");
    }
    let messages: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    // By cargo's word, not by path: CARGO_TARGET_DIR may put them anywhere.
    let executable = |name: &str, kind: &str| {
        messages
            .iter()
            .filter(|m| m["target"]["name"] == name)
            .filter(|m| {
                m["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == kind))
            })
            // A bin target is built twice by `cargo test`: the program and
            // its unit-test harness (`profile.test`), in either order.
            .filter(|m| m["profile"]["test"] == (kind == "test"))
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo named no {kind} executable {name}"))
    };
    Ok((
        executable("connscope", "bin")?,
        executable("kernel", "test")?,
    ))
}

/// A binary the guests run, and the copy they load: without its debug
/// info (a fifth of the size), since the guest reads it over 9p, without
/// a page cache, under emulation. Symbols stay, for backtraces.
pub(crate) struct Staged {
    path: PathBuf,
    copy: PathBuf,
}

pub(crate) fn stage(workspace: &Path, binaries: &[&Path]) -> Result<Vec<Staged>> {
    let dir = workspace.join("target/vm/stage");
    std::fs::create_dir_all(&dir)?;
    binaries
        .iter()
        .map(|path| {
            let name = path.file_name().context("a binary has a file name")?;
            let copy = dir.join(name);
            let st = Command::new("objcopy")
                .arg("--strip-debug")
                .arg(path)
                .arg(&copy)
                .status()
                .context("running objcopy (binutils)")?;
            if !st.success() {
                bail!("objcopy --strip-debug {} failed", path.display());
            }
            Ok(Staged {
                path: path.to_path_buf(),
                copy,
            })
        })
        .collect()
}

/// Where the matrix writes what it found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// KERNELS.md and the README's table, in the workspace (`cargo xtask
    /// vm`: a maintainer commits what a run found).
    Workspace,
    /// `target/vm/KERNELS.md` only (`cargo xtask test`: CI leaves the
    /// checkout as it found it; `cargo xtask vm --kernel <one>`: a partial
    /// run keeps the committed report whole).
    Target,
}

/// Runs the matrix on `kernels` and writes what it found (`report`). Every
/// kernel is run even when one fails; the error names each that failed.
pub(crate) fn run(workspace: &Path, kernels: &[Series], report: Report) -> Result<()> {
    let (bin, tests) = build(workspace)?;
    // The guests' bench smoke runs this very xtask.
    let xtask = std::env::current_exe()?;
    let staged = stage(workspace, &[&bin, &tests, &xtask])?;
    let mut rows = vec![host_row(&bin)?];
    // Fetched one after the other (one apt state), then booted
    // `GUESTS_AT_ONCE` at a time: a single-threaded TCG guest uses one host
    // core.
    let prepared: Vec<(Series, Result<Prepared>)> =
        kernels.iter().map(|s| (*s, vm::prepare(s))).collect();
    rows.extend(vm::in_parallel(
        &prepared,
        GUESTS_AT_ONCE,
        |(series, k)| match k {
            Ok(k) => guest_row(workspace, k, (&bin, &tests, &xtask), &staged),
            Err(e) => Row::failed(series, format!("{e:#}")),
        },
    ));
    write_report(workspace, &rows, report)?;
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{} ({}): {e}", r.kernel, r.release))
        })
        .collect();
    for r in &rows {
        eprintln!(
            "xtask matrix: {:<6} {:<24} {}",
            r.kernel,
            r.release,
            r.error.as_deref().unwrap_or("passed")
        );
    }
    if !failed.is_empty() {
        bail!("the kernel matrix failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// This machine's kernel: `check` here; its tests are the host's test run.
fn host_row(bin: &Path) -> Result<Row> {
    let out = Command::new(bin).arg("check").output()?;
    let check =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let ok = out.status.success();
    Ok(Row {
        kernel: "host".into(),
        release,
        package: "this machine".into(),
        fleet: "the development sandbox (kprobes compiled out, fentry refused)".into(),
        accel: "none".into(),
        check,
        check_ok: ok,
        passed: None,
        elapsed: None,
        error: (!ok).then(|| "connscope check failed".to_string()),
    })
}

fn guest_row(
    workspace: &Path,
    k: &Prepared,
    bins: (&Path, &Path, &Path),
    staged: &[Staged],
) -> Row {
    let (bin, tests, xtask) = bins;
    let mut words = vec![
        tests.display().to_string(),
        "--exact".into(),
        // One at a time: a single-threaded TCG guest has one host core,
        // and two tests sharing it missed their (scaled) scenario timing.
        "--test-threads".into(),
        "1".into(),
    ];
    words.extend(GUEST_TESTS.iter().map(|t| t.to_string()));
    // After the tests, the smoke run of the connect-path bench (its status
    // apart: the tests' status is the guest's).
    let command = format!(
        "{stage}{bin} check > \"$VM_RESULTS/check.txt\" 2>&1; echo $? > \"$VM_RESULTS/check.status\"; CONNSCOPE_EXPECT_CONNECT_PATH=fentry {tests}; t=$?; {bench}; exit $t",
        stage = stage_command(staged),
        bin = vm::shell_words(&[bin.display().to_string()]),
        tests = vm::shell_words(&words),
        bench = guest_bench::guest_command(xtask, bin, true),
    );
    let mut row = Row {
        kernel: k.series.name.to_string(),
        release: k.release.clone(),
        package: k.version.clone(),
        fleet: k.series.fleet.to_string(),
        accel: "-".into(),
        check: String::new(),
        check_ok: false,
        passed: None,
        elapsed: None,
        error: None,
    };
    let run = match vm::run_in_guest(workspace, k, &command, GUEST_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            row.error = Some(format!("{e:#}"));
            return row;
        }
    };
    row.accel = run.accel.label().to_string();
    row.elapsed = Some(run.elapsed);
    row.check = std::fs::read_to_string(run.results.join("check.txt")).unwrap_or_default();
    row.check_ok =
        std::fs::read_to_string(run.results.join("check.status")).is_ok_and(|s| s.trim() == "0");
    row.passed = passed(&run.output);
    let mut errors = Vec::new();
    if !row.check_ok {
        errors.push("connscope check failed".to_string());
    }
    if run.status != 0 {
        errors.push(format!("the kernel tests failed (exit {})", run.status));
    } else if row.passed != Some(GUEST_TESTS.len()) {
        errors.push(format!(
            "{:?} kernel tests passed, {} expected",
            row.passed,
            GUEST_TESTS.len()
        ));
    }
    if let Err(e) = guest_bench::read_result(&run.results).and_then(|b| b.check()) {
        errors.push(format!("the bench smoke run: {e:#}"));
    }
    if !errors.is_empty() {
        row.error = Some(errors.join("; "));
    }
    row
}

/// The guest's root is the host's filesystem over 9p without a page cache:
/// every page fault of a large debug binary is a round trip to QEMU. The
/// stripped copies are read into the guest's RAM once and bind-mounted over
/// the binaries' paths (the tests start the agent by path).
pub(crate) fn stage_command(staged: &[Staged]) -> String {
    staged
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let copy = vm::shell_words(&[s.copy.display().to_string()]);
            let path = vm::shell_words(&[s.path.display().to_string()]);
            format!("cp {copy} /run/stage{i} && mount --bind /run/stage{i} {path} || exit 98; ")
        })
        .collect()
}

/// "N passed" from the test harness's result line.
fn passed(output: &str) -> Option<usize> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .find_map(|l| l.split(" passed").next()?.trim().parse().ok())
}

/// `[MISS]`/`[FAIL]` items of a `check` output, by name.
fn degraded(check: &str) -> Vec<String> {
    check
        .lines()
        .filter_map(|l| {
            l.strip_prefix("[MISS] ")
                .or_else(|| l.strip_prefix("[FAIL] "))
        })
        .map(|l| l.split(':').next().unwrap_or(l).trim().to_string())
        .collect()
}

const BEGIN: &str = "<!-- kernel-matrix:begin (written by `cargo xtask vm`) -->";
const END: &str = "<!-- kernel-matrix:end -->";

/// The README's table, between its markers.
fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "{BEGIN}");
    let _ = writeln!(
        t,
        "| Kernel | Release (Debian package) | Where it runs | `connscope check` | Degraded | Kernel tests |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    for r in rows {
        let degraded = degraded(&r.check);
        let tests = match (&r.error, r.passed) {
            (None, Some(n)) => format!("{n} passed ({})", r.accel),
            (None, None) => "the whole suite (`cargo test`)".to_string(),
            (Some(e), _) => format!("**failed**: {}", e.lines().next().unwrap_or_default()),
        };
        let _ = writeln!(
            t,
            "| {} | `{}` ({}) | {} | {} | {} | {} |",
            r.kernel,
            r.release,
            r.package,
            r.fleet,
            if r.check_ok {
                "can run"
            } else {
                "**cannot run**"
            },
            if degraded.is_empty() {
                "nothing".to_string()
            } else {
                degraded.join(", ")
            },
            tests
        );
    }
    let _ = writeln!(t, "{END}");
    t
}

fn write_report(workspace: &Path, rows: &[Row], report: Report) -> Result<()> {
    let mut md = String::from(
        "# Kernels\n\nWritten by the kernel matrix (`cargo xtask vm`): `connscope check` as each kernel printed it, and the kernel tests \
         each guest passed. Guests are Debian's own kernel packages booted by virtme-ng with \
         this machine's filesystem as their root. Under TCG, times say nothing about speed.\n\n",
    );
    md.push_str(&table(rows));
    for r in rows {
        let _ = write!(
            md,
            "\n## {} (`{}`)\n\n- Debian package: {}\n- Where it runs: {}\n- Accelerator: {}\n",
            r.kernel, r.release, r.package, r.fleet, r.accel
        );
        if let Some(e) = r.elapsed {
            let _ = writeln!(
                md,
                "- Guest run (boot, check, tests): {:.0} s",
                e.as_secs_f64()
            );
        }
        match (&r.error, r.passed) {
            (Some(e), _) => {
                let _ = writeln!(md, "- **Failed**: {e}");
            }
            (None, Some(n)) => {
                let _ = writeln!(md, "- Kernel tests passed: {n}: {}", GUEST_TESTS.join(", "));
            }
            (None, None) => {
                let _ = writeln!(md, "- Kernel tests: the whole suite, in `cargo xtask test`");
            }
        }
        let _ = writeln!(md, "\n```\n{}```", r.check);
    }
    if report == Report::Target {
        let path = workspace.join("target/vm/KERNELS.md");
        std::fs::write(&path, md)?;
        eprintln!("xtask matrix: wrote {}", path.display());
        return Ok(());
    }
    std::fs::write(workspace.join("KERNELS.md"), md)?;

    let readme_path = workspace.join("README.md");
    let readme = std::fs::read_to_string(&readme_path)?;
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        bail!("README.md has no kernel-matrix markers");
    };
    let updated = format!(
        "{}{}{}",
        &readme[..b],
        table(rows),
        &readme[e + END.len() + 1..]
    );
    std::fs::write(readme_path, updated)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_counts_and_check_misses_are_read() {
        let out = "running 7 tests\n...\ntest result: ok. 7 passed; 0 failed; 0 ignored";
        assert_eq!(passed(out), Some(7));
        assert_eq!(passed("test result: FAILED. 6 passed; 1 failed"), None);
        let check = "[ ok ] BTF: x\n[MISS] capture proof: no reason field\n[FAIL] tracefs: gone\n";
        assert_eq!(degraded(check), ["capture proof", "tracefs"]);
    }
}
