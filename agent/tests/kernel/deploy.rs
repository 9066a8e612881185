//! What an SRE installs and what on-call sees: rules (promtool), manifests and
//! the rendered chart (kubernetes-validate; private endpoints, no runtime
//! socket mounted), and end to end: agent + real
//! Prometheus with the shipped rules + real Alertmanager, where a race pages
//! (outbound and inbound) and a pod without a race does not, and every
//! dashboard query runs.
//!
//! Why: the files are what users run in production; checking them only by eye
//! would let a broken rule or query ship. The end-to-end test runs alone: its
//! agent counts the races of every pod on the machine, and it checks that
//! only the racing workload pages.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use connscope::testbed::{
    client::responses,
    scenario::{App, Server},
};
use serde_json::{Value, json};

use crate::fixture::{
    Bg, Node, Prometheus, Turn, free_port, http_get, slow, start_sidecar, wait_for, wait_ready,
};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run `cargo xtask setup`)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let _turn = Turn::shared();
    let rules = deploy().join("prometheus/connscope-rules.yaml");
    run_ok(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
    );
    let t = deploy().join("prometheus/tests");
    let out = run_ok(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(t.join("connscope-rules.test.yaml"))
            .arg(t.join("connscope-rules-weekly.test.yaml")),
    );
    assert_eq!(out.matches("SUCCESS").count(), 2, "{out}");
}

