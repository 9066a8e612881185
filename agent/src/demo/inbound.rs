//! `connscope demo --inbound`: the inbound start-up race on this machine.
//! Istio's inbound rules send a client's requests for `podIP:8080` to the
//! stand-in sidecar's 15006, which dials the app from 127.0.0.6 as Envoy
//! does; the app listens only after its start-up, so the first requests get
//! Envoy's 503 (UF), and the agent says why, which app, which port and how
//! long the window was.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

use super::{read, start_agent};
use crate::{
    attribute::runtime::Roots,
    testbed::{
        client::responses,
        inbound::UF_BODY,
        pod::cgroup2_root,
        scenario::{APP_PORT, Server, SimPod},
    },
};

/// The demo pod's network-namespace tag (the outbound demo uses 200).
const TAG: u8 = 201;
const POD: &str = "orders-7d9f8c6b5-k4m2p";

/// Runs the inbound demo in `dir`; the app listens after `app_delay_ms`.
pub(super) fn demo(exe: &std::path::Path, dir: &std::path::Path, app_delay_ms: u64) -> Result<()> {
    let roots = Roots {
        containerd: dir.join("containerd"),
        crio: dir.join("crio"),
    };
    let events = dir.join("events.json");
    println!(
        "connscope demo --inbound: a simulated Istio pod on this machine, called before its app listens\n"
    );
    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut agent = start_agent(exe, &roots, &events, http)?;
    println!("  agent        probes attached (connect failures, listeners, processes, cgroups)");
    let mut pod = SimPod::create(exe, TAG, &cgroup2_root()?, &roots, "shop", POD, true)?;
    let target = pod.pod_addr(APP_PORT);
    println!(
        "  pod          shop/{POD} at {}: containers app + istio-proxy,",
        target.ip()
    );
    println!("               Istio's iptables capture rules (inbound -> 15006, 127.0.0.6 exempt)");
    pod.start_sidecar(0, 0)?;
    pod.wait_sidecar(15006, "listen", Duration::from_secs(10))?;
    println!("  istio-proxy  uid 1337, listening on 15006: dials the app from 127.0.0.6");
    let mut app = pod.start_server(&Server {
        listen_after_ms: app_delay_ms,
        ..Server::default()
    })?;
    println!(
        "  app          starting: listens on 0.0.0.0:{APP_PORT} after {app_delay_ms} ms (no readiness probe)"
    );
    let mut client = pod.spawn_client(60, 100, 3)?;
    let rs = responses(&client.wait_exit(Duration::from_secs(30))?);
    app.wait_line("\"state\":\"listen\"", Duration::from_secs(10))?;
    let n503 = rs.iter().filter(|r| r.status == 503).count();
    let n200 = rs.iter().filter(|r| r.status == 200).count();
    println!(
        "  client       {} requests to {target} from the test host: {n503} got 503 \"{}...\", then {n200} got 200",
        rs.len(),
        &UF_BODY[..UF_BODY.find(". reset").unwrap_or(UF_BODY.len())]
    );
    let refused = pod.sidecar_refused()?;
    println!("  istio-proxy  counted {refused} refused dials of the app");
    let uid = pod.pod.uid.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !read(&events)
            .iter()
            .any(|e| e["pod_uid"] == uid.as_str() && e["type"] == "inbound_race")
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.stop();
    drop(client);
    drop(app);
    drop(pod);
    verdict(&read(&events), &uid, refused)
}

/// Prints what the agent said of pod `uid`, whose proxy counted `refused`.
fn verdict(evs: &[Value], uid: &str, refused: u64) -> Result<()> {
    let phases: Vec<&str> = evs
        .iter()
        .filter(|e| e["pod_uid"] == uid && e["type"] == "connect_failure")
        .filter(|e| e["container"] == crate::race::istio::PROXY_CONTAINER)
        .map(|e| e["phase"].as_str().unwrap_or("?"))
        .collect();
    println!();
    let Some(s) = evs
        .iter()
        .find(|e| e["pod_uid"] == uid && e["type"] == "inbound_race")
    else {
        if refused == 0 {
            println!("VERDICT  no race: the app listened before the first request");
            return Ok(());
        }
        bail!(
            "the proxy was refused {refused} times but the agent reported no inbound_race summary"
        );
    };
    println!(
        "VERDICT  inbound {} race in {}/{} ({} {})",
        s["when"].as_str().unwrap_or("?"),
        s["namespace"].as_str().unwrap_or("?"),
        s["pod"].as_str().unwrap_or("?"),
        s["workload_kind"].as_str().unwrap_or("workload"),
        s["workload"].as_str().unwrap_or("?")
    );
    println!(
        "  istio-proxy's dials of container {} refused {} times over {:.3} s before it listened on port(s) {} (kernel timestamps)",
        s["container"].as_str().unwrap_or("?"),
        s["refused"],
        s["window_seconds"].as_f64().unwrap_or(f64::NAN),
        s["ports"]
    );
    println!(
        "  the proxy's own count: {refused}; every refusal classified: {} of {} as inbound_startup",
        phases.iter().filter(|p| **p == "inbound_startup").count(),
        phases.len()
    );
    println!(
        "  recommendation: {}",
        s["recommendation"].as_str().unwrap_or("")
    );
    println!("\nsummary event:\n{}", serde_json::to_string_pretty(s)?);
    Ok(())
}
