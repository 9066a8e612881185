//! SIGTERM in the middle of a connect flood: the agent exits within 2 s and
//! leaves no program or link of its own in the kernel (`bpftool`).

use std::{
    collections::HashSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::fixture::{Agent, BIN, TempDir, metric, privileged, wait_for};
use connscope::kernel::probes::program_names;
use serde_json::Value;

fn bpftool(what: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args([what, "show", "-j"])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn sigterm_mid_flood_exits_fast_and_detaches_everything() {
    if !privileged("sigterm_mid_flood_exits_fast_and_detaches_everything") {
        return;
    }
    let dir = TempDir::new("sigterm");
    let mut agent = Agent::start(&dir.0, &["--kubernetes", "off"]);
    // Our programs: the ones whose links appeared with this agent.
    let our_programs: Vec<&str> = program_names().collect();
    let ours: HashSet<u64> = wait_for("our links in bpftool", Duration::from_secs(10), || {
        let names: HashSet<u64> = bpftool("prog")
            .iter()
            .filter(|p| our_programs.iter().any(|n| p["name"] == *n))
            .filter_map(|p| p["id"].as_u64())
            .collect();
        let linked: HashSet<u64> = bpftool("link")
            .iter()
            .filter_map(|l| l["prog_id"].as_u64())
            .collect();
        let mine: HashSet<u64> = names.intersection(&linked).copied().collect();
        (!mine.is_empty()).then_some(mine)
    });
    let mut storm = Command::new(BIN)
        .args([
            "testbed",
            "storm",
            "--refused",
            "--threads",
            "2",
            "--seconds",
            "5",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let port = agent.http_port;
    wait_for(
        "the flood to reach the agent",
        Duration::from_secs(10),
        || {
            let n = metric(port, "connscope_events_total{type=\"connect_failure\"}");
            (n > 1000.0).then_some(())
        },
    );
    let t = Instant::now();
    let st = agent.stop();
    let took = t.elapsed();
    assert!(st.success(), "clean exit: {st}");
    assert!(took < Duration::from_secs(2), "exited in {took:?}");
    let _ = storm.wait();
    let progs: HashSet<u64> = bpftool("prog")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let links: Vec<u64> = bpftool("link")
        .iter()
        .filter_map(|l| l["prog_id"].as_u64())
        .collect();
    assert!(
        ours.iter().all(|id| !progs.contains(id)),
        "programs unloaded: {ours:?}"
    );
    assert!(
        links.iter().all(|id| !ours.contains(id)),
        "no links left of ours"
    );
}
