//! Who may read `/metrics` and `/events`: in a cluster, a client presents a
//! bearer token (Prometheus its service account's), and the agent asks the
//! API server, as kube-rbac-proxy does: a TokenReview says who the token
//! belongs to, a SubjectAccessReview whether that user may `get` the
//! non-resource URL (`nonResourceURLs: ["/metrics"]`, `["/events"]` in a
//! ClusterRole). `/healthz` and `/readyz` stay open for the kubelet.
//!
//! Answers: no or malformed token 401, a token the API does not know 401,
//! a known user without the permission 403. Decisions are cached briefly
//! per token and path (allowed one minute, refused ten seconds). When the
//! API cannot answer, the agent fails closed: 503, counted in
//! `connscope_http_auth_total{result="unavailable"}` and logged once per
//! outage; nothing is cached, so it recovers with the API.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use prometheus::IntCounterVec;
use tokio::sync::Semaphore;

/// What the API says about a token for a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// The token is not valid (TokenReview: not authenticated).
    Unauthenticated,
    /// Valid, but the user may not `get` the path (SubjectAccessReview).
    Forbidden,
}

impl Decision {
    fn label(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Unauthenticated => "unauthenticated",
            Decision::Forbidden => "forbidden",
        }
    }
}

/// Who reviews tokens: the API server (or a stand-in in unit tests).
pub trait Reviewer: Send + Sync + 'static {
    /// Reviews `token` for a `get` of `path`; an error when the reviewer
    /// could not answer.
    fn review(
        &self,
        token: String,
        path: &'static str,
    ) -> BoxFuture<'static, Result<Decision, String>>;
}

/// TokenReview then SubjectAccessReview through kube-rs.
pub struct KubeReviewer(pub Client);

impl Reviewer for KubeReviewer {
    fn review(
        &self,
        token: String,
        path: &'static str,
    ) -> BoxFuture<'static, Result<Decision, String>> {
        let client = self.0.clone();
        Box::pin(async move {
            let pp = PostParams::default();
            let tr = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: None,
                },
                ..Default::default()
            };
            let tr = Api::<TokenReview>::all(client.clone())
                .create(&pp, &tr)
                .await
                .map_err(|e| format!("TokenReview: {e}"))?;
            let Some(status) = tr.status.filter(|s| s.authenticated == Some(true)) else {
                return Ok(Decision::Unauthenticated);
            };
            let user = status.user.unwrap_or_default();
            let sar = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: user.username,
                    groups: user.groups,
                    uid: user.uid,
                    extra: user.extra,
                    non_resource_attributes: Some(NonResourceAttributes {
                        path: Some(path.to_string()),
                        verb: Some("get".to_string()),
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let sar = Api::<SubjectAccessReview>::all(client)
                .create(&pp, &sar)
                .await
                .map_err(|e| format!("SubjectAccessReview: {e}"))?;
            Ok(if sar.status.is_some_and(|s| s.allowed) {
                Decision::Allowed
            } else {
                Decision::Forbidden
            })
        })
    }
}

/// How long decisions are kept, and how much is kept.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    pub allowed_ttl: Duration,
    pub denied_ttl: Duration,
    pub max_entries: usize,
    /// Reviews in flight at once (a flood of made-up tokens must not become
    /// a flood on the API server).
    pub concurrent_reviews: usize,
    /// A review taking longer is "unavailable".
    pub review_timeout: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            allowed_ttl: Duration::from_secs(60),
            denied_ttl: Duration::from_secs(10),
            max_entries: 4096,
            concurrent_reviews: 8,
            review_timeout: Duration::from_secs(5),
        }
    }
}

