//! Who failed: kernel event -> node, namespace, pod, container, workload.
//!
//! Sources, best first: the Kubernetes API (when watched), the runtime's
//! metadata files, the cgroup path's kubelet layout, and the pod name. A
//! field no source knows stays `None`: never a wrong guess.

use std::{collections::HashMap, sync::Arc};

use serde::Serialize;

pub mod cgroup;
pub mod kubelet;
mod pod_containers;
pub mod restore;
pub mod revision;
pub mod runtime;

use crate::{k8s::PodStore, kernel::decode::KernelEvent};
use cgroup::{Miss, Resolver};
use kubelet::Qos;
use runtime::{Lookup, Problem, Reader};

/// Where the workload name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadSource {
    /// Owner references from the API server.
    Api,
    /// Derived from the pod name (no API).
    Derived,
}

/// Everything known about where an event came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Attribution {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_source: Option<WorkloadSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<Qos>,
    /// The cgroup path, kept when it names no pod (system services, hosts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The pod's sandbox (pause) container.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sandbox: bool,
}

/// Metadata failures by source, exported as `connscope_metadata_errors_total`.
pub(crate) type ErrorCounts = HashMap<&'static str, u64>;
/// Metadata values left out for their length, by (source, field), exported
/// as `connscope_metadata_values_rejected_total`.
pub(crate) type RejectedCounts = HashMap<(&'static str, &'static str), u64>;

/// Attributes events; caches answers per cgroup id.
pub struct Attributor {
    node: Option<String>,
    cgroups: Resolver,
    runtime: Reader,
    proc_root: std::path::PathBuf,
    /// Answers by cgroup id, with until when they stand: None for complete
    /// ones; an incomplete one stands as long as what it lacks cannot
    /// appear (the runtime's cached absence or failure, and no change to
    /// the runtime's cache since; API changes and cgroup changes drop it
    /// too). A container with broken metadata then costs one lookup per
    /// event, not a cgroup parse and allocations (storms from such
    /// containers overflowed the ring).
    cache: rustc_hash::FxHashMap<u64, (Arc<Attribution>, Option<Incomplete>)>,
    /// Attributions of processes in the v2 root, by pid.
    by_pid_attr: rustc_hash::FxHashMap<u32, (Arc<Attribution>, std::time::Instant)>,
    /// `/proc/<pid>/cgroup` answers by pid, with when they were read.
    by_pid: rustc_hash::FxHashMap<u32, (Option<String>, std::time::Instant)>,
    /// Pod cgroup directory (relative) by pod uid, to list its containers.
    pod_dirs: HashMap<String, String>,
    /// Each pod's container cgroups (id, runtime), listed at most every
    /// 250 ms.
    scanned: HashMap<String, (std::time::Instant, Vec<(String, kubelet::Runtime)>)>,
    /// Failures by source (`cgroup`, `containerd`, `crio`, `kubernetes`).
    pub errors: ErrorCounts,
    /// Values left out for their length.
    pub rejected: RejectedCounts,
    /// Each source's first error is logged; the rest only counted.
    logged: HashMap<&'static str, bool>,
}

/// Upper bound on cached attributions (cleared when exceeded).
const CACHE_MAX: usize = 65536;

/// How long an incomplete answer stands: until `until`, while the
/// runtime's cache has not changed since it was made (a read that was
/// given up may still finish).
#[derive(Debug, Clone, Copy)]
struct Incomplete {
    until: std::time::Instant,
    changes: u64,
}

impl Attributor {
    /// An attributor for this node.
    pub fn new(
        node: Option<String>,
        cgroups: Resolver,
        runtime: Reader,
        proc_root: std::path::PathBuf,
    ) -> Self {
        Attributor {
            node,
            cgroups,
            runtime,
            proc_root,
            cache: Default::default(),
            by_pid: Default::default(),
            by_pid_attr: Default::default(),
            pod_dirs: HashMap::new(),
            scanned: HashMap::new(),
            errors: HashMap::new(),
            rejected: HashMap::new(),
            logged: HashMap::new(),
        }
    }

    /// Takes finished runtime metadata reads in, counting what they met.
    fn poll_metadata(&mut self) {
        self.runtime.poll();
        self.count_problems();
    }

