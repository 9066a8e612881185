//! Prometheus metrics: the public contract that dashboards and alerts use.
//!
//! Labels are `namespace`, `workload`, `container` (absent = empty value);
//! pod names only with `--pod-labels`, destinations never (they live in
//! events). Series not updated for `series_ttl` are dropped, so deleted
//! workloads do not grow the series count forever.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{
    Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

use crate::{
    attribute::{Attribution, revision::Series},
    kernel::kind::{RecordCounts, RecordType},
    race::{Phase, When},
};

/// Buckets for start-up latencies and race windows: 10 ms .. 120 s.
pub(crate) const BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// (hash of the attribution's label fields, errno, phase) of a cached
/// failure counter. By content, not by pointer: attributions that are not
/// final yet (runtime metadata or API still to come) are rebuilt per event,
/// and keying them by pointer made one entry, with its own `Arc`, per event.
type FailureKey = (u64, i32, Phase);
/// The attribution kept alive, its counter, and when it was last used.
type CachedCounter = (Arc<Attribution>, String, IntCounter, Instant);

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pod_labels: bool,
    pub connect_failures: IntCounterVec,
    pub startup_race_pods: IntCounterVec,
    pub pods_started: IntCounterVec,
    pub sidecar_ready_seconds: HistogramVec,
    pub startup_race_window_seconds: HistogramVec,
    pub shutdown_race_pods: IntCounterVec,
    /// Pods whose proxy was refused by their own app, by `when` (startup,
    /// shutdown; bind mismatches are not a race and only make events).
    pub inbound_race_pods: IntCounterVec,
    /// Pod's first process -> the app's first LISTEN.
    pub app_listen_seconds: HistogramVec,
    /// 1 per workload revision (template hash, proxy version) of the
    /// injected pods running on this node.
    pub workload_revision_info: IntGaugeVec,
    /// Ambient pods without ztunnel's HBONE listener past the grace period.
    pub ambient_unenrolled_pods: IntGaugeVec,
    /// Ambient enrollment changes by `state` (enrolled, lost, never).
    pub ambient_enrollments: IntCounterVec,
    /// Its series, to remove the ones that went back to none.
    ambient_series: std::collections::BTreeSet<Vec<String>>,
    /// The series `workload_revision_info` has, to remove the ones whose
    /// last pod left.
    revision_series: std::collections::BTreeSet<Series>,
    pub events: IntCounterVec,
    /// `connscope_events_total` children by type, resolved once.
    /// The `connscope_events_total` child of each [`RecordType`], by index.
    event_kinds: Vec<IntCounter>,
    /// The agent's own health.
    pub health: Health,
    /// When each workload-level series was last touched, for expiry.
    touched: HashMap<(&'static str, Vec<String>), Instant>,
    /// Failure counters by [`FailureKey`] (a hash of the label fields, not a
    /// pointer). The cached attribution confirms a hit: by pointer first (the
    /// common case, one shared attribution per container), else by its label
    /// fields, so a hash collision never counts into another series.
    failure_cache: rustc_hash::FxHashMap<FailureKey, CachedCounter>,
    pub series_ttl: Duration,
}

/// The agent's own health: losses, metadata errors, state sizes, hooks.
pub struct Health {
    pub events_lost: IntCounter,
    pub metadata_errors: IntCounterVec,
    pub pods_tracked: IntGauge,
    /// Entries in the agent's caches, by kind: returns to baseline after churn.
    pub state_entries: IntGaugeVec,
    pub probe_attached: IntGaugeVec,
    pub connect_path: IntGaugeVec,
    pub build_info: GaugeVec,
    /// Failures held because the pod's injection was not yet known.
    pub held_failures: IntCounter,
    /// JSON lines a sink could not take, by sink (`stream`: `--events`;
    /// `events_endpoint`: the `/events` buffer) and reason.
    pub json_lines_dropped: IntCounterVec,
    /// Metadata values left out for being longer than a Kubernetes name.
    pub metadata_rejected: IntCounterVec,
    /// Requests to `/metrics` and `/events` by auth result.
    pub http_auth: IntCounterVec,
    /// HTTP connections closed by the connection cap, by reason.
    pub http_connections_dropped: IntCounterVec,
}

