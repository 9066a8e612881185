//! `connscope explain`: from the page to the cause in one step. Reads a
//! running agent's `/events` (`fetch`), builds each pod's timeline from the
//! kernel times the lines carry (`events`, `timeline`), says what changed
//! against the workload's previous revision (`change`) and draws it
//! (`render`), or gives the same as JSON. It runs outside the cluster's
//! nodes, so it needs no privilege: only the agent's HTTP port (through
//! `kubectl port-forward`) and, where the agent asks for one, a token.

mod change;
mod events;
mod fetch;
mod inbound;
mod render;
mod timeline;
mod verdict;

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use fetch::FetchError;
use timeline::PodTimeline;

/// What the exit status says (documented in `--help`).
pub const EXIT_CODES: &str = "\
Exit status:
  0  the timelines were printed (or no pod raced in the window: said so)
  1  another error (an unreadable token file, an answer that is not /events)
  2  a bad command line
  3  the agent cannot be reached: no connection or no answer (is kubectl port-forward running?)
  4  the agent refused: 401 (no token, or one it does not accept), 403 (the token's user may not
     get /events), 503 (it cannot check tokens now)
  5  unknown pod or workload: no event of this agent names it (it may run on another node)
  6  no events: the agent has none in the window (or the namespace)

Example:
  kubectl -n connscope-system port-forward pod/<agent on the pod's node> 9464 &
  kubectl create token <reader> -n <ns> > token   # a service account bound to connscope-events-reader
  connscope explain -n shop --pod checkout-7d9f8c6b5-x2k4p --token-file token";

/// `connscope explain` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Only pods of this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only pods of this workload (a Deployment, StatefulSet... as the
    /// agent names it); every pod of it, raced or not.
    #[arg(long, short = 'w', conflicts_with = "pod")]
    pub workload: Option<String>,
    /// Only this pod, raced or not.
    #[arg(long, short = 'p')]
    pub pod: Option<String>,
    /// How far back to look (1h, 30m, 2h30m). The agent keeps its last
    /// --recent-events lines (2048 by default) whatever their age.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// The agent's HTTP address: kubectl port-forward's (the default), or
    /// the API server's pod proxy
    /// (http://127.0.0.1:8001/api/v1/namespaces/connscope-system/pods/<agent>:9464/proxy
    /// under kubectl proxy).
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    pub addr: String,
    /// Print the timelines as JSON.
    #[arg(long)]
    pub json: bool,
    /// A file holding a bearer token for an agent run with
    /// --http-auth=kubernetes (the DaemonSet's default): a token whose user
    /// may get /events (ClusterRole connscope-events-reader).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The agent's own mesh profiles file (its `--mesh-profiles`), so that
    /// the timelines of meshes it adds or changes draw their ports.
    #[arg(long, env = "CONNSCOPE_MESH_PROFILES")]
    pub mesh_profiles: Option<PathBuf>,
}

impl Args {
    /// Options for one pod, the others at their defaults (the demo's).
    pub fn for_pod(addr: &str, namespace: &str, pod: &str) -> Args {
        Args {
            namespace: Some(namespace.into()),
            workload: None,
            pod: Some(pod.into()),
            since: Duration::from_secs(3600),
            addr: addr.into(),
            json: false,
            token_file: None,
            mesh_profiles: None,
        }
    }
}

/// Why explain could not explain: a message and its exit status.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// `--json`'s document.
#[derive(Serialize)]
struct Report<'a> {
    agent: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    since_seconds: u64,
    pods: Vec<&'a PodTimeline>,
    /// Pods seen that did not race, when no pod was named (their verdicts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    others: Vec<Other<'a>>,
}

#[derive(Serialize)]
struct Other<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    pod: &'a str,
    verdict: &'static str,
}

/// The binary's entry: runs, prints a failure on stderr, returns the exit
/// status.
pub fn main(args: &Args) -> i32 {
    let stdout = std::io::stdout();
    match run(args, &mut stdout.lock()) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("connscope explain: {f}");
            f.code
        }
    }
}

