//! Container metadata without the API server, from the files the runtimes
//! write for every container: the OCI bundle's `config.json` annotations.
//!
//! - containerd: `<containerd-root>/k8s.io/<id>/config.json`
//!   (`io.kubernetes.cri.*` annotations)
//! - CRI-O: `<crio-root>/<id>/userdata/config.json`
//!   (`io.kubernetes.container.name`, `io.kubernetes.pod.*`)
//!
//! Roots are flags, so the same code reads a node and a test's directories.

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::attribute::kubelet::Runtime;

/// A config.json larger than this is refused (no unbounded allocation).
pub(crate) const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// What the runtime says about a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerMeta {
    pub container_name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    /// The pod's sandbox (pause) container, not an application container.
    pub sandbox: bool,
}

/// Why metadata could not be read; counted per source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaError {
    /// Present but unreadable (permissions, I/O).
    Io(String),
    /// Not JSON, or not an OCI config.
    Json(String),
    /// Over [`MAX_CONFIG_BYTES`].
    TooLarge(u64),
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaError::Io(e) => write!(f, "unreadable: {e}"),
            MetaError::Json(e) => write!(f, "malformed config.json: {e}"),
            MetaError::TooLarge(n) => {
                write!(f, "config.json of {n} bytes exceeds {MAX_CONFIG_BYTES}")
            }
        }
    }
}

#[derive(Deserialize)]
struct OciConfig {
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// Parses an OCI config.json's annotations in either runtime's vocabulary.
pub fn parse_config(json: &[u8]) -> Result<ContainerMeta, MetaError> {
    let cfg: OciConfig =
        serde_json::from_slice(json).map_err(|e| MetaError::Json(e.to_string()))?;
    let a = &cfg.annotations;
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| a.get(*k))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let kind = get(&[
        "io.kubernetes.cri.container-type",
        "io.kubernetes.cri-o.ContainerType",
    ]);
    let sandbox = kind.as_deref() == Some("sandbox");
    Ok(ContainerMeta {
        container_name: if sandbox {
            None
        } else {
            get(&[
                "io.kubernetes.cri.container-name",
                "io.kubernetes.container.name",
            ])
        },
        pod_name: get(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
        pod_namespace: get(&[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ]),
        pod_uid: get(&["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"]),
        sandbox,
    })
}

/// Reads a file of at most [`MAX_CONFIG_BYTES`]; `Ok(None)` if absent.
fn read_bounded(p: &Path) -> Result<Option<Vec<u8>>, MetaError> {
    let f = match std::fs::File::open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(MetaError::Io(format!("{}: {e}", p.display()))),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_CONFIG_BYTES {
        return Err(MetaError::TooLarge(len));
    }
    let mut buf = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| MetaError::Io(format!("{}: {e}", p.display())))?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(MetaError::TooLarge(buf.len() as u64));
    }
    Ok(Some(buf))
}

/// Where the runtimes keep their state.
#[derive(Debug, Clone)]
pub struct Roots {
    /// containerd's v2 task root (`/run/containerd/io.containerd.runtime.v2.task`).
    pub containerd: PathBuf,
    /// CRI-O's container storage (`/run/containers/storage/overlay-containers`).
    pub crio: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            containerd: "/run/containerd/io.containerd.runtime.v2.task".into(),
            crio: "/run/containers/storage/overlay-containers".into(),
        }
    }
}

/// Container metadata by id, cached; absent files are retried after a while
/// (the runtime may not have written the bundle yet).
#[derive(Debug)]
pub struct Reader {
    roots: Roots,
    cache: HashMap<String, (Option<ContainerMeta>, Instant)>,
    /// How long a "not found" is remembered.
    pub negative_ttl: Duration,
    /// Upper bound on cached containers (oldest dropped first).
    pub max_entries: usize,
}

impl Reader {
    /// A reader over these roots.
    pub fn new(roots: Roots) -> Self {
        Reader {
            roots,
            cache: HashMap::new(),
            negative_ttl: Duration::from_secs(2),
            max_entries: 16384,
        }
    }

    /// Paths to try for a container, in the order the runtime hint suggests.
    fn candidates(&self, id: &str, rt: Runtime) -> Vec<(Runtime, PathBuf)> {
        let containerd = (
            Runtime::Containerd,
            self.roots
                .containerd
                .join("k8s.io")
                .join(id)
                .join("config.json"),
        );
        let crio = (
            Runtime::Crio,
            self.roots
                .crio
                .join(id)
                .join("userdata")
                .join("config.json"),
        );
        match rt {
            Runtime::Crio => vec![crio],
            Runtime::Containerd => vec![containerd],
            _ => vec![containerd, crio],
        }
    }

