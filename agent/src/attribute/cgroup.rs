//! cgroup v2 id -> cgroup path.
//!
//! The kernel hands us `bpf_get_current_cgroup_id()`, which on cgroup v2 is
//! the inode number of the cgroup's directory. We map ids to paths by walking
//! the cgroup2 mount (found in `/proc/self/mountinfo`, since it is
//! `/sys/fs/cgroup` on modern nodes and `/sys/fs/cgroup/unified` on hybrid
//! ones), re-walk on a miss, and keep entries of deleted cgroups for a grace
//! period so short-lived containers are still attributed. Where the id is
//! unknown (cgroup v1 nodes), `/proc/<pid>/cgroup` is the fallback.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Finds the cgroup2 mount point in a mountinfo text.
///
/// Fields: `id parent major:minor root mountpoint options... - fstype source superopts`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mountpoint = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup path of a process from `/proc/<pid>/cgroup` text: the v2
/// (`0::`) line if present, else the systemd or cpu v1 hierarchy. On hybrid
/// nodes whose kubelet uses v1, the v2 line is just `/`: the v1 path wins.
pub fn proc_cgroup_path(text: &str) -> Option<String> {
    let mut v1 = None;
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrl.is_empty() {
            v2 = Some(path.to_string());
            continue;
        }
        if ctrl == "name=systemd" || ctrl.split(',').any(|c| c == "cpu") {
            v1.get_or_insert_with(|| path.to_string());
        }
    }
    match (v2, v1) {
        (Some(v2), Some(v1)) if v2 == "/" && v1 != "/" => Some(v1),
        (Some(v2), _) => Some(v2),
        (None, v1) => v1,
    }
}

/// Where a cgroup path came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Path relative to the cgroup2 root, starting with `/`.
    pub path: String,
    /// When the directory was last seen gone (kept for the grace period).
    gone_since: Option<Instant>,
}

/// Why a lookup failed; counted as metadata errors by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Miss {
    /// No cgroup2 mount (cgroup v1 node); use `/proc/<pid>/cgroup`.
    NoCgroup2,
    /// Not found even after a fresh walk (deleted before we saw it).
    Unknown,
}

/// Maps cgroup ids to paths, with a cache refreshed on a miss.
#[derive(Debug)]
pub struct Resolver {
    root: Option<PathBuf>,
    by_id: HashMap<u64, Entry>,
    last_walk: Option<Instant>,
    /// How long entries of deleted cgroups are kept.
    pub grace: Duration,
    /// Minimum time between two walks triggered by misses.
    pub min_rewalk: Duration,
    /// Walks done, for metrics and tests.
    pub walks: u64,
    removals: u64,
}

impl Resolver {
    /// A resolver over the cgroup2 mount at `root` (None on cgroup v1 nodes).
    pub fn new(root: Option<PathBuf>) -> Self {
        Resolver {
            root,
            by_id: HashMap::new(),
            last_walk: None,
            grace: Duration::from_secs(300),
            min_rewalk: Duration::from_millis(50),
            walks: 0,
            removals: 0,
        }
    }

