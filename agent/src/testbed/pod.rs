//! Simulated pods on a real kernel: cgroup v2 directories shaped like
//! kubelet's (systemd driver) and runtime metadata files shaped like
//! containerd's or CRI-O's. Processes are moved in with `testbed enter`.
//! Dropping a pod kills its processes and removes its directories and files.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{attribute::kubelet::Qos, attribute::runtime::Roots};

/// The image the test bed's istio-proxy containers run.
pub const PROXY_IMAGE: &str = "docker.io/istio/proxyv2:1.22.3";

/// The image a test-bed container runs, as the runtimes' files name it:
/// a mesh's proxy image for its proxy container (Istio's for istio-proxy,
/// `rules.rs` for the others), else one per namespace and container.
pub fn image(namespace: &str, container: &str) -> String {
    super::mesh::proxy_image(container)
        .unwrap_or_else(|| format!("registry.example/{namespace}/{container}:1.4.2"))
}

/// Which runtime's files to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Containerd,
    Crio,
}

/// One container of a simulated pod.
#[derive(Debug)]
pub struct Container {
    pub name: String,
    pub id: String,
    /// Absolute cgroup directory.
    pub cgroup: PathBuf,
}

/// A simulated pod.
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub flavor: Flavor,
    pub qos: Qos,
    /// Absolute pod-level cgroup directory.
    pub cgroup: PathBuf,
    pub containers: Vec<Container>,
    roots: Roots,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh UUID-shaped pod uid and 64-hex container ids, unique per process.
fn hex(n: usize, salt: &str) -> String {
    let seed = format!(
        "{}-{}-{}-{salt}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    // FNV-1a stretched to n hex digits: unique enough for test fixtures.
    let mut out = String::new();
    let mut h: u64 = 0xcbf29ce484222325;
    let mut i = 0u64;
    while out.len() < n {
        for b in seed.bytes().chain(i.to_le_bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        out.push_str(&format!("{h:016x}"));
        i += 1;
    }
    out.truncate(n);
    out
}

fn new_uid() -> String {
    let h = hex(32, "uid");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Pod {
    /// Creates the cgroups and metadata of a pod with these containers.
    /// `cgroup_root` is the cgroup2 mount.
    pub fn create(
        cgroup_root: &Path,
        roots: &Roots,
        flavor: Flavor,
        qos: Qos,
        namespace: &str,
        name: &str,
        containers: &[&str],
    ) -> Result<Pod> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| sweep_stale(cgroup_root));
        let uid = new_uid();
        let u = uid.replace('-', "_");
        let mut dir = cgroup_root.join("kubepods.slice");
        let mut made_dirs = Vec::new();
        // Parents are shared by concurrent pods: someone else may create
        // (or remove, when empty) them at the same moment; retry briefly.
        let mk = |d: &Path, made: &mut Vec<PathBuf>| -> Result<()> {
            for _ in 0..50 {
                match std::fs::create_dir(d) {
                    Ok(()) => {
                        made.push(d.to_path_buf());
                        return Ok(());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).with_context(|| format!("mkdir {}", d.display())),
                }
            }
            anyhow::bail!("mkdir {}: parent kept disappearing", d.display())
        };
        mk(&dir, &mut made_dirs)?;
        let pod_dir = match qos {
            Qos::Guaranteed => dir.join(format!("kubepods-pod{u}.slice")),
            Qos::Burstable | Qos::BestEffort => {
                let q = if qos == Qos::Burstable {
                    "burstable"
                } else {
                    "besteffort"
                };
                dir = dir.join(format!("kubepods-{q}.slice"));
                mk(&dir, &mut made_dirs)?;
                dir.join(format!("kubepods-{q}-pod{u}.slice"))
            }
        };
        for _ in 0..20 {
            mk(&dir, &mut made_dirs)?;
            if pod_dir.parent().is_some_and(|p| p.exists()) {
                match std::fs::create_dir(&pod_dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("mkdir {}", pod_dir.display()));
                    }
                }
            }
        }
        anyhow::ensure!(pod_dir.is_dir(), "could not create {}", pod_dir.display());
        register(&uid, &pod_dir);
        let mut pod = Pod {
            uid,
            namespace: namespace.into(),
            name: name.into(),
            flavor,
            qos,
            cgroup: pod_dir,
            containers: Vec::new(),
            roots: roots.clone(),
        };
        for c in containers {
            pod.add_container(c)?;
        }
        Ok(pod)
    }

    /// Adds a container: its cgroup and its runtime metadata file.
    pub fn add_container(&mut self, name: &str) -> Result<&Container> {
        let id = hex(64, name);
        let scope = match self.flavor {
            Flavor::Containerd => format!("cri-containerd-{id}.scope"),
            Flavor::Crio => format!("crio-{id}.scope"),
        };
        let cgroup = self.cgroup.join(scope);
        std::fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        self.write_metadata(&id, name)?;
        self.containers.push(Container {
            name: name.into(),
            id,
            cgroup,
        });
        Ok(self.containers.last().expect("just pushed"))
    }

    fn config_path(&self, id: &str) -> PathBuf {
        match self.flavor {
            Flavor::Containerd => self
                .roots
                .containerd
                .join("k8s.io")
                .join(id)
                .join("config.json"),
            Flavor::Crio => self
                .roots
                .crio
                .join(id)
                .join("userdata")
                .join("config.json"),
        }
    }

    fn write_metadata(&self, id: &str, name: &str) -> Result<()> {
        let ann = match self.flavor {
            Flavor::Containerd => serde_json::json!({
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": name,
                "io.kubernetes.cri.sandbox-name": self.name,
                "io.kubernetes.cri.sandbox-namespace": self.namespace,
                "io.kubernetes.cri.sandbox-uid": self.uid,
                "io.kubernetes.cri.image-name": image(&self.namespace, name),
            }),
            Flavor::Crio => serde_json::json!({
                "io.kubernetes.cri-o.ContainerType": "container",
                "io.kubernetes.container.name": name,
                "io.kubernetes.pod.name": self.name,
                "io.kubernetes.pod.namespace": self.namespace,
                "io.kubernetes.pod.uid": self.uid,
                "io.kubernetes.cri-o.ImageName": image(&self.namespace, name),
            }),
        };
        let cfg = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["/app"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "annotations": ann,
        });
        let p = self.config_path(id);
        std::fs::create_dir_all(p.parent().context("config dir")?)?;
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(())
    }

    /// Overwrites a container's metadata file (to test broken files).
    pub fn corrupt_metadata(&self, container: &str, contents: &[u8]) -> Result<()> {
        let c = self.container(container)?;
        std::fs::write(self.config_path(&c.id), contents)?;
        Ok(())
    }

    /// Deletes a container's metadata file (the runtime cannot say).
    pub fn remove_metadata(&self, container: &str) -> Result<()> {
        let c = self.container(container)?;
        std::fs::remove_file(self.config_path(&c.id))?;
        Ok(())
    }

    /// A container by name.
    pub fn container(&self, name: &str) -> Result<&Container> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no container {name}"))
    }

    /// Kills a container's processes and removes its cgroup and metadata.
    pub fn remove_container(&mut self, name: &str) -> Result<()> {
        let i = self
            .containers
            .iter()
            .position(|c| c.name == name)
            .with_context(|| format!("no container {name}"))?;
        let c = self.containers.remove(i);
        kill_cgroup(&c.cgroup);
        let _ = std::fs::remove_dir_all(
            self.config_path(&c.id)
                .parent()
                .unwrap_or(Path::new("/nonexistent")),
        );
        if self.flavor == Flavor::Crio {
            let _ = std::fs::remove_dir_all(self.roots.crio.join(&c.id));
        }
        Ok(())
    }
}

