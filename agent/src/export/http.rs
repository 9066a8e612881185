//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and `/events`
//! (recent events as NDJSON, filtered by `namespace`, `pod`, `phase`,
//! `type`; `?follow=1` streams live ones). Memory is bounded: a fixed ring
//! of recent events, a bounded channel per follower, a cap on followers, and
//! a follower that was sent nothing for `follower_idle` is ended. Events are
//! serialised in the request's own task, a chunk at a time, on the HTTP
//! thread ([`super::server`]), never on the pipeline's. `/metrics` and
//! `/events` may require a token ([`super::auth`]).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::Stream;
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};

use crate::{
    attribute::Attribution,
    export::auth::{self, Auth},
    export::json::KernelJson,
    export::metrics::Metrics,
    kernel::decode::KernelEvent,
    race::{Capture, Phase, Profile},
};

/// What an `/events` line says.
#[derive(Debug, Clone)]
pub(crate) enum LineBody {
    /// Already serialised (a summary, or an event the stream also wrote).
    Json(String),
    /// A kernel event serialised only when somebody reads it: with
    /// `--events none` nothing is turned into JSON unless `/events` is asked.
    Kernel {
        ev: Box<KernelEvent>,
        phase: Option<Phase>,
        capture: Option<Capture>,
        mesh: Option<Arc<Profile>>,
    },
}

/// One event line with the fields `/events` filters on.
#[derive(Debug, Clone)]
pub(crate) struct EventLine {
    pub body: LineBody,
    pub kind: &'static str,
    /// Who it is about (namespace and pod are filtered on).
    pub who: Arc<Attribution>,
    pub phase: Option<&'static str>,
}

impl EventLine {
    /// The line's JSON (without the newline).
    pub(crate) fn json(&self) -> String {
        match &self.body {
            LineBody::Json(j) => j.clone(),
            LineBody::Kernel {
                ev,
                phase,
                capture,
                mesh,
            } => {
                let mesh = mesh.as_deref().map(|m| m.name.as_str());
                serde_json::to_string(&KernelJson::from_kernel(
                    ev, &self.who, *phase, *capture, mesh,
                ))
                .unwrap_or_else(|e| format!("{{\"type\":\"unserialisable\",\"error\":\"{e}\"}}"))
            }
        }
    }
}

/// Limits of the endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Recent events kept for `/events`.
    pub recent: usize,
    /// Concurrent `follow=1` readers.
    pub followers: usize,
    /// Lines buffered per follower before it is told it lagged.
    pub follower_buffer: usize,
    /// A follower sent nothing for this long is ended (with a
    /// `follow_idle` line), giving its slot back.
    pub follower_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            recent: 10_000,
            followers: 16,
            follower_buffer: 4096,
            follower_idle: Duration::from_secs(300),
        }
    }
}

/// State shared by the pipeline and the HTTP handlers.
pub struct Shared {
    pub metrics: Mutex<Metrics>,
    recent: Mutex<VecDeque<Arc<EventLine>>>,
    live: broadcast::Sender<Arc<EventLine>>,
    followers: AtomicUsize,
    limits: Limits,
    /// Probes attached (set once after load).
    pub attached: AtomicBool,
    /// Monotonic ms of the main loop's last turn (ring buffer being read).
    pub heartbeat_ms: AtomicU64,
}

impl Shared {
    pub fn new(metrics: Metrics, limits: Limits) -> Arc<Shared> {
        let (live, _) = broadcast::channel(limits.follower_buffer.max(1));
        Arc::new(Shared {
            metrics: Mutex::new(metrics),
            recent: Mutex::new(VecDeque::with_capacity(limits.recent.min(1024))),
            live,
            followers: AtomicUsize::new(0),
            limits,
            attached: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(0),
        })
    }

    /// Publishes a batch of events to `/events` readers, under one lock of
    /// the recent buffer (a refused storm publishes every failure; a lock per
    /// event showed in profiles).
    pub(crate) fn publish_all(&self, lines: impl IntoIterator<Item = EventLine>) {
        let follow = self.live.receiver_count() > 0;
        let keep = self.limits.recent > 0;
        let mut recent = if keep { self.recent.lock().ok() } else { None };
        for line in lines {
            let line = Arc::new(line);
            if let Some(r) = recent.as_mut() {
                if r.len() >= self.limits.recent {
                    r.pop_front();
                }
                r.push_back(line.clone());
            }
            if follow {
                let _ = self.live.send(line);
            }
        }
    }

