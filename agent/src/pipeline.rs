//! `connscope run`: kernel event -> decode -> attribute -> correlate (race)
//! -> export, until a signal.

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use connscope_ebpf::Config;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribute::{Attribution, Attributor},
    cgroup::Resolver,
    cli::{KubeMode, RunArgs},
    decode::{self, Clock, KernelEvent, Kind, Raw},
    events::{Record, Sink, Summary},
    kube::{self, PodStore, Update},
    metrics::{EventType, Metrics},
    offsets,
    probes::{LoadOptions, Probes},
    race::{self, Hints, Output, Tracker},
    restore,
    runtime::{Reader, Roots},
    server::{EventLine, Limits, LineBody, Shared},
};

/// How often the ring buffer is drained without a wakeup (ms): the kernel
/// wakes the reader only for batches.
const DRAIN_MS: u64 = 20;

/// A line reporting events the kernel could not deliver: loss is never silent.
#[derive(Debug, Serialize)]
struct Lost {
    /// Newly lost since the previous report.
    lost: u64,
    lost_total: u64,
}

/// Everything downstream of the ring buffer, in the order data flows.
pub struct Pipeline {
    pub who: Attributor,
    pub pods: PodStore,
    pub use_api: bool,
    pub tracker: Tracker,
    pub sink: Sink,
    pub process_events: bool,
    pub decode_errors: u64,
    pub shared: Arc<Shared>,
    /// Startup-race summaries to write as Kubernetes Events.
    pub k8s_events: Option<tokio::sync::mpsc::Sender<kube::PodEvent>>,
    /// Kubernetes Events not written (rate limit, API errors, full queue).
    pub k8s_events_dropped: Arc<std::sync::atomic::AtomicU64>,
    out: Vec<Output>,
    /// At shutdown: past this instant failures are still counted but no
    /// longer serialised (see [`Pipeline::flush_until`]).
    json_deadline: Option<std::time::Instant>,
    /// Failures counted but not written as JSON because of that deadline.
    json_skipped: u64,
    /// Counter values already added to the metrics (they only increase).
    exported: HashMap<&'static str, u64>,
    /// Records per type since the last export (added to the metrics once per batch).
    counted: [u64; EventType::ALL.len()],
    /// `/events` lines of this batch, published together.
    lines: Vec<EventLine>,
}

impl Pipeline {
    /// A pipeline writing to `sink` and publishing to `shared`.
    pub fn new(who: Attributor, tracker: Tracker, sink: Sink, shared: Arc<Shared>) -> Self {
        Pipeline {
            who,
            pods: PodStore::default(),
            use_api: false,
            tracker,
            sink,
            process_events: false,
            decode_errors: 0,
            shared,
            k8s_events: None,
            k8s_events_dropped: Arc::default(),
            out: Vec::new(),
            json_deadline: None,
            json_skipped: 0,
            exported: HashMap::new(),
            counted: [0; EventType::ALL.len()],
            lines: Vec::new(),
        }
    }

    /// Decodes, attributes and queues one ring-buffer record.
    pub fn record(&mut self, bytes: &[u8], clock: &Clock) {
        let raw = decode::parse_record(bytes);
        self.count_record(raw.as_ref().map_err(|_| ()));
        match raw {
            Ok(Raw::Event(raw, path)) => match decode::decode(&raw, path.as_ref(), clock) {
                Ok(ev) => self.event(ev),
                Err(e) => self.bad_record(e),
            },
            Ok(Raw::Cgroup(c)) => match decode::decode_cgroup(&c) {
                Ok(change) => {
                    if let Some(uid) = self.who.cgroup_changed(change) {
                        self.tracker.pod_gone(uid, c.ts_ns);
                    }
                }
                Err(e) => self.bad_record(e),
            },
            Err(e) => self.bad_record(e),
        }
    }

