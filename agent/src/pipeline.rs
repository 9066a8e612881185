//! The data path: ring record -> decode -> attribute -> track (race). What
//! the tracker produces goes to the [`Exporter`]; starting, serving and
//! stopping all of this is [`crate::agent`]'s job.

use std::sync::Arc;

use crate::{
    attribute::{
        Attribution, Attributor,
        revision::{Revision, Revisions},
    },
    export::{Exporter, SelfStats},
    k8s::PodStore,
    kernel::{
        decode::{self, Clock, KernelEvent, Raw},
        kind::{RecordCounts, RecordType},
    },
    race::{self, Hints, Output, Tracker},
};

/// How long events wait for a container's runtime metadata before they go
/// on without it (the read is then given up and counted), by default
/// (`--metadata-wait-ms`).
pub const METADATA_HOLD: std::time::Duration = std::time::Duration::from_millis(250);
/// Events waiting for runtime metadata, at most: beyond, the reads are
/// given up at once and the events go on without.
const MAX_WAITING: usize = 65_536;
/// Injected pods whose runtime revision is looked at per self-metrics tick
/// (about a second), at most: a node runs a few hundred pods at most.
const MAX_REVISION_REFRESH: usize = 512;

/// Everything downstream of the ring buffer, in the order data flows.
///
/// Runtime metadata (`config.json`) is read by the attributor's thread, never
/// this one. An event whose container's metadata is being read waits here,
/// and so does every event after it, in arrival order: the tracker sees the
/// same order as without the wait, counts stay exact and nothing is
/// dropped. The wait ends when the read does (normally well under a
/// millisecond) or after the hold ([`METADATA_HOLD`] by default), when the event goes on with what
/// the cgroup path says and the read is counted as failed.
pub struct Pipeline {
    who: Attributor,
    /// Events waiting for runtime metadata, with when they started to.
    waiting: std::collections::VecDeque<(KernelEvent, std::time::Instant)>,
    /// This node's pods from the API, when it is watched.
    pods: Option<PodStore>,
    tracker: Tracker,
    exporter: Exporter,
    decode_errors: u64,
    out: Vec<Output>,
    /// Records per type since the last export (added to the metrics once per batch).
    counted: RecordCounts,
    /// What each pod of the node runs (summaries' `revision`, the info metric).
    revisions: Revisions,
    /// How long an event waits for its container's runtime metadata.
    metadata_hold: std::time::Duration,
}

impl Pipeline {
    /// A pipeline attributing with `who` (and the API's pods when
    /// `use_api`), classifying with `tracker`, exporting through `exporter`.
    pub fn new(who: Attributor, tracker: Tracker, exporter: Exporter, use_api: bool) -> Self {
        Pipeline {
            who,
            waiting: Default::default(),
            pods: use_api.then(PodStore::default),
            tracker,
            exporter,
            decode_errors: 0,
            out: Vec::new(),
            counted: RecordCounts::default(),
            revisions: Revisions::default(),
            metadata_hold: METADATA_HOLD,
        }
    }

    /// Waits up to `hold` for runtime metadata instead of [`METADATA_HOLD`].
    pub fn with_metadata_hold(mut self, hold: std::time::Duration) -> Self {
        self.metadata_hold = hold;
        self
    }

    /// The exporter (agent-level lines, shutdown).
    pub(crate) fn exporter(&mut self) -> &mut Exporter {
        &mut self.exporter
    }

    /// Rebuilds pods already running when the agent starts.
    pub(crate) fn restore(&mut self, proc_root: &std::path::Path) -> usize {
        crate::attribute::restore::restore(proc_root, &mut self.who, None, &mut self.tracker)
    }

    /// Applies a change of the API's pods.
    pub(crate) fn pods_changed(&mut self, u: crate::k8s::Update) {
        match &u {
            crate::k8s::Update::Error(e) => self.who.error(
                "kubernetes",
                format!("API server: {e}; using runtime metadata"),
            ),
            crate::k8s::Update::Recovered => tracing::info!("Kubernetes API reachable again"),
            _ => self.who.invalidate(),
        }
        if self.pods.is_none() {
            return;
        }
        match &u {
            crate::k8s::Update::Apply(p) => self.api_revision(p),
            crate::k8s::Update::Replace(all) => {
                let listed: std::collections::HashSet<&str> =
                    all.iter().map(|p| p.uid.as_str()).collect();
                self.revisions.api_gone_except(&listed);
                for p in all {
                    self.api_revision(p);
                }
            }
            crate::k8s::Update::Delete(uid) => self.revisions.gone(uid),
            _ => {}
        }
        match &u {
            crate::k8s::Update::Apply(p) => self.tracker.ambient_api(p),
            crate::k8s::Update::Replace(all) => {
                all.iter().for_each(|p| self.tracker.ambient_api(p))
            }
            crate::k8s::Update::Delete(uid) => self.tracker.ambient_forget(uid),
            _ => {}
        }
        if let Some(p) = &mut self.pods {
            p.apply(u);
        }
    }