/// Tokens longer than this are refused without asking (service-account
/// JWTs are 1-2 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Decisions by (token, path), each with the instant it expires.
type Cache = HashMap<(String, &'static str), (Decision, Instant)>;

/// The auth layer's state.
pub struct Auth {
    reviewer: Box<dyn Reviewer>,
    policy: CachePolicy,
    cache: Mutex<Cache>,
    reviews: Semaphore,
    /// Requests by result (allowed, unauthenticated, forbidden, unavailable).
    results: IntCounterVec,
    /// In an outage (logged once per outage).
    failing: AtomicBool,
}

impl Auth {
    pub fn new(
        reviewer: Box<dyn Reviewer>,
        policy: CachePolicy,
        results: IntCounterVec,
    ) -> Arc<Auth> {
        Arc::new(Auth {
            reviewer,
            reviews: Semaphore::new(policy.concurrent_reviews.max(1)),
            policy,
            cache: Mutex::new(HashMap::new()),
            results,
            failing: AtomicBool::new(false),
        })
    }

    /// The decision for `token` and `path`, from the cache or the reviewer.
    pub async fn decide(&self, token: &str, path: &'static str) -> Result<Decision, String> {
        let key = (token.to_string(), path);
        if let Some(d) = self.cached(&key) {
            return Ok(d);
        }
        let _permit = self.reviews.acquire().await.map_err(|e| e.to_string())?;
        // Another request may have asked meanwhile.
        if let Some(d) = self.cached(&key) {
            return Ok(d);
        }
        let review = self.reviewer.review(key.0.clone(), path);
        let d = match tokio::time::timeout(self.policy.review_timeout, review).await {
            Ok(r) => r?,
            Err(_) => return Err(format!("no answer within {:?}", self.policy.review_timeout)),
        };
        let ttl = if d == Decision::Allowed {
            self.policy.allowed_ttl
        } else {
            self.policy.denied_ttl
        };
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.policy.max_entries {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= self.policy.max_entries {
                cache.clear();
            }
        }
        cache.insert(key, (d, now + ttl));
        Ok(d)
    }

    fn cached(&self, key: &(String, &'static str)) -> Option<Decision> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(d, _)| *d)
    }

    /// Answers a request for `path` carrying `headers`: `None` to serve it,
    /// else the refusal.
    pub async fn check(&self, headers: &HeaderMap, path: &'static str) -> Option<Response> {
        let Some(token) = bearer(headers) else {
            self.results.with_label_values(&["unauthenticated"]).inc();
            return Some(refuse(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required\n",
            ));
        };
        match self.decide(token, path).await {
            Ok(d) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("HTTP auth: the Kubernetes API reviews tokens again");
                }
                self.results.with_label_values(&[d.label()]).inc();
                match d {
                    Decision::Allowed => None,
                    Decision::Unauthenticated => {
                        Some(refuse(StatusCode::UNAUTHORIZED, "token not accepted\n"))
                    }
                    Decision::Forbidden => Some(
                        (
                            StatusCode::FORBIDDEN,
                            format!("forbidden: get {path} is not granted to this user\n"),
                        )
                            .into_response(),
                    ),
                }
            }
            Err(e) => {
                self.results.with_label_values(&["unavailable"]).inc();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        error = %e,
                        "HTTP auth: the Kubernetes API cannot review tokens; /metrics and /events answer 503 until it can (failing closed)"
                    );
                }
                Some(
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "cannot review the token: the Kubernetes API is unavailable\n",
                    )
                        .into_response(),
                )
            }
        }
    }
}

fn refuse(status: StatusCode, msg: &'static str) -> Response {
    (
        status,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"connscope\"")],
        msg,
    )
        .into_response()
}

/// The bearer token of a request, if it carries a well-formed one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_TOKEN_BYTES)
        .then_some(token)
}

