//! The reader thread of the runtimes' files: lookups answer from a cache
//! or say "pending", and never touch the file system themselves.

use std::{
    collections::HashMap,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use super::{ContainerMeta, MetaError, ReadFn, ReadResult, Roots, read_bounded};
use crate::attribute::kubelet::Runtime;

/// Reads queued for the reader thread, at most.
const MAX_PENDING: usize = 256;
/// Reader threads given up on (stuck in a read) before lookups stop
/// queueing and answer "unknown" at once.
const MAX_STUCK_WORKERS: usize = 4;

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
    /// Bumped whenever the cache changes: answers built from it stand
    /// only while it is unchanged.
    changes: u64,
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
            changes: 0,
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

    /// A count of the cache's changes (see [`Reader::none_until`]).
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    /// Until when a lookup's `Known(None)` for `id` stands: its cached
    /// absence or failure's expiry. None: nothing is cached (the read was
    /// not queued), so the next lookup asks again.
    pub(crate) fn none_until(&self, id: &str) -> Option<Instant> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.is_empty() {
            return Some(Instant::now() + self.negative_ttl);
        }
        let c = self.cache.get(id).filter(|c| c.meta.is_none())?;
        c.ttl.map(|t| c.at + t)
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
        self.changes = self.changes.wrapping_add(1);
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
        self.changes = self.changes.wrapping_add(1);
        self.cache.remove(id);
    }

    /// The container's cgroup was (re)created: a cached failure or absence
    /// is tried again at its next event rather than after its delay.
    pub(crate) fn retry(&mut self, id: &str) {
        if self.cache.get(id).is_some_and(|c| c.meta.is_none()) {
            self.changes = self.changes.wrapping_add(1);
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
