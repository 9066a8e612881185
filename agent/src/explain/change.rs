//! What changed against the previous revision of the same workload: the
//! app's rollout (its images) or the mesh (the proxy, `istio.io/rev`). The
//! previous revision is the latest pod of the workload, first seen before
//! this one, with another pod-template hash (or, without hashes, other
//! images or mesh), among the pods this agent's events name. The revision
//! comes from the summaries' `revision` field; without it, explain says it
//! cannot tell rather than guess.

use serde::Serialize;

use super::{events::Revision, timeline::PodTimeline};

/// What kind of change it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChangeKind {
    /// The application's images changed; the mesh did not.
    App,
    /// The proxy or the Istio revision changed; the app's images did not.
    Mesh,
    /// Both.
    AppAndMesh,
    /// Another revision, with the same images and mesh.
    Other,
    /// No earlier revision of the workload in the events.
    NoPrevious,
    /// The events carry no revision for this pod.
    Unknown,
}

/// One value before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Diff {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// The pod's revision against the previous one.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Change {
    pub kind: ChangeKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub app_images: Vec<Diff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Diff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio_revision: Option<Diff>,
    pub text: String,
}

impl Change {
    fn plain(kind: ChangeKind, text: String) -> Change {
        Change {
            kind,
            previous_pod: None,
            previous_revision: None,
            app_images: Vec::new(),
            proxy: None,
            istio_revision: None,
            text,
        }
    }
}

/// Images and mesh: what "another revision" means without a hash.
fn content(
    r: &Revision,
) -> (
    &std::collections::BTreeMap<String, String>,
    [&Option<String>; 3],
) {
    (
        &r.app_images,
        [&r.proxy_image, &r.proxy_version, &r.istio_revision],
    )
}

/// Whether `other` is another revision than `mine`.
fn differs(mine: &Revision, other: &Revision) -> bool {
    match (&mine.pod_template_hash, &other.pod_template_hash) {
        (Some(a), Some(b)) => a != b,
        _ => content(mine) != content(other),
    }
}

/// What changed for `me`, among `pods` (every pod the events name).
pub(crate) fn what_changed(me: &PodTimeline, pods: &[PodTimeline]) -> Change {
    let Some(mine) = &me.revision else {
        return Change::plain(
            ChangeKind::Unknown,
            "unknown: the events carry no revision for this pod (an agent without revision fields)"
                .into(),
        );
    };
    let Some(workload) = &me.workload else {
        return Change::plain(
            ChangeKind::Unknown,
            "unknown: the pod's workload is not known".into(),
        );
    };
    let earlier: Vec<&PodTimeline> = pods
        .iter()
        .filter(|p| {
            p.namespace == me.namespace
                && p.workload.as_ref() == Some(workload)
                && (&p.pod, &p.pod_uid) != (&me.pod, &me.pod_uid)
                && p.revision.is_some()
                && matches!((p.first_seen, me.first_seen), (Some(a), Some(b)) if a < b)
        })
        .collect();
    let previous = earlier
        .iter()
        .filter(|p| p.revision.as_ref().is_some_and(|r| differs(mine, r)))
        .max_by_key(|p| p.first_seen);
    let Some(prev) = previous else {
        let same = earlier.len();
        let tail = if same > 0 {
            format!(" ({same} earlier pod(s) run the same revision)")
        } else {
            String::new()
        };
        return Change::plain(
            ChangeKind::NoPrevious,
            format!("no earlier revision of {workload} in this agent's events{tail}"),
        );
    };
    let theirs = prev.revision.as_ref().expect("filtered on revision");
    diff(mine, theirs, &prev.pod)
}