#[test]
fn manifests_and_chart_validate_and_match() {
    let _turn = Turn::shared();
    let out = run_ok(Command::new("python3").arg(deploy().join("tests/check_deploy.py")));
    assert!(out.contains("0 failed"), "{out}");
    assert!(
        out.matches("\nok ").count() + usize::from(out.starts_with("ok ")) >= 100,
        "{out}"
    );
    // The hardening checks ran and passed, for the static manifests and the
    // chart (issue 15): private endpoints, no runtime socket in reach.
    for line in [
        "ok   DaemonSet: /metrics and /events need a token (--http-auth=kubernetes)",
        "ok   ClusterRole connscope: tokenreviews and subjectaccessreviews create",
        "ok   ClusterRole connscope-metrics-reader: get /metrics only",
        "ok   the scraper's service account can get /metrics",
        "ok   ServiceMonitor: scrapes with its service-account token",
        "ok   NetworkPolicy: the agent's pods take ingress on 9464 from the monitoring namespace only",
        "ok   chart renders NetworkPolicy/connscope exactly as deploy/kubernetes",
        "ok   chart values: auth.enabled=false serves without auth, no reader roles, no review rights",
        "ok   deploy/kubernetes: no runtime socket reachable through a hostPath",
        "ok   chart defaults: no runtime socket reachable through a hostPath",
        "ok   DaemonSet: the runtime mounts are exactly what --containerd-root/k8s.io and --crio-root read",
        "ok   DaemonSet: SETPCAP to empty the bounding set and lock securebits",
        "ok   alert ConnscopeStartupRace: runbook_url is its section of deploy/RUNBOOK.md (https://github.com/connscope/connscope/blob/main/deploy/RUNBOOK.md#connscopestartuprace)",
        "ok   RUNBOOK.md section ConnscopeStartupRaceRegression: a connscope explain command and PromQL",
        "ok   RUNBOOK.md section ConnscopeInboundStartupRace: a connscope explain command and PromQL",
        "ok   RUNBOOK.md section ConnscopeInboundShutdownRace: a connscope explain command and PromQL",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

fn alertmanager(dir: &Path) -> (Bg, u16) {
    let port = free_port();
    let cfg = dir.join("alertmanager.yml");
    std::fs::write(
        &cfg,
        "route:\n  receiver: sink\n  group_wait: 1s\nreceivers:\n  - name: sink\n",
    )
    .unwrap();
    let mut c = Command::new("prometheus-alertmanager");
    c.arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.path={}", dir.join("am").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stderr(std::process::Stdio::null());
    let bg = Bg::spawn(c);
    wait_ready("Alertmanager ready", port);
    (bg, port)
}

fn am_alerts(port: u16) -> Vec<Value> {
    let (status, body) = http_get(port, "/api/v2/alerts");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_default()
}

#[test]
fn race_pages_through_alertmanager_and_dashboard_queries_run() {
    // Alone: the set of firing alerts is checked, and the agent would count
    // the races of other tests' pods too (their workload it cannot name).
    let Some(node) = Node::alone() else { return };
    let (_am, am_port) = alertmanager(&node.dir);
    let agent = node.agent(&["--hold-seconds", "1"]);
    let prom = Prometheus::start(
        &node.dir,
        &[agent.http_port],
        &[deploy().join("prometheus/connscope-rules.yaml")],
        Some(am_port),
    );
    let mut racing = node.sim_pod("payments-7d9f8c6b5-r2t4v", true);
    let mut calm = node.sim_pod("catalog-7d9f8c6b5-z8x6c", true);
    start_sidecar(&mut calm, 0, 0);
    // Let Prometheus see the workloads before anything happens.
    start_sidecar(&mut racing, 1500, 0);
    assert!(calm.run_app(&App::default()).unwrap()[0].ok);
    let attempts = racing.run_app(&App::default()).unwrap();
    assert!(attempts.iter().any(|o| !o.ok));
    // The inbound race: requests reach "orders" before its app listens.
    let mut inbound = node.sim_pod("orders-7d9f8c6b5-d2f4h", true);
    start_sidecar(&mut inbound, 0, 0);
    inbound
        .wait_sidecar(15006, "listen", Duration::from_secs(10))
        .unwrap();
    let _server = inbound
        .start_server(&Server {
            listen_after_ms: slow(Duration::from_millis(1000)).as_millis() as u64,
            ..Server::default()
        })
        .unwrap();
    let mut client = inbound.spawn_client(40, 100, 2).unwrap();
    let rs = responses(&client.wait_exit(Duration::from_secs(30)).unwrap());
    assert!(rs.iter().any(|r| r.status == 503), "{rs:?}");

    let fired = wait_for(
        "ConnscopeStartupRace in Alertmanager",
        Duration::from_secs(90),
        || {
            let a = am_alerts(am_port);
            a.into_iter()
                .find(|a| a["labels"]["alertname"] == "ConnscopeStartupRace")
        },
    );
    assert_eq!(fired["labels"]["workload"], "payments");
    assert_eq!(fired["labels"]["namespace"], "shop");
    // Per mesh: the alert keeps the pods' `mesh` and says it.
    assert_eq!(fired["labels"]["mesh"], "istio");
    assert!(
        fired["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("(istio)"),
        "{fired}"
    );
    let runbook = fired["annotations"]["runbook_url"].as_str().unwrap();
    assert!(
        runbook.ends_with("/deploy/RUNBOOK.md#connscopestartuprace"),
        "{runbook}"
    );
    // The page says what runs: no API here, so no template hash, and the
    // proxy's version from the runtime's files (rendered at each evaluation,
    // once the revision is scraped).
    let says = "Running now: revision unknown / proxy 1.22.3.";
    wait_for(
        "the alert naming the revision",
        Duration::from_secs(30),
        || {
            prom.alerts().into_iter().find(|a| {
                a["labels"]["alertname"] == "ConnscopeStartupRace"
                    && a["labels"]["workload"] == "payments"
                    && a["annotations"]["description"]
                        .as_str()
                        .is_some_and(|d| d.ends_with(says))
            })
        },
    );
    // The inbound start-up race pages too, for its own workload only.
    let inbound_fired = wait_for(
        "ConnscopeInboundStartupRace in Alertmanager",
        Duration::from_secs(90),
        || {
            am_alerts(am_port)
                .into_iter()
                .find(|a| a["labels"]["alertname"] == "ConnscopeInboundStartupRace")
        },
    );
    assert_eq!(inbound_fired["labels"]["workload"], "orders");
    assert_eq!(inbound_fired["labels"]["mesh"], "istio");
    assert!(
        inbound_fired["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .ends_with("/deploy/RUNBOOK.md#connscopeinboundstartuprace")
    );
    let inbound_firing = prom.query("ALERTS{alertname=~\"ConnscopeInbound.*\"}");
    assert!(
        inbound_firing
            .iter()
            .all(|s| s["metric"]["workload"] == "orders"
                && s["metric"]["alertname"] == "ConnscopeInboundStartupRace"),
        "{inbound_firing:?}"
    );
    // The calm workload is known to Prometheus, and never alerts.
    assert_eq!(
        prom.value("sum(connscope_pods_started_total{workload=\"catalog\"})"),
        Some(1.0)
    );
    let firing = prom.query("ALERTS{alertname=\"ConnscopeStartupRace\"}");
    assert!(
        firing.iter().all(|s| s["metric"]["workload"] == "payments"),
        "{firing:?}"
    );
    assert!(
        am_alerts(am_port)
            .iter()
            .all(|a| a["labels"]["workload"] != "catalog")
    );
    assert!(
        prom.query("ALERTS{alertname=~\"ConnscopeEventsLost|ConnscopeProbeNotAttached\"}")
            .is_empty()
    );

    // Every dashboard query is valid PromQL against this Prometheus, and the
    // panels this scenario feeds have data.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/connscope.json")).unwrap(),
    )
    .unwrap();
    let with_data = [
        "Pods that raced the sidecar at start-up",
        "Startup race ratio (race pods / injected pods started, 1h)",
        "Refused and failed connects by phase",
        "Sidecar ready latency (pod start -> outbound capture port listening)",
        "Sidecar ready latency p50 / p95",
        "Top workloads by race pods (24h)",
        "Agent: kernel events lost",
        "Agent: probes attached",
        "Agent: events read and pods tracked",
        "Workload revisions running (pod-template-hash / proxy version)",
        "Inbound race pods by workload and when",
        "Top workloads by inbound race pods (24h)",
        "App listen latency p50 / p95 (pod start -> app listening)",
        "Proxy refused by its own app, by phase (probes apart)",
    ];
    // The race window histogram and shutdown panels need more than one race.
    wait_for(
        "a second scrape after the race",
        Duration::from_secs(30),
        || {
            (prom.value(
                "count_over_time(connscope_startup_race_pods_total{workload=\"payments\"}[1m])",
            )? >= 3.0)
                .then_some(())
        },
    );
    let expand = |q: &str| {
        q.replace("$__rate_interval", "1m")
            .replace("$mesh", ".*")
            .replace("$namespace", ".*")
            .replace("$workload", ".*")
    };
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        for t in p["targets"].as_array().unwrap() {
            let q = expand(t["expr"].as_str().unwrap());
            let r = prom.query(&q);
            if with_data.contains(&title) {
                assert!(!r.is_empty(), "panel {title:?} has no data: {q}");
            }
        }
    }
    // The rollout annotation marks both workloads' revisions, new minutes ago.
    let annotations = dash["annotations"]["list"].as_array().unwrap();
    assert!(!annotations.is_empty());
    for a in annotations {
        let q = expand(a["expr"].as_str().unwrap());
        let r = prom.query(&q);
        let marked: Vec<&Value> = r.iter().map(|s| &s["metric"]["workload"]).collect();
        assert!(
            marked.contains(&&json!("payments")) && marked.contains(&&json!("catalog")),
            "annotation {}: {r:?}",
            a["name"]
        );
    }
}
