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
    race::{Capture, Phase},
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
        mesh: Option<Arc<str>>,
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
            } => serde_json::to_string(&KernelJson::from_kernel(
                ev,
                &self.who,
                *phase,
                *capture,
                mesh.as_deref(),
            ))
            .unwrap_or_else(|e| format!("{{\"type\":\"unserialisable\",\"error\":\"{e}\"}}")),
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
mod tests;
