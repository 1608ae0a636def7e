//! The HTTP edge: what every connection and every request passes before a handler sees it.
//!
//! - **Connections** ([`serve`]): at most `[http] max_connections` open, and at most
//!   `max_connections_per_address` from one client address; one more is answered a
//!   canned `503` JSON and closed at once. The first request's headers must arrive within
//!   `header_timeout_ms` of the accept, and the next request's within as long of the answer
//!   before it (hyper's timer), so a silent client or an idle keep-alive is closed then. A
//!   connection on which no byte moves either way for `idle_timeout_ms` is closed too
//!   ([`IdleTimeout`]): that ends one stuck mid-request, such as a client that stops reading its
//!   answer, which no request timer covers. HTTP/1.1 only: nothing here needs h2, and protocol
//!   detection would run before hyper's timer starts.
//! - **Requests** ([`harden`]): a request id (`x-request-id`, made when absent, echoed, on the
//!   request's log span); the body limit, refused from `Content-Length` before a byte of the body
//!   is read; the whole request within `request_timeout_ms` (else `408`), so a body trickling in
//!   one byte a second is cut off with the permit-free extractor still waiting (the orders permit
//!   is taken only once the body is in); a panic in a handler is a `500`; and every error leaves
//!   as JSON ([`json_errors`]), axum's own rejections and tower-http's bare statuses included.
//!
//! Caveats: the idle timer is per connection, not per request, so it must stay longer than the
//! request timeout (config validation enforces it); a refused connection costs one accept and one
//! small write; there is no per-address cap yet (a rate limit per token and address is issue 9's
//! next step); a request head hyper cannot parse (or one over its size limit) is answered by hyper
//! itself, `400`/`431` with no body, before any layer here runs. When the server is told to stop,
//! it closes its listener and gives open connections `drain_timeout_ms` to finish; the node's
//! drain ([`crate::drain`]) has by then refused new requests and waited for the admitted ones.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::config::HttpEdge;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

use crate::error::ApiError;
use crate::HttpMetrics;

/// How much of a non-JSON error body is kept as the JSON error's message, and how long reading it
/// may take.
const MESSAGE_MAX: usize = 512;
const BODY_READ: Duration = Duration::from_secs(1);

/// The edge's bounds, as durations (from the config's `[http]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeConfig {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a stopping server lets open connections finish their requests.
    pub drain_timeout: Duration,
}

impl From<&HttpEdge> for EdgeConfig {
    fn from(h: &HttpEdge) -> Self {
        Self {
            max_connections: h.max_connections,
            max_connections_per_address: h.max_connections_per_address,
            header_timeout: Duration::from_millis(h.header_timeout_ms),
            request_timeout: Duration::from_millis(h.request_timeout_ms),
            idle_timeout: Duration::from_millis(h.idle_timeout_ms),
            drain_timeout: Duration::from_millis(h.drain_timeout_ms),
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self::from(&HttpEdge::default())
    }
}

/// Wraps `router` in the per-request layers (outermost first): request id, trace, span, access
/// line and latency ([`crate::observe`]), echo of the id, JSON errors, panic → 500, whole-request timeout, body limit.
pub fn harden(router: Router, edge: &EdgeConfig, body_limit: usize, metrics: Arc<HttpMetrics>) -> Router {
    router
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, edge.request_timeout))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn_with_state(metrics, json_errors))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Its trace, span, access line and latency (after every layer that may answer instead).
        .layer(middleware::from_fn(crate::observe::observe))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The panic's own message goes to the log (the panic hook), never to the client.
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request failed inside this node; it is logged")
        .into_response()
}

/// The code of a JSON error made from a bare status.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "overloaded",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// What a bare status says, when its body says nothing.
fn default_message(status: StatusCode) -> String {
    match status {
        StatusCode::REQUEST_TIMEOUT => {
            "the request took too long to arrive or to answer; nothing is known to be recorded \
                                        unless you sent an Idempotency-Key: retry with the same one"
                .into()
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!("the body is larger than {} bytes", crate::BODY_LIMIT),
        s => s.canonical_reason().unwrap_or("error").to_lowercase(),
    }
}

fn is_json(res: &Response) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json") || ct.starts_with("application/problem+json"))
}

