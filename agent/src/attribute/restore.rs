//! Agent restart: pods that are already running are rebuilt from /proc, so
//! a sidecar that is already listening is never taken for a missing one.
//!
//! For every process: its cgroup names its pod; its network namespace's
//! `/proc/<pid>/net/tcp{,6}` lists LISTEN sockets with their owner uid.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
};

use crate::{attribute::Attributor, attribute::cgroup, k8s::PodStore, race::Tracker};

/// A LISTEN socket from `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub uid: u32,
}

/// Parses `/proc/<pid>/net/tcp` or `tcp6` text into its LISTEN sockets.
///
/// Columns: `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode`;
/// addresses are `HEXADDR:HEXPORT`; state `0A` is LISTEN.
pub fn parse_proc_net_tcp(text: &str) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || f[3] != "0A" {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            let uid = f[7].parse().ok()?;
            Some(Listener { port, uid })
        })
        .collect()
}

/// Rebuilds pods whose proxy already listens on sidecar ports. Returns how
/// many pods were restored. The host network namespace is skipped: pods
/// there share it and their listeners cannot be told apart.
pub(crate) fn restore(
    proc_root: &Path,
    who: &mut Attributor,
    api: Option<&PodStore>,
    tracker: &mut Tracker,
    sidecar_ports: &[u16],
    proxy_uid: u32,
) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let host_ns = std::fs::metadata(proc_root.join("1/ns/net"))
        .map(|m| m.ino())
        .ok();
    let Ok(rd) = std::fs::read_dir(proc_root) else {
        return 0;
    };
    // netns -> (a pid in it, pod uids in it with their attribution)
    let mut by_ns: HashMap<u64, (u32, HashMap<String, Arc<crate::attribute::Attribution>>)> =
        HashMap::new();
    for e in rd.flatten().take(1_000_000) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = e.path();
        let Some(path) = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|t| cgroup::proc_cgroup_path(&t))
        else {
            continue;
        };
        // Runtime metadata is read by the attributor's reader thread; a bad
        // or hung config.json costs at most the start-up budget, never the
        // start (and the capability drop after it).
        let (a, _) = who.path_wait(Some(path), api, deadline);
        let Some(uid) = a.pod_uid.clone() else {
            continue;
        };
        let Ok(ns) = std::fs::metadata(dir.join("ns/net")).map(|m| m.ino()) else {
            continue;
        };
        if Some(ns) == host_ns {
            continue;
        }
        by_ns
            .entry(ns)
            .or_insert_with(|| (pid, HashMap::new()))
            .1
            .entry(uid)
            .or_insert(a);
    }
    let mut restored = 0;
    for (pid, pods) in by_ns.values() {
        let mut ports = HashSet::new();
        for f in ["net/tcp", "net/tcp6"] {
            let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join(f))
                .unwrap_or_default();
            for l in parse_proc_net_tcp(&text) {
                if l.uid == proxy_uid && sidecar_ports.contains(&l.port) {
                    ports.insert(l.port);
                }
            }
        }
        if ports.is_empty() {
            continue;
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        for a in pods.values() {
            tracker.restore_ready(a.clone(), &ports, crate::kernel::decode::Clock::mono_now());
            restored += 1;
        }
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_with_uid() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 12345 1 0000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000 20 4 30 10 -1
   2: 00000000000000000000000000000000:3AAD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1337 0 5 1
";
        assert_eq!(
            parse_proc_net_tcp(t),
            vec![
                Listener {
                    port: 15001,
                    uid: 1337
                },
                Listener {
                    port: 15021,
                    uid: 1337
                }
            ]
        );
        assert!(parse_proc_net_tcp("garbage\nmore garbage 0A x y z").is_empty());
    }
}