    /// Takes a pod's revision from the API; what it had to leave out is
    /// counted once per change, not per update of the pod. A finished pod
    /// (Succeeded, Failed) no longer runs its revision.
    fn api_revision(&mut self, p: &crate::k8s::PodInfo) {
        let mut rejected = Vec::new();
        let rev = Revision::from_api(p, &mut rejected);
        let ns = Some(p.namespace.as_str());
        if self
            .revisions
            .set(&p.uid, ns, Some(p.workload.name.as_str()), rev)
        {
            for field in rejected {
                self.who.reject("kubernetes", field);
            }
        }
        if p.finished {
            self.revisions.gone(&p.uid);
        }
    }

    /// Brings a pod's revision up to date from its runtime files, unless the
    /// API described the pod.
    fn refresh_revision(&mut self, uid: &str, who: &Attribution) {
        if self.revisions.from_api(uid) {
            return;
        }
        let mut rejected = Vec::new();
        if let Some(rev) = self.who.runtime_revision(uid, &mut rejected) {
            let (ns, wl) = (who.namespace.as_deref(), who.workload.as_deref());
            if self.revisions.set(uid, ns, wl, rev) {
                for field in rejected {
                    self.who.reject("runtime", field);
                }
            }
        }
    }

    /// Fills in the summaries' `revision`.
    fn attach_revisions(&mut self, out: &mut [Output]) {
        for o in out.iter_mut() {
            let (who, slot) = match o {
                Output::SidecarReady(s) => (&s.who, &mut s.revision),
                Output::StartupRace(s) => (&s.who, &mut s.revision),
                Output::ShutdownRace(s) => (&s.who, &mut s.revision),
                Output::InboundRace(s) => (&s.who, &mut s.revision),
                _ => continue,
            };
            let Some(uid) = who.pod_uid.as_deref() else {
                continue;
            };
            self.refresh_revision(uid, who);
            *slot = self.revisions.get(uid);
        }
    }

    /// Decodes, attributes and queues one ring-buffer record.
    pub fn record(&mut self, bytes: &[u8], clock: &Clock) {
        let raw = decode::parse_record(bytes);
        let t = match &raw {
            Ok(Raw::Event(e, _)) => RecordType::of_abi(e.kind),
            Ok(Raw::Cgroup(_)) => RecordType::Cgroup,
            Err(_) => RecordType::Unknown,
        };
        self.counted[t as usize] += 1;
        match raw {
            Ok(Raw::Event(raw, path)) => match decode::decode(&raw, path.as_ref(), clock) {
                Ok(ev) => self.event(ev),
                Err(e) => self.bad_record(e),
            },
            Ok(Raw::Cgroup(c)) => match decode::decode_cgroup(&c) {
                Ok(change) => {
                    if let Some(uid) = self.who.cgroup_changed(change) {
                        self.revisions.gone(&uid);
                        self.tracker.pod_gone(uid, c.ts_ns);
                    }
                }
                Err(e) => self.bad_record(e),
            },
            Err(e) => self.bad_record(e),
        }
    }

    /// Brings the self-metrics up to date (called about once a second).
    pub(crate) fn update_self_metrics(&mut self, lost_total: u64) {
        let injected: Vec<(String, Arc<Attribution>)> = self
            .tracker
            .injected_pods()
            .filter(|(uid, _)| !self.revisions.from_api(uid))
            .take(MAX_REVISION_REFRESH)
            .map(|(uid, who)| (uid.to_string(), who.clone()))
            .collect();
        for (uid, who) in injected {
            self.refresh_revision(&uid, &who);
        }
        self.revisions.prune();
        self.exporter.self_metrics(&SelfStats {
            revisions: self.revisions.len(),
            revision_series: self.revisions.series(),
            lost_total,
            pods_tracked: self.tracker.pods_tracked(),
            held_now: self.tracker.held(),
            held_total: self.tracker.stats.held,
            state_sizes: self.who.state_sizes(),
            waiting: self.waiting.len(),
            rejected: &self.who.rejected,
            metadata_errors: &self.who.errors,
        });
    }

    fn bad_record(&mut self, e: decode::DecodeError) {
        self.decode_errors += 1;
        tracing::warn!(error = %e, decode_errors = self.decode_errors, "undecodable ring buffer record");
    }

