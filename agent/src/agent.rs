//! `connscope run`: start (load and attach the probes, open the exports,
//! rebuild running pods, drop privileges), serve (feed the pipeline from the
//! ring buffer until a signal) and shut down (detach first, then drain and
//! flush within budgets, reporting what is left).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use connscope_ebpf::Config;
use serde::Serialize;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

use crate::{
    attribute::{
        Attributor,
        cgroup::Resolver,
        runtime::{Reader, Roots},
    },
    cli::{AuthMode, KubeMode, RunArgs},
    export::{
        ExportOptions, Exporter,
        auth::{Auth, CachePolicy, KubeReviewer},
        http::{self, Limits, Shared},
        json::{Sink, Summary},
        metrics::Metrics,
        server::{self, ServerLimits},
    },
    k8s::{self, Update},
    kernel::{
        decode::Clock,
        offsets, privileges,
        probes::{self, LoadOptions, Probes},
    },
    pipeline::Pipeline,
    race::{self, Tracker},
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

/// A started agent: probes attached, exports open, pipeline ready.
pub(crate) struct Agent {
    probes: Probes,
    pipeline: Pipeline,
    shared: std::sync::Arc<Shared>,
    kube_rx: Option<mpsc::Receiver<Update>>,
    clock: Clock,
    lost_seen: u64,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    let mut agent = Agent::start(&args).await?;
    agent.serve().await?;
    agent.shutdown()
}

impl Agent {
    /// Loads and attaches the probes, opens the exports, rebuilds the pods
    /// already running and drops the privileges no longer needed.
    pub(crate) async fn start(args: &RunArgs) -> Result<Agent> {
        // Before any thread starts: the threads started before the drop
        // drop their own privileges unless they are kept.
        privileges::keep(args.keep_privileges);
        let nofile = raise_nofile();
        let (probes, kernel_capture) = load_probes(args)?;
        let sink = Sink::open(&args.events)
            .with_context(|| format!("opening --events {:?}", args.events))?;
        let kube_rx = start_kube(args).await?;
        let metrics = Metrics::new(args.pod_labels).context("registering metrics")?;
        for s in &probes.status {
            metrics
                .health
                .probe_attached
                .with_label_values(&[s.hook.name])
                .set(i64::from(s.error.is_none()));
        }
        metrics
            .health
            .connect_path
            .with_label_values(&[probes.connect_path.label()])
            .set(1);
        let shared = Shared::new(
            metrics,
            Limits {
                recent: args.recent_events,
                follower_idle: Duration::from_secs(args.follow_idle_seconds.max(1)),
                ..Limits::default()
            },
        );
        // Bound now (a bad address stops the agent before anything else);
        // served from a thread started after the privileges are dropped,
        // so that it inherits none of them.
        let listener = server::bind(args.metrics_addr)?;
        let tracker = Tracker::new(race::Config {
            capture_port: args.capture_port,
            sidecar_ports: args.sidecar_ports.clone(),
            proxy_uid: args.proxy_uid,
            hold_ns: (args.hold_seconds.max(0.0) * 1e9) as u64,
            kernel_capture,
            ambient_grace_ns: (args.ambient_grace_seconds.max(0.0) * 1e9) as u64,
            ..race::Config::default()
        });
        let mut who = attributor(args);
        who.set_cgroup_grace(Duration::from_secs(args.cgroup_grace_seconds));
        let k8s_events = if args.k8s_events {
            let node = args.node_name.clone().unwrap_or_else(|| "unknown".into());
            Some(k8s::start_events(&access(args), node).await?)
        } else {
            None
        };
        let exporter = Exporter::new(
            sink,
            shared.clone(),
            ExportOptions {
                process_events: args.process_events,
                k8s_events,
                recent_line_bytes: ExportOptions::line_bytes_for(
                    args.recent_events_bytes,
                    args.recent_events,
                ),
            },
        );
        let mut pipeline = Pipeline::new(who, tracker, exporter, kube_rx.is_some())
            .with_metadata_hold(Duration::from_millis(args.metadata_wait_ms));
        let restored = pipeline.restore(&args.proc_root, &args.sidecar_ports, args.proxy_uid);
        tracing::info!(restored, "pods with a listening sidecar found at start");
        if args.keep_privileges {
            tracing::warn!("--keep-privileges: capabilities are not dropped after start-up");
        } else {
            let d = privileges::drop_after_load()?;
            if !d.missing.is_empty() {
                tracing::warn!(
                    missing = ?d.missing,
                    "capabilities dropped, but not locked: without CAP_SETPCAP (the DaemonSet adds it) the bounding set and securebits stay as they were"
                );
            }
            tracing::info!(
                kept = ?d.kept,
                bounding = ?d.bounding,
                securebits = %format!("{:#x}", d.securebits),
                no_new_privs = d.no_new_privs,
                "dropped all other capabilities"
            );
        }
        release_startup_memory();
        start_http(listener, shared.clone(), args, nofile)?;
        Ok(Agent {
            probes,
            pipeline,
            shared,
            kube_rx,
            clock: Clock::new(),
            lost_seen: 0,
        })
    }

    /// Feeds the pipeline from the ring buffer, API updates and timers until
    /// SIGINT or SIGTERM.
    pub(crate) async fn serve(&mut self) -> Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(DRAIN_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let attached = self
            .probes
            .status
            .iter()
            .filter(|s| s.error.is_none())
            .count();
        self.shared
            .attached
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.beat();
        tracing::info!(
            attached,
            total = self.probes.status.len(),
            "probes attached, reading events"
        );
        let mut ticks = 0u64;
        let metadata = self.pipeline.metadata_waker();
        loop {
            // Signals, then API updates and timers, then the ring: during a
            // flood the ring is always readable, and the others must still
            // be served.
            tokio::select! {
                biased;
                _ = recv_signal(&mut sigint) => break,
                _ = recv_signal(&mut sigterm) => break,
                Some(u) = recv(&mut self.kube_rx) => self.pipeline.pods_changed(u),
                // Runtime metadata read (off this thread): events waiting for it go on.
                _ = metadata.notified() => self.pipeline.advance(Clock::mono_now()),
                _ = tick.tick() => {
                    ticks += 1;
                    self.on_tick(ticks)?;
                }
                r = self.probes.read_batch(|bytes| self.pipeline.record(bytes, &self.clock)) => {
                    if r? == probes::BATCH {
                        // The ring is still full: let the runtime poll its
                        // drivers (signals, sockets, timers) before the next batch.
                        tokio::task::yield_now().await;
                    }
                    self.pipeline.advance(Clock::mono_now());
                }
            }
        }
        Ok(())
    }

    /// The periodic work: drain what the kernel did not wake us for, once a
    /// second report losses and self-metrics, once a minute expire series.
    fn on_tick(&mut self, ticks: u64) -> Result<()> {
        self.shared.beat();
        let (pipeline, clock) = (&mut self.pipeline, &self.clock);
        self.probes.drain(|bytes| pipeline.record(bytes, clock));
        if ticks.is_multiple_of(1000 / DRAIN_MS) {
            self.clock.refresh();
            self.report_lost()?;
            self.pipeline.update_self_metrics(self.lost_seen);
        }
        if ticks.is_multiple_of(60_000 / DRAIN_MS)
            && let Ok(mut m) = self.shared.metrics.lock()
        {
            m.expire();
        }
        self.pipeline.advance(Clock::mono_now());
        Ok(())
    }

    /// Stops the kernel side first, so the drain ends; then delivers what the
    /// kernel wrote and what the race tracker holds, within budgets so that
    /// SIGTERM mid-flood still exits promptly. What is left is counted and
    /// reported, never silently dropped.
    pub(crate) fn shutdown(mut self) -> Result<()> {
        let t0 = Instant::now();
        tracing::info!("signal received, stopping");
        self.probes.detach();
        let detach_ms = t0.elapsed().as_millis();
        let budget = Instant::now() + Duration::from_millis(500);
        let (pipeline, clock) = (&mut self.pipeline, &self.clock);
        let (_, skipped) = self
            .probes
            .drain_until(budget, |bytes| pipeline.record(bytes, clock));
        let drain_ms = t0.elapsed().as_millis() - detach_ms;
        self.report_lost()?;
        let (json_skipped, synced) = self
            .pipeline
            .flush_until(Instant::now() + Duration::from_millis(500));
        let flush_ms = t0.elapsed().as_millis() - detach_ms - drain_ms;
        if skipped > 0 || json_skipped > 0 {
            tracing::warn!(
                skipped,
                json_skipped,
                "exiting: ring buffer records left unprocessed / failures counted but not written"
            );
            let sink = self.pipeline.exporter().sink();
            sink.write(&Summary::now(
                "events_unprocessed_at_exit",
                &serde_json::json!({ "unprocessed": skipped, "json_skipped": json_skipped }),
            ))?;
            // A stream that did not catch up gets no more time: exit stays prompt.
            let wait = if synced { 200 } else { 20 };
            sink.sync(Instant::now() + Duration::from_millis(wait));
        }
        drop(self.probes);
        tracing::info!(
            detach_ms,
            drain_ms,
            flush_ms,
            total_ms = t0.elapsed().as_millis(),
            "probes detached, exiting"
        );
        Ok(())
    }

    /// Writes an `events_lost` line when the kernel lost events since the
    /// last report.
    fn report_lost(&mut self) -> Result<()> {
        let total = self.probes.lost_total()?;
        if total > self.lost_seen {
            tracing::warn!(
                lost = total - self.lost_seen,
                total,
                "kernel ring buffer full: events lost"
            );
            let sink = self.pipeline.exporter().sink();
            sink.write(&Summary::now(
                "events_lost",
                &Lost {
                    lost: total - self.lost_seen,
                    lost_total: total,
                },
            ))?;
            sink.flush();
            self.lost_seen = total;
        }
        Ok(())
    }
}

/// Finds the offsets for this kernel, then loads and attaches the programs.
/// Loads the probes; also says whether the kernel proves capture (the
/// capture-reset hook attached on a kernel that fires it without a socket).
fn load_probes(args: &RunArgs) -> Result<(Probes, bool)> {
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
    if args.bench_no_ring_output {
        tracing::warn!(
            "--bench-no-ring-output: programs run in full, write nothing; nothing is reported"
        );
    }
    let probes = Probes::load(&LoadOptions {
        config: Config {
            noop: args.bench_noop_programs.into(),
            no_output: args.bench_no_ring_output.into(),
            capture_port: args.capture_port.into(),
            ..config
        },
        ring_bytes: args.ring_buffer_bytes,
        disabled: args.disable_probe.clone(),
        connect_path: args.connect_path,
        btf: args.btf.clone(),
    })?;
    let hook = probes
        .status
        .iter()
        .any(|s| s.hook.name == "tcp_send_reset" && s.error.is_none());
    let kernel_capture = hook && discovery.no_socket_resets && args.capture_port != 0;
    if kernel_capture {
        tracing::info!(
            capture_port = args.capture_port,
            "capture proof from the kernel: a refusal is the race only if tcp:tcp_send_reset shows it was redirected to the capture port"
        );
    } else {
        tracing::warn!(
            hook_attached = hook,
            no_socket_resets = discovery.no_socket_resets,
            "no capture proof from the kernel (tcp:tcp_send_reset without a socket needs kernel >= 6.10 and the hook): capture is decided from the pod's annotations, else inferred"
        );
    }
    Ok((probes, kernel_capture))
}

/// Raises the soft open-file limit to the hard one (every connection,
/// metadata file and BPF object is a descriptor; a low soft limit is a
/// default, not a decision). Returns the limit in effect.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = hard,
                "open-file limit raised to its hard limit"
            );
            hard
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
            soft
        }
    }
}

