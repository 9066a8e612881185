//! Container metadata without the API server, from the files the runtimes
//! write for every container: the OCI bundle's `config.json` annotations.
//!
//! - containerd: `<containerd-root>/k8s.io/<id>/config.json`
//!   (`io.kubernetes.cri.*` annotations)
//! - CRI-O: `<crio-root>/<id>/userdata/config.json`
//!   (`io.kubernetes.container.name`, `io.kubernetes.pod.*`)
//!
//! Both also name the container's image as the pod spec gave it:
//! containerd `io.kubernetes.cri.image-name`, CRI-O
//! `io.kubernetes.cri-o.ImageName` (the summaries' `revision`).
//!
//! Roots are flags, so the same code reads a node and a test's directories.
//!
//! These files are outside data: a FIFO, a device, a symlink to `/dev/zero`
//! or a file on a hung filesystem can stand where a `config.json` should be.
//! So they are opened `O_NONBLOCK | O_NOFOLLOW`, refused unless `fstat`
//! says regular file, read up to [`MAX_CONFIG_BYTES`], and read by a thread
//! of their own: [`Reader::lookup`] never touches the file system, it
//! answers from the cache or says [`Lookup::Pending`] and queues the read
//! (bounded). A read that takes longer than [`Reader::timeout`] is given up
//! (counted; the reader thread is replaced so the next reads do not queue
//! behind it). Failures are cached for [`Reader::error_ttl`] and retried
//! early when the container's cgroup is created again.

use std::{
    collections::HashMap,
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::attribute::{kubelet::Runtime, revision::image_ok};

/// A config.json larger than this is refused (no unbounded allocation).
pub(crate) const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The longest name taken from metadata: Kubernetes' own limit for object
/// names (a DNS subdomain). A longer value cannot be a real name; it is left
/// out (the field is absent, never cut to a name that might be someone
/// else's) and counted.
pub const MAX_NAME_BYTES: usize = 253;

/// The longest image reference taken from metadata: a repository name is
/// under 256 bytes, a tag at most 128, a digest (sha512) 135; with their
/// separators, under 520. A longer value is left out and counted.
pub const MAX_IMAGE_BYTES: usize = 640;

/// What the runtime says about a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerMeta {
    pub container_name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    /// The image as the pod spec named it (`registry/repo:tag`).
    pub image: Option<String>,
    /// The pod's sandbox (pause) container, not an application container.
    pub sandbox: bool,
    /// Fields whose value was over its bound ([`MAX_NAME_BYTES`],
    /// [`MAX_IMAGE_BYTES`]) and left out.
    pub too_long: Vec<&'static str>,
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
    /// Not a regular file (a FIFO, a device, a symlink, a directory...).
    NotRegular(String),
    /// The read did not finish within the reader's timeout.
    Timeout(Duration),
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaError::Io(e) => write!(f, "unreadable: {e}"),
            MetaError::Json(e) => write!(f, "malformed config.json: {e}"),
            MetaError::TooLarge(n) => {
                write!(f, "config.json of {n} bytes exceeds {MAX_CONFIG_BYTES}")
            }
            MetaError::NotRegular(what) => {
                write!(f, "refused: {what}, not a regular file")
            }
            MetaError::Timeout(t) => write!(f, "read not finished after {t:?}: given up"),
        }
    }
}

