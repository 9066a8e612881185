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

use std::{collections::HashMap, sync::Arc, time::Instant};

use serde::Serialize;

use crate::{
    attribute::{Attribution, ErrorCounts},
    k8s::{EventQueue, PodEvent},
    kernel::{
        decode::KernelEvent,
        kind::{Kind, RecordCounts},
    },
    race::{Capture, Output, Phase, RaceSummary},
};
use http::{EventLine, LineBody, Shared};
use json::{KernelJson, Sink, Summary};
use metrics::Metrics;

/// How the exporter is set up (from the command line).
#[derive(Debug, Default)]
pub struct ExportOptions {
    /// Write process exec/exit lines too (they are always counted).
    pub process_events: bool,
    /// Where startup-race summaries go as Kubernetes Events.
    pub k8s_events: Option<EventQueue>,
}

/// The agent's own state, sampled for the self-metrics.
#[derive(Debug)]
pub(crate) struct SelfStats<'a> {
    pub lost_total: u64,
    pub pods_tracked: usize,
    pub held_now: usize,
    pub held_total: u64,
    pub state_sizes: [(&'static str, usize); 4],
    pub metadata_errors: &'a ErrorCounts,
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
        }
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
        let Ok(m) = shared.metrics.lock() else {
            return;
        };
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
    pub(crate) fn export(
        &mut self,
        out: &mut Vec<Output>,
        counted: &mut RecordCounts,
    ) -> std::io::Result<()> {
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
        self.sink.flush()
    }

    /// Exports one output of the tracker: metrics, JSON, Kubernetes Events.
    fn output(&mut self, o: Output, m: Option<&mut Metrics>, now: Instant) -> std::io::Result<()> {
        match o {
            Output::Event {
                ev,
                who,
                phase,
                capture,
            } => {
                if let (Some(p), Some(m)) = (phase, m) {
                    m.failure(&who, ev.errno, p, now);
                }
                self.kernel_event(ev, who, phase, capture)
            }
            Output::PodStarted { who, injected } => {
                if let Some(m) = m {
                    m.pod_started(&who, injected);
                }
                Ok(())
            }
            Output::SidecarReady(s) => {
                if let (Some(secs), Some(m)) = (s.pod_start_to_ready_seconds, m) {
                    m.sidecar_ready(&s.who, secs);
                }
                let line = Summary::now("sidecar_ready", &s);
                self.emit("sidecar_ready", &s.who, None, &line)
            }
            Output::StartupRace(s) => {
                if let Some(m) = m {
                    m.startup_race(&s.who, s.window_seconds);
                }
                self.k8s_event(&s);
                let line = Summary::now("startup_race", &s);
                self.emit("startup_race", &s.who, Some("startup_race"), &line)
            }
            Output::ShutdownRace(s) => {
                if let Some(m) = m {
                    m.shutdown_race(&s.who);
                }
                let line = Summary::now("shutdown_race", &s);
                self.emit("shutdown_race", &s.who, Some("shutdown_race"), &line)
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
            self.lines.push(EventLine {
                kind: ev.kind.record_type().label(),
                phase: phase.map(|p| p.as_str()),
                who,
                body: LineBody::Kernel {
                    ev: Box::new(ev),
                    phase,
                    capture,
                },
            });
            return Ok(());
        }
        let rec = KernelJson::from_kernel(&ev, &who, phase, capture);
        self.emit(rec.kind, &who, phase.map(|p| p.as_str()), &rec)
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
        self.sink.write_line(&json)?;
        // Published with the rest of the batch, in order.
        self.lines.push(EventLine {
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
        let note = format!(
            "{} outbound connect()s refused over {} before istio-proxy listened on its capture port (destinations: {}). {}",
            s.refused,
            s.window_seconds
                .map_or("an unknown time".into(), |w| format!("{w:.3}s")),
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
}
