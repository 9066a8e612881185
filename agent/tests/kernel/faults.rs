//! Faults and least privilege on the real kernel: ring buffer overflow,
//! missing or broken runtime state, hooks refused on purpose, capabilities
//! dropped after start, endpoints that leak nothing and cannot exhaust memory.
//!
//! Why: a node is not a lab; the agent must degrade, say so, and keep going.
//! The overflow test runs alone: its storm would overflow the other tests'
//! agents too.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use crate::fixture::{
    BIN, Node, assert_absent, assert_fields, closed_target, dial, dial_in, http_get, metric,
    refused_storm, wait_for,
};

/// Opens `GET /events?follow=1` on the agent's port and reads the start of
/// the answer (bounded by `timeout`): the open connection and what it read.
fn follow(port: u16, timeout: Duration) -> std::io::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET /events?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n")?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok((s, head))
}

#[test]
fn ring_buffer_overflow_is_counted_and_the_agent_keeps_going() {
    // Alone: the storm would overflow the other tests' agents too.
    let Some(node) = Node::alone() else { return };
    let agent = node.agent(&["--ring-buffer-bytes", "4096"]);
    let out = refused_storm(&["--threads", "2", "--seconds", "1"])
        .output()
        .unwrap();
    let storm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refused = storm["refused"].as_f64().unwrap();
    let port = agent.http_port;
    let (lost, reported) = wait_for("the loss to be counted", Duration::from_secs(10), || {
        let lost = metric(port, "connscope_events_lost_total");
        let reported = metric(port, "connscope_connect_failures_total");
        (lost > 0.0 && lost + reported >= refused).then_some((lost, reported))
    });
    assert!(
        lost > 0.0 && reported > 0.0,
        "lost {lost}, reported {reported} of {refused}"
    );
    let lines = agent.events();
    assert!(
        lines.iter().any(|e| e["type"] == "events_lost"),
        "loss is also in the event stream"
    );
    // Still working afterwards: a failure after the overflow is reported.
    assert_eq!(http_get(port, "/readyz").0, 200);
    agent.failure(dial(&closed_target(), None, false).pid);
}

#[test]
fn runtime_state_absent_or_broken_degrades_and_is_counted() {
    let Some(mut node) = Node::shared() else {
        return;
    };
    // CRI-O's root does not exist at all.
    node.roots.crio = node.dir.join("absent");
    let mut pod = node.containerd_pod("shop/a-7d9f8c6b5-x2k4p", &["app"]);
    // config.json unreadable (a directory where the file should be).
    pod.add_container("broken").unwrap();
    let broken = pod.container("broken").unwrap().id.clone();
    let cfg = node
        .roots
        .containerd
        .join("k8s.io")
        .join(&broken)
        .join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::fs::create_dir(&cfg).unwrap();
    let agent = node.agent(&["--hold-seconds", "1"]);
    // A failure in a container with unreadable metadata.
    let e = agent.failure(dial_in(&pod, "broken", &closed_target(), false).pid);
    assert_fields(&e, &[("pod_uid", &pod.uid), ("container_id", &broken)]);
    assert_absent(&e, &["container", "pod"]);
    wait_for("metadata error counted", Duration::from_secs(5), || {
        (metric(
            agent.http_port,
            "connscope_metadata_errors_total{source=\"containerd\"}",
        ) >= 1.0)
            .then_some(())
    });
    // The whole runtime root gone: still attributed by the cgroup path.
    std::fs::remove_dir_all(&node.roots.containerd).unwrap();
    pod.add_container("late").unwrap();
    std::fs::remove_dir_all(&node.roots.containerd).unwrap();
    let e = agent.failure(dial_in(&pod, "late", &closed_target(), false).pid);
    assert_fields(&e, &[("pod_uid", &pod.uid), ("qos", "burstable")]);
}

