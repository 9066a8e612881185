//! Real client runtimes in the start-up race: CPython (blocking, with a
//! timeout, asyncio), Node.js, the JDK (blocking, with a timeout), Go and
//! curl dial a captured destination from the app container before the
//! sidecar listens. Each dials its own way (blocking `connect()`, or
//! non-blocking with poll/epoll and `SO_ERROR`, on threads of its own), and
//! the agent must report every refusal each one saw, no more and no fewer,
//! as the start-up race, with the mode the kernel saw.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use connscope::testbed::scenario::{Proc, SimPod};
use serde_json::Value;

use crate::fixture::{Node, failures_of, start_sidecar, stop, wait_for};

/// Attempts each client makes, all before the sidecar listens.
const ATTEMPTS: u32 = 5;
/// Between two attempts.
const GAP_MS: u32 = 50;

const PYTHON: &str = r#"
import asyncio, os, socket, sys, time
host, port, n, gap, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) / 1000, sys.argv[5]
print("pid", os.getpid(), flush=True)
async def dial():
    _, w = await asyncio.open_connection(host, port)
    w.close()
for _ in range(n):
    try:
        if mode == "blocking":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.connect((host, port))
            finally:
                s.close()
        elif mode == "timeout":
            socket.create_connection((host, port), timeout=2).close()
        else:
            asyncio.run(dial())
        print("ok", flush=True)
    except ConnectionRefusedError:
        print("refused", flush=True)
    except Exception as e:
        print("error", type(e).__name__, e, flush=True)
    time.sleep(gap)
"#;

const NODE: &str = r#"
const net = require('net');
const [host, port, n, gap] = [process.argv[2], +process.argv[3], +process.argv[4], +process.argv[5]];
console.log('pid ' + process.pid);
let i = 0;
function dial() {
  if (i++ >= n) return;
  const s = net.connect({ host, port });
  s.on('connect', () => { console.log('ok'); s.destroy(); setTimeout(dial, gap); });
  s.on('error', (e) => {
    console.log(e.code === 'ECONNREFUSED' ? 'refused' : 'error ' + e.code);
    setTimeout(dial, gap);
  });
}
dial();
"#;

const JAVA: &str = r#"
import java.net.*;

public class Client {
    public static void main(String[] a) throws Exception {
        String host = a[0];
        int port = Integer.parseInt(a[1]), n = Integer.parseInt(a[2]);
        long gap = Long.parseLong(a[3]);
        boolean timeout = a[4].equals("timeout");
        System.out.println("pid " + ProcessHandle.current().pid());
        for (int i = 0; i < n; i++) {
            try (Socket s = timeout ? new Socket() : new Socket(host, port)) {
                if (timeout) s.connect(new InetSocketAddress(host, port), 2000);
                System.out.println("ok");
            } catch (ConnectException e) {
                System.out.println("refused");
            } catch (Exception e) {
                System.out.println("error " + e);
            }
            System.out.flush();
            Thread.sleep(gap);
        }
    }
}
"#;

const GO: &str = r#"
package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"
)

func main() {
	host, port := os.Args[1], os.Args[2]
	n, _ := strconv.Atoi(os.Args[3])
	gap, _ := strconv.Atoi(os.Args[4])
	fmt.Println("pid", os.Getpid())
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(host, port), 2*time.Second)
		switch {
		case err == nil:
			fmt.Println("ok")
			c.Close()
		case errors.Is(err, syscall.ECONNREFUSED):
			fmt.Println("refused")
		default:
			fmt.Println("error", err)
		}
		time.Sleep(time.Duration(gap) * time.Millisecond)
	}
}
"#;

/// One client: how it is run, and the mode its connects have.
struct Client {
    name: &'static str,
    argv: Vec<String>,
    nonblocking: bool,
}

/// What a client saw: its pid and each attempt's outcome.
#[derive(Debug)]
struct Seen {
    pid: u32,
    refused: usize,
    other: Vec<String>,
}