    fn count_record(&mut self, raw: Result<&Raw, ()>) {
        let t = match raw {
            Ok(Raw::Event(e, _)) => match e.kind {
                connscope_ebpf::kind::CONNECT_FAILURE => EventType::ConnectFailure,
                connscope_ebpf::kind::LISTEN | connscope_ebpf::kind::LISTEN_CLOSE => {
                    EventType::Listener
                }
                connscope_ebpf::kind::EXEC | connscope_ebpf::kind::EXIT => EventType::Process,
                _ => EventType::Unknown,
            },
            Ok(Raw::Cgroup(_)) => EventType::Cgroup,
            Err(()) => EventType::Unknown,
        };
        self.counted[t as usize] += 1;
    }

    /// Brings the self-metrics up to date (called about once a second).
    pub fn update_self_metrics(&mut self, lost_total: u64) {
        let Ok(m) = self.shared.metrics.lock() else {
            return;
        };
        m.pods_tracked.set(self.tracker.pods_tracked() as i64);
        for (kind, n) in self.who.state_sizes() {
            m.state_entries.with_label_values(&[kind]).set(n as i64);
        }
        m.state_entries
            .with_label_values(&["held_failures"])
            .set(self.tracker.held() as i64);
        let mut add = |key: &'static str, total: u64| -> u64 {
            let prev = self.exported.insert(key, total).unwrap_or(0);
            total.saturating_sub(prev)
        };
        m.events_lost.inc_by(add("lost", lost_total));
        m.held_failures.inc_by(add("held", self.tracker.stats.held));
        for (source, n) in &self.who.errors {
            let d = add(source, *n);
            m.metadata_errors.with_label_values(&[source]).inc_by(d);
        }
        let dropped = self
            .k8s_events_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        let d = add("k8s_events", dropped);
        m.metadata_errors
            .with_label_values(&["k8s_events"])
            .inc_by(d);
    }

    fn bad_record(&mut self, e: decode::DecodeError) {
        self.decode_errors += 1;
        tracing::warn!(error = %e, decode_errors = self.decode_errors, "undecodable ring buffer record");
    }

    /// Attributes one kernel event and hands it to the race tracker.
    pub fn event(&mut self, ev: KernelEvent) {
        let api = self.use_api.then_some(&self.pods);
        let who = self.who.attribute(&ev, api);
        let hints = self.hints(&who);
        self.tracker.push(ev, who, hints);
    }

    fn hints(&mut self, who: &Arc<Attribution>) -> Option<Hints> {
        let uid = who.pod_uid.as_deref()?;
        if !self.tracker.wants_hints(uid) {
            return None;
        }
        let mut h = match self.pods.get(uid).filter(|_| self.use_api) {
            Some(p) => race::api_hints(p),
            None => Hints::default(),
        };
        if h.injected != Some(true) {
            h.container_names.extend(self.who.pod_container_names(uid));
        }
        tracing::debug!(pod_uid = uid, ?h, "pod hints");
        Some(h)
    }

    /// Applies what is due (events past the re-order window, timers) and
    /// exports the results.
    pub fn advance(&mut self, now_ns: u64) -> Result<()> {
        let mut out = std::mem::take(&mut self.out);
        self.tracker.advance(now_ns, &mut out);
        self.export(&mut out)?;
        self.out = out;
        Ok(())
    }

    /// Applies everything and finalises every pod (at shutdown).
    pub fn flush(&mut self) -> Result<()> {
        let mut out = Vec::new();
        self.tracker.flush(&mut out);
        self.export(&mut out)
    }

    /// Like [`Pipeline::flush`], but failures released after `deadline` are
    /// only counted, not serialised, so that exit stays prompt however much
    /// the race tracker still holds. Returns how many were not serialised.
    pub fn flush_until(&mut self, deadline: std::time::Instant) -> Result<u64> {
        self.json_deadline = Some(deadline);
        self.flush()?;
        Ok(self.json_skipped)
    }

    /// Counts, serialises and publishes one batch of outputs, taking the
    /// metrics and `/events` locks once per batch (not per event: during a
    /// refused storm every failure passes here).
    fn export(&mut self, out: &mut Vec<Output>) -> Result<()> {
        let shared = self.shared.clone();
        let now = std::time::Instant::now();
        let mut m = shared.metrics.lock().ok();
        if let Some(m) = m.as_deref() {
            m.add_events(&self.counted);
            self.counted = [0; EventType::ALL.len()];
        }
        for o in out.drain(..) {
            let r = match o {
                Output::Event { ev, who, phase } => {
                    if let (Some(p), Some(m)) = (phase, m.as_deref_mut()) {
                        m.failure(&who, ev.errno, p, now);
                    }
                    if matches!(ev.kind, Kind::Exec | Kind::Exit) && !self.process_events {
                        continue;
                    }
                    if !self.wants_json() {
                        continue;
                    }
                    if self
                        .json_deadline
                        .is_some_and(|d| std::time::Instant::now() >= d)
                    {
                        self.json_skipped += 1;
                        continue;
                    }
                    if !self.sink.is_active() {
                        // Only /events wants it: serialised if read.
                        self.lines.push(EventLine {
                            kind: crate::events::record_kind(ev.kind),
                            phase: phase.map(|p| p.as_str()),
                            who,
                            body: LineBody::Kernel {
                                ev: Box::new(ev),
                                phase,
                            },
                        });
                        continue;
                    }
                    let rec = Record::from_kernel(&ev, &who, phase);
                    self.emit(rec.kind, &who, phase.map(|p| p.as_str()), &rec)
                }
                Output::PodStarted { who, injected } => {
                    if let Some(m) = m.as_deref_mut() {
                        m.pod_started(&who, injected);
                    }
                    Ok(())
                }
                Output::SidecarReady(s) => {
                    if let (Some(secs), Some(m)) = (s.pod_start_to_ready_seconds, m.as_deref_mut())
                    {
                        m.sidecar_ready(&s.who, secs);
                    }
                    self.emit(
                        "sidecar_ready",
                        &s.who,
                        None,
                        &Summary::now("sidecar_ready", &s),
                    )
                }
                Output::StartupRace(s) => {
                    if let Some(m) = m.as_deref_mut() {
                        m.startup_race(&s.who, s.window_seconds);
                    }
                    self.k8s_event(&s);
                    self.emit(
                        "startup_race",
                        &s.who,
                        Some("startup_race"),
                        &Summary::now("startup_race", &s),
                    )
                }
                Output::ShutdownRace(s) => {
                    if let Some(m) = m.as_deref_mut() {
                        m.shutdown_race(&s.who);
                    }
                    self.emit(
                        "shutdown_race",
                        &s.who,
                        Some("shutdown_race"),
                        &Summary::now("shutdown_race", &s),
                    )
                }
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "writing event");
            }
        }
        drop(m);
        shared.publish_all(self.lines.drain(..));
        self.sink.flush()?;
        Ok(())
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

    fn k8s_event(&self, s: &race::RaceSummary) {
        let (Some(tx), Some(ns), Some(pod)) = (&self.k8s_events, &s.who.namespace, &s.who.pod)
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
        let ev = kube::PodEvent {
            namespace: ns.clone(),
            pod: pod.clone(),
            uid: s.who.pod_uid.clone(),
            reason: "SidecarStartupRace",
            note,
        };
        if tx.try_send(ev).is_err() {
            self.k8s_events_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    let tracefs = offsets::tracefs_root()?;
    let (config, discovery) = offsets::discover(tracefs, &args.btf);
    for t in &discovery.missing_tracepoints {
        tracing::warn!(tracepoint = %t, "tracepoint missing on this kernel");
    }
    for b in &discovery.missing_btf {
        tracing::warn!(offset = %b, "BTF offset unavailable; dependent fields will be absent");
    }
    if args.bench_noop_programs {
        tracing::warn!(
            "--bench-noop-programs: hooks attached, programs return at once; nothing is reported"
        );
    }
    let mut probes = Probes::load(&LoadOptions {
        config: Config {
            noop: args.bench_noop_programs.into(),
            ..config
        },
        ring_bytes: args.ring_buffer_bytes,
        disabled: args.disable_probe.clone(),
    })?;
    let sink =
        Sink::open(&args.events).with_context(|| format!("opening --events {:?}", args.events))?;
    let mut kube_rx = start_kube(&args).await?;
    let metrics = Metrics::new(args.pod_labels).context("registering metrics")?;
    for s in &probes.status {
        metrics
            .probe_attached
            .with_label_values(&[s.hook.name])
            .set(i64::from(s.error.is_none()));
    }
    let shared = Shared::new(
        metrics,
        Limits {
            recent: args.recent_events,
            ..Limits::default()
        },
    );
    crate::server::serve(args.metrics_addr, shared.clone()).await?;
    let tracker = Tracker::new(race::Config {
        capture_port: args.capture_port,
        sidecar_ports: args.sidecar_ports.clone(),
        proxy_uid: args.proxy_uid,
        hold_ns: (args.hold_seconds.max(0.0) * 1e9) as u64,
        ..race::Config::default()
    });
    let mut who = attributor(&args);
    who.set_cgroup_grace(Duration::from_secs(args.cgroup_grace_seconds));
    let mut p = Pipeline::new(who, tracker, sink, shared.clone());
    p.use_api = kube_rx.is_some();
    p.process_events = args.process_events;
    if args.k8s_events {
        p.k8s_events = Some(start_k8s_events(&args, p.k8s_events_dropped.clone()).await?);
    }
    let restored = restore::restore(
        &args.proc_root,
        &mut p.who,
        None,
        &mut p.tracker,
        &args.sidecar_ports,
        args.proxy_uid,
    );
    tracing::info!(restored, "pods with a listening sidecar found at start");
    if args.keep_privileges {
        tracing::warn!("--keep-privileges: capabilities are not dropped after start-up");
    } else {
        let kept = crate::privileges::drop_after_load()?;
        tracing::info!(?kept, "dropped all other capabilities");
    }
    release_startup_memory();
    let mut clock = Clock::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(DRAIN_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_seen = 0u64;
    let attached = probes.status.iter().filter(|s| s.error.is_none()).count();
    shared
        .attached
        .store(true, std::sync::atomic::Ordering::Relaxed);
    shared.beat();
    tracing::info!(
        attached,
        total = probes.status.len(),
        "probes attached, reading events"
    );
    let mut ticks = 0u64;
    loop {
        // Signals, then API updates and timers, then the ring: during a flood
        // the ring is always readable, and the others must still be served.
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            Some(u) = recv(&mut kube_rx) => {
                match &u {
                    Update::Error(e) => p.who.error("kubernetes", format!("API server: {e}; using runtime metadata")),
                    Update::Recovered => tracing::info!("Kubernetes API reachable again"),
                    _ => p.who.invalidate(),
                }
                p.pods.apply(u);
            }
            _ = tick.tick() => {
                ticks += 1;
                shared.beat();
                probes.drain(|bytes| p.record(bytes, &clock));
                if ticks.is_multiple_of(1000 / DRAIN_MS) {
                    clock.refresh();
                    report_lost(&probes, &mut lost_seen, &mut p.sink)?;
                    p.update_self_metrics(lost_seen);
                }
                if ticks.is_multiple_of(60_000 / DRAIN_MS)
                    && let Ok(mut m) = shared.metrics.lock()
                {
                    m.expire();
                }
                p.advance(Clock::mono_now())?;
            }
            r = probes.read_batch(|bytes| p.record(bytes, &clock)) => {
                if r? == crate::probes::BATCH {
                    // The ring is still full: let the runtime poll its
                    // drivers (signals, sockets, timers) before the next batch.
                    tokio::task::yield_now().await;
                }
                p.advance(Clock::mono_now())?;
            }
        }
    }
    let t0 = std::time::Instant::now();
    tracing::info!("signal received, stopping");
    // Stop the kernel side first: nothing more is written, so the drain ends.
    probes.detach();
    let detach_ms = t0.elapsed().as_millis();
    // What the kernel wrote but did not wake us for is still delivered, and
    // what the race tracker holds is released, within budgets so that SIGTERM
    // mid-flood still exits promptly; what is left is counted and reported,
    // never silently dropped.
    let budget = std::time::Instant::now() + Duration::from_millis(500);
    let (_, skipped) = probes.drain_until(budget, |bytes| p.record(bytes, &clock));
    let drain_ms = t0.elapsed().as_millis() - detach_ms;
    report_lost(&probes, &mut lost_seen, &mut p.sink)?;
    let json_skipped = p.flush_until(std::time::Instant::now() + Duration::from_millis(500))?;
    let flush_ms = t0.elapsed().as_millis() - detach_ms - drain_ms;
    if skipped > 0 || json_skipped > 0 {
        tracing::warn!(
            skipped,
            json_skipped,
            "exiting: ring buffer records left unprocessed / failures counted but not written"
        );
        p.sink.write(&Summary::now(
            "events_unprocessed_at_exit",
            &serde_json::json!({ "unprocessed": skipped, "json_skipped": json_skipped }),
        ))?;
        p.sink.flush()?;
    }
    drop(probes);
    tracing::info!(
        detach_ms,
        drain_ms,
        flush_ms,
        total_ms = t0.elapsed().as_millis(),
        "probes detached, exiting"
    );
    Ok(())
}

/// Start-up (parsing the kernel's BTF, loading programs) allocates and frees
/// tens of MiB; glibc keeps freed heap mapped, so the agent would carry it in
/// its RSS for its whole life. Hand it back once.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; no pointers change.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Builds the attributor from the command line.
pub fn attributor(args: &RunArgs) -> Attributor {
    let cgroups = match &args.cgroup_root {
        Some(r) => Resolver::new(Some(r.clone())),
        None => Resolver::from_mountinfo(),
    };
    match cgroups.root() {
        Some(r) => tracing::info!(root = %r.display(), "cgroup v2 mount"),
        None => tracing::warn!("no cgroup v2 mount; attributing through /proc/<pid>/cgroup"),
    }
    let node = args.node_name.clone().or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
    });
    let runtime = Reader::new(Roots {
        containerd: args.containerd_root.clone(),
        crio: args.crio_root.clone(),
    });
    Attributor::new(node, cgroups, runtime, args.proc_root.clone())
}

