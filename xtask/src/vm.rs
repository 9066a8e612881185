//! `cargo xtask vm`: the agent on the kernels fleets run, not only on this
//! machine's. Boots Debian's own kernel packages in QEMU guests through
//! virtme-ng, with this machine's filesystem as the guest's root, and runs a
//! command inside each: by default the kernel-matrix suite (`connscope
//! check` and the kernel-facing integration tests), whose results become
//! KERNELS.md and the README's kernel table.
//!
//! KVM where it works; where it does not (nested KVM here asserts on an MSR),
//! the guest is booted again under TCG, QEMU's software emulation.

use std::{
    fmt::Write as _,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A guest kernel of the matrix: the newest Debian package of one series.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Series {
    /// What `--kernel` calls it.
    pub(crate) name: &'static str,
    /// Where fleets run it (for the README table).
    pub(crate) fleet: &'static str,
    /// Package names are `<prefix>N<suffix>` with N all digits (so the
    /// `-rt`, `-cloud` and `-unsigned` flavours never match); the largest N
    /// is taken.
    prefix: &'static str,
    suffix: &'static str,
}

/// The matrix: Debian 11's, 12's and 12's newer kernel, all from Debian's
/// archive (5.10 from `bullseye`, reached through a private apt state so the
/// system's sources stay as they are).
pub(crate) const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        fleet: "Debian 11, Amazon Linux 2, COS 93 era: the oldest supported",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.1",
        fleet: "Debian 12, Amazon Linux 2023",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        name: "6.12",
        fleet: "Debian 12 backports and 13, recent cloud kernels",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

/// The private apt sources: the Debian suites the matrix's kernels come from.
const APT_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";

/// How long the package lists are trusted before `apt-get update` again.
const LISTS_FRESH: Duration = Duration::from_secs(24 * 3600);

/// Guest size: the kernel tests and the agent fit well in this.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "3G";

/// A KVM guest that has not started our script by then never will (nested
/// KVM that hangs in early boot): boot it again under TCG.
const KVM_START_DEADLINE: Duration = Duration::from_secs(90);

/// KVM failed once in this run: the next guests go straight to TCG.
static KVM_FAILED: AtomicBool = AtomicBool::new(false);

/// A kernel unpacked and ready to boot.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) series: Series,
    /// `uname -r` of the guest, e.g. `6.1.0-57-amd64`.
    pub(crate) release: String,
    /// The Debian package version, e.g. `6.1.192-3`.
    pub(crate) version: String,
    vmlinuz: PathBuf,
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG (software emulation)",
        }
    }
}

/// What one guest run gave back.
#[derive(Debug)]
pub(crate) struct GuestRun {
    pub(crate) accel: Accel,
    /// The command's exit status inside the guest.
    pub(crate) status: i32,
    pub(crate) output: String,
    pub(crate) elapsed: Duration,
    /// The directory the guest wrote into (output, status, console log).
    pub(crate) results: PathBuf,
}

/// `--kernel` values: one series by name, or `all`.
pub(crate) fn select(name: &str) -> Result<Vec<Series>> {
    if name == "all" {
        return Ok(SERIES.to_vec());
    }
    SERIES
        .iter()
        .find(|s| s.name == name)
        .map(|s| vec![*s])
        .with_context(|| {
            let names: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            format!("no kernel {name:?} in the matrix: one of {names:?} or \"all\"")
        })
}

/// Where downloaded and unpacked kernels are kept across clones.
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CONNSCOPE_VM_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("connscope/vm")
}

/// apt with its own sources, lists and cache under `dir`: the system's apt
/// state is neither read nor changed.
fn apt(dir: &Path, tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.arg("-q")
        .arg("-o")
        .arg(format!(
            "Dir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ))
        .arg("-o")
        .arg(format!(
            "Dir::Etc::SourceParts={}",
            dir.join("sources.list.d").display()
        ))
        .arg("-o")
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
        .arg("-o")
        .arg(format!(
            "Dir::State::status={}",
            dir.join("status").display()
        ))
        .arg("-o")
        .arg(format!("Dir::Cache={}", dir.join("cache").display()))
        .arg("-o")
        .arg("APT::Sandbox::User=root");
    c
}

/// The private apt state, with package lists no older than a day.
fn apt_state(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(dir.join("sources.list"), APT_SOURCES)?;
    let status = dir.join("status");
    if !status.exists() {
        std::fs::write(&status, "")?;
    }
    let stamp = dir.join("lists/.updated");
    let fresh = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < LISTS_FRESH));
    if !fresh {
        let st = apt(&dir, "apt-get")
            .arg("update")
            .status()
            .context("running apt-get (Debian's apt is needed to fetch guest kernels)")?;
        if !st.success() {
            bail!(
                "apt-get update of the kernel matrix's sources failed ({st}): guest kernels cannot be had"
            );
        }
        std::fs::write(&stamp, "")?;
    }
    Ok(dir)
}

