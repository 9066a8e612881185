//! Hostile input and failing sinks (issue #15): what a node can put where
//! the agent reads its metadata, and where it writes its events, must never
//! stall it, stop it or cost events elsewhere on the node.
//!
//! - a FIFO and a symlink to `/dev/zero` in place of containers'
//!   `config.json`, one of them read at start-up (a process already in that
//!   container), during connect storms from the bad container and a good one;
//! - `--events` on a full file system (a 64 KiB tmpfs mounted here);
//! - `--events stdout` into a pipe nobody reads.
//!
//! Why: each of these froze the agent (no `/healthz`, SIGTERM ignored), ended
//! it, or lost events node-wide. The storm tests run alone: they count every
//! failure on the machine.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::fixture::{
    BIN, Bg, Node, closed_target, dial_in, http_get, metric, read_json_lines, wait_for,
};

/// A refused-connect storm at `rate` per second for `seconds`, from inside
/// `cgroup` (as a container's process): the number of refusals it made.
fn storm_in(cgroup: &Path, rate: u32, seconds: u32) -> std::process::Child {
    Command::new(BIN)
        .args(["testbed", "enter", "--cgroup"])
        .arg(cgroup)
        .args(["--", BIN, "testbed", "storm", "--refused", "--threads", "2"])
        .args([
            "--rate",
            &rate.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("storm")
}

/// The refusals a finished storm reports.
fn refused(storm: std::process::Child) -> u64 {
    let out = storm.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["refused"].as_u64().unwrap()
}

/// Sum of the samples of metric `name` whose labels contain `needle`.
fn metric_where(port: u16, name: &str, needle: &str) -> f64 {
    http_get(port, "/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `/healthz` answers 200 within the client's 5 s timeout.
fn healthy(port: u16) -> bool {
    http_get(port, "/healthz").0 == 200
}

/// Sends SIGTERM; the agent must exit cleanly and promptly.
fn stops_promptly(agent: &mut crate::fixture::Agent) -> Duration {
    let t0 = Instant::now();
    let st = agent.stop();
    let took = t0.elapsed();
    assert!(st.success(), "exit status {st} after {took:?}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    took
}

#[test]
fn fifo_or_symlink_config_json_stalls_nothing_and_loses_nothing() {
    // Alone: the storms' failures are counted node-wide.
    let Some(node) = Node::alone() else { return };
    let pod = node.containerd_pod("hostile/files-7d9f8c6b5-x2k4p", &["fifo", "zero", "good"]);
    let config = |c: &str| {
        node.roots
            .containerd
            .join("k8s.io")
            .join(&pod.container(c).unwrap().id)
            .join("config.json")
    };
    std::fs::remove_file(config("fifo")).unwrap();
    nix::unistd::mkfifo(&config("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::remove_file(config("zero")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", config("zero")).unwrap();
    // A process already in the FIFO's container: the agent reads its
    // metadata at start-up, before it drops its capabilities.
    let fifo_cg = pod.container("fifo").unwrap().cgroup.clone();
    let mut resident = Command::new(BIN);
    resident
        .args(["testbed", "enter", "--cgroup"])
        .arg(&fifo_cg)
        .args(["--", "sleep", "120"]);
    let _resident = Bg::spawn(resident);
    wait_for("the resident process", Duration::from_secs(5), || {
        let procs = std::fs::read_to_string(fifo_cg.join("cgroup.procs")).ok()?;
        (!procs.trim().is_empty()).then_some(())
    });
    let t0 = Instant::now();
    // A ring that holds the whole storm (~50k records): what is tested is
    // that the bad files stall nothing, not how fast the tests' unoptimised
    // agent drains a ring on a loaded runner (that is `xtask bench`'s,
    // with the release build and the default ring). A stall still shows:
    // the events would never come, and /healthz would not answer.
    let mut agent = node.agent(&["--ring-buffer-bytes", "16777216"]);
    let started = t0.elapsed();
    agent.wait_stderr("is a FIFO, not a regular file", Duration::from_secs(5));
    let port = agent.http_port;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    assert_eq!(
        connscope::kernel::check::effective_caps(&status),
        Some(1 << 39),
        "capabilities dropped after start-up"
    );
    assert!(healthy(port));

    // Storms at once: 20k/s from the container whose config.json is
    // /dev/zero (the case), 5k/s from a good one of the same pod.
    let zero_cg = pod.container("zero").unwrap().cgroup.clone();
    let good_cg = pod.container("good").unwrap().cgroup.clone();
    let storms = [
        ("zero", storm_in(&zero_cg, 20_000, 2)),
        ("good", storm_in(&good_cg, 5_000, 2)),
    ];
    let mut answered = 0;
    let during = Instant::now();
    while during.elapsed() < Duration::from_millis(1500) {
        assert!(healthy(port), "/healthz during the storms");
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // And one dial from the FIFO's container.
    let fifo_dial = dial_in(&pod, "fifo", &closed_target(), false);
    let counts: Vec<(&str, u64)> = storms.into_iter().map(|(c, s)| (c, refused(s))).collect();
    let id = |c: &str| pod.container(c).unwrap().id.clone();
    for (c, n) in &counts {
        let cid = id(c);
        let seen = wait_for(
            &format!("{n} failures of {c}"),
            Duration::from_secs(20),
            || {
                let seen = agent
                    .events()
                    .iter()
                    .filter(|e| e["type"] == "connect_failure" && e["container_id"] == *cid)
                    .count() as u64;
                (seen >= *n).then_some(seen)
            },
        );
        assert_eq!(seen, *n, "{c}: every refusal reported once");
    }
    assert_eq!(
        metric(port, "connscope_events_lost_total"),
        0.0,
        "nothing lost node-wide"
    );
    let good = counts[1].1 as f64;
    wait_for(
        "metrics of the good container",
        Duration::from_secs(5),
        || {
            (metric_where(
                port,
                "connscope_connect_failures_total",
                "container=\"good\"",
            ) == good)
                .then_some(())
        },
    );
    let e = agent.failure(fifo_dial.pid);
    assert_eq!(e["container_id"], id("fifo"));
    assert_eq!(e["pod_uid"], pod.uid.as_str());
    assert!(
        e.get("container").is_none() && e.get("pod").is_none(),
        "{e}"
    );
    let zero = agent
        .events()
        .into_iter()
        .find(|e| e["container_id"] == id("zero"))
        .unwrap();
    assert!(zero.get("container").is_none(), "{zero}");
    let errors = metric(
        port,
        "connscope_metadata_errors_total{source=\"containerd\"}",
    );
    assert!(
        (2.0..10.0).contains(&errors),
        "bad files counted once each (cached): {errors}"
    );
    let took = stops_promptly(&mut agent);
    eprintln!(
        "FIFO/symlink config.json: start-up {started:?}, /healthz answered {answered} times during the storms, refusals {counts:?} all reported, 0 lost, {errors} metadata errors, SIGTERM exit in {took:?}"
    );
}

/// A tmpfs mounted for a test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_costs_counted_lines_only_and_the_stream_recovers() {
    let Some(node) = Node::shared() else { return };
    let pod = node.containerd_pod("diskfull/app-7d9f8c6b5-x2k4p", &["app"]);
    let disk = Tmpfs::mount(node.dir.join("small"), "64k");
    let filler = disk.0.join("filler");
    // Fill it up: the write stops at ENOSPC.
    let _ = std::fs::write(&filler, vec![b'x'; 128 * 1024]);
    let events = disk.0.join("events.json");
    let mut agent = node.agent_writing(Some(&events), &[]);
    let port = agent.http_port;
    let failures = |port| {
        metric_where(
            port,
            "connscope_connect_failures_total",
            "namespace=\"diskfull\"",
        )
    };
    let n = 5;
    for _ in 0..n {
        dial_in(&pod, "app", &closed_target(), false);
    }
    agent.wait_stderr("cannot write the event stream", Duration::from_secs(10));
    let dropped = wait_for("lines counted as dropped", Duration::from_secs(10), || {
        let d = metric(
            port,
            "connscope_json_lines_dropped_total{reason=\"write_error\",sink=\"stream\"}",
        );
        (d >= n as f64).then_some(d)
    });
    wait_for("metrics go on", Duration::from_secs(5), || {
        (failures(port) == n as f64).then_some(())
    });
    assert!(healthy(port));
    assert_eq!(http_get(port, "/readyz").0, 200);
    // Space again: the stream recovers by itself, with whole lines only
    // (read_json_lines fails on a broken one).
    std::fs::remove_file(&filler).unwrap();
    let after = dial_in(&pod, "app", &closed_target(), false);
    let e = wait_for("the line after recovery", Duration::from_secs(10), || {
        read_json_lines(&events)
            .into_iter()
            .find(|e| e["type"] == "connect_failure" && e["pid"] == after.pid)
    });
    assert_eq!(e["namespace"], "diskfull");
    agent.wait_stderr("event stream writable again", Duration::from_secs(5));
    wait_for("metrics go on", Duration::from_secs(5), || {
        (failures(port) == (n + 1) as f64).then_some(())
    });
    stops_promptly(&mut agent);
    eprintln!(
        "full disk: {n} failures counted in the metrics while {dropped} lines were dropped (counted), recovered when space came back"
    );
}

#[test]
fn stalled_stdout_blocks_nothing_counts_its_loss_and_recovers() {
    // Alone: the storm's failures are counted exactly.
    let Some(node) = Node::alone() else { return };
    let pod = node.containerd_pod("stalled/app-7d9f8c6b5-x2k4p", &["app"]);
    let mut agent = node.agent_writing(None, &[]);
    let port = agent.http_port;
    // Held, not read: the pipe fills after 64 KiB.
    let stdout = agent.child.stdout.take().unwrap();
    let cg = pod.container("app").unwrap().cgroup.clone();
    let storm = storm_in(&cg, 10_000, 3);
    let during = Instant::now();
    let mut answered = 0;
    while during.elapsed() < Duration::from_secs(2) {
        assert!(healthy(port), "/healthz while stdout is stalled");
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = refused(storm) as f64;
    let failures = |port| {
        metric_where(
            port,
            "connscope_connect_failures_total",
            "namespace=\"stalled\"",
        )
    };
    // Every refusal is counted: in the failure metrics, or (on a machine
    // too busy for the reader to keep up with the storm) as kernel loss,
    // which has nothing to do with the stream.
    let mut last = (0.0, 0.0);
    let (counted, lost) = crate::fixture::wait_for_or(Duration::from_secs(10), || {
        last = (failures(port), metric(port, "connscope_events_lost_total"));
        (last.0 + last.1 >= n).then_some(last)
    })
    .unwrap_or_else(|| panic!("{n} refusals, counted (failures, lost): {last:?}"));
    assert!(counted > 0.0 && counted <= n, "{counted} of {n}");
    let dropped = wait_for("lines counted as dropped", Duration::from_secs(10), || {
        let d = metric(
            port,
            "connscope_json_lines_dropped_total{reason=\"queue_full\",sink=\"stream\"}",
        );
        (d > 0.0).then_some(d)
    });
    agent.wait_stderr("event stream cannot keep up", Duration::from_secs(5));
    assert_eq!(http_get(port, "/readyz").0, 200);
    // The reader comes back: the stream goes on, in whole lines.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let after = dial_in(&pod, "app", &closed_target(), false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = 0u64;
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the failure after recovery on stdout");
        lines += 1;
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("broken line {l:?}: {e}"));
        if v["type"] == "connect_failure" && v["pid"] == after.pid {
            break;
        }
    }
    agent.wait_stderr("event stream keeps up again", Duration::from_secs(10));
    let took = stops_promptly(&mut agent);
    eprintln!(
        "stalled stdout: {n} refusals, {counted} in the failure metrics ({lost} lost in the kernel ring), /healthz answered {answered} times while stalled, {dropped} lines dropped (counted), {lines} lines read after the reader came back, SIGTERM exit in {took:?}"
    );
}

/// Directories made under the cgroup root, removed (deepest first) on drop.
struct Cgroups(Vec<PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            connscope::testbed::pod::kill_cgroup(d);
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn a_cgroup_path_longer_than_the_kernel_record_is_never_taken_cut() {
    let Some(node) = Node::shared() else { return };
    let mut agent = node.agent(&[]);
    // Made after the agent started: it learns the path from the kernel's
    // cgroup_mkdir record, which holds 255 bytes of it. kind's layout: the
    // node's container cgroup, kubelet's own root slice, then kubelet's.
    let pid = std::process::id();
    let uid = format!("0a1b2c3d-4e5f-6789-abcd-{pid:012x}");
    let cid = format!("{pid:016x}").repeat(4);
    let levels = [
        "connscope-kind.slice".to_string(),
        format!("docker-{}.scope", "9".repeat(64)),
        "kubelet.slice".into(),
        "kubelet-kubepods.slice".into(),
        "kubelet-kubepods-burstable.slice".into(),
        format!(
            "kubelet-kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ),
        format!("cri-containerd-{cid}.scope"),
    ];
    let mut made = Cgroups(Vec::new());
    let mut dir = node.cgroup_root.clone();
    for l in &levels {
        dir = dir.join(l);
        std::fs::create_dir(&dir).unwrap();
        made.0.push(dir.clone());
    }
    let rel = dir.strip_prefix(&node.cgroup_root).unwrap();
    assert!(rel.as_os_str().len() > 255, "{}", rel.display());
    let cfg = node.roots.containerd.join("k8s.io").join(&cid);
    std::fs::create_dir_all(&cfg).unwrap();
    let ann = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "nested-0",
        "io.kubernetes.cri.sandbox-namespace": "kind",
        "io.kubernetes.cri.sandbox-uid": uid,
    }});
    std::fs::write(cfg.join("config.json"), ann.to_string()).unwrap();
    let out = crate::fixture::dial(&closed_target(), Some(&dir), false);
    let e = agent.failure(out.pid);
    crate::fixture::assert_fields(
        &e,
        &[
            ("pod_uid", &uid),
            ("container_id", &cid),
            ("container", "app"),
            ("pod", "nested-0"),
            ("namespace", "kind"),
        ],
    );
    assert!(e.get("cgroup").is_none(), "{e}");
    agent.wait_stderr(
        "cgroup path longer than the kernel record holds",
        Duration::from_secs(5),
    );
    wait_for("the cut path counted", Duration::from_secs(5), || {
        (metric(
            agent.http_port,
            "connscope_metadata_values_rejected_total{field=\"cgroup_path\",source=\"kernel\"}",
        ) >= 1.0)
            .then_some(())
    });
}