    /// Metadata of a container; `Ok(None)` if no runtime has a bundle for it.
    /// Errors name the runtime (`containerd` / `crio`) for the metric label.
    pub(crate) fn lookup(
        &mut self,
        id: &str,
        rt: Runtime,
    ) -> Result<Option<ContainerMeta>, (&'static str, MetaError)> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.is_empty() {
            return Ok(None);
        }
        if let Some((m, at)) = self.cache.get(id)
            && (m.is_some() || at.elapsed() < self.negative_ttl)
        {
            return Ok(m.clone());
        }
        let mut found = None;
        for (rt, path) in self.candidates(id, rt) {
            let source = if rt == Runtime::Crio {
                "crio"
            } else {
                "containerd"
            };
            match read_bounded(&path) {
                Ok(Some(bytes)) => {
                    found = Some(parse_config(&bytes).map_err(|e| (source, e))?);
                    break;
                }
                Ok(None) => {}
                Err(e) => return Err((source, e)),
            }
        }
        if self.cache.len() >= self.max_entries {
            // Drop the oldest entry; bounded memory under churn.
            if let Some(k) = self
                .cache
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                self.cache.remove(&k);
            }
        }
        self.cache
            .insert(id.to_string(), (found.clone(), Instant::now()));
        Ok(found)
    }

    /// Cached containers.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Forgets a container (its cgroup is gone for good).
    pub(crate) fn forget(&mut self, id: &str) {
        self.cache.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CONTAINERD: &str = r#"{"ociVersion":"1.1.0","process":{"args":["/app"]},
      "annotations":{"io.kubernetes.cri.container-type":"container",
        "io.kubernetes.cri.container-name":"app",
        "io.kubernetes.cri.sandbox-name":"checkout-7d9f8c6b5-xk2lp",
        "io.kubernetes.cri.sandbox-namespace":"shop",
        "io.kubernetes.cri.sandbox-uid":"0a1b2c3d-4e5f-6789-abcd-ef0123456789",
        "io.kubernetes.cri.sandbox-id":"aaaa"}}"#;
    const CRIO: &str = r#"{"ociVersion":"1.0.2","annotations":{
        "io.kubernetes.container.name":"istio-proxy",
        "io.kubernetes.pod.name":"web-0","io.kubernetes.pod.namespace":"prod",
        "io.kubernetes.pod.uid":"11111111-2222-3333-4444-555555555555",
        "io.kubernetes.cri-o.ContainerType":"container"}}"#;

    #[test]
    fn containerd_annotations() {
        let m = parse_config(CONTAINERD.as_bytes()).unwrap();
        assert_eq!(m.container_name.as_deref(), Some("app"));
        assert_eq!(m.pod_name.as_deref(), Some("checkout-7d9f8c6b5-xk2lp"));
        assert_eq!(m.pod_namespace.as_deref(), Some("shop"));
        assert!(!m.sandbox);
    }

    #[test]
    fn crio_annotations_and_sandbox() {
        let m = parse_config(CRIO.as_bytes()).unwrap();
        assert_eq!(m.container_name.as_deref(), Some("istio-proxy"));
        assert_eq!(
            m.pod_uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        let s = parse_config(br#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.container-name":"POD"}}"#).unwrap();
        assert!(s.sandbox && s.container_name.is_none());
    }

    #[test]
    fn bad_json_is_an_error_and_missing_annotations_are_empty() {
        assert!(matches!(
            parse_config(b"{not json"),
            Err(MetaError::Json(_))
        ));
        assert!(matches!(parse_config(b"[1,2]"), Err(MetaError::Json(_))));
        assert_eq!(parse_config(b"{}").unwrap(), ContainerMeta::default());
    }

    #[test]
    fn reader_finds_files_caches_and_reports_errors() {
        let root = std::env::temp_dir().join(format!("connscope-rt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let roots = Roots {
            containerd: root.join("ctd"),
            crio: root.join("crio"),
        };
        let (a, b, bad) = ("aa11", "bb22", "cc33");
        std::fs::create_dir_all(roots.containerd.join("k8s.io").join(a)).unwrap();
        std::fs::write(
            roots.containerd.join("k8s.io").join(a).join("config.json"),
            CONTAINERD,
        )
        .unwrap();
        std::fs::create_dir_all(roots.crio.join(b).join("userdata")).unwrap();
        std::fs::write(roots.crio.join(b).join("userdata/config.json"), CRIO).unwrap();
        std::fs::create_dir_all(roots.crio.join(bad).join("userdata")).unwrap();
        std::fs::write(roots.crio.join(bad).join("userdata/config.json"), "{").unwrap();
        let mut r = Reader::new(roots);
        assert_eq!(
            r.lookup(a, Runtime::Unknown)
                .unwrap()
                .unwrap()
                .container_name
                .as_deref(),
            Some("app")
        );
        assert_eq!(
            r.lookup(b, Runtime::Crio)
                .unwrap()
                .unwrap()
                .pod_name
                .as_deref(),
            Some("web-0")
        );
        assert_eq!(
            r.lookup(b, Runtime::Containerd)
                .unwrap()
                .unwrap()
                .pod_name
                .as_deref(),
            Some("web-0"),
            "cached"
        );
        assert!(matches!(
            r.lookup(bad, Runtime::Unknown),
            Err(("crio", MetaError::Json(_)))
        ));
        assert_eq!(r.lookup("dd44", Runtime::Unknown), Ok(None));
        assert_eq!(
            r.lookup("../../etc", Runtime::Unknown),
            Ok(None),
            "ids are hex, never paths"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    proptest! {
        #[test]
        fn parse_config_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_config(&bytes);
        }

        #[test]
        fn parse_config_any_annotation_values(k in "[a-z\\.\\-/]{0,40}", v in ".{0,60}") {
            let json = serde_json::json!({"annotations": {k: v}}).to_string();
            prop_assert!(parse_config(json.as_bytes()).is_ok());
        }
    }
}