/// The newest package of `series` in the lists: its name and version.
fn newest(apt_dir: &Path, series: &Series) -> Result<(String, String)> {
    let out = apt(apt_dir, "apt-cache")
        .args(["pkgnames", series.prefix])
        .output()
        .context("running apt-cache")?;
    let names = String::from_utf8_lossy(&out.stdout);
    let name = names
        .lines()
        .filter_map(|n| {
            let abi = n.strip_prefix(series.prefix)?.strip_suffix(series.suffix)?;
            let abi: u32 = abi.parse().ok()?;
            Some((abi, n.to_string()))
        })
        .max()
        .map(|(_, n)| n)
        .with_context(|| {
            format!(
                "no {}N{} package in Debian's archive: kernel {} cannot be had",
                series.prefix, series.suffix, series.name
            )
        })?;
    let policy = apt(apt_dir, "apt-cache")
        .args(["show", "--no-all-versions", &name])
        .output()
        .context("running apt-cache show")?;
    let version = String::from_utf8_lossy(&policy.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .with_context(|| format!("apt-cache show {name}: no version"))?;
    Ok((name, version))
}

/// Downloads (once) and unpacks the newest kernel of `series`, with its
/// module tree indexed and reachable at `/lib/modules/<release>`, where
/// virtme-ng and the guest's modprobe look.
pub(crate) fn prepare(series: &Series) -> Result<Prepared> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("creating the kernel cache {}", cache.display()))?;
    let apt_dir = apt_state(&cache)?;
    let (package, version) = newest(&apt_dir, series)?;
    let release = package.trim_start_matches("linux-image-").to_string();
    let root = cache.join(&release);
    let ready = root.join(".ready");
    if !ready.exists() {
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs)?;
        eprintln!("xtask vm: fetching {package} {version}");
        let st = apt(&apt_dir, "apt-get")
            .args(["download", &format!("{package}={version}")])
            .current_dir(&debs)
            .status()?;
        if !st.success() {
            bail!(
                "downloading {package} {version} failed ({st}): kernel {} cannot be had",
                series.name
            );
        }
        let deb = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("{package}: no .deb after the download"))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        unpack(&deb, &root)?;
        let st = Command::new("depmod")
            .arg("-b")
            .arg(&root)
            .arg(&release)
            .status()
            .context("running depmod (Debian package kmod)")?;
        if !st.success() {
            bail!("depmod for {release} failed ({st})");
        }
        std::fs::remove_file(&deb)?;
        std::fs::write(&ready, "")?;
    }
    link_modules(&root, &release)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{}: missing after unpacking", vmlinuz.display());
    }
    Ok(Prepared {
        series: *series,
        release,
        version,
        vmlinuz,
    })
}

/// Unpacks a .deb's files into `root` (no scripts run, nothing installed).
fn unpack(deb: &Path, root: &Path) -> Result<()> {
    let st = Command::new("dpkg").arg("-x").arg(deb).arg(root).status()?;
    if !st.success() {
        bail!("unpacking {} failed ({st})", deb.display());
    }
    Ok(())
}

/// Debian's headers of `kernel` (the `linux-headers-<release>` package and
/// the `linux-headers-*`/`linux-kbuild-*` packages it depends on), unpacked
/// (once) into its tree, with `/lib/modules/<release>/build` pointing at
/// them: bcc compiles its programs against them in the guest.
pub(crate) fn prepare_headers(kernel: &Prepared) -> Result<()> {
    let cache = cache_dir();
    let root = cache.join(&kernel.release);
    let ready = root.join(".headers-ready");
    if !ready.exists() {
        let apt_dir = apt_state(&cache)?;
        let top = format!("linux-headers-{}", kernel.release);
        let out = apt(&apt_dir, "apt-cache")
            .args(["depends", &top])
            .output()
            .context("running apt-cache depends")?;
        let mut packages = vec![top.clone()];
        packages.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
                .filter(|d| d.starts_with("linux-headers-") || d.starts_with("linux-kbuild-"))
                .map(str::to_string),
        );
        let debs = cache
            .join("debs")
            .join(format!("headers-{}", kernel.release));
        let _ = std::fs::remove_dir_all(&debs);
        std::fs::create_dir_all(&debs)?;
        eprintln!("xtask vm: fetching {}", packages.join(" "));
        let st = apt(&apt_dir, "apt-get")
            .arg("download")
            .args(&packages)
            .current_dir(&debs)
            .status()?;
        if !st.success() {
            bail!(
                "downloading the headers of {} failed ({st})",
                kernel.release
            );
        }
        for deb in std::fs::read_dir(&debs)? {
            unpack(&deb?.path(), &root)?;
        }
        std::fs::remove_dir_all(&debs)?;
        // The package's links are absolute (/usr/src/...): into the tree.
        let modules = root.join("lib/modules").join(&kernel.release);
        for (link, dir) in [
            ("build", format!("linux-headers-{}", kernel.release)),
            (
                "source",
                format!("linux-headers-{}", common_of(&kernel.release)),
            ),
        ] {
            let target = root.join("usr/src").join(dir);
            if target.is_dir() {
                let _ = std::fs::remove_file(modules.join(link));
                std::os::unix::fs::symlink(&target, modules.join(link))?;
            }
        }
        if !modules.join("build/include").is_dir() {
            bail!(
                "the headers of {} are incomplete after unpacking",
                kernel.release
            );
        }
        std::fs::write(&ready, "")?;
    }
    Ok(())
}

