//! The event stream: one JSON object per line (`--events stdout|none|<path>`).
//!
//! The schema is documented in README.md; fields that are not known are
//! absent, never zero-filled guesses.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::fd::AsFd as _,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    attribute::Attribution,
    kernel::decode::{KernelEvent, Kind, errno_name},
    race::{Capture, Phase},
};

/// A summary event (`sidecar_ready`, `startup_race`, `shutdown_race`,
/// `events_lost`): a type, the time it was written, and its body.
#[derive(Debug, Serialize)]
pub(crate) struct Summary<'a, T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    #[serde(flatten)]
    pub body: &'a T,
}

impl<'a, T: Serialize> Summary<'a, T> {
    /// Wraps a body, stamped with the current time.
    pub(crate) fn now(kind: &'static str, body: &'a T) -> Self {
        Summary {
            kind,
            time: rfc3339(SystemTime::now()),
            body,
        }
    }
}

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    None,
    File(PathBuf),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("empty --events value (use stdout, none or a path)".into()),
            "stdout" | "-" => Ok(Target::Stdout),
            "none" => Ok(Target::None),
            p => Ok(Target::File(PathBuf::from(p))),
        }
    }
}

/// One line of the stream.
#[derive(Debug, Serialize)]
pub(crate) struct KernelJson<'a> {
    /// `connect_failure`, `listener` or `process`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `listen`/`closed` for listeners, `exec`/`exit` for processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// Where a connect failure stands relative to the pod's sidecar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// What the failure's capture verdict rests on: `kernel`, `annotations`
    /// or `inferred` (connect failures only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
    /// The pod's mesh profile, when the pod has a mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<&'a str>,
    /// RFC 3339 wall-clock time, nanosecond precision (from the kernel).
    pub time: String,
    /// Kernel CLOCK_MONOTONIC ns, for exact intervals between events.
    pub mono_ns: u64,
    /// Node, namespace, pod, container, workload (absent where unknown).
    #[serde(flatten)]
    pub who: &'a Attribution,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonblocking: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rst: Option<bool>,
    /// Connect start -> failure, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// RFC 3339 with nanoseconds, UTC.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

impl<'a> KernelJson<'a> {
    /// The JSON view of a kernel event, who it is attributed to and its phase.
    pub(crate) fn from_kernel(
        e: &'a KernelEvent,
        who: &'a Attribution,
        phase: Option<Phase>,
        capture: Option<Capture>,
        mesh: Option<&'a str>,
    ) -> Self {
        let known = e.context_known;
        let failure = e.kind == Kind::ConnectFailure;
        let socket = matches!(
            e.kind,
            Kind::ConnectFailure | Kind::Listen | Kind::ListenClose
        );
        let kind = e.kind.record_type().label();
        let state = match e.kind {
            Kind::ConnectFailure => None,
            Kind::Listen => Some("listen"),
            Kind::ListenClose => Some("closed"),
            Kind::Exec => Some("exec"),
            Kind::Exit => Some("exit"),
            Kind::CaptureReset => None,
        };
        KernelJson {
            kind,
            state,
            phase,
            capture,
            mesh,
            time: rfc3339(e.time),
            mono_ns: e.mono_ns,
            who,
            pid: known.then_some(e.pid),
            tid: known.then_some(e.tid),
            uid: known.then_some(e.uid),
            comm: known.then(|| e.comm.as_str()),
            cgroup_id: e.cgroup_id,
            netns: e.netns,
            family: socket.then(|| e.family.name()),
            src: if failure {
                e.src.map(|a| a.to_string())
            } else {
                e.src.map(|a| a.ip().to_string())
            },
            dst: e.dst.map(|a| a.to_string()),
            port: (!failure && socket)
                .then(|| e.src.map(|a| a.port()))
                .flatten(),
            path: e.path.as_deref(),
            errno: failure.then_some(e.errno),
            error: failure.then(|| errno_name(e.errno)),
            nonblocking: failure.then_some(e.nonblocking),
            rst: failure.then_some(e.rst),
            duration_ms: e
                .start_mono_ns
                .filter(|&s| s <= e.mono_ns)
                .map(|s| (e.mono_ns - s) as f64 / 1e6),
        }
    }
}

