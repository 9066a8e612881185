//! The event stream: one JSON object per line (`--events stdout|none|<path>`).
//!
//! The schema is documented in README.md; fields that are not known are
//! absent, never zero-filled guesses.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::PathBuf,
    str::FromStr,
    time::SystemTime,
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

/// Writes JSON lines to the chosen target.
pub struct Sink {
    out: Option<Box<dyn Write + Send>>,
}

impl Sink {
    /// Opens the target (a file is appended to, so restarts keep history).
    pub fn open(target: &Target) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match target {
            Target::Stdout => Some(Box::new(BufWriter::new(io::stdout()))),
            Target::None => None,
            Target::File(p) => Some(Box::new(BufWriter::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            ))),
        };
        Ok(Sink { out })
    }

    /// Writes one serialisable value as a line.
    pub(crate) fn write<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            serde_json::to_writer(&mut *out, value)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Whether lines go anywhere.
    pub(crate) fn is_active(&self) -> bool {
        self.out.is_some()
    }

    /// Writes an already serialised line.
    pub(crate) fn write_line(&mut self, line: &str) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Flushes buffered lines; called after each batch from the kernel.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::decode::Family;
    use std::time::{Duration, UNIX_EPOCH};

    fn failure() -> KernelEvent {
        KernelEvent {
            kind: Kind::ConnectFailure,
            mono_ns: 3_000_000,
            time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            start_mono_ns: Some(1_000_000),
            pid: 7,
            tid: 8,
            uid: 0,
            gid: 0,
            comm: crate::kernel::decode::Comm::from_name("app"),
            cgroup_id: Some(9),
            netns: None,
            family: Family::Inet,
            src: Some("127.0.0.1:5000".parse().unwrap()),
            dst: Some("10.1.2.3:80".parse().unwrap()),
            path: None,
            errno: 111,
            nonblocking: true,
            from_syscall: false,
            rst: true,
            context_known: true,
        }
    }

    #[test]
    fn connect_failure_json() {
        let e = failure();
        let v = serde_json::to_value(KernelJson::from_kernel(
            &e,
            &Attribution::default(),
            None,
            None,
        ))
        .unwrap();
        assert_eq!(v["type"], "connect_failure");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456789Z");
        assert_eq!(v["dst"], "10.1.2.3:80");
        assert_eq!(v["error"], "ECONNREFUSED");
        assert_eq!(v["duration_ms"], 2.0);
        assert_eq!(v["nonblocking"], true);
        assert!(v.get("netns").is_none(), "unknown fields are absent");
        assert!(v.get("port").is_none());
    }

    #[test]
    fn unknown_context_hides_pid_and_comm() {
        let mut e = failure();
        e.context_known = false;
        let v = serde_json::to_value(KernelJson::from_kernel(
            &e,
            &Attribution::default(),
            None,
            None,
        ))
        .unwrap();
        assert!(v.get("pid").is_none() && v.get("comm").is_none());
    }

    #[test]
    fn listen_json_has_port() {
        let mut e = failure();
        e.kind = Kind::Listen;
        e.dst = None;
        let v = serde_json::to_value(KernelJson::from_kernel(
            &e,
            &Attribution::default(),
            None,
            None,
        ))
        .unwrap();
        assert_eq!(
            (v["type"].as_str(), v["state"].as_str()),
            (Some("listener"), Some("listen"))
        );
        assert_eq!(v["port"], 5000);
        assert_eq!(v["src"], "127.0.0.1");
        assert!(v.get("error").is_none());
    }

    #[test]
    fn target_parsing() {
        assert_eq!("stdout".parse::<Target>(), Ok(Target::Stdout));
        assert_eq!("none".parse::<Target>(), Ok(Target::None));
        assert_eq!(
            "/tmp/x.json".parse::<Target>(),
            Ok(Target::File("/tmp/x.json".into()))
        );
        assert!("".parse::<Target>().is_err());
    }
}