/// A runtime's program, or a failure under CI (where every runtime must
/// be there: `cargo xtask setup` installs them) and a skip elsewhere.
fn have(program: &str) -> bool {
    // `go version`, everyone else's `--version`.
    let there = ["--version", "version"].iter().any(|v| {
        Command::new(program)
            .arg(v)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !there {
        let why = format!("{program} not found (cargo xtask setup installs it)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("SKIPPED the {program} clients: {why}");
    }
    there
}

/// The clients of every runtime on this machine, dialing `host:port`.
fn clients(dir: &Path, host: &str, port: u16) -> Vec<Client> {
    let common = |v: &[&str]| -> Vec<String> {
        v.iter()
            .map(|s| s.to_string())
            .chain([
                host.to_string(),
                port.to_string(),
                ATTEMPTS.to_string(),
                GAP_MS.to_string(),
            ])
            .collect()
    };
    let file = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let mut out = Vec::new();
    if have("python3") {
        let py = file("client.py", PYTHON);
        let py = py.to_str().unwrap();
        for (mode, nonblocking) in [("blocking", false), ("timeout", true), ("asyncio", true)] {
            let mut argv = common(&["python3", py]);
            argv.push(mode.into());
            out.push(Client {
                name: match mode {
                    "blocking" => "python (blocking)",
                    "timeout" => "python (timeout)",
                    _ => "python (asyncio)",
                },
                argv,
                nonblocking,
            });
        }
    }
    if have("node") {
        let js = file("client.js", NODE);
        out.push(Client {
            name: "node",
            argv: common(&["node", js.to_str().unwrap()]),
            nonblocking: true,
        });
    }
    if have("java") {
        let java = file("Client.java", JAVA);
        for (mode, nonblocking) in [("blocking", false), ("timeout", true)] {
            let mut argv = common(&["java", "-Xshare:auto", java.to_str().unwrap()]);
            argv.push(mode.into());
            out.push(Client {
                name: if mode == "blocking" {
                    "java (blocking)"
                } else {
                    "java (timeout)"
                },
                argv,
                nonblocking,
            });
        }
    }
    if have("go") {
        let src = file("client.go", GO);
        let bin = dir.join("goclient");
        let built = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(&src)
            .env("GOCACHE", dir.join("gocache"))
            .env("GO111MODULE", "off")
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "go build: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        out.push(Client {
            name: "go",
            argv: common(&[bin.to_str().unwrap()]),
            nonblocking: true,
        });
    }
    out
}

/// Runs `argv` in the pod's app container.
fn spawn_in_app(pod: &SimPod, argv: &[String]) -> Proc {
    let mut c = Command::new(crate::fixture::BIN);
    c.args([
        "testbed",
        "enter",
        "--netns",
        &pod.topo.pod.name,
        "--cgroup",
    ])
    .arg(&pod.pod.container("app").unwrap().cgroup)
    .arg("--")
    .args(argv);
    Proc::spawn(c).unwrap()
}

/// A client's lines: `pid N`, then one per attempt.
fn seen(name: &str, lines: &[String]) -> Seen {
    let pid = lines
        .iter()
        .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name}: no pid in {lines:?}"));
    let outcomes: Vec<&String> = lines.iter().filter(|l| !l.starts_with("pid ")).collect();
    Seen {
        pid,
        refused: outcomes.iter().filter(|l| l.as_str() == "refused").count(),
        other: outcomes
            .iter()
            .filter(|l| l.as_str() != "refused")
            .map(|l| l.to_string())
            .collect(),
    }
}

