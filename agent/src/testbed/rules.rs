//! The other sidecar meshes as the test bed simulates them: each one's real
//! capture rules (as `iptables-restore` input, in the shapes its own sources
//! and golden files give) and what its proxy container looks like from the
//! kernel (container name, uid, process names, ports, the address it dials
//! the app from). This is the bed's own model of the real meshes, written
//! from their sources, not from the agent's profiles: the end-to-end tests
//! check the profiles against it. Sources are cited per mesh; the facts are
//! collected with their lines in /work/shared/mesh-facts.md (issue #19).
//!
//! Comments (`-m comment`) are left out of the rules, as in `net.rs`'s
//! Istio rules: chains, order, matches and targets are the real ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Which mesh's rules a [`MeshBed`] installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Istio,
    Linkerd,
    Kuma,
    Consul,
}

/// The source the stand-in proxy dials the app from, for inbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundSource {
    /// Bound to 127.0.0.6 (`::6`), dialing the original destination: Envoy's
    /// `inbound|passthrough` in Istio >= 1.10 and Kuma's `upstream_bind_config`.
    Passthrough,
    /// No bind, dialing the original destination (the pod IP): the kernel
    /// picks the pod IP as source. linkerd2-proxy's inbound `Forward`.
    PodIp,
    /// No bind, dialing 127.0.0.1 (`::1`) at the original port: Consul's
    /// local app cluster (`LocalServiceAddress` 127.0.0.1).
    Loopback,
}

/// A sidecar mesh as the test bed runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshBed {
    /// The profile name the agent should report (`mesh` label).
    pub name: String,
    pub kind: Kind,
    /// The proxy container's name.
    pub container: String,
    /// The image the runtime files name for the proxy container.
    pub image: String,
    /// The proxy's uid (and, in the stand-in, gid): exempt from capture.
    pub uid: u32,
    /// Further uids the rules exempt (Consul's connect-init, 5996).
    pub exempt_uids: Vec<u32>,
    /// The proxy process's comm.
    pub comm: String,
    /// The comm of the thread that dials the app inbound.
    pub worker_comm: String,
    /// Listeners opened at once (admin, readiness).
    pub early_ports: Vec<u16>,
    /// Outbound capture port: its LISTEN is "ready".
    pub outbound_port: u16,
    /// Inbound capture port.
    pub inbound_port: u16,
    /// DNS capture port (UDP), if the mesh redirects DNS.
    pub dns_port: Option<u16>,
    /// Where the proxy dials the app from.
    pub inbound_source: InboundSource,
}

impl MeshBed {
    /// Istio's sidecar, as `net.rs` and `sidecar.rs` have always run it.
    pub fn istio() -> MeshBed {
        MeshBed {
            name: "istio".into(),
            kind: Kind::Istio,
            container: crate::race::istio::PROXY_CONTAINER.into(),
            image: super::pod::PROXY_IMAGE.into(),
            uid: crate::race::istio::PROXY_UID,
            exempt_uids: Vec::new(),
            comm: "envoy".into(),
            worker_comm: super::inbound::WORKER_THREAD.into(),
            early_ports: vec![15021, 15090],
            outbound_port: 15001,
            inbound_port: 15006,
            dns_port: None,
            inbound_source: InboundSource::Passthrough,
        }
    }

    /// Linkerd: container `linkerd-proxy`, uid 2102, outbound 4140, inbound
    /// 4143, admin 4191 (its `/ready`), control 4190 (linkerd/linkerd2
    /// pkg/k8s/labels.go, charts/linkerd-control-plane/values.yaml,
    /// charts/partials/templates/_proxy.tpl). The process is
    /// `linkerd2-proxy`; its tokio workers are threads named `proxy`
    /// (linkerd/linkerd2-proxy linkerd2-proxy/src/rt.rs).
    pub fn linkerd() -> MeshBed {
        MeshBed {
            name: "linkerd".into(),
            kind: Kind::Linkerd,
            container: "linkerd-proxy".into(),
            image: "cr.l5d.io/linkerd/proxy:edge-25.8.3".into(),
            uid: 2102,
            exempt_uids: Vec::new(),
            comm: "linkerd2-proxy".into(),
            worker_comm: "proxy".into(),
            early_ports: vec![4191, 4190],
            outbound_port: 4140,
            inbound_port: 4143,
            dns_port: None,
            inbound_source: InboundSource::PodIp,
        }
    }