/// Explains what `args` selects, writing to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), Failure> {
    for (flag, v) in [
        ("--namespace", &args.namespace),
        ("--workload", &args.workload),
        ("--pod", &args.pod),
    ] {
        if let Some(v) = v {
            check_name(flag, v)?;
        }
    }
    let token = match &args.token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    if args.mesh_profiles.is_some() {
        let p = crate::race::Profiles::load(args.mesh_profiles.as_deref())
            .map_err(|e| Failure::new(2, format!("{e:#}")))?;
        crate::race::mesh::install(std::sync::Arc::new(p));
    }
    let base = fetch::base_url(&args.addr).map_err(|e| Failure::new(2, e.to_string()))?;
    let query = args
        .namespace
        .as_ref()
        .map(|n| format!("namespace={n}"))
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, format!("cannot start: {e}")))?;
    let text = rt
        .block_on(fetch::events(&base, &query, token.as_deref()))
        .map_err(|e| failure(e, &base, token.is_some()))?;
    let (lines, unreadable) = events::parse(&text);
    if unreadable > 0 {
        eprintln!(
            "connscope explain: {unreadable} line(s) of the answer could not be read and were skipped"
        );
    }
    if lines.is_empty() && unreadable > 0 && !text.trim_start().starts_with('{') {
        return Err(Failure::new(
            1,
            format!("{base}/events did not answer JSON lines: is --addr the agent's HTTP port?"),
        ));
    }
    let stubs = lines.iter().filter(|l| l.kind == "event_too_large").count();
    if stubs > 0 {
        eprintln!(
            "connscope explain: the agent kept {stubs} event(s) only as event_too_large stubs (its --recent-events-bytes share per line was too small): timelines may miss them"
        );
    }
    let node = lines.iter().find_map(|l| l.node.clone());
    let on = match &node {
        Some(n) => format!("the agent on node {n}"),
        None => format!("the agent at {base}"),
    };
    let within = match &args.namespace {
        Some(n) => format!(" in namespace {n}"),
        None => String::new(),
    };
    if lines.is_empty() {
        return Err(Failure::new(
            6,
            format!(
                "{on} has no events{within}: it keeps only its last --recent-events lines, and writes them as connects fail and pods start"
            ),
        ));
    }
    let boot = events::boot_offset_ns(&lines);
    let total = lines.len();
    let lines = events::within(lines, args.since, SystemTime::now());
    let since = humantime::format_duration(args.since).to_string();
    if lines.is_empty() {
        return Err(Failure::new(
            6,
            format!(
                "{on} has no events{within} in the last {since} ({total} older ones; try a longer --since)"
            ),
        ));
    }
    let mut pods = timeline::build(&lines, boot);
    if pods.is_empty() {
        return Err(Failure::new(
            6,
            format!("{on} has events{within} in the last {since}, but none about a pod"),
        ));
    }
    let all = pods.clone();
    for p in &mut pods {
        p.changed = Some(change::what_changed(p, &all));
    }
    let named = args.pod.is_some() || args.workload.is_some();
    let chosen: Vec<&PodTimeline> = pods
        .iter()
        .filter(|p| match (&args.pod, &args.workload) {
            (Some(pod), _) => &p.pod == pod,
            (None, Some(w)) => p.workload.as_ref() == Some(w),
            (None, None) => p.raced(),
        })
        .collect();
    if named && chosen.is_empty() {
        let what = match (&args.pod, &args.workload) {
            (Some(p), _) => format!("pod {p}"),
            (_, Some(w)) => format!("workload {w}"),
            _ => unreachable!("named"),
        };
        let hint = match (&args.pod, &args.namespace) {
            (Some(p), Some(n)) => format!(
                "; it may run on another node: `kubectl -n {n} get pod {p} -o wide` names it, and `kubectl -n connscope-system get pods -o wide -l app.kubernetes.io/name=connscope` its agent"
            ),
            _ => "; it may run on another node: each agent sees its own node's pods".to_string(),
        };
        return Err(Failure::new(
            5,
            format!("no event of {on} names {what}{within} in the last {since}{hint}"),
        ));
    }
    let others: Vec<Other<'_>> = if named {
        Vec::new()
    } else {
        pods.iter()
            .filter(|p| !p.raced())
            .map(|p| Other {
                namespace: p.namespace.as_deref(),
                pod: &p.pod,
                verdict: p.verdicts.first().map_or("unknown", |v| v.phase),
            })
            .collect()
    };
    let written = if args.json {
        let report = Report {
            agent: &base,
            node: node.as_deref(),
            since_seconds: args.since.as_secs(),
            pods: chosen,
            others,
        };
        serde_json::to_writer_pretty(&mut *out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else if chosen.is_empty() {
        let seen: Vec<String> = others
            .iter()
            .take(20)
            .map(|o| format!("{} ({})", o.pod, o.verdict))
            .collect();
        let more = others.len().saturating_sub(20);
        writeln!(
            out,
            "No pod hit a sidecar race{within} in the last {since} on {on}. Pods seen: {}{}",
            seen.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    } else {
        chosen.iter().enumerate().try_for_each(|(i, p)| {
            if i > 0 {
                writeln!(out)?;
            }
            out.write_all(render::pod(p).as_bytes())
        })
    };
    written.map_err(|e| Failure::new(1, format!("writing the answer: {e}")))
}

/// A Kubernetes name (RFC 1123: lower-case letters, digits, `-` and `.`).
fn check_name(flag: &str, v: &str) -> Result<(), Failure> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Failure::new(
            2,
            format!("{flag} {v:?} is not a Kubernetes name (lower-case letters, digits, '-', '.')"),
        ))
    }
}

