//! Exports, with one owner: JSON lines (`json`), Prometheus metrics
//! (`metrics`), the HTTP endpoints that serve both (`http`, served by
//! `server` on its own thread, guarded by `auth` in a cluster), and Kubernetes
//! Events (through [`crate::k8s::EventQueue`]). [`Exporter`] turns the race
//! tracker's outputs into all of them, one batch at a time.

pub mod auth;
pub mod http;
pub mod json;
pub mod metrics;
pub mod server;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use serde::Serialize;

use crate::{
    attribute::{Attribution, ErrorCounts, RejectedCounts},
    k8s::{EventQueue, PodEvent},
    kernel::{
        decode::KernelEvent,
        kind::{Kind, RecordCounts},
    },
    race::{
        AmbientOut, Capture, Enrollment, InboundSummary, Output, Phase, RaceSummary, When,
        mesh::NO_MESH,
    },
};
use http::{EventLine, LineBody, Shared};
use json::{KernelJson, Sink, Summary};
use metrics::Metrics;

/// The `/events` buffer's byte budget by default (`--recent-events-bytes`).
pub const RECENT_BYTES: usize = 16 * 1024 * 1024;
/// The smallest per-line allowance (a failure line with every field is
/// under 1 KiB).
const MIN_LINE_BYTES: usize = 1024;

/// How the exporter is set up (from the command line).
#[derive(Debug, Default)]
pub struct ExportOptions {
    /// Write process exec/exit lines too (they are always counted).
    pub process_events: bool,
    /// Where startup-race summaries go as Kubernetes Events.
    pub k8s_events: Option<EventQueue>,
    /// The most a line may hold in the `/events` buffer (0: the default,
    /// [`RECENT_BYTES`] over 10 000 lines). With the buffer's count limit
    /// this bounds its bytes: a larger line is kept as a short
    /// `event_too_large` stub (the stream still gets it whole), counted.
    pub recent_line_bytes: usize,
}

impl ExportOptions {
    /// The per-line allowance that keeps `lines` lines within `bytes`.
    pub fn line_bytes_for(bytes: usize, lines: usize) -> usize {
        (bytes / lines.max(1)).max(MIN_LINE_BYTES)
    }
}

