//! Kubernetes Events on pods (one per race summary), aggregated and
//! rate-limited, written off the pipeline's thread.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kube::Client;

use super::Access;
use tokio::sync::mpsc;

/// The pipeline's end of the Events writer: a bounded queue that never
/// waits, and the count of Events not written (full queue, rate limit, API
/// errors).
#[derive(Debug, Clone)]
pub struct EventQueue {
    tx: mpsc::Sender<PodEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventQueue {
    /// Queues an Event; a full queue counts it as dropped.
    pub(crate) fn send(&self, ev: PodEvent) {
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events not written so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Starts the Events writer (30 a minute, one per pod and reason per 10
/// minutes) on its own task.
pub(crate) async fn start_events(access: &Access, node: String) -> anyhow::Result<EventQueue> {
    let client = super::client(access)
        .await
        .context("--k8s-events needs the Kubernetes API")?;
    let (tx, rx) = mpsc::channel(256);
    let dropped = Arc::<AtomicU64>::default();
    tokio::spawn(write_events(
        client,
        node,
        rx,
        30,
        Duration::from_secs(600),
        dropped.clone(),
    ));
    Ok(EventQueue { tx, dropped })
}

/// A Kubernetes Event to write on a pod (one per startup-race summary).
#[derive(Debug, Clone)]
pub(crate) struct PodEvent {
    pub namespace: String,
    pub pod: String,
    pub uid: Option<String>,
    pub reason: &'static str,
    pub note: String,
}

/// Writes Warning events on pods, aggregated by kube-rs' recorder (repeats
/// become a series) and rate-limited: at most `per_minute` a minute, and one
/// per pod and reason per `per_pod`. What is refused is counted, not queued.
pub(crate) async fn write_events(
    client: Client,
    node: String,
    mut rx: mpsc::Receiver<PodEvent>,
    per_minute: u32,
    per_pod: Duration,
    dropped: Arc<AtomicU64>,
) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "connscope".into(),
            instance: Some(node),
        },
    );
    let mut window = Instant::now();
    let mut sent_in_window = 0u32;
    let mut last: HashMap<(String, String, &'static str), Instant> = HashMap::new();
    while let Some(e) = rx.recv().await {
        if window.elapsed() >= Duration::from_secs(60) {
            window = Instant::now();
            sent_in_window = 0;
        }
        let key = (e.namespace.clone(), e.pod.clone(), e.reason);
        let recent = last.get(&key).is_some_and(|t| t.elapsed() < per_pod);
        if sent_in_window >= per_minute || recent {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        sent_in_window += 1;
        if last.len() > 10_000 {
            last.retain(|_, t| t.elapsed() < per_pod);
        }
        last.insert(key, Instant::now());
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(e.pod.clone()),
            namespace: Some(e.namespace.clone()),
            uid: e.uid.clone(),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: e.reason.into(),
            note: Some(e.note.chars().take(1000).collect()),
            action: "ObserveConnect".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&ev, &reference).await {
            dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, pod = %e.pod, "could not write Kubernetes Event");
        }
    }
}