/// Kills every process of a cgroup (bounded wait) and removes it.
pub fn kill_cgroup(dir: &Path) {
    let deadline = Instant::now() + super::slow(Duration::from_secs(5));
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        if !dir.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let names: Vec<String> = self.containers.iter().map(|c| c.name.clone()).collect();
        for n in names {
            let _ = self.remove_container(&n);
        }
        kill_cgroup(&self.cgroup);
        let _ = std::fs::remove_file(registry_file(std::process::id(), &self.uid));
        // Shared parents (kubepods.slice...): whoever leaves them empty
        // removes them (remove_dir refuses a non-empty directory).
        if let Some(qos) = self.cgroup.parent() {
            let _ = std::fs::remove_dir(qos);
            if let Some(top) = qos.parent().filter(|t| t.ends_with("kubepods.slice")) {
                let _ = std::fs::remove_dir(top);
            }
        }
    }
}

/// Where live simulated pods are listed, one file per pod named
/// `<pid>-<uid>` holding its cgroup directory: a test killed with SIGKILL
/// cannot run its destructors, so the next test run removes what it left.
const REGISTRY: &str = "/run/connscope-testbed/pods";

fn registry_file(pid: u32, uid: &str) -> PathBuf {
    Path::new(REGISTRY).join(format!("{pid}-{uid}"))
}

fn register(uid: &str, pod_dir: &Path) {
    let f = registry_file(std::process::id(), uid);
    let written = std::fs::create_dir_all(REGISTRY)
        .and_then(|()| std::fs::write(&f, pod_dir.as_os_str().as_encoded_bytes()));
    // Once per process: unprivileged benches create a thousand pods.
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = written {
        WARNED.call_once(|| {
            eprintln!(
                "testbed: cannot record {} in {REGISTRY}: {e}",
                pod_dir.display()
            )
        });
    }
}

/// Removes the cgroups of simulated pods whose creating process is gone
/// (killed before it could clean up), so they cannot skew later tests.
/// Only directories this testbed recorded, under `cgroup_root`, are touched.
pub fn sweep_stale(cgroup_root: &Path) {
    let Ok(entries) = std::fs::read_dir(REGISTRY) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .split_once('-')
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(dir) = std::fs::read_to_string(e.path()).map(PathBuf::from) else {
            continue;
        };
        if dir.starts_with(cgroup_root) && dir.is_dir() {
            let children: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|c| c.path())
                .filter(|c| c.is_dir())
                .collect();
            for c in children {
                kill_cgroup(&c);
            }
            kill_cgroup(&dir);
            for parent in dir.ancestors().skip(1).take(2) {
                if parent.starts_with(cgroup_root) && parent != cgroup_root {
                    let _ = std::fs::remove_dir(parent);
                }
            }
            eprintln!("testbed: removed stale pod cgroup {}", dir.display());
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// The cgroup2 mount of this machine (from /proc/self/mountinfo).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")?;
    crate::attribute::cgroup::cgroup2_mount(&mi).context("no cgroup2 mount on this machine")
}

/// `testbed enter`: joins a network namespace and a cgroup, then execs.
pub fn enter(netns: Option<&str>, cgroup: Option<&Path>, argv: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    if let Some(cg) = cgroup {
        std::fs::write(cg.join("cgroup.procs"), "0")
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    if let Some(ns) = netns {
        super::net::enter_netns(ns)?;
    }
    let (prog, args) = argv.split_first().context("nothing to exec")?;
    let err = std::process::Command::new(prog).args(args).exec();
    Err(err).with_context(|| format!("exec {prog}"))
}
