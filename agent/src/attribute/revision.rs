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
mod tests;