impl Health {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let build_info = register(
            r,
            GaugeVec::new(
                Opts::new("connscope_build_info", "Always 1; the agent's version"),
                &["version"],
            ),
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        Ok(Health {
            events_lost: register(
                r,
                IntCounter::new(
                    "connscope_events_lost_total",
                    "Kernel events the ring buffer had no room for",
                ),
            )?,
            metadata_errors: counters(
                "connscope_metadata_errors_total",
                "Failures reading attribution metadata, by source",
                &["source"],
            )?,
            pods_tracked: register(
                r,
                IntGauge::new(
                    "connscope_pods_tracked",
                    "Pods with a sidecar timeline in memory",
                ),
            )?,
            state_entries: gauges(
                "connscope_state_entries",
                "Entries in the agent's caches, by kind",
                &["kind"],
            )?,
            probe_attached: gauges(
                "connscope_probe_attached",
                "1 if the kernel hook is attached, 0 if this kernel lacks it or it failed",
                &["probe"],
            )?,
            connect_path: gauges(
                "connscope_connect_path",
                "1 for the path connect() is seen by: fentry (fentry/fexit on __sys_connect) or tracepoint (syscalls:sys_{enter,exit}_connect)",
                &["path"],
            )?,
            held_failures: register(
                r,
                IntCounter::new(
                    "connscope_held_failures_total",
                    "Failures held until their pod's sidecar injection was known",
                ),
            )?,
            json_lines_dropped: counters(
                "connscope_json_lines_dropped_total",
                "JSON lines a sink could not take (metrics are unaffected), by sink and reason",
                &["sink", "reason"],
            )?,
            metadata_rejected: counters(
                "connscope_metadata_values_rejected_total",
                "Metadata values not taken as they came, by source and field: names over 253 bytes, images over 640 bytes or not of the reference grammar, label values (istio_revision, pod_template_hash) that are not Kubernetes label values (all left out), and cgroup paths cut by the kernel record (source kernel; resolved from the cgroup file system)",
                &["source", "field"],
            )?,
            http_auth: counters(
                "connscope_http_auth_total",
                "Requests to /metrics and /events by auth result (allowed, unauthenticated, forbidden, unavailable: the API could not review the token)",
                &["result"],
            )?,
            http_connections_dropped: counters(
                "connscope_http_connections_dropped_total",
                "HTTP connections closed at the connection cap (evicted: the oldest one without a whole request; over_limit: every connection busy)",
                &["reason"],
            )?,
            build_info,
        })
    }
}

