//! Tests of revisions: images, proxy versions, bounds.

use super::*;
use crate::k8s::pod::{IstioAnnotations, SpecContainer, Workload};

fn spec(name: &str, image: &str, init: bool) -> SpecContainer {
    SpecContainer {
        name: name.into(),
        image: Some(image.into()),
        init,
        post_start: Vec::new(),
    }
}

fn pod(containers: Vec<SpecContainer>) -> PodInfo {
    PodInfo {
        uid: "u1".into(),
        namespace: "shop".into(),
        name: "checkout-7d9f8c6b5-xk2lp".into(),
        node: Some("node-a".into()),
        workload: Workload {
            kind: "Deployment".into(),
            name: "checkout".into(),
        },
        containers: Vec::new(),
        istio: IstioAnnotations {
            rev: Some("1-22-3".into()),
            ..Default::default()
        },
        pod_ips: Vec::new(),
        spec_containers: containers,
        template_hash: Some("7d9f8c6b5".into()),
        finished: false,
        annotations: Default::default(),
        labels: Default::default(),
        namespace_labels: Default::default(),
    }
}

#[test]
fn the_api_s_revision_is_the_contract() {
    let p = pod(vec![
        spec("istio-init", "docker.io/istio/proxyv2:1.22.3", true),
        spec("migrate", "registry.example/shop/migrate:7", true),
        spec("app", "registry.example/shop/checkout:1.4.2", false),
        spec("istio-proxy", "docker.io/istio/proxyv2:1.22.3", false),
    ]);
    let mut rejected = Vec::new();
    let r = Revision::from_api(&p, &mut rejected);
    assert!(rejected.is_empty());
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        serde_json::json!({
            "app_images": {"app": "registry.example/shop/checkout:1.4.2"},
            "proxy_image": "docker.io/istio/proxyv2:1.22.3",
            "proxy_version": "1.22.3",
            "istio_revision": "1-22-3",
            "pod_template_hash": "7d9f8c6b5",
            "node": "node-a",
            "source": "api"
        })
    );
    // A native sidecar proxy is an init container, and still the proxy.
    let native = pod(vec![
        spec("istio-proxy", "docker.io/istio/proxyv2:1.27.0", true),
        spec("app", "app:2", false),
    ]);
    let r = Revision::from_api(&native, &mut rejected);
    assert_eq!(r.proxy_version.as_deref(), Some("1.27.0"));
    assert_eq!(r.app_images.len(), 1);
}

#[test]
fn unknown_fields_are_absent() {
    let mut p = pod(vec![spec(
        "istio-proxy",
        "docker.io/istio/proxyv2@sha256:0123abcd",
        false,
    )]);
    p.istio.rev = None;
    p.template_hash = None;
    p.node = None;
    let r = Revision::from_api(&p, &mut Vec::new());
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        serde_json::json!({
            "proxy_image": "docker.io/istio/proxyv2@sha256:0123abcd",
            "source": "api"
        }),
        "a digest-only proxy image has no version"
    );
}

#[test]
fn hostile_values_are_left_out_and_named() {
    let mut p = pod(vec![
        spec("app", "evil:1\n# HELP forged", false),
        spec(
            "side",
            &format!("r/{}:1", "a".repeat(MAX_IMAGE_BYTES)),
            false,
        ),
        spec("istio-proxy", "istio/proxyv2:1.22.3 ", false),
        spec("ok", "ok:1", false),
    ]);
    p.istio.rev = Some("r\"} 1\nx".into());
    p.template_hash = Some("h".repeat(64));
    let mut rejected = Vec::new();
    let r = Revision::from_api(&p, &mut rejected);
    assert_eq!(
        rejected,
        [
            "image",
            "image",
            "image",
            "istio_revision",
            "pod_template_hash"
        ]
    );
    assert_eq!(r.app_images.keys().collect::<Vec<_>>(), ["ok"]);
    assert_eq!((r.proxy_image, r.proxy_version), (None, None));
    assert_eq!((r.istio_revision, r.pod_template_hash), (None, None));
}

#[test]
fn image_tags() {
    for (image, tag) in [
        ("registry.example/shop/checkout:1.4.2", Some("1.4.2")),
        ("localhost:5000/app", None),
        ("localhost:5000/app:v2", Some("v2")),
        ("app@sha256:abc", None),
        ("app:1.0@sha256:abc", Some("1.0")),
        ("app:", None),
        ("app:.x", None),
        ("app:a/b", None),
        ("", None),
    ] {
        assert_eq!(image_tag(image), tag, "{image:?}");
    }
    assert!(image_tag(&format!("app:{}", "1".repeat(129))).is_none());
}