    fn count_problems(&mut self) {
        for p in self.runtime.take_problems() {
            match p {
                Problem::Error(source, msg) => self.error(source, msg),
                Problem::TooLong(source, field) => self.reject(source, field),
            }
        }
    }

    /// Counts a metadata value left out (over its bound, or not of its
    /// syntax); logs only the first of each source and field.
    pub(crate) fn reject(&mut self, source: &'static str, field: &'static str) {
        let n = self.rejected.entry((source, field)).or_default();
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                source,
                field,
                max_name = runtime::MAX_NAME_BYTES,
                max_image = runtime::MAX_IMAGE_BYTES,
                "metadata value over its bound or not of its syntax (a Kubernetes name or label value, an image reference): left out (further ones are only counted)"
            );
        }
    }

    /// Gives up runtime metadata reads that take too long (`all`: every
    /// one), so events held for them can go on without.
    pub(crate) fn expire_metadata(&mut self, all: bool) {
        self.runtime.expire(all);
        self.count_problems();
    }

    /// Notified when a runtime metadata read finishes.
    pub(crate) fn metadata_waker(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.runtime.waker()
    }

    /// [`Attributor::from_path`], waiting until `deadline` at most for
    /// runtime metadata, then going on without (start-up only).
    pub(crate) fn path_wait(
        &mut self,
        path: Option<String>,
        api: Option<&PodStore>,
        deadline: std::time::Instant,
    ) -> (Arc<Attribution>, bool) {
        loop {
            self.poll_metadata();
            if let Some(a) = self.from_path(path.clone(), api) {
                return a;
            }
            if !self.runtime.wait(deadline) {
                self.expire_metadata(true);
            }
        }
    }

    /// [`Attributor::attribute`], waiting for runtime metadata (tests).
    #[cfg(test)]
    pub(crate) fn attribute_wait(
        &mut self,
        ev: &KernelEvent,
        api: Option<&PodStore>,
    ) -> Arc<Attribution> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(a) = self.attribute(ev, api) {
                return a;
            }
            assert!(self.runtime.wait(deadline), "no metadata within 10 s");
        }
    }

    /// Counts a metadata failure; logs only the first of each source.
    pub(crate) fn error(&mut self, source: &'static str, msg: impl std::fmt::Display) {
        *self.errors.entry(source).or_default() += 1;
        if !self.logged.insert(source, true).unwrap_or(false) {
            tracing::warn!(source, error = %msg, "metadata error (further ones from this source are only counted)");
        }
    }

    /// The cgroup path of an event: by id, else from `/proc/<pid>/cgroup`
    /// (cgroup v1 nodes, or a cgroup deleted before we walked it).
    fn cgroup_path(&mut self, ev: &KernelEvent) -> Option<String> {
        // "/" is what processes in v1-only hierarchies (hybrid nodes whose
        // kubelet uses v1) show in v2: ask /proc for their real cgroup.
        let miss = match ev.cgroup_id.map(|id| self.cgroups.resolve(id)) {
            Some(Ok(p)) if p != "/" || !ev.context_known => return Some(p),
            Some(Ok(_)) => None,
            Some(Err(m)) => Some(m),
            None => None,
        };
        let from_proc = if ev.context_known {
            self.proc_cgroup(ev.pid)
        } else {
            None
        };
        match (&from_proc, miss, ev.cgroup_id) {
            (Some(p), Some(Miss::Unknown), Some(id)) => self.cgroups.remember(id, p.clone()),
            (None, Some(Miss::Unknown), Some(id)) => self.error(
                "cgroup",
                format!("cgroup id {id} not found under the cgroup2 mount"),
            ),
            _ => {}
        }
        from_proc
    }

    /// `/proc/<pid>/cgroup`, cached per pid for a few seconds: host
    /// processes in the root cgroup must not cost a file read per event.
    fn proc_cgroup(&mut self, pid: u32) -> Option<String> {
        let now = std::time::Instant::now();
        if let Some((p, t)) = self.by_pid.get(&pid)
            && now.duration_since(*t) < std::time::Duration::from_secs(5)
        {
            return p.clone();
        }
        let p = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .ok()
            .and_then(|t| cgroup::proc_cgroup_path(&t));
        if self.by_pid.len() >= CACHE_MAX {
            self.by_pid.clear();
        }
        self.by_pid.insert(pid, (p.clone(), now));
        p
    }

    /// Attributes one event, with the API's pods if a store is given. None:
    /// the container's runtime metadata is being read (off this thread);
    /// ask again once [`Attributor::metadata_waker`] fires.
    pub(crate) fn attribute(
        &mut self,
        ev: &KernelEvent,
        api: Option<&PodStore>,
    ) -> Option<Arc<Attribution>> {
        if let Some((a, incomplete)) = ev.cgroup_id.and_then(|id| self.cache.get(&id)) {
            let Some(i) = *incomplete else {
                return Some(a.clone());
            };
            let a = a.clone();
            // A read that finished since (even one given up) changes it.
            self.poll_metadata();
            if i.changes == self.runtime.changes() && std::time::Instant::now() < i.until {
                return Some(a);
            }
        }
        self.poll_metadata();
        // The v2 root is ambiguous on hybrid nodes (v1 kubelet pods and host
        // processes share it): such answers are cached per pid instead.
        let at_root = ev.context_known
            && ev
                .cgroup_id
                .is_some_and(|id| self.cgroups.resolve(id).is_ok_and(|p| p == "/"));
        let now = std::time::Instant::now();
        if at_root
            && let Some((a, t)) = self.by_pid_attr.get(&ev.pid)
            && now.duration_since(*t) < std::time::Duration::from_secs(5)
        {
            return Some(a.clone());
        }
        let path = self.cgroup_path(ev);
        let (a, complete) = self.from_path(path, api)?;
        if at_root {
            if self.by_pid_attr.len() >= CACHE_MAX {
                self.by_pid_attr.clear();
            }
            self.by_pid_attr.insert(ev.pid, (a.clone(), now));
            return Some(a);
        }
        // Answers that will not improve (pod fully known, or not a pod at
        // all) stand until their cgroup goes; others only while what they
        // lack cannot appear.
        let until = if complete || a.pod_uid.is_none() {
            Some(None)
        } else {
            self.incomplete_until(&a, now).map(|until| {
                Some(Incomplete {
                    until,
                    changes: self.runtime.changes(),
                })
            })
        };
        if let Some(id) = ev.cgroup_id
            && let Some(until) = until
            && a.cgroup.as_deref() != Some("/")
        {
            if self.cache.len() >= CACHE_MAX {
                self.cache.clear();
            }
            self.cache.insert(id, (a.clone(), until));
        }
        Some(a)
    }

    /// Until when an incomplete pod answer stands: while the runtime's
    /// absence or failure for its container is cached (None: not cached,
    /// ask again at the next event); a pod-level cgroup's, whose only other
    /// source is the API (whose changes drop every answer), for as long as
    /// an absent bundle is.
    fn incomplete_until(
        &self,
        a: &Attribution,
        now: std::time::Instant,
    ) -> Option<std::time::Instant> {
        match &a.container_id {
            Some(cid) => self.runtime.none_until(cid),
            None => Some(now + self.runtime.negative_ttl),
        }
    }

    /// Attributes a cgroup path (relative to the cgroup root). The bool says
    /// whether the answer is complete (will not improve with time). None:
    /// the container's runtime metadata is being read.
    pub fn from_path(
        &mut self,
        path: Option<String>,
        api: Option<&PodStore>,
    ) -> Option<(Arc<Attribution>, bool)> {
        let mut a = Attribution {
            node: self.node.clone(),
            ..Default::default()
        };
        let layout = path.as_deref().and_then(kubelet::parse_cgroup);
        let mut complete = false;
        if let Some(l) = &layout {
            a.pod_uid = Some(l.pod_uid.clone());
            a.qos = Some(l.qos);
            a.container_id = l.container_id.clone();
            if let Some(p) = path.as_deref() {
                let pod_dir = if l.container_id.is_some() {
                    p.rsplit_once('/').map_or(p, |(d, _)| d)
                } else {
                    p
                };
                if self.pod_dirs.len() >= CACHE_MAX {
                    self.pod_dirs.clear();
                }
                self.pod_dirs
                    .entry(l.pod_uid.clone())
                    .or_insert_with(|| pod_dir.to_string());
            }
            if let Some(cid) = &l.container_id {
                match self.runtime.lookup(cid, l.runtime) {
                    Lookup::Pending => return None,
                    Lookup::Known(Some(m)) => {
                        a.container = m.container_name;
                        a.pod = m.pod_name;
                        a.namespace = m.pod_namespace;
                        a.sandbox = m.sandbox;
                        if a.pod_uid.is_none() {
                            a.pod_uid = m.pod_uid;
                        }
                        complete = true;
                    }
                    Lookup::Known(None) => {}
                }
            }
            if let Some(p) = api.and_then(|s| s.get(&l.pod_uid)) {
                a.namespace = Some(p.namespace.clone());
                a.pod = Some(p.name.clone());
                a.workload = Some(p.workload.name.clone());
                a.workload_kind = Some(p.workload.kind.clone());
                a.workload_source = Some(WorkloadSource::Api);
                if a.container.is_none() {
                    a.container = l
                        .container_id
                        .as_deref()
                        .and_then(|cid| p.container_name(cid))
                        .map(str::to_string);
                }
                complete = a.container.is_some() || l.container_id.is_none();
            }
        } else {
            a.cgroup = path;
        }
        if a.workload.is_none()
            && let Some(pod) = &a.pod
        {
            let w = kubelet::derive_workload(pod);
            a.workload = Some(w.name);
            a.workload_kind = w.kind.map(str::to_string);
            a.workload_source = Some(WorkloadSource::Derived);
        }
        Some((Arc::new(a), complete))
    }

    /// Follows cgroup creation and removal reported by the kernel. Returns
    /// the pod uid when a pod-level cgroup went away (the pod is gone).
    pub(crate) fn cgroup_changed(
        &mut self,
        c: crate::kernel::decode::CgroupChange,
    ) -> Option<String> {
        // A cut path is never taken for the cgroup's: the full one comes
        // from the cgroup file system (or, for a cgroup already gone, from
        // what was known of it, else from /proc/<pid>/cgroup at its events).
        let path = if !c.truncated {
            Some(c.path)
        } else if c.created {
            let n = self.rejected.entry(("kernel", "cgroup_path")).or_default();
            *n += 1;
            if *n == 1 {
                tracing::info!(
                    prefix = %c.path,
                    "cgroup path longer than the kernel record holds (nested runtime?): resolved from the cgroup file system (further ones are only counted)"
                );
            }
            self.cgroups.find_cut(c.id, &c.path)
        } else {
            self.cgroups.known(c.id).map(str::to_string)
        };
        if c.created {
            let path = path?;
            // A container (re)created: what failed before is tried again.
            if let Some(cid) = kubelet::parse_cgroup(&path).and_then(|l| l.container_id) {
                self.runtime.retry(&cid);
            }
            if !c.truncated {
                self.cgroups.created(c.id, path);
            }
            return None;
        }
        self.cgroups.removed(c.id);
        self.cache.remove(&c.id);
        let l = kubelet::parse_cgroup(&path?)?;
        match l.container_id {
            Some(cid) => {
                self.runtime.forget(&cid);
                None
            }
            None => {
                self.pod_dirs.remove(&l.pod_uid);
                self.scanned.remove(&l.pod_uid);
                Some(l.pod_uid)
            }
        }
    }

    /// Sizes of the caches, for `connscope_state_entries`.
    pub(crate) fn state_sizes(&self) -> [(&'static str, usize); 4] {
        [
            ("cgroups", self.cgroups.len()),
            ("attributions", self.cache.len()),
            ("pod_dirs", self.pod_dirs.len()),
            ("runtime", self.runtime.len()),
        ]
    }

    /// How long deleted cgroups stay resolvable.
    pub(crate) fn set_cgroup_grace(&mut self, grace: std::time::Duration) {
        self.cgroups.grace = grace;
    }

    /// Drops cached answers (e.g. after the API store changed).
    pub(crate) fn invalidate(&mut self) {
        self.cache.clear();
        self.by_pid_attr.clear();
    }

    /// The cgroup resolver (for metrics and tests).
    pub fn cgroups(&self) -> &Resolver {
        &self.cgroups
    }
}

#[cfg(test)]
mod tests;
