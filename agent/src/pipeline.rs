//! `connscope run`: kernel event -> decode -> attribute -> correlate (race)
//! -> export, until a signal.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribute::{Attribution, Attributor},
    cgroup::Resolver,
    cli::{KubeMode, RunArgs},
    decode::{self, Clock, KernelEvent, Kind, Raw},
    events::{Record, Sink, Summary},
    kube::{self, PodStore, Update},
    offsets,
    probes::{LoadOptions, Probes},
    race::{self, Hints, Output, Tracker},
    restore,
    runtime::{Reader, Roots},
};

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
    out: Vec<Output>,
}

impl Pipeline {
    /// Decodes, attributes and queues one ring-buffer record.
    pub fn record(&mut self, bytes: &[u8], clock: &Clock) {
        match decode::parse_record(bytes) {
            Ok(Raw::Event(raw)) => match decode::decode(&raw, clock) {
                Ok(ev) => self.event(ev),
                Err(e) => self.bad_record(e),
            },
            Ok(Raw::Cgroup(c)) => match decode::decode_cgroup(&c) {
                Ok(change) => self.who.cgroup_changed(change),
                Err(e) => self.bad_record(e),
            },
            Err(e) => self.bad_record(e),
        }
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

    fn export(&mut self, out: &mut Vec<Output>) -> Result<()> {
        for o in out.drain(..) {
            let r = match &o {
                Output::Event { ev, who, phase } => {
                    if matches!(ev.kind, Kind::Exec | Kind::Exit) && !self.process_events {
                        continue;
                    }
                    self.sink.write(&Record::from_kernel(ev, who, *phase))
                }
                Output::PodStarted { .. } => Ok(()),
                Output::SidecarReady(s) => self.sink.write(&Summary::now("sidecar_ready", s)),
                Output::StartupRace(s) => self.sink.write(&Summary::now("startup_race", s)),
                Output::ShutdownRace(s) => self.sink.write(&Summary::now("shutdown_race", s)),
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "writing event");
            }
        }
        self.sink.flush()?;
        Ok(())
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
    let mut probes = Probes::load(&LoadOptions {
        config,
        ring_bytes: args.ring_buffer_bytes,
        disabled: args.disable_probe.clone(),
    })?;
    let sink =
        Sink::open(&args.events).with_context(|| format!("opening --events {:?}", args.events))?;
    let mut kube_rx = start_kube(&args).await?;
    let mut p = Pipeline {
        who: attributor(&args),
        pods: PodStore::default(),
        use_api: kube_rx.is_some(),
        tracker: Tracker::new(race::Config {
            capture_port: args.capture_port,
            sidecar_ports: args.sidecar_ports.clone(),
            proxy_uid: args.proxy_uid,
            hold_ns: (args.hold_seconds.max(0.0) * 1e9) as u64,
            ..race::Config::default()
        }),
        sink,
        process_events: args.process_events,
        decode_errors: 0,
        out: Vec::new(),
    };
    let restored = restore::restore(
        &args.proc_root,
        &mut p.who,
        None,
        &mut p.tracker,
        &args.sidecar_ports,
        args.proxy_uid,
    );
    tracing::info!(restored, "pods with a listening sidecar found at start");
    let mut clock = Clock::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut lost_seen = 0u64;
    let attached = probes.status.iter().filter(|s| s.error.is_none()).count();
    tracing::info!(
        attached,
        total = probes.status.len(),
        "probes attached, reading events"
    );
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            r = probes.read_batch(|bytes| p.record(bytes, &clock)) => {
                r?;
                p.advance(Clock::mono_now())?;
            }
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
                if ticks.is_multiple_of(10) {
                    clock.refresh();
                    report_lost(&probes, &mut lost_seen, &mut p.sink)?;
                }
                p.advance(Clock::mono_now())?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    report_lost(&probes, &mut lost_seen, &mut p.sink)?;
    p.flush()?;
    drop(probes);
    tracing::info!("probes detached, exiting");
    Ok(())
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