/// Starts the pod watcher when the API is wanted; `None` when it is off.
async fn start_kube(args: &RunArgs) -> Result<Option<tokio::sync::mpsc::Receiver<Update>>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let wanted = match args.kubernetes {
        KubeMode::Off => false,
        KubeMode::On => true,
        KubeMode::Auto => in_cluster || args.kube_api_url.is_some(),
    };
    if !wanted {
        tracing::info!("Kubernetes API off: attributing from runtime metadata and cgroups");
        return Ok(None);
    }
    let node = args
        .node_name
        .clone()
        .context("--kubernetes needs --node-name (or NODE_NAME) to watch this node's pods")?;
    let access = match &args.kube_api_url {
        Some(u) => kube::Access::Url(u.clone()),
        None => kube::Access::Infer,
    };
    let client = kube::client(&access)
        .await
        .context("building the Kubernetes client")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(kube::watch(client, node.clone(), tx));
    tracing::info!(%node, "watching this node's pods");
    Ok(Some(rx))
}

/// Starts the Kubernetes Events writer.
async fn start_k8s_events(
    args: &RunArgs,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) -> Result<tokio::sync::mpsc::Sender<kube::PodEvent>> {
    let access = match &args.kube_api_url {
        Some(u) => kube::Access::Url(u.clone()),
        None => kube::Access::Infer,
    };
    let client = kube::client(&access)
        .await
        .context("--k8s-events needs the Kubernetes API")?;
    let node = args.node_name.clone().unwrap_or_else(|| "unknown".into());
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(kube::write_events(
        client,
        node,
        rx,
        30,
        Duration::from_secs(600),
        dropped,
    ));
    Ok(tx)
}