/// `6.1.0-57-amd64` -> `6.1.0-57-common`: the flavour-independent headers.
fn common_of(release: &str) -> String {
    match release.rsplit_once('-') {
        Some((base, _flavour)) => format!("{base}-common"),
        None => release.to_string(),
    }
}

/// `/lib/modules/<release>` -> the unpacked tree. A real directory there is
/// an installed kernel of that release and is used as it is.
fn link_modules(root: &Path, release: &str) -> Result<()> {
    let target = root.join("lib/modules").join(release);
    let modules = Path::new("/lib/modules");
    std::fs::create_dir_all(modules)?;
    let link = modules.join(release);
    match std::fs::symlink_metadata(&link) {
        Ok(m) if !m.file_type().is_symlink() => return Ok(()),
        Ok(_) if std::fs::read_link(&link)? == target => return Ok(()),
        Ok(_) => std::fs::remove_file(&link)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(&target, &link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

/// `f` over `items`, `at_once` at a time, results in the items' order: a
/// single-threaded TCG guest uses one host core.
pub(crate) fn in_parallel<I: Sync, T: Send>(
    items: &[I],
    at_once: usize,
    f: impl Fn(&I) -> T + Sync,
) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<Vec<Option<T>>> =
        std::sync::Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..at_once.min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    done.lock().expect("no panic while held")[i] = Some(r);
                }
            });
        }
    });
    done.into_inner()
        .expect("no panic while held")
        .into_iter()
        .flatten()
        .collect()
}

