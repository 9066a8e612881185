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
    sync::{Arc, mpsc},
    time::{Duration, Instant},
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

/// Reads queued for the reader thread, at most.
const MAX_PENDING: usize = 256;
/// Reader threads given up on (stuck in a read) before lookups stop
/// queueing and answer "unknown" at once.
const MAX_STUCK_WORKERS: usize = 4;

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
type ReadResult = Result<Option<(&'static str, ContainerMeta)>, (&'static str, MetaError)>;
/// How a file is read ([`read_bounded`]; tests stand in slow files).
type ReadFn = fn(&Path) -> Result<Option<Vec<u8>>, MetaError>;

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// What is known: the metadata, or None (no bundle, or it failed).
    Known(Option<ContainerMeta>),
    /// Being read: ask again after [`Reader::poll`].
    Pending,
}

/// A cached answer.
#[derive(Debug)]
struct Cached {
    meta: Option<ContainerMeta>,
    at: Instant,
    /// How long it holds (None: until the container is gone).
    ttl: Option<Duration>,
}

struct Request {
    id: String,
    rt: Runtime,
}

struct Reply {
    id: String,
    result: ReadResult,
}

/// A failure or refusal the reader met, for the caller to count and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// A metadata file could not be used (`source`, message).
    Error(&'static str, String),
    /// A value over [`MAX_NAME_BYTES`] was left out (`source`, field).
    TooLong(&'static str, &'static str),
}