/// Whether the agent runs in a Kubernetes pod.
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// Serves the endpoints from their own thread: with `--http-auth`
/// kubernetes (or auto in a cluster), `/metrics` and `/events` need a token.
fn start_http(
    listener: std::net::TcpListener,
    shared: std::sync::Arc<Shared>,
    args: &RunArgs,
    nofile: u64,
) -> Result<()> {
    let (dropped, results) = {
        let m = shared
            .metrics
            .lock()
            .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))?;
        (
            m.health.http_connections_dropped.clone(),
            m.health.http_auth.clone(),
        )
    };
    let auth = match args.http_auth {
        AuthMode::Kubernetes => true,
        AuthMode::Auto => in_cluster(),
        AuthMode::None => false,
    };
    let addr = listener.local_addr()?;
    // Half the descriptors at most: the rest is the agent's own.
    let budget = usize::try_from(nofile / 2).unwrap_or(usize::MAX).max(16);
    let limits = ServerLimits {
        max_connections: args.http_max_connections.clamp(1, budget),
        header_timeout: Duration::from_secs(args.http_header_timeout_seconds.max(1)),
        ..ServerLimits::default()
    };
    if !auth && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "--http-auth none on a non-loopback address: anyone who can connect reads /metrics and /events");
    }
    let access = access(args);
    server::spawn(listener, limits, dropped, move || async move {
        let auth = if auth {
            let client = k8s::client(&access)
                .await
                .context("building the Kubernetes client for --http-auth")?;
            Some(Auth::new(
                Box::new(KubeReviewer(client)),
                CachePolicy::default(),
                results,
            ))
        } else {
            None
        };
        Ok(http::router(shared, auth))
    })?;
    tracing::info!(
        %addr,
        auth = if auth { "kubernetes" } else { "none" },
        max_connections = limits.max_connections,
        "serving /metrics /healthz /readyz /events"
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
pub(crate) fn attributor(args: &RunArgs) -> Attributor {
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
    })
    .with_timeout(Duration::from_millis(args.metadata_wait_ms));
    Attributor::new(node, cgroups, runtime, args.proc_root.clone())
}