    /// Kuma / Kong Mesh: container `kuma-sidecar`, uid 5678, outbound 15001,
    /// inbound 15006, DNS 15053, Envoy admin 9901 and kuma-dp's readiness
    /// 9902 (kumahq/kuma pkg/plugins/runtime/k8s/util/names.go,
    /// pkg/config/plugins/runtime/k8s/config.go,
    /// pkg/transparentproxy/consts/consts.go). Envoy (run by kuma-dp) dials
    /// the app from 127.0.0.6 (pkg/xds/generator/inbound_proxy_generator.go).
    pub fn kuma() -> MeshBed {
        MeshBed {
            name: "kuma".into(),
            kind: Kind::Kuma,
            container: "kuma-sidecar".into(),
            image: "docker.io/kumahq/kuma-dp:2.11.4".into(),
            uid: 5678,
            exempt_uids: Vec::new(),
            comm: "envoy".into(),
            worker_comm: super::inbound::WORKER_THREAD.into(),
            early_ports: vec![9901, 9902],
            outbound_port: 15001,
            inbound_port: 15006,
            dns_port: Some(15053),
            inbound_source: InboundSource::Passthrough,
        }
    }

    /// Consul: container `consul-dataplane`, uid 5995 (5996, connect-init,
    /// exempt too), outbound 15001, inbound 20000, Envoy admin 19000,
    /// lifecycle 20600 (hashicorp/consul-k8s
    /// control-plane/connect-inject/webhook/{mesh_webhook,container_init,
    /// redirect_traffic}.go, constants/constants.go). Envoy (run by
    /// consul-dataplane) dials the app at 127.0.0.1
    /// (controllers/endpoints/endpoints_controller.go `LocalServiceAddress`).
    pub fn consul() -> MeshBed {
        MeshBed {
            name: "consul".into(),
            kind: Kind::Consul,
            container: "consul-dataplane".into(),
            image: "docker.io/hashicorp/consul-dataplane:1.8.1".into(),
            uid: 5995,
            exempt_uids: vec![5996],
            comm: "envoy".into(),
            worker_comm: super::inbound::WORKER_THREAD.into(),
            early_ports: vec![19000, 20600],
            outbound_port: 15001,
            inbound_port: 20000,
            dns_port: None,
            inbound_source: InboundSource::Loopback,
        }
    }

    /// The built-in meshes, Istio first.
    pub fn all() -> [MeshBed; 4] {
        [
            MeshBed::istio(),
            MeshBed::linkerd(),
            MeshBed::kuma(),
            MeshBed::consul(),
        ]
    }

    /// The capture rules for one family, as `iptables-restore` input.
    pub fn rules(&self, v6: bool) -> String {
        match self.kind {
            Kind::Istio => super::net::istio_rules(v6),
            Kind::Linkerd => linkerd_rules(v6, self.uid, self.inbound_port, self.outbound_port),
            Kind::Kuma => kuma_rules(
                v6,
                self.uid,
                self.inbound_port,
                self.outbound_port,
                self.dns_port,
            ),
            Kind::Consul => consul_rules(
                v6,
                self.uid,
                &self.exempt_uids,
                self.inbound_port,
                self.outbound_port,
            ),
        }
    }

    /// The proxy's inbound source address for a family, if it binds one.
    pub fn inbound_source_ip(&self, v6: bool) -> Option<IpAddr> {
        match (self.inbound_source, v6) {
            (InboundSource::Passthrough, false) => Some(Ipv4Addr::new(127, 0, 0, 6).into()),
            (InboundSource::Passthrough, true) => {
                Some(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into())
            }
            (InboundSource::Loopback, false) => Some(Ipv4Addr::LOCALHOST.into()),
            (InboundSource::Loopback, true) => Some(Ipv6Addr::LOCALHOST.into()),
            (InboundSource::PodIp, _) => None,
        }
    }
}

/// The proxy image the runtime files name for a mesh's proxy container
/// (None: not a proxy container the bed knows).
pub fn proxy_image(container: &str) -> Option<String> {
    MeshBed::all()
        .into_iter()
        .find(|m| m.container == container)
        .map(|m| m.image)
}

/// Inbound ports Linkerd's chart tells proxy-init to leave alone: control
/// 4190, admin 4191, and `proxyInit.ignoreInboundPorts` "4567,4568"
/// (linkerd/linkerd2 charts/partials/templates/_proxy-init.tpl,
/// charts/linkerd-control-plane/values.yaml).
const LINKERD_IGNORE_INBOUND: &str = "4190,4191,4567,4568";
/// `proxyInit.ignoreOutboundPorts` "4567,4568".
const LINKERD_IGNORE_OUTBOUND: &str = "4567,4568";