#[derive(Deserialize)]
struct OciConfig {
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// Parses an OCI config.json's annotations in either runtime's vocabulary.
/// Values longer than [`MAX_NAME_BYTES`] are left out and named in
/// [`ContainerMeta::too_long`].
pub fn parse_config(json: &[u8]) -> Result<ContainerMeta, MetaError> {
    let cfg: OciConfig =
        serde_json::from_slice(json).map_err(|e| MetaError::Json(e.to_string()))?;
    let a = &cfg.annotations;
    let mut too_long = Vec::new();
    let mut get_max = |field: &'static str, keys: &[&str], max: usize| {
        let v = keys
            .iter()
            .find_map(|k| a.get(*k))
            .filter(|v| !v.is_empty())?;
        if v.len() > max {
            too_long.push(field);
            return None;
        }
        Some(v.clone())
    };
    let image = get_max(
        "image",
        &[
            "io.kubernetes.cri.image-name",
            "io.kubernetes.cri-o.ImageName",
        ],
        MAX_IMAGE_BYTES,
    );
    // Not a reference at all (whitespace, control characters): left out too.
    let image_refused = image.as_deref().is_some_and(|i| !image_ok(i));
    let mut get = |field: &'static str, keys: &[&str]| get_max(field, keys, MAX_NAME_BYTES);
    let kind = get(
        "container_type",
        &[
            "io.kubernetes.cri.container-type",
            "io.kubernetes.cri-o.ContainerType",
        ],
    );
    let sandbox = kind.as_deref() == Some("sandbox");
    let container_name = get(
        "container",
        &[
            "io.kubernetes.cri.container-name",
            "io.kubernetes.container.name",
        ],
    );
    let pod_name = get(
        "pod",
        &["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"],
    );
    let pod_namespace = get(
        "namespace",
        &[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ],
    );
    let pod_uid = get(
        "pod_uid",
        &["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"],
    );
    if image_refused {
        too_long.push("image");
    }
    Ok(ContainerMeta {
        container_name: if sandbox { None } else { container_name },
        pod_name,
        pod_namespace,
        pod_uid,
        image: image.filter(|_| !sandbox && !image_refused),
        sandbox,
        too_long,
    })
}

/// What an `fstat` says a non-regular file is, for the message.
fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "an unknown file type"
    }
}

/// Reads a metadata file of at most [`MAX_CONFIG_BYTES`]; `Ok(None)` if
/// absent. Opened `O_NONBLOCK | O_NOFOLLOW` (a FIFO does not block the open,
/// a symlink is refused), and refused unless `fstat` on the open file says
/// regular file (no FIFO, device or directory is ever read).
pub(crate) fn read_bounded(p: &Path) -> Result<Option<Vec<u8>>, MetaError> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(MetaError::NotRegular(format!(
                "{} is a symbolic link",
                p.display()
            )));
        }
        Err(e) => return Err(MetaError::Io(format!("{}: {e}", p.display()))),
    };
    let meta = f
        .metadata()
        .map_err(|e| MetaError::Io(format!("{}: {e}", p.display())))?;
    if !meta.file_type().is_file() {
        return Err(MetaError::NotRegular(format!(
            "{} is {}",
            p.display(),
            file_kind(meta.file_type())
        )));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(MetaError::TooLarge(meta.len()));
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

impl Roots {
    /// Paths to try for a container, in the order the runtime hint suggests.
    fn candidates(&self, id: &str, rt: Runtime) -> Vec<(Runtime, PathBuf)> {
        let containerd = (
            Runtime::Containerd,
            self.containerd.join("k8s.io").join(id).join("config.json"),
        );
        let crio = (
            Runtime::Crio,
            self.crio.join(id).join("userdata").join("config.json"),
        );
        match rt {
            Runtime::Crio => vec![crio],
            Runtime::Containerd => vec![containerd],
            _ => vec![containerd, crio],
        }
    }

    /// Reads a container's metadata from the first runtime that has it.
    fn read(&self, id: &str, rt: Runtime, read: ReadFn) -> ReadResult {
        for (rt, path) in self.candidates(id, rt) {
            let source = if rt == Runtime::Crio {
                "crio"
            } else {
                "containerd"
            };
            match read(&path) {
                Ok(Some(bytes)) => {
                    return parse_config(&bytes)
                        .map(|m| Some((source, m)))
                        .map_err(|e| (source, e));
                }
                Ok(None) => {}
                Err(e) => return Err((source, e)),
            }
        }
        Ok(None)
    }
}

/// A read's outcome: the metadata with its source (`containerd` / `crio`),
/// none (no runtime has a bundle), or the failing source and why.
pub(crate) type ReadResult =
    Result<Option<(&'static str, ContainerMeta)>, (&'static str, MetaError)>;
/// How a file is read ([`read_bounded`]; tests stand in slow files).
pub(crate) type ReadFn = fn(&Path) -> Result<Option<Vec<u8>>, MetaError>;

mod reader;

pub use reader::Reader;
pub(crate) use reader::{Lookup, Problem};

#[cfg(test)]
mod tests;
