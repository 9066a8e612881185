//! `connscope run`: kernel events in, JSON lines out, until a signal.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::RunArgs,
    decode::{self, Clock},
    events::{Record, Sink},
    offsets,
    probes::{LoadOptions, Probes},
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
                match decode::parse(bytes).and_then(|raw| decode::decode(&raw, &clock)) {
                    Ok(ev) => {
                        if let Err(e) = sink.write(&Record::from_kernel(&ev)) {
                            tracing::error!(error = %e, "writing event");
                        }
                    }
                    Err(e) => {
                        decode_errors += 1;
                        tracing::warn!(error = %e, decode_errors, "undecodable ring buffer record");
                    }
                }
            }) => {
                r?;
                sink.flush()?;
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