/// `mine` against the previous revision `theirs` (of pod `their_pod`).
fn diff(mine: &Revision, theirs: &Revision, their_pod: &str) -> Change {
    let mut app = Vec::new();
    let containers: std::collections::BTreeSet<&String> = mine
        .app_images
        .keys()
        .chain(theirs.app_images.keys())
        .collect();
    for c in containers {
        let (from, to) = (theirs.app_images.get(c), mine.app_images.get(c));
        if from != to {
            app.push(Diff {
                container: Some(c.clone()),
                from: from.cloned(),
                to: to.cloned(),
            });
        }
    }
    let both = |a: &Option<String>, b: &Option<String>| match (a, b) {
        (Some(a), Some(b)) => Some((a.clone(), b.clone())),
        _ => None,
    };
    let proxy_versions = both(&theirs.proxy_version, &mine.proxy_version);
    let proxy_images = both(&theirs.proxy_image, &mine.proxy_image);
    let proxy = match (&proxy_versions, &proxy_images) {
        (Some((a, b)), _) if a != b => Some((a.clone(), b.clone())),
        (_, Some((a, b))) if a != b => Some((short(a), short(b))),
        _ => None,
    }
    .map(|(from, to)| Diff {
        container: None,
        from: Some(from),
        to: Some(to),
    });
    let rev = both(&theirs.istio_revision, &mine.istio_revision)
        .filter(|(a, b)| a != b)
        .map(|(from, to)| Diff {
            container: None,
            from: Some(from),
            to: Some(to),
        });
    let since = match &theirs.pod_template_hash {
        Some(h) => format!("revision {h}"),
        None => format!("pod {their_pod}"),
    };
    let single = app.len() == 1 && mine.app_images.len() <= 1 && theirs.app_images.len() <= 1;
    let app_text: Vec<String> = app.iter().map(|d| image_change(d, single)).collect();
    let mut mesh_text = Vec::new();
    if let Some(d) = &proxy {
        mesh_text.push(format!(
            "proxy {} -> {}",
            d.from.as_deref().unwrap_or("?"),
            d.to.as_deref().unwrap_or("?")
        ));
    }
    if let Some(d) = &rev {
        mesh_text.push(format!(
            "istio.io/rev {} -> {}",
            d.from.as_deref().unwrap_or("?"),
            d.to.as_deref().unwrap_or("?")
        ));
    }
    let proxy_now = mine
        .proxy_version
        .clone()
        .or_else(|| mine.proxy_image.as_deref().map(short));
    let (kind, text) = match (app_text.is_empty(), mesh_text.is_empty()) {
        (false, true) => (
            ChangeKind::App,
            format!(
                "changed since {since}: {}; proxy {}",
                app_text.join(", "),
                match proxy_now {
                    Some(v) => format!("unchanged ({v})"),
                    None => "unknown".into(),
                }
            ),
        ),
        (true, false) => (
            ChangeKind::Mesh,
            format!(
                "mesh changed since {since}: {}; app images unchanged",
                mesh_text.join(", ")
            ),
        ),
        (false, false) => (
            ChangeKind::AppAndMesh,
            format!(
                "app and mesh changed since {since}: {}; {}",
                mesh_text.join(", "),
                app_text.join(", ")
            ),
        ),
        (true, true) => (
            ChangeKind::Other,
            format!(
                "another revision than {since}, with the same images and mesh (the pod template changed elsewhere: env, resources, annotations)"
            ),
        ),
    };
    Change {
        kind,
        previous_pod: Some(their_pod.to_string()),
        previous_revision: theirs.pod_template_hash.clone(),
        app_images: app,
        proxy,
        istio_revision: rev,
        text,
    }
}

/// `app image checkout:1.4.1 -> 1.4.2` (the repository once when it stays).
fn image_change(d: &Diff, single: bool) -> String {
    let who = match (&d.container, single) {
        (Some(c), false) => format!("app image {c} "),
        _ => "app image ".to_string(),
    };
    match (&d.from, &d.to) {
        (Some(a), Some(b)) => {
            let (a, b) = (short(a), short(b));
            let (ra, ta) = split_tag(&a);
            let (rb, tb) = split_tag(&b);
            if ra == rb && !ta.is_empty() && !tb.is_empty() {
                format!("{who}{a} -> {tb}")
            } else {
                format!("{who}{a} -> {b}")
            }
        }
        (None, Some(b)) => format!("{who}{} added", short(b)),
        (Some(a), None) => format!("{who}{} removed", short(a)),
        (None, None) => format!("{who}unknown"),
    }
}

/// An image's name without its registry and path, a digest cut to 12
/// hex digits: `reg.example/shop/checkout:1.4.1` -> `checkout:1.4.1`.
fn short(image: &str) -> String {
    let name = image.rsplit('/').next().unwrap_or(image);
    match name.split_once("@sha256:") {
        Some((n, d)) => format!("{n}@{}", d.chars().take(12).collect::<String>()),
        None => name.to_string(),
    }
}

