//! Real network namespaces for the demo and the tests: a "pod" namespace with
//! Istio's own capture rules (or another mesh's, from `rules.rs`), and an
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

/// A pod's outbound capture settings, as its
/// `traffic.sidecar.istio.io/*` annotations give them to istio-iptables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureSettings {
    /// `includeOutboundIPRanges`: None is `*` (everything); an empty list
    /// captures nothing.
    pub include: Option<Vec<String>>,
    /// `excludeOutboundIPRanges`.
    pub exclude: Vec<String>,
    /// `excludeOutboundPorts`.
    pub exclude_ports: Vec<u16>,
}

/// Istio's outbound/inbound capture rules, as `istio-iptables` writes them
/// (REDIRECT to 15001 outbound, 15006 inbound; uid/gid 1337 exempt).
pub fn istio_rules(v6: bool) -> String {
    istio_rules_with(v6, &CaptureSettings::default())
}

/// [`istio_rules`] for a pod with these capture settings, in the shapes
/// istio-iptables gives them (its golden files): excluded ports return
/// first in ISTIO_OUTPUT; excluded ranges return after loopback; included
/// ranges jump to ISTIO_REDIRECT one by one, or `*` all that is left.
/// Ranges of the other family are left out, as istio-iptables does.
pub fn istio_rules_with(v6: bool, c: &CaptureSettings) -> String {
    let (six, lo) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let family = |r: &&String| r.contains(':') == v6;
    let mut first = String::new();
    if !c.exclude_ports.is_empty() {
        let ports: Vec<String> = c.exclude_ports.iter().map(|p| p.to_string()).collect();
        first.push_str(&format!(
            "-A ISTIO_OUTPUT -p tcp -m multiport --dports {} -j RETURN\n",
            ports.join(",")
        ));
    }
    let mut last = String::new();
    for r in c.exclude.iter().filter(family) {
        last.push_str(&format!("-A ISTIO_OUTPUT -d {r} -j RETURN\n"));
    }
    match &c.include {
        None => last.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"),
        Some(list) => {
            for r in list.iter().filter(family) {
                last.push_str(&format!("-A ISTIO_OUTPUT -d {r} -j ISTIO_REDIRECT\n"));
            }
        }
    }
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
{first}-A ISTIO_OUTPUT -s {six} -o lo -j RETURN
-A ISTIO_OUTPUT ! -d {lo} -o lo -p tcp -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d {lo} -o lo -p tcp -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d {lo} -j RETURN
{last}-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
    )
}