/// The token in `p`, without surrounding white space.
fn read_token(p: &std::path::Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| Failure::new(1, format!("cannot read --token-file {}: {e}", p.display())))?;
    let t = text.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(Failure::new(
            1,
            format!(
                "--token-file {} does not hold one token (it is empty or has several words)",
                p.display()
            ),
        ));
    }
    Ok(t.to_string())
}

/// What a fetch failure means for the one on call.
fn failure(e: FetchError, base: &str, token: bool) -> Failure {
    match e {
        FetchError::BadAddress(m) => Failure::new(2, m),
        FetchError::Unreachable(m) => Failure::new(
            3,
            format!(
                "cannot reach the agent: {m}. Is `kubectl -n connscope-system port-forward pod/<agent> 9464` running, and --addr its address ({base})?"
            ),
        ),
        FetchError::Refused { status, body } => {
            let why = match status.as_u16() {
                401 if token => "the agent did not accept the token (expired, or not this cluster's)".to_string(),
                401 => "the agent wants a bearer token: --token-file with `kubectl create token <service account> -n <namespace>` for an account bound to ClusterRole connscope-events-reader".to_string(),
                403 => "the token's user may not get /events: bind ClusterRole connscope-events-reader to it".to_string(),
                503 => format!("the agent cannot check tokens now: {}", body.trim()),
                _ => format!("the agent answered {status}: {}", body.trim()),
            };
            Failure::new(4, format!("{why} ({base}/events: {status})"))
        }
        FetchError::BadAnswer(m) => Failure::new(1, m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_gets_a_message_and_its_code() {
        let mut args = Args::for_pod("http://127.0.0.1:1", "shop", "Checkout_1");
        let e = run(&args, &mut Vec::new()).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(
            e.message
                .contains("--pod \"Checkout_1\" is not a Kubernetes name"),
            "{e}"
        );
        args.pod = Some("checkout".into());
        args.addr = "https://agent:9464".into();
        let e = run(&args, &mut Vec::new()).unwrap_err();
        assert_eq!(e.code, 2, "{e}");
        args.addr = "http://127.0.0.1:1".into();
        args.token_file = Some("/nonexistent/token".into());
        let e = run(&args, &mut Vec::new()).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(
            e.message
                .contains("cannot read --token-file /nonexistent/token"),
            "{e}"
        );
    }

    #[test]
    fn refusals_say_what_to_do() {
        let refused = |code: u16| FetchError::Refused {
            status: hyper::StatusCode::from_u16(code).unwrap(),
            body: "no\n".into(),
        };
        let f = failure(refused(401), "http://a", false);
        assert_eq!(f.code, 4);
        assert!(f.message.contains("--token-file"), "{f}");
        assert!(
            failure(refused(401), "http://a", true)
                .message
                .contains("did not accept")
        );
        assert!(
            failure(refused(403), "http://a", true)
                .message
                .contains("connscope-events-reader")
        );
        let f = failure(FetchError::Unreachable("refused".into()), "http://a", false);
        assert_eq!(f.code, 3);
        assert!(f.message.contains("port-forward"), "{f}");
    }

    /// A stand-in agent, on a thread and runtime of its own, whose
    /// `/events` answers `body`; its URL.
    fn agent(body: String) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                let app = axum::Router::new()
                    .route("/events", axum::routing::get(move || async move { body }));
                axum::serve(l, app).await.unwrap();
            });
        });
        format!("http://{}", rx.recv().unwrap())
    }

    /// Two pods of `shop`, written `age` ago: `cart-1` raced, `api-1` did not.
    fn two_pods(age: Duration) -> String {
        let time = humantime::format_rfc3339_nanos(SystemTime::now() - age);
        let who = |pod: &str, w: &str| {
            format!(
                r#""time":"{time}","node":"node-a","namespace":"shop","pod":"{pod}","pod_uid":"u-{pod}","workload":"{w}""#
            )
        };
        [
            format!(r#"{{"type":"connect_failure","phase":"startup_race","mono_ns":2000,"dst":"10.0.0.1:80",{}}}"#, who("cart-1", "cart")),
            format!(r#"{{"type":"startup_race","refused":1,"first_refusal_mono_ns":2000,"ready_mono_ns":3000,"window_seconds":0.000001,"pod_start_mono_ns":1000,"destinations":["10.0.0.1:80"],"recommendation":"hold",{}}}"#, who("cart-1", "cart")),
            format!(r#"{{"type":"sidecar_ready","ready_mono_ns":5000,"pod_start_mono_ns":4000,{}}}"#, who("api-1", "api")),
        ]
        .join("\n")
    }

    fn explain(args: &Args) -> Result<String, Failure> {
        let mut out = Vec::new();
        run(args, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn selects_raced_pods_unless_a_pod_or_workload_is_named() {
        let url = agent(two_pods(Duration::from_secs(60)));
        let mut args = Args::for_pod(&url, "shop", "api-1");
        args.pod = None;
        let out = explain(&args).unwrap();
        assert!(
            out.starts_with("POD        shop/cart-1 (workload cart, node node-a)\n"),
            "{out}"
        );
        assert!(!out.contains("api-1"), "{out}");
        args.workload = Some("api".into());
        let out = explain(&args).unwrap();
        assert!(
            out.starts_with("POD        shop/api-1 (workload api, node node-a)\n"),
            "{out}"
        );
        assert!(out.contains("VERDICT    no race"), "{out}");
        args.json = true;
        let v: serde_json::Value = serde_json::from_str(&explain(&args).unwrap()).unwrap();
        assert_eq!(v["pods"][0]["pod"], "api-1");
        assert_eq!(v["pods"][0]["verdicts"][0]["phase"], "no_race");
        assert_eq!(v["node"], "node-a");
        args.workload = Some("nope".into());
        let e = explain(&args).unwrap_err();
        assert_eq!(e.code, 5, "{e}");
        assert!(
            e.message.contains(
                "no event of the agent on node node-a names workload nope in namespace shop"
            ),
            "{e}"
        );
        args.workload = None;
        args.pod = Some("nope-1".into());
        assert_eq!(explain(&args).unwrap_err().code, 5);
    }

    #[test]
    fn no_race_no_events_and_old_events() {
        let calm = agent(
            two_pods(Duration::from_secs(60))
                .lines()
                .last()
                .unwrap()
                .to_string(),
        );
        let mut args = Args::for_pod(&calm, "shop", "x");
        args.pod = None;
        assert_eq!(
            explain(&args).unwrap(),
            "No pod hit a sidecar race in namespace shop in the last 1h on the agent on node node-a. Pods seen: api-1 (no_race)\n"
        );
        let empty = agent(String::new());
        let e = explain(&Args::for_pod(&empty, "shop", "x")).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.message.contains("has no events in namespace shop"), "{e}");
        let old = agent(two_pods(Duration::from_secs(7200)));
        let e = explain(&Args::for_pod(&old, "shop", "cart-1")).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(
            e.message
                .contains("in the last 1h (3 older ones; try a longer --since)"),
            "{e}"
        );
        let not_events = agent("<html>hello</html>\n".into());
        let e = explain(&Args::for_pod(&not_events, "shop", "x")).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.message.contains("did not answer JSON lines"), "{e}");
    }
}
