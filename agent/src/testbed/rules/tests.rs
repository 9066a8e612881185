//! The meshes' rules in the shapes of their sources' golden files.

use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::testbed::mesh::{MeshBed, proxy_image};

/// The `-A <chain>` lines of a rule set, in order.
fn chain<'a>(rules: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("-A {name} ");
    rules.lines().filter(|l| l.starts_with(&prefix)).collect()
}

/// proxy-init's shape: the proxy uid returns first, then all of `lo`,
/// then the ignored ports, and the rest goes to 4140; inbound, the
/// proxy's own ports return before everything goes to 4143.
#[test]
fn linkerd_rules_have_proxy_inits_shape() {
    for v6 in [false, true] {
        let m = MeshBed::linkerd();
        let r = m.rules(v6);
        assert_eq!(
            chain(&r, "PROXY_INIT_OUTPUT"),
            [
                "-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A PROXY_INIT_OUTPUT -o lo -j RETURN",
                "-A PROXY_INIT_OUTPUT -p tcp -m multiport --dports 4567,4568 -j RETURN",
                "-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
            ]
        );
        assert_eq!(
            chain(&r, "PROXY_INIT_REDIRECT"),
            [
                "-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190,4191,4567,4568 -j RETURN",
                "-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
            ]
        );
        assert_eq!(
            chain(&r, "PREROUTING"),
            ["-A PREROUTING -j PROXY_INIT_REDIRECT"]
        );
        assert_eq!(chain(&r, "OUTPUT"), ["-A OUTPUT -j PROXY_INIT_OUTPUT"]);
        for p in &m.early_ports {
            assert!(LINKERD_IGNORE_INBOUND.contains(&p.to_string()));
        }
    }
}

/// Kuma's golden: inbound all to 15006; outbound the passthrough source
/// first, the kuma-dp loopback hairpin to the inbound chain, others' `lo`
/// out, kuma-dp out, 127.0.0.1 out, the rest to 15001.
#[test]
fn kuma_rules_match_the_default_golden() {
    for (v6, six, lo) in [
        (false, "127.0.0.6/32", "127.0.0.1/32"),
        (true, "::6/128", "::1/128"),
    ] {
        let r = kuma_rules(v6, 5678, 15006, 15001, None);
        assert_eq!(
            chain(&r, "KUMA_MESH_OUTBOUND"),
            [
                format!("-A KUMA_MESH_OUTBOUND -s {six} -o lo -j RETURN"),
                format!(
                    "-A KUMA_MESH_OUTBOUND ! -d {lo} -o lo -p tcp -m owner --uid-owner 5678 -j KUMA_MESH_INBOUND_REDIRECT"
                ),
                "-A KUMA_MESH_OUTBOUND -o lo -p tcp -m owner ! --uid-owner 5678 -j RETURN".into(),
                "-A KUMA_MESH_OUTBOUND -m owner --uid-owner 5678 -j RETURN".into(),
                format!("-A KUMA_MESH_OUTBOUND -d {lo} -j RETURN"),
                "-A KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT".into(),
            ]
        );
        assert_eq!(
            chain(&r, "KUMA_MESH_OUTBOUND_REDIRECT"),
            ["-A KUMA_MESH_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001"]
        );
        assert_eq!(
            chain(&r, "KUMA_MESH_INBOUND_REDIRECT"),
            ["-A KUMA_MESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006"]
        );
        assert_eq!(
            chain(&r, "OUTPUT"),
            ["-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND"]
        );
        assert!(!r.contains("15053"));
    }
}

/// With builtin DNS, UDP/53 goes to 15053 ahead of the TCP jump, except
/// kuma-dp's own queries.
#[test]
fn kuma_dns_redirect_comes_before_the_tcp_jump() {
    let r = MeshBed::kuma().rules(false);
    assert_eq!(
        chain(&r, "OUTPUT"),
        [
            "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 5678 -j RETURN",
            "-A OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
            "-A OUTPUT -p tcp -m tcp --dport 53 -m owner ! --uid-owner 5678 -j RETURN",
            "-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND",
        ]
    );
}