/// The agent's own state, sampled for the self-metrics.
#[derive(Debug)]
pub(crate) struct SelfStats<'a> {
    pub lost_total: u64,
    pub pods_tracked: usize,
    pub held_now: usize,
    pub held_total: u64,
    pub state_sizes: [(&'static str, usize); 4],
    /// Events waiting for runtime metadata.
    pub waiting: usize,
    /// Pods whose revision is kept.
    pub revisions: usize,
    /// The workload revisions running on the node, when they changed.
    pub revision_series: Option<std::collections::BTreeSet<crate::attribute::revision::Series>>,
    pub metadata_errors: &'a ErrorCounts,
    pub rejected: &'a RejectedCounts,
}

/// The JSON stream, the `/events` buffer, the metrics and the Kubernetes
/// Events queue, fed one batch of tracker outputs at a time.
pub struct Exporter {
    sink: Sink,
    shared: Arc<Shared>,
    opts: ExportOptions,
    /// At shutdown: past this instant failures are still counted but no
    /// longer serialised (see [`Exporter::set_json_deadline`]).
    json_deadline: Option<Instant>,
    /// Failures counted but not written as JSON because of that deadline.
    json_skipped: u64,
    /// Counter values already added to the metrics (they only increase).
    exported: HashMap<&'static str, u64>,
    /// `/events` lines of this batch, published together.
    lines: Vec<EventLine>,
    /// Lines kept in `/events` as a stub for their size.
    too_large: u64,
}

impl Exporter {
    pub fn new(sink: Sink, shared: Arc<Shared>, opts: ExportOptions) -> Self {
        Exporter {
            sink,
            shared,
            opts,
            json_deadline: None,
            json_skipped: 0,
            exported: HashMap::new(),
            lines: Vec::new(),
            too_large: 0,
        }
    }

    /// Keeps a line for `/events`, or its stub when it is over the per-line
    /// allowance (the buffer's bytes stay within count x allowance).
    fn keep(&mut self, line: EventLine) {
        let max = match self.opts.recent_line_bytes {
            0 => ExportOptions::line_bytes_for(RECENT_BYTES, 10_000),
            n => n,
        };
        let bytes = line_bytes(&line);
        if bytes <= max {
            self.lines.push(line);
            return;
        }
        self.too_large += 1;
        if self.too_large == 1 {
            tracing::warn!(
                bytes,
                max,
                "event too large for the /events buffer: kept as an event_too_large stub (further ones are only counted)"
            );
        }
        // Only the names `/events` filters on, and only names of a length
        // Kubernetes allows.
        let name = |n: &Option<String>| {
            n.clone()
                .filter(|n| n.len() <= crate::attribute::runtime::MAX_NAME_BYTES)
        };
        let who = Arc::new(Attribution {
            namespace: name(&line.who.namespace),
            pod: name(&line.who.pod),
            ..Default::default()
        });
        let stub = serde_json::json!({
            "type": "event_too_large",
            "event_type": line.kind,
            "bytes": bytes,
            "namespace": who.namespace,
            "pod": who.pod,
        });
        self.lines.push(EventLine {
            body: LineBody::Json(stub.to_string()),
            kind: line.kind,
            who,
            phase: line.phase,
        });
    }

    /// What `/metrics`, `/events` and the health endpoints read.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The JSON stream (for agent-level lines: losses, exit reports).
    pub(crate) fn sink(&mut self) -> &mut Sink {
        &mut self.sink
    }

    /// From `deadline` on, failures are only counted, not serialised, so that
    /// exit stays prompt; returns how many were skipped so far.
    pub(crate) fn set_json_deadline(&mut self, deadline: Instant) {
        self.json_deadline = Some(deadline);
    }

    /// Failures counted but not serialised because of the JSON deadline.
    pub(crate) fn json_skipped(&self) -> u64 {
        self.json_skipped
    }

    /// Brings the self-metrics up to date (called about once a second).
    pub(crate) fn self_metrics(&mut self, s: &SelfStats<'_>) {
        let shared = self.shared.clone();
        let Ok(mut m) = shared.metrics.lock() else {
            return;
        };
        if let Some(series) = &s.revision_series {
            m.set_revisions(series);
        }
        m.health
            .state_entries
            .with_label_values(&["revisions"])
            .set(s.revisions as i64);
        m.health.pods_tracked.set(s.pods_tracked as i64);
        for (kind, n) in s.state_sizes {
            m.health
                .state_entries
                .with_label_values(&[kind])
                .set(n as i64);
        }
        m.health
            .state_entries
            .with_label_values(&["held_failures"])
            .set(s.held_now as i64);
        m.health
            .state_entries
            .with_label_values(&["waiting_for_metadata"])
            .set(s.waiting as i64);
        for ((source, field), n) in s.rejected {
            let total = m
                .health
                .metadata_rejected
                .with_label_values(&[source, field]);
            total.inc_by(n.saturating_sub(total.get()));
        }
        m.health
            .events_lost
            .inc_by(self.new_since("lost", s.lost_total));
        m.health
            .held_failures
            .inc_by(self.new_since("held", s.held_total));
        for (source, n) in s.metadata_errors {
            let d = self.new_since(source, *n);
            m.health
                .metadata_errors
                .with_label_values(&[source])
                .inc_by(d);
        }
        if let Some(st) = self.sink.stats() {
            for (reason, n) in [
                ("queue_full", st.queue_full.load(Ordering::Relaxed)),
                ("write_error", st.write_error.load(Ordering::Relaxed)),
            ] {
                let d = self.new_since(reason, n);
                m.health
                    .json_lines_dropped
                    .with_label_values(&["stream", reason])
                    .inc_by(d);
            }
        }
        let d = self.new_since("too_large", self.too_large);
        m.health
            .json_lines_dropped
            .with_label_values(&["events_endpoint", "too_large"])
            .inc_by(d);
        let dropped = self.opts.k8s_events.as_ref().map_or(0, EventQueue::dropped);
        let d = self.new_since("k8s_events", dropped);
        m.health
            .metadata_errors
            .with_label_values(&["k8s_events"])
            .inc_by(d);
    }

    /// How much a monotonic total grew since it was last exported.
    fn new_since(&mut self, key: &'static str, total: u64) -> u64 {
        let prev = self.exported.insert(key, total).unwrap_or(0);
        total.saturating_sub(prev)
    }

    /// Counts, serialises and publishes one batch of outputs, taking the
    /// metrics and `/events` locks once per batch (not per event: during a
    /// refused storm every failure passes here). `counted` holds the batch's
    /// records per type and is reset.
    pub(crate) fn export(&mut self, out: &mut Vec<Output>, counted: &mut RecordCounts) {
        let shared = self.shared.clone();
        let now = Instant::now();
        let mut m = shared.metrics.lock().ok();
        if let Some(m) = m.as_deref() {
            m.add_events(counted);
        }
        *counted = RecordCounts::default();
        for o in out.drain(..) {
            if let Err(e) = self.output(o, m.as_deref_mut(), now) {
                tracing::error!(error = %e, "writing event");
            }
        }
        drop(m);
        shared.publish_all(self.lines.drain(..));
        self.sink.flush();
    }

    /// Exports one output of the tracker: metrics, JSON, Kubernetes Events.
    fn output(&mut self, o: Output, m: Option<&mut Metrics>, now: Instant) -> std::io::Result<()> {
        match o {
            Output::Event {
                ev,
                who,
                phase,
                capture,
                mesh,
            } => {
                if let (Some(p), Some(m)) = (phase, m) {
                    m.failure(&who, ev.errno, p, mesh.as_deref().unwrap_or(NO_MESH), now);
                }
                self.kernel_event(ev, who, phase, capture, mesh)
            }
            Output::Ambient(a) => self.ambient(a, m),
            Output::PodStarted {
                who,
                injected,
                mesh,
            } => {
                if let Some(m) = m {
                    m.pod_started(&who, &mesh, injected);
                }
                Ok(())
            }
            Output::SidecarReady(s) => {
                if let (Some(secs), Some(m)) = (s.pod_start_to_ready_seconds, m) {
                    m.sidecar_ready(&s.who, &s.mesh, secs);
                }
                let line = Summary::now("sidecar_ready", &s);
                self.emit("sidecar_ready", &s.who, None, &line)
            }
            Output::StartupRace(s) => {
                if let Some(m) = m {
                    m.startup_race(&s.who, &s.mesh, s.window_seconds);
                }
                self.k8s_event(&s);
                let line = Summary::now("startup_race", &s);
                self.emit("startup_race", &s.who, Some("startup_race"), &line)
            }
            Output::ShutdownRace(s) => {
                if let Some(m) = m {
                    m.shutdown_race(&s.who, &s.mesh);
                }
                let line = Summary::now("shutdown_race", &s);
                self.emit("shutdown_race", &s.who, Some("shutdown_race"), &line)
            }
            Output::AppListen(a) => {
                if let Some(m) = m {
                    m.app_listen(&a.who, &a.mesh, a.seconds);
                }
                Ok(())
            }
            Output::InboundRace(s) => {
                if let Some(m) = m {
                    m.inbound_race(&s.who, &s.mesh, s.when);
                }
                self.inbound_k8s_event(&s);
                let line = Summary::now("inbound_race", &s);
                let phase = s.when.phase().as_str();
                self.emit("inbound_race", &s.who, Some(phase), &line)
            }
        }
    }

    /// A kernel event's JSON line, when anybody reads JSON: written to the
    /// stream, or kept for `/events` unserialised (serialised if read).
    fn kernel_event(
        &mut self,
        ev: KernelEvent,
        who: Arc<Attribution>,
        phase: Option<Phase>,
        capture: Option<Capture>,
        mesh: Option<Arc<str>>,
    ) -> std::io::Result<()> {
        if matches!(ev.kind, Kind::Exec | Kind::Exit) && !self.opts.process_events {
            return Ok(());
        }
        if !self.wants_json() {
            return Ok(());
        }
        if self.json_deadline.is_some_and(|d| Instant::now() >= d) {
            self.json_skipped += 1;
            return Ok(());
        }
        if !self.sink.is_active() {
            self.keep(EventLine {
                kind: ev.kind.record_type().label(),
                phase: phase.map(|p| p.as_str()),
                who,
                body: LineBody::Kernel {
                    ev: Box::new(ev),
                    phase,
                    capture,
                    mesh,
                },
            });
            return Ok(());
        }
        let rec = KernelJson::from_kernel(&ev, &who, phase, capture, mesh.as_deref());
        self.emit(rec.kind, &who, phase.map(|p| p.as_str()), &rec)
    }

    /// An ambient enrollment change: its line, the Kubernetes Event of a
    /// lost or missing enrollment, and the unenrolled-pods gauge.
    fn ambient(&mut self, a: AmbientOut, m: Option<&mut Metrics>) -> std::io::Result<()> {
        match a {
            AmbientOut::Unenrolled(mesh, pods) => {
                if let Some(m) = m {
                    m.set_ambient_unenrolled(&mesh, &pods);
                }
                Ok(())
            }
            AmbientOut::Line(l) => {
                if let Some(m) = m {
                    m.ambient_enrollment(&l.who, &l.mesh, l.state.as_str());
                }
                if let (Some(q), Some(ns), Some(pod)) =
                    (&self.opts.k8s_events, &l.who.namespace, &l.who.pod)
                    && let Some((reason, what)) = match l.state {
                        Enrollment::Lost => Some((
                            "AmbientEnrollmentLost",
                            "ztunnel's HBONE listener (15008) in this pod's network namespace closed",
                        )),
                        Enrollment::Never => Some((
                            "AmbientNeverEnrolled",
                            "ztunnel never listened (HBONE, 15008) in this pod's network namespace",
                        )),
                        Enrollment::Enrolled => None,
                    }
                {
                    let secs = l.unenrolled_seconds.unwrap_or(0.0);
                    let rec = l.recommendation.as_deref().unwrap_or("");
                    q.send(PodEvent {
                        namespace: ns.clone(),
                        pod: pod.clone(),
                        uid: l.who.pod_uid.clone(),
                        reason,
                        note: format!("{what}: out of the mesh for {secs:.0}s. {rec}"),
                    });
                }
                let line = Summary::now("ambient_enrollment", &l);
                self.emit("ambient_enrollment", &l.who, None, &line)
            }
        }
    }

    /// Whether anybody reads JSON (a stream or the /events buffer); if not,
    /// events are only counted.
    fn wants_json(&self) -> bool {
        self.sink.is_active() || self.shared.keeps_recent()
    }

    /// Serialises once; writes to the stream and publishes to `/events`.
    fn emit<T: Serialize>(
        &mut self,
        kind: &'static str,
        who: &Arc<Attribution>,
        phase: Option<&'static str>,
        body: &T,
    ) -> std::io::Result<()> {
        if !self.wants_json() {
            return Ok(());
        }
        let json = serde_json::to_string(body)?;
        self.sink.write_line(&json);
        // Published with the rest of the batch, in order.
        self.keep(EventLine {
            body: LineBody::Json(json),
            kind,
            who: who.clone(),
            phase,
        });
        Ok(())
    }

    /// A startup-race summary as a Kubernetes Event on its pod.
    fn k8s_event(&self, s: &RaceSummary) {
        let (Some(q), Some(ns), Some(pod)) = (&self.opts.k8s_events, &s.who.namespace, &s.who.pod)
        else {
            return;
        };
        // What the pod runs comes before the destinations, which may be long
        // (the note is cut at 1000 characters).
        let runs = s.revision.as_deref().map_or(String::new(), |r| {
            let hash = r.pod_template_hash.as_deref().unwrap_or("unknown");
            let proxy = r.proxy_version.as_deref().unwrap_or("unknown");
            format!(" Pod revision {hash}, proxy {proxy}.")
        });
        let note = format!(
            "{} outbound connect()s refused over {} before {} listened on its capture port.{runs} Destinations: {}. {}",
            s.refused,
            s.window_seconds
                .map_or("an unknown time".into(), |w| format!("{w:.3}s")),
            crate::race::mesh::proxy_name(&s.mesh),
            s.destinations.join(", "),
            s.recommendation
        );
        q.send(PodEvent {
            namespace: ns.clone(),
            pod: pod.clone(),
            uid: s.who.pod_uid.clone(),
            reason: "SidecarStartupRace",
            note,
        });
    }

    /// An inbound summary as a Kubernetes Event on its pod (reasons from
    /// `race/inbound.rs`), through the same aggregating, rate-limited writer.
    fn inbound_k8s_event(&self, s: &InboundSummary) {
        let (Some(q), Some(ns), Some(pod)) = (&self.opts.k8s_events, &s.who.namespace, &s.who.pod)
        else {
            return;
        };
        q.send(PodEvent {
            namespace: ns.clone(),
            pod: pod.clone(),
            uid: s.who.pod_uid.clone(),
            reason: s.when.reason(),
            note: inbound_note(s),
        });
    }
}

/// The note of an inbound summary's Kubernetes Event: what the proxy met,
/// then what to do.
fn inbound_note(s: &InboundSummary) -> String {
    let ports = s
        .ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let app = s.who.container.as_deref().unwrap_or("the app");
    let proxy = crate::race::mesh::proxy_name(&s.mesh);
    let window = s
        .window_seconds
        .map_or("an unknown time".into(), |w| format!("{w:.3}s"));
    let what = match s.when {
        When::Startup => format!(
            "{proxy} was refused {} times by {app} on port {ports} over {window} before {app} listened there.",
            s.refused
        ),
        When::Shutdown => format!(
            "{proxy} was refused {} times by {app} on port {ports} for {window} after {app} closed its listener.",
            s.refused
        ),
        When::Bind => format!(
            "{proxy} was refused {} times by {app} on port {ports}: it listens on {} only.",
            s.refused,
            s.bound_addresses.join(", ")
        ),
    };
    format!("{what} {}", s.recommendation)
}

/// What a `/events` line holds in memory, about: its body and who it is
/// about (an attribution may be the line's own).
fn line_bytes(l: &EventLine) -> usize {
    let w = &l.who;
    let who = [
        &w.node,
        &w.namespace,
        &w.pod,
        &w.pod_uid,
        &w.container,
        &w.container_id,
        &w.workload,
        &w.workload_kind,
        &w.cgroup,
    ]
    .iter()
    .map(|f| f.as_ref().map_or(0, String::len))
    .sum::<usize>()
        + size_of::<Attribution>();
    who + size_of::<EventLine>()
        + match &l.body {
            LineBody::Json(j) => j.len(),
            LineBody::Kernel { ev, .. } => {
                size_of::<KernelEvent>() + ev.path.as_ref().map_or(0, String::len)
            }
        }
}

#[cfg(test)]
mod tests;
