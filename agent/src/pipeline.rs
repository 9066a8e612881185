//! `connscope run`: kernel events in, JSON lines out, until a signal.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribute::Attributor,
    cgroup::Resolver,
    cli::{KubeMode, RunArgs},
    decode::{self, Clock, Raw},
    events::{Record, Sink},
    kube::{self, PodStore, Update},
    offsets,
    probes::{LoadOptions, Probes},
    runtime::{Reader, Roots},
};

/// A line reporting events the kernel could not deliver: loss is never silent.
#[derive(Debug, Serialize)]
struct Lost {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    /// Newly lost since the previous report.
    lost: u64,
    lost_total: u64,
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
    let mut sink =
        Sink::open(&args.events).with_context(|| format!("opening --events {:?}", args.events))?;
    let mut who = attributor(&args);
    let mut pods = PodStore::default();
    let mut kube_rx = start_kube(&args).await?;
    let use_api = kube_rx.is_some();
    let mut clock = Clock::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut lost_seen = 0u64;
    let mut decode_errors = 0u64;
    let attached = probes.status.iter().filter(|s| s.error.is_none()).count();
    tracing::info!(
        attached,
        total = probes.status.len(),
        "probes attached, reading events"
    );
    loop {
        tokio::select! {
            r = probes.read_batch(|bytes| {
                let decoded = decode::parse_record(bytes).and_then(|raw| match raw {
                    Raw::Event(e) => decode::decode(&e, &clock).map(Ok),
                    Raw::Cgroup(c) => decode::decode_cgroup(&c).map(Err),
                });
                match decoded {
                    Ok(Ok(ev)) => {
                        let a = who.attribute(&ev, use_api.then_some(&pods));
                        if let Err(e) = sink.write(&Record::from_kernel(&ev, &a)) {
                            tracing::error!(error = %e, "writing event");
                        }
                    }
                    Ok(Err(change)) => who.cgroup_changed(change),
                    Err(e) => {
                        decode_errors += 1;
                        tracing::warn!(error = %e, decode_errors, "undecodable ring buffer record");
                    }
                }
            }) => {
                r?;
                sink.flush()?;
            }
            Some(u) = recv(&mut kube_rx) => {
                match &u {
                    Update::Error(e) => who.error("kubernetes", format!("API server: {e}; using runtime metadata")),
                    Update::Recovered => tracing::info!("Kubernetes API reachable again"),
                    _ => who.invalidate(),
                }
                pods.apply(u);
            }
            _ = tick.tick() => {
                clock.refresh();
                report_lost(&probes, &mut lost_seen, &mut sink)?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    report_lost(&probes, &mut lost_seen, &mut sink)?;
    sink.flush()?;
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
        sink.write(&Lost {
            kind: "events_lost",
            time: crate::events::rfc3339(std::time::SystemTime::now()),
            lost: total - *seen,
            lost_total: total,
        })?;
        sink.flush()?;
        *seen = total;
    }
    Ok(())
}
