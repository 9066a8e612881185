//! Reads a running agent's `/events`: plain HTTP (the agent serves no TLS;
//! `kubectl port-forward` or the API server's pod proxy is the way in), with
//! the bearer token an agent run with `--http-auth=kubernetes` asks for.
//! Every way it can fail has its own error, so that `explain` can say what
//! to do about it and exit with its own code.

use std::{fmt, time::Duration};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{
    Request, StatusCode, Uri,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// The most an answer may hold (the agent's buffer is 16 MiB by default).
pub(crate) const MAX_ANSWER_BYTES: usize = 256 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why `/events` could not be read.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// `--addr` is not an `http://` URL.
    BadAddress(String),
    /// No connection, or no answer in time.
    Unreachable(String),
    /// The agent answered with an error status.
    Refused { status: StatusCode, body: String },
    /// The answer broke off or was too large.
    BadAnswer(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::BadAddress(s) | FetchError::Unreachable(s) | FetchError::BadAnswer(s) => {
                f.write_str(s)
            }
            FetchError::Refused { status, body } => write!(f, "{status}: {}", body.trim()),
        }
    }
}

/// The agent's base URL: `--addr` as given (`http://host:port`, a bare
/// `host:port`, or a proxy path such as the API server's
/// `.../pods/<agent>:9464/proxy`), without a trailing slash.
pub(crate) fn base_url(addr: &str) -> Result<String, FetchError> {
    let addr = addr.trim();
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| FetchError::BadAddress(format!("--addr {addr:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(FetchError::BadAddress(format!(
                "--addr {addr}: the agent serves plain HTTP (no TLS); reach it with kubectl port-forward and http://127.0.0.1:<port>"
            )));
        }
        other => {
            return Err(FetchError::BadAddress(format!(
                "--addr {addr}: scheme {} is not http",
                other.unwrap_or("(none)")
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(FetchError::BadAddress(format!("--addr {addr}: no host")));
    }
    if uri.query().is_some() {
        return Err(FetchError::BadAddress(format!(
            "--addr {addr}: a base URL takes no query"
        )));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// GETs `{base}/events?{query}` (with `token` as a bearer token) and returns
/// the NDJSON text.
pub(crate) async fn events(
    base: &str,
    query: &str,
    token: Option<&str>,
) -> Result<String, FetchError> {
    let url = if query.is_empty() {
        format!("{base}/events")
    } else {
        format!("{base}/events?{query}")
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| FetchError::BadAddress(format!("{url} is not a URL: {e}")))?;
    let mut req = Request::get(uri).header(header::ACCEPT, "application/x-ndjson");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::BadAddress(format!("{url}: {e}")))?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| FetchError::Unreachable(format!("{url}: {}", chain(&e))))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = read(resp.into_body(), 4096).await.unwrap_or_default();
            return Err(FetchError::Refused { status, body });
        }
        read(resp.into_body(), MAX_ANSWER_BYTES)
            .await
            .map_err(|e| FetchError::BadAnswer(format!("{url}: {e}")))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            FetchError::Unreachable(format!(
                "{url}: no whole answer within {}s",
                ANSWER_TIMEOUT.as_secs()
            ))
        })?
}

/// The body as text, at most `max` bytes.
async fn read(body: Incoming, max: usize) -> Result<String, String> {
    let bytes = Limited::new(body, max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the answer is larger than {} MiB", max >> 20)
            } else {
                format!("the answer broke off: {e}")
            }
        })?
        .to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// An error and its causes, on one line (the client's own message is only
/// "client error (Connect)"; a cause says "Connection refused").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::{Router, http::HeaderMap, routing::get};

    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(base_url("127.0.0.1:9464").unwrap(), "http://127.0.0.1:9464");
        assert_eq!(
            base_url("http://localhost:9464/").unwrap(),
            "http://localhost:9464"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8001/api/v1/namespaces/connscope-system/pods/connscope-x:9464/proxy").unwrap(),
            "http://127.0.0.1:8001/api/v1/namespaces/connscope-system/pods/connscope-x:9464/proxy"
        );
        for (bad, why) in [
            ("https://10.0.0.1:9464", "plain HTTP"),
            ("ftp://x", "not http"),
            ("http://", "not a URL"),
            ("http://a:9464/?x=1", "no query"),
            ("http://a b", "not a URL"),
        ] {
            let e = base_url(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A stand-in agent on a loopback port: `/events` answers `status` and
    /// `body`, and records the Authorization header it got.
    async fn agent(status: StatusCode, body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let app = Router::new().route(
            "/events",
            get(move |h: HeaderMap, q: axum::extract::RawQuery| {
                let s = s.clone();
                async move {
                    let auth = h
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string());
                    s.lock()
                        .unwrap()
                        .push(format!("{:?} {:?}", auth, q.0.unwrap_or_default()));
                    (status, body)
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, seen)
    }

    #[tokio::test]
    async fn reads_events_with_the_token_and_the_query() {
        let (url, seen) = agent(StatusCode::OK, "{\"type\":\"x\"}\n").await;
        let text = events(&url, "namespace=shop", Some("t0k")).await.unwrap();
        assert_eq!(text, "{\"type\":\"x\"}\n");
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            ["Some(\"Bearer t0k\") \"namespace=shop\""]
        );
        events(&url, "", None).await.unwrap();
        assert_eq!(seen.lock().unwrap()[1], "None \"\"");
    }

    #[tokio::test]
    async fn an_error_status_is_refused_with_its_body() {
        let (url, _) = agent(
            StatusCode::FORBIDDEN,
            "forbidden: user x may not get /events\n",
        )
        .await;
        match events(&url, "", Some("t")).await {
            Err(FetchError::Refused { status, body }) => {
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert!(body.contains("may not get"), "{body}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = events(&format!("http://127.0.0.1:{port}"), "", None)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Unreachable(_)), "{e:?}");
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