    /// Whether `/events` keeps recent events (else they need no JSON).
    pub(crate) fn keeps_recent(&self) -> bool {
        self.limits.recent > 0
    }

    /// Records that the main loop is alive.
    pub(crate) fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    crate::kernel::decode::Clock::mono_now() / 1_000_000
}

/// `/events` query.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub phase: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub follow: Option<String>,
}

impl Filter {
    pub(crate) fn matches(&self, e: &EventLine) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|n| e.who.namespace.as_deref() == Some(n))
            && self
                .pod
                .as_deref()
                .is_none_or(|p| e.who.pod.as_deref() == Some(p))
            && self.phase.as_deref().is_none_or(|p| e.phase == Some(p))
            && self.kind.as_deref().is_none_or(|k| e.kind == k)
    }

    fn follow(&self) -> bool {
        matches!(self.follow.as_deref(), Some("1" | "true" | "yes"))
    }
}

/// The router; with `auth`, `/metrics` and `/events` need an authorised
/// bearer token.
pub(crate) fn router(shared: Arc<Shared>, auth: Option<Arc<Auth>>) -> Router {
    let private = Router::new()
        .route("/metrics", get(metrics))
        .route("/events", get(events));
    let private = match auth {
        Some(a) => private.route_layer(axum::middleware::from_fn_with_state(a, auth::require)),
        None => private,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(private)
        .with_state(shared)
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let body = match s.metrics.lock() {
        Ok(m) => m.render(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let attached = s.attached.load(Ordering::Relaxed);
    let age = now_ms().saturating_sub(s.heartbeat_ms.load(Ordering::Relaxed));
    if attached && age < 5_000 {
        "ready\n".into_response()
    } else if !attached {
        (StatusCode::SERVICE_UNAVAILABLE, "probes not attached\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ring buffer not read for {age} ms\n"),
        )
            .into_response()
    }
}

/// Decrements the follower count when a stream ends.
struct FollowerSlot(Arc<Shared>);

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lines serialised per body chunk: the work of one poll of the request's
/// task, so that other requests on the HTTP thread are served in between.
const LINES_PER_CHUNK: usize = 256;

/// NDJSON of `lines`, serialised a chunk at a time as the body is sent,
/// yielding to the HTTP thread's other tasks between chunks (without that, a
/// client reading fast would have its whole answer serialised in one poll,
/// and the other requests, `/healthz` too, would wait for it).
fn ndjson(
    lines: Vec<Arc<EventLine>>,
) -> impl Stream<Item = Result<String, std::convert::Infallible>> + Send {
    futures::stream::unfold(
        (lines.into_iter(), false),
        |(mut lines, started)| async move {
            if started {
                tokio::task::yield_now().await;
            }
            let mut chunk = String::new();
            for e in lines.by_ref().take(LINES_PER_CHUNK) {
                chunk.push_str(&e.json());
                chunk.push('\n');
            }
            (!chunk.is_empty()).then_some((Ok(chunk), (lines, true)))
        },
    )
}

async fn events(State(s): State<Arc<Shared>>, Query(f): Query<Filter>) -> Response {
    let follow = f.follow();
    // Only Arcs are taken under the lock; filtering and JSON happen later,
    // in the body's stream.
    let recent: Vec<Arc<EventLine>> = match s.recent.lock() {
        Ok(r) => r.iter().cloned().collect(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let f = Arc::new(f);
    let recent: Vec<Arc<EventLine>> = recent.into_iter().filter(|e| f.matches(e)).collect();
    let headers = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !follow {
        return (headers, Body::from_stream(ndjson(recent))).into_response();
    }
    if s.followers.fetch_add(1, Ordering::Relaxed) >= s.limits.followers {
        s.followers.fetch_sub(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many followers\n").into_response();
    }
    let slot = FollowerSlot(s.clone());
    let rx = s.live.subscribe();
    let idle = s.limits.follower_idle;
    let live = BroadcastStream::new(rx).filter_map(move |r| {
        let out = match r {
            Ok(e) if f.matches(&e) => Some(format!("{}\n", e.json())),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(format!("{{\"type\":\"follow_lagged\",\"skipped\":{n}}}\n"))
            }
        };
        futures::future::ready(out)
    });
    // Ends after `idle` without a line; the slot goes with the stream.
    let live = futures::stream::unfold(Some((Box::pin(live), slot)), move |state| async move {
        let (mut live, slot) = state?;
        match tokio::time::timeout(idle, live.next()).await {
            Ok(Some(line)) => Some((Ok(line), Some((live, slot)))),
            Ok(None) => None,
            Err(_) => Some((
                Ok(format!(
                    "{{\"type\":\"follow_idle\",\"idle_seconds\":{}}}\n",
                    idle.as_secs_f64()
                )),
                None,
            )),
        }
    });
    (headers, Body::from_stream(ndjson(recent).chain(live))).into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt as _;

    use super::*;

    /// A line about (namespace, pod), with a phase and a kind; its JSON
    /// names it so answers can be told apart.
    fn line(
        tag: &str,
        namespace: Option<&str>,
        pod: Option<&str>,
        phase: Option<&'static str>,
        kind: &'static str,
    ) -> EventLine {
        EventLine {
            body: LineBody::Json(format!("{{\"tag\":\"{tag}\"}}")),
            kind,
            who: Arc::new(Attribution {
                namespace: namespace.map(str::to_string),
                pod: pod.map(str::to_string),
                ..Default::default()
            }),
            phase,
        }
    }

    /// Lines about two pods of `shop`, one of `prod`, and one about no pod.
    fn lines() -> Vec<EventLine> {
        vec![
            line(
                "race",
                Some("shop"),
                Some("checkout-1"),
                Some("startup_race"),
                "connect_failure",
            ),
            line(
                "ready",
                Some("shop"),
                Some("checkout-1"),
                Some("sidecar_ready"),
                "connect_failure",
            ),
            line("exec", Some("shop"), Some("cart-1"), None, "exec"),
            line(
                "prod",
                Some("prod"),
                Some("checkout-1"),
                Some("startup_race"),
                "connect_failure",
            ),
            line("host", None, None, Some("no_sidecar"), "connect_failure"),
        ]
    }

    /// A filter as `/events?<query>` parses it.
    fn filter(query: &str) -> Filter {
        let uri: axum::http::Uri = format!("/events?{query}").parse().unwrap();
        Query::<Filter>::try_from_uri(&uri).unwrap().0
    }

    /// Tags of the lines a filter lets through, in order.
    fn matching(query: &str) -> Vec<String> {
        let f = filter(query);
        lines().iter().filter(|l| f.matches(l)).map(tag).collect()
    }

    fn tag(l: &EventLine) -> String {
        tag_of(l.json().as_bytes())
    }

    fn shared(limits: Limits) -> Arc<Shared> {
        Shared::new(Metrics::new(false).unwrap(), limits)
    }

    #[test]
    fn no_filter_matches_every_line() {
        assert_eq!(matching(""), ["race", "ready", "exec", "prod", "host"]);
        assert_eq!(matching("follow=1"), matching(""), "follow is no filter");
    }

    #[test]
    fn each_filter_alone() {
        assert_eq!(matching("namespace=shop"), ["race", "ready", "exec"]);
        assert_eq!(matching("namespace=prod"), ["prod"]);
        assert_eq!(matching("pod=checkout-1"), ["race", "ready", "prod"]);
        assert_eq!(matching("phase=startup_race"), ["race", "prod"]);
        assert_eq!(matching("phase=no_sidecar"), ["host"]);
        assert_eq!(matching("type=exec"), ["exec"]);
        assert_eq!(
            matching("type=connect_failure"),
            ["race", "ready", "prod", "host"]
        );
    }

    #[test]
    fn filters_combine_as_and() {
        assert_eq!(matching("namespace=shop&pod=checkout-1"), ["race", "ready"]);
        assert_eq!(
            matching("namespace=shop&pod=checkout-1&phase=startup_race&type=connect_failure"),
            ["race"]
        );
        assert!(matching("namespace=prod&pod=cart-1").is_empty());
        assert!(matching("pod=cart-1&type=connect_failure").is_empty());
    }

    #[test]
    fn a_line_without_the_field_never_matches_a_filter_on_it() {
        // `exec` has no phase, `host` no namespace or pod.
        assert!(!matching("phase=startup_race").contains(&"exec".to_string()));
        for q in ["namespace=shop", "pod=checkout-1", "phase=sidecar_ready"] {
            assert!(!matching(q).contains(&"host".to_string()), "{q}");
        }
    }

    #[test]
    fn unknown_values_match_nothing() {
        for q in [
            "namespace=nope",
            "pod=nope",
            "phase=nope",
            "type=nope",
            "namespace=SHOP",
        ] {
            assert!(matching(q).is_empty(), "{q}");
        }
    }

    #[test]
    fn recent_buffer_keeps_the_newest_lines() {
        let s = shared(Limits {
            recent: 3,
            ..Limits::default()
        });
        assert!(s.keeps_recent());
        s.publish_all(lines());
        let kept: Vec<String> = s.recent.lock().unwrap().iter().map(|l| tag(l)).collect();
        assert_eq!(kept, ["exec", "prod", "host"]);

        let none = shared(Limits {
            recent: 0,
            ..Limits::default()
        });
        assert!(!none.keeps_recent());
        none.publish_all(lines());
        assert!(none.recent.lock().unwrap().is_empty());
    }

    /// `/events` as the router runs it: the query parsed, the handler called.
    async fn get_events(s: &Arc<Shared>, query: &str) -> Response {
        events(State(s.clone()), Query(filter(query))).await
    }

    async fn body_lines(r: Response) -> Vec<String> {
        let b = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(b.to_vec()).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        text.lines().map(|l| tag_of(l.as_bytes())).collect()
    }

    #[tokio::test]
    async fn events_answers_filtered_ndjson() {
        let s = shared(Limits::default());
        s.publish_all(lines());
        let r = get_events(&s, "namespace=shop&type=connect_failure").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        assert_eq!(body_lines(r).await, ["race", "ready"]);
        let all = get_events(&s, "").await;
        assert_eq!(
            body_lines(all).await,
            ["race", "ready", "exec", "prod", "host"]
        );
        assert!(
            body_lines(get_events(&s, "pod=nope").await)
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn follow_sends_recent_then_live_lines_through_the_filter() {
        let s = shared(Limits::default());
        s.publish_all(lines());
        let r = get_events(&s, "follow=1&namespace=prod").await;
        assert_eq!(r.status(), StatusCode::OK);
        let mut body = r.into_body().into_data_stream();
        let mut next = async || {
            let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
                .await
                .expect("a line within 5 s")
                .unwrap()
                .unwrap();
            tag_of(&chunk)
        };
        assert_eq!(next().await, "prod", "the recent line first");
        s.publish_all([
            line("live-shop", Some("shop"), Some("cart-1"), None, "exec"),
            line("live-prod", Some("prod"), Some("web-0"), None, "exec"),
        ]);
        assert_eq!(next().await, "live-prod", "live-shop was filtered out");
    }

    fn tag_of(chunk: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(chunk).unwrap();
        v["tag"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn followers_beyond_the_limit_are_refused() {
        let s = shared(Limits {
            followers: 1,
            ..Limits::default()
        });
        let first = get_events(&s, "follow=1").await;
        assert_eq!(first.status(), StatusCode::OK);
        let second = get_events(&s, "follow=yes").await;
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(first);
        let third = get_events(&s, "follow=true").await;
        assert_eq!(third.status(), StatusCode::OK, "the slot was given back");
        // Without follow, no slot is needed.
        assert_eq!(get_events(&s, "").await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn an_idle_follower_is_ended_and_gives_its_slot_back() {
        let s = shared(Limits {
            followers: 1,
            follower_idle: Duration::from_millis(100),
            ..Limits::default()
        });
        let r = get_events(&s, "follow=1").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            get_events(&s, "follow=1").await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // A line resets the idle time; then nothing comes, and the stream ends.
        let body = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            s.publish_all([line("late", Some("shop"), None, None, "exec")]);
            axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap()
        })
        .await
        .expect("the idle follower ends");
        let text = String::from_utf8(body.to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(tag_of(lines[0].as_bytes()), "late");
        assert!(lines[1].contains("\"type\":\"follow_idle\""), "{text}");
        assert_eq!(s.followers.load(Ordering::Relaxed), 0);
        assert_eq!(get_events(&s, "follow=1").await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn large_answers_are_serialised_in_chunks_as_they_are_sent() {
        let s = shared(Limits::default());
        let many: Vec<EventLine> = (0..LINES_PER_CHUNK * 3 + 1)
            .map(|_| line("x", Some("shop"), None, None, "exec"))
            .collect();
        s.publish_all(many);
        let mut body = get_events(&s, "").await.into_body().into_data_stream();
        let mut chunks = 0;
        let mut lines = 0;
        while let Some(c) = body.next().await {
            chunks += 1;
            lines += c.unwrap().iter().filter(|b| **b == b'\n').count();
        }
        assert_eq!((chunks, lines), (4, LINES_PER_CHUNK * 3 + 1));
    }
}
