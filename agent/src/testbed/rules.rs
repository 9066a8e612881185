//! Each mesh's real capture rules, as `iptables-restore` input in the
//! shapes its own sources and golden files give: Istio's sidecar rules
//! (istio-iptables) and ambient's in-pod rules (istio-cni), Linkerd's
//! proxy-init, Kuma's and Consul's. Sources are cited per mesh.
//!
//! Comments (`-m comment`) are left out: chains, order, matches and targets
//! are the real ones.

/// The `*nat` table's header as `iptables-save` writes it: the built-in
/// chains, then the mesh's own (`chains`).
fn nat_header(chains: &[&str]) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for c in chains {
        s.push_str(&format!(":{c} - [0:0]\n"));
    }
    s
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
    /// `includeOutboundPorts` (`-q`): captured whatever the ranges.
    pub include_ports: Vec<u16>,
}

/// Istio's outbound/inbound capture rules, as `istio-iptables` writes them
/// (REDIRECT to 15001 outbound, 15006 inbound; uid/gid 1337 exempt).
pub fn istio_rules(v6: bool) -> String {
    istio_rules_with(v6, &CaptureSettings::default())
}

/// [`istio_rules`] for a pod with these capture settings, in the shapes
/// istio-iptables gives them (its golden files): excluded ports return
/// first in ISTIO_OUTPUT; excluded ranges return after loopback; included
/// ports jump to ISTIO_REDIRECT next, then included ranges one by one, or
/// `*` all that is left.
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
    for p in &c.include_ports {
        last.push_str(&format!(
            "-A ISTIO_OUTPUT -p tcp --dport {p} -j ISTIO_REDIRECT\n"
        ));
    }
    match &c.include {
        None => last.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"),
        Some(list) => {
            for r in list.iter().filter(family) {
                last.push_str(&format!("-A ISTIO_OUTPUT -d {r} -j ISTIO_REDIRECT\n"));
            }
        }
    }
    let nat = nat_header(&[
        "ISTIO_INBOUND",
        "ISTIO_IN_REDIRECT",
        "ISTIO_OUTPUT",
        "ISTIO_REDIRECT",
    ]);
    format!(
        "{nat}-A PREROUTING -p tcp -j ISTIO_INBOUND
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
    let [hbone, plain, out] = super::mesh::ZTUNNEL_PORTS;
    let (lo, probe) = if v6 {
        ("::1/128", "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164")
    } else {
        ("127.0.0.1/32", "169.254.7.127")
    };
    let nat = nat_header(&["ISTIO_PRERT", "ISTIO_OUTPUT"]);
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
{nat}-A OUTPUT -j ISTIO_OUTPUT
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
    let nat = nat_header(&["PROXY_INIT_OUTPUT", "PROXY_INIT_REDIRECT"]);
    format!(
        "{nat}-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports {LINKERD_IGNORE_INBOUND} -j RETURN
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
    let nat = nat_header(&[
        "KUMA_MESH_INBOUND",
        "KUMA_MESH_INBOUND_REDIRECT",
        "KUMA_MESH_OUTBOUND",
        "KUMA_MESH_OUTBOUND_REDIRECT",
    ]);
    format!(
        "{nat}-A PREROUTING -p tcp -j KUMA_MESH_INBOUND
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
    let nat = nat_header(&[
        "CONSUL_PROXY_INBOUND",
        "CONSUL_PROXY_IN_REDIRECT",
        "CONSUL_PROXY_OUTPUT",
        "CONSUL_PROXY_REDIRECT",
        "CONSUL_DNS_REDIRECT",
    ]);
    format!(
        "{nat}-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports {outbound}
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