/// Istio ambient's in-pod rules, as istio-cni writes them inside the pod's
/// netns (istio/istio `cni/pkg/iptables/iptables.go` `AppendInpodRules`,
/// golden file `cni/pkg/iptables/testdata/default.golden`, `_ipv6`): packets
/// marked 0x539 (1337, ztunnel's own) are never redirected; inbound TCP but
/// HBONE goes to ztunnel's plaintext port 15006 (15008 is reached directly
/// on ztunnel's listener), outbound TCP to 15001; 169.254.7.127 is the
/// node's SNAT address for kubelet probes. The golden file's raw-table DNS
/// conntrack-zone rules are left out (UDP only, nothing here uses them).
pub fn ambient_rules(v6: bool) -> String {
    let p = crate::race::mesh::installed().ambient();
    let (lo, probe) = if v6 {
        ("::1/128", "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164")
    } else {
        ("127.0.0.1/32", "169.254.7.127")
    };
    let (hbone, plain, out) = (p.inbound_port, p.plaintext_port, p.outbound_port);
    format!(
        "*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d {probe} -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d {lo} -p tcp ! --dport {hbone} -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports {plain}
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053
-A ISTIO_OUTPUT ! -d {lo} -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d {lo} -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports {out}
COMMIT
"
    )
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
        self.install_istio_rules_with(&CaptureSettings::default())
    }

    /// Installs (or replaces) the capture rules for these settings.
    pub fn install_istio_rules_with(&self, c: &CaptureSettings) -> Result<()> {
        self.install_rules(|v6| istio_rules_with(v6, c))
    }

    /// Installs a mesh's capture rules (`rules.rs`) in the pod namespace.
    pub fn install_mesh_rules(&self, mesh: &super::rules::MeshBed) -> Result<()> {
        self.install_rules(|v6| mesh.rules(v6))
    }

    /// Installs Istio ambient's in-pod rules in the pod namespace (what
    /// istio-cni does once the pod's network is up).
    pub fn install_ambient_rules(&self) -> Result<()> {
        self.install_rules(ambient_rules)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_outbound_and_exempt_1337() {
        let r = istio_rules(false);
        assert!(r.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(r.contains("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(r.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(istio_rules(true).contains("! -d ::1/128"));
        assert!(r.contains(
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
        ));
    }

    /// The inbound half as istio-iptables' golden files have it: every
    /// inbound TCP port but the proxy's own goes to 15006, and the proxy's
    /// dials of the app from 127.0.0.6 (`::6`) leave uncaptured.
    #[test]
    fn inbound_rules_redirect_to_15006_and_exempt_the_passthrough_source() {
        for (v6, six) in [(false, "127.0.0.6/32"), (true, "::6/128")] {
            let r = istio_rules(v6);
            let lines: Vec<&str> = r.lines().collect();
            let at = |l: &str| {
                lines
                    .iter()
                    .position(|x| *x == l)
                    .unwrap_or_else(|| panic!("{l} missing"))
            };
            let exempt = at(&format!("-A ISTIO_OUTPUT -s {six} -o lo -j RETURN"));
            assert_eq!(
                lines.iter().position(|l| l.starts_with("-A ISTIO_OUTPUT")),
                Some(exempt),
                "the passthrough source returns before any owner rule"
            );
            at("-A PREROUTING -p tcp -j ISTIO_INBOUND");
            let redirect = at("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT");
            for port in [15008, 15090, 15021, 15020] {
                assert!(
                    at(&format!("-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN")) < redirect
                );
            }
            at("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006");
        }
    }

    /// The rule lines of istio/istio `cni/pkg/iptables/testdata/
    /// default.golden` (iptables-save form), IPv4: every one of them, in
    /// the same order within each table.
    const AMBIENT_GOLDEN_V4: &[(&str, &str)] = &[
        ("mangle", "-A PREROUTING -j ISTIO_PRERT"),
        ("mangle", "-A OUTPUT -j ISTIO_OUTPUT"),
        (
            "mangle",
            "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        ),
        (
            "mangle",
            "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        ),
        ("nat", "-A OUTPUT -j ISTIO_OUTPUT"),
        ("nat", "-A PREROUTING -j ISTIO_PRERT"),
        (
            "nat",
            "-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT",
        ),
        (
            "nat",
            "-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT",
        ),
        (
            "nat",
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        ),
        (
            "nat",
            "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-port 15053",
        ),
        (
            "nat",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
        ),
        (
            "nat",
            "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        ),
        ("nat", "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT"),
        (
            "nat",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        ),
    ];

    #[test]
    fn ambient_rules_are_istio_cni_s_golden_shapes() {
        let r = ambient_rules(false);
        let mut table = "";
        let mut got = Vec::new();
        for l in r.lines() {
            if let Some(t) = l.strip_prefix('*') {
                table = t;
            } else if l.starts_with("-A ") {
                got.push((table, l));
            }
        }
        assert_eq!(got, AMBIENT_GOLDEN_V4);
        // The IPv6 rules differ only in loopback and the probe address.
        let v6 = ambient_rules(true);
        assert!(v6.contains(
            "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"
        ));
        assert!(!v6.contains("127.0.0.1"));
        assert_eq!(v6.lines().count(), r.lines().count());
    }

    #[test]
    fn capture_settings_take_istio_iptables_shapes() {
        let c = CaptureSettings {
            include: Some(vec!["10.0.0.0/8".into(), "fd00::/16".into()]),
            exclude: vec!["10.96.0.0/12".into()],
            exclude_ports: vec![22, 80, 443],
        };
        let r = istio_rules_with(false, &c);
        let out: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A ISTIO_OUTPUT"))
            .collect();
        assert_eq!(
            out.first(),
            Some(&"-A ISTIO_OUTPUT -p tcp -m multiport --dports 22,80,443 -j RETURN")
        );
        assert_eq!(
            &out[out.len() - 3..],
            &[
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
            ]
        );
        assert!(!r.contains("fd00::/16"));
        assert!(
            istio_rules_with(true, &c).contains("-A ISTIO_OUTPUT -d fd00::/16 -j ISTIO_REDIRECT")
        );
        let none = CaptureSettings {
            include: Some(vec![]),
            ..CaptureSettings::default()
        };
        assert!(!istio_rules_with(false, &none).contains("-j ISTIO_REDIRECT\n"));
    }
}
