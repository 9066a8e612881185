//! SIGTERM in the middle of a connect flood: the agent exits within 2 s and
//! leaves no program or link of its own in the kernel (`bpftool`).
//!
//! Why: an agent that leaks probes or hangs on SIGTERM blocks node drains and
//! upgrades. Runs alone: bpftool lists every agent's programs under the same
//! names, and the exit is timed.

use std::{
    collections::HashSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use connscope::kernel::probes::program_names;
use serde_json::Value;

use crate::fixture::{Node, metric, refused_storm, slow, stdout_of, wait_for};

/// What `bpftool <what> show` lists.
fn bpftool(what: &str) -> Vec<Value> {
    let out = stdout_of(Command::new("bpftool").args([what, "show", "-j"]));
    serde_json::from_str(&out).unwrap_or_default()
}

/// The `field` of each object `bpftool <what> show` lists that `keep` takes.
fn ids(what: &str, field: &str, keep: impl Fn(&Value) -> bool) -> HashSet<u64> {
    bpftool(what)
        .iter()
        .filter(|o| keep(o))
        .filter_map(|o| o[field].as_u64())
        .collect()
}

#[test]
fn sigterm_mid_flood_exits_fast_and_detaches_everything() {
    // Alone: another test's agent would have programs of the same names, and
    // the exit is timed.
    let Some(node) = Node::alone() else { return };
    let mut agent = node.agent(&[]);
    // Our programs: the ones whose links appeared with this agent.
    let our_programs: Vec<&str> = program_names().collect();
    let ours: HashSet<u64> = wait_for("our links in bpftool", Duration::from_secs(10), || {
        let names = ids("prog", "id", |p| {
            our_programs.iter().any(|n| p["name"] == *n)
        });
        let linked = ids("link", "prog_id", |_| true);
        let mine: HashSet<u64> = names.intersection(&linked).copied().collect();
        (!mine.is_empty()).then_some(mine)
    });
    let mut storm = refused_storm(&["--threads", "2", "--seconds", "5"])
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
    assert!(took < slow(Duration::from_secs(2)), "exited in {took:?}");
    let _ = storm.wait();
    let progs = ids("prog", "id", |_| true);
    let links = ids("link", "prog_id", |_| true);
    assert!(
        ours.iter().all(|id| !progs.contains(id)),
        "programs unloaded: {ours:?}"
    );
    assert!(
        links.iter().all(|id| !ours.contains(id)),
        "no links left of ours"
    );
}