/// Every error leaves as the API's JSON error: a 4xx/5xx that is not JSON yet (axum's extractor
/// rejections, tower-http's timeout and body-limit statuses) gets a code from its status and its
/// text, trimmed, as the message. Headers such as `Retry-After` and `Allow` are kept.
pub async fn json_errors(State(metrics): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    match status {
        StatusCode::REQUEST_TIMEOUT => {
            metrics.request_timeouts.fetch_add(1, Relaxed);
        }
        StatusCode::INTERNAL_SERVER_ERROR => {
            metrics.internal_errors.fetch_add(1, Relaxed);
        }
        _ => {}
    }
    let mut res = res;
    if matches!(status, StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) {
        // Answered with the body (partly) unread: the connection cannot carry another request,
        // and hyper closes it. Say so, or a client's pool reuses it and its next request fails.
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if !(status.is_client_error() || status.is_server_error()) || is_json(&res) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    // These bodies are short texts made by axum or tower-http, already in memory; the bound is a
    // guard, not an expectation.
    let text = tokio::time::timeout(BODY_READ, axum::body::to_bytes(body, MESSAGE_MAX * 4))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let text: String = String::from_utf8_lossy(&text).trim().chars().take(MESSAGE_MAX).collect();
    let message = if text.is_empty() { default_message(status) } else { text };
    let fresh = ApiError::new(status, code_for(status), message).into_response();
    let (fresh_parts, body) = fresh.into_parts();
    // The inner response's headers stay (`Allow`, its own `Retry-After`); only the body's type
    // and length change, and a header the JSON error adds is added only where missing.
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in fresh_parts.headers.iter() {
        if name == header::CONTENT_TYPE || !parts.headers.contains_key(name) {
            parts.headers.insert(name, value.clone());
        }
    }
    Response::from_parts(parts, body)
}

/// Serves `router` (already [`harden`]ed) on `listener` until `shutdown` resolves, then lets open
/// connections finish their requests for up to `drain_timeout`, and closes those still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    edge: EdgeConfig,
    metrics: Arc<HttpMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(edge.max_connections));
    let per_address = bulkhead_cluster::caps::PerAddress::by_client(edge.max_connections_per_address);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted: the
                    // listener itself is fine; breathe, so a full fd table is not a busy loop.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // The address's share first, so that one address never holds every connection.
        let Some(own) = per_address.try_take(peer.ip()) else {
            metrics.connections_refused_per_address.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "connection refused: max_connections_per_address reached");
            tokio::spawn(refuse(stream));
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "connection refused: max_connections reached");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(IdleTimeout::new(stream, edge.idle_timeout));
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut req = req.map(Body::new);
            // The rate limit keys on the client's address ([`crate::auth`]).
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            router.clone().oneshot(req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(edge.header_timeout)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        let open = Open::new(metrics.clone(), slot, own);
        conns.spawn(async move {
            if let Err(e) = conn.await {
                // A client that went away, or one cut off by a timeout: normal at an edge.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(edge.drain_timeout) => {
            tracing::warn!(open = conns.len(), "connections still open after the drain; closing them");
        }
    }
    // Dropping a connection's task closes its socket; its slot and gauge go with `drop`s below.
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// One open connection: its slot and its count in the gauge, both given back when it ends, also
/// when its task is aborted.
struct Open {
    metrics: Arc<HttpMetrics>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _own: bulkhead_cluster::caps::AddressSlot,
}

impl Open {
    fn new(
        metrics: Arc<HttpMetrics>,
        slot: tokio::sync::OwnedSemaphorePermit,
        own: bulkhead_cluster::caps::AddressSlot,
    ) -> Self {
        metrics.connections_open.fetch_add(1, Relaxed);
        Self { metrics, _slot: slot, _own: own }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.connections_open.fetch_sub(1, Relaxed);
    }
}

/// Answers a connection over the cap with a `503` and closes it (bounded: a peer that does not
/// read is dropped after a second).
async fn refuse(mut stream: TcpStream) {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "this node has as many open connections as it accepts; retry later",
    )
    .body_json()
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// A stream that fails with `TimedOut` once no byte has moved either way for `idle`.
pub struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, idle: Duration) -> Self {
        Self { inner, idle, deadline: Box::pin(tokio::time::sleep(idle)) }
    }

    fn moved(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    /// Called when the inner stream is pending: registers the deadline's waker, and says whether it
    /// has passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no byte moved for the idle timeout")
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use serde_json::Value;

    fn boom() -> &'static str {
        panic!("a bug")
    }

    fn app(edge: EdgeConfig) -> (Router, Arc<HttpMetrics>) {
        #[derive(serde::Deserialize)]
        struct Q {
            #[allow(dead_code)]
            n: u32,
        }
        let metrics = Arc::new(HttpMetrics::default());
        let r = Router::new()
            .route("/ok", get(|| async { "fine" }))
            .route("/panic", get(|| async { boom() }))
            .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(3600)).await }))
            .route("/query", get(|_: axum::extract::Query<Q>| async {}))
            .route("/body", post(|b: axum::body::Bytes| async move { b.len().to_string() }));
        (harden(r, &edge, 1024, metrics.clone()), metrics)
    }

    fn request_id(res: &Response) -> Option<&HeaderValue> {
        res.headers().get("x-request-id")
    }

    async fn send(r: &Router, req: Request) -> (StatusCode, Option<HeaderValue>, Value) {
        let res = r.clone().oneshot(req).await.expect("infallible");
        let (status, id) = (res.status(), request_id(&res).cloned());
        let json = is_json(&res);
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.expect("body");
        let body = if json { serde_json::from_slice(&bytes).expect("JSON error body") } else { Value::Null };
        (status, id, body)
    }

    fn get_req(uri: &str) -> Request {
        Request::builder().uri(uri).body(Body::empty()).expect("request")
    }

    #[tokio::test]
    async fn a_request_id_is_made_when_absent_and_echoed_when_given() {
        let (r, _) = app(EdgeConfig::default());
        let (status, id, _) = send(&r, get_req("/ok")).await;
        assert_eq!(status, StatusCode::OK);
        let id = id.expect("an id was made");
        assert!(uuid::Uuid::parse_str(id.to_str().expect("ascii")).is_ok(), "{id:?}");
        let req = Request::builder().uri("/ok").header("x-request-id", "abc-123").body(Body::empty()).expect("req");
        assert_eq!(send(&r, req).await.1.as_ref().and_then(|v| v.to_str().ok()), Some("abc-123"));
    }

    #[tokio::test]
    async fn a_panic_is_a_json_500_that_names_no_internals() {
        let (r, metrics) = app(EdgeConfig::default());
        let (status, id, body) = send(&r, get_req("/panic")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "internal");
        assert!(!body.to_string().contains("a bug"), "{body}");
        assert!(id.is_some(), "errors carry the request id too");
        assert_eq!(metrics.internal_errors.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn extractor_rejections_are_json() {
        let (r, _) = app(EdgeConfig::default());
        for uri in ["/query?n=1&n=2", "/query?n=many", "/query"] {
            let (status, _, body) = send(&r, get_req(uri)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(body["error"], "invalid_request", "{uri}: {body}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{uri}: {body}");
        }
        let req = Request::builder().method("DELETE").uri("/ok").body(Body::empty()).expect("req");
        let (status, _, body) = send(&r, req).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
    }

    #[tokio::test]
    async fn a_bare_error_keeps_its_own_headers_as_json() {
        let metrics = Arc::new(HttpMetrics::default());
        let r = Router::new().route(
            "/busy",
            get(|| async { (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "7")], "slow down") }),
        );
        let r = harden(r, &EdgeConfig::default(), 1024, metrics);
        let res = r.oneshot(get_req("/busy")).await.expect("infallible");
        assert_eq!(res.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("7"));
        assert!(is_json(&res));
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!((body["error"].as_str(), body["message"].as_str()), (Some("overloaded"), Some("slow down")));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_from_its_length_before_it_is_read() {
        let (r, _) = app(EdgeConfig::default());
        // A body that fails if anyone reads it: the refusal must come from Content-Length alone.
        let unreadable = Body::from_stream(futures::stream::once(async {
            Err::<axum::body::Bytes, io::Error>(io::Error::other("the body was read"))
        }));
        let req = Request::builder()
            .method("POST")
            .uri("/body")
            .header("content-length", "4096")
            .body(unreadable)
            .expect("req");
        let res = r.clone().oneshot(req).await.expect("infallible");
        // The unread body leaves the connection unusable: the client is told not to reuse it.
        assert_eq!(res.headers().get(header::CONNECTION).and_then(|v| v.to_str().ok()), Some("close"));
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!(body["error"], "too_large", "{body}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_takes_too_long_is_a_json_408() {
        let edge = EdgeConfig { request_timeout: Duration::from_secs(5), ..EdgeConfig::default() };
        let (r, metrics) = app(edge);
        let (status, _, body) = send(&r, get_req("/slow")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::REQUEST_TIMEOUT, Some("request_timeout")));
        assert_eq!(metrics.request_timeouts.load(Relaxed), 1);
        // A body that trickles in is the same: the extractor is still waiting when time is up.
        let trickle = Body::from_stream(futures::stream::unfold(0u32, |i| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((Ok::<_, io::Error>(axum::body::Bytes::from_static(b"x")), i + 1))
        }));
        let req = Request::builder().method("POST").uri("/body").body(trickle).expect("req");
        assert_eq!(send(&r, req).await.0, StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_cut_off_at_the_idle_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = IdleTimeout::new(server, Duration::from_secs(10));
        let started = Instant::now();
        // 64 bytes fit the pipe; the rest waits for a reader that never comes.
        let err = s.write_all(&[7u8; 1024]).await.expect_err("the write must not wait for ever");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_fails_after_the_idle_timeout_and_not_while_bytes_move() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = IdleTimeout::new(server, Duration::from_secs(10));
        let mut client = client;
        let mut buf = [0u8; 8];
        // Bytes every 6 s keep it open past 10 s.
        let feeder = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                client.write_all(b"a").await.expect("write");
            }
            client // kept open, silent
        });
        for _ in 0..3 {
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.expect("still open");
            assert_eq!(n, 1);
        }
        let started = Instant::now();
        let err = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(feeder.await);
    }
}