/// `s` quoted for a POSIX shell.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A shell command line from words.
pub(crate) fn shell_words(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// Whether this machine offers KVM at all (it may still fail when nested).
fn kvm_offered() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boots `kernel` and runs the shell command `command` in the guest, in the
/// workspace, as root, with `CI` passed through. The command's output is
/// shown as it comes (prefixed with the kernel's name) and returned.
pub(crate) fn run_in_guest(
    workspace: &Path,
    kernel: &Prepared,
    command: &str,
    timeout: Duration,
) -> Result<GuestRun> {
    let results = workspace.join("target/vm").join(&kernel.release);
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let mut accel = if kvm_offered()
        && !KVM_FAILED.load(Ordering::Relaxed)
        && std::env::var_os("CONNSCOPE_VM_TCG").is_none()
    {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    loop {
        let script = write_script(workspace, kernel, command, &results, accel)?;
        let started = Instant::now();
        match boot(kernel, &script, &results, accel, timeout)? {
            Booted::Finished => {
                let status: i32 = std::fs::read_to_string(results.join("status"))?
                    .trim()
                    .parse()
                    .context("the guest's status file")?;
                let output = std::fs::read_to_string(results.join("output")).unwrap_or_default();
                return Ok(GuestRun {
                    accel,
                    status,
                    output,
                    elapsed: started.elapsed(),
                    results,
                });
            }
            Booted::NeverStarted if accel == Accel::Kvm => {
                eprintln!(
                    "xtask vm: {} did not boot under KVM (nested KVM refused here); booting it under TCG",
                    kernel.release
                );
                accel = Accel::Tcg;
                KVM_FAILED.store(true, Ordering::Relaxed);
            }
            Booted::NeverStarted => bail!(
                "kernel {} ({}) did not boot under {}: see {}",
                kernel.series.name,
                kernel.release,
                accel.label(),
                results.join("console.log").display()
            ),
            Booted::Unfinished(why) => bail!(
                "kernel {} ({}): the command did not finish in the guest: {why}; console: {}",
                kernel.series.name,
                kernel.release,
                results.join("console.log").display()
            ),
        }
    }
}

/// How many times slower than hardware the kernel tests run under `accel`:
/// their deadlines and scenario delays are scaled by it
/// (`CONNSCOPE_TEST_TIME_SCALE`, read by the tests' fixture).
fn time_scale(accel: Accel) -> u32 {
    match accel {
        Accel::Kvm => 1,
        Accel::Tcg => 5,
    }
}

/// The guest's script: marks its start, sets the environment, runs
/// `command` in the workspace with its output and status in `results`.
fn write_script(
    workspace: &Path,
    kernel: &Prepared,
    command: &str,
    results: &Path,
    accel: Accel,
) -> Result<PathBuf> {
    let script = results.join("guest.sh");
    let r = quote(&results.display().to_string());
    let mut s = String::new();
    writeln!(s, "#!/bin/bash")?;
    writeln!(s, ": > {r}/started")?;
    writeln!(
        s,
        "export PATH={} HOME=/root CI={} RUST_BACKTRACE=1 CONNSCOPE_GUEST={} VM_RESULTS={r} CONNSCOPE_TEST_TIME_SCALE={}",
        quote(&std::env::var("PATH").unwrap_or_default()),
        quote(&std::env::var("CI").unwrap_or_default()),
        quote(kernel.series.name),
        time_scale(accel),
    )?;
    writeln!(
        s,
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing"
    )?;
    writeln!(
        s,
        "cd {} || exit 99",
        quote(&workspace.display().to_string())
    )?;
    writeln!(s, "( {command} ) > {r}/output 2>&1")?;
    writeln!(
        s,
        "echo $? > {r}/status.tmp && mv {r}/status.tmp {r}/status"
    )?;
    std::fs::write(&script, s)?;
    Ok(script)
}

enum Booted {
    /// The command ran to its end (its status is in the results).
    Finished,
    /// The guest never reached our script.
    NeverStarted,
    /// The guest started the command but did not finish it.
    Unfinished(String),
}

/// One QEMU run of the guest, the console kept in `console.log`, the
/// command's output echoed as it grows.
fn boot(
    kernel: &Prepared,
    script: &Path,
    results: &Path,
    accel: Accel,
    timeout: Duration,
) -> Result<Booted> {
    for f in ["started", "status", "output"] {
        let _ = std::fs::remove_file(results.join(f));
    }
    let console = std::fs::File::create(results.join("console.log"))?;
    let mut vng = Command::new("vng");
    vng.arg("--run")
        .arg(&kernel.vmlinuz)
        // Without --verbose the guest's output is lost on the console fallback.
        .args(["--verbose", "--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
        .arg("--rwdir")
        .arg(results)
        .arg("--exec")
        .arg(format!("bash {}", quote(&script.display().to_string())))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Its own process group: a timeout ends virtme-ng and its QEMU.
        .process_group(0);
    if accel == Accel::Tcg {
        // One host thread for all vCPUs: with multi-threaded TCG, a vCPU can
        // run a stale translation of code the kernel is live-patching on
        // another (a tracepoint's static key flipped by an attach), and the
        // guest oopses on the patch's int3 (seen on 6.12). Still SMP.
        vng.arg("--disable-kvm")
            // `=`: a separate value starting with `-` is taken for an option.
            .arg("--qemu-opts=-accel tcg,thread=single");
    }
    let mut child = vng
        .spawn()
        .context("running vng (virtme-ng; `cargo xtask setup` installs it)")?;
    eprintln!(
        "xtask vm: booting {} ({} {}) under {}",
        kernel.series.name,
        kernel.release,
        kernel.version,
        accel.label()
    );
    let begin = Instant::now();
    let mut shown = 0u64;
    let prefix = format!("[{}] ", kernel.series.name);
    let outcome = loop {
        shown = echo_new(&results.join("output"), shown, &prefix);
        let exited = child.try_wait()?;
        let started = results.join("started").exists();
        if results.join("status").exists() {
            break Booted::Finished;
        }
        if let Some(st) = exited {
            break if started {
                Booted::Unfinished(format!("the guest stopped ({st})"))
            } else {
                Booted::NeverStarted
            };
        }
        if !started && accel == Accel::Kvm && begin.elapsed() > KVM_START_DEADLINE {
            break Booted::NeverStarted;
        }
        if begin.elapsed() > timeout {
            break Booted::Unfinished(format!("no result within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    echo_new(&results.join("output"), shown, &prefix);
    // The guest powers off after the command; give it a moment, then end
    // what we started.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            // SAFETY: signalling the process group we created for vng.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(outcome)
}

/// Prints what `path` gained since byte `from`, line by line with `prefix`.
fn echo_new(path: &Path, from: u64, prefix: &str) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else {
        return from;
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return from;
    }
    // Only whole lines; the rest waits for its newline.
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return from;
    };
    let mut out = std::io::stderr().lock();
    for line in String::from_utf8_lossy(&buf[..=end]).lines() {
        let _ = writeln!(out, "{prefix}{line}");
    }
    from + end as u64 + 1
}

#[cfg(test)]
mod tests;