/// Registers a new collector: each metric is created and registered in one
/// place.
fn register<C: Collector + Clone + 'static>(
    r: &Registry,
    c: prometheus::Result<C>,
) -> prometheus::Result<C> {
    let c = c?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn with_pod(base: &[&'static str], pod: bool) -> Vec<&'static str> {
    let mut v = base.to_vec();
    if pod {
        v.push("pod");
    }
    v
}

impl Metrics {
    /// Registers every metric. `pod_labels` adds a `pod` label to the
    /// per-workload series (higher cardinality: opt-in).
    pub fn new(pod_labels: bool) -> prometheus::Result<Self> {
        let r = Registry::new();
        let wl = with_pod(&["namespace", "workload", "mesh"], pod_labels);
        let cf = with_pod(
            &[
                "namespace",
                "workload",
                "mesh",
                "container",
                "errno",
                "phase",
            ],
            pod_labels,
        );
        let started = with_pod(&["namespace", "workload", "mesh", "injected"], pod_labels);
        let inbound = with_pod(&["namespace", "workload", "mesh", "when"], pod_labels);
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let hist = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
            register(&r, HistogramVec::new(opts, &wl))
        };
        let events = counters(
            "connscope_events_total",
            "Kernel events read, by type",
            &["type"],
        )?;
        Ok(Metrics {
            connect_failures: counters(
                "connscope_connect_failures_total",
                "connect() failures seen in the kernel, by phase relative to the pod's sidecar",
                &cf,
            )?,
            startup_race_pods: counters(
                "connscope_startup_race_pods_total",
                "Pods whose application was refused before the sidecar's capture port listened",
                &wl,
            )?,
            pods_started: counters(
                "connscope_pods_started_total",
                "Pods seen starting on this node (denominator for race ratios)",
                &started,
            )?,
            sidecar_ready_seconds: hist(
                "connscope_sidecar_ready_seconds",
                "Pod's first process to the sidecar's capture port (15001) listening",
            )?,
            startup_race_window_seconds: hist(
                "connscope_startup_race_window_seconds",
                "First refused connect to the sidecar's capture port listening",
            )?,
            shutdown_race_pods: counters(
                "connscope_shutdown_race_pods_total",
                "Pods whose application was refused after the sidecar's capture listener closed",
                &wl,
            )?,
            inbound_race_pods: counters(
                "connscope_inbound_race_pods_total",
                "Pods whose proxy was refused by their own app before it listened (when=startup) or after it closed its listener (when=shutdown); one per pod and episode",
                &inbound,
            )?,
            app_listen_seconds: hist(
                "connscope_app_listen_seconds",
                "Pod's first process to its app's first LISTEN (once per pod)",
            )?,
            workload_revision_info: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "connscope_workload_revision_info",
                        "1 for each workload revision with an injected pod running on this node: revision is the pod-template-hash (or controller-revision-hash; empty without the API), proxy_version the proxy image's tag (empty when it has none)",
                    ),
                    &["namespace", "workload", "revision", "proxy_version"],
                ),
            )?,
            ambient_unenrolled_pods: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "connscope_ambient_unenrolled_pods",
                        "Istio ambient pods (marked by the API) whose network namespace has had no ztunnel HBONE listener (15008) for longer than --ambient-grace-seconds",
                    ),
                    &wl,
                ),
            )?,
            ambient_enrollments: counters(
                "connscope_ambient_enrollments_total",
                "Istio ambient pods' enrollment changes by state: enrolled (ztunnel's HBONE listener appeared in the pod's network namespace), lost (it closed, past the grace period), never (it never appeared, past the grace period)",
                &with_pod(&["namespace", "workload", "mesh", "state"], pod_labels),
            )?,
            ambient_series: Default::default(),
            revision_series: Default::default(),
            event_kinds: RecordType::ALL
                .into_iter()
                .map(|t| events.with_label_values(&[t.label()]))
                .collect(),
            events,
            health: Health::new(&r)?,
            registry: r,
            pod_labels,
            touched: HashMap::new(),
            failure_cache: Default::default(),
            series_ttl: Duration::from_secs(3600),
        })
    }

    /// A workload-level series' label values: namespace, workload, the
    /// pod's mesh (a profile's name: bounded), then `extra`, then the pod
    /// when `--pod-labels`.
    fn labels(
        &mut self,
        metric: &'static str,
        who: &Attribution,
        mesh: &str,
        extra: &[&str],
    ) -> Vec<String> {
        let v = self.label_values(who, mesh, extra);
        self.touched.insert((metric, v.clone()), Instant::now());
        v
    }

    /// A pod-level series' label values: namespace, workload, mesh, then
    /// `extra`, then the pod with `--pod-labels`.
    fn label_values(&self, who: &Attribution, mesh: &str, extra: &[&str]) -> Vec<String> {
        let mut v = vec![
            who.namespace.clone().unwrap_or_default(),
            who.workload.clone().unwrap_or_default(),
            mesh.to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        if self.pod_labels {
            v.push(who.pod.clone().unwrap_or_default());
        }
        v
    }

    /// A connect failure with its phase.
    /// `now` is the batch's time (the cache's last-use stamp), taken once by
    /// the caller rather than read from the clock per failure.
    pub(crate) fn failure(
        &mut self,
        who: &Arc<Attribution>,
        errno: i32,
        phase: Phase,
        mesh: &str,
        now: Instant,
    ) {
        use std::hash::BuildHasher as _;
        // Only what the series' labels are made of identifies the counter.
        let pod = if self.pod_labels { &who.pod } else { &None };
        let ident = (&who.namespace, &who.workload, &who.container, pod, mesh);
        let key = (rustc_hash::FxBuildHasher.hash_one(ident), errno, phase);
        let pod_labels = self.pod_labels;
        if let Some((cached, cached_mesh, c, t)) = self.failure_cache.get_mut(&key)
            && cached_mesh == mesh
            && (Arc::ptr_eq(cached, who)
                || (cached.namespace == who.namespace
                    && cached.workload == who.workload
                    && cached.container == who.container
                    && (!pod_labels || cached.pod == who.pod)))
        {
            c.inc();
            *t = now;
            return;
        }
        let c = who.container.clone().unwrap_or_default();
        let name = crate::kernel::decode::errno_name(errno);
        let l = self.labels("failures", who, mesh, &[&c, &name, phase.as_str()]);
        let counter = self.connect_failures.with_label_values(&strs(&l));
        counter.inc();
        if self.failure_cache.len() >= 100_000 {
            self.failure_cache.clear();
        }
        self.failure_cache
            .insert(key, (who.clone(), mesh.to_string(), counter, now));
    }

    /// Adds one batch of per-type event counts (indexed by [`RecordType`]):
    /// one lock and one atomic add per type per batch, not per event.
    pub(crate) fn add_events(&self, counts: &RecordCounts) {
        for (c, n) in self.event_kinds.iter().zip(counts) {
            if *n > 0 {
                c.inc_by(*n);
            }
        }
    }

    /// A pod seen starting.
    pub(crate) fn pod_started(&mut self, who: &Attribution, mesh: &str, injected: bool) {
        let l = self.labels(
            "started",
            who,
            mesh,
            &[if injected { "true" } else { "false" }],
        );
        self.pods_started.with_label_values(&strs(&l)).inc();
        if injected {
            // Race counters start at 0 with the workload, so a first race is
            // an increase Prometheus can see, not a series born at 1.
            let r = self.labels("race", who, mesh, &[]);
            self.startup_race_pods.with_label_values(&strs(&r));
            let s = self.labels("shutdown", who, mesh, &[]);
            self.shutdown_race_pods.with_label_values(&strs(&s));
            for when in [When::Startup, When::Shutdown] {
                let l = self.labels("inbound", who, mesh, &[when.as_str()]);
                self.inbound_race_pods.with_label_values(&strs(&l));
            }
        }
    }

    /// A pod's app listened for the first time, `seconds` after its first
    /// process.
    pub(crate) fn app_listen(&mut self, who: &Attribution, mesh: &str, seconds: f64) {
        let l = self.labels("app_listen", who, mesh, &[]);
        self.app_listen_seconds
            .with_label_values(&strs(&l))
            .observe(seconds);
    }

    /// A pod's inbound episode (bind mismatches are not counted: not a race).
    pub(crate) fn inbound_race(&mut self, who: &Attribution, mesh: &str, when: When) {
        if when == When::Bind {
            return;
        }
        let l = self.labels("inbound", who, mesh, &[when.as_str()]);
        self.inbound_race_pods.with_label_values(&strs(&l)).inc();
    }

    /// A sidecar became ready `seconds` after the pod's first process.
    pub(crate) fn sidecar_ready(&mut self, who: &Attribution, mesh: &str, seconds: f64) {
        let l = self.labels("ready", who, mesh, &[]);
        self.sidecar_ready_seconds
            .with_label_values(&strs(&l))
            .observe(seconds);
    }

    /// A pod raced at start-up.
    pub(crate) fn startup_race(&mut self, who: &Attribution, mesh: &str, window: Option<f64>) {
        let l = self.labels("race", who, mesh, &[]);
        self.startup_race_pods.with_label_values(&strs(&l)).inc();
        if let Some(w) = window {
            self.startup_race_window_seconds
                .with_label_values(&strs(&l))
                .observe(w);
        }
    }

    /// A pod raced at shutdown.
    pub(crate) fn shutdown_race(&mut self, who: &Attribution, mesh: &str) {
        let l = self.labels("shutdown", who, mesh, &[]);
        self.shutdown_race_pods.with_label_values(&strs(&l)).inc();
    }

    /// Sets the workload revisions running on the node: new ones appear at
    /// 1, those whose last pod left are removed.
    pub(crate) fn set_revisions(&mut self, now: &std::collections::BTreeSet<Series>) {
        for gone in self.revision_series.difference(now) {
            let _ = self.workload_revision_info.remove_label_values(&strs(gone));
        }
        for new in now.difference(&self.revision_series) {
            self.workload_revision_info
                .with_label_values(&strs(new))
                .set(1);
        }
        self.revision_series = now.clone();
    }

    /// An ambient pod's enrollment changed to `state`.
    pub(crate) fn ambient_enrollment(&mut self, who: &Attribution, mesh: &str, state: &str) {
        let l = self.labels("ambient", who, mesh, &[state]);
        self.ambient_enrollments.with_label_values(&strs(&l)).inc();
    }

    /// Sets the unenrolled ambient pods per workload (the whole set: series
    /// with none left are removed).
    pub(crate) fn set_ambient_unenrolled(&mut self, mesh: &str, pods: &[Arc<Attribution>]) {
        let mut now: std::collections::BTreeMap<Vec<String>, i64> = Default::default();
        for who in pods {
            *now.entry(self.label_values(who, mesh, &[])).or_default() += 1;
        }
        for gone in self.ambient_series.iter().filter(|l| !now.contains_key(*l)) {
            let _ = self
                .ambient_unenrolled_pods
                .remove_label_values(&strs(gone));
        }
        for (l, n) in &now {
            self.ambient_unenrolled_pods
                .with_label_values(&strs(l))
                .set(*n);
        }
        self.ambient_series = now.into_keys().collect();
    }

    /// Drops series of workloads not seen for `series_ttl`.
    pub(crate) fn expire(&mut self) {
        let ttl = self.series_ttl;
        // Cached failure counters carry the freshest touch times: fold them
        // into `touched` in one pass (linear in both maps).
        let mut fresh: HashMap<(String, String), Instant> = HashMap::new();
        self.failure_cache.retain(|_, (who, _, _, t)| {
            let keep = t.elapsed() < ttl;
            if keep {
                let k = (
                    who.namespace.clone().unwrap_or_default(),
                    who.workload.clone().unwrap_or_default(),
                );
                let e = fresh.entry(k).or_insert(*t);
                *e = (*e).max(*t);
            }
            keep
        });
        for ((m, l), seen) in self.touched.iter_mut() {
            if *m == "failures"
                && let Some(t) = fresh.get(&(l[0].clone(), l[1].clone()))
                && *seen < *t
            {
                *seen = *t;
            }
        }
        let mut gone = Vec::new();
        self.touched.retain(|k, t| {
            let keep = t.elapsed() < ttl;
            if !keep {
                gone.push(k.clone());
            }
            keep
        });
        for (metric, l) in gone {
            let l = strs(&l);
            let _ = match metric {
                "failures" => self.connect_failures.remove_label_values(&l),
                "started" => self.pods_started.remove_label_values(&l),
                "ready" => self.sidecar_ready_seconds.remove_label_values(&l),
                "race" => self.startup_race_pods.remove_label_values(&l).and(
                    self.startup_race_window_seconds
                        .remove_label_values(&l)
                        .or(Ok(())),
                ),
                "shutdown" => self.shutdown_race_pods.remove_label_values(&l),
                "inbound" => self.inbound_race_pods.remove_label_values(&l),
                "app_listen" => self.app_listen_seconds.remove_label_values(&l),
                "ambient" => self.ambient_enrollments.remove_label_values(&l),
                _ => Ok(()),
            };
        }
    }

    /// Number of workload-level series currently exported.
    pub fn series(&self) -> usize {
        self.touched.len()
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[cfg(test)]
mod tests;
