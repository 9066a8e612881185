//! What a pod runs, so that a page can say what changed: its app images,
//! the proxy's image and version, the Istio revision, its controller's
//! template hash and the node. The summaries carry it as `revision`; the
//! injected pods' revisions make `connscope_workload_revision_info`.
//!
//! From the API when it knows the pod (the spec and labels), else from the
//! runtime's files (images only: the OCI annotations carry no pod labels,
//! so no template hash and no Istio revision, and no init flag, so a
//! running container other than the proxy counts as the app's). Every
//! value is outside data: bounded and checked, left out and counted when it
//! fails, never cut or guessed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::runtime::MAX_IMAGE_BYTES;
use crate::{
    k8s::PodInfo,
    race::{istio::proxy_version, mesh},
};

/// Where a pod's revision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevisionSource {
    /// The pod from the API server.
    Api,
    /// The runtime's `config.json` files of its running containers.
    Runtime,
}

/// The `revision` object of a summary; a field is absent when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revision {
    /// Container name -> image, app containers only (not the proxy, not
    /// init or sandbox containers).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub app_images: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_image: Option<String>,
    /// The proxy image's tag (absent for a digest-only image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_version: Option<String>,
    /// `istio.io/rev` (annotation, else label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio_revision: Option<String>,
    /// Label `pod-template-hash` (ReplicaSet), else
    /// `controller-revision-hash` (StatefulSet, DaemonSet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_template_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub source: RevisionSource,
}

/// The longest label value Kubernetes accepts.
const MAX_LABEL_VALUE_BYTES: usize = 63;
/// App images kept per pod, at most (a summary stays a few KiB); the
/// others are left out and counted (field `app_images`).
const MAX_APP_IMAGES: usize = 16;

/// Whether `v` is a Kubernetes label value (`istio.io/rev` and the template
/// hashes are): at most 63 bytes, alphanumerics with `-`, `_`, `.` inside.
fn label_value_ok(v: &str) -> bool {
    let b = v.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    !b.is_empty()
        && b.len() <= MAX_LABEL_VALUE_BYTES
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(inner)
}

/// Whether `v` can be an image reference: bounded ([`MAX_IMAGE_BYTES`]) and
/// made only of the characters the reference grammar allows (registry,
/// path, tag and digest: alphanumerics and `. _ - / : @ +`). No whitespace,
/// no control character, nothing that could forge a line or a label.
pub(crate) fn image_ok(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_IMAGE_BYTES
        && v.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/' | b':' | b'@' | b'+')
        })
}

/// An image reference's tag: after the last `:` of the name part (a `:`
/// before the last `/` is a registry's port), without any `@digest`. None
/// when there is none, or it is not a valid tag (`[A-Za-z0-9_][A-Za-z0-9_.-]`,
/// at most 128).
pub fn image_tag(image: &str) -> Option<&str> {
    let name = image.split_once('@').map_or(image, |(n, _)| n);
    let last = name.rsplit_once('/').map_or(name, |(_, l)| l);
    let (_, tag) = last.split_once(':')?;
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    ok.then_some(tag)
}

impl Revision {
    fn empty(node: Option<String>, source: RevisionSource) -> Revision {
        Revision {
            app_images: BTreeMap::new(),
            proxy_image: None,
            proxy_version: None,
            istio_revision: None,
            pod_template_hash: None,
            node,
            source,
        }
    }

    /// Takes a container's image: the proxy's (by a mesh profile's
    /// container name) or an app container's. A value that cannot be an image is left out
    /// and its field named in `rejected`.
    fn take(&mut self, name: &str, image: Option<&str>, rejected: &mut Vec<&'static str>) {
        let Some(image) = image else { return };
        if !image_ok(image) {
            rejected.push("image");
            return;
        }
        if mesh::proxy_container(name) {
            self.proxy_version = proxy_version(image).map(str::to_string);
            self.proxy_image = Some(image.to_string());
        } else if self.app_images.len() < MAX_APP_IMAGES || self.app_images.contains_key(name) {
            self.app_images.insert(name.to_string(), image.to_string());
        } else {
            rejected.push("app_images");
        }
    }

    /// A pod's revision as the API describes it. Values that fail their
    /// checks are left out and named in `rejected` (to be counted).
    pub fn from_api(p: &PodInfo, rejected: &mut Vec<&'static str>) -> Revision {
        let mut r = Revision::empty(p.node.clone(), RevisionSource::Api);
        for c in &p.spec_containers {
            if !c.init || mesh::proxy_container(&c.name) {
                r.take(&c.name, c.image.as_deref(), rejected);
            }
        }
        let mut label = |field: &'static str, v: Option<&String>| {
            let v = v?;
            if label_value_ok(v) {
                Some(v.clone())
            } else {
                rejected.push(field);
                None
            }
        };
        r.istio_revision = label("istio_revision", p.istio.rev.as_ref());
        r.pod_template_hash = label("pod_template_hash", p.template_hash.as_ref());
        r
    }

    /// A pod's revision from its running containers' runtime files, as
    /// (container name, image); None when they name no image.
    pub fn from_runtime<'a>(
        containers: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        node: Option<String>,
        rejected: &mut Vec<&'static str>,
    ) -> Option<Revision> {
        let mut r = Revision::empty(node, RevisionSource::Runtime);
        for (name, image) in containers {
            r.take(name, image, rejected);
        }
        (r.proxy_image.is_some() || !r.app_images.is_empty()).then_some(r)
    }
}

