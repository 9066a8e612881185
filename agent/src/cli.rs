//! Command-line definitions (clap), shared by the binary and the tests.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{export::json, kernel::probes::ConnectPathChoice, race::istio};

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "connscope", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the probes and report connect() failures until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Report which hooks, BTF and privileges this node offers.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
        btf: PathBuf,
    },
    /// Draw each affected pod's timeline from a running agent's /events:
    /// pod and container starts, the sidecar's listeners, refused connects,
    /// the verdict, the fix, and what changed since the previous revision.
    #[command(after_help = crate::explain::EXIT_CODES)]
    Explain(crate::explain::Args),
    /// Show the agent catching a real sidecar startup race on this machine (root).
    #[cfg(feature = "testbed")]
    Demo {
        /// How long the stand-in sidecar waits before listening on 15001.
        #[arg(long, default_value_t = 1500)]
        sidecar_delay_ms: u64,
        /// Show the inbound race instead: requests reach the pod before
        /// its app listens, and Envoy answers 503.
        #[arg(long)]
        inbound: bool,
        /// With --inbound: how long the app takes to listen.
        #[arg(long, default_value_t = 1500)]
        app_delay_ms: u64,
    },
    /// Stand-ins used by the demo and the tests (sidecar, application).
    #[cfg(feature = "testbed")]
    #[command(hide = true, subcommand)]
    Testbed(crate::testbed::Command),
}

/// Options of `connscope run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where JSON events go: stdout, none, or a file path (appended).
    #[arg(long, default_value = "stdout")]
    pub events: json::Target,
    /// Kernel ring buffer size in bytes (power of two).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub ring_buffer_bytes: u32,
    /// Do not attach this hook (tracepoint name, e.g. tcp_receive_reset). Repeatable.
    #[arg(long = "disable-probe")]
    pub disable_probe: Vec<String>,
    /// How connect() is seen: fentry/fexit on __sys_connect where the kernel
    /// allows it (auto), or the syscall tracepoints.
    #[arg(long, value_enum, default_value_t = ConnectPathChoice::Auto)]
    pub connect_path: ConnectPathChoice,
    /// Attach every hook but make each program return at once: what the
    /// hooks cost by themselves (`cargo xtask bench`). Reports nothing.
    #[arg(long, hide = true)]
    pub bench_noop_programs: bool,
    /// Run every program in full but write nothing to the ring: what the
    /// ring output costs (`cargo xtask bench`). Reports nothing.
    #[arg(long, hide = true)]
    pub bench_no_ring_output: bool,
    /// Kernel BTF used to find struct offsets.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// This node's name (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// cgroup2 mount to read; found in /proc/self/mountinfo when not given.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// /proc of the host (hostPID or a mount).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// containerd's runtime v2 task state directory.
    #[arg(long, default_value = "/run/containerd/io.containerd.runtime.v2.task")]
    pub containerd_root: PathBuf,
    /// How long an event waits for its container's runtime metadata
    /// (config.json) before it goes on without it, the read given up and
    /// counted. Raise it on nodes whose disks stall.
    #[arg(long, default_value_t = 250)]
    pub metadata_wait_ms: u64,
    /// CRI-O's container storage directory.
    #[arg(long, default_value = "/run/containers/storage/overlay-containers")]
    pub crio_root: PathBuf,
    /// Watch this node's pods: auto = when running in a cluster.
    #[arg(long, value_enum, default_value_t = KubeMode::Auto)]
    pub kubernetes: KubeMode,
    /// API server URL instead of the in-cluster config (plain HTTP allowed; tests).
    #[arg(long)]
    pub kube_api_url: Option<String>,
    /// Address of /metrics, /healthz, /readyz and /events.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: std::net::SocketAddr,
    /// Who may read /metrics and /events: `kubernetes` = a bearer token the
    /// API server accepts (TokenReview) for a user allowed to `get` the path
    /// (SubjectAccessReview on the non-resource URL); `none` = anyone who
    /// can connect; `auto` = `kubernetes` when running in a cluster.
    /// /healthz and /readyz are always open.
    #[arg(long, value_enum, default_value_t = AuthMode::Auto)]
    pub http_auth: AuthMode,
    /// Open HTTP connections at most (further ones take the place of the
    /// oldest connection that has not sent a whole request).
    #[arg(long, default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Seconds a client has to send a request's head (also the keep-alive
    /// idle limit).
    #[arg(long, default_value_t = 10)]
    pub http_header_timeout_seconds: u64,
    /// Seconds an `/events?follow=1` stream may go without a line before it
    /// is ended (the client reconnects).
    #[arg(long, default_value_t = 300)]
    pub follow_idle_seconds: u64,
    /// Add a `pod` label to per-workload metrics (higher cardinality).
    #[arg(long)]
    pub pod_labels: bool,
    /// Write a Warning Event on the Pod for each startup-race summary (needs the API).
    #[arg(long)]
    pub k8s_events: bool,
    /// Recent events kept for `/events` (0: none, and events that go
    /// nowhere are then not even serialised).
    #[arg(long, default_value_t = 2048)]
    pub recent_events: usize,
    /// Bytes the `/events` buffer may hold: each line may take this over
    /// `--recent-events` (at least 1 KiB); a larger one is kept as a short
    /// `event_too_large` stub, counted (the stream gets it whole).
    #[arg(long, default_value_t = crate::export::RECENT_BYTES)]
    pub recent_events_bytes: usize,
    /// Do not drop capabilities after start-up (debugging only).
    #[arg(long)]
    pub keep_privileges: bool,
    /// Seconds a deleted cgroup's path is remembered (late events of
    /// short-lived containers).
    #[arg(long, default_value_t = 300)]
    pub cgroup_grace_seconds: u64,
    /// Also write process exec/exit events to the stream (verbose).
    #[arg(long)]
    pub process_events: bool,
    /// The sidecar's outbound capture port: sidecar-ready = it listens.
    #[arg(long, default_value_t = istio::CAPTURE_PORT)]
    pub capture_port: u16,
    /// Ports whose LISTEN by the proxy uid marks a pod as injected.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = istio::SIDECAR_PORTS
    )]
    pub sidecar_ports: Vec<u16>,
    /// The proxy's uid (Istio: 1337).
    #[arg(long, default_value_t = istio::PROXY_UID)]
    pub proxy_uid: u32,
    /// How long a failure waits for its pod's injection to be known (kubelet
    /// starts a pod's containers within moments of each other).
    #[arg(long, default_value_t = 5.0)]
    pub hold_seconds: f64,
    /// How long an Istio ambient pod may be without ztunnel's HBONE listener
    /// (15008) in its network namespace before it is reported unenrolled.
    #[arg(long, default_value_t = 30.0)]
    pub ambient_grace_seconds: f64,
}

/// `--http-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    Auto,
    Kubernetes,
    None,
}

/// `--kubernetes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeMode {
    Auto,
    On,
    Off,
}