/// `checkout:1.4.1` -> (`checkout`, `1.4.1`); no tag: (`checkout`, ``).
fn split_tag(name: &str) -> (&str, &str) {
    match name.split_once('@') {
        Some((n, d)) => (n, d),
        None => name.split_once(':').unwrap_or((name, "")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::explain::timeline;

    fn rev(hash: Option<&str>, app: &str, proxy: &str, istio: &str) -> Revision {
        Revision {
            app_images: [("app".to_string(), app.to_string())].into(),
            proxy_image: Some(format!("docker.io/istio/proxyv2:{proxy}")),
            proxy_version: Some(proxy.into()),
            istio_revision: Some(istio.into()),
            pod_template_hash: hash.map(str::to_string),
            node: Some("node-a".into()),
            source: Some("api".into()),
        }
    }

    /// A pod of shop/checkout first seen `at` seconds in, running `r`.
    fn pod(name: &str, at: u64, r: Option<Revision>) -> PodTimeline {
        let line = crate::explain::events::Line {
            kind: "sidecar_ready".into(),
            namespace: Some("shop".into()),
            pod: Some(name.into()),
            pod_uid: Some(format!("uid-{name}")),
            workload: Some("checkout".into()),
            revision: r,
            ..Default::default()
        };
        let mut p = timeline::build(&[line], None).remove(0);
        p.first_seen = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(at));
        p
    }

    #[test]
    fn an_app_rollout() {
        let old = pod(
            "checkout-6b8d9f7c4-aaaaa",
            10,
            Some(rev(
                Some("6b8d9f7c4"),
                "reg.example/shop/checkout:1.4.1",
                "1.22.3",
                "1-22-3",
            )),
        );
        let new = pod(
            "checkout-7d9f8c6b5-bbbbb",
            20,
            Some(rev(
                Some("7d9f8c6b5"),
                "reg.example/shop/checkout:1.4.2",
                "1.22.3",
                "1-22-3",
            )),
        );
        let c = what_changed(&new, &[old.clone(), new.clone()]);
        assert_eq!(c.kind, ChangeKind::App);
        assert_eq!(
            c.text,
            "changed since revision 6b8d9f7c4: app image checkout:1.4.1 -> 1.4.2; proxy unchanged (1.22.3)"
        );
        assert_eq!(c.previous_pod.as_deref(), Some("checkout-6b8d9f7c4-aaaaa"));
        // The older pod has nothing before it.
        let c = what_changed(&old, &[old.clone(), new]);
        assert_eq!(c.kind, ChangeKind::NoPrevious);
        assert_eq!(
            c.text,
            "no earlier revision of checkout in this agent's events"
        );
    }

    #[test]
    fn a_mesh_upgrade_and_the_latest_previous_revision() {
        let oldest = pod(
            "checkout-5a-1",
            5,
            Some(rev(Some("5a"), "checkout:1.4.0", "1.20.1", "1-20-1")),
        );
        let old = pod(
            "checkout-6b-1",
            10,
            Some(rev(Some("6b"), "checkout:1.4.2", "1.21.2", "1-21")),
        );
        let same = pod(
            "checkout-7d-0",
            15,
            Some(rev(Some("7d"), "checkout:1.4.2", "1.22.3", "1-22")),
        );
        let new = pod(
            "checkout-7d-1",
            20,
            Some(rev(Some("7d"), "checkout:1.4.2", "1.22.3", "1-22")),
        );
        let all = [oldest, old, same, new.clone()];
        let c = what_changed(&new, &all);
        assert_eq!(c.kind, ChangeKind::Mesh);
        assert_eq!(
            c.text,
            "mesh changed since revision 6b: proxy 1.21.2 -> 1.22.3, istio.io/rev 1-21 -> 1-22; app images unchanged"
        );
        assert_eq!(c.previous_revision.as_deref(), Some("6b"));
    }

    #[test]
    fn both_other_and_unknown() {
        let old = pod(
            "checkout-6b-1",
            10,
            Some(rev(Some("6b"), "checkout:1.4.1", "1.21.2", "1-21")),
        );
        let new = pod(
            "checkout-7d-1",
            20,
            Some(rev(Some("7d"), "checkout:1.4.2", "1.22.3", "1-21")),
        );
        let c = what_changed(&new, &[old, new.clone()]);
        assert_eq!(c.kind, ChangeKind::AppAndMesh);
        assert_eq!(
            c.text,
            "app and mesh changed since revision 6b: proxy 1.21.2 -> 1.22.3; app image checkout:1.4.1 -> 1.4.2"
        );
        let old = pod(
            "checkout-6b-1",
            10,
            Some(rev(Some("6b"), "checkout:1.4.1", "1.21.2", "1-21")),
        );
        let new = pod(
            "checkout-7d-1",
            20,
            Some(rev(Some("7d"), "checkout:1.4.1", "1.21.2", "1-21")),
        );
        assert_eq!(
            what_changed(&new, &[old, new.clone()]).kind,
            ChangeKind::Other
        );
        // Without hashes (a StatefulSet), content decides; without a
        // revision, nothing is guessed.
        let old = pod("db-0", 10, Some(rev(None, "db:15.1", "1.22.3", "1-22")));
        let new = pod("db-1", 20, Some(rev(None, "db:15.2", "1.22.3", "1-22")));
        let c = what_changed(&new, &[old, new.clone()]);
        assert_eq!(
            c.text,
            "changed since pod db-0: app image db:15.1 -> 15.2; proxy unchanged (1.22.3)"
        );
        let bare = pod("checkout-x", 30, None);
        assert_eq!(
            what_changed(&bare, std::slice::from_ref(&bare)).kind,
            ChangeKind::Unknown
        );
    }

    #[test]
    fn image_names() {
        assert_eq!(
            short("reg.example:5000/shop/checkout:1.4.1"),
            "checkout:1.4.1"
        );
        assert_eq!(
            short("checkout@sha256:0123456789abcdef0123"),
            "checkout@0123456789ab"
        );
        let d = Diff {
            container: Some("sidecar-cache".into()),
            from: None,
            to: Some("redis:7".into()),
        };
        assert_eq!(
            image_change(&d, false),
            "app image sidecar-cache redis:7 added"
        );
    }
}