#[test]
fn runtime_revisions_have_images_only() {
    let r = Revision::from_runtime(
        [
            ("app", Some("registry.example/shop/checkout:1.4.2")),
            (
                "istio-proxy",
                Some("docker.io/istio/proxyv2:1.22.3-distroless"),
            ),
            ("nameless", None),
        ],
        Some("node-a".into()),
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        serde_json::json!({
            "app_images": {"app": "registry.example/shop/checkout:1.4.2"},
            "proxy_image": "docker.io/istio/proxyv2:1.22.3-distroless",
            "proxy_version": "1.22.3",
            "node": "node-a",
            "source": "runtime"
        })
    );
    assert!(Revision::from_runtime([("app", None)], None, &mut Vec::new()).is_none());
}

#[test]
fn app_images_are_bounded_and_what_is_left_out_is_named() {
    let names: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    let mut rejected = Vec::new();
    let r = Revision::from_runtime(
        names.iter().map(|n| (n.as_str(), Some("app:1"))),
        None,
        &mut rejected,
    )
    .unwrap();
    assert_eq!(r.app_images.len(), MAX_APP_IMAGES);
    assert_eq!(rejected, ["app_images"; 4]);
}

proptest::proptest! {
    #[test]
    fn image_parsing_never_panics_and_takes_only_what_is_there(image in ".{0,200}") {
        if let Some(tag) = image_tag(&image) {
            let with_colon = format!(":{}", tag);
            proptest::prop_assert!(image.contains(&with_colon));
            proptest::prop_assert!(tag.len() <= 128);
        }
        if let Some(v) = proxy_version(&image) {
            proptest::prop_assert!(!v.is_empty() && image.contains(v));
        }
        let _ = image_ok(&image);
    }
}

fn runtime(app: Option<&str>, proxy: Option<&str>) -> Revision {
    Revision::from_runtime(
        app.map(|a| ("app", Some(a)))
            .into_iter()
            .chain(proxy.map(|p| ("istio-proxy", Some(p)))),
        None,
        &mut Vec::new(),
    )
    .unwrap()
}

#[test]
fn the_book_keeps_the_api_s_word_and_series_follow_the_pods() {
    let mut b = Revisions::default();
    let api = Revision::from_api(
        &pod(vec![
            spec("app", "a:1", false),
            spec("istio-proxy", "istio/proxyv2:1.22.3", false),
        ]),
        &mut Vec::new(),
    );
    b.set("u1", Some("shop"), Some("checkout"), api.clone());
    b.set(
        "u1",
        Some("shop"),
        Some("checkout"),
        runtime(Some("other:9"), None),
    );
    assert_eq!(*b.get("u1").unwrap(), api, "the API outranks the files");
    // A second pod of the same revision, and a pod without a proxy.
    b.set("u2", Some("shop"), Some("checkout"), api.clone());
    b.set(
        "u3",
        Some("shop"),
        Some("plain"),
        runtime(Some("p:1"), None),
    );
    let want =
        |v: &[[&str; 4]]| -> BTreeSet<Series> { v.iter().map(|s| s.map(str::to_string)).collect() };
    assert_eq!(
        b.series(),
        Some(want(&[["shop", "checkout", "7d9f8c6b5", "1.22.3"]]))
    );
    assert_eq!(b.series(), None, "unchanged");
    b.gone("u1");
    assert_eq!(
        b.series(),
        Some(want(&[["shop", "checkout", "7d9f8c6b5", "1.22.3"]])),
        "one pod of the revision remains"
    );
    b.gone("u2");
    assert_eq!(b.series(), Some(want(&[])), "none remains");
    assert!(b.get("u1").is_some(), "kept for late summaries");
    b.prune();
    assert!(b.get("u1").is_some());
}

#[test]
fn a_stopping_pod_keeps_what_its_runtime_files_said() {
    let mut b = Revisions::default();
    b.set(
        "u1",
        Some("shop"),
        Some("checkout"),
        runtime(Some("a:1"), Some("istio/proxyv2:1.22.3")),
    );
    // The app container ended first: only the proxy is left running.
    b.set(
        "u1",
        Some("shop"),
        Some("checkout"),
        runtime(None, Some("istio/proxyv2:1.22.3")),
    );
    let r = b.get("u1").unwrap();
    assert_eq!(r.app_images.get("app").map(String::as_str), Some("a:1"));
    // A new app image replaces the old one.
    b.set(
        "u1",
        Some("shop"),
        Some("checkout"),
        runtime(Some("a:2"), None),
    );
    let r = b.get("u1").unwrap();
    assert_eq!(r.app_images.get("app").map(String::as_str), Some("a:2"));
    assert_eq!(r.proxy_version.as_deref(), Some("1.22.3"));
}