/// One pod's entry in [`Revisions`].
#[derive(Debug)]
struct Entry {
    rev: Arc<Revision>,
    namespace: Option<String>,
    workload: Option<String>,
    /// When the pod left the node (kept a while for its last summaries).
    gone: Option<Instant>,
}

/// A workload revision running on this node: namespace, workload, template
/// hash, proxy version (`""` when unknown), the info metric's labels.
pub type Series = [String; 4];

/// The revision of each pod of this node, by uid; bounded.
#[derive(Debug, Default)]
pub struct Revisions {
    pods: HashMap<String, Entry>,
    /// The set of [`Series`] may have changed since [`Revisions::series`].
    dirty: bool,
}

/// Pods kept at most (the tracker's own bound by default).
const MAX_PODS: usize = 20_000;
/// How long a pod that left is kept for summaries emitted after it.
const GONE_KEEP: Duration = Duration::from_secs(60);

impl Revisions {
    /// A pod's revision, if known.
    pub fn get(&self, uid: &str) -> Option<Arc<Revision>> {
        self.pods.get(uid).map(|e| e.rev.clone())
    }

    /// Whether the API described this pod (its revision is final).
    pub fn from_api(&self, uid: &str) -> bool {
        self.pods
            .get(uid)
            .is_some_and(|e| e.rev.source == RevisionSource::Api)
    }

    /// Pods kept.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether no pod is kept.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Sets a pod's revision; whether it changed. The API's outranks the
    /// runtime's; a runtime revision that lost a side (its app containers
    /// ended: the pod is stopping) keeps the side it had.
    pub fn set(
        &mut self,
        uid: &str,
        namespace: Option<&str>,
        workload: Option<&str>,
        mut rev: Revision,
    ) -> bool {
        if let Some(old) = self.pods.get(uid) {
            let o = &old.rev;
            match (o.source, rev.source) {
                (RevisionSource::Api, RevisionSource::Runtime) => return false,
                (RevisionSource::Runtime, RevisionSource::Runtime) => {
                    if rev.app_images.is_empty() {
                        rev.app_images = o.app_images.clone();
                    }
                    if rev.proxy_image.is_none() {
                        rev.proxy_image = o.proxy_image.clone();
                        rev.proxy_version = o.proxy_version.clone();
                    }
                }
                _ => {}
            }
            if **o == rev
                && old.namespace.as_deref() == namespace
                && old.workload.as_deref() == workload
            {
                return false;
            }
        } else if self.pods.len() >= MAX_PODS && !self.make_room() {
            return false;
        }
        let gone = self.pods.get(uid).and_then(|e| e.gone);
        self.pods.insert(
            uid.to_string(),
            Entry {
                rev: Arc::new(rev),
                namespace: namespace.map(str::to_string),
                workload: workload.map(str::to_string),
                gone,
            },
        );
        self.dirty = true;
        true
    }

    /// Drops the pod that left longest ago; false if none has.
    fn make_room(&mut self) -> bool {
        let oldest = self
            .pods
            .iter()
            .filter_map(|(u, e)| e.gone.map(|g| (g, u.clone())))
            .min();
        match oldest {
            Some((_, uid)) => {
                self.pods.remove(&uid);
                true
            }
            None => false,
        }
    }

    /// The pod left the node: its series goes; its revision stays a while
    /// for the summaries still to come.
    pub fn gone(&mut self, uid: &str) {
        if let Some(e) = self.pods.get_mut(uid)
            && e.gone.is_none()
        {
            e.gone = Some(Instant::now());
            self.dirty = true;
        }
    }

    /// A relist from the API: pods it described before and does not list
    /// now have left.
    pub fn api_gone_except(&mut self, listed: &std::collections::HashSet<&str>) {
        let left: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, e)| {
                e.rev.source == RevisionSource::Api && !listed.contains(uid.as_str())
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in left {
            self.gone(&uid);
        }
    }

    /// Forgets pods that left more than a minute ago.
    pub fn prune(&mut self) {
        self.pods
            .retain(|_, e| e.gone.is_none_or(|g| g.elapsed() < GONE_KEEP));
    }

    /// The workload revisions of the injected pods (those with a proxy)
    /// still on the node, when they changed since the last call.
    pub fn series(&mut self) -> Option<BTreeSet<Series>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let set = self
            .pods
            .values()
            .filter(|e| e.gone.is_none() && e.rev.proxy_image.is_some())
            .filter_map(|e| {
                Some([
                    e.namespace.clone()?,
                    e.workload.clone()?,
                    e.rev.pod_template_hash.clone().unwrap_or_default(),
                    e.rev.proxy_version.clone().unwrap_or_default(),
                ])
            })
            .collect();
        Some(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pod::{IstioAnnotations, SpecContainer, Workload};

    fn spec(name: &str, image: &str, init: bool) -> SpecContainer {
        SpecContainer {
            name: name.into(),
            image: Some(image.into()),
            init,
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
        let want = |v: &[[&str; 4]]| -> BTreeSet<Series> {
            v.iter().map(|s| s.map(str::to_string)).collect()
        };
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
}
