//! Build chores: `cargo xtask setup | test | demo | bench | soak | vm`.
//!
//! `setup` installs what a fresh machine lacks (nightly rust-src, bpf-linker
//! built against the nightly's own LLVM, Debian packages the tests use); it
//! is idempotent and takes seconds when everything is present. `test` and
//! `demo` run it first, so the README's two commands work on a new machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

mod bench;
mod guest_bench;
mod matrix;
mod vm;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and packages the build and tests need.
    Setup,
    /// The whole test suite: formatting, clippy, unit and kernel tests.
    Test {
        /// Extra arguments for `cargo test` (after `--` go to the harness).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run `connscope demo` (needs root).
    Demo {
        /// The inbound race instead (`connscope demo --inbound`).
        #[arg(long)]
        inbound: bool,
    },
    /// Benchmarks (needs root); results into BENCHMARKS.md.
    Bench {
        /// A short run of each benchmark, results not written.
        #[arg(long)]
        smoke: bool,
        /// The connect-path bench in each kernel matrix guest instead
        /// (fentry and tracepoint paths, bpftrace, bcc; BENCHMARKS.md).
        #[arg(long)]
        matrix: bool,
        /// With --matrix: one of 5.10, 6.1, 6.12, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// With --matrix: boot nothing; write the section from the guests'
        /// last results.
        #[arg(long, hide = true)]
        report_only: bool,
    },
    /// Inside a matrix guest: the connect-path bench (run by `bench --matrix`
    /// and by the kernel matrix's smoke run).
    #[command(hide = true)]
    BenchGuest {
        /// The connscope binary (with the test bed's `storm`).
        #[arg(long)]
        bin: PathBuf,
        #[arg(long)]
        smoke: bool,
        /// Where to write the measurements (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Bounded soak under mixed load (needs root); figures into RELIABILITY.md.
    Soak {
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
    },
    /// Boot Debian's kernels in QEMU guests (needs root) and run COMMAND in
    /// each, or by default the kernel matrix (`connscope check` and the
    /// kernel tests; results into KERNELS.md and the README's table).
    Vm {
        /// One of 5.10, 6.1, 6.12, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Minutes one guest may run.
        #[arg(long, default_value_t = 20)]
        timeout_minutes: u64,
        /// A command to run in the workspace inside each guest, as root.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

/// Debian packages the tests and demo use; the last four boot the kernel
/// matrix's guests (QEMU, `depmod` for their module trees, busybox for
/// virtme-ng's initramfs, and objcopy to strip what the guests load).
const PACKAGES: &[&str] = &[
    "iptables",
    "iproute2",
    "bpftool",
    "prometheus",
    "prometheus-alertmanager",
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "binutils",
    // Real client runtimes the kernel tests dial with (`runtimes.rs`).
    "golang-go",
    "nodejs",
    "openjdk-17-jdk-headless",
    "curl",
];
/// Debian packages of the tracers the full bench compares against (not
/// installed for the smoke run in the test suite, which reports them as
/// unavailable when absent).
const BENCH_PACKAGES: &[&str] = &["bpftrace", "bpfcc-tools"];
/// PyPI packages the deploy tests use.
const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "helm-python-sdk==0.2.2",
    "PyYAML",
];
/// virtme-ng, which boots the kernel matrix's guests (`vng`).
const VIRTME_NG: &str = "virtme-ng==1.42";
/// bpf-linker version known to work with the pinned aya.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            test(&args)
        }
        Cmd::Bench {
            smoke,
            matrix: true,
            kernel,
            report_only,
        } => {
            setup()?;
            apt_install_missing(BENCH_PACKAGES)?;
            run(cargo().args(["build", "--package", "connscope", "--release"]))?;
            let bin = workspace().join("target/release/connscope");
            if smoke {
                bail!("--matrix --smoke: the matrix's smoke run is part of `cargo xtask test`");
            }
            guest_bench::run(&workspace(), &vm::select(&kernel)?, &bin, report_only)
        }
        Cmd::BenchGuest { bin, smoke, out } => guest_bench::in_guest(&bin, smoke, &out),
        Cmd::Bench { smoke, .. } => {
            setup()?;
            if !smoke {
                apt_install_missing(BENCH_PACKAGES)?;
            }
            let mut b = cargo();
            b.args(["build", "--package", "connscope"]);
            if !smoke {
                b.arg("--release");
            }
            run(&mut b)?;
            bench::run(&workspace(), smoke)?;
            if !smoke {
                run(cargo().args(["bench", "--package", "connscope", "--bench", "pipeline"]))?;
                bench::record_pipeline(&workspace())?;
            }
            Ok(())
        }
        Cmd::Soak { minutes } => {
            setup()?;
            run(cargo().args(["build", "--release", "--package", "connscope"]))?;
            bench::soak(&workspace(), minutes)
        }
        Cmd::Vm {
            kernel,
            timeout_minutes,
            command,
        } => {
            setup()?;
            let kernels = vm::select(&kernel)?;
            if command.is_empty() {
                // Only a run of every kernel rewrites KERNELS.md and the
                // README's table: one kernel's run would drop the others.
                let report = if kernels.len() == vm::select("all")?.len() {
                    matrix::Report::Workspace
                } else {
                    matrix::Report::Target
                };
                return matrix::run(&workspace(), &kernels, report);
            }
            let mut failed = Vec::new();
            for series in &kernels {
                let k = vm::prepare(series)?;
                let r = vm::run_in_guest(
                    &workspace(),
                    &k,
                    &vm::shell_words(&command),
                    std::time::Duration::from_secs(timeout_minutes * 60),
                )?;
                eprintln!(
                    "xtask vm: {} ({}, {}): exit {} after {:.0} s",
                    series.name,
                    k.release,
                    r.accel.label(),
                    r.status,
                    r.elapsed.as_secs_f64()
                );
                if r.status != 0 {
                    failed.push(series.name);
                }
            }
            if !failed.is_empty() {
                bail!("the command failed in the guests of {failed:?}");
            }
            Ok(())
        }
        Cmd::Demo { inbound } => {
            setup()?;
            run(cargo().args(["build", "--package", "connscope"]))?;
            let bin = workspace().join("target/debug/connscope");
            let mut demo = Command::new(bin);
            demo.arg("demo");
            if inbound {
                demo.arg("--inbound");
            }
            run(&mut demo)
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn setup() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context(
            "the nightly toolchain is missing: `rustup toolchain install nightly` (it builds the eBPF programs)",
        )?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let have_linker = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !have_linker {
        install_bpf_linker(&sysroot)?;
    }
    // Python tools the deploy tests use: kubernetes-validate for manifests,
    // helm-python-sdk (Helm's own engine) to render the chart.
    let have_py = output(
        Command::new("python3").args(["-c", "import kubernetes_validate, helm_python, yaml"]),
    )
    .is_some();
    if !have_py {
        run(Command::new("python3")
            .args(["-m", "pip", "install", "-q"])
            .args(PYTHON_PACKAGES))?;
    }
    if !output(Command::new("vng").arg("--version")).is_some_and(|v| v.contains("1.42")) {
        run(Command::new("python3").args(["-m", "pip", "install", "-q", VIRTME_NG]))?;
    }
    apt_install_missing(PACKAGES)
}

/// Installs the Debian packages of `packages` that are not installed yet
/// (nothing, and no `apt-get update`, when all are).
fn apt_install_missing(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// bpf-linker against the nightly's own LLVM, so its bitcode matches rustc's.
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .unwrap_or_default()
        .to_string();
    let link = lib.join("libLLVM.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(Path::new(&llvm)) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", sysroot),
    )
}

