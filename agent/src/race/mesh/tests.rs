//! The profiles' data and their use: parsing, the operator's file, and a
//! pod's mesh from the API or the kernel's evidence.

use super::*;

#[test]
fn the_builtin_profiles_parse_and_istio_is_the_default() {
    let p = Profiles::builtin();
    let istio = p.default_profile();
    assert_eq!(istio.name, "istio");
    assert_eq!(istio.outbound_port, 15001);
    assert_eq!(istio.proxy_uids, [1337]);
    assert!(istio.reserved(15099) && !istio.reserved(15100) && !istio.reserved(8080));
    assert!(p.by_container("istio-proxy").is_some());
    assert_eq!(
        p.by_listen(1337, 15001).map(|m| m.name.as_str()),
        Some("istio")
    );
    assert!(p.by_listen(1000, 15001).is_none());
}

#[test]
fn istio_recommendations_are_filled_in() {
    let p = Profiles::builtin();
    let istio = p.default_profile();
    let none = Mitigation {
        hold: Some(false),
        native_sidecar: Some(false),
    };
    assert!(
        istio
            .startup_recommendation(&none, true)
            .starts_with("enable holdApplicationUntilProxyStarts")
    );
    let r = istio.inbound_recommendation(
        crate::race::When::Bind,
        &[8080],
        &["127.0.0.1:8080".into()],
        &["10.0.0.2:8080".into()],
        None,
    );
    assert_eq!(
        r,
        "the app listens on 127.0.0.1:8080 only, while the proxy dials 10.0.0.2:8080: make the app listen on 0.0.0.0 (or ::) or the pod IP (Istio analyzer IST0143)"
    );
    let r =
        istio.inbound_recommendation(crate::race::When::Shutdown, &[80, 81], &[], &[], Some(true));
    assert!(r.contains("port 80, 81") && r.ends_with("so the app's own drain is what matters"));
    assert!(r.contains("istio-proxy runs as a native sidecar"));
}

/// A file written to a scratch directory of this test; removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("connscope-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn file(&self, text: &str) -> std::path::PathBuf {
        let f = self.0.join("profiles.toml");
        std::fs::write(&f, text).unwrap();
        f
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_operators_file_changes_a_profile_or_adds_one() {
    let dir = Scratch::new("profiles");
    let f = dir.file(
        r#"
# Our Istio build names its proxy container differently.
[[profile]]
name = "istio"
proxy_containers = ["my-envoy"]
[profile.recommendations]
shutdown = "ask the platform team"

# Our own Envoy-based mesh: Istio's shape, its own uid and name.
[[profile]]
name = "acme"
extends = "istio"
proxy_containers = ["acme-proxy"]
proxy_uids = [4242]
"#,
    );
    let p = Profiles::load(Some(&f)).unwrap();
    let istio = p.get("istio").unwrap();
    assert_eq!(
        p.by_container("my-envoy").map(|m| m.name.as_str()),
        Some("istio")
    );
    assert!(p.by_container("istio-proxy").is_none());
    assert_eq!(istio.shutdown_recommendation(), "ask the platform team");
    assert!(
        istio
            .recommendations
            .startup
            .contains("holdApplicationUntilProxyStarts")
    );
    assert_eq!(
        (istio.outbound_port, istio.proxy_uids.as_slice()),
        (15001, &[1337][..])
    );
    let acme = p.get("acme").unwrap();
    assert_eq!(
        p.by_listen(4242, 15001).map(|m| m.name.as_str()),
        Some("acme")
    );
    assert_eq!(acme.proxy_containers, ["acme-proxy"]);
    // It extends the changed Istio profile, file order.
    assert_eq!(acme.shutdown_recommendation(), "ask the platform team");
}

#[test]
fn ambient_mode_is_data_an_operator_can_change_key_by_key() {
    let builtin = Profiles::builtin();
    let a = builtin.ambient();
    assert_eq!(&*a.mesh, "istio-ambient");
    assert_eq!(a.ports(), [15008, 15006, 15001]);
    assert_eq!(a.comm, "ztunnel");
    assert_eq!(a.label.0, "istio.io/dataplane-mode");
    let dir = Scratch::new("ambient");
    let f = dir.file(
        r#"
[[profile]]
name = "istio"
[profile.ambient]
comm = "my-ztunnel"
"#,
    );
    let p = Profiles::load(Some(&f)).unwrap();
    assert_eq!(p.ambient().comm, "my-ztunnel");
    assert_eq!(p.ambient().inbound_port, 15008, "the other keys stay");
    let typo = dir.file("[[profile]]\nname = \"istio\"\n[profile.ambient]\nhbone = 1\n");
    let e = format!("{:#}", Profiles::load(Some(&typo)).unwrap_err());
    assert!(e.contains("hbone"), "{e}");
}