/// curl's attempts: one process each (`sh` prints its pid, then becomes
/// curl); exit 7 is a refused connect.
fn curl_attempts(pod: &SimPod, url: &str) -> Vec<Seen> {
    (0..ATTEMPTS)
        .map(|_| {
            let script =
                format!("echo pid $$; exec curl -sS -o /dev/null --connect-timeout 2 {url} 2>&1");
            let argv = ["sh".to_string(), "-c".into(), script];
            let mut p = spawn_in_app(pod, &argv);
            let lines = p.wait_exit(Duration::from_secs(10)).unwrap();
            let status = p.child.wait().unwrap();
            let pid = seen("curl", &lines).pid;
            let refused = status.code() == Some(7)
                && lines
                    .iter()
                    .any(|l| l.contains("Connection refused") || l.contains("connect to server"));
            std::thread::sleep(Duration::from_millis(u64::from(GAP_MS)));
            Seen {
                pid,
                refused: usize::from(refused),
                other: if refused { Vec::new() } else { lines },
            }
        })
        .collect()
}

/// The failures of `pid`'s dials of `target`. (A runtime fails other
/// connects of its own too, reported in their own phases: the JDK's glibc
/// tries nscd's AF_UNIX socket first, `ENOENT`, `sidecar_not_ready`.)
fn dials<'a>(events: &'a [Value], pid: u32, target: &str) -> Vec<&'a Value> {
    failures_of(events, pid)
        .into_iter()
        .filter(|e| e["family"] != "unix" && e["dst"] == target)
        .collect()
}

#[test]
fn every_runtime_s_refusals_are_the_startup_race_exactly() {
    let Some(node) = Node::shared() else { return };
    let agent = node.agent(&["--hold-seconds", "1"]);
    let mut pod = node.sim_pod("polyglot-7d9f8c6b5-r8t2w", true);
    // The sidecar is up (15021) but listens on 15001 only long after the
    // clients are done: every captured connect is refused.
    start_sidecar(&mut pod, 60_000, 0);
    let target = pod.upstream();
    let (host, port) = target.rsplit_once(':').unwrap();
    let dir = std::env::temp_dir().join(format!("connscope-runtimes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clients = clients(&dir, host, port.parse().unwrap());
    let mut running: Vec<(&Client, Proc)> = clients
        .iter()
        .map(|c| (c, spawn_in_app(&pod, &c.argv)))
        .collect();
    let mut results: Vec<(&str, bool, Seen)> = running
        .iter_mut()
        .map(|(c, p)| {
            let lines = p.wait_exit(Duration::from_secs(60)).unwrap();
            (c.name, c.nonblocking, seen(c.name, &lines))
        })
        .collect();
    if have("curl") {
        for s in curl_attempts(&pod, &format!("http://{target}/")) {
            results.push(("curl", true, s));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (name, _, s) in &results {
        assert!(
            s.other.is_empty(),
            "{name}: every attempt refused before the sidecar listened: {s:?}"
        );
    }
    let want: usize = results.iter().map(|(_, _, s)| s.refused).sum();
    let events = wait_for(
        &format!("{want} refusals of the clients"),
        Duration::from_secs(15),
        || {
            let ev = agent.events();
            let n: usize = results
                .iter()
                .map(|(_, _, s)| dials(&ev, s.pid, &target).len())
                .sum();
            (n >= want).then_some(ev)
        },
    );
    let _ = stop(agent);
    let mut report = Vec::new();
    for (name, nonblocking, s) in &results {
        let f = dials(&events, s.pid, &target);
        assert_eq!(f.len(), s.refused, "{name}: one event per refusal: {f:?}");
        for e in &f {
            assert_eq!(e["phase"], "startup_race", "{name}: {e}");
            assert_eq!(e["error"], "ECONNREFUSED", "{name}: {e}");
            assert_eq!(e["dst"], target.as_str(), "{name}: {e}");
            assert_eq!(e["container"], "app", "{name}: {e}");
            assert_eq!(e["nonblocking"], *nonblocking, "{name}'s mode: {e}");
        }
        report.push(format!("{name}: {}", s.refused));
    }
    eprintln!("refusals reported exactly: {}", report.join(", "));
}
