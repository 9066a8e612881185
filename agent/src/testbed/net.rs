//! Real network namespaces for the demo and the tests: a "pod" namespace with
//! a mesh's capture rules (`rules.rs`), and an
//! "upstream" test host reached over veth.
//!
//! Every address used lives in a namespace created here; everything is
//! removed on drop, so a failing test still cleans up.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs a command, failing with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread (only it) into the named namespace
/// (`/run/netns/<name>`): sockets it makes from then on belong there.
pub fn enter_netns(name: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("network namespace {name}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")
}

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        let _ = sh("ip", &["netns", "del", name]);
        sh("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// A command that will run inside the namespace (to be spawned).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Inode of the namespace, as the kernel reports it in events.
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(format!("/run/netns/{}", self.name))?.ino())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A pod namespace and an upstream host namespace joined by a veth pair.
#[derive(Debug)]
pub struct Topology {
    // Field order matters: namespaces are deleted after nothing else needs them.
    pub pod: Netns,
    pub upstream: Netns,
    pub pod_v4: Ipv4Addr,
    pub upstream_v4: Ipv4Addr,
    pub pod_v6: Ipv6Addr,
    pub upstream_v6: Ipv6Addr,
}

impl Topology {
    /// Builds both namespaces. `tag` keeps concurrent tests apart (1..=250);
    /// names are `cs<tag>-pod` / `cs<tag>-up`.
    pub fn create(tag: u8, istio: bool) -> Result<Self> {
        let pod = Netns::create(&format!("cs{tag}-pod"))?;
        let upstream = Netns::create(&format!("cs{tag}-up"))?;
        let (pv, uv) = (format!("csp{tag}"), format!("csu{tag}"));
        let _ = sh("ip", &["link", "del", &pv]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &pv,
                "netns",
                &pod.name,
                "type",
                "veth",
                "peer",
                "name",
                &uv,
                "netns",
                &upstream.name,
            ],
        )?;
        let t = Topology {
            pod_v4: Ipv4Addr::new(10, 213, tag, 2),
            upstream_v4: Ipv4Addr::new(10, 213, tag, 1),
            pod_v6: format!("fd00:213:{tag:x}::2").parse()?,
            upstream_v6: format!("fd00:213:{tag:x}::1").parse()?,
            pod,
            upstream,
        };
        for (ns, dev, v4, v6) in [
            (&t.pod, &pv, t.pod_v4, t.pod_v6),
            (&t.upstream, &uv, t.upstream_v4, t.upstream_v6),
        ] {
            ns.exec("ip", &["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ns.exec(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            )?;
            ns.exec("ip", &["link", "set", dev, "up"])?;
        }
        if istio {
            t.install_istio_rules()?;
        }
        Ok(t)
    }

    /// Installs Istio's capture rules in the pod namespace (IPv4 and IPv6).
    pub fn install_istio_rules(&self) -> Result<()> {
        self.install_istio_rules_with(&super::rules::CaptureSettings::default())
    }

    /// Installs (or replaces) the capture rules for these settings.
    pub fn install_istio_rules_with(&self, c: &super::rules::CaptureSettings) -> Result<()> {
        self.install_rules(|v6| super::rules::istio_rules_with(v6, c))
    }

    /// Installs a mesh's capture rules (`rules.rs`) in the pod namespace.
    pub fn install_mesh_rules(&self, mesh: &super::mesh::MeshBed) -> Result<()> {
        self.install_rules(|v6| mesh.rules(v6))
    }

    /// Installs Istio ambient's in-pod rules in the pod namespace (what
    /// istio-cni does once the pod's network is up).
    pub fn install_ambient_rules(&self) -> Result<()> {
        self.install_rules(super::rules::ambient_rules)
    }

    /// Feeds `rules(v6)` to `iptables-restore` and `ip6tables-restore` in
    /// the pod namespace (each replaces the tables it names).
    pub fn install_rules(&self, rules: impl Fn(bool) -> String) -> Result<()> {
        for (tool, v6) in [("iptables-restore", false), ("ip6tables-restore", true)] {
            let mut child = self
                .pod
                .command(tool)
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("spawning {tool}"))?;
            use std::io::Write as _;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(rules(v6).as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("{tool}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(())
    }

    /// Upstream address for a family and port.
    pub fn upstream_addr(&self, v6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.upstream_v6.into()
        } else {
            self.upstream_v4.into()
        };
        SocketAddr::new(ip, port)
    }
}
