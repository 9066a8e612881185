//! Agent restart: pods that are already running are rebuilt from /proc, so
//! a sidecar that is already listening is never taken for a missing one.
//!
//! For every process: its cgroup names its pod; its network namespace's
//! `/proc/<pid>/net/tcp{,6}` lists LISTEN sockets with their owner uid and
//! bound address. The proxy's (its uid, sidecar ports) make the sidecar
//! ready; in those pods, everyone else's on ports not Istio's are the app's
//! listeners, so an app already listening is never taken for a start-up
//! window of the inbound race.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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
    /// The bound address (IPv4-mapped IPv6 addresses as IPv4, as the
    /// kernel events report them).
    pub addr: IpAddr,
}

/// A `/proc/net/tcp*` address: hex of the address as the kernel stores it,
/// printed 32 bits at a time in host byte order.
fn proc_addr(hex: &str) -> Option<IpAddr> {
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = Ipv6Addr::from(b);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
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
            let (addr, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let addr = proc_addr(addr)?;
            let uid = f[7].parse().ok()?;
            Some(Listener { port, uid, addr })
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
    for (ns, (pid, pods)) in &by_ns {
        let mut ports = HashSet::new();
        let mut app = BTreeSet::new();
        let mut all = BTreeSet::new();
        for f in ["net/tcp", "net/tcp6"] {
            let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join(f))
                .unwrap_or_default();
            for l in parse_proc_net_tcp(&text) {
                all.insert(l.port);
                if l.uid == proxy_uid {
                    if sidecar_ports.contains(&l.port) {
                        ports.insert(l.port);
                    }
                } else if !crate::race::istio::reserved_port(l.port)
                    && !sidecar_ports.contains(&l.port)
                {
                    app.insert(SocketAddr::new(l.addr, l.port));
                }
            }
        }
        // Ambient pods: ztunnel's listeners are in the pod's netns, but
        // no process of the pod owns them.
        let all: Vec<u16> = all.into_iter().collect();
        let in_ns: Vec<Arc<crate::attribute::Attribution>> = pods.values().cloned().collect();
        let now = crate::kernel::decode::Clock::mono_now();
        tracker.restore_ambient(*ns as u32, &in_ns, &all, now);
        if ports.is_empty() {
            continue;
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let app: Vec<SocketAddr> = app.into_iter().collect();
        for a in pods.values() {
            tracker.restore_ready(a.clone(), &ports, now);
            tracker.restore_app(a.clone(), &app, now);
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
                    uid: 1337,
                    addr: "0.0.0.0".parse().unwrap(),
                },
                Listener {
                    port: 15021,
                    uid: 1337,
                    addr: "::".parse().unwrap(),
                }
            ]
        );
        // The app's listeners, with their bound addresses (loopback, the
        // pod IP, IPv6, an IPv4-mapped one).
        let app = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1
   1: 0500000A:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1
   2: 00000000000000000000000001000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000 0 3 1
   3: 0000000000000000FFFF00000500000A:1F93 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000 0 4 1
";
        let addrs: Vec<String> = parse_proc_net_tcp(app)
            .iter()
            .map(|l| SocketAddr::new(l.addr, l.port).to_string())
            .collect();
        assert_eq!(
            addrs,
            [
                "127.0.0.1:8080",
                "10.0.0.5:8081",
                "[::1]:8082",
                "10.0.0.5:8083"
            ]
        );
        assert!(parse_proc_net_tcp("garbage\nmore garbage 0A x y z").is_empty());
    }
}