    /// Attributes one kernel event and hands it to the race tracker, or
    /// keeps it waiting (in order) while runtime metadata is read.
    pub(crate) fn event(&mut self, ev: KernelEvent) {
        if !self.waiting.is_empty() {
            self.waiting.push_back((ev, std::time::Instant::now()));
            self.release(false);
            return;
        }
        if let Some(ev) = self.try_push(ev) {
            self.waiting.push_back((ev, std::time::Instant::now()));
        }
    }

    /// Hands an event to the tracker; gives it back when its attribution
    /// waits for runtime metadata.
    fn try_push(&mut self, ev: KernelEvent) -> Option<KernelEvent> {
        if ev.kind == decode::Kind::CaptureReset {
            // Runs in softirq: no task to attribute; the tracker matches it
            // to its failure by namespace and address.
            self.tracker.push(ev, Arc::default(), None);
            return None;
        }
        let Some(who) = self.who.attribute(&ev, self.pods.as_ref()) else {
            return Some(ev);
        };
        let Some(hints) = self.hints(&who) else {
            return Some(ev);
        };
        self.tracker.push(ev, who, hints);
        None
    }

    /// Releases waiting events whose metadata is in, in order; the first
    /// that waited the hold (or all, with `all`, or when too many
    /// wait) has its reads given up and goes on without.
    fn release(&mut self, all: bool) {
        let now = std::time::Instant::now();
        while let Some((ev, since)) = self.waiting.pop_front() {
            let Some(ev) = self.try_push(ev) else {
                continue;
            };
            let late = now.duration_since(since) >= self.metadata_hold;
            if !(all || late || self.waiting.len() >= MAX_WAITING) {
                self.waiting.push_front((ev, since));
                return;
            }
            self.who.expire_metadata(all || !late);
            let Some(ev) = self.try_push(ev) else {
                continue;
            };
            // Still waiting on a read asked for later than this event came:
            // give that one up too, the event has waited long enough.
            self.who.expire_metadata(true);
            if let Some(ev) = self.try_push(ev) {
                tracing::error!(
                    ?ev,
                    "event still waiting for metadata after every read was given up"
                );
                self.waiting.push_front((ev, since));
                return;
            }
        }
    }

    /// Notified when runtime metadata that events may wait for is read.
    pub(crate) fn metadata_waker(&self) -> Arc<tokio::sync::Notify> {
        self.who.metadata_waker()
    }

    /// The pod hints for the tracker (Some(None): none wanted); None while
    /// a container's runtime metadata is being read.
    fn hints(&mut self, who: &Arc<Attribution>) -> Option<Option<Hints>> {
        let Some(uid) = who.pod_uid.as_deref() else {
            return Some(None);
        };
        if !self.tracker.wants_hints(uid, self.pods.is_some()) {
            return Some(None);
        }
        let mut h = match self.pods.as_ref().and_then(|p| p.get(uid)) {
            Some(p) => race::api_hints(self.tracker.profiles(), p),
            None => Hints::default(),
        };
        if h.injected != Some(true) {
            h.container_names.extend(self.who.pod_container_names(uid)?);
        }
        tracing::debug!(pod_uid = uid, ?h, "pod hints");
        Some(Some(h))
    }

    /// Applies what is due (events past the re-order window, timers) and
    /// exports the results.
    pub fn advance(&mut self, now_ns: u64) {
        if !self.waiting.is_empty() {
            self.release(false);
        }
        let mut out = std::mem::take(&mut self.out);
        self.tracker.advance(now_ns, &mut out);
        self.attach_revisions(&mut out);
        self.exporter.export(&mut out, &mut self.counted);
        self.out = out;
    }

    /// Applies everything and finalises every pod (at shutdown).
    pub(crate) fn flush(&mut self) {
        self.release(true);
        let mut out = Vec::new();
        self.tracker.flush(&mut out);
        self.attach_revisions(&mut out);
        self.exporter.export(&mut out, &mut self.counted);
    }

    /// Like [`Pipeline::flush`], but failures released after `deadline` are
    /// only counted, not serialised, so that exit stays prompt however much
    /// the race tracker still holds, and waits (until `deadline` too) for
    /// the event stream to have written what it was given. Returns how many
    /// failures were not serialised, and whether the stream caught up.
    pub(crate) fn flush_until(&mut self, deadline: std::time::Instant) -> (u64, bool) {
        self.exporter.set_json_deadline(deadline);
        self.flush();
        let synced = self.exporter.sink().sync(deadline);
        if !synced {
            tracing::warn!(
                "event stream not written out by the exit deadline (a stalled or slow target): the lines still queued are not written"
            );
        }
        (self.exporter.json_skipped(), synced)
    }
}

#[cfg(test)]
mod tests;