/// The production build (the Dockerfile's: no `testbed` feature) passes
/// clippy, has `connscope explain`, and its binary has no test bed: no
/// `testbed` or `demo` command, no storm generator or stand-in sidecar
/// linked in.
fn production_build() -> Result<()> {
    let no_feature = ["--package", "connscope", "--no-default-features"];
    run(cargo()
        .args(["clippy", "--all-targets"])
        .args(no_feature)
        .args(["--", "-D", "warnings"]))?;
    // Same target dir: only connscope itself is compiled again. Copied out,
    // since the test build that follows puts its own binary in that place.
    run(cargo().arg("build").args(no_feature))?;
    let bin = workspace().join("target/connscope-production");
    std::fs::copy(workspace().join("target/debug/connscope"), &bin)?;
    for cmd in ["testbed", "demo"] {
        let st = Command::new(&bin)
            .args([cmd, "--help"])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if st.status.success() {
            bail!("the production binary still has `connscope {cmd}`");
        }
    }
    // On-call runs explain from the image's binary.
    let st = Command::new(&bin)
        .args(["explain", "--help"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !st.status.success() {
        bail!("the production binary lacks `connscope explain`");
    }
    let image = std::fs::read(&bin)?;
    for needle in ["testbed::storm", "testbed::sidecar", "connscope::demo"] {
        if image.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            bail!("the production binary contains {needle}");
        }
    }
    eprintln!("xtask: production build has no test bed");
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate is only compiled for the BPF target: lint it there too.
    // (`rustup run`: cargo's own CARGO path is the stable toolchain's binary.)
    let mut nightly = Command::new("rustup");
    nightly
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "connscope-ebpf",
        ])
        .args(["--bins", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir", "target/bpf-clippy"])
        .args(["--", "-D", "warnings"])
        .current_dir(workspace())
        .env_remove("RUSTC")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
    run(&mut nightly)?;
    production_build()?;
    run(cargo().args(["test", "--workspace"]).args(extra))?;
    // Smoke runs of every benchmark: short, numbers not recorded.
    run(cargo().args(["test", "--package", "connscope", "--bench", "pipeline"]))?;
    bench::run(&workspace(), true)?;
    // The kernel matrix: every guest kernel, then this machine's `check`.
    // Its report goes to target/vm/KERNELS.md; `cargo xtask vm` refreshes
    // the committed one.
    matrix::run(&workspace(), &vm::select("all")?, matrix::Report::Target)
}