/// Lines waiting for the writer thread, at most (a batch is one message).
const QUEUE_BATCHES: usize = 1024;
/// Bytes waiting for the writer thread, at most: beyond, batches are dropped
/// and counted rather than held in memory.
pub(crate) const QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// A batch is handed to the writer once it holds this much.
const BATCH_BYTES: usize = 256 * 1024;

/// JSON lines the stream could not deliver, by reason (exported as
/// `connscope_json_lines_dropped_total{sink="stream",reason}`).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// The writer was behind (a stalled pipe, a slow disk): its queue was full.
    pub queue_full: AtomicU64,
    /// The write failed (a full disk, a closed pipe).
    pub write_error: AtomicU64,
    /// Lines written.
    pub written: AtomicU64,
}

/// What the pipeline hands the writer thread.
enum Msg {
    /// Whole lines, each ended by a newline.
    Lines { bytes: Vec<u8>, lines: u64 },
    /// Answered once everything sent before it was handled.
    Sync(mpsc::SyncSender<()>),
}

/// Writes JSON lines to the chosen target. The pipeline only serialises
/// into a batch and hands full batches to a writer thread through a bounded
/// queue (`try_send`, never a blocking write): a stalled stdout pipe or a
/// full disk costs lines, counted in [`SinkStats`] and logged once per
/// episode, never the pipeline's progress. The writer recovers by itself
/// when the target does.
pub struct Sink {
    out: Option<Queue>,
}

struct Queue {
    tx: mpsc::SyncSender<Msg>,
    batch: Vec<u8>,
    batch_lines: u64,
    /// Bytes sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    stats: Arc<SinkStats>,
    /// Lines dropped in the current queue-full episode (None: not dropping).
    episode: Option<u64>,
}

impl Sink {
    /// Opens the target (a file is appended to, so restarts keep history)
    /// and starts its writer thread.
    pub fn open(target: &Target) -> io::Result<Self> {
        let (file, name) = match target {
            Target::None => return Ok(Sink { out: None }),
            Target::Stdout => (
                File::from(io::stdout().as_fd().try_clone_to_owned()?),
                "stdout".to_string(),
            ),
            Target::File(p) => (
                OpenOptions::new().create(true).append(true).open(p)?,
                p.display().to_string(),
            ),
        };
        let regular = file.metadata().is_ok_and(|m| m.file_type().is_file());
        let (tx, rx) = mpsc::sync_channel(QUEUE_BATCHES);
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(SinkStats::default());
        let writer = Writer {
            file,
            regular,
            partial: false,
            name,
            queued: queued.clone(),
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("connscope-events".into())
            .spawn(move || {
                crate::kernel::privileges::drop_in_thread("connscope-events");
                writer.run(rx)
            })?;
        Ok(Sink {
            out: Some(Queue {
                tx,
                batch: Vec::with_capacity(BATCH_BYTES),
                batch_lines: 0,
                queued,
                stats,
                episode: None,
            }),
        })
    }

    /// Writes one serialisable value as a line.
    pub(crate) fn write<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        if let Some(q) = self.out.as_mut() {
            let mark = q.batch.len();
            if let Err(e) = serde_json::to_writer(&mut q.batch, value) {
                q.batch.truncate(mark);
                return Err(e.into());
            }
            q.batch.push(b'\n');
            q.batch_lines += 1;
            q.send_if_full();
        }
        Ok(())
    }

    /// Whether lines go anywhere.
    pub(crate) fn is_active(&self) -> bool {
        self.out.is_some()
    }

    /// Writes an already serialised line.
    pub(crate) fn write_line(&mut self, line: &str) {
        if let Some(q) = self.out.as_mut() {
            q.batch.extend_from_slice(line.as_bytes());
            q.batch.push(b'\n');
            q.batch_lines += 1;
            q.send_if_full();
        }
    }

    /// Hands the lines of this batch to the writer thread; never blocks.
    pub(crate) fn flush(&mut self) {
        if let Some(q) = self.out.as_mut() {
            q.send();
        }
    }

    /// What the stream could not deliver (None: no stream).
    pub(crate) fn stats(&self) -> Option<&SinkStats> {
        self.out.as_ref().map(|q| &*q.stats)
    }