/// Linkerd's proxy-init rules in redirect-all mode with the chart's default
/// arguments (`--incoming-proxy-port 4143 --outgoing-proxy-port 4140
/// --proxy-uid 2102 --inbound-ports-to-ignore 4190,4191,4567,4568
/// --outbound-ports-to-ignore 4567,4568`), in the order
/// linkerd/linkerd2-proxy-init pkg/iptables/iptables.go `ConfigureFirewall`
/// writes them: PROXY_INIT_REDIRECT (ignored ports, then everything to the
/// inbound port) hooked from PREROUTING; PROXY_INIT_OUTPUT (the proxy uid,
/// then all of `lo`, then ignored ports return; everything else to the
/// outbound port) hooked from OUTPUT. The same rules for both families.
pub fn linkerd_rules(_v6: bool, uid: u32, inbound: u16, outbound: u16) -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PROXY_INIT_OUTPUT - [0:0]
:PROXY_INIT_REDIRECT - [0:0]
-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports {LINKERD_IGNORE_INBOUND} -j RETURN
-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-ports {inbound}
-A PREROUTING -j PROXY_INIT_REDIRECT
-A PROXY_INIT_OUTPUT -m owner --uid-owner {uid} -j RETURN
-A PROXY_INIT_OUTPUT -o lo -j RETURN
-A PROXY_INIT_OUTPUT -p tcp -m multiport --dports {LINKERD_IGNORE_OUTBOUND} -j RETURN
-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-ports {outbound}
-A OUTPUT -j PROXY_INIT_OUTPUT
COMMIT
"
    )
}

/// Kuma's transparent proxy as `kumactl install transparent-proxy` writes
/// it (kumahq/kuma test/transparentproxy/testdata/*-default.iptables.golden;
/// `ifPlaceholder` there is `lo`), with the DNS redirect of
/// `*-with-multiple-flags.iptables.golden` when `dns` is set (builtin DNS is
/// on by default on Kubernetes). The golden's `*raw` conntrack-zone rules
/// for UDP/53 are left out (they need xt_CT and only matter to DNS replies).
pub fn kuma_rules(v6: bool, uid: u32, inbound: u16, outbound: u16, dns: Option<u16>) -> String {
    let (six, lo) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let dns_rules = dns
        .map(|port| {
            format!(
                "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner {uid} -j RETURN
-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports {port}
-A OUTPUT -p tcp -m tcp --dport 53 -m owner ! --uid-owner {uid} -j RETURN
"
            )
        })
        .unwrap_or_default();
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUMA_MESH_INBOUND - [0:0]
:KUMA_MESH_INBOUND_REDIRECT - [0:0]
:KUMA_MESH_OUTBOUND - [0:0]
:KUMA_MESH_OUTBOUND_REDIRECT - [0:0]
-A PREROUTING -p tcp -j KUMA_MESH_INBOUND
{dns_rules}-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND
-A KUMA_MESH_INBOUND -p tcp -j KUMA_MESH_INBOUND_REDIRECT
-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {inbound}
-A KUMA_MESH_OUTBOUND -s {six} -o lo -j RETURN
-A KUMA_MESH_OUTBOUND ! -d {lo} -o lo -p tcp -m owner --uid-owner {uid} -j KUMA_MESH_INBOUND_REDIRECT
-A KUMA_MESH_OUTBOUND -o lo -p tcp -m owner ! --uid-owner {uid} -j RETURN
-A KUMA_MESH_OUTBOUND -m owner --uid-owner {uid} -j RETURN
-A KUMA_MESH_OUTBOUND -d {lo} -j RETURN
-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT
-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {outbound}
COMMIT
"
    )
}

/// Consul's rules as hashicorp/consul sdk/iptables/iptables.go `Setup`
/// applies them for consul-k8s (proxy uid 5995, `ExcludeUIDs` [5996],
/// inbound 20000, outbound 15001; connect-inject/webhook/redirect_traffic.go),
/// in the order they end up in: `ExcludeUIDs` are inserted (`-I`) at the
/// head of CONSUL_PROXY_OUTPUT, ahead of the proxy's own uid. No `-o lo`
/// rule: only 127.0.0.1 (`::1`) is left uncaptured. Without Consul DNS the
/// DNS chain is created empty.
pub fn consul_rules(v6: bool, uid: u32, exempt: &[u32], inbound: u16, outbound: u16) -> String {
    let lo = if v6 { "::1/128" } else { "127.0.0.1/32" };
    let mut exempt_rules = String::new();
    // Each `-I` goes to the head: the last inserted comes first.
    for u in exempt.iter().rev() {
        exempt_rules.push_str(&format!(
            "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner {u} -j RETURN\n"
        ));
    }
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_PROXY_IN_REDIRECT - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
:CONSUL_DNS_REDIRECT - [0:0]
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports {outbound}
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
{exempt_rules}-A CONSUL_PROXY_OUTPUT -m owner --uid-owner {uid} -j RETURN
-A CONSUL_PROXY_OUTPUT -d {lo} -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound}
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT
COMMIT
"
    )
}

#[cfg(test)]
mod tests;
