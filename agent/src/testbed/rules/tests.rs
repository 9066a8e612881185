//! The meshes' rules in the shapes of their sources' golden files.

use super::*;

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
    assert_eq!(
        MeshBed::istio().rules(false),
        super::super::net::istio_rules(false)
    );
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
