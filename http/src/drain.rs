//! The HTTP front's part of stopping a node: a phase that only moves forward, and the gate every
//! request passes ([`gate`]), which counts the requests it admitted so the node can wait for them.
//!
//! ```text
//! Serving ──SIGTERM──▶ Announced ──drain_grace_ms──▶ Refusing ──in flight = 0 (≤ drain_timeout_ms)──▶ closed
//!           /readyz 503 draining     new requests: 503 draining + Retry-After, admitted ones finish
//! ```
//!
//! `/healthz`, `/readyz` and `/metrics` are answered in every phase: they are how operators and
//! load balancers watch the drain. The listener stays open until the node closes the server, so a
//! balancer sees `/readyz` answer 503 before the port refuses connections.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Where the front is in a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving = 0,
    /// `/readyz` answers `503 draining`; every request is still served (the balancers' grace).
    Announced = 1,
    /// New requests are refused `503 draining`; admitted ones finish.
    Refusing = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Serving,
            1 => Phase::Announced,
            _ => Phase::Refusing,
        }
    }

    /// A drain only moves forward: a second SIGTERM, or a late call, never re-opens the front.
    pub fn advance(self, to: Phase) -> Phase {
        self.max(to)
    }

    /// Whether a request for `path` is let through in this phase.
    pub fn admits(self, path: &str) -> bool {
        self != Phase::Refusing || always_served(path)
    }
}

/// The endpoints that answer in every phase: how a drain is watched.
pub fn always_served(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// The front's drain state, shared by the gate, `/readyz` and the node.
#[derive(Debug, Default)]
pub struct Drain {
    phase: AtomicU8,
    /// Requests admitted by the gate and not answered yet (watch endpoints not counted).
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Drain {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(SeqCst))
    }

    /// Moves the phase forward to `to` (never back).
    pub fn advance(&self, to: Phase) {
        let _ = self.phase.fetch_update(SeqCst, SeqCst, |now| Some(Phase::from_u8(now).advance(to) as u8));
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    /// Counts a request in, unless the front refuses new ones. Counting first and checking the
    /// phase second means a request is either refused or counted before [`Drain::settled`] can
    /// see zero: none slips through between the two.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        self.in_flight.fetch_add(1, SeqCst);
        let admitted = Admitted(self.clone());
        (self.phase() != Phase::Refusing).then_some(admitted)
    }

    /// Waits until no admitted request is running, at most `bound`; `Err(n)`: `n` still are.
    pub async fn settled(&self, bound: Duration) -> Result<(), usize> {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(bound, wait).await.map_err(|_| self.in_flight())
    }
}

/// One admitted request; dropping it (answered, or its client gone) counts it out.
struct Admitted(Arc<Drain>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The answer to a request that arrives while the node stops: nothing was done, go elsewhere.
pub fn draining() -> Response {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "draining",
        "this node is shutting down; nothing was done: send the request to another node",
    );
    e.retry_after = Some(1);
    let mut res = e.into_response();
    // The client's next request should go over a new connection, to another node.
    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// The gate in front of every route (see the module doc).
pub async fn gate(State(drain): State<Arc<Drain>>, req: Request, next: Next) -> Response {
    if always_served(req.uri().path()) {
        return next.run(req).await;
    }
    match drain.admit() {
        Some(_admitted) => next.run(req).await,
        None => draining(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    #[test]
    fn the_phase_only_moves_forward_and_the_watch_endpoints_always_answer() {
        assert_eq!(Phase::Refusing.advance(Phase::Announced), Phase::Refusing);
        assert_eq!(Phase::Serving.advance(Phase::Announced), Phase::Announced);
        assert!(Phase::Announced.admits("/v1/orders"));
        assert!(!Phase::Refusing.admits("/v1/orders"));
        for p in ["/healthz", "/readyz", "/metrics"] {
            assert!(Phase::Refusing.admits(p), "{p}");
        }
        let d = Drain::default();
        d.advance(Phase::Refusing);
        d.advance(Phase::Announced);
        assert_eq!(d.phase(), Phase::Refusing);
    }

    fn app(drain: Arc<Drain>, release: Arc<tokio::sync::Notify>) -> Router {
        Router::new()
            .route(
                "/slow",
                get(move || async move {
                    release.notified().await;
                    "done"
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(drain, gate))
    }

    fn req(uri: &str) -> Request {
        Request::builder().uri(uri).body(Body::empty()).expect("request")
    }

    #[tokio::test]
    async fn admitted_requests_finish_new_ones_are_refused_and_the_drain_waits_for_them() {
        let drain = Arc::new(Drain::default());
        let release = Arc::new(tokio::sync::Notify::new());
        let r = app(drain.clone(), release.clone());
        let slow = tokio::spawn(r.clone().oneshot(req("/slow")));
        while drain.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        drain.advance(Phase::Announced);
        assert_eq!(drain.in_flight(), 1);
        drain.advance(Phase::Refusing);
        let refused = r.clone().oneshot(req("/slow")).await.expect("infallible");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16).await.expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["error"], "draining");
        assert_eq!(r.clone().oneshot(req("/healthz")).await.expect("infallible").status(), StatusCode::OK);
        // The admitted one is still running: the drain waits for it, within its bound.
        assert_eq!(drain.settled(Duration::from_millis(20)).await, Err(1));
        release.notify_waiters();
        let done = slow.await.expect("task").expect("infallible");
        assert_eq!(done.status(), StatusCode::OK);
        assert_eq!(drain.settled(Duration::from_secs(5)).await, Ok(()));
    }

    #[tokio::test]
    async fn a_client_that_leaves_is_counted_out() {
        let drain = Arc::new(Drain::default());
        let r = app(drain.clone(), Arc::new(tokio::sync::Notify::new()));
        let slow = tokio::spawn(r.oneshot(req("/slow")));
        while drain.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        slow.abort();
        assert_eq!(drain.settled(Duration::from_secs(5)).await, Ok(()));
    }
}
