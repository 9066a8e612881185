//! Kubelet cgroup layouts -> pod UID, QoS class and container id, and the
//! workload a pod name implies when no API can tell.
//!
//! Layouts (systemd and cgroupfs drivers):
//! - `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
//! - `/kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope` (guaranteed)
//! - `/kubepods/burstable/pod<uid>/<id>`, `/kubepods/pod<uid>/<id>`
//!
//! A path that matches none of them is not an error: the caller keeps the
//! cgroup path and attributes nothing it cannot know.

use serde::Serialize;

/// Pod QoS class, from the cgroup parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Which runtime made a container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    /// cgroupfs driver: the id carries no runtime prefix.
    Unknown,
}

/// What a kubelet-shaped cgroup path says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPod {
    pub pod_uid: String,
    pub qos: Qos,
    /// Absent for the pod-level cgroup itself.
    pub container_id: Option<String>,
    pub runtime: Runtime,
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_container_id(s: &str) -> bool {
    (12..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `kubepods[-qos]-pod<uid_with_underscores>.slice` or `pod<uid>`.
fn pod_segment(seg: &str) -> Option<(String, Option<Qos>)> {
    if let Some(rest) = seg.strip_suffix(".slice") {
        let (prefix, uid) = rest.rsplit_once("-pod")?;
        // `kubelet-kubepods-burstable` where kubelet runs in a slice of its own.
        let qos = if prefix.ends_with("kubepods-burstable") {
            Some(Qos::Burstable)
        } else if prefix.ends_with("kubepods-besteffort") {
            Some(Qos::BestEffort)
        } else if prefix.ends_with("kubepods") {
            Some(Qos::Guaranteed)
        } else {
            return None;
        };
        let uid = uid.replace('_', "-");
        return is_uid(&uid).then_some((uid, qos));
    }
    let uid = seg.strip_prefix("pod")?;
    is_uid(uid).then(|| (uid.to_string(), None))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, or a
/// bare id (cgroupfs driver).
fn container_segment(seg: &str) -> Option<(String, Runtime)> {
    if let Some(rest) = seg.strip_suffix(".scope") {
        for (prefix, rt) in [
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::Crio),
            ("docker-", Runtime::Docker),
        ] {
            if let Some(id) = rest.strip_prefix(prefix) {
                return is_container_id(id).then(|| (id.to_string(), rt));
            }
        }
        return None;
    }
    is_container_id(seg).then(|| (seg.to_string(), Runtime::Unknown))
}

/// Parses a cgroup path (relative to the cgroup root) in any kubelet layout.
pub fn parse_cgroup(path: &str) -> Option<CgroupPod> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let kp = segs.iter().position(|s| {
        *s == "kubepods" || *s == "kubepods.slice" || s.ends_with("-kubepods.slice")
    })?;
    let mut qos_dir = None;
    let mut i = kp + 1;
    while i < segs.len() {
        let seg = segs[i];
        match seg {
            "burstable" => qos_dir = Some(Qos::Burstable),
            "besteffort" => qos_dir = Some(Qos::BestEffort),
            s if s.ends_with("kubepods-burstable.slice") => qos_dir = Some(Qos::Burstable),
            s if s.ends_with("kubepods-besteffort.slice") => qos_dir = Some(Qos::BestEffort),
            _ => {
                let (uid, qos_from_name) = pod_segment(seg)?;
                let qos = qos_from_name.or(qos_dir).unwrap_or(Qos::Guaranteed);
                let container = segs.get(i + 1).and_then(|c| container_segment(c));
                // Deeper levels (a container's own sub-cgroups) keep the container.
                if segs.len() > i + 1 && container.is_none() {
                    return None;
                }
                let (container_id, runtime) = match container {
                    Some((id, rt)) => (Some(id), rt),
                    None => (None, Runtime::Unknown),
                };
                return Some(CgroupPod {
                    pod_uid: uid,
                    qos,
                    container_id,
                    runtime,
                });
            }
        }
        i += 1;
    }
    None
}

/// Workload implied by a pod name when no API says: the name is derived,
/// and a kind only where the name's shape leaves no doubt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedWorkload {
    pub name: String,
    pub kind: Option<&'static str>,
}

/// Characters Kubernetes uses in generated name suffixes (no vowels, no 0/1/3).
fn is_safe_suffix(s: &str, lens: std::ops::RangeInclusive<usize>) -> bool {
    lens.contains(&s.len())
        && s.bytes()
            .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
}