#[test]
fn refused_hooks_degrade_and_are_reported() {
    let Some(node) = Node::shared() else { return };
    let agent = node.agent(&[
        "--disable-probe",
        "tcp_receive_reset",
        "--disable-probe",
        "sys_enter_connect",
        "--disable-probe",
        "sys_exit_connect",
    ]);
    let m = http_get(agent.http_port, "/metrics").1;
    for (probe, attached) in [
        ("tcp_receive_reset", 0),
        ("sys_enter_connect", 0),
        ("sys_exit_connect", 0),
        ("inet_sock_set_state", 1),
    ] {
        assert!(
            m.contains(&format!(
                "connscope_probe_attached{{probe=\"{probe}\"}} {attached}"
            )),
            "{probe} attached {attached}: {m}"
        );
    }
    // Without the syscall hooks (the README's low-cost mode), a refused
    // connect is still reported from the socket's state change, with the
    // dialed address and errno.
    let target = closed_target();
    let e = agent.failure(dial(&target, None, false).pid);
    assert_eq!(e["dst"], target.as_str());
    assert_eq!(e["errno"], 111);
}

#[test]
fn least_privilege_no_leaks_bounded_followers() {
    let Some(node) = Node::shared() else { return };
    // In the agent's environment only (this process's environment is shared
    // by the tests running beside this one).
    let secret = ("CONNSCOPE_TEST_SECRET", "s3cr3t-value-9f2c");
    let agent = node.agent_with_env(&[], &[secret]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let eff = connscope::kernel::check::effective_caps(&status).unwrap();
    assert_eq!(eff, 1 << 39, "only CAP_BPF kept after start-up: {eff:#x}");
    // Events are still reported without the other capabilities.
    agent.failure(dial(&closed_target(), None, false).pid);
    let port = agent.http_port;
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/events",
        "/events?follow=0&type=x",
    ] {
        let (_, body) = http_get(port, path);
        assert!(!body.contains(secret.1), "{path} leaks the environment");
    }
    // Followers are bounded: the 17th concurrent follower is refused.
    let mut held = Vec::new();
    for _ in 0..16 {
        let (s, head) = follow(port, Duration::from_secs(5)).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    let (status, body) = http_get(port, "/events?follow=1");
    assert_eq!(status, 503, "{body}");
    drop(held);
    wait_for("slots freed", Duration::from_secs(10), || {
        let (_s, head) = follow(port, Duration::from_secs(2)).ok()?;
        head.starts_with("HTTP/1.1 200").then_some(())
    });
}

#[test]
fn check_names_missing_capabilities() {
    let Some(_node) = Node::shared() else { return };
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--",
            BIN,
            "check",
            "--json",
        ])
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(
        out.status.code(),
        Some(1),
        "cannot run without CAP_BPF/CAP_SYS_ADMIN"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["usable"], false);
    let item = |n: &str| {
        r["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(item("CAP_BPF")["ok"], false);
    assert!(
        item("CAP_BPF")["detail"]
            .as_str()
            .unwrap()
            .contains("load programs")
    );
    assert_eq!(item("CAP_PERFMON")["ok"], false);
    assert_eq!(item("CAP_SYS_PTRACE")["ok"], true);
    assert_eq!(
        item("verifier")["ok"],
        false,
        "no programs loaded without CAP_BPF"
    );
    // With everything, it can run.
    let ok = Command::new(BIN)
        .args(["check", "--json"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    // This kernel's BTF has the struct sock offsets: the cheap socket hook.
    let r: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let raw = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "raw tracepoint inet_sock_set_state")
        .cloned()
        .unwrap();
    assert_eq!(raw["ok"], true, "{raw}");
    // Each program, the raw variants included, went through the verifier.
    let verified: Vec<&serde_json::Value> = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["name"].as_str().unwrap().starts_with("verifier "))
        .collect();
    assert!(verified.len() >= 11, "{verified:?}");
    for v in verified {
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["detail"], "accepted", "{v}");
    }
}
