//! Pod churn: 10 000 short-lived simulated pods (kubelet-shaped cgroups and
//! runtime files), each with a refused connect; once they are gone every
//! per-pod entry is freed and memory does not grow with the churn.
//!
//! Why: a node churns pods all day and the agent must not grow with it. Runs
//! alone: it counts every pod the agent tracks and every cgroup it caches,
//! which other tests' pods would add to.

use std::time::Duration;

use connscope::testbed::pod::Pod;

use crate::fixture::{Node, http_get, refused_storm, wait_for, wait_for_or};

fn gauges(port: u16) -> std::collections::HashMap<String, f64> {
    http_get(port, "/metrics")
        .1
        .lines()
        .filter(|l| {
            l.starts_with("connscope_state_entries") || l.starts_with("connscope_pods_tracked")
        })
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap()
}

/// Pods of 20 Deployments, each with a unique generated suffix, as a
/// ReplicaSet names them.
fn pod_name(n: usize) -> String {
    const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut suffix = String::new();
    let mut x = n;
    for _ in 0..5 {
        suffix.push(SAFE[x % SAFE.len()] as char);
        x /= SAFE.len();
    }
    format!("worker{}-7d9f8c6b5-{suffix}", n % 20)
}

#[test]
fn ten_thousand_short_lived_pods_leave_nothing_behind() {
    // Alone: the agent tracks every pod of the machine, and the caches must
    // come back to the machine's baseline.
    let Some(node) = Node::alone() else { return };
    let agent = node.agent(&["--hold-seconds", "0.2", "--cgroup-grace-seconds", "0"]);
    let port = agent.http_port;
    let pid = agent.child.id();
    // The agent publishes its cache sizes about once a second: the baseline
    // is the first full set (cgroups the machine already has included).
    let baseline = wait_for("cache sizes published", Duration::from_secs(10), || {
        let g = gauges(port);
        g.contains_key("connscope_state_entries{kind=\"cgroups\"}")
            .then_some(g)
    });
    let list = node.dir.join("cgroups.txt");
    let mut rss_after_first = 0;
    let mut pods_seen = 0.0;
    for batch in 0..10 {
        let pods: Vec<Pod> = (0..1000)
            .map(|i| {
                let name = format!("churn/{}", pod_name(batch * 1000 + i));
                node.containerd_pod(&name, &["app"])
            })
            .collect();
        let dirs: Vec<String> = pods
            .iter()
            .map(|p| p.containers[0].cgroup.display().to_string())
            .collect();
        std::fs::write(&list, dirs.join("\n")).unwrap();
        let out = refused_storm(&["--seconds", "5", "--rate", "2000", "--per-cgroup", "1"])
            .arg("--cgroups")
            .arg(&list)
            .output()
            .unwrap();
        assert!(out.status.success());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tracked = wait_for(
            &format!("batch {batch}'s pods tracked (storm {report})"),
            Duration::from_secs(20),
            || {
                let g = gauges(port);
                let t = *g.get("connscope_pods_tracked")?;
                (t >= 900.0).then_some(t)
            },
        );
        pods_seen += tracked;
        drop(pods);
        wait_for("the batch's pods freed", Duration::from_secs(30), || {
            (gauges(port).get("connscope_pods_tracked") == Some(&0.0)).then_some(())
        });
        if batch == 0 {
            rss_after_first = rss_kib(pid);
        }
    }
    assert!(
        pods_seen >= 9000.0,
        "pods tracked over the churn: {pods_seen}"
    );
    let mut last = Default::default();
    let end = wait_for_or(Duration::from_secs(30), || {
        let g = gauges(port);
        let ok = g
            .iter()
            .all(|(k, v)| *v <= baseline.get(k).copied().unwrap_or(0.0) + 50.0);
        last = g.clone();
        ok.then_some(g)
    })
    .unwrap_or_else(|| {
        panic!("caches not back to baseline in 30 s: baseline {baseline:?}, now {last:?}")
    });
    let rss = rss_kib(pid);
    assert!(
        rss <= rss_after_first + 16 * 1024,
        "RSS grew with churn: {rss_after_first} KiB after 1000 pods, {rss} KiB after 10000 (state {end:?})"
    );
}
