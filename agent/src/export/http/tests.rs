//! The `/events` buffer and endpoints on hand-made lines.

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
