//! The kernel probes against the real kernel: an application in a network
//! namespace with Istio's real capture rules is refused until a stand-in
//! sidecar (uid 1337, SO_ORIGINAL_DST forwarding) listens on 15001.
//!
//! Why: everything else stands on these events. Shares the machine: it counts
//! only events of its own processes and its pod's network namespace.

use std::{process::Command, time::Duration};

use connscope::testbed::{dial::Outcome, net::Topology};
use serde_json::Value;

use crate::fixture::{
    Agent, BIN, Bg, Node, failures_of, metric, net_tag, run_dialer, terminate, wait_for,
};

const UPSTREAM_PORT: u16 = 8080;

/// One attempt of the stand-in application in the pod's network namespace.
fn dial(topo: &Topology, target: &str, nonblocking: bool) -> Outcome {
    let mut args = vec!["--target", target, "--timeout-ms", "3000"];
    if nonblocking {
        args.push("--nonblocking");
    }
    run_dialer(topo.pod.command(BIN), &args)
}

#[test]
fn refusals_before_sidecar_listens_and_none_after() {
    refusals_and_listeners(&[]);
}

/// The same through the classic `sock:inet_sock_set_state` and
/// `tcp:tcp_receive_reset` tracepoints, the agent's fallbacks where the raw
/// tracepoints or their BTF offsets are missing.
#[test]
fn classic_socket_tracepoint_sees_the_same() {
    refusals_and_listeners(&[
        "--disable-probe",
        "sock_state_raw",
        "--disable-probe",
        "reset_raw",
    ]);
}

/// The same through `syscalls:sys_{enter,exit}_connect`, the connect path
/// where fentry is refused (and the default before fentry existed): on a
/// kernel that allows fentry, the default test above runs the other path.
#[test]
fn syscall_tracepoints_see_the_same() {
    refusals_and_listeners(&["--connect-path", "tracepoint"]);
}