/// Receives from an optional channel; pending forever when there is none.
async fn recv(rx: &mut Option<tokio::sync::mpsc::Receiver<Update>>) -> Option<Update> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn report_lost(probes: &Probes, seen: &mut u64, sink: &mut Sink) -> Result<()> {
    let total = probes.lost_total()?;
    if total > *seen {
        tracing::warn!(
            lost = total - *seen,
            total,
            "kernel ring buffer full: events lost"
        );
        sink.write(&Summary::now(
            "events_lost",
            &Lost {
                lost: total - *seen,
                lost_total: total,
            },
        ))?;
        sink.flush()?;
        *seen = total;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cgroup::Resolver,
        events::Target,
        race,
        runtime::{Reader, Roots},
        server::Limits,
        testbed::records,
    };
    use connscope_ebpf::flags;

    fn refused(ts: u64) -> Vec<u8> {
        // Host process, loopback: nothing to attribute, no pod to hold for.
        let mut ev = records::refused(0, ts, 4_000_000);
        ev.flags = flags::FROM_SYSCALL | flags::CONTEXT_KNOWN;
        ev.netns = 0;
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        records::bytes(&ev)
    }

    fn pipeline(out: &std::path::Path) -> Pipeline {
        let none = out.with_extension("none");
        let who = Attributor::new(
            None,
            Resolver::new(Some(none.clone())),
            Reader::new(Roots {
                containerd: none.clone(),
                crio: none,
            }),
            "/nonexistent-proc".into(),
        );
        Pipeline::new(
            who,
            Tracker::new(race::Config::default()),
            Sink::open(&Target::File(out.into())).unwrap(),
            Shared::new(Metrics::new(false).unwrap(), Limits::default()),
        )
    }

    /// Sum of every rendered sample whose series starts with `prefix`.
    fn metric_sum(p: &Pipeline, prefix: &str) -> f64 {
        p.shared
            .metrics
            .lock()
            .unwrap()
            .render()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    #[test]
    fn exit_flush_past_its_deadline_counts_what_it_does_not_write() {
        let dir = std::env::temp_dir().join(format!("connscope-flush-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let clock = Clock::with_offset_ns(0);
        for (deadline_passed, file) in [(false, "in-time.json"), (true, "late.json")] {
            let out = dir.join(file);
            let mut p = pipeline(&out);
            for i in 0..50 {
                p.record(&refused(1_000_000_000 + i * 1000), &clock);
            }
            let deadline = if deadline_passed {
                std::time::Instant::now()
            } else {
                std::time::Instant::now() + Duration::from_secs(60)
            };
            let skipped = p.flush_until(deadline).unwrap();
            let written = std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .filter(|l| l.contains("\"connect_failure\""))
                .count() as u64;
            assert_eq!(
                metric_sum(&p, "connscope_connect_failures_total"),
                50.0,
                "{file}: every failure counted"
            );
            assert_eq!(written + skipped, 50, "{file}: written or reported skipped");
            assert_eq!(skipped > 0, deadline_passed, "{file}: skipped {skipped}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn events_total(p: &Pipeline, kind: &str) -> f64 {
        metric_sum(p, &format!("connscope_events_total{{type=\"{kind}\"}} "))
    }

    #[test]
    fn record_types_are_counted_per_batch_and_reach_the_metrics_at_export() {
        let out = std::env::temp_dir().join(format!("connscope-kinds-{}.json", std::process::id()));
        let mut p = pipeline(&out);
        let clock = Clock::with_offset_ns(0);
        for i in 0..7 {
            p.record(&refused(1_000_000_000 + i * 1000), &clock);
        }
        p.record(&[1, 2, 3], &clock);
        assert_eq!(
            events_total(&p, "connect_failure"),
            0.0,
            "added at export, not per record"
        );
        p.advance(1_000_000_000).unwrap();
        assert_eq!(events_total(&p, "connect_failure"), 7.0);
        assert_eq!(events_total(&p, "unknown"), 1.0, "an undecodable record");
        assert_eq!(events_total(&p, "listener"), 0.0);
        p.record(&refused(2_000_000_000), &clock);
        p.advance(2_000_000_000).unwrap();
        assert_eq!(
            events_total(&p, "connect_failure"),
            8.0,
            "the next batch adds, once"
        );
        let _ = std::fs::remove_file(&out);
    }
}