#[test]
fn bad_files_say_why() {
    let dir = Scratch::new("badprofiles");
    for (text, why) in [
        ("[[profile]]\nname = \"x\"\n", "missing field"),
        ("[[profile]\n", "not a TOML file"),
        ("nonsense = 1\n", "unknown key `nonsense`"),
        ("[[profile]]\nproxy_uids = [1]\n", "needs a `name`"),
        (
            "[[profile]]\nname = \"x\"\nextends = \"nope\"\n",
            "not defined before it",
        ),
        (
            "[[profile]]\nname = \"istio\"\nproxy_portz = [1]\n",
            "unknown field `proxy_portz`",
        ),
        (
            "[[profile]]\nname = \"Istio Mesh\"\nextends = \"istio\"\n",
            "[a-z0-9-]",
        ),
        (
            "[[profile]]\nname = \"istio\"\noutbound_port = 9\n",
            "proxy_ports must hold outbound_port",
        ),
        (
            "[[profile]]\nname = \"istio\"\nreserved_ports = [\"9-1\"]\n",
            "empty port range",
        ),
    ] {
        let e = format!("{:#}", Profiles::load(Some(&dir.file(text))).unwrap_err());
        assert!(e.contains(why), "{why:?} in {e}");
    }
    assert!(
        format!("{:#}", Profiles::load(Some(&dir.0)).unwrap_err()).contains("not a regular file")
    );
    assert!(Profiles::load(Some(&dir.0.join("absent"))).is_err());
}

#[test]
fn the_older_flags_override_istio_only_when_given() {
    let mut p = Profiles::builtin();
    p.override_default(None, None, None).unwrap();
    assert_eq!(p.default_profile().outbound_port, 15001);
    p.override_default(Some(15101), None, Some(1400)).unwrap();
    let istio = p.default_profile();
    assert_eq!(
        (istio.outbound_port, istio.proxy_uids.as_slice()),
        (15101, &[1400][..])
    );
    assert!(istio.proxy_ports.contains(&15101));
}

#[test]
fn config_flag_reads_json_and_yaml() {
    assert!(config_flag(
        r#"{"holdApplicationUntilProxyStarts": true}"#,
        "holdApplicationUntilProxyStarts"
    ));
    assert!(config_flag(
        "holdApplicationUntilProxyStarts: true\n",
        "holdApplicationUntilProxyStarts"
    ));
    assert!(!config_flag(
        "holdApplicationUntilProxyStarts: false",
        "holdApplicationUntilProxyStarts"
    ));
}

#[test]
fn other_meshes_are_told_apart_by_uid_and_port() {
    let p = Profiles::builtin();
    for (uid, port, mesh) in [
        (2102, 4140, "linkerd"),
        (5678, 15001, "kuma"),
        (5995, 15001, "consul"),
        (1337, 15001, "istio"),
    ] {
        assert_eq!(p.by_listen(uid, port).map(|m| m.name.as_str()), Some(mesh));
    }
    assert_eq!(
        p.by_container("linkerd-proxy").map(|m| m.name.as_str()),
        Some("linkerd")
    );
    assert_eq!(p.outbound_ports(), [4140, 15001]);
    let consul = p.get("consul").unwrap();
    // Consul captures the pod's own address and 127.0.0.2, not 127.0.0.1.
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert!(consul.never_captured(ip("127.0.0.1"), None, &[]));
    assert!(!consul.never_captured(ip("127.0.0.2"), None, &[]));
    assert!(!consul.never_captured(ip("10.0.0.2"), Some(ip("10.0.0.2")), &[ip("10.0.0.2")]));
    let istio = p.get("istio").unwrap();
    assert!(istio.never_captured(ip("10.0.0.2"), Some(ip("10.0.0.2")), &[]));
}