    /// Hands over the batch and waits, until `deadline` at most, for the
    /// writer to have handled every line sent so far. False if it did not
    /// (a stalled target): exit must stay prompt, so nobody waits longer.
    pub(crate) fn sync(&mut self, deadline: Instant) -> bool {
        let Some(q) = self.out.as_mut() else {
            return true;
        };
        q.send();
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let mut msg = Msg::Sync(ack_tx);
        loop {
            match q.tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        ack_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

impl Queue {
    fn send_if_full(&mut self) {
        if self.batch.len() >= BATCH_BYTES {
            self.send();
        }
    }

    /// Sends the batch, or drops and counts it when the writer is behind.
    fn send(&mut self) {
        if self.batch_lines == 0 {
            return;
        }
        let lines = std::mem::take(&mut self.batch_lines);
        let bytes = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_BYTES));
        let len = bytes.len();
        let room = self.queued.load(Ordering::Relaxed) + len <= QUEUE_BYTES;
        let sent = room && {
            self.queued.fetch_add(len, Ordering::Relaxed);
            match self.tx.try_send(Msg::Lines { bytes, lines }) {
                Ok(()) => true,
                Err(_) => {
                    self.queued.fetch_sub(len, Ordering::Relaxed);
                    false
                }
            }
        };
        if sent {
            if let Some(dropped) = self.episode.take() {
                tracing::info!(
                    dropped,
                    "event stream keeps up again; the lines it dropped meanwhile are counted in connscope_json_lines_dropped_total"
                );
            }
            return;
        }
        self.stats.queue_full.fetch_add(lines, Ordering::Relaxed);
        match self.episode.as_mut() {
            Some(n) => *n += lines,
            None => {
                tracing::warn!(
                    queued_bytes = self.queued.load(Ordering::Relaxed),
                    "event stream cannot keep up (its reader stalls or its target is slow): lines are dropped and counted in connscope_json_lines_dropped_total{{reason=\"queue_full\"}} until it recovers"
                );
                self.episode = Some(lines);
            }
        }
    }
}

/// The writer thread's end: the target, and what it tells the pipeline.
struct Writer {
    file: File,
    /// A regular file: a failed batch is cut off again (no half line).
    regular: bool,
    /// A failed write left half a line in a pipe: end it before the next.
    partial: bool,
    name: String,
    queued: Arc<AtomicUsize>,
    stats: Arc<SinkStats>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        // Lines dropped since the target failed (None: it works).
        let mut failing: Option<u64> = None;
        while let Ok(msg) = rx.recv() {
            let (bytes, lines) = match msg {
                Msg::Sync(ack) => {
                    let _ = ack.send(());
                    continue;
                }
                Msg::Lines { bytes, lines } => (bytes, lines),
            };
            self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
            match self.write_batch(&bytes) {
                Ok(()) => {
                    self.stats.written.fetch_add(lines, Ordering::Relaxed);
                    if let Some(dropped) = failing.take() {
                        tracing::info!(
                            target = %self.name,
                            dropped,
                            "event stream writable again; the lines it could not write are counted in connscope_json_lines_dropped_total"
                        );
                    }
                }
                Err(e) => {
                    self.stats.write_error.fetch_add(lines, Ordering::Relaxed);
                    match failing.as_mut() {
                        Some(n) => *n += lines,
                        None => {
                            tracing::warn!(
                                target = %self.name,
                                error = %e,
                                "cannot write the event stream: lines are dropped and counted in connscope_json_lines_dropped_total{{reason=\"write_error\"}} until it is writable again"
                            );
                            failing = Some(lines);
                        }
                    }
                }
            }
        }
    }

    /// Writes whole lines. On a failure, a regular file is cut back to its
    /// length before the batch (no half line stays); a pipe gets a newline
    /// first next time, so every later line is whole.
    fn write_batch(&mut self, buf: &[u8]) -> io::Result<()> {
        let before = if self.regular {
            Some(self.file.metadata()?.len())
        } else {
            None
        };
        if self.partial {
            self.file.write_all(b"\n")?;
            self.partial = false;
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.write(&buf[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if done > 0 {
                        match before {
                            Some(len) if self.file.set_len(len).is_ok() => {}
                            _ => self.partial = true,
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