fn refusals_and_listeners(extra: &[&str]) {
    let Some(node) = Node::shared() else { return };
    let mut args = vec!["--process-events"];
    args.extend_from_slice(extra);
    let mut agent = node.agent(&args);
    assert_connect_path(&agent, extra);
    let topo = Topology::create(net_tag(), true).expect("topology");
    let pod_netns = topo.pod.inode().unwrap();

    let mut upstream = Bg::spawn({
        let mut c = topo.upstream.command(BIN);
        c.args(["testbed", "serve"]);
        for v6 in [false, true] {
            c.args(["--addr", &topo.upstream_addr(v6, UPSTREAM_PORT).to_string()]);
        }
        c
    });
    upstream.wait_line("ready", Duration::from_secs(10));

    let targets: Vec<String> = [false, true]
        .iter()
        .map(|&v6| topo.upstream_addr(v6, UPSTREAM_PORT).to_string())
        .collect();

    // 1. No sidecar: every outbound connect is redirected to 15001 and refused.
    let mut refused = Vec::new();
    for t in &targets {
        for nb in [false, true] {
            let o = dial(&topo, t, nb);
            assert!(!o.ok, "{t} nonblocking={nb} should be refused: {o:?}");
            assert_eq!(o.error, "ECONNREFUSED", "{o:?}");
            refused.push(o);
        }
    }

    // 2. AF_UNIX: a missing path (ENOENT) and a bound socket nobody listens on.
    let missing = node.dir.join("missing.sock");
    let unlistened = node.dir.join("bound.sock");
    let bound = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    bound
        .bind(&socket2::SockAddr::unix(&unlistened).unwrap())
        .unwrap();
    let unix_missing = dial(&topo, &format!("unix:{}", missing.display()), false);
    let unix_refused = dial(&topo, &format!("unix:{}", unlistened.display()), false);
    assert_eq!(unix_missing.error, "ENOENT");
    assert_eq!(unix_refused.error, "ECONNREFUSED");

    // 3. The sidecar comes up; the same connects now reach the upstream host.
    let mut sidecar = Bg::spawn({
        let mut c = topo.pod.command(BIN);
        c.args(["testbed", "sidecar", "--delay-ms", "100"]);
        c
    });
    sidecar.wait_line(
        "\"port\":15006,\"state\":\"listen\"",
        Duration::from_secs(10),
    );
    let mut served = Vec::new();
    for t in &targets {
        for nb in [false, true] {
            let o = dial(&topo, t, nb);
            assert!(o.ok, "{t} nonblocking={nb} should pass the sidecar: {o:?}");
            let banner = o.banner.clone().unwrap_or_default();
            assert!(
                banner.contains(&format!("upstream {t}")),
                "forwarded to the dialed address: {banner}"
            );
            served.push(o);
        }
    }
    terminate(&mut sidecar.child, Duration::from_secs(5));

    // 4. What the agent saw. Network namespace inodes are reused once
    // freed: a listener event of another test's pod, from before this pod's
    // namespace existed, can carry the same inode. This pod's events all
    // come after its first dial.
    let sidecar_pid = sidecar.child.id();
    let since = refused[0].start_mono_ns;
    let after = |e: &Value| e["mono_ns"].as_u64().is_some_and(|t| t >= since);
    wait_for(
        "the close of each sidecar listener in this pod, and the sidecar's exit",
        Duration::from_secs(10),
        || {
            // Tests run side by side and the probes see the whole machine:
            // only this pod's network namespace counts. The sidecar's
            // sockets close in no particular order as it exits: wait for all.
            let events = agent.events();
            let closed = events
                .iter()
                .filter(|e| {
                    e["type"] == "listener"
                        && e["state"] == "closed"
                        && [15001, 15006, 15021, 15090].contains(&e["port"].as_u64().unwrap_or(0))
                        && e["netns"] == pod_netns
                        && after(e)
                })
                .count();
            let exited = events
                .iter()
                .any(|e| e["type"] == "process" && e["state"] == "exit" && e["pid"] == sidecar_pid);
            (closed >= 8 && exited).then_some(())
        },
    );
    let events = agent.events();
    for o in &refused {
        let f = failures_of(&events, o.pid);
        assert_eq!(f.len(), 1, "exactly one failure event for {o:?}: {f:?}");
        let f = &f[0];
        assert_eq!(
            f["dst"],
            o.target.as_str(),
            "dialed destination, not 127.0.0.1:15001"
        );
        assert_eq!(f["errno"], 111);
        assert_eq!(f["comm"], o.comm.as_str());
        assert_eq!(f["nonblocking"], o.nonblocking);
        assert_eq!(f["rst"], true);
        assert_eq!(f["phase"], "no_sidecar", "not in a pod's cgroup");
        assert_eq!(f["netns"], pod_netns);
        assert_ne!(
            f["src"].as_str().unwrap().rsplit(':').next(),
            Some("0"),
            "source port known: {f}"
        );
        let t = f["mono_ns"].as_u64().unwrap();
        assert!(
            t >= o.start_mono_ns && t <= o.end_mono_ns,
            "kernel time within the attempt: {f} {o:?}"
        );
    }
    for (o, want) in [(&unix_missing, 2), (&unix_refused, 111)] {
        let f = failures_of(&events, o.pid);
        assert_eq!(f.len(), 1, "one AF_UNIX failure for {o:?}: {f:?}");
        assert_eq!(f[0]["family"], "unix");
        assert_eq!(f[0]["errno"], want);
        assert_eq!(f[0]["path"], o.target.trim_start_matches("unix:"));
    }
    for o in &served {
        assert!(
            failures_of(&events, o.pid).is_empty(),
            "no failure once the sidecar listens: {o:?}"
        );
    }
    for port in [15001, 15006, 15021, 15090] {
        for state in ["listen", "closed"] {
            let n = events
                .iter()
                .filter(|e| {
                    e["type"] == "listener"
                        && e["state"] == state
                        && e["port"] == port
                        && e["uid"] == 1337
                        && e["netns"] == pod_netns
                        && after(e)
                        && (state == "closed" || e["pid"] == sidecar_pid)
                })
                .count();
            // One IPv4 and one IPv6 listener per port.
            let seen: Vec<&Value> = events
                .iter()
                .filter(|e| e["type"] == "listener" && e["port"] == port)
                .collect();
            assert_eq!(n, 2, "{state} events for sidecar port {port}: {seen:?}");
        }
    }
    assert!(
        events.iter().any(|e| e["type"] == "process"
            && e["state"] == "exec"
            && e["pid"] == sidecar_pid
            && e["path"] == BIN),
        "the sidecar's exec is seen, with the file it ran"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "process" && e["state"] == "exit" && e["pid"] == sidecar_pid),
        "the sidecar's exit is seen"
    );
    assert!(agent.stop().success(), "agent exits cleanly on SIGTERM");
    drop(upstream);
    drop(topo);
    let _ = Command::new("true").status();
}

/// The agent saw connects by the path expected here: the one forced, else
/// `CONNSCOPE_EXPECT_CONNECT_PATH` (the kernel matrix sets it for its
/// guests, which allow fentry), else the one `connscope check` says this
/// kernel allows: the agent and `check` must agree.
fn assert_connect_path(agent: &Agent, extra: &[&str]) {
    let expected = if extra
        .windows(2)
        .any(|w| w == ["--connect-path", "tracepoint"])
    {
        "tracepoint".to_string()
    } else if let Ok(e) = std::env::var("CONNSCOPE_EXPECT_CONNECT_PATH") {
        e
    } else {
        let out = Command::new(BIN)
            .args(["check", "--json"])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let fentry = r["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "fentry connect path" && i["ok"] == true);
        if fentry { "fentry" } else { "tracepoint" }.to_string()
    };
    let name = format!("connscope_connect_path{{path=\"{expected}\"}}");
    assert_eq!(
        metric(agent.http_port, &name),
        1.0,
        "connect path {expected}"
    );
}