/// Consul's `Setup` after its `-I`s: connect-init's uid, the proxy's,
/// 127.0.0.1, then everything to 15001; inbound everything to 20000.
#[test]
fn consul_rules_have_the_sdks_shape() {
    let r = MeshBed::consul().rules(false);
    assert_eq!(
        chain(&r, "CONSUL_PROXY_OUTPUT"),
        [
            "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN",
            "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN",
            "-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT",
        ]
    );
    assert_eq!(
        chain(&r, "CONSUL_PROXY_REDIRECT"),
        ["-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001"]
    );
    assert_eq!(
        chain(&r, "CONSUL_PROXY_INBOUND"),
        ["-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT"]
    );
    assert_eq!(
        chain(&r, "CONSUL_PROXY_IN_REDIRECT"),
        ["-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000"]
    );
    assert!(
        !r.contains("-o lo"),
        "Consul captures loopback but 127.0.0.1"
    );
    assert!(
        consul_rules(true, 5995, &[5996], 20000, 15001)
            .contains("-A CONSUL_PROXY_OUTPUT -d ::1/128 -j RETURN")
    );
    // `-I` one by one: the annotation's uids (inserted last) come first.
    let two = consul_rules(false, 5995, &[5996, 7000], 20000, 15001);
    assert_eq!(
        &chain(&two, "CONSUL_PROXY_OUTPUT")[..2],
        [
            "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 7000 -j RETURN",
            "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN",
        ]
    );
}

/// Every rule set is one `*nat` table whose custom chains are declared,
/// and Istio's is `net.rs`'s unchanged.
#[test]
fn every_mesh_declares_its_chains_and_istio_is_unchanged() {
    for m in MeshBed::all() {
        for v6 in [false, true] {
            let r = m.rules(v6);
            assert!(
                r.starts_with("*nat\n") && r.ends_with("COMMIT\n"),
                "{}",
                m.name
            );
            for l in r.lines().filter(|l| l.starts_with("-A ")) {
                let jump = l.split(" -j ").nth(1).unwrap_or("").split(' ').next();
                let target = jump.unwrap_or("");
                let builtin = ["RETURN", "REDIRECT", "ACCEPT", "DNAT"].contains(&target);
                assert!(
                    builtin || r.contains(&format!("\n:{target} ")),
                    "{}: {l} jumps to an undeclared chain",
                    m.name
                );
            }
        }
    }
    assert_eq!(MeshBed::istio().rules(false), istio_rules(false));
    assert_eq!(
        proxy_image("istio-proxy").as_deref(),
        Some(super::super::pod::PROXY_IMAGE)
    );
    assert!(proxy_image("app").is_none());
}

#[test]
fn inbound_sources() {
    assert_eq!(
        MeshBed::kuma().inbound_source_ip(false),
        Some(Ipv4Addr::new(127, 0, 0, 6).into())
    );
    assert_eq!(MeshBed::linkerd().inbound_source_ip(true), None);
    assert_eq!(
        MeshBed::consul().inbound_source_ip(true),
        Some(Ipv6Addr::LOCALHOST.into())
    );
}

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
            assert!(at(&format!("-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN")) < redirect);
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
        include_ports: vec![5432],
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
        &out[out.len() - 4..],
        &[
            "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A ISTIO_OUTPUT -p tcp --dport 5432 -j ISTIO_REDIRECT",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        ]
    );
    assert!(!r.contains("fd00::/16"));
    assert!(istio_rules_with(true, &c).contains("-A ISTIO_OUTPUT -d fd00::/16 -j ISTIO_REDIRECT"));
    let none = CaptureSettings {
        include: Some(vec![]),
        ..CaptureSettings::default()
    };
    assert!(!istio_rules_with(false, &none).contains("-j ISTIO_REDIRECT\n"));
}
