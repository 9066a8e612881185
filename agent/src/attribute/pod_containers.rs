//! A pod's containers as the runtime's files name them: which containers
//! it has before they do anything (an istio-proxy container marks the pod),
//! and what they run (the summaries' `revision` without the API). The
//! pod's cgroup directory is listed at most every 250 ms.

use super::{Attributor, CACHE_MAX, kubelet, revision, runtime::Lookup};

impl Attributor {
    /// Names of a pod's containers present on the node, from the runtime's
    /// files (to learn that an istio-proxy container exists before it does
    /// anything). The pod's cgroup directory is listed at most every 250 ms.
    /// None: a container's metadata is being read.
    pub(crate) fn pod_container_names(&mut self, pod_uid: &str) -> Option<Vec<String>> {
        self.scan(pod_uid);
        let children = self.scanned.get(pod_uid).map(|(_, c)| c.clone())?;
        let mut names = Vec::new();
        for (cid, rt) in children {
            match self.runtime.lookup(&cid, rt) {
                Lookup::Pending => return None,
                Lookup::Known(Some(m)) => names.extend(m.container_name),
                Lookup::Known(None) => {}
            }
        }
        Some(names)
    }

    /// What a pod runs according to its running containers' runtime files
    /// (the pod's cgroup directory listed at most every 250 ms), as far as
    /// they were read for the containers' own events: no read is queued
    /// here. None: no file names an image. What had to be left out is named
    /// in `rejected`.
    pub(crate) fn runtime_revision(
        &mut self,
        pod_uid: &str,
        rejected: &mut Vec<&'static str>,
    ) -> Option<revision::Revision> {
        // A pod whose cgroup is not (or no longer) known has no containers
        // to list: nothing is cached for it.
        if !self.pod_dirs.contains_key(pod_uid) {
            return None;
        }
        self.scan(pod_uid);
        let children = self.scanned.get(pod_uid).map(|(_, c)| c.clone())?;
        let runtime = &self.runtime;
        let containers = children
            .iter()
            .filter_map(|(cid, _)| runtime.peek(cid))
            .filter(|m| !m.sandbox)
            .filter_map(|m| Some((m.container_name.as_deref()?, m.image.as_deref())));
        revision::Revision::from_runtime(containers, self.node.clone(), rejected)
    }

    /// Lists a pod's container cgroups unless they were listed in the last
    /// 250 ms.
    fn scan(&mut self, pod_uid: &str) {
        let now = std::time::Instant::now();
        let fresh = self
            .scanned
            .get(pod_uid)
            .is_some_and(|(t, _)| now.duration_since(*t) < std::time::Duration::from_millis(250));
        if !fresh {
            let children = self.list_containers(pod_uid);
            if self.scanned.len() >= CACHE_MAX {
                self.scanned.clear();
            }
            self.scanned.insert(pod_uid.to_string(), (now, children));
        }
    }

    /// A pod's container cgroups (container id, runtime), from its cgroup
    /// directory.
    fn list_containers(&self, pod_uid: &str) -> Vec<(String, kubelet::Runtime)> {
        let (Some(root), Some(dir)) = (self.cgroups.root(), self.pod_dirs.get(pod_uid)) else {
            return Vec::new();
        };
        let abs = root.join(dir.trim_start_matches('/'));
        let Ok(rd) = std::fs::read_dir(&abs) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
            .take(64)
            .filter_map(|child| {
                let l = kubelet::parse_cgroup(&child)?;
                Some((l.container_id?, l.runtime))
            })
            .collect()
    }
}