/// The axum middleware guarding the private endpoints.
pub(crate) async fn require(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let path = match req.uri().path() {
        "/metrics" => "/metrics",
        "/events" => "/events",
        _ => return next.run(req).await,
    };
    match auth.check(req.headers(), path).await {
        None => next.run(req).await,
        Some(refused) => refused,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use prometheus::Opts;

    use super::*;

    /// Tokens: "good" may read both paths, "metrics-only" only /metrics,
    /// anything else is unknown; `down` makes every review fail.
    struct Fake {
        calls: Arc<AtomicUsize>,
        down: Arc<AtomicBool>,
    }

    impl Reviewer for Fake {
        fn review(
            &self,
            token: String,
            path: &'static str,
        ) -> BoxFuture<'static, Result<Decision, String>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let down = self.down.load(Ordering::Relaxed);
            Box::pin(async move {
                if down {
                    return Err("connection refused".into());
                }
                Ok(match (token.as_str(), path) {
                    ("good", _) | ("metrics-only", "/metrics") => Decision::Allowed,
                    ("metrics-only", _) => Decision::Forbidden,
                    _ => Decision::Unauthenticated,
                })
            })
        }
    }

    fn auth(policy: CachePolicy) -> (Arc<Auth>, Arc<AtomicUsize>, Arc<AtomicBool>, IntCounterVec) {
        let calls = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let results = IntCounterVec::new(Opts::new("r", "r"), &["result"]).unwrap();
        let a = Auth::new(
            Box::new(Fake {
                calls: calls.clone(),
                down: down.clone(),
            }),
            policy,
            results.clone(),
        );
        (a, calls, down, results)
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = auth {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    async fn status(a: &Auth, auth: Option<&str>, path: &'static str) -> StatusCode {
        a.check(&headers(auth), path)
            .await
            .map_or(StatusCode::OK, |r| r.status())
    }

    #[tokio::test]
    async fn no_token_401_unknown_401_not_granted_403_granted_200() {
        let (a, calls, _, results) = auth(CachePolicy::default());
        assert_eq!(status(&a, None, "/metrics").await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(&a, Some("Basic abc"), "/metrics").await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(&a, Some("Bearer "), "/metrics").await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            calls.load(Ordering::Relaxed),
            0,
            "malformed: the API is not asked"
        );
        assert_eq!(
            status(&a, Some("Bearer nope"), "/metrics").await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(&a, Some("Bearer metrics-only"), "/events").await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&a, Some("Bearer metrics-only"), "/metrics").await,
            StatusCode::OK
        );
        assert_eq!(
            status(&a, Some("bearer good"), "/events").await,
            StatusCode::OK
        );
        assert_eq!(results.with_label_values(&["unauthenticated"]).get(), 4);
        assert_eq!(results.with_label_values(&["forbidden"]).get(), 1);
        assert_eq!(results.with_label_values(&["allowed"]).get(), 2);
    }

    #[tokio::test]
    async fn decisions_are_cached_per_token_and_path_until_they_expire() {
        let (a, calls, _, _) = auth(CachePolicy {
            denied_ttl: Duration::from_millis(50),
            ..CachePolicy::default()
        });
        for _ in 0..5 {
            assert_eq!(
                status(&a, Some("Bearer good"), "/metrics").await,
                StatusCode::OK
            );
            assert_eq!(
                status(&a, Some("Bearer nope"), "/metrics").await,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(
            status(&a, Some("Bearer good"), "/events").await,
            StatusCode::OK
        );
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "another path is another decision"
        );
        tokio::time::sleep(Duration::from_millis(80)).await;
        status(&a, Some("Bearer nope"), "/metrics").await;
        status(&a, Some("Bearer good"), "/metrics").await;
        assert_eq!(
            calls.load(Ordering::Relaxed),
            4,
            "the refusal expired, the grant did not"
        );
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let (a, _, _, _) = auth(CachePolicy {
            max_entries: 10,
            ..CachePolicy::default()
        });
        for i in 0..100 {
            status(&a, Some(&format!("Bearer made-up-{i}")), "/metrics").await;
        }
        assert!(a.cache.lock().unwrap().len() <= 10);
    }

    #[tokio::test]
    async fn api_down_fails_closed_is_counted_and_not_cached() {
        let (a, calls, down, results) = auth(CachePolicy::default());
        down.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(
                status(&a, Some("Bearer good"), "/metrics").await,
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        assert_eq!(results.with_label_values(&["unavailable"]).get(), 3);
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "failures are never cached"
        );
        down.store(false, Ordering::Relaxed);
        assert_eq!(
            status(&a, Some("Bearer good"), "/metrics").await,
            StatusCode::OK
        );
    }
}
