//! The meshes as the test bed runs them: what each proxy container looks
//! like from the kernel (container name, image, uid, process names, ports,
//! the address it dials the app from), and which capture rules
//! (`rules.rs`) it installs. This is the bed's own model of the real meshes,
//! written from their sources, not from the agent's profiles: the
//! end-to-end tests check the profiles against it. The facts are collected
//! with their sources in /work/shared/mesh-facts.md (issue #19).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::rules;

/// ztunnel's ports in a pod's netns, as istio/istio
/// `cni/pkg/config/config.go` has them: HBONE inbound 15008, plaintext
/// inbound 15006, outbound 15001 (the bed's own, not the agent's profile).
pub const ZTUNNEL_PORTS: [u16; 3] = [15008, 15006, 15001];

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
            Kind::Istio => rules::istio_rules(v6),
            Kind::Linkerd => {
                rules::linkerd_rules(v6, self.uid, self.inbound_port, self.outbound_port)
            }
            Kind::Kuma => rules::kuma_rules(
                v6,
                self.uid,
                self.inbound_port,
                self.outbound_port,
                self.dns_port,
            ),
            Kind::Consul => rules::consul_rules(
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