/// How the agent reaches the API (an explicit URL, or in-cluster).
fn access(args: &RunArgs) -> k8s::Access {
    match &args.kube_api_url {
        Some(u) => k8s::Access::Url(u.clone()),
        None => k8s::Access::Infer,
    }
}

/// Starts the pod watcher when the API is wanted; `None` when it is off.
async fn start_kube(args: &RunArgs) -> Result<Option<mpsc::Receiver<Update>>> {
    let wanted = match args.kubernetes {
        KubeMode::Off => false,
        KubeMode::On => true,
        KubeMode::Auto => in_cluster() || args.kube_api_url.is_some(),
    };
    if !wanted {
        tracing::info!("Kubernetes API off: attributing from runtime metadata and cgroups");
        return Ok(None);
    }
    let node = args
        .node_name
        .clone()
        .context("--kubernetes needs --node-name (or NODE_NAME) to watch this node's pods")?;
    let rx = k8s::start_watch(&access(args), node.clone()).await?;
    tracing::info!(%node, "watching this node's pods");
    Ok(Some(rx))
}

/// Receives from an optional channel; pending forever when there is none.
async fn recv(rx: &mut Option<mpsc::Receiver<Update>>) -> Option<Update> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for a signal.
async fn recv_signal(s: &mut Signal) -> Option<()> {
    s.recv().await
}