    /// Finds the cgroup2 mount of this process.
    pub(crate) fn from_mountinfo() -> Self {
        let root = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| cgroup2_mount(&m));
        Self::new(root)
    }

    /// The cgroup2 mount point, if any.
    pub(crate) fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Path of a cgroup id, walking the tree again on a miss.
    pub(crate) fn resolve(&mut self, id: u64) -> Result<String, Miss> {
        if self.root.is_none() {
            return Err(Miss::NoCgroup2);
        }
        if let Some(e) = self.by_id.get(&id) {
            return Ok(e.path.clone());
        }
        let due = self
            .last_walk
            .is_none_or(|t| t.elapsed() >= self.min_rewalk);
        if due {
            self.walk();
        }
        self.by_id
            .get(&id)
            .map(|e| e.path.clone())
            .ok_or(Miss::Unknown)
    }

    /// Records a path seen another way (e.g. `/proc/<pid>/cgroup` at exec),
    /// so the id resolves even after the directory is gone.
    pub(crate) fn remember(&mut self, id: u64, path: String) {
        self.by_id.entry(id).or_insert(Entry {
            path,
            gone_since: None,
        });
    }

    /// Records a cgroup the kernel just created (exact id and path).
    pub(crate) fn created(&mut self, id: u64, path: String) {
        self.by_id.insert(
            id,
            Entry {
                path,
                gone_since: None,
            },
        );
    }

    /// Finds a cgroup whose path the kernel record cut (`prefix`): under
    /// the deepest directory the prefix names whole, the directory whose
    /// inode is `id` (cgroup v2 ids are the directories' inode numbers).
    /// Records and returns its full path; None when it is already gone (its
    /// events then go by `/proc/<pid>/cgroup`), never the cut path.
    pub(crate) fn find_cut(&mut self, id: u64, prefix: &str) -> Option<String> {
        let root = self.root.clone()?;
        let (whole, partial) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = root.join(whole.trim_start_matches('/'));
        // The first level: only names the cut one starts.
        let mut stack: Vec<PathBuf> = std::fs::read_dir(&start)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(partial))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        let mut budget = 100_000usize;
        while let Some(dir) = stack.pop() {
            budget = budget.checked_sub(1)?;
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if meta.ino() == id {
                let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
                let path = format!("/{}", rel.display());
                self.created(id, path.clone());
                return Some(path);
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        None
    }

    /// The path known for an id, without walking.
    pub(crate) fn known(&self, id: u64) -> Option<&str> {
        self.by_id.get(&id).map(|e| e.path.as_str())
    }

    /// Marks a cgroup removed: it still resolves for the grace period.
    /// Entries whose grace ran out are dropped here too (bounded memory
    /// under churn without waiting for a walk).
    pub(crate) fn removed(&mut self, id: u64) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.gone_since.get_or_insert_with(Instant::now);
        }
        self.removals += 1;
        if self.removals.is_multiple_of(256) || self.grace.is_zero() {
            let grace = self.grace;
            self.by_id
                .retain(|_, e| e.gone_since.is_none_or(|g| g.elapsed() < grace));
        }
    }

    /// Re-reads the whole tree; marks vanished cgroups and drops those gone
    /// for longer than the grace period.
    pub(crate) fn walk(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        self.walks += 1;
        self.last_walk = Some(Instant::now());
        let mut seen = HashMap::new();
        let mut stack = vec![root.clone()];
        // Bounded: a node has thousands of cgroups, not millions.
        let mut budget = 200_000usize;
        while let Some(dir) = stack.pop() {
            if budget == 0 {
                tracing::warn!("cgroup walk stopped after 200000 directories");
                break;
            }
            budget -= 1;
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
            seen.insert(meta.ino(), format!("/{}", rel.display()));
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        let now = Instant::now();
        let grace = self.grace;
        self.by_id.retain(|id, e| {
            if seen.contains_key(id) {
                return true;
            }
            let since = *e.gone_since.get_or_insert(now);
            now.duration_since(since) < grace
        });
        for (id, path) in seen {
            let e = self.by_id.entry(id).or_insert(Entry {
                path: path.clone(),
                gone_since: None,
            });
            e.path = path;
            e.gone_since = None;
        }
    }

    /// Number of cached ids.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 35 0:32 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        assert_eq!(
            cgroup2_mount(MOUNTINFO),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            cgroup2_mount("37 35 0:32 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_mount("garbage\n - \n"), None);
    }

    #[test]
    fn unescapes_mountpoints() {
        let m = "36 35 0:31 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(m), Some("/mnt/with space".into()));
    }

    #[test]
    fn proc_cgroup_prefers_v2_then_systemd() {
        let v2 = "12:cpu,cpuacct:/kubepods/x\n1:name=systemd:/kubepods/y\n0::/kubepods.slice/z\n";
        assert_eq!(proc_cgroup_path(v2).as_deref(), Some("/kubepods.slice/z"));
        let v1 = "12:cpu,cpuacct:/kubepods/burstable/podA/c1\n1:name=systemd:/kubepods/burstable/podA/c1\n";
        assert_eq!(
            proc_cgroup_path(v1).as_deref(),
            Some("/kubepods/burstable/podA/c1")
        );
        assert_eq!(proc_cgroup_path("nonsense"), None);
        let hybrid = "1:name=systemd:/kubepods/burstable/podA/c1\n0::/\n";
        assert_eq!(
            proc_cgroup_path(hybrid).as_deref(),
            Some("/kubepods/burstable/podA/c1")
        );
    }

    #[test]
    fn resolves_walks_and_keeps_deleted_for_grace() {
        let root = std::env::temp_dir().join(format!("connscope-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let leaf = root.join("kubepods.slice/pod-a");
        std::fs::create_dir_all(&leaf).unwrap();
        let id = std::fs::metadata(&leaf).unwrap().ino();
        let mut r = Resolver::new(Some(root.clone()));
        r.min_rewalk = Duration::ZERO;
        assert_eq!(r.resolve(id).as_deref(), Ok("/kubepods.slice/pod-a"));
        let walks = r.walks;
        assert_eq!(r.resolve(id).as_deref(), Ok("/kubepods.slice/pod-a"));
        assert_eq!(r.walks, walks, "a hit does not walk");
        std::fs::remove_dir(&leaf).unwrap();
        r.walk();
        assert_eq!(
            r.resolve(id).as_deref(),
            Ok("/kubepods.slice/pod-a"),
            "kept while in grace"
        );
        r.grace = Duration::ZERO;
        r.walk();
        assert_eq!(r.resolve(u64::MAX), Err(Miss::Unknown));
        assert_ne!(r.resolve(id).as_deref(), Ok("/kubepods.slice/pod-a"));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(Resolver::new(None).resolve(1), Err(Miss::NoCgroup2));
    }
}