#[test]
fn each_mesh_reads_its_own_mitigation() {
    use crate::k8s::PodInfo;
    let p = Profiles::builtin();
    let pod = |ann: &[(&str, &str)]| PodInfo {
        annotations: ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..crate::k8s::pod::tests_support::pod()
    };
    let linkerd = p.get("linkerd").unwrap();
    assert_eq!(
        linkerd.mitigation(&pod(&[])).hold,
        Some(true),
        "on by default"
    );
    assert_eq!(
        linkerd
            .mitigation(&pod(&[("config.linkerd.io/proxy-await", "disabled")]))
            .hold,
        Some(false)
    );
    let consul = p.get("consul").unwrap();
    let grace = "consul.hashicorp.com/sidecar-proxy-lifecycle-startup-grace-period-seconds";
    assert_eq!(consul.mitigation(&pod(&[(grace, "0")])).hold, Some(false));
    assert_eq!(consul.mitigation(&pod(&[(grace, "15")])).hold, Some(true));
    let kuma = p.get("kuma").unwrap();
    assert_eq!(kuma.mitigation(&pod(&[])).hold, Some(false));
    assert_eq!(
        kuma.mitigation(&pod(&[("kuma.io/wait-for-dataplane-ready", "enabled")]))
            .hold,
        Some(true)
    );
    let marked = pod(&[("consul.hashicorp.com/connect-inject-status", "injected")]);
    assert_eq!(p.of_pod(&marked).map(|m| m.name.as_str()), Some("consul"));
    assert!(
        p.of_pod(&pod(&[(
            "consul.hashicorp.com/connect-inject-status",
            "skipped"
        )]))
        .is_none()
    );
    assert!(
        linkerd
            .startup_recommendation(&Mitigation::default(), true)
            .contains("proxy-await")
    );
}

/// When the API shows the proxy container, its `postStart` hook says
/// whether the app is held: the injector writes it from the pod's
/// annotation and the mesh-wide setting alike (a mesh-wide hold has no
/// annotation; a custom lifecycle drops the hook the annotation asked for).
#[test]
fn the_proxy_s_post_start_hook_is_what_holds_the_app() {
    use crate::k8s::{PodInfo, pod::SpecContainer};
    let p = Profiles::builtin();
    let pod = |ann: &[(&str, &str)], proxy: &str, init: bool, post_start: &[&str]| PodInfo {
        annotations: ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        spec_containers: vec![
            SpecContainer {
                name: proxy.into(),
                image: None,
                init,
                post_start: post_start.iter().map(|s| s.to_string()).collect(),
            },
            SpecContainer {
                name: "app".into(),
                image: None,
                init: false,
                post_start: Vec::new(),
            },
        ],
        ..crate::k8s::pod::tests_support::pod()
    };
    let hold = |m: &str, p2: &PodInfo| p.get(m).unwrap().mitigation(p2).hold;
    let istio_on = r#"{"holdApplicationUntilProxyStarts": true}"#;
    let wait = ["pilot-agent", "wait"];
    // Mesh-wide: no annotation, the hook is there.
    assert_eq!(
        hold("istio", &pod(&[], "istio-proxy", false, &wait)),
        Some(true)
    );
    // The annotation, but a custom lifecycle without the hook.
    let custom = pod(
        &[("proxy.istio.io/config", istio_on)],
        "istio-proxy",
        false,
        &[],
    );
    assert_eq!(hold("istio", &custom), Some(false));
    // A native sidecar is not held this way.
    assert_eq!(
        hold("istio", &pod(&[], "istio-proxy", true, &wait)),
        Some(false)
    );
    // Another program's hook is not the hold.
    let other = pod(&[], "istio-proxy", false, &["sh", "-c", "sleep 5"]);
    assert_eq!(hold("istio", &other), Some(false));
    // Linkerd: on by default, unless the spec shows no hook.
    let awaited = [
        "/usr/lib/linkerd/linkerd-await",
        "--timeout=2m",
        "--port=4191",
    ];
    assert_eq!(
        hold("linkerd", &pod(&[], "linkerd-proxy", false, &awaited)),
        Some(true)
    );
    assert_eq!(
        hold("linkerd", &pod(&[], "linkerd-proxy", false, &[])),
        Some(false)
    );
    let kuma_wait = ["kuma-dp", "wait", "--url", "http://localhost:9901/ready"];
    assert_eq!(
        hold("kuma", &pod(&[], "kuma-sidecar", false, &kuma_wait)),
        Some(true)
    );
    // Without the proxy in the spec, the annotation decides.
    let no_spec = PodInfo {
        spec_containers: Vec::new(),
        ..pod(
            &[("proxy.istio.io/config", istio_on)],
            "istio-proxy",
            false,
            &[],
        )
    };
    assert_eq!(hold("istio", &no_spec), Some(true));
}