/// `checkout-7d9f8c6b5-xk2lp` -> Deployment `checkout`; `fluentd-x7k2p` ->
/// `fluentd` (DaemonSet or Job: kind unknown); `web-0` -> `web` (likely a
/// StatefulSet, kind left unknown); anything else -> itself.
pub fn derive_workload(pod: &str) -> DerivedWorkload {
    let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
    if parts.len() == 3 && is_safe_suffix(parts[0], 5..=5) && is_safe_suffix(parts[1], 6..=10) {
        return DerivedWorkload {
            name: parts[2].to_string(),
            kind: Some("Deployment"),
        };
    }
    if let Some((base, suffix)) = pod.rsplit_once('-')
        && !base.is_empty()
        && (is_safe_suffix(suffix, 5..=5)
            || (!suffix.is_empty()
                && suffix.len() <= 5
                && suffix.bytes().all(|b| b.is_ascii_digit())))
    {
        return DerivedWorkload {
            name: base.to_string(),
            kind: None,
        };
    }
    DerivedWorkload {
        name: pod.to_string(),
        kind: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
    const CID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

    #[test]
    fn systemd_burstable_containerd() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        let c = parse_cgroup(&p).unwrap();
        assert_eq!(c.pod_uid, UID);
        assert_eq!(c.qos, Qos::Burstable);
        assert_eq!(c.container_id.as_deref(), Some(CID));
        assert_eq!(c.runtime, Runtime::Containerd);
    }

    #[test]
    fn systemd_guaranteed_crio_and_besteffort_docker() {
        let u = UID.replace('-', "_");
        let g = parse_cgroup(&format!(
            "/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope"
        ))
        .unwrap();
        assert_eq!((g.qos, g.runtime), (Qos::Guaranteed, Runtime::Crio));
        let b = parse_cgroup(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope"
        ))
        .unwrap();
        assert_eq!((b.qos, b.runtime), (Qos::BestEffort, Runtime::Docker));
    }

    #[test]
    fn cgroupfs_driver() {
        let c = parse_cgroup(&format!("/kubepods/burstable/pod{UID}/{CID}")).unwrap();
        assert_eq!((c.qos, c.runtime), (Qos::Burstable, Runtime::Unknown));
        assert_eq!(c.container_id.as_deref(), Some(CID));
        let g = parse_cgroup(&format!("/kubepods/pod{UID}/{CID}")).unwrap();
        assert_eq!(g.qos, Qos::Guaranteed);
    }

    #[test]
    fn pod_level_and_nested_prefixes() {
        let u = UID.replace('-', "_");
        let p = parse_cgroup(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
        ))
        .unwrap();
        assert_eq!(p.container_id, None);
        // kubelet under a systemd slice of its own (kind, k3s).
        let k = parse_cgroup(&format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
        ));
        let k = k.unwrap();
        assert_eq!((k.pod_uid.as_str(), k.qos), (UID, Qos::Burstable));
    }

    #[test]
    fn unknown_layouts_are_none() {
        for p in [
            "/",
            "",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnotauid.slice",
            &format!("/kubepods/burstable/pod{UID}/not-hex-id"),
        ] {
            assert_eq!(parse_cgroup(p), None, "{p}");
        }
    }

    #[test]
    fn workloads_from_pod_names() {
        assert_eq!(
            derive_workload("checkout-7d9f8c6b5-xk2lp"),
            DerivedWorkload {
                name: "checkout".into(),
                kind: Some("Deployment")
            }
        );
        assert_eq!(derive_workload("fluentd-x7k2p").name, "fluentd");
        assert_eq!(derive_workload("fluentd-x7k2p").kind, None);
        assert_eq!(
            derive_workload("web-0"),
            DerivedWorkload {
                name: "web".into(),
                kind: None
            }
        );
        assert_eq!(derive_workload("standalone").name, "standalone");
        assert_eq!(derive_workload("-").name, "-");
        // "aeiou" is not a generated suffix.
        assert_eq!(derive_workload("my-app-aeiou").name, "my-app-aeiou");
    }

    proptest! {
        #[test]
        fn parse_cgroup_never_panics(s in ".{0,300}") {
            let _ = parse_cgroup(&s);
        }

        #[test]
        fn parse_cgroup_never_panics_on_kubelet_like(
            a in "(kubepods|kubepods\\.slice|x)", b in "[a-z_\\-\\.0-9]{0,60}", c in "[a-f0-9\\-\\._a-z]{0,80}"
        ) {
            let _ = parse_cgroup(&format!("/{a}/{b}/{c}"));
        }

        #[test]
        fn derive_workload_never_panics_and_is_a_prefix(s in ".{0,80}") {
            let w = derive_workload(&s);
            prop_assert!(s.starts_with(&w.name));
        }
    }
}