/// Container metadata by id, read off the caller's thread and cached.
/// Absent files are retried after [`Reader::negative_ttl`] (the runtime may
/// not have written the bundle yet), failures after [`Reader::error_ttl`].
pub struct Reader {
    roots: Arc<Roots>,
    read: ReadFn,
    cache: HashMap<String, Cached>,
    /// Reads requested and not answered, with when.
    pending: HashMap<String, (Runtime, Instant)>,
    requests: mpsc::SyncSender<Request>,
    replies: mpsc::Receiver<Reply>,
    reply_tx: mpsc::Sender<Reply>,
    waker: Arc<tokio::sync::Notify>,
    /// Reader threads abandoned in a read that did not finish.
    stuck: usize,
    problems: Vec<Problem>,
    /// How long a "not found" is remembered.
    pub negative_ttl: Duration,
    /// How long a failed read is remembered before it is tried again.
    pub error_ttl: Duration,
    /// How long a read may take before it is given up.
    pub timeout: Duration,
    /// Upper bound on cached containers (oldest dropped first).
    pub max_entries: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("roots", &self.roots)
            .field("cached", &self.cache.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Reader {
    /// A reader over these roots, with its reader thread.
    pub fn new(roots: Roots) -> Self {
        Self::with_read(roots, read_bounded)
    }

    /// A reader whose thread reads files with `read`.
    pub(crate) fn with_read(roots: Roots, read: ReadFn) -> Self {
        let (reply_tx, replies) = mpsc::channel();
        let waker = Arc::new(tokio::sync::Notify::new());
        let roots = Arc::new(roots);
        let requests = spawn_worker(roots.clone(), read, reply_tx.clone(), waker.clone());
        Reader {
            roots,
            read,
            cache: HashMap::new(),
            pending: HashMap::new(),
            requests,
            replies,
            reply_tx,
            waker,
            stuck: 0,
            problems: Vec::new(),
            negative_ttl: Duration::from_secs(2),
            error_ttl: Duration::from_secs(30),
            timeout: Duration::from_millis(250),
            max_entries: 16384,
        }
    }

    /// Gives a read up as stuck after `timeout` (the pipeline's metadata
    /// hold) instead of 250 ms.
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Notified whenever a read finishes (the agent's loop wakes on it).
    pub(crate) fn waker(&self) -> Arc<tokio::sync::Notify> {
        self.waker.clone()
    }

    /// Metadata of a container, from the cache; a miss queues a read and
    /// answers [`Lookup::Pending`]. Never touches the file system.
    pub(crate) fn lookup(&mut self, id: &str, rt: Runtime) -> Lookup {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.is_empty() {
            return Lookup::Known(None);
        }
        if let Some(c) = self.cache.get(id)
            && c.ttl.is_none_or(|t| c.at.elapsed() < t)
        {
            return Lookup::Known(c.meta.clone());
        }
        if self.pending.contains_key(id) {
            return Lookup::Pending;
        }
        if self.stuck >= MAX_STUCK_WORKERS || self.pending.len() >= MAX_PENDING {
            // Not cached: asked again on the container's next event.
            return Lookup::Known(None);
        }
        let sent = self.requests.try_send(Request {
            id: id.to_string(),
            rt,
        });
        if sent.is_err() {
            return Lookup::Known(None);
        }
        self.pending.insert(id.to_string(), (rt, Instant::now()));
        Lookup::Pending
    }

    /// Metadata of a container if it is cached; never queues a read (a
    /// container that did nothing yet is not read on its behalf: its files
    /// may still be being written).
    pub(crate) fn peek(&self, id: &str) -> Option<&ContainerMeta> {
        self.cache
            .get(id)
            .filter(|c| c.ttl.is_none_or(|t| c.at.elapsed() < t))
            .and_then(|c| c.meta.as_ref())
    }

    /// Takes the reads that finished into the cache.
    pub(crate) fn poll(&mut self) {
        while let Ok(r) = self.replies.try_recv() {
            self.answer(r);
        }
    }

    /// Waits until `deadline` at most for one read to finish (start-up
    /// only, before the agent serves); false when none did.
    pub(crate) fn wait(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.replies.recv_timeout(left) {
            Ok(r) => {
                self.answer(r);
                self.poll();
                true
            }
            Err(_) => false,
        }
    }

    fn answer(&mut self, r: Reply) {
        self.pending.remove(&r.id);
        let (meta, ttl) = match r.result {
            Ok(Some((source, m))) => {
                for field in &m.too_long {
                    self.problems.push(Problem::TooLong(source, field));
                }
                (Some(m), None)
            }
            Ok(None) => (None, Some(self.negative_ttl)),
            Err((source, e)) => {
                self.problems
                    .push(Problem::Error(source, format!("container {}: {e}", r.id)));
                (None, Some(self.error_ttl))
            }
        };
        self.insert(r.id, meta, ttl);
    }

    fn insert(&mut self, id: String, meta: Option<ContainerMeta>, ttl: Option<Duration>) {
        if self.cache.len() >= self.max_entries
            && !self.cache.contains_key(&id)
            && let Some(k) = self
                .cache
                .iter()
                .min_by_key(|(_, c)| c.at)
                .map(|(k, _)| k.clone())
        {
            // Drop the oldest entry; bounded memory under churn.
            self.cache.remove(&k);
        }
        self.cache.insert(
            id,
            Cached {
                meta,
                at: Instant::now(),
                ttl,
            },
        );
    }

    /// Gives up the read the reader thread is stuck in (the oldest pending,
    /// when older than [`Reader::timeout`]; every pending read with `all`):
    /// each is counted and cached as failed, and the stuck thread is
    /// replaced; the reads queued behind it are asked of the new one, their
    /// clocks restarted.
    pub(crate) fn expire(&mut self, all: bool) {
        self.poll();
        let timeout = self.timeout;
        let late: Vec<String> = if all {
            self.pending.keys().cloned().collect()
        } else {
            self.pending
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .filter(|(_, (_, t))| t.elapsed() >= timeout)
                .map(|(id, _)| id.clone())
                .into_iter()
                .collect()
        };
        if late.is_empty() {
            return;
        }
        for id in &late {
            let Some((rt, since)) = self.pending.remove(id) else {
                continue;
            };
            let since = since.elapsed();
            self.problems.push(Problem::Error(
                if rt == Runtime::Crio {
                    "crio"
                } else {
                    "containerd"
                },
                format!("container {id}: {}", MetaError::Timeout(since)),
            ));
            let ttl = Some(self.error_ttl);
            self.insert(id.clone(), None, ttl);
        }
        self.stuck += 1;
        tracing::warn!(
            stuck = self.stuck,
            "runtime metadata reader stuck in a read; starting another (at most {MAX_STUCK_WORKERS})"
        );
        self.requests = spawn_worker(
            self.roots.clone(),
            self.read,
            self.reply_tx.clone(),
            self.waker.clone(),
        );
        let again: Vec<(String, Runtime)> = self
            .pending
            .iter()
            .map(|(id, (rt, _))| (id.clone(), *rt))
            .collect();
        for (id, rt) in again {
            if self
                .requests
                .try_send(Request { id: id.clone(), rt })
                .is_err()
            {
                self.pending.remove(&id);
            } else {
                self.pending.insert(id, (rt, Instant::now()));
            }
        }
    }

    /// Failures and refusals met since the last call.
    pub(crate) fn take_problems(&mut self) -> Vec<Problem> {
        std::mem::take(&mut self.problems)
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

    /// The container's cgroup was (re)created: a cached failure or absence
    /// is tried again at its next event rather than after its delay.
    pub(crate) fn retry(&mut self, id: &str) {
        if self.cache.get(id).is_some_and(|c| c.meta.is_none()) {
            self.cache.remove(id);
        }
    }
}

/// Starts a reader thread; its request queue.
fn spawn_worker(
    roots: Arc<Roots>,
    read: ReadFn,
    replies: mpsc::Sender<Reply>,
    waker: Arc<tokio::sync::Notify>,
) -> mpsc::SyncSender<Request> {
    let (tx, rx) = mpsc::sync_channel::<Request>(MAX_PENDING);
    let spawned = std::thread::Builder::new()
        .name("connscope-metadata".into())
        .spawn(move || {
            crate::kernel::privileges::drop_in_thread("connscope-metadata");
            while let Ok(req) = rx.recv() {
                let result = roots.read(&req.id, req.rt, read);
                if replies.send(Reply { id: req.id, result }).is_err() {
                    break;
                }
                waker.notify_one();
            }
        });
    if let Err(e) = spawned {
        // The receiver is dropped with the closure: every lookup then
        // answers "unknown" at once, and the reason is said here.
        tracing::error!(error = %e, "cannot start the runtime metadata reader thread");
    }
    tx
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
    fn images_in_either_runtime_vocabulary_and_never_the_sandbox_s() {
        let ctd = serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.image-name": "registry.example/shop/checkout:1.4.2",
        }});
        let m = parse_config(ctd.to_string().as_bytes()).unwrap();
        assert_eq!(
            m.image.as_deref(),
            Some("registry.example/shop/checkout:1.4.2")
        );
        let crio = serde_json::json!({"annotations": {
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.container.name": "istio-proxy",
            "io.kubernetes.cri-o.ImageName": "docker.io/istio/proxyv2:1.22.3",
        }});
        let m = parse_config(crio.to_string().as_bytes()).unwrap();
        assert_eq!(m.image.as_deref(), Some("docker.io/istio/proxyv2:1.22.3"));
        let pause = serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.image-name": "registry.k8s.io/pause:3.9",
        }});
        assert_eq!(
            parse_config(pause.to_string().as_bytes()).unwrap().image,
            None
        );
        // Longer than any registry takes: left out and named, the rest kept.
        let long = serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.image-name": format!("r.example/{}:1", "a".repeat(MAX_IMAGE_BYTES)),
        }});
        let m = parse_config(long.to_string().as_bytes()).unwrap();
        assert_eq!((m.image, m.container_name.as_deref()), (None, Some("app")));
        assert_eq!(m.too_long, ["image"]);
        let forged = serde_json::json!({"annotations": {
            "io.kubernetes.cri-o.ImageName": "app:1\n# forged line",
        }});
        let m = parse_config(forged.to_string().as_bytes()).unwrap();
        assert_eq!((m.image, m.too_long), (None, vec!["image"]));
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

    /// Looks up and waits (bounded) for the reader thread's answer.
    fn lookup_wait(r: &mut Reader, id: &str, rt: Runtime) -> Option<ContainerMeta> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            r.poll();
            match r.lookup(id, rt) {
                Lookup::Known(m) => return m,
                Lookup::Pending => assert!(r.wait(deadline), "no answer for {id}"),
            }
        }
    }

    fn errors(r: &mut Reader) -> Vec<String> {
        r.take_problems()
            .into_iter()
            .filter_map(|p| match p {
                Problem::Error(source, msg) => Some(format!("{source}: {msg}")),
                Problem::TooLong(..) => None,
            })
            .collect()
    }

    /// Scratch roots in the temp dir, removed on drop.
    struct Scratch(PathBuf, Roots);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let root =
                std::env::temp_dir().join(format!("connscope-rt-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let roots = Roots {
                containerd: root.join("ctd"),
                crio: root.join("crio"),
            };
            Scratch(root, roots)
        }

        /// containerd's config.json path of `id`, its directory created.
        fn containerd(&self, id: &str) -> PathBuf {
            let d = self.1.containerd.join("k8s.io").join(id);
            std::fs::create_dir_all(&d).unwrap();
            d.join("config.json")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reader_finds_files_caches_and_reports_errors() {
        let s = Scratch::new("files");
        let roots = s.1.clone();
        let (a, b, bad) = ("aa11", "bb22", "cc33");
        std::fs::write(s.containerd(a), CONTAINERD).unwrap();
        std::fs::create_dir_all(roots.crio.join(b).join("userdata")).unwrap();
        std::fs::write(roots.crio.join(b).join("userdata/config.json"), CRIO).unwrap();
        std::fs::create_dir_all(roots.crio.join(bad).join("userdata")).unwrap();
        std::fs::write(roots.crio.join(bad).join("userdata/config.json"), "{").unwrap();
        let mut r = Reader::new(roots);
        assert_eq!(
            lookup_wait(&mut r, a, Runtime::Unknown)
                .unwrap()
                .container_name
                .as_deref(),
            Some("app")
        );
        assert_eq!(
            lookup_wait(&mut r, b, Runtime::Crio)
                .unwrap()
                .pod_name
                .as_deref(),
            Some("web-0")
        );
        assert_eq!(
            r.lookup(b, Runtime::Containerd),
            Lookup::Known(Some(parse_config(CRIO.as_bytes()).unwrap())),
            "cached: answered at once"
        );
        assert_eq!(lookup_wait(&mut r, bad, Runtime::Unknown), None);
        let e = errors(&mut r);
        assert!(
            e.len() == 1 && e[0].starts_with("crio: container cc33: malformed"),
            "{e:?}"
        );
        assert_eq!(lookup_wait(&mut r, "dd44", Runtime::Unknown), None);
        assert_eq!(
            r.lookup("../../etc", Runtime::Unknown),
            Lookup::Known(None),
            "ids are hex, never paths"
        );
    }

    #[test]
    fn fifos_devices_and_symlinks_are_refused_at_once() {
        let s = Scratch::new("special");
        let fifo = s.containerd("f1f0");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink("/dev/zero", s.containerd("2e70")).unwrap();
        std::os::unix::fs::symlink("/dev/null", s.containerd("0011")).unwrap();
        std::fs::create_dir(s.containerd("d1d1")).unwrap();
        let mut r = Reader::new(s.1.clone());
        let t0 = Instant::now();
        for (id, says) in [
            ("f1f0", "is a FIFO, not a regular file"),
            ("2e70", "is a symbolic link, not a regular file"),
            ("0011", "is a symbolic link, not a regular file"),
            ("d1d1", "is a directory, not a regular file"),
        ] {
            assert_eq!(lookup_wait(&mut r, id, Runtime::Containerd), None, "{id}");
            let e = errors(&mut r);
            assert!(
                e.len() == 1 && e[0].starts_with("containerd: container") && e[0].contains(says),
                "{id}: {e:?}"
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(
            read_bounded(Path::new("/dev/null"))
                .unwrap_err()
                .to_string(),
            "refused: /dev/null is a character device, not a regular file"
        );
    }

    static READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counting_read(p: &Path) -> Result<Option<Vec<u8>>, MetaError> {
        READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        read_bounded(p)
    }

    #[test]
    fn failures_are_cached_and_retried_after_a_delay_or_a_new_cgroup() {
        let s = Scratch::new("negative");
        std::fs::write(s.containerd("ba0d"), "{broken").unwrap();
        let mut r = Reader::with_read(s.1.clone(), counting_read);
        let reads = || READS.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(lookup_wait(&mut r, "ba0d", Runtime::Containerd), None);
        assert_eq!(errors(&mut r).len(), 1);
        let after_first = reads();
        for _ in 0..1000 {
            assert_eq!(r.lookup("ba0d", Runtime::Containerd), Lookup::Known(None));
        }
        assert_eq!(
            reads(),
            after_first,
            "a failure is not read again per event"
        );
        assert!(errors(&mut r).is_empty(), "nor counted again");
        // The container's cgroup is created (again): tried at once.
        std::fs::write(s.containerd("ba0d"), CONTAINERD).unwrap();
        r.retry("ba0d");
        assert!(lookup_wait(&mut r, "ba0d", Runtime::Containerd).is_some());
        // After the delay, too.
        std::fs::write(s.containerd("ba0e"), "{broken").unwrap();
        r.error_ttl = Duration::from_millis(50);
        assert_eq!(lookup_wait(&mut r, "ba0e", Runtime::Containerd), None);
        std::fs::write(s.containerd("ba0e"), CONTAINERD).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(lookup_wait(&mut r, "ba0e", Runtime::Containerd).is_some());
    }

    fn hung_read(p: &Path) -> Result<Option<Vec<u8>>, MetaError> {
        if p.to_string_lossy().contains("5104") {
            std::thread::sleep(Duration::from_secs(3));
        }
        read_bounded(p)
    }

    #[test]
    fn a_read_that_hangs_is_given_up_and_does_not_hold_up_the_others() {
        let s = Scratch::new("hung");
        std::fs::write(s.containerd("5104"), CONTAINERD).unwrap();
        std::fs::write(s.containerd("600d"), CONTAINERD).unwrap();
        let mut r = Reader::with_read(s.1.clone(), hung_read);
        r.timeout = Duration::from_millis(100);
        assert_eq!(r.lookup("5104", Runtime::Containerd), Lookup::Pending);
        assert_eq!(r.lookup("600d", Runtime::Containerd), Lookup::Pending);
        std::thread::sleep(Duration::from_millis(150));
        r.expire(false);
        let e = errors(&mut r);
        assert!(
            e.iter()
                .any(|e| e.contains("5104") && e.contains("given up")),
            "{e:?}"
        );
        assert_eq!(r.lookup("5104", Runtime::Containerd), Lookup::Known(None));
        // The other read, queued behind the hung one, is answered by the
        // reader that replaced it, well before the hung read returns.
        let t0 = Instant::now();
        assert!(lookup_wait(&mut r, "600d", Runtime::Containerd).is_some());
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[test]
    fn names_longer_than_kubernetes_allows_are_left_out_and_named() {
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let ok = "o".repeat(MAX_NAME_BYTES);
        let json = serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-name": ok,
            "io.kubernetes.cri.sandbox-name": long,
            "io.kubernetes.cri.sandbox-namespace": "x".repeat(3_000_000),
        }});
        let m = parse_config(json.to_string().as_bytes()).unwrap();
        assert_eq!(m.container_name.as_deref(), Some(ok.as_str()));
        assert_eq!((m.pod_name, m.pod_namespace), (None, None));
        assert_eq!(m.too_long, ["pod", "namespace"]);
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
